"""The fused-linear policy loss: the lm_head projection and the loss over chunks of rows.

The (N, V) logits never exist. Each chunk of rows is projected (hidden_c @ weight.T + bias,
by cuBLAS), run through the fused vocabulary kernels, and its gradient is pushed back
through the projection at once, so one (chunk, V) buffer serves every chunk:

    token-level ratio (PPO, GRPO, DAPO, Dr. GRPO): one pass. Per chunk, the policy-loss kernel
        gives each token's loss and derivatives, the backward kernel overwrites the chunk's
        logits with their gradient, and two more matmuls give the chunk's hidden gradient and
        add to the weight gradient (float32 accumulator). Three matmuls in all; the backward
        only scales the stored gradients by the upstream gradient.
    sequence-level ratio (GSPO) and the token statistics alone: the forward keeps per-token
        statistics only and the backward recomputes each chunk's logits (four matmuls).

Masked tokens: on CPU tensors they are dropped before the projection (a nonzero(), free there).
On a GPU finding them would be a device-to-host sync, so every row is projected: a masked row is
zeroed (no padding value, even NaN, reaches a logit or a gradient), has weight 0 and id 0, and the
kernels skip it, but its share of the matmuls is spent. Packed batches (cu_seqlens) have no padding.

With vocab_group (the lm_head's rows split over ranks) the statistics are rlops.linear_vocab_parallel's.
"""

# No `from __future__ import annotations` here, to match the other ops modules.

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import torch_backend
from .._validation import (
    check_head,
    check_positive_float,
    check_ref_head,
    check_token_ids,
    check_token_range,
)
from ..constants import GRADS, N_POLICY_ROWS, N_STATS, ROW, STAT_GRADS
from ..options import Epilogue, GlobalBatch, Head, PolicyBatch, PolicyLossConfig, TokenInputs
from ..packing import Layout, check_cu_seqlens
from ..rollout_correction import RolloutCorrection
from ..torch_backend import LossTerms, TokenStats
from ..vocab_parallel import VocabShard
from ._backend import launchers, resolve_backend
from .chunking import add_matmul, default_chunk_rows, gpu_wave
from .policy_batch import (
    apply_rollout_correction,
    check_kl_inputs,
    check_packed_options,
    check_per_token_inputs,
    packed_as_row,
)
from .policy_loss import PolicyLossOutput


def _push_through_head(dlogits: Tensor, hidden: Tensor, weight: Tensor, grads: list[Tensor | None],
                       start: int, stop: int) -> None:
    """Chain rule through logits = hidden @ weight.T + bias for one chunk: fills grad_hidden's rows
    and adds to the float32 grad_weight and grad_bias."""
    grad_hidden, grad_weight, grad_bias = grads
    if grad_hidden is not None:
        torch.mm(dlogits, weight, out=grad_hidden[start:stop])
    if grad_weight is not None:
        add_matmul(grad_weight, dlogits.t(), hidden)
    if grad_bias is not None:
        grad_bias += dlogits.sum(0, dtype=grad_bias.dtype)


def _gradient_buffers(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> list[Tensor | None]:
    want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
    acc = torch_backend.compute_dtype(weight)
    return [
        torch.empty_like(hidden) if want_hidden else None,
        torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_weight else None,
        torch.zeros(bias.shape, dtype=acc, device=bias.device) if want_bias and bias is not None else None,
    ]


def _project(rows: Tensor, head: Head) -> Tensor:
    return F.linear(rows, head.weight, head.bias)


@dataclass
class _Chunks:
    """What the chunked autograd functions need besides the differentiable hidden, weight and bias:
    the rows' token ids (n,), the reference (hidden rows, head) for the exact KL, which rows
    count (mask, bool (n,), when every row is projected; None when only counted rows are), for
    the loss the per-token inputs (each (n,)) and the kernel epilogue, and with vocab_group this
    rank's shard of the vocabulary (the head's rows; tokens are then ids local to it)."""

    tokens: Tensor
    ref: tuple[Tensor, Head] | None
    temperature: float
    chunk: int
    backend: str
    inputs: TokenInputs | None = None
    epilogue: Epilogue | None = None
    mask: Tensor | None = None
    shard: VocabShard | None = None

    def rows(self, x: Tensor, start: int, stop: int) -> Tensor:
        """Rows [start, stop) of x (hidden or reference hidden states), those of masked tokens zeroed."""
        rows = x[start:stop]
        return rows if self.mask is None else torch.where(self.mask[start:stop, None], rows, 0)

    def ref_logits(self, start: int, stop: int) -> Tensor | None:
        return None if self.ref is None else _project(self.rows(self.ref[0], start, stop), self.ref[1])


class _LinearStats(torch.autograd.Function):
    """Per-token stats (N_STATS, n) of softmax((hidden @ weight.T + bias) / tau); the backward recomputes each chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, chunks: _Chunks):
        n, head = hidden.shape[0], Head(weight, bias)
        stats = torch.empty((N_STATS, n), dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunks.chunk):
            e = min(s + chunks.chunk, n)
            stats[:, s:e] = launchers(chunks.backend).token_stats_fwd(
                _project(chunks.rows(hidden, s, e), head), chunks.tokens[s:e], chunks.temperature,
                chunks.ref_logits(s, e), None if chunks.mask is None else chunks.mask[s:e])
        ctx.save_for_backward(hidden, weight, bias, stats)
        # rlops.linear_vocab_parallel reuses the backward with its shard's gradient launcher.
        ctx.chunks, ctx.logits_grad = chunks, launchers(chunks.backend).logits_grad
        ctx.mark_non_differentiable(stats[ROW["max"]:])
        return stats

    @staticmethod
    def backward(ctx, grad_stats):
        hidden, weight, bias, stats = ctx.saved_tensors
        chunks, head = ctx.chunks, Head(weight, bias)
        grads = _gradient_buffers(ctx, hidden, weight, bias)
        for s in range(0, hidden.shape[0], chunks.chunk):
            e = min(s + chunks.chunk, hidden.shape[0])
            rows = chunks.rows(hidden, s, e)
            logits = _project(rows, head)
            ctx.logits_grad(logits, chunks.tokens[s:e], stats[:, s:e], grad_stats[STAT_GRADS, s:e],
                            chunks.temperature, chunks.ref_logits(s, e), out=logits)
            _push_through_head(logits, rows, weight, grads, s, e)
        grad_hidden, grad_weight, grad_bias = grads
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None)


def _linear_stats(hidden: Tensor, head: Head, chunks: _Chunks) -> Tensor:
    """Differentiable float32 (N_STATS, n) statistics of hidden's (n, H) rows: of the whole vocabulary
    from this rank's rows of the head when chunks.shard is set (rlops.linear_vocab_parallel)."""
    if chunks.shard is None:
        return _LinearStats.apply(hidden, *head, chunks)
    from ..linear_vocab_parallel import LinearShardStats  # lazily: it builds on this module

    return LinearShardStats.apply(hidden, *head, chunks)


class _LinearPolicyLoss(torch.autograd.Function):
    """The token-level loss in one pass: returns (loss, out (N_POLICY_ROWS, n)); the gradient is computed here."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, chunks: _Chunks):
        n, head = hidden.shape[0], Head(weight, bias)
        grads = _gradient_buffers(ctx, hidden, weight, bias)
        out = torch.empty((N_POLICY_ROWS, n), dtype=torch.float32, device=hidden.device)
        kernels = launchers(chunks.backend)
        for s in range(0, n, chunks.chunk):
            e = min(s + chunks.chunk, n)
            rows = chunks.rows(hidden, s, e)
            logits, ref = _project(rows, head), chunks.ref_logits(s, e)
            chunk_out = kernels.policy_loss_fwd(
                logits[None], chunks.tokens[None, s:e], None if ref is None else ref[None],
                chunks.inputs.map(lambda x, s=s, e=e: x[None, s:e]), chunks.epilogue)[:, 0]
            out[:, s:e] = chunk_out
            if any(g is not None for g in grads):
                kernels.logits_grad(logits, chunks.tokens[s:e], chunk_out, chunk_out[GRADS], chunks.temperature, ref,
                                    out=logits)
                _push_through_head(logits, rows, weight, grads, s, e)
        ctx.grads = grads
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(out)
        return out[ROW["loss"]].sum(), out

    @staticmethod
    def backward(ctx, grad_loss, _grad_out):
        grads, ctx.grads = ctx.grads, None
        scaled = []
        for g, dtype in zip(grads, ctx.dtypes, strict=True):
            # In place, then one cast: the float32 weight gradient is not copied again (V x H floats).
            scaled.append(None if g is None else g.mul_(grad_loss).to(dtype))
        return (*scaled, None)


def _chunk(chunk_size: int | None, n: int, hidden: Tensor, vocab: int, with_ref: bool) -> int:
    if chunk_size is None:
        return default_chunk_rows(n, hidden.shape[-1], vocab, hidden.element_size(), with_ref, gpu_wave(hidden))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
    return chunk_size


def linear_token_logprobs_and_entropy(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    *,
    bias: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    backend: str = "auto",
    vocab_group: object = None,
    vocab_start: int | None = None,
) -> tuple[Tensor, Tensor]:
    """`token_logprobs_and_entropy` of logits = hidden @ weight.T + bias, without materialising them.

    Args:
        hidden: (..., H) float16/bfloat16/float32/float64 last hidden states.
        weight: (V, H) lm_head weight, hidden's dtype. bias: (V,) or None.
        tokens: (...) integer ids in [0, V).
        cu_seqlens: int32/int64 (S + 1,) boundaries of packed sequences, or None. The statistics
            are per token, so packing changes nothing but the accepted shapes: hidden (N, H) or
            (1, N, H), tokens (N,) or (1, N); cu_seqlens is checked against N.
        temperature: > 0.
        chunk_size: rows per chunk (default: ~256 MiB of chunk buffers, at least 128 rows).
        backend: "auto" (Triton kernels on CUDA, the PyTorch backend on CPU), "triton",
            "cuda" or "torch".
        vocab_group, vocab_start: the lm_head split over the vocabulary across the ranks of a
            process group (rlops.linear_vocab_parallel; shards as rlops.token_logprobs_and_entropy
            takes them): hidden is replicated, weight (V_r, H) and bias (V_r,) are this rank's
            rows, tokens global ids. One all_gather of 8 floats per token; the backward
            all-reduces hidden's gradient (Megatron's copy_to_tensor_model_parallel_region), so
            every gradient equals the single-device op's. Backends auto/triton/torch.

    Returns:
        (logp, entropy), float32 of tokens' shape; gradients reach hidden, weight and bias.
    """
    vocab = check_head(hidden, weight, bias, ("hidden", "weight", "bias"))
    rows = hidden
    if cu_seqlens is not None:
        # Packed: (N, H) or (1, N, H) hidden with (N,) or (1, N) tokens, in either pairing.
        if hidden.dim() not in (2, 3) or (hidden.dim() == 3 and hidden.shape[0] != 1):
            raise ValueError(f"with cu_seqlens, hidden must have shape (N, H) or (1, N, H) (packed sequences), "
                             f"got {tuple(hidden.shape)}")
        rows = hidden.reshape(-1, hidden.shape[-1])
        if isinstance(tokens, Tensor) and tokens.dim() == 2 and tokens.shape[0] == 1:
            rows = rows[None]
    # Vocabulary-parallel ids are global: checked against the whole vocabulary below.
    check_token_ids(tokens, tuple(rows.shape[:-1]), vocab if vocab_group is None else None, hidden,
                    like_name="hidden")
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, tokens.numel(), hidden, "hidden")
    hidden = rows
    temperature = check_positive_float("temperature", temperature)
    n = tokens.numel()
    chunk = _chunk(chunk_size, n, hidden, vocab, False)
    shard = None
    if vocab_group is not None or vocab_start is not None:
        from ..linear_vocab_parallel import local_ids  # lazily: it builds on this module

        tokens, shard, backend = local_ids(tokens, vocab, vocab_group, vocab_start, backend)
    backend = resolve_backend(backend, hidden, "linear_policy_loss")
    if backend == "torch" and shard is None:
        stats = torch_backend.linear_token_stats(hidden, Head(weight, bias), tokens, temperature, chunk_size=chunk)
        return stats.logp.float(), stats.entropy.float()
    stats = _linear_stats(hidden.reshape(n, -1), Head(weight, bias),
                          _Chunks(tokens.reshape(-1), None, temperature, chunk, backend, shard=shard))
    return stats[ROW["logp"]].view(tokens.shape), stats[ROW["entropy"]].view(tokens.shape)


def linear_policy_loss(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    advantages: Tensor,
    *,
    bias: Tensor | None = None,
    ref_hidden: Tensor | None = None,
    ref_weight: Tensor | None = None,
    ref_bias: Tensor | None = None,
    chunk_size: int | None = None,
    mask: Tensor | None = None,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    is_weights: Tensor | None = None,
    rollout_logprobs: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    temperature: float = 1.0,
    objective: str = "clip",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    ratio_cap: float | None = None,
    sapo_tau_pos: float = 1.0,
    sapo_tau_neg: float = 1.05,
    dro_beta: float | None = None,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    cov_ratio: float = 2e-4,
    cov_low: float = 1.0,
    cov_high: float = 5.0,
    cov_kl_coef: float = 1.0,
    off_policy_mask: float | None = None,
    top_entropy_quantile: float = 1.0,
    rollout_correction: RolloutCorrection | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    loss_agg: str = "token-mean",
    norm_len: float | None = None,
    ratio_level: str = "token",
    entropy_agg: str | None = None,
    kl_ratio_weighted: bool = False,
    backend: str = "auto",
    vocab_group: object = None,
    vocab_start: int | None = None,
    global_batch: GlobalBatch | None = None,
) -> PolicyLossOutput:
    """`rlops.policy_loss` on logits = hidden @ weight.T + bias, without materialising the logits.

    Args:
        hidden: (B, T, H), or (N, H) / (1, N, H) packed (with cu_seqlens; without it an (N, H)
            batch is one sequence), float16/bfloat16/float32.
        weight: (V, H) lm_head weight of hidden's dtype (tied or not); bias: (V,) or None.
        tokens, advantages, mask, old_logprobs, ref_logprobs, is_weights, cu_seqlens: as
            `policy_loss`, shaped like hidden without its last dimension.
        ref_hidden, ref_weight, ref_bias: the reference model's last hidden states (hidden's
            leading shape, its own H) and lm_head, for kl_estimator="full"; no gradient.
        chunk_size: rows per chunk (default: ~256 MiB of chunk buffers, at least 128 rows):
            peak memory above the inputs is one chunk's buffers plus the float32 weight
            gradient, whatever N.
        vocab_group, vocab_start: the lm_head split over the vocabulary, as
            `linear_token_logprobs_and_entropy` takes them (ref_weight and ref_bias are then
            this rank's rows too); the loss is the PyTorch backend's epilogue on the statistics
            of the whole vocabulary, the same on every rank (as `rlops.policy_loss`).
        global_batch: rlops.GlobalBatch, the batch split over ranks, as `rlops.policy_loss`.
        every other option: as `rlops.policy_loss` (`inplace_grad` does not apply: the chunk
            buffers are always overwritten with their gradient).

    Returns:
        PolicyLossOutput (per-token outputs shaped like tokens); gradients reach hidden,
        weight and bias.

    Masked tokens cost no vocabulary work. On CPU tensors their rows are not projected either; on a
    GPU they are (finding them would be a host sync): pack batches with much padding (cu_seqlens).
    """
    # Under torch.compile the options are named once more: as rlops.policy_loss.
    options = locals() if not torch.compiler.is_compiling() else dict(
        temperature=temperature, objective=objective, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
        ratio_cap=ratio_cap, sapo_tau_pos=sapo_tau_pos, sapo_tau_neg=sapo_tau_neg, dro_beta=dro_beta,
        vespo_k_pos=vespo_k_pos, vespo_lambda_pos=vespo_lambda_pos, vespo_k_neg=vespo_k_neg,
        vespo_lambda_neg=vespo_lambda_neg, cov_ratio=cov_ratio, cov_low=cov_low, cov_high=cov_high,
        cov_kl_coef=cov_kl_coef, off_policy_mask=off_policy_mask, top_entropy_quantile=top_entropy_quantile,
        rollout_correction=rollout_correction, kl_coef=kl_coef, kl_estimator=kl_estimator, entropy_coef=entropy_coef,
        loss_agg=loss_agg, norm_len=norm_len, ratio_level=ratio_level, entropy_agg=entropy_agg,
        kl_ratio_weighted=kl_ratio_weighted, backend=backend, vocab_group=vocab_group, vocab_start=vocab_start,
        global_batch=global_batch)
    config = PolicyLossConfig.from_call(options)
    ref = None if ref_hidden is None and ref_weight is None and ref_bias is None \
        else (ref_hidden, Head(ref_weight, ref_bias))
    batch = PolicyBatch(tokens, advantages, mask, old_logprobs, ref_logprobs, is_weights, cu_seqlens, rollout_logprobs)
    return run_linear_policy_loss(hidden, Head(weight, bias), ref, batch, config, chunk_size)


def run_linear_policy_loss(hidden: Tensor, head: Head, ref: tuple[Tensor | None, Head] | None, batch: PolicyBatch,
               config: PolicyLossConfig, chunk_size: int | None) -> PolicyLossOutput:
    """`linear_policy_loss` on a built config and batch."""
    vocab = check_head(hidden, head.weight, head.bias, ("hidden", "weight", "bias"))
    if ref is not None:
        check_ref_head(hidden, vocab, ref[0], *ref[1])
    caller_shape, layout = getattr(batch.tokens, "shape", None), None
    if batch.cu_seqlens is not None:
        hidden, batch, layout = packed_as_row(hidden, batch, "hidden")
        ref = ref if ref is None or ref[0].dim() != 2 else (ref[0][None], ref[1])
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must have shape (B, T, H) or (N, H), got {tuple(hidden.shape)}")
    check_token_ids(batch.tokens, tuple(hidden.shape[:-1]), None, hidden, like_name="hidden")
    # (N, H) without cu_seqlens: its (N,) tensors become one (1, N) sequence; anything else is left to the checks.
    one_sequence = hidden.dim() == 2
    batch = check_per_token_inputs(PolicyBatch(*(x[None] if one_sequence and x is not None and x.dim() == 1 else x
                                                 for x in batch)))
    layout = Layout.of(batch.mask) if layout is None else layout._replace(mask=batch.mask)
    shard, backend = None, config.backend
    if config.vocab_group is None:
        check_token_range(batch.tokens, vocab, counted=batch.mask)  # a masked token's id is never read
    else:  # global ids become this shard's (a masked one 0 below: this rank's first global id)
        from ..linear_vocab_parallel import local_ids  # lazily: it builds on this module

        tokens, shard, backend = local_ids(batch.tokens, vocab, config.vocab_group, config.vocab_start, backend,
                                           batch.mask)
        batch = batch._replace(tokens=tokens)
    check_kl_inputs(config, batch.ref_logprobs, ref is not None,
                    "ref_hidden and ref_weight, the reference model's last hidden states and lm_head")
    layout = check_packed_options(config, layout)
    batch, layout, rollout = apply_rollout_correction(batch, layout, config)  # before the rows are chosen
    backend = resolve_backend(backend, hidden, "linear_policy_loss")
    full_kl = config.kl_used == "full"
    mask = batch.mask.reshape(-1)
    # The projected rows: on the CPU the counted ones (indices); elsewhere all (a slice: finding them
    # would read their count back), a masked one with weight 0, id 0 and zeros for hidden states.
    counted = mask.nonzero().squeeze(1) if _drops_masked_rows(hidden) else slice(None)
    tokens = torch.where(mask, batch.tokens.reshape(-1), 0)[counted]  # padding ids (-100) never read
    chunks = _Chunks(tokens, (ref[0].reshape(-1, ref[0].shape[-1])[counted], ref[1]) if full_kl else None,
                     config.temperature, _chunk(chunk_size, max(tokens.numel(), 1), hidden, vocab, full_kl), backend,
                     mask=mask if isinstance(counted, slice) else None, shard=shard)
    inputs = TokenInputs.of(batch, layout, config)
    counted_hidden = hidden.reshape(-1, hidden.shape[-1])[counted]
    if shard is None and backend != "torch" and not config.coupled:
        shape = batch.tokens.shape
        gathered = inputs.map(lambda x: x.to(torch.float32).expand(shape).reshape(-1)[counted])
        loss, out = _LinearPolicyLoss.apply(counted_hidden, *head, dataclasses.replace(chunks, inputs=gathered,
                                                                              epilogue=Epilogue.of(config)))
        terms = LossTerms(loss, *(_scatter(out[ROW[name]], counted, shape)
                                  for name in ("logp", "entropy", "kl", "ratio")))
    else:
        stats = _counted_stats(counted_hidden, head, chunks, batch.tokens.shape, counted)
        terms = torch_backend.policy_loss(stats, layout, inputs, config, batch.rollout_logprobs)
    if one_sequence:
        terms = LossTerms(terms.loss, *(v.view(hidden.shape[:-1]) for v in terms[1:]))
    return PolicyLossOutput.of(terms, batch, config, layout, caller_shape, rollout)


def _drops_masked_rows(hidden: Tensor) -> bool:
    """Whether masked rows are dropped before the projection: on CPU tensors (nonzero() is no sync there)."""
    return hidden.device.type == "cpu"


def _scatter(values: Tensor, counted: Tensor | slice, shape: torch.Size) -> Tensor:
    """(n,) values of the projected rows as (B, T): placed in a zero tensor at `counted` (differentiable
    in values), or as they are when every row was projected (counted a slice)."""
    if isinstance(counted, slice):
        return values.view(shape)
    return torch.zeros(shape.numel(), dtype=values.dtype, device=values.device).index_copy(
        0, counted, values).view(shape)


def _counted_stats(counted_hidden: Tensor, head: Head, chunks: _Chunks, shape: torch.Size,
                   counted: Tensor | slice) -> TokenStats:
    """(B, T) token statistics of the projected rows (those of masked tokens, if any, for the caller to mask)."""
    if chunks.backend == "torch" and chunks.shard is None:
        n, ref = counted_hidden.shape[0], chunks.ref
        stats = torch_backend.linear_token_stats(chunks.rows(counted_hidden, 0, n), head, chunks.tokens,
                                                 chunks.temperature, None if ref is None else
                                                 (chunks.rows(ref[0], 0, n), ref[1]), chunk_size=chunks.chunk)
        values = [v if v is None else v.to(torch.float32) for v in stats]
    else:
        out = _linear_stats(counted_hidden, head, chunks)
        values = [out[ROW["logp"]], out[ROW["entropy"]], None if chunks.ref is None else out[ROW["kl"]]]
    return TokenStats(*(v if v is None else _scatter(v, counted, shape) for v in values))
