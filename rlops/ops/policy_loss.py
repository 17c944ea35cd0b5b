"""The fused PPO/GRPO policy loss (SPEC.md sections 2-4): validation, dispatch, autograd.

Data path: `policy_loss` builds the options (`PolicyLossConfig`) and the batch;
`run_policy_loss` checks the tensors and picks the backend. Token-level ratios then run
entirely in the fused kernel (`policy_loss_op` -> rlops.kernels.policy_loss or its CUDA
twin): one pass over the vocabulary gives each token's loss and the derivatives its gradient
needs, and the backward is one more pass (rlops.ops.token_stats.grad_to_logits). The sequence-level ratio of GSPO
couples the tokens of a row, so that path takes the fused per-token statistics (the
vocabulary work) and composes the O(B*T) epilogue with rlops.torch_backend.policy_loss, which
is also the whole of backend="torch".
"""

# No `from __future__ import annotations`: torch.library.custom_op reads real annotations.

import functools
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import torch_backend, vocab_parallel
from ..constants import GRADS, N_POLICY_ROWS, ROW
from ..options import Epilogue, GlobalBatch, PolicyBatch, PolicyLossConfig, TokenInputs
from ..packing import Layout
from ..rollout_correction import RolloutCorrection, RolloutCorrectionOutput
from ..torch_backend import LossTerms, TokenStats
from ._backend import launchers, resolve_backend
from .policy_batch import (
    apply_rollout_correction,
    check_batch,
    check_kl_inputs,
    check_packed_options,
    one_position_more,
)
from .token_stats import grad_to_logits, named_inputs, save_for_grad, token_stats_op


def _policy_loss(logits: Tensor, tokens: Tensor, ref_logits: Tensor | None, token_inputs: list[Tensor | None],
                 epilogue: list[float], inplace_grad: bool, backend: str) -> Tensor:
    """float32 (N_POLICY_ROWS, B, T) per-token outputs of the fused kernel of `backend` ("triton" or
    "cuda"), in the row order of rlops.constants.ROW; differentiable through the "loss" row.

    token_inputs is a TokenInputs and epilogue an Epilogue.pack(), as lists for the op schema.
    """
    return launchers(backend).policy_loss_fwd(logits, tokens, ref_logits, TokenInputs(*token_inputs),
                                              Epilogue.unpack(epilogue))


_policy_loss_op = torch.library.custom_op("rlops::policy_loss", mutates_args=())(_policy_loss)


@_policy_loss_op.register_fake
def _(logits, tokens, ref_logits, token_inputs, epilogue, inplace_grad, backend) -> Tensor:
    return logits.new_empty((N_POLICY_ROWS, *tokens.shape), dtype=torch.float32)


def _setup_context(ctx, inputs, output) -> None:
    named = named_inputs(_policy_loss, inputs)
    save_for_grad(ctx, named, output, Epilogue.unpack(named["epilogue"]).temperature)


def _backward(ctx, grad_out: Tensor):
    out = ctx.saved_tensors[2]
    # The g_logp, g_entropy, g_kl rows hold d loss_t / d (logp, entropy, kl); the chain rule
    # scales them by each token's upstream gradient of its loss.
    return grad_to_logits(ctx, out[GRADS] * grad_out[ROW["loss"]])


_policy_loss_op.register_autograd(_backward, setup_context=_setup_context)


class _Launch:
    """The arguments of one eager launch besides the logits, and the per-token outputs it produced."""

    __slots__ = ("backend", "epilogue", "inplace_grad", "inputs", "out", "ref_logits", "tokens")

    def __init__(self, tokens: Tensor, ref_logits: Tensor | None, inputs: TokenInputs, epilogue: Epilogue,
                 inplace_grad: bool, backend: str) -> None:
        self.tokens, self.ref_logits, self.inputs, self.epilogue = tokens, ref_logits, inputs, epilogue
        self.inplace_grad, self.backend = inplace_grad, backend
        self.out: Tensor | None = None


class _EagerPolicyLoss(torch.autograd.Function):
    """The eager path of the token-level loss: the launchers under a plain autograd.Function (the
    custom op's dispatch is for torch.compile graphs only; rlops.ops._fast says why).

    Its one output is the summed loss, and its one input besides the logits the rest of the call
    (_Launch), which also carries the per-token outputs back (not differentiable). Autograd then
    holds one node, not three (this, a select and a sum), that node has no second output whose
    zero gradient would be materialised, and no edge per non-differentiable tensor argument:
    at small sizes each of these costs more host time than the launches. The backward kernel
    scales the gradient rows by the scalar upstream gradient as it reads them (no (N_GRADS, B, T)
    product on the host): the custom op's path takes that product on the host, so the two agree
    to rounding (the kernel may fuse the multiply into the next add)."""

    @staticmethod
    def forward(ctx, logits: Tensor, launch: _Launch) -> Tensor:
        out = launchers(launch.backend).policy_loss_fwd(logits, launch.tokens, launch.ref_logits, launch.inputs,
                                                        launch.epilogue)
        ctx.save_for_backward(logits, launch.tokens, out, launch.ref_logits)
        ctx.temperature, ctx.backend = launch.epilogue.temperature, launch.backend
        ctx.inplace_grad, ctx.eager = launch.inplace_grad, True  # eager: grad_to_logits calls the launcher
        ctx.no_grads = (None,)  # the backward's gradient of `launch`
        launch.out = out
        return out[ROW["loss"]].sum()

    @staticmethod
    def backward(ctx, grad_loss: Tensor) -> tuple:
        saved = ctx.saved_tensors
        return grad_to_logits(ctx, saved[2][GRADS], saved, grad_scale=grad_loss)


def policy_loss_op(logits: Tensor, tokens: Tensor, ref_logits: Tensor | None, inputs: TokenInputs,
                   config: PolicyLossConfig, backend: str) -> tuple[Tensor, Tensor]:
    """(loss, out): the summed loss and the float32 (N_POLICY_ROWS, B, T) per-token outputs, out not
    differentiable (logits (B, T, V), or (B, T + 1, V): rlops._layout.positions_of). Compiled code
    holds the custom op; eager code runs _EagerPolicyLoss."""
    epilogue = Epilogue.of(config)
    if torch.compiler.is_compiling():
        out = _policy_loss_op(logits, tokens, ref_logits, list(inputs), epilogue.pack(), config.inplace_grad, backend)
        return out[ROW["loss"]].sum(), out.detach()
    launch = _Launch(tokens, ref_logits, inputs, epilogue, config.inplace_grad, backend)
    return _EagerPolicyLoss.apply(logits, launch), launch.out


@dataclass
class PolicyLossOutput:
    """What `policy_loss` returns.

    loss: scalar float32, differentiable. logprobs, entropy, kl, ratio: float32 (B, T),
    detached, 0 where mask is 0 (those tokens are not computed). kl is 0 when kl_coef is 0.
    mask: bool (B, T), the tokens counted (with rollout_correction, its rejected ones left out).
    rollout: the rollout correction's weights, mask and metrics (rlops.RolloutCorrectionOutput), or None.
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
    rollout: RolloutCorrectionOutput | None = field(repr=False, default=None)

    @classmethod
    def of(cls, terms: LossTerms, batch: PolicyBatch, config: PolicyLossConfig, layout: Layout,
           shape: tuple[int, ...], rollout: RolloutCorrectionOutput | None = None) -> "PolicyLossOutput":
        """The output of a checked batch; a packed one's per-token tensors go back to the caller's tokens' shape."""
        advantages = batch.advantages
        if layout.seq_ids is not None:
            terms = LossTerms(terms.loss, *(v.view(shape) for v in terms[1:]))
            batch, advantages = batch._replace(mask=batch.mask.view(shape)), advantages.reshape(shape)
        return cls(*terms, mask=batch.mask, advantages=advantages, clip_low=config.clip_low,
                   clip_high=config.clip_high, dual_clip=config.dual_clip, rollout=rollout)

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
    inplace_grad: bool = False,
    backend: str = "auto",
    vocab_group: object = None,
    vocab_start: int | None = None,
    global_batch: GlobalBatch | None = None,
) -> PolicyLossOutput:
    """The clipped PPO/GRPO policy loss with optional KL penalty and entropy bonus (SPEC.md 2-4).

    Per token: l = pg + kl_coef * kl - entropy_coef * H, aggregated over the masked tokens.

    Args:
        logits: (B, T, V) float16/bfloat16/float32/float64, the policy's logits for the sampled
            tokens (any row strides, e.g. `logits[:, :-1]`); or (B, T + 1, V), as a causal LM
            returns them from the prompt's last position (`logits_to_keep=T + 1`, Liger's GRPO
            convention): the first T positions predict the tokens, the last predicts none and
            gets gradient 0. Prefer this to slicing: the slice's backward copies the gradient
            into a zeroed (B, T + 1, V) buffer, which the Triton and CUDA backends' backward
            kernels write directly.
        tokens: (B, T) integer ids in [0, V).
        advantages: (B, T) per token, or (B,) / (B, 1) per sequence (GRPO), float.
        mask: (B, T) bool or 0/1; 1 = the token counts. None = every token counts.
        old_logprobs: (B, T) log-probs under the sampling policy; None = on-policy (ratio 1).
        ref_logprobs: (B, T) log-probs under the reference model, for the sampled-token
            kl_estimators (all but "full").
        ref_logits: (B, T, V) reference logits, for kl_estimator "full" (exact KL); (B, T + 1, V)
            like logits, when they are.
        is_weights: (B, T) or (B, 1) importance weights multiplying pg (e.g. vLLM's
            truncated IS); no gradient.
        rollout_logprobs: (B, T) the rollout engine's (e.g. vLLM's) log-probs of the sampled
            tokens, for rollout_correction and the off-policy mask (default there: old_logprobs).
        cu_seqlens: int32/int64 (S + 1,) boundaries of packed sequences (rlops.packing), or None.
            With it the batch is packed: logits (N, V) or (1, N, V), tokens and every per-token
            tensor (N,) or (1, N), advantages (N,) per token or (S,) per sequence (a (N,)
            tensor is read per token when S = N); each segment is a sequence for loss_agg,
            entropy_agg and the sequence-level ratio, exactly as each row of (B, T) is, and
            seq-mean-token-sum-norm needs norm_len. Outputs have tokens' shape.
        temperature: > 0; the policy is softmax(logits / temperature).
        clip_low, clip_high: >= 0; the ratio is clipped to [1 - clip_low, 1 + clip_high].
        objective: the policy-gradient term (docs/objectives.md has each formula and source):
            "clip" (PPO's clipped surrogate), "cispo" (-sg(clamp(r, 1 - clip_low, 1 + clip_high))
            * A * logp), "sapo" (the soft gate -A * 4/tau * sigmoid(tau (r - 1)), tau =
            sapo_tau_pos where A > 0, else sapo_tau_neg), "reinforce" (-A * logp: verl's gpg),
            "dro" (-(A * logp - dro_beta / 2 * (logp - old)^2)), "dppo_tv" / "dppo_kl" (-A *
            sg(min(r, ratio_cap)) * logp where the token's probability moved less than clip_high
            (A > 0) / clip_low (A <= 0), by total variation / binary KL); and the sequence-coupled
            "gmpo" (the geometric mean of each sequence's sign-clipped token ratios times its
            mean advantage, averaged over sequences: verl's geo_mean) and "vespo" (-phi(w) * A *
            logp, phi the gamma weight of the sequence ratio w with vespo_k_pos/neg and
            vespo_lambda_pos/neg: TRL's vespo); the batch-coupled "clip_cov" (the clipped
            surrogate with max(int(cov_ratio * tokens), 1) tokens drawn at random among those
            whose covariance of A and logp is in (cov_low, cov_high) given no loss) and
            "kl_cov" (-A r plus cov_kl_coef * |log r| on that many tokens of largest covariance):
            verl's clip_cov and kl_cov.
        dual_clip: None or > 1; caps the loss of negative-advantage tokens at -A * dual_clip.
        ratio_cap: None or > 1; the unclipped term's ratio capped at it (two-sided clipping,
            TRL's delta; DPPO's truncation). dual_clip applies to objective "clip", ratio_cap to
            "clip", "dppo_tv" and "dppo_kl".
        dro_beta: > 0, DRO's penalty weight (objective "dro" needs it).
        off_policy_mask: None or >= 0: DeepSeek-V3.2's off-policy sequence mask (TRL's
            off_policy_mask_threshold): a sequence with A < 0 whose mean of (sampling logp -
            logp) exceeds it gets no policy-gradient term (the sampling log-probs:
            old_logprobs; on policy nothing is masked).
        top_entropy_quantile: in (0, 1]; below 1 only the tokens whose entropy is at or above
            the batch's (1 - q) quantile get the policy-gradient and entropy terms (TRL's
            top_entropy_quantile; the entropy bonus then averages over those tokens).
        rollout_correction: None or an rlops.RolloutCorrection (docs/rollout_correction.md):
            importance weights between the trainer (old_logprobs) and the rollout engine
            (rollout_logprobs), token- or sequence-level, truncated or masked, and rejection of
            tokens or sequences (TRL's vllm_importance_sampling_*, verl's rollout_correction).
            The weights multiply pg as is_weights would (so not with is_weights); rejected
            tokens leave the mask and every count. Metrics: output.rollout.metrics.
        kl_coef: >= 0; 0 reads no reference input and does no KL work.
        kl_estimator: "k1", "k2", "k3", "abs" (|logp - ref_logp|), their straight-through forms
            "k1+", "k2+" (= k2), "k3+", "abs+" (the value of the base, the gradient of k2; verl's
            "+"), or "full" (the exact KL over the vocabulary, from ref_logits).
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
        vocab_group, vocab_start: the vocabulary split over the ranks of a process group
            (rlops.vocab_parallel, as rlops.token_logprobs_and_entropy): logits and ref_logits are
            this rank's shard (B, T, V_shard), tokens global ids. One all_gather of 8 floats per
            token, then the PyTorch backend's O(B*T) epilogue; every rank gets the same loss.
            Backends auto/triton/torch; not with inplace_grad.
        global_batch: rlops.GlobalBatch, when the batch's sequences (data parallel) or the tokens
            of each sequence (context parallel) are split over ranks: the loss is then this
            rank's share of the whole batch's (the ranks' losses add up to it), every
            aggregation divided by the whole batch's counts (given, or one all_reduce) and
            per-sequence sums taken over the ranks holding the sequence. Per-token outputs and
            metrics stay this rank's.

    The options (temperature to backend) are those of `rlops.PolicyLossConfig`.

    Returns:
        PolicyLossOutput.
    """
    # Dynamo before PyTorch 2.13 cannot trace locals(): under torch.compile the options are named once
    # more (tests/test_architecture.py checks that every one is, by its own name).
    options = locals() if not torch.compiler.is_compiling() else dict(
        temperature=temperature, objective=objective, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
        ratio_cap=ratio_cap, sapo_tau_pos=sapo_tau_pos, sapo_tau_neg=sapo_tau_neg, dro_beta=dro_beta,
        vespo_k_pos=vespo_k_pos, vespo_lambda_pos=vespo_lambda_pos, vespo_k_neg=vespo_k_neg,
        vespo_lambda_neg=vespo_lambda_neg, cov_ratio=cov_ratio, cov_low=cov_low, cov_high=cov_high,
        cov_kl_coef=cov_kl_coef, off_policy_mask=off_policy_mask, top_entropy_quantile=top_entropy_quantile,
        rollout_correction=rollout_correction, kl_coef=kl_coef, kl_estimator=kl_estimator, entropy_coef=entropy_coef,
        loss_agg=loss_agg, norm_len=norm_len, ratio_level=ratio_level, entropy_agg=entropy_agg,
        kl_ratio_weighted=kl_ratio_weighted, inplace_grad=inplace_grad, backend=backend, vocab_group=vocab_group,
        vocab_start=vocab_start, global_batch=global_batch)
    config = PolicyLossConfig.from_call(options)
    batch = PolicyBatch(tokens, advantages, mask, old_logprobs, ref_logprobs, is_weights, cu_seqlens, rollout_logprobs)
    return run_policy_loss(logits, ref_logits, batch, config)


def run_policy_loss(logits: Tensor, ref_logits: Tensor | None, batch: PolicyBatch,
                    config: PolicyLossConfig) -> PolicyLossOutput:
    """`policy_loss` on a built config and batch (the entry of `PolicyLoss.forward` too)."""
    shape = getattr(batch.tokens, "shape", None)
    shifted = one_position_more(logits, batch)
    # Vocabulary-parallel ids are global: rlops.vocab_parallel checks them against the whole vocabulary.
    logits, ref_logits, batch, layout = check_batch(logits, ref_logits, batch, config.vocab_group is None, shifted)
    check_kl_inputs(config, batch.ref_logprobs, ref_logits is not None,
                    "ref_logits (B, T, V), the reference model's logits")
    layout = check_packed_options(config, layout)
    if config.inplace_grad and logits.requires_grad and logits.is_leaf:
        raise ValueError("inplace_grad=True writes the gradient over logits, which must be produced by an "
                         "operation (such as the lm_head), not a leaf tensor that keeps its own .grad")
    backend = resolve_backend(config.backend, logits, "policy_loss")
    ref_logits = ref_logits if config.kl_used == "full" else None
    batch, layout, rollout = apply_rollout_correction(batch, layout, config)
    inputs = TokenInputs.of(batch, layout, config)
    if shifted and (config.vocab_group is not None or backend == "torch"):
        logits = logits[:, :-1]  # the fused kernels' launchers read the first T positions of (B, T + 1, V)
    if config.vocab_group is not None:
        if config.inplace_grad:
            raise ValueError("inplace_grad is not supported with vocab_group")
        stats = vocab_parallel.policy_stats(logits, ref_logits, batch.tokens, layout, config)
    elif backend == "torch":
        # The PyTorch backend reads every row: padding ids at masked tokens are replaced by 0 there.
        tokens = torch.where(batch.mask, batch.tokens, 0)
        stats = torch_backend.token_stats(logits, tokens, config.temperature, ref_logits)
    elif config.coupled:
        # The vocabulary work is the fused statistics kernel; the O(B*T) epilogue couples the tokens.
        out = token_stats_op(logits, batch.tokens, ref_logits, batch.mask, config.temperature,
                             config.inplace_grad, backend)
        stats = TokenStats(out[ROW["logp"]], out[ROW["entropy"]], None if ref_logits is None else out[ROW["kl"]])
    else:
        loss, out = policy_loss_op(logits, batch.tokens, ref_logits, inputs, config, backend)
        terms = LossTerms(loss, out[_LOGP], out[_ENTROPY], out[_KL], out[_RATIO])
        return PolicyLossOutput.of(terms, batch, config, layout, shape, rollout)
    terms = torch_backend.policy_loss(stats, layout, inputs, config, batch.rollout_logprobs)
    return PolicyLossOutput.of(terms, batch, config, layout, shape, rollout)


# The rows of the per-token outputs that PolicyLossOutput returns.
_LOGP, _ENTROPY, _KL, _RATIO = ROW["logp"], ROW["entropy"], ROW["kl"], ROW["ratio"]
