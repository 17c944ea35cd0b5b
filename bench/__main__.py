"""`python -m rlops.bench ...`: the same as `rlops bench ...`."""

from rlops.cli import main

raise SystemExit(main(["bench", *__import__("sys").argv[1:]]))
