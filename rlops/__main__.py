"""`python -m rlops ...`: the same as the `rlops` command."""

from .cli import main

raise SystemExit(main())
