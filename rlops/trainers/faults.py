"""Fault injection for the trainers' restart tests: RLOPS_CRASH_AT=<point>:<n> kills the process
abruptly (os._exit: no finally-block, no flush, no atexit) the n-th time the run passes <point>,
leaving on disk what a kill at that moment leaves.

Points: "step" (after a step's metrics line, before its checkpoint), "metrics-write" (half of a
metrics line written), "checkpoint-write" (half of the temporary checkpoint file written, not
yet renamed), "final-save" (a final model directory half written under its temporary name).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

ENV = "RLOPS_CRASH_AT"
POINTS = ("step", "metrics-write", "checkpoint-write", "final-save")
CRASH_STATUS = 86  # the exit status of an injected crash, distinct from errors (1) and usage (2)

_hits: dict[str, int] = {}


def die(point: str) -> NoReturn:
    """Ends the process at once. Tests running a crash in-process replace this by a function
    raising an exception nothing catches; the files are torn before it is called either way."""
    os._exit(CRASH_STATUS)


def reset() -> None:
    """Forgets how often each point was passed (for tests that run several crashes in one process)."""
    _hits.clear()


def crash_point(point: str, torn: Path | None = None, keep: int | None = None) -> None:
    """Dies here when RLOPS_CRASH_AT names point and this is its n-th pass. Before dying, torn
    (a file, or every file of a directory) is cut to keep bytes (default: half its size), as a
    write cut short by a kill leaves it."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, _, count = spec.partition(":")
    if name not in POINTS or not count.strip().isdigit() or int(count) < 1:
        raise ValueError(f"{ENV} must be <point>:<n> with point one of {POINTS} and n >= 1, got {spec!r}")
    if name != point:
        return
    _hits[point] = _hits.get(point, 0) + 1
    if _hits[point] < int(count):
        return
    reset()
    if torn is not None:
        for path in sorted(torn.rglob("*")) if torn.is_dir() else [torn]:
            if path.is_file():
                os.truncate(path, path.stat().st_size // 2 if keep is None else keep)
    die(point)
