"""The fault-injection suite: real brokers, injected faults, every record counted by id."""
