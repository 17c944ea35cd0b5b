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

where w is the token's aggregation weight (its share of the loss_agg aggregate; 0 when
masked) and e its entropy coefficient (entropy_coef times its weight in the entropy term's
aggregation). It writes the N_POLICY_ROWS float32 rows of rlops/constants.py per token:
the five statistics rows of token_stats, then ratio, loss, and the derivatives of loss with
respect to logp, entropy and the exact KL, so the backward is token_stats' backward kernel
fed with those last rows times the upstream gradient. Tokens with w = 0 are not read.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from rlops._layout import check_policy_launch, flat, per_token, row_layouts, same_alignment
from rlops.constants import K3_MAX, KL_KINDS, LOG_RATIO_CLAMP, N_POLICY_ROWS, OBJECTIVES, ROW
from rlops.options import Epilogue, TokenInputs

from ._common import (
    NUM_WARPS,
    block_v,
    merged_row_stats,
    row_start,
    sampled_logp,
    softmax_row_stats,
    store_rows,
    store_stats,
)
from .token_stats import split_row_states

# block_v calls triton.next_power_of_2, a ConstexprFunction whose call from host code costs
# about as much as the rest of a small launch (an import and two comprehensions per call):
# the launchers ask it once per vocabulary size.
_block_v = functools.cache(block_v)

CLAMP = tl.constexpr(LOG_RATIO_CLAMP)
K3_CAP = tl.constexpr(K3_MAX)
KL_K1 = tl.constexpr(KL_KINDS["k1"])
KL_K2 = tl.constexpr(KL_KINDS["k2"])
KL_K3 = tl.constexpr(KL_KINDS["k3"])
KL_FULL = tl.constexpr(KL_KINDS["full"])
KL_ABS = tl.constexpr(KL_KINDS["abs"])
CISPO = tl.constexpr(OBJECTIVES["cispo"])
SAPO = tl.constexpr(OBJECTIVES["sapo"])
REINFORCE = tl.constexpr(OBJECTIVES["reinforce"])
DRO = tl.constexpr(OBJECTIVES["dro"])
DPPO_TV = tl.constexpr(OBJECTIVES["dppo_tv"])
DPPO_KL = tl.constexpr(OBJECTIVES["dppo_kl"])
KL_K1_ST = tl.constexpr(KL_KINDS["k1+"])
KL_K3_ST = tl.constexpr(KL_KINDS["k3+"])
KL_ABS_ST = tl.constexpr(KL_KINDS["abs+"])
# The epilogue rows ratio, loss, g_logp, g_entropy, g_kl follow each other from here (store_rows).
EPILOGUE_FIRST = tl.constexpr(ROW["ratio"])


@triton.jit
def _clamp(x, lo, hi):
    """x clamped to [lo, hi], NaN kept NaN (min/max alone would turn a NaN into a bound)."""
    return tl.where(x != x, x, tl.minimum(tl.maximum(x, lo), hi))


@triton.jit
def _sampled_kl(logp, ref_logp_ptr, row, kl, KL_KIND: tl.constexpr):
    """(kl, d kl / d logp) from the sampled token's log-probs (d = ref_logp - logp); the exact KL
    (KL_FULL) passes through with its gradient handled by the backward kernel. The straight-through
    kinds (k1+, k3+, abs+) take the value of their base and the gradient of k2, -d. (Comparisons
    of constexprs are chained with `or`: Triton's frontend has no `in` over a tuple.)"""
    d_kl = tl.zeros([], tl.float32)
    if KL_KIND == KL_K1 or KL_KIND == KL_K1_ST:  # noqa: SIM109
        kl = logp - tl.load(ref_logp_ptr + row)
        d_kl += 1.0
    if KL_KIND == KL_K2:
        d = tl.load(ref_logp_ptr + row) - logp
        kl = 0.5 * d * d
        d_kl = -d
    if KL_KIND == KL_K3 or KL_KIND == KL_K3_ST:  # noqa: SIM109
        d = tl.load(ref_logp_ptr + row) - logp
        dc = _clamp(d, -CLAMP, CLAMP)
        exp_dc = tl.exp(dc)
        raw = exp_dc - dc - 1.0
        kl = tl.where(raw != raw, raw, tl.minimum(raw, K3_CAP))
        live = (d >= -CLAMP) & (d <= CLAMP) & (raw <= K3_CAP)
        d_kl = tl.where(live, 1.0 - exp_dc, 0.0)
    if KL_KIND == KL_ABS or KL_KIND == KL_ABS_ST:  # noqa: SIM109
        d = tl.load(ref_logp_ptr + row) - logp
        kl = tl.abs(d)
        d_kl = tl.where(d < 0, 1.0, tl.where(d > 0, -1.0, 0.0))  # torch.abs: gradient 0 at 0
    if KL_KIND == KL_K1_ST or KL_KIND == KL_K3_ST or KL_KIND == KL_ABS_ST:  # noqa: SIM109
        d_kl = logp - tl.load(ref_logp_ptr + row)
    return kl, d_kl


@triton.jit
def _dppo_valid(logp, old_logp, adv, clip_low, clip_high, BINARY_KL: tl.constexpr):
    """DPPO's trust region (verl's dppo_tv / dppo_kl): 1.0 where the token's probability moved
    less than the bound on the side its advantage pushes it, else 0.0 (NaN in: NaN out)."""
    p = tl.exp(logp)
    p_old = tl.exp(old_logp)
    if BINARY_KL:
        # KL between Bernoulli(p_old) and Bernoulli(p), verl's 1e-8 kept for equal arithmetic.
        kl = p_old * (old_logp - logp) + (1.0 - p_old) * tl.log((1.0 - p_old + 1e-8) / (1.0 - p + 1e-8))
        valid = tl.where(adv > 0, (kl <= clip_high) | (p <= p_old), (kl <= clip_low) | (p >= p_old))
    else:
        valid = tl.where(adv > 0, p - p_old <= clip_high, p - p_old >= -clip_low)
    nan = (logp != logp) | (old_logp != old_logp)
    return tl.where(nan, logp + old_logp, tl.where(valid, 1.0, 0.0))


@triton.jit
def _surrogate(ratio, d_log_r, logp, old_logp, adv, clip_low, clip_high, dual_clip, ratio_cap, param_pos, param_neg,
               OBJECTIVE: tl.constexpr):
    """(pg, d pg / d logp) of one token for the objective (docs/objectives.md). param_pos and
    param_neg: SAPO's temperatures, DRO's beta."""
    if OBJECTIVE == CISPO:
        # -sg(clamp(r)) * A * logp: the weight carries no gradient, logp does.
        weight = _clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
        pg = -adv * weight * logp
        d_pg = -adv * weight
    elif OBJECTIVE == SAPO:
        tau = tl.where(adv > 0, param_pos, param_neg)
        gate = tl.sigmoid(tau * (ratio - 1.0))
        pg = -adv * gate * (4.0 / tau)
        d_pg = -adv * 4.0 * gate * (1.0 - gate) * ratio * d_log_r
    elif OBJECTIVE == REINFORCE:
        pg = -adv * logp
        d_pg = -adv
    elif OBJECTIVE == DRO:
        # -(A logp - beta/2 (logp - old)^2), the log-ratio unclamped as verl's.
        diff = logp - old_logp
        pg = -(adv * logp - 0.5 * param_pos * diff * diff)
        d_pg = -adv + param_pos * diff
    elif OBJECTIVE == DPPO_TV or OBJECTIVE == DPPO_KL:  # noqa: SIM109
        # -A sg(min(r, ratio_cap)) logp inside the trust region, 0 outside.
        weight = _clamp(ratio, 0.0, ratio_cap) * _dppo_valid(logp, old_logp, adv, clip_low, clip_high,
                                                             OBJECTIVE == DPPO_KL)
        pg = -adv * weight * logp
        d_pg = -adv * weight
    else:
        # Clipped surrogate: the gradient flows through the larger branch (the unclipped one on a
        # tie), each passing it where its clamp does not bind. The unclipped ratio is capped at
        # ratio_cap (inf: no cap); below the cap the clipped branch can be the larger one.
        pg_unclipped = -adv * _clamp(ratio, 0.0, ratio_cap)
        pg_clipped = -adv * _clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
        pg = tl.maximum(pg_unclipped, pg_clipped)
        passes = tl.where(pg_unclipped >= pg_clipped, ratio <= ratio_cap,
                          (ratio >= 1.0 - clip_low) & (ratio <= 1.0 + clip_high))
        d_pg = tl.where(passes, -adv * ratio, 0.0) * d_log_r
        cap = -adv * dual_clip  # dual_clip = inf disables the cap
        capped = (adv < 0) & (pg > cap)
        pg = tl.where(capped, cap, pg)
        d_pg = tl.where(capped, 0.0, d_pg)
    return pg, d_pg


@triton.jit
def _policy_loss_fwd_kernel(
    # data pointers: logits, reference logits, token ids, then the per-token float32 inputs
    # (rlops/options.py: TokenInputs; None when absent, HAS_OLD, HAS_ISW, HAS_ENT saying which; with
    # agg_count_ptr, token-mean's count, agg_w_ptr holds the mask and HAS_COUNT is set), then the
    # (N_POLICY_ROWS, N) output; part_ptr: the rows' split states from
    # token_stats._row_states_kernel, or None (HAS_PARTS says which). The launcher passes every
    # HAS_* switch itself: triton.heuristics would derive them at every launch (10-20 us here).
    x_ptr, ref_ptr, tokens_ptr, part_ptr,
    agg_w_ptr, ent_coef_ptr, adv_ptr, old_ptr, ref_logp_ptr, isw_ptr, agg_count_ptr,
    out_ptr,
    # sizes; adv_inner: tokens per advantage (T when one per sequence of a (B, T) batch, else 1)
    N, V, adv_inner,
    # strides (rlops/_layout.py: RowLayout)
    inner, stride_outer, stride_inner, ref_inner, ref_stride_outer, ref_stride_inner,
    # scalars (rlops/options.py: Epilogue)
    inv_tau, clip_low, clip_high, dual_clip, kl_coef, ratio_cap, param_pos, param_neg,
    # switches
    HAS_OLD: tl.constexpr, HAS_ISW: tl.constexpr, HAS_ENT: tl.constexpr, KL_KIND: tl.constexpr,
    KL_RATIO: tl.constexpr, BLOCK_V: tl.constexpr, REF_ALIGNED: tl.constexpr = True,
    HAS_PARTS: tl.constexpr = False, SPLITS: tl.constexpr = 1, OBJECTIVE: tl.constexpr = 0,
    HAS_COUNT: tl.constexpr = False,
):
    """Reads N*V logits once (2*N*V with the exact KL; with HAS_PARTS, SPLITS states per row
    instead) and ~6 floats per token; writes N_POLICY_ROWS floats per token."""
    row = tl.program_id(0)
    # torch.compile may pass Python floats as float64; the contract is float32 arithmetic.
    inv_tau = tl.cast(inv_tau, tl.float32)
    clip_low = tl.cast(clip_low, tl.float32)
    clip_high = tl.cast(clip_high, tl.float32)
    dual_clip = tl.cast(dual_clip, tl.float32)
    kl_coef = tl.cast(kl_coef, tl.float32)
    ratio_cap = tl.cast(ratio_cap, tl.float32)
    param_pos = tl.cast(param_pos, tl.float32)
    param_neg = tl.cast(param_neg, tl.float32)
    w = tl.load(agg_w_ptr + row)
    if HAS_COUNT:  # token-mean: each counted token's weight is 1 / max(count, 1), as the host's would be
        w = tl.where(w != 0, 1.0 / tl.maximum(tl.load(agg_count_ptr).to(tl.float32), 1.0), 0.0)
    if w == 0:
        store_stats(out_ptr, N, row, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        store_rows(out_ptr, N, row, EPILOGUE_FIRST, 0.0, 0.0, 0.0, 0.0, 0.0)
    else:
        x_row = x_ptr + row_start(row, inner, stride_outer, stride_inner)
        if HAS_PARTS:
            m, log_s, entropy, lse_gap, kl = merged_row_stats(part_ptr, N, row, inv_tau, KL_KIND == KL_FULL, SPLITS)
        else:
            ref_row = ref_ptr + row_start(row, ref_inner, ref_stride_outer, ref_stride_inner)
            m, log_s, entropy, lse_gap, kl, x_row = softmax_row_stats(x_row, ref_row, V, inv_tau,
                                                                      KL_KIND == KL_FULL, REF_ALIGNED, BLOCK_V)
        logp = sampled_logp(x_row, tokens_ptr, row, V, m, log_s, inv_tau)

        # Importance ratio; torch.clamp passes the gradient at the bounds, so the same here. On
        # policy, old = logp.detach(): the difference is 0, or NaN for a NaN logp (SPEC: NaN in, NaN out).
        old_logp = logp
        diff = tl.where(logp == logp, 0.0, logp)
        if HAS_OLD:
            old_logp = tl.load(old_ptr + row)
            diff = logp - old_logp
        log_r = _clamp(diff, -CLAMP, CLAMP)
        d_log_r = tl.where((diff >= -CLAMP) & (diff <= CLAMP), 1.0, 0.0)
        ratio = tl.exp(log_r)

        adv = tl.load(adv_ptr + row // adv_inner)
        pg, d_pg = _surrogate(ratio, d_log_r, logp, old_logp, adv, clip_low, clip_high, dual_clip, ratio_cap,
                              param_pos, param_neg, OBJECTIVE)
        if HAS_ISW:
            isw = tl.load(isw_ptr + row)
            pg = pg * isw
            d_pg = d_pg * isw

        # The KL row keeps the KL itself: the backward's exact-KL gradient p (log p - log q - KL) needs it.
        kl, d_kl = _sampled_kl(logp, ref_logp_ptr, row, kl, KL_KIND)
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
            g_entropy -= tl.load(ent_coef_ptr + row)
            loss += g_entropy * entropy
        g_kl = tl.zeros([], tl.float32)
        if KL_KIND == KL_FULL:
            g_kl += w * kl_coef * kl_scale
        store_stats(out_ptr, N, row, logp, entropy, kl, m, log_s, lse_gap)
        store_rows(out_ptr, N, row, EPILOGUE_FIRST, ratio, loss, w * (d_pg + kl_coef * d_kl), g_entropy, g_kl)


ADV, AGG, COUNT = (TokenInputs._fields.index(name) for name in ("advantages", "agg_weights", "agg_count"))


def _per_sequence(advantages: torch.Tensor, tokens: torch.Tensor) -> bool:
    """Whether advantages are one float32 per row of (B, T) tokens, in contiguous (B, 1) memory."""
    return (tokens.dim() == 2 and advantages.dim() == 2 and advantages.shape == (tokens.shape[0], 1)
            and advantages.dtype == torch.float32 and advantages.is_contiguous())


def _kernel_inputs(inputs: TokenInputs, shape: torch.Size, adv_inner: int) -> list[torch.Tensor | None]:
    """The per-token inputs as the kernel reads them: float32 (B, T) memory (rlops._layout.per_token),
    except advantages one per sequence (adv_inner > 1) and token-mean's mask and count, as they are."""
    counted = inputs.agg_count is not None
    return [x if x is None or i == COUNT or (i == ADV and adv_inner > 1) else
            flat(x) if i == AGG and counted else per_token(x, shape) for i, x in enumerate(inputs)]


def policy_loss_fwd(logits: torch.Tensor, tokens: torch.Tensor, ref_logits: torch.Tensor | None,
                    inputs: TokenInputs, epilogue: Epilogue) -> torch.Tensor:
    """Launches the forward kernel; returns float32 out (N_POLICY_ROWS, B, T) in the row order of constants.ROW.

    logits (B, T, V) with any row strides, or (B, T + 1, V) of which the first T positions are
    read (rlops._layout.positions_of); tokens (B, T); inputs: the per-token tensors,
    each broadcastable to (B, T) (agg_weights exactly (B, T)); ref_logits (B, T, V) exactly
    when epilogue.kl_kind is the exact KL.
    """
    rows, ref_rows = row_layouts(logits, ref_logits, check_policy_launch(logits, tokens, ref_logits, inputs, epilogue))
    out = torch.empty((N_POLICY_ROWS, *tokens.shape), dtype=torch.float32, device=logits.device)
    if rows.n_rows:
        # Advantages one per sequence, (B, 1), are read as they are (row // T): no (B, T) copy per call.
        adv_inner = tokens.shape[-1] if _per_sequence(inputs.advantages, tokens) else 1
        token_inputs = _kernel_inputs(inputs, tokens.shape, adv_inner)
        ref_aligned = ref_logits is None or same_alignment(rows, ref_rows)
        # Rows with aggregation weight 0 are skipped, here as in the kernel below.
        parts = split_row_states(rows, ref_rows, token_inputs[0], epilogue.temperature,
                                 epilogue.kl_kind == KL_KINDS["full"], ref_aligned)
        _policy_loss_fwd_kernel[(rows.n_rows,)](
            # data pointers
            rows.tensor, ref_rows.tensor, flat(tokens), parts, *token_inputs, out,
            # sizes, strides
            rows.n_rows, logits.shape[-1], adv_inner, *rows[2:], *ref_rows[2:],
            # scalars
            1.0 / epilogue.temperature, epilogue.clip_low, epilogue.clip_high, epilogue.dual_clip, epilogue.kl_coef,
            epilogue.ratio_cap, epilogue.param_pos, epilogue.param_neg,
            # switches (HAS_*: the inputs present)
            HAS_OLD=inputs.old_logprobs is not None, HAS_ISW=inputs.is_weights is not None,
            HAS_ENT=inputs.entropy_coefs is not None, KL_KIND=epilogue.kl_kind, KL_RATIO=epilogue.kl_ratio_weighted,
            BLOCK_V=_block_v(logits.shape[-1]), REF_ALIGNED=ref_aligned, HAS_PARTS=parts is not None,
            SPLITS=1 if parts is None else parts.shape[1], OBJECTIVE=epilogue.objective,
            HAS_COUNT=inputs.agg_count is not None, num_warps=NUM_WARPS,
        )
    return out
