"""Vocabulary-parallel token statistics: the lm_head split over the vocabulary across the ranks
of a process group (Megatron's tensor-parallel layout), one pass over each rank's shard.

Each rank holds logits (..., V_r) for its contiguous shard of the vocabulary, global ids
[start, start + V_r); tokens are global ids, the same on every rank. The online-softmax state of
a row is mergeable, so each rank streams its shard once into 8 floats per token (the state m,
s, t, m_ref, s_ref, c of kernels/_common.py, row_states; the sampled token's logit where this
rank holds it; whether it does), one all_gather exchanges them (8 * 4 * world bytes per token,
whatever V), and every rank merges them into the statistics of the whole vocabulary (logp,
entropy, the exact KL, and the max / log-sum / lse-gap the backward needs). The backward needs
no communication: each rank writes the gradient of its own shard from the merged statistics,
with the one-hot term of the sampled token only on the rank that holds it. The policy loss's
masked tokens are left out: their statistics are zeros and the Triton backend reads none of
their rows.

Backends: Triton streams the shard with the kernels' row-state kernel and writes the gradient
with their backward kernel; the PyTorch backend computes the same states and gradient in
float32 (float64 for float64 logits), chunked over rows. The CUDA twins have no row-state
kernel: backend="cuda" is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ._validation import check_same_device, check_tensor, value_checks_enabled
from .constants import N_STATS, ROW, STAT_GRADS
from .torch_backend import compute_dtype

# Rows gathered per token: the shard's online-softmax state, then the sampled logit and ownership.
STATE_ROWS = ("m", "s", "t", "m_ref", "s_ref", "c", "x_tok", "owned")
N_GATHERED = len(STATE_ROWS)
FLOAT32_LOWEST = torch.finfo(torch.float32).min
ROWS_PER_CHUNK = 1024  # the PyTorch backend's rows per step (bounds its float32 temporaries)


@dataclass(frozen=True)
class VocabShard:
    """This rank's part of a vocabulary split over `group`: global ids [start, start + size)."""

    group: dist.ProcessGroup
    world: int
    start: int
    size: int
    vocab: int | None  # the whole vocabulary when the shards are equal, else None (not needed)

    @classmethod
    def of(cls, group: object, local_vocab: int, vocab_start: object) -> VocabShard:
        """The shard of this rank: shards of equal size in rank order unless vocab_start is given."""
        if group is None:
            raise ValueError("vocab_start (this rank's first global id) needs vocab_group, the process group "
                             "over which the vocabulary is split")
        if not isinstance(group, dist.ProcessGroup):
            raise TypeError(f"vocab_group must be a torch.distributed ProcessGroup, got {type(group).__name__}")
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if vocab_start is None:
            return cls(group, world, rank * local_vocab, local_vocab, world * local_vocab)
        if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
            raise ValueError(f"vocab_start must be an int >= 0 (this rank's first global id), got {vocab_start!r}")
        return cls(group, world, vocab_start, local_vocab, None)


def vocab_shard(group: object, local_vocab: int, vocab_start: object, backend: str) -> VocabShard:
    """This rank's shard (VocabShard.of) for a call on `backend`, which must not be "cuda"."""
    if backend == "cuda":
        raise ValueError("vocab_group needs backend 'auto', 'triton' or 'torch': the CUDA twins have no "
                         "row-state kernel")
    return VocabShard.of(group, local_vocab, vocab_start)


def check_vocab_parallel(logits: Tensor, tokens: object, group: object, vocab_start: object, backend: str,
                         ref_logits: Tensor | None = None, tokens_name: str = "tokens") -> VocabShard:
    """Checks the inputs of a vocabulary-parallel call and returns this rank's shard."""
    logits = check_tensor("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] < 1 or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point (..., V_shard) tensor, got {logits.dtype} "
                         f"{tuple(logits.shape)}")
    shard = vocab_shard(group, logits.shape[-1], vocab_start, backend)
    tokens = check_tensor(tokens_name, tokens)
    if tokens.dtype == torch.bool or tokens.is_floating_point() or tuple(tokens.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"{tokens_name} must be integer global ids of shape {tuple(logits.shape[:-1])}, got "
                         f"{tokens.dtype} {tuple(tokens.shape)}")
    check_same_device(tokens_name, tokens, logits, "logits")
    if shard.vocab is not None and value_checks_enabled(tokens) and tokens.numel():
        low, high = (int(v) for v in torch.aminmax(tokens))
        if low < 0 or high >= shard.vocab:
            raise ValueError(f"{tokens_name} must be global ids in [0, {shard.vocab}) ({shard.world} shards of "
                             f"{shard.size}), got ids in [{low}, {high}]")
    if ref_logits is not None and (ref_logits.shape != logits.shape or ref_logits.device != logits.device):
        raise ValueError(f"ref_logits must be this rank's shard of the reference logits, shaped like logits "
                         f"{tuple(logits.shape)}, got {tuple(ref_logits.shape)} on {ref_logits.device}")
    return shard


def _torch_states(logits: Tensor, ref_logits: Tensor | None, temperature: float) -> Tensor:
    """(6, N) states of kernels/_common.py row_states, computed with PyTorch in float32 (float64
    for float64 logits): m the row's max (lowest float for a row of -inf), s = sum e, t = sum
    e (x - m), e = exp((x - m) / tau); with ref_logits m_ref, s_ref likewise, c = sum e (x - y)."""
    x_all = logits.reshape(-1, logits.shape[-1])
    y_all = None if ref_logits is None else ref_logits.reshape(-1, logits.shape[-1])
    dtype = compute_dtype(logits)
    out = torch.zeros((6, x_all.shape[0]), dtype=dtype, device=logits.device)
    out[[0, 3]] = torch.finfo(dtype).min
    lowest = torch.finfo(dtype).min
    for start in range(0, x_all.shape[0], ROWS_PER_CHUNK):
        rows = slice(start, start + ROWS_PER_CHUNK)
        x = x_all[rows].to(dtype)
        m = x.amax(-1).clamp(min=lowest)  # NaN stays NaN
        xm = x - m[:, None]
        e = torch.exp(xm / temperature)
        out[0, rows], out[1, rows] = m, e.sum(-1)
        out[2, rows] = (e * xm.clamp(min=lowest)).sum(-1)  # an -inf logit: 0 * lowest, not 0 * -inf
        if y_all is not None:
            y = y_all[rows].to(dtype)
            m_ref = y.amax(-1).clamp(min=lowest)
            out[3, rows], out[4, rows] = m_ref, torch.exp((y - m_ref[:, None]) / temperature).sum(-1)
            out[5, rows] = (e * (x - y).clamp(min=lowest)).sum(-1)
    return out


def _shard_states(logits: Tensor, ref_logits: Tensor | None, local_ids: Tensor, live: Tensor | None,
                  temperature: float, backend: str) -> Tensor:
    """(N_GATHERED, N) float32: this shard's row states, the sampled logit where the shard holds
    the token (else -inf) and 1.0 where it does. Triton reads no row where live is False."""
    if backend == "triton":
        from .kernels import row_states_fwd

        states = row_states_fwd(logits, ref_logits, temperature, live)
    else:
        states = _torch_states(logits, ref_logits, temperature)
    owned = (local_ids >= 0) & (local_ids < logits.shape[-1])
    x_tok = logits.gather(-1, torch.where(owned, local_ids, 0)[..., None])[..., 0]
    x_tok = torch.where(owned, x_tok.to(states.dtype), float("-inf"))
    return torch.cat([states, x_tok.reshape(1, -1), owned.reshape(1, -1).to(states.dtype)]).float()


def _merged_stats(gathered: Tensor, temperature: float, has_ref: bool) -> Tensor:
    """(N_STATS, N) float32 statistics of the whole vocabulary from the (world, N_GATHERED, N)
    states of its shards: kernels/_common.py, _merge_groups and finish_row_stats, in PyTorch."""
    m_i, s_i, t_i, m_ref_i, s_ref_i, c_i, x_tok_i, owned_i = gathered.unbind(1)
    inv_tau = 1.0 / temperature
    m = m_i.amax(0)
    # An empty shard's state (s = 0) is held nowhere: no shift, and 0 * anything stays 0. A NaN
    # state (s NaN) shifts by NaN, so the merged state is NaN.
    shift = torch.where(s_i == 0, 0.0, m_i - m)
    alpha = torch.exp(shift * inv_tau)
    s = (alpha * s_i).sum(0)
    t = (alpha * (t_i + shift * s_i)).sum(0)
    log_s = torch.log(s)
    stats = torch.zeros((N_STATS, m.shape[0]), dtype=torch.float32, device=gathered.device)
    stats[ROW["entropy"]] = log_s - inv_tau * t / s
    stats[ROW["max"]], stats[ROW["log_sum"]] = m, log_s
    # One rank holds the sampled token; an id no shard holds gives NaN, as the single-device op does.
    x_tok = x_tok_i.amax(0)
    stats[ROW["logp"]] = torch.where(owned_i.sum(0) == 1, (x_tok - m) * inv_tau - log_s, float("nan"))
    if has_ref:
        m_ref = m_ref_i.amax(0)
        shift_ref = torch.where(s_ref_i == 0, 0.0, m_ref_i - m_ref)
        s_ref = (torch.exp(shift_ref * inv_tau) * s_ref_i).sum(0)
        c = (alpha * c_i).sum(0)
        lse_gap = (m - m_ref) * inv_tau + (log_s - torch.log(s_ref))
        stats[ROW["lse_gap"]] = lse_gap
        stats[ROW["kl"]] = inv_tau * c / s - lse_gap
    return stats


def _torch_grad(logits: Tensor, local_ids: Tensor, stats: Tensor, grads: Tensor, temperature: float,
                ref_logits: Tensor | None) -> Tensor:
    """d logits of this shard (the kernels' backward, SPEC section 1, in PyTorch):
    dx = (g_logp (1[v = a] - p) - g_H p (log p + H) + g_KL p (log p - log q - KL)) / tau."""
    dtype = compute_dtype(logits)
    vocab = logits.shape[-1]
    x_all = logits.reshape(-1, vocab)
    y_all = None if ref_logits is None else ref_logits.reshape(-1, vocab)
    st, g = stats.reshape(N_STATS, -1).to(dtype), grads.reshape(3, -1).to(dtype)
    ids = local_ids.reshape(-1)
    out = torch.empty_like(x_all)
    inv_tau = 1.0 / temperature
    for start in range(0, x_all.shape[0], ROWS_PER_CHUNK):
        rows = slice(start, start + ROWS_PER_CHUNK)
        x = x_all[rows].to(dtype)
        log_p = (x - st[ROW["max"], rows, None]) * inv_tau - st[ROW["log_sum"], rows, None]
        p = torch.exp(log_p)
        log_p = torch.where(p > 0, log_p, 0.0)  # an -inf logit: p log p = 0, not 0 * -inf
        coef = g[0, rows, None] + g[1, rows, None] * (log_p + st[ROW["entropy"], rows, None])
        if y_all is not None:
            log_ratio = torch.where(p > 0, (x - y_all[rows].to(dtype)) * inv_tau, 0.0)
            coef = coef - g[2, rows, None] * (log_ratio - st[ROW["lse_gap"], rows, None] - st[ROW["kl"], rows, None])
        dz = -p * coef
        owned = (ids[rows] >= 0) & (ids[rows] < vocab)
        one_hot = torch.zeros_like(dz).scatter_(-1, torch.where(owned, ids[rows], 0)[:, None],
                                                torch.where(owned, g[0, rows], 0.0)[:, None])
        # As the kernel: a row without upstream gradient is zeros, whatever its logits and statistics
        # (a left-out row's are zeros, under which exp of a large logit overflows: 0 * inf).
        unused = (g[:, rows] == 0).all(0)[:, None]
        out[rows] = torch.where(unused, 0.0, (dz + one_hot) * inv_tau).to(logits.dtype)
    return out.reshape(logits.shape)


def shard_grad(logits: Tensor, local_ids: Tensor, stats: Tensor, grads: Tensor, temperature: float,
               ref_logits: Tensor | None, backend: str, out: Tensor | None = None) -> Tensor:
    """d logits of this shard (logits' shape and dtype) from the merged statistics (N_STATS, N) and
    the float32 upstream gradients (3, N) of logp, entropy and kl: the kernels' backward (backend
    "triton") or _torch_grad ("torch"). `out` receives it when given, and may be logits itself."""
    if backend == "triton":
        from .kernels import logits_grad

        return logits_grad(logits, local_ids, stats, grads, temperature, ref_logits, out=out)
    dx = _torch_grad(logits, local_ids, stats, grads, temperature, ref_logits)
    return dx if out is None else out.copy_(dx)


def _all_gather(output: Tensor, tensor: Tensor, group: dist.ProcessGroup) -> None:
    """Every rank's tensor, concatenated along dim 0 into output (all_gather_single where this
    torch has it, which deprecates all_gather_into_tensor)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, tensor, group=group)


def gathered_stats(states: Tensor, shard: VocabShard, temperature: float, has_ref: bool,
                   live: Tensor | None = None) -> Tensor:
    """(N_STATS, N) float32 statistics of the whole vocabulary from this shard's (N_GATHERED, N)
    float32 states (_shard_states): one all_gather over the group, then the merge. Rows where
    live (bool, N elements) is False are zeros, as the single-device kernels write a masked row."""
    gathered = torch.empty((shard.world * N_GATHERED, states.shape[1]), dtype=states.dtype, device=states.device)
    _all_gather(gathered, states.contiguous(), group=shard.group)
    stats = _merged_stats(gathered.view(shard.world, N_GATHERED, -1), temperature, has_ref)
    return stats if live is None else torch.where(live.reshape(-1), stats, 0.0)


class _VocabParallelStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, ref_logits: Tensor | None, tokens: Tensor, live: Tensor | None,
                shard: VocabShard, temperature: float, backend: str) -> Tensor:
        local_ids = tokens - shard.start
        states = _shard_states(logits, ref_logits, local_ids, live, temperature, backend)
        stats = gathered_stats(states, shard, temperature, ref_logits is not None, live)
        ctx.save_for_backward(logits, local_ids, stats, ref_logits, live)
        ctx.temperature, ctx.backend = temperature, backend
        return stats.reshape(N_STATS, *tokens.shape)

    @staticmethod
    def backward(ctx, grad_stats: Tensor) -> tuple:
        logits, local_ids, stats, ref_logits, live = ctx.saved_tensors
        grads = grad_stats[STAT_GRADS].reshape(3, -1).float()
        if live is not None:  # constant rows: no gradient, and the backward kernel does not read them
            grads = torch.where(live.reshape(-1), grads, 0.0)
        dx = shard_grad(logits, local_ids, stats, grads.contiguous(), ctx.temperature, ref_logits, ctx.backend)
        return dx, None, None, None, None, None, None


def token_stats(logits: Tensor, tokens: Tensor, shard: VocabShard, temperature: float, backend: str,
                ref_logits: Tensor | None = None, live: Tensor | None = None) -> Tensor:
    """Differentiable float32 (N_STATS, ...) statistics of the whole vocabulary (constants.STATS_ROWS:
    logp, entropy, kl, max, log_sum, lse_gap) from this rank's shard of the logits (..., V_r) and
    of the reference logits (for the exact KL), tokens (...) global ids; the gradient reaches
    this shard's logits. live: bool (...) or None; where it is False the statistics are zeros
    and their gradient is not taken, and the Triton backend reads neither the row nor its
    gradient. Inputs checked by check_vocab_parallel; backend "triton" or "torch"."""
    return _VocabParallelStats.apply(logits, None if ref_logits is None else ref_logits.detach(), tokens, live,
                                     shard, temperature, backend)


def resolve(backend: str, logits: Tensor) -> str:
    """The concrete backend of a vocabulary-parallel call: "auto" is Triton on CUDA tensors and
    the PyTorch backend on CPU ones."""
    if backend == "auto":
        return "triton" if logits.is_cuda else "torch"
    return backend


def token_logprobs_and_entropy(logits: Tensor, tokens: Tensor, temperature: float, backend: str, group: object,
                               vocab_start: object, tokens_name: str = "tokens") -> tuple[Tensor, Tensor]:
    """(logp, entropy) float32 of tokens' shape over the whole vocabulary from this rank's shard
    (rlops.token_logprobs_and_entropy with vocab_group); differentiable."""
    shard = check_vocab_parallel(logits, tokens, group, vocab_start, backend, tokens_name=tokens_name)
    stats = token_stats(logits, tokens, shard, temperature, resolve(backend, logits))
    return stats[ROW["logp"]], stats[ROW["entropy"]]


def policy_stats(logits: Tensor, ref_logits: Tensor | None, tokens: Tensor, layout: object,
                 config: object) -> object:
    """The token statistics of rlops.policy_loss with vocab_group, from this rank's shard: logits
    (B, T, V_r) and, for the exact KL, the reference logits' shard; tokens (B, T) global ids,
    checked, with layout and config as rlops.ops.policy_loss builds them. Every rank gets the
    whole vocabulary's statistics; the O(B*T) epilogue is then the PyTorch backend's, so every
    objective and option of the single-device op applies, and every rank has the same loss."""
    from .torch_backend import TokenStats

    backend = resolve(config.backend, logits)
    # A masked token is never counted: any id may pad it (Hugging Face's -100), read as this shard's first.
    start = VocabShard.of(config.vocab_group, logits.shape[-1], config.vocab_start).start
    tokens = torch.where(layout.mask, tokens, start)
    shard = check_vocab_parallel(logits, tokens, config.vocab_group, config.vocab_start, backend, ref_logits)
    stats = token_stats(logits, tokens, shard, config.temperature, backend, ref_logits, layout.mask)
    kl = stats[ROW["kl"]] if ref_logits is not None else None
    return TokenStats(stats[ROW["logp"]], stats[ROW["entropy"]], kl)
