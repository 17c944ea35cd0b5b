"""The one options object of the policy loss, and what the kernels receive from it.

`PolicyLossConfig` holds every option of `rlops.policy_loss` (and of `linear_policy_loss`
and the `PolicyLoss` module), validated once when it is built. Below it nothing re-lists the
options: the kernels' scalar arguments and switches come from `Epilogue.of(config)`, the
per-token tensors, with each token's aggregation weight, travel as one
`TokenInputs.of(batch, config)`, and the PyTorch backend reads the config itself. Adding an
option means a field here, its use in the epilogue (Triton, CUDA, PyTorch backend) and the
docs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from ._validation import check_choice, check_float, check_positive_float
from .constants import COUPLED_OBJECTIVES, KL_KINDS, OBJECTIVES, SAMPLED_KL
from .packing import Layout
from .rollout_correction import RolloutCorrection

LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3", "full", "abs", "k1+", "k2+", "k3+", "abs+")
RATIO_LEVELS = ("token", "sequence")
BACKENDS = ("auto", "triton", "cuda", "torch")


@dataclass(frozen=True)
class GlobalBatch:
    """The whole batch, when one step's tokens are split over ranks: the `global_batch` option.

    With it, the loss of each rank is its share of the whole batch's loss (the ranks' losses add
    up to the loss of one process holding the whole batch, and so do their gradients): every
    loss_agg and entropy_agg divides by the whole batch's counts, and per-sequence sums (the
    sequence-level ratio, seq-mean-token-mean's token counts) cover every rank's part of a
    sequence. DDP and FSDP average gradients over ranks: multiply the loss by the data-parallel
    world size to get the sum (as verl's dp_size does).

    group: the process group of every rank holding part of the batch (data and context parallel;
        seq_group's ranks included). The counts not given below are summed over it by one
        all_reduce of three float64 per call. Default: seq_group.
    seq_group: the ranks among which each sequence is split (context parallel: every rank of it
        holds the same sequences, in the same order, each a different part of their tokens, as
        padded (B, T_r) rows or cu_seqlens segments, possibly empty). Per-sequence sums are
        all-reduced over it (differentiable: each rank's tokens get their whole gradient).
        seq-mean-token-sum-norm then needs norm_len (no rank knows the whole T).
    tokens: the whole batch's counted (mask 1) tokens, for token-mean, given instead of summed
        (verl's batch_num_tokens).
    seqs: the whole batch's number of sequences for seq-mean-token-sum(-norm), or of sequences
        with a counted token for seq-mean-token-mean, given instead of summed (verl's
        global_batch_size).
    """

    group: object = None
    seq_group: object = None
    tokens: float | None = None
    seqs: float | None = None

    def __post_init__(self) -> None:
        for name in ("group", "seq_group"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, dist.ProcessGroup):
                raise TypeError(f"GlobalBatch.{name} must be a torch.distributed ProcessGroup or None, got "
                                f"{type(value).__name__}")
        for name in ("tokens", "seqs"):
            if getattr(self, name) is not None:
                check_float(f"GlobalBatch.{name}", getattr(self, name), ge=0.0)
        if self.count_group is None and (self.tokens is None or self.seqs is None):
            raise ValueError("GlobalBatch needs group or seq_group (process groups to sum the counts over), or "
                             "both counts tokens and seqs")

    @property
    def count_group(self) -> object:
        """The group the batch's counts are summed over."""
        return self.seq_group if self.group is None else self.group


@dataclass(frozen=True)
class PolicyLossConfig:
    """Every option of `rlops.policy_loss` (see its docstring), checked when built.

    The class methods give the published settings of common algorithms; override any field
    with `dataclasses.replace` or keyword arguments to `PolicyLoss`.
    """

    temperature: float = 1.0
    objective: str = "clip"
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    ratio_cap: float | None = None
    sapo_tau_pos: float = 1.0
    sapo_tau_neg: float = 1.05
    dro_beta: float | None = None
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    cov_ratio: float = 2e-4  # Clip-Cov / KL-Cov: the share of counted tokens selected
    cov_low: float = 1.0  # Clip-Cov: the covariance range of its candidates
    cov_high: float = 5.0
    cov_kl_coef: float = 1.0  # KL-Cov: the weight of |log r| on the selected tokens
    off_policy_mask: float | None = None
    top_entropy_quantile: float = 1.0
    rollout_correction: RolloutCorrection | None = None  # weights and rejection against rollout_logprobs
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    loss_agg: str = "token-mean"
    norm_len: float | None = None
    ratio_level: str = "token"
    entropy_agg: str | None = None
    kl_ratio_weighted: bool = False
    inplace_grad: bool = False
    backend: str = "auto"
    vocab_group: object = None  # a torch.distributed ProcessGroup: the vocabulary split over its ranks
    vocab_start: int | None = None
    global_batch: GlobalBatch | None = None  # the whole batch when it is split over ranks

    def __post_init__(self) -> None:
        check_positive_float("temperature", self.temperature)
        check_float("clip_low", self.clip_low, ge=0.0)
        check_float("clip_high", self.clip_high, ge=0.0)
        check_choice("objective", self.objective, (*OBJECTIVES, *COUPLED_OBJECTIVES))
        self._check_objective_options()
        check_float("kl_coef", self.kl_coef, ge=0.0)
        check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        if self.kl_estimator == "k2+":  # k2's gradient is its own: verl's k2+ is k2
            object.__setattr__(self, "kl_estimator", "k2")
        check_float("entropy_coef", self.entropy_coef)
        check_choice("loss_agg", self.loss_agg, LOSS_AGGS)
        check_choice("ratio_level", self.ratio_level, RATIO_LEVELS)
        if self.entropy_agg is not None:
            check_choice("entropy_agg", self.entropy_agg, LOSS_AGGS)
        if self.norm_len is not None:
            check_float("norm_len", self.norm_len, gt=0.0)
        for name in ("inplace_grad", "kl_ratio_weighted"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        check_choice("backend", self.backend, BACKENDS)
        if self.vocab_start is not None and self.vocab_group is None:
            raise ValueError("vocab_start (this rank's first global id) needs vocab_group, the process group "
                             "over which the vocabulary is split")
        if self.vocab_group is not None and self.backend == "cuda":
            raise ValueError("vocab_group needs backend 'auto', 'triton' or 'torch': the CUDA twins have no "
                             "row-state kernel")
        self._check_global_batch()

    def _check_objective_options(self) -> None:
        applies = {"dual_clip": ("clip",), "ratio_cap": ("clip", "dppo_tv", "dppo_kl")}
        for name, objectives in applies.items():
            if getattr(self, name) is not None:
                check_float(name, getattr(self, name), gt=1.0)
                if self.objective not in objectives:
                    raise ValueError(f"{name} applies to objective {' or '.join(map(repr, objectives))}, not "
                                     f"{self.objective!r}")
        for name in ("sapo_tau_pos", "sapo_tau_neg", "vespo_lambda_pos", "vespo_lambda_neg"):
            check_positive_float(name, getattr(self, name))
        check_float("cov_ratio", self.cov_ratio, gt=0.0, le=1.0)
        check_float("cov_kl_coef", self.cov_kl_coef, ge=0.0)
        if check_float("cov_low", self.cov_low) >= check_float("cov_high", self.cov_high):
            raise ValueError(f"cov_low must be < cov_high, got {self.cov_low} >= {self.cov_high}")
        check_float("vespo_k_pos", self.vespo_k_pos, ge=0.0)
        check_float("vespo_k_neg", self.vespo_k_neg, ge=0.0)
        if self.objective == "dro" and self.dro_beta is None:
            raise ValueError("objective='dro' needs dro_beta > 0, the weight of its quadratic log-ratio penalty")
        if self.dro_beta is not None:
            check_positive_float("dro_beta", self.dro_beta)
            if self.objective != "dro":
                raise ValueError(f"dro_beta applies to objective='dro', not {self.objective!r}")
        if self.off_policy_mask is not None:
            check_float("off_policy_mask", self.off_policy_mask, ge=0.0)
        check_float("top_entropy_quantile", self.top_entropy_quantile, gt=0.0, le=1.0)
        if self.rollout_correction is not None and not isinstance(self.rollout_correction, RolloutCorrection):
            raise TypeError(f"rollout_correction must be an rlops.RolloutCorrection or None, got "
                            f"{type(self.rollout_correction).__name__}")

    @property
    def coupled(self) -> bool:
        """Whether the loss couples tokens beyond their own statistics (a sequence-level ratio or
        objective, the off-policy sequence mask, the batch's entropy quantile): it then runs as the
        O(B*T) epilogue after the fused per-token statistics, not inside the fused kernel."""
        return (self.ratio_level == "sequence" or self.objective in COUPLED_OBJECTIVES
                or self.off_policy_mask is not None or self.top_entropy_quantile < 1.0)

    def _check_global_batch(self) -> None:
        split = self.global_batch
        if split is None:
            return
        if not isinstance(split, GlobalBatch):
            raise TypeError(f"global_batch must be an rlops.GlobalBatch or None, got {type(split).__name__}")
        if self.top_entropy_quantile < 1.0:
            raise ValueError("top_entropy_quantile < 1 with global_batch: the entropy quantile would be this "
                             "rank's, not the whole batch's")
        norm_aggs = {self.loss_agg, self.entropy_agg_used} & {"seq-mean-token-sum-norm"}
        if split.seq_group is not None and norm_aggs and self.norm_len is None:
            raise ValueError("seq-mean-token-sum-norm with global_batch.seq_group needs norm_len: the sequences "
                             "are split, so no rank knows their whole length T")

    @classmethod
    def from_call(cls, arguments: dict[str, object]) -> PolicyLossConfig:
        """The config of a public function's call: its fields picked from the call's arguments
        (`locals()` in eager code, so that the keyword signature is not listed a second time).

        A training loop calls with the same options every step: the checked config is cached
        by their values (the checks cost more host time than the rest of a small call's glue)."""
        if not torch.compiler.is_compiling():
            try:  # every field given (as from rlops.policy_loss): one C-level lookup of all of them
                values = _FIELD_VALUES(arguments)
            except KeyError:
                values = None
            if values is not None:
                try:  # keyed by type too: True == 1, but only one of them is a valid bool option
                    return _cached_config(values, tuple(map(type, values)))
                except TypeError:  # an unhashable value: the checks name it
                    pass
        return cls(**{name: arguments[name] for name in CONFIG_FIELDS if name in arguments})

    @property
    def kl_used(self) -> str:
        """The KL estimator actually computed: "none" when kl_coef is 0 (no reference input is read)."""
        return self.kl_estimator if self.kl_coef > 0 else "none"

    @property
    def objective_params(self) -> tuple[float, float]:
        """Epilogue.param_pos, param_neg: the per-token objective's parameters for A > 0 and A <= 0."""
        if self.objective == "dro":
            return float(self.dro_beta), float(self.dro_beta)
        return self.sapo_tau_pos, self.sapo_tau_neg

    @property
    def entropy_agg_used(self) -> str:
        """The aggregation of the entropy term (loss_agg unless entropy_agg is given)."""
        return self.entropy_agg or self.loss_agg

    @classmethod
    def ppo(cls, **overrides: object) -> PolicyLossConfig:
        """PPO (Schulman et al. 2017): symmetric clip 0.2, token mean."""
        return cls(**overrides)

    @classmethod
    def grpo(cls, **overrides: object) -> PolicyLossConfig:
        """GRPO (DeepSeekMath): per-sequence token mean, k3 KL to the reference with beta 0.04."""
        return cls(**{"loss_agg": "seq-mean-token-mean", "kl_coef": 0.04, "kl_estimator": "k3", **overrides})

    @classmethod
    def dapo(cls, **overrides: object) -> PolicyLossConfig:
        """DAPO: clip-higher (0.2 / 0.28), token mean over the batch, no KL."""
        return cls(**{"clip_low": 0.2, "clip_high": 0.28, "loss_agg": "token-mean", **overrides})

    @classmethod
    def dr_grpo(cls, **overrides: object) -> PolicyLossConfig:
        """Dr. GRPO: sum over tokens divided by a constant length (norm_len, default T), no KL."""
        return cls(**{"loss_agg": "seq-mean-token-sum-norm", **overrides})

    @classmethod
    def gspo(cls, **overrides: object) -> PolicyLossConfig:
        """GSPO: sequence-level ratio with clip 3e-4 / 4e-4, per-sequence token mean."""
        return cls(**{"ratio_level": "sequence", "clip_low": 3e-4, "clip_high": 4e-4,
                      "loss_agg": "seq-mean-token-mean", **overrides})


# Read once: torch.compile traces `from_call` but not dataclasses.fields().
CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(PolicyLossConfig))


# The values of every config field, in CONFIG_FIELDS' order, from a dict of arguments.
_FIELD_VALUES = operator.itemgetter(*CONFIG_FIELDS)


@functools.lru_cache(maxsize=256)
def _cached_config(values: tuple[object, ...], types: tuple[type, ...]) -> PolicyLossConfig:
    return PolicyLossConfig(**dict(zip(CONFIG_FIELDS, values, strict=True)))


def aggregation_weights(layout: Layout, loss_agg: str, norm_len: float | None = None,
                        counts: BatchCounts | None = None) -> Tensor:
    """Per-token weights w float32 (layout.mask's shape) with sum(w * l) = the loss_agg aggregate of l (SPEC 4).

    The sequences are the rows of a padded (B, T) mask, or the packed segments of layout.
    w is 0 exactly where the mask is 0, and an empty mask gives all zeros (loss 0, no NaN).
    seq-mean-token-sum-norm divides by S * norm_len; norm_len defaults to T (padded only).
    counts: the whole batch's when the batch is split over ranks (`BatchCounts.of`); then the
    weights of all ranks add up to the aggregate of the whole batch. None: this call's batch.
    """
    if loss_agg == "token-mean":
        return token_mean_weights(layout.mask, torch.count_nonzero(layout.mask) if counts is None else counts.tokens)
    m = layout.mask.to(torch.float32)
    if loss_agg == "seq-mean-token-mean":
        per_seq = layout.seq_totals(m) if counts is None else counts.per_seq
        n_valid = (per_seq > 0).sum() if counts is None else counts.valid_seqs
        return m / layout.per_token(per_seq.clamp(min=1.0)) / n_valid.clamp(min=1)
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"loss_agg must be one of {', '.join(LOSS_AGGS)}; got {loss_agg!r}")
    n_seqs = layout.n_seqs if counts is None else counts.seqs
    length = 1.0 if loss_agg == "seq-mean-token-sum" else m.shape[-1] if norm_len is None else norm_len
    denominator = n_seqs * length
    if counts is None:
        return m / denominator if denominator > 0 else m  # an empty batch has no weights to scale
    return m / torch.where(denominator > 0, denominator, 1.0)


def token_mean_weights(mask: Tensor, count: Tensor) -> Tensor:
    """float32 weights of token-mean: 1 / max(count, 1) where mask (bool or 0/1, any shape) is nonzero, else 0."""
    return mask.to(torch.float32) / count.clamp_min(1)


class BatchCounts(NamedTuple):
    """The counts the aggregations divide by, of a whole batch split over ranks (GlobalBatch).

    tokens, valid_seqs (sequences with a counted token), seqs: float64 scalars (0-d tensors) of
    the whole batch; per_seq: float32 counted tokens of each of this call's sequences (B,) or
    (S,), over every rank that holds part of it.
    """

    tokens: Tensor
    valid_seqs: Tensor
    seqs: Tensor
    per_seq: Tensor

    @classmethod
    def of(cls, layout: Layout, split: GlobalBatch) -> BatchCounts:
        """The whole batch's counts: the given ones, the others by one all_reduce of three numbers
        over split's group (after one of the per-sequence counts over seq_group, when set)."""
        per_seq = layout.seq_totals(layout.mask.to(torch.float32))
        n_seqs = torch.full((), layout.n_seqs, device=per_seq.device)  # a fill, not a host-to-device copy
        local = torch.stack([layout.mask.sum(), (per_seq > 0).sum(), n_seqs]).to(torch.float64)
        group = split.count_group
        if group is not None and (split.tokens is None or split.seqs is None):
            dist.all_reduce(local, group=group)
            if split.seq_group is not None:  # each sequence sits on every rank of seq_group: counted once
                local[1:] /= dist.get_world_size(split.seq_group)
        tokens, valid, seqs = local.unbind()
        if split.tokens is not None:
            tokens = torch.tensor(float(split.tokens), dtype=torch.float64, device=local.device)
        if split.seqs is not None:
            valid = seqs = torch.tensor(float(split.seqs), dtype=torch.float64, device=local.device)
        return cls(tokens, valid, seqs, per_seq)


class Epilogue(NamedTuple):
    """The scalar arguments and switches of the fused policy-loss kernels (Triton and CUDA).

    A custom op carries it as a float list (`list(epilogue)`); `Epilogue.unpack` restores it.
    """

    temperature: float
    clip_low: float
    clip_high: float
    dual_clip: float  # inf: no dual clip
    kl_coef: float
    kl_kind: int  # constants.KL_KINDS
    kl_ratio_weighted: bool  # only with a KL term
    objective: int  # constants.OBJECTIVES
    ratio_cap: float  # inf: no cap (DPPO: the truncation of its importance weight)
    # The objective's parameters for tokens with A > 0 and A <= 0: SAPO's gate temperatures, DRO's beta (both).
    param_pos: float
    param_neg: float

    @classmethod
    def of(cls, config: PolicyLossConfig) -> Epilogue:
        return cls(config.temperature, config.clip_low, config.clip_high,
                   math.inf if config.dual_clip is None else float(config.dual_clip), config.kl_coef,
                   KL_KINDS[config.kl_used], config.kl_ratio_weighted and config.kl_used != "none",
                   OBJECTIVES[config.objective], math.inf if config.ratio_cap is None else float(config.ratio_cap),
                   *config.objective_params)

    def pack(self) -> list[float]:
        return [float(v) for v in self]

    @classmethod
    def unpack(cls, values: list[float]) -> Epilogue:
        e = cls(*values)
        return e._replace(kl_kind=int(e.kl_kind), kl_ratio_weighted=bool(e.kl_ratio_weighted),
                          objective=int(e.objective))


class TokenInputs(NamedTuple):
    """The per-token tensors of the policy loss, each broadcastable to tokens' (B, T) or None.

    agg_weights: float32 (B, T), each token's share of the aggregated loss (0 = masked: the
    kernels skip that token); or, with agg_count (a 0-d count), token-mean's mask (bool or 0/1),
    each counted token weighing 1 / max(agg_count, 1): the kernel divides (`weights` gives the
    float32 weights to code that needs them). entropy_coefs: entropy_coef times each token's
    weight in the entropy term's aggregation, or None without an entropy term. The others as
    `rlops.policy_loss` takes them (absent ones None).
    """

    agg_weights: Tensor
    entropy_coefs: Tensor | None
    advantages: Tensor
    old_logprobs: Tensor | None
    ref_logprobs: Tensor | None
    is_weights: Tensor | None
    agg_count: Tensor | None = None

    @classmethod
    def of(cls, batch: PolicyBatch, layout: Layout, config: PolicyLossConfig) -> TokenInputs:
        """A checked batch's inputs: weights from its layout and config; ref log-probs for a sampled-token KL only."""
        counts = None if config.global_batch is None else BatchCounts.of(layout, config.global_batch)
        entropy_coefs = None if config.entropy_coef == 0 else \
            config.entropy_coef * aggregation_weights(layout, config.entropy_agg_used, config.norm_len, counts)
        if config.loss_agg == "token-mean":  # the mask and its count (the kernel divides): 1 op, not 4 on (B, T)
            agg, count = layout.mask, torch.count_nonzero(layout.mask) if counts is None else counts.tokens
        else:
            agg, count = aggregation_weights(layout, config.loss_agg, config.norm_len, counts), None
        return cls(agg, entropy_coefs, batch.advantages, batch.old_logprobs,
                   batch.ref_logprobs if config.kl_used in SAMPLED_KL else None, batch.is_weights, count)

    @property
    def weights(self) -> Tensor:
        """float32 (B, T): each token's share of the aggregated loss (agg_weights, divided by agg_count when given)."""
        return self.agg_weights if self.agg_count is None else token_mean_weights(self.agg_weights, self.agg_count)

    def dense(self) -> TokenInputs:
        """These inputs with the weights as a float32 (B, T) tensor (agg_count None)."""
        return self if self.agg_count is None else self._replace(agg_weights=self.weights, agg_count=None)

    def map(self, fn) -> TokenInputs:
        """fn applied to every per-token tensor present (None stays None; agg_count, one number, stays)."""
        return TokenInputs(*(None if x is None else fn(x) for x in self[:-1]), self.agg_count)


class Head(NamedTuple):
    """An lm_head: weight (V, H) and bias (V,) or None, of the hidden states' dtype."""

    weight: Tensor
    bias: Tensor | None = None


class PolicyBatch(NamedTuple):
    """The per-token tensors of a policy-loss call, as the caller passes them (see `rlops.policy_loss`),
    and the packed sequences' boundaries (None: each row of the (B, T) tensors is a sequence)."""

    tokens: Tensor
    advantages: Tensor
    mask: Tensor | None = None
    old_logprobs: Tensor | None = None
    ref_logprobs: Tensor | None = None
    is_weights: Tensor | None = None
    cu_seqlens: Tensor | None = None
    rollout_logprobs: Tensor | None = None
