"""What the estimators of rlops.estimators share: their argument checks (named errors before any
work, no read-back from GPU tensors) and the pieces several of them use (whitening, reward-to-go,
the reverse affine scan)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._validation import (
    check_choice,
    check_float_tensor,
    check_mask,
    check_tensor,
)
from .advantages import SINGLETONS, group_index, group_sum

# ---- argument checks ------------------------------------------------------------------------------------


def _scores(scores: object, name: str = "scores") -> Tensor:
    """A floating (B,) or (B, 1) tensor as float32 (B,)."""
    scores = check_tensor(name, scores)
    if not scores.is_floating_point():
        raise TypeError(f"{name} must be a floating-point (B,) or (B, 1) tensor, got {scores.dtype}")
    if scores.dim() not in (1, 2) or scores.shape[1:] not in ((), (1,)):
        raise ValueError(f"{name} must have shape (B,) or (B, 1), got {tuple(scores.shape)}")
    return scores.detach().reshape(-1).to(torch.float32)


def _token_tensor(name: str, x: object) -> Tensor:
    """A floating (B, T) tensor as float32."""
    x = check_tensor(name, x)
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point (B, T) tensor, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape (B, T), got {tuple(x.shape)}")
    return x.detach().to(torch.float32)


def _like(name: str, x: object, like: Tensor, like_name: str) -> Tensor:
    """A floating tensor of like's (B, T) shape, on its device, as float32."""
    shape = tuple(like.shape)
    return check_float_tensor(name, x, like, [shape], f"{shape} (as {like_name})", like_name).detach().float()


def _mask(response_mask: object, like: Tensor, like_name: str) -> Tensor:
    return check_mask(response_mask, tuple(like.shape), like, "response_mask", like_name)


def _singleton(singleton: object) -> str:
    return check_choice("singleton", singleton, SINGLETONS)


def _groups(n: int, group_size: int | None, group_ids: Tensor | None, like: Tensor,
            like_name: str) -> tuple[Tensor, int]:
    return group_index(n, group_size, group_ids, like, "(B,)", "responses", like_name)


def host_to_device(x: Tensor, device: torch.device) -> Tensor:
    """A CPU tensor onto `device`; onto a GPU from pinned memory and asynchronously, so that the host does
    not wait for the device (a plain copy from pageable memory synchronises the stream)."""
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def _counts(ids: Tensor, n_groups: int) -> Tensor:
    """Each response's group size (B,), float32."""
    return group_sum(torch.ones(ids.shape[0], device=ids.device), ids, n_groups)[ids]


# ---- shared pieces ----------------------------------------------------------------------------------------


def whiten(x: Tensor, mask: Tensor) -> Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the entries where mask (bool, x's shape) is True, 0 elsewhere.

    The variance is unbiased (verl's masked_whiten); with fewer than two entries it is taken as 0
    (verl raises there, which needs a read-back). x's dtype."""
    x = torch.where(mask, x, 0.0)
    n = mask.sum()
    mean = x.sum() / n.clamp(min=1)
    centered = torch.where(mask, x - mean, 0.0)
    var = (centered * centered).sum() / (n - 1).clamp(min=1)
    return centered * torch.rsqrt(var + 1e-8)


def reward_to_go(token_rewards: Tensor, response_mask: Tensor) -> Tensor:
    """G_t = sum_{s >= t} m_s r_s (B, T), at every position (masked ones too, as verl's ReMax and OTB):
    one reversed cumulative sum. token_rewards float (B, T); response_mask bool/0-1 (B, T)."""
    r = _token_tensor("token_rewards", token_rewards)
    m = _mask(response_mask, r, "token_rewards")
    return torch.where(m, r, 0.0).flip(-1).cumsum(-1).flip(-1)


def _reverse_affine_scan(a: Tensor, b: Tensor) -> Tensor:
    """h_t = b_t + a_t h_{t+1} along the last dimension (h_T = 0), by ceil(log2 T) doubling steps:
    after the step of size s, (a_t, b_t) is the composition of the maps t .. t+2s-1."""
    a, b = a.clone(), b.clone()
    step, length = 1, a.shape[-1]
    while step < length:
        b[..., :-step] = b[..., :-step] + a[..., :-step] * b[..., step:]
        a[..., :-step] = a[..., :-step] * a[..., step:]
        step *= 2
    return b
