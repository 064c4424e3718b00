"""`python -m workers` is the `workers` command."""

from workers.app.cli import main

raise SystemExit(main())
