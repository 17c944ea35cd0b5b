"""This process's place in a job: one process or a torchrun job (gloo on CPU, nccl on CUDA), its
device, how a trained model is spread over the processes, and the seeding of its random generators.

Each rank samples its own prompts, a step's gradient is the mean over the ranks of the gradient of
each rank's loss, metrics are averaged across ranks (`Processes.mean`), and rank 0 writes the files
(but every rank writes its own shards of an FSDP checkpoint, checkpoint.py). Two ways to spread a
model, one step either way (P: the bytes of the trained parameters; ring collectives send about
(world - 1) / world of the bytes they name, per rank):

- DistributedDataParallel (the default): every rank holds the whole model, its gradient and its
  optimizer state; each backward all-reduces the gradient (2P per optimizer step, overlapped
  with the backward). Nothing else is communicated but the metrics.
- FSDP2's `fully_shard` (fsdp=True): each rank holds 1/world of every parameter, of its gradient
  and of AdamW's moments, plus the layer being computed, gathered whole. Each block the model
  names in `_no_split_modules` (a decoder layer) is all-gathered before its forward and again
  before its backward, and its gradient reduce-scattered (3P per optimizer step); the rest of the
  model (embeddings, final norm, lm_head, a value head) is gathered for the forward and kept
  through the backward. Every forward without gradient gathers the layers too: sampling one per
  generated token, the old, reference and critic passes one each. Frozen models (the reference,
  a reward model) are sharded as well.

The losses need no communication at all: each rank's fused loss runs on its own samples and the
whole vocabulary, so nothing is sent per token.
"""

from __future__ import annotations

import os
import random
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

Module = TypeVar("Module", bound=nn.Module)


class Processes:
    """This process's place in a torchrun job (or a job of one), its device, and how trained models
    are spread: DDP, or FSDP2 with fsdp=True. With one process fsdp changes nothing (there is
    nothing to shard over), as DDP does nothing, so that one command runs alone or under torchrun."""

    def __init__(self, device: str | None = None, fsdp: bool = False) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        # Before any process group or model: a torch without FSDP2 fails here, not after the cold start.
        self.fsdp = fsdp and self.world > 1
        if self.fsdp and not _has_fully_shard():
            raise RuntimeError(f"fsdp needs torch.distributed.fsdp.fully_shard (torch >= 2.6); this is torch "
                               f"{torch.__version__}. Use DDP (fsdp=False) or a newer torch")
        if device is None:
            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self._mesh: Any = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, module: nn.Module, root: nn.Module | None = None) -> nn.Module:
        """What a trainer calls to train with module (a model, or PolicyForward around one): module
        itself with one process; with several, DDP around module (gradients all-reduced in its
        backward), or with fsdp module itself, once root (the model inside module, module by default)
        is sharded in place by `shard`. Build the optimizer after: fully_shard replaces the parameters."""
        if self.world == 1:
            return module
        if self.fsdp:
            self.shard(module if root is None else root)
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)

    def shard(self, model: Module) -> Module:
        """With fsdp and several processes, model sharded in place by FSDP2 (each rank keeps 1/world of
        every parameter as a DTensor) and returned; otherwise model unchanged (DDP leaves frozen models
        whole). Every rank then calls model's forwards in step with the others (the all-gathers are
        collective): the trainers do, each rank running the same passes on its own samples.

        Units: each block the model names in `_no_split_modules` (a Hugging Face decoder layer), then
        model itself for the rest, so that at most one layer is gathered beyond the root's parameters.
        Copy a model (a reference, a critic's decoder) before it is sharded, never after."""
        if not self.fsdp or is_sharded(model):
            return model
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if self._mesh is None:
            self._mesh = init_device_mesh(self.device.type, (self.world,))
        # As DDP does when it wraps a model: every rank starts from rank 0's values (a module made after
        # the per-rank seeding, such as a value head, differs between ranks; each keeps only its shard).
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(tensor, 0)
        blocks = {name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or ())}
        for module in model.modules():
            if module is not model and type(module).__name__ in blocks:
                fully_shard(module, mesh=self._mesh)
        fully_shard(model, mesh=self._mesh)
        return model

    @staticmethod
    def release(model: nn.Module) -> None:
        """Frees what a sharded model holds gathered after its forwards without gradient: FSDP2
        keeps the root's parameters (embeddings, final norm, lm_head) from a forward until the next
        backward, which a frozen model (the reference, a reward model) never has. Called once its
        outputs are used: the fused-linear pass returns the gathered lm_head weight itself."""
        if is_sharded(model):
            model.reshard()  # type: ignore[operator]

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


def _has_fully_shard() -> bool:
    """Whether this torch has the public FSDP2 API the trainers use."""
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method  # noqa: F401
    except ImportError:
        return False
    return True


def is_sharded(module: nn.Module) -> bool:
    """Whether FSDP2's fully_shard sharded module (its parameters are DTensors, gathered only
    around a forward of module or of a method registered as one)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(module, FSDPModule)


def seed_everything(seed: int) -> None:
    """Seeds Python's and torch's global generators (the ones sampling and initialisation use), on
    the CPU and every CUDA device. Called before a model is built, so that a fresh run, or one
    killed before its first checkpoint and started again, begins from the same weights."""
    random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)  # torch.manual_seed does it too; explicit, as the name promises
