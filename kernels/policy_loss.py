"""The clipped PPO/GRPO policy loss per token, in one pass over the vocabulary (SPEC.md sections 2-4).

Forward: one program per token streams its logits once (plus the reference model's logits
for the exact KL), then computes in registers

    logp, H                                   (section 1)
    log_r = clamp(logp - old, -20, 20), r = exp(log_r)
    pg    = max(-A r, -A clamp(r, 1 - clip_low, 1 + clip_high)), capped at -A * dual_clip where A < 0,
            times is_weights
    kl    = k1 | k2 | k3 from ref_logp, or the exact KL(p || q) over the vocabulary
    loss  = w * (pg + kl_coef * kl * [r with KL_RATIO]) - e * H

(KL_RATIO is DeepSeek-V3.2's unbiased KL gradient; r carries gradient there.)

where w is the token's aggregation weight (its share of the loss_agg mean; 0 when masked)
and e the entropy coefficient times the token's weight in the entropy term's aggregation.
It writes ten float32 per token into out (10, N):

    0 logp  1 entropy  2 kl  3 lse  4 lse_ref  5 ratio  6 loss  7 g_logp  8 g_entropy  9 g_kl

Rows 0-4 are the stats layout of token_stats, and rows 7-9 the derivatives of `loss` with
respect to logp, entropy and the exact KL, so the backward is token_stats' backward kernel
fed with rows 7-9 times the upstream gradient. Tokens with w = 0 are not read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import block_v, cuda_ops, row_layout, row_start, softmax_row_stats
from .token_stats import ref_layout

N_OUT = 10
ROW = {"logp": 0, "entropy": 1, "kl": 2, "lse": 3, "lse_ref": 4, "ratio": 5, "loss": 6,
       "g_logp": 7, "g_entropy": 8, "g_kl": 9}
KL_KINDS = {"none": 0, "k1": 1, "k2": 2, "k3": 3, "full": 4}
LOG_RATIO_CLAMP = tl.constexpr(20.0)
K3_MAX = tl.constexpr(10.0)


@triton.jit
def _policy_loss_fwd_kernel(
    x_ptr, ref_ptr, tokens_ptr, weight_ptr, ent_weight_ptr, adv_ptr, old_ptr, ref_logp_ptr, isw_ptr, out_ptr,
    N, V, inner, stride_outer, stride_inner, ref_inner, ref_stride_outer, ref_stride_inner,
    inv_tau, clip_low, clip_high, dual_clip, kl_coef,
    HAS_OLD: tl.constexpr, HAS_ISW: tl.constexpr, HAS_ENT: tl.constexpr, KL_KIND: tl.constexpr,
    KL_RATIO: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Reads N*V logits once (2*N*V with the exact KL) and ~6 floats per token; writes 10 floats per token."""
    row = tl.program_id(0)
    # torch.compile may pass Python floats as float64; the contract is float32 arithmetic.
    inv_tau = tl.cast(inv_tau, tl.float32)
    clip_low = tl.cast(clip_low, tl.float32)
    clip_high = tl.cast(clip_high, tl.float32)
    dual_clip = tl.cast(dual_clip, tl.float32)
    kl_coef = tl.cast(kl_coef, tl.float32)
    w = tl.load(weight_ptr + row)
    if w == 0:
        for k in tl.static_range(10):
            tl.store(out_ptr + k * N + row, 0.0)
    else:
        x_row = x_ptr + row_start(row, inner, stride_outer, stride_inner)
        ref_row = ref_ptr + row_start(row, ref_inner, ref_stride_outer, ref_stride_inner)
        lse, entropy, lse_ref, kl = softmax_row_stats(x_row, ref_row, V, inv_tau, KL_KIND == 4, BLOCK_V)
        tok = tl.load(tokens_ptr + row).to(tl.int64)
        in_vocab = (tok >= 0) & (tok < V)
        z_tok = tl.load(x_row + tl.where(in_vocab, tok, 0)).to(tl.float32) * inv_tau
        logp = tl.where(in_vocab, z_tok - lse, float("nan"))

        # Importance ratio; torch.clamp passes the gradient at the bounds, so the same here.
        diff = tl.zeros([], tl.float32)
        if HAS_OLD:
            diff = logp - tl.load(old_ptr + row)
        log_r = tl.minimum(tl.maximum(diff, -LOG_RATIO_CLAMP), LOG_RATIO_CLAMP)
        d_log_r = tl.where((diff >= -LOG_RATIO_CLAMP) & (diff <= LOG_RATIO_CLAMP), 1.0, 0.0)
        ratio = tl.exp(log_r)

        # Clipped surrogate: the gradient flows through the unclipped branch when it is the max.
        adv = tl.load(adv_ptr + row)
        pg_unclipped = -adv * ratio
        pg_clipped = -adv * tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
        pg = tl.maximum(pg_unclipped, pg_clipped)
        d_pg = tl.where(pg_unclipped >= pg_clipped, pg_unclipped, 0.0) * d_log_r
        cap = -adv * dual_clip  # dual_clip = inf disables the cap
        capped = (adv < 0) & (pg > cap)
        pg = tl.where(capped, cap, pg)
        d_pg = tl.where(capped, 0.0, d_pg)
        if HAS_ISW:
            isw = tl.load(isw_ptr + row)
            pg = pg * isw
            d_pg = d_pg * isw

        # KL to the reference from the sampled token's log-probs (d = ref_logp - logp).
        d_kl = tl.zeros([], tl.float32)
        if KL_KIND == 1:
            kl = logp - tl.load(ref_logp_ptr + row)
            d_kl += 1.0
        if KL_KIND == 2:
            d = tl.load(ref_logp_ptr + row) - logp
            kl = 0.5 * d * d
            d_kl = -d
        if KL_KIND == 3:
            d = tl.load(ref_logp_ptr + row) - logp
            dc = tl.minimum(tl.maximum(d, -LOG_RATIO_CLAMP), LOG_RATIO_CLAMP)
            exp_dc = tl.exp(dc)
            raw = exp_dc - dc - 1.0
            kl = tl.minimum(raw, K3_MAX)
            live = (d >= -LOG_RATIO_CLAMP) & (d <= LOG_RATIO_CLAMP) & (raw <= K3_MAX)
            d_kl = tl.where(live, 1.0 - exp_dc, 0.0)

        # Row 2 keeps the KL itself: the backward's exact-KL gradient p (log p - log q - KL) needs it.
        kl_term = kl
        kl_scale = 1.0  # d(kl term)/d(kl): the ratio when the KL is weighted by it
        if KL_RATIO:
            # d(kl * r)/d logp = r * d kl/d logp + kl * r * d log_r/d logp
            d_kl = ratio * d_kl + kl * ratio * d_log_r
            kl_scale = ratio
            kl_term = kl * ratio
        loss = w * (pg + kl_coef * kl_term)
        g_entropy = tl.zeros([], tl.float32)
        if HAS_ENT:
            g_entropy -= tl.load(ent_weight_ptr + row)
            loss += g_entropy * entropy
        g_kl = tl.zeros([], tl.float32)
        if KL_KIND == 4:
            g_kl += w * kl_coef * kl_scale
        tl.store(out_ptr + row, logp)
        tl.store(out_ptr + N + row, entropy)
        tl.store(out_ptr + 2 * N + row, kl)
        tl.store(out_ptr + 3 * N + row, lse)
        tl.store(out_ptr + 4 * N + row, lse_ref)
        tl.store(out_ptr + 5 * N + row, ratio)
        tl.store(out_ptr + 6 * N + row, loss)
        tl.store(out_ptr + 7 * N + row, w * (d_pg + kl_coef * d_kl))
        tl.store(out_ptr + 8 * N + row, g_entropy)
        tl.store(out_ptr + 9 * N + row, g_kl)


def _per_token(x: torch.Tensor | None, shape: torch.Size) -> torch.Tensor | None:
    """A per-token input broadcast to (B, T), as the contiguous float32 (N,) vector the kernel reads."""
    return None if x is None else x.to(torch.float32).expand(shape).reshape(-1).contiguous()


def policy_loss_fwd(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    weights: torch.Tensor,
    advantages: torch.Tensor,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    ref_logits: torch.Tensor | None = None,
    is_weights: torch.Tensor | None = None,
    temperature: float = 1.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float = float("inf"),
    kl_coef: float = 0.0,
    kl_kind: int = 0,
    entropy_weights: torch.Tensor | None = None,
    kl_ratio_weighted: bool = False,
    backend: str = "triton",
) -> torch.Tensor:
    """Launches the forward kernel (backend "triton", or "cuda" for its twin in csrc/); returns
    float32 out (10, B, T) in the row order of ROW.

    logits (B, T, V); tokens, weights (B, T); advantages, old_logprobs, ref_logprobs and
    is_weights broadcastable to (B, T), such as (B, 1); ref_logits (B, T, V) when kl_kind is 4
    (the exact KL). weights are the aggregation weights (0 = masked: that token is not read);
    entropy_weights (B, T) or None are the entropy coefficient times each token's weight in the
    entropy term's aggregation (0 where masked).
    """
    if tokens.shape != logits.shape[:-1] or weights.shape != tokens.shape:
        raise ValueError(f"tokens and weights must have shape {tuple(logits.shape[:-1])}")
    if (kl_kind == KL_KINDS["full"]) != (ref_logits is not None):
        raise ValueError("ref_logits is needed exactly when kl_kind is 4 (the exact KL)")
    if kl_kind in (1, 2, 3) and ref_logprobs is None:
        raise ValueError("kl_kind 1-3 (k1, k2, k3) need ref_logprobs")
    rows, ref_rows = row_layout(logits), ref_layout(ref_logits, logits)
    out = torch.empty((N_OUT, *tokens.shape), dtype=torch.float32, device=logits.device)
    n = rows.n_rows
    if n:
        vocab = logits.shape[-1]
        w = weights.to(torch.float32).reshape(-1).contiguous()
        per_token = [_per_token(x, tokens.shape) for x in
                     (entropy_weights, advantages, old_logprobs, ref_logprobs, is_weights)]
        scalars = (1.0 / temperature, clip_low, clip_high, dual_clip, kl_coef)
        kl_ratio = kl_ratio_weighted and kl_kind != 0
        if backend == "cuda":
            ent_w, adv, old, ref_logp, isw = per_token
            cuda_ops().policy_loss_fwd(
                rows.tensor, None if ref_logits is None else ref_rows.tensor, tokens.reshape(-1).to(torch.int64), w,
                ent_w, adv, old, ref_logp, isw, out, n, vocab, *rows[2:], *ref_rows[2:], *scalars, kl_kind, kl_ratio)
            return out
        # Absent inputs are never read (their HAS_* switch is off): any tensor stands in.
        ent_w, adv, old, ref_logp, isw = (w if x is None else x for x in per_token)
        _policy_loss_fwd_kernel[(n,)](
            rows.tensor, ref_rows.tensor, tokens.reshape(-1), w, ent_w, adv, old, ref_logp, isw, out,
            n, vocab, *rows[2:], *ref_rows[2:], *scalars,
            HAS_OLD=old_logprobs is not None, HAS_ISW=is_weights is not None, HAS_ENT=entropy_weights is not None,
            KL_KIND=kl_kind, KL_RATIO=kl_ratio, BLOCK_V=block_v(vocab), num_warps=8,
        )
    return out
