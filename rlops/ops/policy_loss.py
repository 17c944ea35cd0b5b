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
from .._validation import (
    check_float_tensor,
    check_logits,
    check_mask,
    check_shape,
    check_tensor,
    check_token_ids,
    check_token_range,
)
from ..constants import GRADS, N_POLICY_ROWS, ROW, SAMPLED_KL
from ..options import Epilogue, GlobalBatch, PolicyBatch, PolicyLossConfig, TokenInputs
from ..packing import Layout, check_cu_seqlens
from ..torch_backend import LossTerms, TokenStats
from ._backend import launchers, resolve_backend
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
    at small sizes each of these costs more host time than the launches. The backward scales the
    gradient rows by the scalar upstream gradient: bitwise what the custom op's path computes
    (the same sum, each gradient row times the same number)."""

    @staticmethod
    def forward(ctx, logits: Tensor, launch: _Launch) -> Tensor:
        out = launchers(launch.backend).policy_loss_fwd(logits, launch.tokens, launch.ref_logits, launch.inputs,
                                                        launch.epilogue)
        ctx.save_for_backward(logits, launch.tokens, out, launch.ref_logits)
        ctx.temperature, ctx.backend = launch.epilogue.temperature, launch.backend
        ctx.inplace_grad = launch.inplace_grad
        ctx.no_grads = (None,)  # the backward's gradient of `launch`
        launch.out = out
        return out[ROW["loss"]].sum()

    @staticmethod
    def backward(ctx, grad_loss: Tensor) -> tuple:
        saved = ctx.saved_tensors
        return grad_to_logits(ctx, saved[2][GRADS] * grad_loss, saved)


def policy_loss_op(logits: Tensor, tokens: Tensor, ref_logits: Tensor | None, inputs: TokenInputs,
                   config: PolicyLossConfig, backend: str) -> tuple[Tensor, Tensor]:
    """(loss, out): the summed loss and the float32 (N_POLICY_ROWS, B, T) per-token outputs, out not
    differentiable. Compiled code holds the custom op; eager code runs _EagerPolicyLoss."""
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

    @classmethod
    def of(cls, terms: LossTerms, batch: PolicyBatch, config: PolicyLossConfig, layout: Layout,
           shape: tuple[int, ...]) -> "PolicyLossOutput":
        """The output of a checked batch; a packed one's per-token tensors go back to the caller's tokens' shape."""
        advantages = batch.advantages
        if layout.seq_ids is not None:
            terms = LossTerms(terms.loss, *(v.view(shape) for v in terms[1:]))
            batch, advantages = batch._replace(mask=batch.mask.view(shape)), advantages.reshape(shape)
        return cls(*terms, mask=batch.mask, advantages=advantages, clip_low=config.clip_low,
                   clip_high=config.clip_high, dual_clip=config.dual_clip)

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
    cu_seqlens: Tensor | None = None,
    temperature: float = 1.0,
    objective: str = "clip",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    ratio_cap: float | None = None,
    sapo_tau_pos: float = 1.0,
    sapo_tau_neg: float = 1.05,
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
            tokens (any row strides, e.g. `logits[:, :-1]`).
        tokens: (B, T) integer ids in [0, V).
        advantages: (B, T) per token, or (B,) / (B, 1) per sequence (GRPO), float.
        mask: (B, T) bool or 0/1; 1 = the token counts. None = every token counts.
        old_logprobs: (B, T) log-probs under the sampling policy; None = on-policy (ratio 1).
        ref_logprobs: (B, T) log-probs under the reference model, for the sampled-token
            kl_estimators (all but "full").
        ref_logits: (B, T, V) reference logits, for kl_estimator "full" (exact KL).
        is_weights: (B, T) or (B, 1) importance weights multiplying pg (e.g. vLLM's
            truncated IS); no gradient.
        cu_seqlens: int32/int64 (S + 1,) boundaries of packed sequences (rlops.packing), or None.
            With it the batch is packed: logits (N, V) or (1, N, V), tokens and every per-token
            tensor (N,) or (1, N), advantages (N,) per token or (S,) per sequence (a (N,)
            tensor is read per token when S = N); each segment is a sequence for loss_agg,
            entropy_agg and the sequence-level ratio, exactly as each row of (B, T) is, and
            seq-mean-token-sum-norm needs norm_len. Outputs have tokens' shape.
        temperature: > 0; the policy is softmax(logits / temperature).
        clip_low, clip_high: >= 0; the ratio is clipped to [1 - clip_low, 1 + clip_high].
        objective: the policy-gradient term (docs/objectives.md): "clip" (PPO's clipped
            surrogate), "cispo" (-sg(clamp(r, 1 - clip_low, 1 + clip_high)) * A * logp: MiniMax-M1,
            TRL's and verl's cispo) or "sapo" (the soft gate -A * 4/tau * sigmoid(tau (r - 1)),
            tau = sapo_tau_pos where A > 0, else sapo_tau_neg: TRL's and verl's sapo).
        dual_clip: None or > 1; caps the loss of negative-advantage tokens at -A * dual_clip.
        ratio_cap: None or > 1; the unclipped term's ratio capped at it (two-sided clipping,
            TRL's delta). dual_clip and ratio_cap apply to objective "clip".
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
    config = PolicyLossConfig.from_call(locals())
    batch = PolicyBatch(tokens, advantages, mask, old_logprobs, ref_logprobs, is_weights, cu_seqlens)
    return run_policy_loss(logits, ref_logits, batch, config)


def run_policy_loss(logits: Tensor, ref_logits: Tensor | None, batch: PolicyBatch,
                    config: PolicyLossConfig) -> PolicyLossOutput:
    """`policy_loss` on a built config and batch (the entry of `PolicyLoss.forward` too)."""
    shape = getattr(batch.tokens, "shape", None)
    # Vocabulary-parallel ids are global: rlops.vocab_parallel checks them against the whole vocabulary.
    logits, ref_logits, batch, layout = check_batch(logits, ref_logits, batch, config.vocab_group is None)
    check_kl_inputs(config, batch.ref_logprobs, ref_logits is not None,
                    "ref_logits (B, T, V), the reference model's logits")
    layout = check_packed_options(config, layout)
    if config.inplace_grad and logits.requires_grad and logits.is_leaf:
        raise ValueError("inplace_grad=True writes the gradient over logits, which must be produced by an "
                         "operation (such as the lm_head), not a leaf tensor that keeps its own .grad")
    backend = resolve_backend(config.backend, logits, "policy_loss")
    ref_logits = ref_logits if config.kl_used == "full" else None
    inputs = TokenInputs.of(batch, layout, config)
    if config.vocab_group is not None:
        if config.inplace_grad:
            raise ValueError("inplace_grad is not supported with vocab_group")
        terms = vocab_parallel.policy_loss_terms(logits, ref_logits, batch.tokens, layout, inputs, config)
    elif backend == "torch":
        # The PyTorch backend reads every row: padding ids at masked tokens are replaced by 0 there.
        tokens = torch.where(batch.mask, batch.tokens, 0)
        stats = torch_backend.token_stats(logits, tokens, config.temperature, ref_logits)
        terms = torch_backend.policy_loss(stats, layout, inputs, config)
    elif config.ratio_level == "sequence":
        # The vocabulary work is the fused statistics kernel; the O(B*T) epilogue couples each row.
        out = token_stats_op(logits, batch.tokens, ref_logits, batch.mask, config.temperature,
                             config.inplace_grad, backend)
        stats = TokenStats(out[ROW["logp"]], out[ROW["entropy"]], None if ref_logits is None else out[ROW["kl"]])
        terms = torch_backend.policy_loss(stats, layout, inputs, config)
    else:
        loss, out = policy_loss_op(logits, batch.tokens, ref_logits, inputs, config, backend)
        terms = LossTerms(loss, out[_LOGP], out[_ENTROPY], out[_KL], out[_RATIO])
    return PolicyLossOutput.of(terms, batch, config, layout, shape)


# The rows of the per-token outputs that PolicyLossOutput returns.
_LOGP, _ENTROPY, _KL, _RATIO = ROW["logp"], ROW["entropy"], ROW["kl"], ROW["ratio"]


def check_kl_inputs(config: PolicyLossConfig, ref_logprobs: Tensor | None, has_ref_logits: bool,
                    ref_logits_needed: str) -> None:
    """Raises if the reference input that config's KL estimator needs is missing."""
    if config.kl_used == "full" and not has_ref_logits:
        raise ValueError(f"kl_estimator='full' with kl_coef > 0 needs {ref_logits_needed}")
    if config.kl_used in SAMPLED_KL and ref_logprobs is None:
        raise ValueError(f"kl_estimator={config.kl_estimator!r} with kl_coef > 0 needs ref_logprobs (B, T), the "
                         "sampled tokens' log-probs under the reference model (the reference's logits are only read "
                         "by 'full')")


def check_packed_options(config: PolicyLossConfig, layout: Layout) -> Layout:
    """Raises for the options a packed batch cannot default (seq-mean-token-sum-norm's length T);
    returns the layout, its sequences summed over global_batch.seq_group when that is set."""
    norm = "seq-mean-token-sum-norm"
    if layout.seq_ids is not None and config.norm_len is None and norm in (config.loss_agg, config.entropy_agg_used):
        raise ValueError(f"loss_agg or entropy_agg {norm!r} on a packed batch (cu_seqlens) needs norm_len, the "
                         "constant length each sequence's token sum is divided by (the padded layout's default, T, "
                         "does not exist there)")
    split = config.global_batch
    return layout if split is None or split.seq_group is None else layout._replace(seq_group=split.seq_group)


def packed_as_row(rows: Tensor, batch: PolicyBatch, rows_name: str) -> tuple[Tensor, PolicyBatch, Layout]:
    """A packed batch (batch.cu_seqlens given) as one row: rows (N, D) or (1, N, D) as (1, N, D), every
    per-token tensor (N,) or (1, N) as (1, N), per-sequence advantages (S,) or (S, 1) spread to their
    tokens, cu_seqlens checked; returns (rows, batch, layout), the layout's mask still all ones."""
    if rows.dim() == 2:
        rows = rows[None]
    if rows.dim() != 3 or rows.shape[0] != 1:
        d = "V" if rows_name.endswith("logits") else "H"
        raise ValueError(f"with cu_seqlens, {rows_name} must have shape (N, {d}) or (1, N, {d}) (packed "
                         f"sequences), got {tuple(rows.shape)}")
    n = rows.shape[1]
    cu = check_cu_seqlens(batch.cu_seqlens, n, rows, rows_name)
    layout = Layout.of(torch.ones((1, n), dtype=torch.bool, device=rows.device), cu)
    per_token = [(n,), (1, n)]
    described = f"(N,) = ({n},) or (1, N)"

    def as_row(name: str, x: Tensor | None) -> Tensor | None:
        if x is None:
            return None
        x = check_tensor(name, x)
        if name == "advantages" and tuple(x.shape) in ([(layout.n_seqs,), (layout.n_seqs, 1)]) \
                and tuple(x.shape) not in per_token:
            return layout.per_token(x.reshape(-1))
        check_shape(name, x, per_token, f"{described} with cu_seqlens" + (
            f", or (S,) = ({layout.n_seqs},) per sequence" if name == "advantages" else ""))
        return x.view(1, n)

    fields = {name: as_row(name, x) for name, x in batch._asdict().items() if name != "cu_seqlens"}
    return rows, PolicyBatch(**fields, cu_seqlens=cu), layout


def check_batch(logits: Tensor, ref_logits: Tensor | None, batch: PolicyBatch,
                check_ids: bool = True) -> tuple[Tensor, Tensor | None, PolicyBatch, Layout]:
    """Checks the tensor arguments; returns (logits (B, T, V), ref_logits, batch, layout), the batch with
    advantages (B, T) or (B, 1) and mask bool (B, T). A packed batch (cu_seqlens) comes back as one row:
    logits (1, N, V), per-token tensors (1, N), its layout holding the sequences.
    Token ids are checked where the mask is 1 only: any id (such as -100) may pad a masked token."""
    vocab = check_logits(logits)
    layout = None
    if batch.cu_seqlens is not None:
        logits, batch, layout = packed_as_row(logits, batch, "logits")
        if ref_logits is not None and ref_logits.dim() == 2:
            ref_logits = ref_logits[None]
    shape = logits.shape
    if len(shape) != 3:
        raise ValueError(f"logits must have shape (B, T, V), got {tuple(shape)}")
    check_token_ids(batch.tokens, shape[:-1], None, logits)
    if ref_logits is not None:
        check_logits(ref_logits, "ref_logits")
        check_float_tensor("ref_logits", ref_logits, logits, [tuple(logits.shape)],
                           f"logits' shape {tuple(logits.shape)}")
    batch = check_per_token_inputs(batch)
    if check_ids:
        check_token_range(batch.tokens, vocab, counted=batch.mask)
    # Padded: each row of the (B, T) mask is a sequence (Layout.of, without its call).
    layout = Layout(batch.mask, None, shape[0]) if layout is None else layout._replace(mask=batch.mask)
    return logits, ref_logits, batch, layout


def _plain(x: object, shapes: tuple[tuple[int, ...], ...], device: torch.device) -> bool:
    """Whether x is a floating tensor of one of `shapes` on `device` (what check_float_tensor accepts)."""
    return isinstance(x, Tensor) and x.dtype.is_floating_point and x.shape in shapes and x.device == device


def check_per_token_inputs(batch: PolicyBatch) -> PolicyBatch:
    """Checks the (B, T) inputs against batch.tokens (B, T), already checked; returns the batch with
    advantages as (B, T) or (B, 1) and mask as bool (B, T)."""
    tokens = batch.tokens
    per_token, per_row, device = tokens.shape, (tokens.shape[0], 1), tokens.device
    # The usual call passes every check at once: a bool mask and float tensors of the accepted
    # shapes, on the tokens' device. Anything else takes the checks below, which convert a 0/1
    # mask of another dtype or raise, naming the argument (their messages cost host time to format).
    adv, mask = batch.advantages, batch.mask
    if (_plain(adv, (per_token, per_row, per_row[:1]), device)
            and (batch.old_logprobs is None or _plain(batch.old_logprobs, (per_token,), device))
            and (batch.ref_logprobs is None or _plain(batch.ref_logprobs, (per_token,), device))
            and (batch.is_weights is None or _plain(batch.is_weights, (per_token, per_row), device))
            and isinstance(mask, Tensor) and mask.dtype == torch.bool and mask.shape == per_token
            and mask.device == device):
        if adv.dim() != 1:
            return batch
        return PolicyBatch(batch.tokens, adv.unsqueeze(1), *batch[2:])  # batch._replace, without its Python
    return _checked_per_token_inputs(batch)


def _checked_per_token_inputs(batch: PolicyBatch) -> PolicyBatch:
    """check_per_token_inputs, every input checked on its own (its error naming it)."""
    tokens = batch.tokens
    per_token, per_row = tuple(tokens.shape), (tokens.shape[0], 1)
    token_shape = f"(B, T) = {per_token}"
    advantages = check_float_tensor("advantages", batch.advantages, tokens, [per_token, per_row, per_row[:1]],
                                    f"{token_shape}, (B, 1) or (B,)", "tokens")
    for name in ("old_logprobs", "ref_logprobs"):
        if getattr(batch, name) is not None:
            check_float_tensor(name, getattr(batch, name), tokens, [per_token], token_shape, "tokens")
    if batch.is_weights is not None:
        check_float_tensor("is_weights", batch.is_weights, tokens, [per_token, per_row], f"{token_shape} or (B, 1)",
                           "tokens")
    mask = torch.ones(per_token, dtype=torch.bool, device=tokens.device) if batch.mask is None \
        else check_mask(batch.mask, per_token, tokens, like_name="tokens")
    return batch._replace(advantages=advantages[:, None] if advantages.dim() == 1 else advantages, mask=mask)
