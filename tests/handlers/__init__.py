"""Handler modules that the execution environment tests import by name."""
