"""Advantages and rewards for PPO and GRPO (SPEC.md section 5): GAE, group advantages, whitening.

All of these produce training targets, not losses: inputs are detached and nothing here
carries a gradient.

Each takes `cu_seqlens=` for packed (padding-free) batches (rlops.packing): the S sequences
concatenated into one row of N tokens, per-token tensors (N,) or (1, N), per-sequence ones (S,),
and cu_seqlens int32/int64 (S+1,) = [0, cumsum(lengths)] (lengths 0 and 1 allowed). A packed call
gives, on every token of every sequence, what the padded (S, T) call gives on the same sequences.

None of them reads a value back from a GPU tensor (no device-to-host sync), except where noted:
the value checks of masks and cu_seqlens run on CPU tensors, and elsewhere only with RLOPS_CHECK=1
(rlops._validation.value_checks_enabled).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from . import torch_backend
from ._validation import (
    check_choice,
    check_float,
    check_float_tensor,
    check_mask,
    check_tensor,
    value_checks_enabled,
)
from .ops.gae import gae_dispatch
from .packing import INDEX_DTYPES, Layout, check_cu_seqlens


def _unit_interval(name: str, value: object) -> float:
    value = check_float(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return value


def _is_packed_row(x: Tensor) -> bool:
    """x has a packed per-token shape: (N,) or (1, N)."""
    return x.dim() == 1 or (x.dim() == 2 and x.shape[0] == 1)


def _token_layout(name: str, x: Tensor, cu_seqlens: object) -> tuple[tuple[int, ...], Tensor | None, int]:
    """The per-token shape of x, cu_seqlens checked against it (int64, or None when not packed) and
    the number of sequences: (B, T), None, B padded; (N,) or (1, N), cu_seqlens, S packed."""
    if cu_seqlens is None:
        if x.dim() != 2 or not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point (B, T) tensor, got {x.dtype} {tuple(x.shape)}")
        return tuple(x.shape), None, x.shape[0]
    if not _is_packed_row(x) or not x.is_floating_point():
        raise ValueError(f"with cu_seqlens, {name} must be a floating-point (N,) or (1, N) tensor (packed "
                         f"sequences), got {x.dtype} {tuple(x.shape)}")
    cu = check_cu_seqlens(cu_seqlens, x.shape[-1], x, name)
    return tuple(x.shape), cu, cu.numel() - 1


def gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor | None = None,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    bootstrap: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation with masked positions skipped (SPEC.md section 5).

        delta_t = r_t + gamma * V_next - V_t,   A_t = delta_t + gamma * lam * A_next,   returns = A + V

    V_next and A_next come from the next position whose mask is 1: masked positions
    (multi-turn observation tokens, padding) carry the running values through, as in verl.
    Past the last valid token V_next is `bootstrap` (or 0) and A_next is 0.

    Args:
        rewards: (B, T) float token-level rewards (e.g. from `kl_shaped_rewards`); packed: (N,) or (1, N).
        values: float critic values, rewards' shape.
        mask: bool or 0/1 of rewards' shape, 1 = a response token; None = all.
        gamma, lam: discount and GAE lambda, in [0, 1].
        bootstrap: (B,) float value of the state after each row's last valid token, or None (0);
            packed: (S,), one per sequence.
        cu_seqlens: int32/int64 (S+1,) boundaries of packed sequences, or None (padded rows). The
            scan restarts at every boundary exactly as at the end of a padded row: the packed
            result equals the padded (S, max_len) result on the same sequences. Every backend
            takes the whole packed batch at once (one kernel launch; no loop over sequences).
        backend: "auto" (the reverse-scan Triton kernel on CUDA, the PyTorch backend on CPU: its
            loop over time, or a segmented scan when packed), "triton", "cuda" or "torch".

    Returns:
        (advantages, returns): float32 of rewards' shape, 0 where mask is 0. Not whitened: see
        `masked_whiten`.
    """
    rewards = check_tensor("rewards", rewards)
    shape, cu, n_seqs = _token_layout("rewards", rewards, cu_seqlens)
    values = check_float_tensor("values", values, rewards, [shape], f"rewards' shape {shape}", "rewards")
    mask = torch.ones(shape, dtype=torch.bool, device=rewards.device) if mask is None \
        else check_mask(mask, shape, rewards, like_name="rewards")
    if bootstrap is not None:
        described = f"(B,) = ({n_seqs},)" if cu is None else f"(S,) = ({n_seqs},), one value per packed sequence"
        bootstrap = check_float_tensor("bootstrap", bootstrap, rewards, [(n_seqs,)], described, "rewards")
        bootstrap = bootstrap.detach()
    gamma, lam = _unit_interval("gamma", gamma), _unit_interval("lam", lam)
    return gae_dispatch(rewards.detach(), values.detach(), mask, bootstrap, cu, (gamma, lam), backend)


def group_advantages(
    rewards: Tensor,
    group_size: int | None = None,
    group_ids: Tensor | None = None,
    *,
    scale_by_std: bool = True,
    eps: float = 1e-6,
    cu_seqlens: Tensor | None = None,
    num_tokens: int | None = None,
    singleton: str = "zero",
) -> Tensor:
    """GRPO's group-relative advantage of each response: (R_i - mean_g) / (std_g + eps).

    Args:
        rewards: (B,) or (B, 1) float sequence rewards. Packed (cu_seqlens given): (S,) or (S, 1)
            per-sequence scores, or (N,) or (1, N) token-level rewards, summed over each sequence's
            tokens (as verl's compute_grpo_outcome_advantage sums token_level_rewards). The rule,
            as for policy_loss's advantages: (N,) and (1, N) are read per token, (S,) and (S, 1)
            per sequence, and a 1-D tensor that fits both (S == N: only with empty sequences, or
            when every length is 1 and both readings agree) per token; pass (S, 1) to have it
            read per sequence.
        group_size: G, when the batch holds groups of G consecutive responses to one prompt.
        group_ids: (B,) integer group of each response (any order), instead of group_size.
            Packed, both count sequences: (S,) ids, groups of G consecutive sequences.
        scale_by_std: False gives R_i - mean_g (Dr. GRPO).
        eps: added to the unbiased group std.
        cu_seqlens: int32/int64 (S+1,) boundaries of packed sequences, or None.
        num_tokens: N, the packed batch's token count (cu_seqlens[-1]), or None. Only per-sequence
            packed rewards need it (it is the output's size): without it, N is read back from
            cu_seqlens[-1], a device-to-host sync on a GPU. Token-level rewards give N themselves.
        singleton: a group of one response: "zero" (SPEC.md: advantage 0) or "score" (verl's
            compute_grpo_outcome_advantage: mean 0 and std 1, so R / (1 + eps), or R without
            scale_by_std).

    Returns:
        float32 (B,). A group of one response gets 0 (singleton="zero"). Packed: float32 (N,), each token the
        advantage of its sequence (verl's scores broadcast over (B, T); multiply by the response
        mask for zeros on the prompt tokens).

    Nothing is read back from the device (no host sync), with group_size or group_ids (whose
    groups are found by a sort), except N for per-sequence packed rewards without num_tokens.
    """
    rewards = check_tensor("rewards", rewards)
    layout = None
    if cu_seqlens is not None:
        rewards, layout = _packed_rewards(rewards, cu_seqlens, num_tokens)
    elif not rewards.is_floating_point() or rewards.dim() not in (1, 2) or rewards.shape[1:] not in ((), (1,)):
        raise ValueError(f"rewards must be a floating-point (B,) or (B, 1) tensor, got {rewards.dtype} "
                         f"{tuple(rewards.shape)}")
    r = rewards.detach().reshape(-1).to(torch.float32)
    what = "(B,)" if layout is None else "(S,)"
    ids, n_groups = group_index(r.shape[0], group_size, group_ids, r, what,
                                "rewards" if layout is None else "sequences")
    eps = check_float("eps", eps, ge=0.0)
    check_choice("singleton", singleton, SINGLETONS)
    centered = group_scores(r, ids, n_groups, eps=eps, scale_by_std=scale_by_std, singleton=singleton)
    return centered if layout is None else layout.per_token(centered)


SINGLETONS = ("zero", "score")


def group_index(n: int, group_size: int | None, group_ids: Tensor | None, like: Tensor, what: str = "(B,)",
                items: str = "rewards", like_name: str = "rewards") -> tuple[Tensor, int]:
    """The group of each of n items as dense int64 ids (n,) and the number of id slots (at most n).

    group_size: groups of G consecutive items; group_ids: (n,) integer labels of any values and
    order, mapped once to dense ranks by a sort (no read-back of the number of groups: a slot may
    stay empty). Exactly one of the two. Nothing is read back from the device."""
    if (group_size is None) == (group_ids is None):
        raise ValueError("give exactly one of group_size (consecutive groups) and group_ids")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
        if n % group_size:
            raise ValueError(f"group_size {group_size} does not divide the batch of {n} {items}")
        return torch.arange(n, device=like.device) // group_size, n // group_size
    ids = check_tensor("group_ids", group_ids)
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex() or ids.shape != (n,):
        raise ValueError(f"group_ids must be an integer {what} = ({n},) tensor, got {ids.dtype} {tuple(ids.shape)}")
    if ids.device != like.device:
        raise ValueError(f"group_ids is on {ids.device} but {like_name} is on {like.device}")
    return _dense_ids(ids), n  # at most n groups: slots of absent groups stay empty


def group_sum(x: Tensor, ids: Tensor, n_groups: int) -> Tensor:
    """Per-group sums (n_groups, *x.shape[1:]) of x (n, ...) by dense ids (n,): one index_add."""
    return x.new_zeros((n_groups, *x.shape[1:])).index_add_(0, ids, x)


def group_scores(r: Tensor, ids: Tensor, n_groups: int, *, eps: float, scale_by_std: bool,
                 singleton: str) -> Tensor:
    """(r - mean_g) / (std_g + eps) (std unbiased) of r (n,) or (n, K), each column on its own; a group of
    one: 0 (singleton "zero") or, as verl, mean 0 and std 1 ("score"). r's dtype."""
    count = group_sum(torch.ones_like(r), ids, n_groups)
    mean = group_sum(r, ids, n_groups) / count.clamp(min=1)
    alone = count[ids] <= 1
    if singleton == "score":
        mean = torch.where(count > 1, mean, 0.0)
    centered = r - mean[ids]
    if scale_by_std:
        sq = group_sum(torch.where(alone, 0.0, centered * centered), ids, n_groups)
        std = torch.where(count > 1, sq / (count - 1).clamp(min=1), 1.0 if singleton == "score" else 0.0).sqrt()
        centered = centered / (std[ids] + eps)
    return torch.where(alone, 0.0, centered) if singleton == "zero" else centered


def _dense_ids(ids: Tensor) -> Tensor:
    """Each id's rank among the distinct ids (torch.unique's inverse), by a sort: no read-back of
    the number of groups, which torch.unique's variable-sized output would need."""
    if not ids.numel():
        return ids.long()
    sorted_ids, order = torch.sort(ids)
    rank = torch.cat([sorted_ids.new_zeros(1, dtype=torch.long), (sorted_ids[1:] != sorted_ids[:-1]).long().cumsum(0)])
    return torch.empty_like(rank).scatter_(0, order, rank)


def _packed_rewards(rewards: Tensor, cu_seqlens: object, num_tokens: int | None) -> tuple[Tensor, Layout]:
    """group_advantages' packed rewards as (S,) sequence rewards, with the layout of the N tokens.

    N, the output's size: num_tokens when given; else the token-level rewards' length, or, for
    rewards that may be per sequence, cu_seqlens[-1] read back (free on CPU; one sync on a GPU).
    With the value checks on (CPU, RLOPS_CHECK=1) N is always cu_seqlens[-1], which they read."""
    if not rewards.is_floating_point() or rewards.dim() not in (1, 2):
        raise ValueError(f"rewards must be a floating-point tensor, got {rewards.dtype} {tuple(rewards.shape)}")
    cu = check_tensor("cu_seqlens", cu_seqlens)
    if not (cu.dim() == 1 and cu.numel() and cu.dtype in INDEX_DTYPES):
        check_cu_seqlens(cu, 0, rewards, "rewards")  # raises its named TypeError or ValueError
    n_seqs, shape = cu.numel() - 1, tuple(rewards.shape)
    if num_tokens is not None:
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
            raise ValueError(f"num_tokens must be None or an int >= 0, got {num_tokens!r}")
        n_tokens = num_tokens
    elif _is_packed_row(rewards) and shape not in ((n_seqs,), (n_seqs, 1)) and not value_checks_enabled(cu):
        n_tokens = shape[-1]  # token-level rewards (N,) or (1, N) tell N: nothing is read back
    else:
        # Per-sequence rewards (or a bad shape, for its error); with the value checks on, they read it anyway.
        n_tokens = int(cu[-1])
    # The rule of docs/packed.md: a 1-D tensor that fits both readings (S = N) is per token.
    per_seq = shape == (n_seqs, 1) or (shape == (n_seqs,) and n_seqs != n_tokens)
    if not per_seq and shape not in ((n_tokens,), (1, n_tokens)):
        raise ValueError(f"with cu_seqlens, rewards must have shape (S,) = ({n_seqs},) or (S, 1) (one per sequence), "
                         f"or (N,) = ({n_tokens},) or (1, N) (token-level), got {shape}")
    cu = check_cu_seqlens(cu, n_tokens, rewards, "rewards")
    layout = Layout.of(torch.ones(n_tokens, dtype=torch.bool, device=rewards.device), cu)
    return (rewards if per_seq else layout.seq_totals(rewards.detach().reshape(-1).to(torch.float32))), layout


def masked_whiten(x: Tensor, mask: Tensor | None = None, *, shift_mean: bool = True,
                  cu_seqlens: Tensor | None = None, group: object = None) -> Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the masked entries, variance unbiased (SPEC.md section 5).

    x: (...) float; mask: x's shape, bool or 0/1 (None = all). shift_mean=False adds the
    mean back (TRL's option for rewards). Returns float32 of x's shape, 0 where mask is 0;
    with fewer than two masked entries the variance is taken as 0.

    The statistics are over all masked entries of the batch, not per sequence, so a packed batch
    (cu_seqlens int32/int64 (S+1,) given) needs nothing more: x and mask are (N,) or (1, N),
    cu_seqlens is checked against N, and the result equals the padded one on the same entries.

    group: a torch.distributed process group over whose ranks the batch is split (data or
    context parallel): the mean and variance are those of every rank's masked entries, from one
    all_reduce of four float64 per call.
    """
    x = check_tensor("x", x)
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if cu_seqlens is not None:
        if not _is_packed_row(x):
            raise ValueError(f"with cu_seqlens, x must have shape (N,) or (1, N) (packed sequences), "
                             f"got {tuple(x.shape)}")
        check_cu_seqlens(cu_seqlens, x.shape[-1], x, "x")
    m = torch.ones(x.shape, dtype=torch.bool, device=x.device) if mask is None \
        else check_mask(mask, tuple(x.shape), x, like_name="x")
    v = torch.where(m, x.detach().to(torch.float32), 0.0)
    n = m.sum()
    mean = v.sum() / n.clamp(min=1)
    centered = torch.where(m, v - mean, 0.0)
    if group is not None:
        mean, n, var = _global_moments(centered, n, mean, group)
        centered = torch.where(m, v - mean, 0.0)
    else:
        var = (centered * centered).sum() / (n - 1).clamp(min=1)
    whitened = centered * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(m, whitened, 0.0)


def _global_moments(centered: Tensor, n: Tensor, mean: Tensor, group: object) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, count, unbiased variance), float32, of the masked entries of every rank of group, from
    each rank's count n, mean and entries centred on it (Chan et al.'s parallel merge, in float64)."""
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    local = torch.stack([n.double(), n * mean.double(), (centered.double() ** 2).sum()])
    # sum n_r m_r^2 as well, so that sum (x - M)^2 = sum_r [S_r + n_r (m_r - M)^2] needs one all_reduce.
    totals = torch.cat([local, (n * mean.double() ** 2)[None]])
    dist.all_reduce(totals, group=group)
    count, total, squares, weighted_sq = totals.unbind()
    global_mean = total / count.clamp(min=1)
    var = (squares + weighted_sq - count * global_mean**2) / (count - 1).clamp(min=1)
    return global_mean.float(), count, var.clamp(min=0).float()


def kl_shaped_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float,
    estimator: str = "k1",
    cu_seqlens: Tensor | None = None,
) -> Tensor:
    """The PPO-RLHF token reward: -kl_coef * KL per token, plus the sequence score on its last valid token.

    Args:
        scores: (B,) or (B, 1) float reward-model scores; packed: (S,) or (S, 1).
        logprobs, ref_logprobs: (B, T) float log-probs of the sampled tokens under the policy
            and the reference model; packed: (N,) or (1, N).
        mask: bool or 0/1 response mask of logprobs' shape.
        kl_coef: >= 0.
        estimator: "k1" (TRL's and OpenRLHF's default), "k2" or "k3" (SPEC.md section 3).
        cu_seqlens: int32/int64 (S+1,) boundaries of packed sequences, or None. Each score goes on
            the last valid (mask 1) token of its sequence, as on the last valid token of a row.

    Returns:
        float32 rewards of logprobs' shape, 0 where mask is 0. A row (sequence) with no valid
        token gets no score.
    """
    logprobs = check_tensor("logprobs", logprobs)
    shape, cu, n_seqs = _token_layout("logprobs", logprobs, cu_seqlens)
    seqs = f"(B,) or (B, 1) with B = {n_seqs}" if cu is None else \
        f"(S,) or (S, 1), one per packed sequence (S = {n_seqs})"
    ref_logprobs = check_float_tensor("ref_logprobs", ref_logprobs, logprobs, [shape], f"logprobs' shape {shape}",
                                      "logprobs")
    scores = check_float_tensor("scores", scores, logprobs, [(n_seqs,), (n_seqs, 1)], seqs, "logprobs")
    m = check_mask(mask, shape, logprobs, like_name="logprobs")
    kl_coef = check_float("kl_coef", kl_coef, ge=0.0)
    check_choice("estimator", estimator, ("k1", "k2", "k3"))
    lp = torch.where(m, logprobs.detach().to(torch.float32), 0.0)
    ref = torch.where(m, ref_logprobs.detach().to(torch.float32), 0.0)
    rewards = torch.where(m, -kl_coef * torch_backend.kl_penalty(lp, ref, estimator), 0.0)
    score = scores.detach().reshape(-1).to(torch.float32)
    if cu is not None:
        if n_seqs == 0:  # no sequence (any tokens, only with an unchecked cu_seqlens, get no score)
            return rewards
        # Each sequence's last valid position (-1: none), found with no loop and no read-back.
        layout = Layout.of(m, cu)
        positions = torch.arange(m.numel(), device=m.device)
        last = torch.full((n_seqs,), -1, device=m.device).scatter_reduce(
            0, layout.seq_ids, torch.where(m.reshape(-1), positions, -1), "amax")
        is_last = m & (positions.view(shape) == layout.per_token(last))
        return torch.where(is_last, rewards + layout.per_token(score), rewards)
    if not m.numel():
        return rewards
    positions = torch.arange(shape[1], device=m.device).expand(shape)
    last = torch.where(m, positions, -1).amax(-1, keepdim=True)  # -1: no valid token
    # A where, not indexing by the rows that have a token: that would read their count back.
    return torch.where(m & (positions == last), rewards + score[:, None], rewards)
