"""The `rlops` command (also `python -m rlops`).

    rlops bench [--ops ...] [--quick] [--out DIR]    GPU benchmarks of the fused ops (bench/README.md)

Each subcommand has its own --help.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


def _bench(argv: list[str]) -> int:
    import torch

    # Without CUDA the rlops-triton providers run in Triton's interpreter (smoke runs only); the
    # variable must be set before triton is first imported.
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from .bench.run import main

    return main(argv, prog="rlops bench")


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "bench": (_bench, "GPU benchmarks of the fused ops against eager, torch.compile, Liger, ..."),
}


def main(argv: list[str] | None = None) -> int:
    """Runs `rlops <command> [args]`; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        lines = [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: rlops <command> [args]   (rlops <command> --help for its arguments)\n\ncommands:")
        print("\n".join(lines))
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"rlops {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"rlops: unknown command {argv[0]!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]][0](argv[1:])
