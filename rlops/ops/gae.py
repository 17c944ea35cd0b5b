"""GAE dispatch: the reverse-scan kernel as a torch.library custom op, or the PyTorch backend's loop."""

# No `from __future__ import annotations`: torch.library.custom_op reads real annotations.

import torch
from torch import Tensor

from .. import torch_backend
from ._backend import launchers, resolve_backend


@torch.library.custom_op("rlops::gae", mutates_args=())
def gae_op(rewards: Tensor, values: Tensor, mask: Tensor, bootstrap: Tensor | None, cu_seqlens: Tensor | None,
           gamma: float, lam: float, backend: str) -> tuple[Tensor, Tensor]:
    """float32 (advantages, returns) of rewards' shape ((B, T), or packed (N,) / (1, N) with
    cu_seqlens (S+1,)) from the reverse-scan kernel of `backend` ("triton" or "cuda"); no gradient."""
    return launchers(backend).gae_fwd(rewards, values, mask, bootstrap, gamma, lam, cu_seqlens)


@gae_op.register_fake
def _(rewards, values, mask, bootstrap, cu_seqlens, gamma, lam, backend) -> tuple[Tensor, Tensor]:
    return tuple(rewards.new_empty(rewards.shape, dtype=torch.float32) for _ in range(2))


def gae_dispatch(rewards: Tensor, values: Tensor, mask: Tensor, bootstrap: Tensor | None,
                 cu_seqlens: Tensor | None, discount: tuple[float, float], backend: str) -> tuple[Tensor, Tensor]:
    """Checked inputs in (cu_seqlens: int64 (S+1,) of a packed batch, or None), float32 (advantages,
    returns) out, on the requested backend; discount = (gamma, lam)."""
    backend = resolve_backend(backend, rewards, "gae")
    if backend == "torch":
        adv, ret = torch_backend.gae(rewards, values, mask.bool(), *discount, bootstrap, cu_seqlens)
        return adv.float(), ret.float()
    return gae_op(rewards, values, mask, bootstrap, cu_seqlens, *discount, backend)
