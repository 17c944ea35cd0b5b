"""TRL drop-ins: TRL's log-prob and entropy helpers, and GRPOTrainer's loss computed by rlops.

    from rlops.integrations.trl import GRPOTrainer          # TRL's GRPOTrainer, loss by rlops
    trainer = GRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...)

or, on a trainer already built: `rlops.integrations.trl.patch(trainer)`.

The loss is TRL's own (GRPOTrainer._compute_loss, TRL 1.x), computed by `rlops.linear_policy_loss`
on the model's last hidden states and lm_head (path="linear", the default: no logits at all)
or by `rlops.policy_loss` on its logits (path="logits"). Covered: loss_type grpo, bnpo, dr_grpo
and dapo; epsilon / epsilon_high; beta (k3 KL to the reference); temperature;
importance_sampling_level token or sequence; use_bias_correction_kl; vLLM's
importance-sampling correction; num_items_in_batch (dapo); the static entropy bonus;
gradient accumulation. Anything else
TRL offers raises a ValueError when patching, rather than being silently dropped.

Two places keep SPEC.md's arithmetic where TRL's differs: grpo's sequence mean leaves out
completions with no valid token (TRL counts them as 0), and k3 is clamped (TRL's is not).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import MethodType
from typing import Any

import torch
from torch import Tensor

from .. import hf
from .._validation import (
    check_choice,
    check_logits,
    check_mask,
    check_positive_float,
    check_shape,
    check_tensor,
    check_token_ids,
)
from ..constants import ROW
from ..ops._backend import BACKENDS
from ..ops.linear_policy_loss import linear_policy_loss
from ..ops.policy_loss import policy_loss
from ..ops.token_stats import token_stats_op
from ..torch_backend import token_logprobs as _torch_logprobs

# Loss types of TRL that SPEC.md covers, and their aggregation (dapo's is set per batch).
LOSS_AGGS = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm",
             "dapo": "seq-mean-token-sum-norm"}
PATHS = ("linear", "logits")
# Inputs of vision-language batches, which the patched loss does not forward to the model.
MULTIMODAL_INPUTS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "spatial_shapes",
                     "num_tiles", "token_type_ids", "mm_token_type_ids", "image_position_ids")


def selective_log_softmax(logits: Tensor, index: Tensor, temperature: float = 1.0,
                          row_mask: Tensor | None = None, *, backend: str = "auto") -> Tensor:
    """TRL's `selective_log_softmax`: log_softmax(logits / temperature) gathered at `index`.

    logits (..., V); index (...) or (..., K) integer ids in [0, V); row_mask of index's shape
    (or, with K ids per row, logits' leading shape (...)): entries with 0 return 0 (rows that
    are 0 are not read). Float32 output of index's shape, differentiable. One index per row
    runs the fused kernel; K indices per row fall back to a chunked PyTorch evaluation.
    backend: as `rlops.token_logprobs`.
    """
    from ..ops.token_stats import _prepare

    check_logits(logits)
    if isinstance(index, Tensor) and index.dim() == logits.dim():  # (..., K): several ids per row
        check_choice("backend", backend, BACKENDS)
        temperature = check_positive_float("temperature", temperature)
        check_token_ids(index, (*logits.shape[:-1], index.shape[-1]), logits.shape[-1], logits, "index")
        row_mask = _row_mask(row_mask, index, [tuple(index.shape), tuple(logits.shape[:-1])])
        if row_mask is not None and row_mask.dim() < index.dim():
            row_mask = row_mask.unsqueeze(-1)
        return _select_k(logits, index, temperature, row_mask)
    temperature, backend = _prepare(logits, index, temperature, backend, "index")
    row_mask = _row_mask(row_mask, index, [tuple(index.shape)])
    if backend == "torch":
        logp = _torch_logprobs(logits, index, temperature).float()
        return logp if row_mask is None else logp.masked_fill(~row_mask, 0.0)
    return token_stats_op(logits, index, None, row_mask, temperature, False, backend)[ROW["logp"]]


def _row_mask(row_mask: Tensor | None, index: Tensor, shapes: list[tuple[int, ...]]) -> Tensor | None:
    """TRL's row_mask as bool, checked against the shapes it may have (index's first)."""
    if row_mask is None:
        return None
    row_mask = check_tensor("row_mask", row_mask)
    check_shape("row_mask", row_mask, shapes, " or ".join(map(str, shapes)) + " (index's shape)")
    return check_mask(row_mask, tuple(row_mask.shape), index, "row_mask", "index")


def _select_k(logits: Tensor, index: Tensor, temperature: float, row_mask: Tensor | None) -> Tensor:
    rows = logits.reshape(-1, logits.shape[-1])
    idx = index.reshape(rows.shape[0], -1)
    parts = [torch.log_softmax(chunk.float() / temperature, dim=-1).gather(-1, i)
             for chunk, i in zip(rows.split(128), idx.split(128), strict=True)]
    out = torch.cat(parts).view(index.shape)
    return out if row_mask is None else out.masked_fill(~row_mask, 0.0)


def entropy_from_logits(logits: Tensor, chunk_size: int = 128, *, backend: str = "auto") -> Tensor:
    """TRL's `entropy_from_logits`: the entropy of softmax(logits) per row, float32 of logits.shape[:-1].

    chunk_size is accepted for TRL's signature; the fused kernel reads each row once and needs no
    chunking. backend: as `rlops.token_logprobs_and_entropy`.
    """
    from ..ops.token_stats import token_logprobs_and_entropy

    tokens = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return token_logprobs_and_entropy(logits, tokens, backend=backend)[1]


def _unsupported(trainer: Any) -> list[str]:
    args = trainer.args
    problems = []
    if trainer.loss_type not in LOSS_AGGS:
        problems.append(f"loss_type={trainer.loss_type!r} (supported: {', '.join(LOSS_AGGS)})")
    checks = [
        (getattr(args, "delta", None) is not None, "delta (two-sided clipping)"),
        (getattr(trainer, "off_policy_mask_threshold", None) is not None, "off_policy_mask_threshold"),
        (getattr(trainer, "top_entropy_quantile", 1.0) < 1.0, "top_entropy_quantile < 1"),
        (getattr(trainer, "use_adaptive_entropy", False), "adaptive entropy control"),
        (getattr(trainer, "aux_loss_enabled", False), "the MoE router auxiliary loss"),
    ]
    problems += [name for bad, name in checks if bad]
    return problems


def patch(trainer: Any, *, path: str = "linear", backend: str = "auto") -> Any:
    """Makes a TRL `GRPOTrainer` compute its loss with rlops; returns the trainer.

    path: "linear" (rlops.linear_policy_loss on the last hidden states and the lm_head: the
    logits never exist) or "logits" (rlops.policy_loss on the model's logits). backend: as
    rlops.policy_loss. Raises ValueError for a TRL option rlops cannot honour.
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    problems = _unsupported(trainer)
    if path == "logits" and getattr(trainer.args, "cast_lm_head_to_fp32", False):
        problems.append("cast_lm_head_to_fp32 with path='logits' (the model computes its logits in its own dtype; "
                        "path='linear' honours it)")
    if problems:
        raise ValueError("rlops cannot compute this GRPOTrainer's loss exactly; unsupported: " + "; ".join(problems))
    model = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    hf.lm_head(model)  # refuses heads that are not hidden @ weight.T + bias
    if path == "linear":
        _add_hidden_states_forward(model)
    trainer._compute_loss = MethodType(functools.partial(_compute_loss, path=path, backend=backend), trainer)
    trainer.rlops_path = path
    return trainer


def _add_hidden_states_forward(model: torch.nn.Module) -> None:
    """Lets `model(..., rlops_hidden_states=True)` return the backbone's last hidden states, so the
    call goes through whatever wrapper (DDP, accelerate) holds the model."""
    if getattr(model, "_rlops_hidden_states", False):
        return
    previous = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, rlops_hidden_states: bool = False, **kwargs):
        if not rlops_hidden_states:
            return previous(*args, **kwargs)
        kwargs["use_cache"] = False
        return self.get_decoder()(*args, **kwargs).last_hidden_state

    model.forward = MethodType(forward, model)
    model._rlops_hidden_states = True


def _compute_loss(self: Any, model: torch.nn.Module, inputs: dict[str, Any], *, path: str, backend: str) -> Tensor:
    """GRPOTrainer._compute_loss with the loss from rlops (same normalisation and metrics as TRL)."""
    present = [k for k in MULTIMODAL_INPUTS if inputs.get(k) is not None]
    if present:
        raise ValueError(f"the rlops loss does not forward multimodal inputs to the model: {present}")
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
    keep = completion_ids.size(1)
    mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
    mode = "train" if self.model.training else "eval"
    accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
    use_is = self.use_vllm and getattr(self, "vllm_importance_sampling_correction", False)

    options = {
        "mask": mask,
        "old_logprobs": inputs.get("old_per_token_logps"),
        "ref_logprobs": inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
        "is_weights": inputs["importance_sampling_ratio"] if use_is else None,
        "temperature": self.temperature, "clip_low": self.epsilon_low, "clip_high": self.epsilon_high,
        "kl_coef": self.beta, "kl_estimator": "k3", "ratio_level": self.importance_sampling_level,
        "kl_ratio_weighted": bool(getattr(self.args, "use_bias_correction_kl", False)),
        "loss_agg": LOSS_AGGS[self.loss_type], "entropy_agg": "token-mean",
        "entropy_coef": self.entropy_coef if getattr(self, "_entropy_bonus_enabled", False) else 0.0,
        "backend": backend,
    }
    scale = 1.0 / accumulation
    if self.loss_type == "dr_grpo":
        options["norm_len"] = self.max_completion_length
    elif self.loss_type == "dapo":
        # TRL divides the token sum by the batch's share of num_items_in_batch, and only the
        # entropy bonus by the accumulation steps.
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            normalizer = normalizer * accumulation / self.args.steps_per_generation
        options["norm_len"] = float(normalizer) / completion_ids.size(0)
        options["entropy_coef"] = options["entropy_coef"] / accumulation
        scale = 1.0

    if path == "linear":
        hidden = model(input_ids=input_ids, attention_mask=attention_mask, rlops_hidden_states=True)
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        head = hf.lm_head(base)
        hidden, weight, bias = hidden[:, -keep - 1:-1], head.weight, head.bias
        if getattr(self.args, "cast_lm_head_to_fp32", False):
            hidden, weight = hidden.float(), weight.float()
            bias = None if bias is None else bias.float()
        out = linear_policy_loss(hidden, weight, completion_ids, inputs["advantages"], bias=bias, **options)
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep + 1).logits
        out = policy_loss(logits[:, :-1], completion_ids, inputs["advantages"], **options)
    _log_metrics(self, mode, out, mask, inputs["advantages"])
    return out.loss * scale


def _log_metrics(self: Any, mode: str, out: Any, mask: Tensor, advantages: Tensor) -> None:
    """TRL's metrics of the loss: kl, entropy and the clip ratios (global means over processes)."""
    mask = mask.to(torch.float32)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    sequence = self.importance_sampling_level == "sequence"

    def global_mean(x: Tensor, per_sequence: bool = False) -> float:
        if per_sequence:  # one value per sequence, as TRL's (B, 1) tensors
            local = torch.stack([x.sum(), torch.tensor(float(x.shape[0]), device=x.device)])
        else:
            local = torch.stack([(x * mask).sum(), mask.sum()])
        totals = self.accelerator.reduce(local, reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    def seq_mean(x: Tensor) -> Tensor:
        return x.squeeze(1) if sequence else (x * mask).sum(-1) / mask.sum(-1)

    if self.beta != 0.0:
        weighted = getattr(self.args, "use_bias_correction_kl", False)  # TRL logs the KL term as used
        self._metrics[mode]["kl"].append(global_mean(out.kl * out.ratio if weighted else out.kl))
    self._metrics[mode]["entropy"].append(global_mean(out.entropy))
    ratio = out.ratio.amax(-1, keepdim=True) if sequence else out.ratio
    low = ((ratio < 1 - self.epsilon_low) & (adv < 0)).float()
    high = ((ratio > 1 + self.epsilon_high) & (adv > 0)).float()
    metrics = self._metrics[mode]
    metrics["clip_ratio/low_mean"].append(global_mean(low, sequence))
    metrics["clip_ratio/high_mean"].append(global_mean(high, sequence))
    metrics["clip_ratio/region_mean"].append(global_mean(torch.maximum(low, high), sequence))
    metrics["clip_ratio/low_min"].append(self.accelerator.gather(seq_mean(low)).nan_to_num(nan=float("inf")).min()
                                         .item())
    metrics["clip_ratio/high_max"].append(self.accelerator.gather(seq_mean(high)).nan_to_num(nan=float("-inf"))
                                          .max().item())


def __getattr__(name: str) -> Callable[..., Any]:
    # GRPOTrainer needs TRL at import; the functions above do not.
    if name == "GRPOTrainer":
        return _trainer_class()
    raise AttributeError(name)


@functools.cache
def _trainer_class() -> type:
    import trl

    class GRPOTrainer(trl.GRPOTrainer):
        """TRL's GRPOTrainer with the loss computed by rlops.

        Takes TRL's arguments plus rlops_path ("linear" or "logits") and rlops_backend.
        """

        def __init__(self, *args: Any, rlops_path: str = "linear", rlops_backend: str = "auto", **kwargs: Any):
            super().__init__(*args, **kwargs)
            patch(self, path=rlops_path, backend=rlops_backend)

    return GRPOTrainer


__all__ = ["entropy_from_logits", "patch", "selective_log_softmax"]  # and GRPOTrainer, made on first use
