"""`python -m multitune` runs the command line."""

from multitune.cli import main

raise SystemExit(main())
