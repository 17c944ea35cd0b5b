"""The multi-process tests' plumbing: gloo ranks spawned from a test, each rank's results back as JSON.

    results = spawn_ranks(_cases, world, tmp_path)   # _cases(rank, world) -> dict, at module level

Each rank runs with the interpreter speed-up and hint check (conftest is not loaded in a spawned process), in a
gloo process group, and ends with a barrier, so that no rank tears its connections down while a
peer still uses them, and then leaves without the interpreter's exit-time finalizers: a gloo
group torn down by garbage collection at exit has aborted a rank ("terminate called without an
active exception") after it had written its results.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp


def spawn_ranks(cases: Callable[..., dict], world: int, tmp_path: Path, *args: object) -> list[dict]:
    """Runs cases(rank, world, *args) on `world` gloo ranks; returns each rank's dict, in rank order."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    mp.spawn(_rank, args=(cases, world, str(tmp_path), args), nprocs=world, join=True)
    return [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(world)]


def _rank(rank: int, cases: Callable[..., dict], world: int, out: str, args: tuple) -> None:
    from rlops._interpreter import check_hints, speed_up_interpreter  # in the spawned process: no conftest

    speed_up_interpreter()
    check_hints()
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world)
    results = cases(rank, world, *args)
    Path(out, f"{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
