"""GAE dispatch: the reverse-scan Triton kernel as a torch.library custom op, or the reference loop."""

# No `from __future__ import annotations`: torch.library.custom_op reads real annotations.

import torch
from torch import Tensor

from .. import reference
from ._backend import resolve_backend


@torch.library.custom_op("rlops::gae", mutates_args=())
def gae_op(rewards: Tensor, values: Tensor, mask: Tensor, bootstrap: Tensor | None, gamma: float,
           lam: float, backend: str) -> tuple[Tensor, Tensor]:
    """float32 (advantages, returns) (B, T) from the reverse-scan kernel (Triton, or its CUDA twin with
    backend "cuda"); no gradient."""
    from ..kernels.gae import gae_fwd

    return gae_fwd(rewards, values, mask, bootstrap, gamma, lam, backend)


@gae_op.register_fake
def _(rewards: Tensor, values: Tensor, mask: Tensor, bootstrap: Tensor | None, gamma: float,
      lam: float, backend: str) -> tuple[Tensor, Tensor]:
    return tuple(rewards.new_empty(rewards.shape, dtype=torch.float32) for _ in range(2))


def gae_dispatch(rewards: Tensor, values: Tensor, mask: Tensor, bootstrap: Tensor | None, gamma: float, lam: float,
                 backend: str) -> tuple[Tensor, Tensor]:
    """Checked inputs in, float32 (advantages, returns) out, on the requested backend."""
    backend = resolve_backend(backend, rewards, "gae")
    if backend == "torch":
        adv, ret = reference.gae(rewards, values, mask, gamma, lam, bootstrap)
        return adv.float(), ret.float()
    return gae_op(rewards, values, mask, bootstrap, gamma, lam, backend)
