"""This process's place in a job: one process or a torchrun job (DistributedDataParallel; gloo on
CPU, nccl on CUDA), its device, and the seeding of its random generators.

Each rank samples its own prompts, gradients are averaged by DDP, metrics are averaged across
ranks (`Processes.mean`), and rank 0 writes the files.
"""

from __future__ import annotations

import os
import random

import torch
import torch.distributed as dist
from torch import nn


class Processes:
    """This process's place in a torchrun job (or a job of one) and its device."""

    def __init__(self, device: str | None = None) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device is None:
            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, module: nn.Module) -> nn.Module:
        """DDP around module when there are several processes."""
        if self.world == 1:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Each metric averaged over the processes."""
        if self.world == 1 or not values:
            return values
        t = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return dict(zip(values, (t / self.world).tolist(), strict=True))

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def seed_everything(seed: int) -> None:
    """Seeds Python's and torch's global generators (the ones sampling and initialisation use), on
    the CPU and every CUDA device. Called before a model is built, so that a fresh run, or one
    killed before its first checkpoint and started again, begins from the same weights."""
    random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)  # torch.manual_seed does it too; explicit, as the name promises
