"""The fused PPO/GRPO policy loss (SPEC.md sections 2-4): validation, dispatch, autograd.

Token-level ratios run entirely in the fused kernel (rlops.kernels.policy_loss): one pass
over the vocabulary gives each token's loss and the derivatives its gradient needs, and the
backward is one more pass. The sequence-level ratio of GSPO couples the tokens of a row, so
that path takes the fused per-token statistics (the vocabulary work) and runs the O(B*T)
epilogue in PyTorch with the reference's own functions.
"""

# No `from __future__ import annotations`: torch.library.custom_op reads real annotations.

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import reference
from .._validation import (
    check_choice,
    check_float,
    check_float_tensor,
    check_logits,
    check_mask,
    check_positive_float,
    check_tokens,
)
from ._backend import resolve_backend
from .token_stats import grad_to_logits, save_for_grad, token_stats_op

SAMPLED_KL = ("k1", "k2", "k3")  # estimators computed from the sampled tokens' log-probs


@torch.library.custom_op("rlops::policy_loss_fwd", mutates_args=())
def policy_loss_op(
    logits: Tensor, tokens: Tensor, weights: Tensor, advantages: Tensor,
    old_logprobs: Tensor | None, ref_logprobs: Tensor | None, ref_logits: Tensor | None,
    is_weights: Tensor | None, entropy_weights: Tensor | None, temperature: float, clip_low: float,
    clip_high: float, dual_clip: float, kl_coef: float, kl_kind: int, kl_ratio_weighted: bool, inplace_grad: bool,
    backend: str,
) -> Tensor:
    """float32 (10, B, T) per-token outputs of the fused kernel (Triton, or its CUDA twin with backend
    "cuda"), in the row order of rlops.kernels.policy_loss.ROW; differentiable through the "loss" row."""
    from ..kernels import policy_loss_fwd

    return policy_loss_fwd(logits, tokens, weights, advantages, old_logprobs, ref_logprobs, ref_logits,
                           is_weights, temperature, clip_low, clip_high, dual_clip, kl_coef, kl_kind,
                           entropy_weights, kl_ratio_weighted, backend)


@policy_loss_op.register_fake
def _(logits, tokens, weights, advantages, old_logprobs, ref_logprobs, ref_logits, is_weights, entropy_weights,
      temperature, clip_low, clip_high, dual_clip, kl_coef, kl_kind, kl_ratio_weighted, inplace_grad,
      backend) -> Tensor:
    return logits.new_empty((10, *tokens.shape), dtype=torch.float32)


def _setup_context(ctx, inputs, output) -> None:
    logits, tokens, *_ = inputs
    ref_logits, temperature, inplace_grad, backend = inputs[6], inputs[9], inputs[16], inputs[17]
    save_for_grad(ctx, logits, tokens, output, ref_logits, temperature, inplace_grad, backend)


def _backward(ctx, grad_out: Tensor):
    from ..kernels.policy_loss import ROW

    out = ctx.saved_tensors[2]
    # Rows g_logp, g_entropy, g_kl hold d loss_t / d (logp, entropy, kl); the chain rule scales
    # them by each token's upstream gradient.
    grads = out[ROW["g_logp"]:ROW["g_kl"] + 1] * grad_out[ROW["loss"]]
    return (grad_to_logits(ctx, grads),) + (None,) * 17


policy_loss_op.register_autograd(_backward, setup_context=_setup_context)


def aggregation_weights(mask: Tensor, loss_agg: str, norm_len: float | None = None) -> Tensor:
    """Per-token weights w (B, T) float32 with sum(w * l) = the loss_agg aggregate of l (SPEC 4).

    w is 0 exactly where mask is 0, and an empty mask gives all zeros (loss 0, no NaN).
    """
    m = mask.to(torch.float32)
    n_rows, n_time = mask.shape
    if loss_agg == "token-mean":
        return m / m.sum().clamp(min=1.0)
    if loss_agg == "seq-mean-token-mean":
        per_row = m.sum(-1, keepdim=True)
        n_valid = (per_row > 0).sum().clamp(min=1)
        return m / per_row.clamp(min=1.0) / n_valid
    if loss_agg == "seq-mean-token-sum":
        return m / max(n_rows, 1)
    if loss_agg == "seq-mean-token-sum-norm":
        denominator = n_rows * (n_time if norm_len is None else norm_len)
        return m / denominator if denominator > 0 else m  # an empty batch has no weights to scale
    raise ValueError(f"loss_agg must be one of {', '.join(reference.LOSS_AGGS)}, got {loss_agg!r}")


@dataclass
class PolicyLossOutput:
    """What `policy_loss` returns.

    loss: scalar float32, differentiable. logprobs, entropy, kl, ratio: float32 (B, T),
    detached, 0 where mask is 0 (those tokens are not computed). kl is 0 when kl_coef is 0.
    metrics: Python floats over the masked tokens, computed (one host sync) on first access.
    """

    loss: Tensor
    logprobs: Tensor
    entropy: Tensor
    kl: Tensor
    ratio: Tensor
    mask: Tensor = field(repr=False)
    advantages: Tensor = field(repr=False)
    clip_low: float = field(repr=False, default=0.2)
    clip_high: float = field(repr=False, default=0.2)
    dual_clip: float | None = field(repr=False, default=None)

    @functools.cached_property
    def metrics(self) -> dict[str, float]:
        """clip_frac_low/high (ratio clipped below with A < 0 / above with A > 0), clip_frac,
        dual_clip_frac, ratio_mean, kl_mean, entropy_mean, approx_kl_old (mean of
        (r - 1) - log r, the k3 estimate of KL(pi_old || pi_theta)) and tokens (the count)."""
        m = self.mask
        n = m.sum().clamp(min=1).to(torch.float32)
        r, adv = self.ratio, self.advantages.to(torch.float32).expand_as(self.ratio)
        low = (r < 1 - self.clip_low) & (adv < 0) & m
        high = (r > 1 + self.clip_high) & (adv > 0) & m
        dual = (r > self.dual_clip) & (adv < 0) & m if self.dual_clip is not None else torch.zeros_like(m)
        safe_r = torch.where(m, r, 1.0)
        approx_kl = torch.where(m, (safe_r - 1) - torch.log(safe_r), 0.0)
        values = torch.stack([
            low.sum() / n, high.sum() / n, (low | high).sum() / n, dual.sum() / n,
            torch.where(m, r, 0.0).sum() / n, torch.where(m, self.kl, 0.0).sum() / n,
            torch.where(m, self.entropy, 0.0).sum() / n, approx_kl.sum() / n, m.sum().to(torch.float32),
        ]).tolist()
        names = ["clip_frac_low", "clip_frac_high", "clip_frac", "dual_clip_frac", "ratio_mean", "kl_mean",
                 "entropy_mean", "approx_kl_old", "tokens"]
        return dict(zip(names, values, strict=True))


def check_options(
    temperature: float, clip_low: float, clip_high: float, dual_clip: float | None, kl_coef: float,
    kl_estimator: str, entropy_coef: float, loss_agg: str, norm_len: float | None, ratio_level: str,
    inplace_grad: bool, entropy_agg: str | None = None, kl_ratio_weighted: bool = False,
) -> None:
    """Validates the scalar options of the policy loss (shared with PolicyLossConfig)."""
    check_positive_float("temperature", temperature)
    check_float("clip_low", clip_low, ge=0.0)
    check_float("clip_high", clip_high, ge=0.0)
    if dual_clip is not None:
        check_float("dual_clip", dual_clip, gt=1.0)
    check_float("kl_coef", kl_coef, ge=0.0)
    check_choice("kl_estimator", kl_estimator, reference.KL_ESTIMATORS)
    check_float("entropy_coef", entropy_coef)
    check_choice("loss_agg", loss_agg, reference.LOSS_AGGS)
    check_choice("ratio_level", ratio_level, reference.RATIO_LEVELS)
    if entropy_agg is not None:
        check_choice("entropy_agg", entropy_agg, reference.LOSS_AGGS)
    if norm_len is not None:
        check_float("norm_len", norm_len, gt=0.0)
    for name, flag in (("inplace_grad", inplace_grad), ("kl_ratio_weighted", kl_ratio_weighted)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")


def policy_loss(
    logits: Tensor,
    tokens: Tensor,
    advantages: Tensor,
    *,
    mask: Tensor | None = None,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    ref_logits: Tensor | None = None,
    is_weights: Tensor | None = None,
    temperature: float = 1.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    loss_agg: str = "token-mean",
    norm_len: float | None = None,
    ratio_level: str = "token",
    entropy_agg: str | None = None,
    kl_ratio_weighted: bool = False,
    inplace_grad: bool = False,
    backend: str = "auto",
) -> PolicyLossOutput:
    """The clipped PPO/GRPO policy loss with optional KL penalty and entropy bonus (SPEC.md 2-4).

    Per token: l = pg + kl_coef * kl - entropy_coef * H, aggregated over the masked tokens.

    Args:
        logits: (B, T, V) float16/bfloat16/float32/float64, the policy's logits for the sampled
            tokens (any row strides, e.g. `logits[:, :-1]`).
        tokens: (B, T) integer ids in [0, V).
        advantages: (B, T) per token, or (B,) / (B, 1) per sequence (GRPO), float.
        mask: (B, T) bool or 0/1; 1 = the token counts. None = every token counts.
        old_logprobs: (B, T) log-probs under the sampling policy; None = on-policy (ratio 1).
        ref_logprobs: (B, T) log-probs under the reference model, for kl_estimator k1/k2/k3.
        ref_logits: (B, T, V) reference logits, for kl_estimator "full" (exact KL).
        is_weights: (B, T) or (B, 1) importance weights multiplying pg (e.g. vLLM's
            truncated IS); no gradient.
        temperature: > 0; the policy is softmax(logits / temperature).
        clip_low, clip_high: >= 0; the ratio is clipped to [1 - clip_low, 1 + clip_high].
        dual_clip: None or > 1; caps the loss of negative-advantage tokens at -A * dual_clip.
        kl_coef: >= 0; 0 reads no reference input and does no KL work.
        kl_estimator: "k1", "k2", "k3" or "full".
        entropy_coef: weight of the entropy bonus.
        loss_agg: "token-mean", "seq-mean-token-mean", "seq-mean-token-sum" or
            "seq-mean-token-sum-norm" (divided by B * norm_len, default T; any number > 0).
        ratio_level: "token" (PPO/GRPO) or "sequence" (GSPO).
        entropy_agg: None (SPEC: the entropy term is aggregated with the rest by loss_agg) or
            a loss_agg mode for the entropy term alone (TRL's bonus is always "token-mean").
        kl_ratio_weighted: multiply the KL term by the importance ratio, with its gradient
            (DeepSeek-V3.2's unbiased KL gradient; TRL's use_bias_correction_kl).
        inplace_grad: write the gradient over the logits buffer (saves a (B, T, V) buffer);
            the logits must not be needed afterwards, and must not be a leaf tensor.
        backend: "auto", "triton", "cuda" or "torch" (see rlops.token_logprobs_and_entropy).

    Returns:
        PolicyLossOutput.
    """
    check_options(temperature, clip_low, clip_high, dual_clip, kl_coef, kl_estimator, entropy_coef, loss_agg,
                  norm_len, ratio_level, inplace_grad, entropy_agg, kl_ratio_weighted)
    advantages, mask = _check_inputs(logits, tokens, advantages, mask, old_logprobs, ref_logprobs, ref_logits,
                                     is_weights)
    kl_used = resolve_kl(kl_coef, kl_estimator, ref_logprobs, ref_logits is not None, "ref_logits (B, T, V), the "
                         "reference model's logits")
    if inplace_grad and logits.requires_grad and logits.is_leaf:
        raise ValueError("inplace_grad=True writes the gradient over logits, which must be produced by an "
                         "operation (such as the lm_head), not a leaf tensor that keeps its own .grad")
    backend = resolve_backend(backend, logits, "policy_loss")
    ref_logprobs = ref_logprobs if kl_used in SAMPLED_KL else None
    ref_logits = ref_logits if kl_used == "full" else None

    if backend != "torch" and ratio_level == "token":
        from ..kernels.policy_loss import KL_KINDS, ROW

        weights = aggregation_weights(mask, loss_agg, norm_len)
        dual = math.inf if dual_clip is None else float(dual_clip)
        out = policy_loss_op(logits, tokens, weights, advantages, old_logprobs, ref_logprobs, ref_logits,
                             is_weights, entropy_weights(mask, entropy_coef, entropy_agg or loss_agg, norm_len),
                             temperature, clip_low, clip_high, dual, kl_coef, KL_KINDS[kl_used], kl_ratio_weighted,
                             inplace_grad, backend)
        loss = out[ROW["loss"]].sum()
        per_token = [out[ROW[name]].detach() for name in ("logp", "entropy", "kl", "ratio")]
        return PolicyLossOutput(loss, *per_token, mask=mask, advantages=advantages, clip_low=clip_low,
                                clip_high=clip_high, dual_clip=dual_clip)
    # On the kernel backends (GSPO) the vocabulary work is the fused statistics kernel.
    stats_fn = None if backend == "torch" else functools.partial(_fused_stats, mask=mask, inplace_grad=inplace_grad,
                                                                 backend=backend)
    return composed_loss(logits, tokens, advantages, mask, old_logprobs, ref_logprobs, ref_logits, is_weights,
                         stats_fn, temperature=temperature, clip_low=clip_low, clip_high=clip_high,
                         dual_clip=dual_clip, kl_coef=kl_coef, kl_estimator=kl_estimator, entropy_coef=entropy_coef,
                         loss_agg=loss_agg, norm_len=norm_len, ratio_level=ratio_level, entropy_agg=entropy_agg,
                         kl_ratio_weighted=kl_ratio_weighted)


def entropy_weights(mask: Tensor, entropy_coef: float, entropy_agg: str, norm_len: float | None) -> Tensor | None:
    """entropy_coef times each token's weight in the entropy term's aggregation; None without the term."""
    return None if entropy_coef == 0 else entropy_coef * aggregation_weights(mask, entropy_agg, norm_len)


def resolve_kl(kl_coef: float, kl_estimator: str, ref_logprobs: Tensor | None, has_ref_logits: bool,
               ref_logits_needed: str) -> str:
    """The estimator actually used ("none" when kl_coef is 0: no KL work, no reference read);
    raises if the reference input it needs is missing."""
    kl_used = kl_estimator if kl_coef > 0 else "none"
    if kl_used == "full" and not has_ref_logits:
        raise ValueError(f"kl_estimator='full' with kl_coef > 0 needs {ref_logits_needed}")
    if kl_used in SAMPLED_KL and ref_logprobs is None:
        raise ValueError(f"kl_estimator={kl_estimator!r} with kl_coef > 0 needs ref_logprobs (B, T), the sampled "
                         "tokens' log-probs under the reference model (the reference's logits are only read by "
                         "'full')")
    return kl_used


def composed_loss(logits: Tensor, tokens: Tensor, advantages: Tensor, mask: Tensor, old_logprobs: Tensor | None,
                  ref_logprobs: Tensor | None, ref_logits: Tensor | None, is_weights: Tensor | None,
                  stats_fn: Callable | None, **options: object) -> PolicyLossOutput:
    """The loss as the reference composes it on (B, T) vectors, its token statistics from stats_fn.

    `logits` and `ref_logits` are whatever stats_fn reads (hidden states for the fused-linear
    loss). The per-token inputs are zeroed where mask is 0 (the fused statistics do not read
    masked tokens), so no padding value, however non-finite, reaches a gradient.
    """
    def clean(x: Tensor | None) -> Tensor | None:
        return None if x is None else torch.where(mask, x.to(torch.float32), 0.0)

    out = reference.policy_loss(logits, tokens, clean(advantages), mask=mask, old_logprobs=clean(old_logprobs),
                                ref_logprobs=clean(ref_logprobs), ref_logits=ref_logits,
                                is_weights=clean(is_weights), stats_fn=stats_fn, **options)
    per_token = [torch.where(mask, v.detach().to(torch.float32), 0.0)
                 for v in (out.logprobs, out.entropy, out.kl, out.ratio)]
    return PolicyLossOutput(out.loss.to(torch.float32), *per_token, mask=mask, advantages=advantages,
                            clip_low=options["clip_low"], clip_high=options["clip_high"],
                            dual_clip=options["dual_clip"])


def _fused_stats(logits: Tensor, tokens: Tensor, temperature: float, ref_logits: Tensor | None, *,
                 mask: Tensor, inplace_grad: bool, backend: str) -> tuple[Tensor, Tensor, Tensor | None]:
    """The reference's stats_fn on the kernel backends: (logp, entropy, exact KL or None)."""
    stats = token_stats_op(logits, tokens, ref_logits, mask, temperature, inplace_grad, backend)
    return stats[0], stats[1], None if ref_logits is None else stats[2]


def _check_inputs(logits: Tensor, tokens: Tensor, advantages: Tensor, mask: Tensor | None,
                  old_logprobs: Tensor | None, ref_logprobs: Tensor | None, ref_logits: Tensor | None,
                  is_weights: Tensor | None) -> tuple[Tensor, Tensor]:
    """Checks the tensor arguments; returns advantages as (B, T) or (B, 1) and mask as bool (B, T)."""
    check_logits(logits)
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape (B, T, V), got {tuple(logits.shape)}")
    check_tokens(tokens, logits)
    if ref_logits is not None:
        check_logits(ref_logits, "ref_logits")
        check_float_tensor("ref_logits", ref_logits, logits, [tuple(logits.shape)],
                           f"logits' shape {tuple(logits.shape)}")
    return check_per_token_inputs(tokens, advantages, mask, old_logprobs, ref_logprobs, is_weights)


def check_per_token_inputs(tokens: Tensor, advantages: Tensor, mask: Tensor | None, old_logprobs: Tensor | None,
                           ref_logprobs: Tensor | None, is_weights: Tensor | None) -> tuple[Tensor, Tensor]:
    """Checks the (B, T) inputs against tokens (B, T), already checked; returns advantages as
    (B, T) or (B, 1) and mask as bool (B, T)."""
    per_token, per_row = tuple(tokens.shape), (tokens.shape[0], 1)
    token_shape = f"(B, T) = {per_token}"
    advantages = check_float_tensor("advantages", advantages, tokens, [per_token, per_row, per_row[:1]],
                                    f"{token_shape}, (B, 1) or (B,)", "tokens")
    for name, x in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        if x is not None:
            check_float_tensor(name, x, tokens, [per_token], token_shape, "tokens")
    if is_weights is not None:
        check_float_tensor("is_weights", is_weights, tokens, [per_token, per_row], f"{token_shape} or (B, 1)",
                           "tokens")
    mask = torch.ones(per_token, dtype=torch.bool, device=tokens.device) if mask is None \
        else check_mask(mask, per_token, tokens, like_name="tokens")
    return (advantages[:, None] if advantages.dim() == 1 else advantages), mask
