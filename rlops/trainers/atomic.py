"""Writes that a kill cannot leave half done: a file or a directory is written under a temporary
name, synced, then renamed into place, so a reader sees the old version or the whole new one;
and an append of one synced line, whose torn version (the last line) readers skip."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from .faults import crash_point


def fsync_dir(directory: Path) -> None:
    """Makes the renames and creations in directory durable (a rename lives in the directory's entry)."""
    if not hasattr(os, "O_DIRECTORY"):  # Windows cannot open a directory to sync it
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, write: Callable[[BinaryIO], object], point: str | None = None) -> None:
    """path holds what write(file) writes, or (after a kill) what it held before; never a part.
    point: the crash point (faults.crash_point) between the temporary file's write and its rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    if point is not None:
        crash_point(point, torn=tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_text(path: Path, text: str) -> None:
    """write_file of text in UTF-8."""
    data = text.encode()
    write_file(path, lambda f: f.write(data))


def append_line(path: Path, line: str) -> None:
    """Appends line and a newline, synced. A kill can tear only this last line, which
    runlog.read_metrics skips; a rewrite of the whole file per line would cost O(steps) a step."""
    with path.open("ab") as f:
        start = f.tell()
        f.write(line.encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())
    crash_point("metrics-write", torn=path, keep=start + len(line) // 2)


@contextlib.contextmanager
def directory(target: Path) -> Iterator[Path]:
    """Yields an empty temporary sibling of target to write into; when the block ends without an
    error, its files are synced and it replaces target. An exception (or a kill) leaves target as
    it was, and the next write discards the temporary one."""
    tmp, old = target.with_name(f".{target.name}.tmp"), target.with_name(f".{target.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    for path in tmp.rglob("*"):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
    fsync_dir(tmp)
    crash_point("final-save", torn=tmp)
    # A directory cannot be renamed over a non-empty one: the old one steps aside first. A kill
    # between the two renames leaves no target, which a run not yet marked finished redoes.
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)
