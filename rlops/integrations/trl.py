"""TRL drop-ins: TRL's log-prob and entropy helpers, and GRPOTrainer's loss computed by rlops.

    from rlops.integrations.trl import GRPOTrainer          # TRL's GRPOTrainer, loss by rlops
    trainer = GRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...)

or, on a trainer already built: `rlops.integrations.trl.patch(trainer)`.

The loss is TRL's own (GRPOTrainer._compute_loss, TRL 1.x), computed by `rlops.linear_policy_loss`
on the model's last hidden states and lm_head (path="linear", the default: no logits at all)
or by `rlops.policy_loss` on its logits (path="logits"). Covered: loss_type grpo, bnpo, dr_grpo,
dapo, luspo, cispo, sapo (sapo_temperature_pos/neg) and vespo (vespo_k_pos/neg,
vespo_lambda_pos/neg); epsilon / epsilon_high; delta (two-sided clipping); beta (k3 KL to the
reference); temperature; importance_sampling_level token or sequence; use_bias_correction_kl;
vLLM's importance-sampling correction (which vespo folds into its sequence weight, as TRL's);
off_policy_mask_threshold (DeepSeek-V3.2's off-policy sequence mask, on the batch's
sampling_per_token_logps when present, else its old log-probs); top_entropy_quantile (one
process: rlops takes the quantile over this process's batch, TRL over all processes');
num_items_in_batch (dapo, cispo, vespo); the static entropy bonus; gradient accumulation; TRL's
logged metrics. Anything else TRL offers raises a ValueError when patching, rather than being
silently dropped: adaptive entropy control, the MoE router auxiliary loss, delta with cispo, sapo
or vespo (TRL ignores it there), cispo with epsilon_high < 1, vespo with negative vespo_k_pos/neg,
or with vLLM importance-sampling bounds that exclude 1, a negative off_policy_mask_threshold,
top_entropy_quantile <= 0, and top_entropy_quantile < 1 over several processes.

Padding-free (packed) forward: TRL 1.16's GRPOTrainer has no padding_free option (GRPOConfig
refuses one; its SFT and DPO trainers have it) and always hands `_compute_loss` a padded batch:
prompt_ids / prompt_mask (B, P) left-padded, completion_ids / completion_mask (B, C)
right-padded, advantages (B,). `patch(trainer, padding_free=True)` packs that batch itself:
the model runs on the B sequences concatenated, input_ids and position_ids (1, N) with
position ids restarting at 0 for each sequence and no attention mask (Hugging Face's
padding-free convention, as TRL's SFT padding_free), and the loss runs on the packed
completion tokens (tokens, masks, old/ref log-probs (N_c,), advantages (B,), cu_seqlens
(B+1,)): no padding is computed and nothing is padded back. The model's attention must
honour that convention: transformers' sdpa, eager, flex_attention and flash_attention_* do
(patch refuses any other). Position ids count from each sequence's first token, as in
generation, where TRL's padded forward counts from the row's first column: the same up to
rounding for rotary embeddings, which see only relative positions. With sdpa or eager,
transformers' packed mask is a dense (N, N) one, so the saving is largest with flash attention.

A few places keep SPEC.md's arithmetic where TRL's differs: grpo's sequence mean leaves out
completions with no valid token (TRL counts them as 0); k3 is clamped (TRL's is not); vespo
reads importance_sampling_ratio at the counted tokens only (TRL sums its log over every column,
where its own ratios are 1 outside the mask); and a NaN log-ratio makes vespo's weight NaN, where
TRL's nan_to_num makes it 0 (the logged vespo/phi_seq_mean follows rlops' weight).
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
    check_positive_float,
    check_same_device,
    check_shape,
    check_tensor,
    check_token_ids,
)
from ..constants import ROW
from ..ops._backend import BACKENDS
from ..ops.linear_policy_loss import linear_policy_loss
from ..ops.policy_loss import policy_loss
from ..ops.token_stats import token_stats_op
from ..packing import cu_seqlens_from_lengths
from ..torch_backend import token_logprobs as _torch_logprobs
from .trl_metrics import OBJECTIVES, log_metrics

# Loss types of TRL that SPEC.md covers, and their aggregation (dapo's is set per batch).
LOSS_AGGS = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm",
             "dapo": "seq-mean-token-sum-norm", "luspo": "seq-mean-token-sum", "sapo": "seq-mean-token-mean",
             "cispo": "seq-mean-token-sum-norm", "vespo": "seq-mean-token-sum-norm"}
# Loss types TRL divides by the batch's share of num_items_in_batch (not by the accumulation steps).
NUM_ITEMS_NORMALISED = ("dapo", "cispo", "vespo")
# TRL clamps VESPO's lambdas at this floor (get_gamma_weights).
VESPO_LAMBDA_MIN = 1e-4
PATHS = ("linear", "logits")
# Inputs of vision-language batches, which the patched loss does not forward to the model.
MULTIMODAL_INPUTS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "spatial_shapes",
                     "num_tiles", "token_type_ids", "mm_token_type_ids", "image_position_ids")


def selective_log_softmax(logits: Tensor, index: Tensor, temperature: float = 1.0,
                          row_mask: Tensor | None = None, *, backend: str = "auto") -> Tensor:
    """TRL's `selective_log_softmax`: log_softmax(logits / temperature) gathered at `index`.

    logits (..., V); index (...) or (..., K) integer ids in [0, V); row_mask of index's shape, (...)
    or (..., K) as TRL 1.16's (or, with K ids per row, also logits' leading shape (...), one flag per
    row), of any dtype: as TRL's `masked_fill(row_mask == 0, 0.0)`, an entry where row_mask == 0
    returns 0 and any other value (2, 0.5, NaN) counts. Rows that are 0 are not read. Float32 output
    of index's shape (TRL's eager path keeps bf16/fp16 logits' dtype; its Triton path, as here,
    float32), differentiable. One index per row runs the fused kernel; K indices per row fall back
    to a chunked PyTorch evaluation. backend: as `rlops.token_logprobs`.
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
    """TRL's row_mask as bool, row_mask != 0 (TRL masks where row_mask == 0, whatever the other values),
    checked against the shapes it may have (index's first) and index's device. Reads no value back."""
    if row_mask is None:
        return None
    row_mask = check_tensor("row_mask", row_mask)
    check_shape("row_mask", row_mask, shapes, " or ".join(map(str, shapes)) + " (index's shape)")
    check_same_device("row_mask", row_mask, index, "index")
    return row_mask if row_mask.dtype == torch.bool else row_mask != 0


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
    delta = getattr(args, "delta", None)
    threshold = getattr(trainer, "off_policy_mask_threshold", None)
    quantile = getattr(trainer, "top_entropy_quantile", 1.0)
    checks = [
        (delta is not None and trainer.loss_type in OBJECTIVES, f"delta with loss_type={trainer.loss_type!r} (TRL "
                                                                 "ignores it there)"),
        (trainer.loss_type == "cispo" and trainer.epsilon_high < 1.0, "loss_type='cispo' with epsilon_high < 1 (a "
                                                                     "ratio cap below 1)"),
        (trainer.loss_type == "vespo" and min(args.vespo_k_pos, args.vespo_k_neg) < 0,
         "loss_type='vespo' with a negative vespo_k_pos or vespo_k_neg"),
        (trainer.loss_type == "vespo" and _vllm_is(trainer) and not _is_bounds_hold_one(args),
         "loss_type='vespo' with vllm_importance_sampling_clip_min/max excluding 1 (TRL's ratios outside the mask "
         "are then not 1, and its vespo folds them into the sequence weight)"),
        (threshold is not None and threshold < 0, "off_policy_mask_threshold < 0 (it would mask on-policy "
                                                  "sequences)"),
        (quantile <= 0.0, "top_entropy_quantile <= 0"),
        (quantile < 1.0 and trainer.accelerator.num_processes > 1,
         "top_entropy_quantile < 1 with several processes (TRL takes the entropy quantile over every process's "
         "tokens, rlops over this process's batch)"),
        (getattr(trainer, "use_adaptive_entropy", False), "adaptive entropy control"),
        (getattr(trainer, "aux_loss_enabled", False), "the MoE router auxiliary loss"),
    ]
    problems += [name for bad, name in checks if bad]
    return problems


def _vllm_is(trainer: Any) -> bool:
    return bool(trainer.use_vllm and getattr(trainer, "vllm_importance_sampling_correction", False))


def _is_bounds_hold_one(args: Any) -> bool:
    """Whether TRL's vLLM importance ratio of a masked-out token (exp(0) = 1) survives its clip bounds."""
    low = getattr(args, "vllm_importance_sampling_clip_min", None)
    high = getattr(args, "vllm_importance_sampling_clip_max", None)
    return (low is None or low <= 1.0) and (high is None or high >= 1.0)


def patch(trainer: Any, *, path: str = "linear", backend: str = "auto", padding_free: bool = False) -> Any:
    """Makes a TRL `GRPOTrainer` compute its loss with rlops; returns the trainer.

    path: "linear" (rlops.linear_policy_loss on the last hidden states and the lm_head: the
    logits never exist) or "logits" (rlops.policy_loss on the model's logits). backend: as
    rlops.policy_loss. padding_free: run the model and the loss on the batch's sequences
    packed into one row (see the module docstring) instead of TRL's padded (B, P + C) batch;
    same loss, gradients and metrics, no work on padding. Raises ValueError for a TRL option
    rlops cannot honour.
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if not isinstance(padding_free, bool):
        raise TypeError(f"padding_free must be a bool, got {type(padding_free).__name__}")
    problems = _unsupported(trainer)
    if path == "logits" and getattr(trainer.args, "cast_lm_head_to_fp32", False):
        problems.append("cast_lm_head_to_fp32 with path='logits' (the model computes its logits in its own dtype; "
                        "path='linear' honours it)")
    model = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    if padding_free and not hf.packs_sequences_apart(model):
        attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
        problems.append(f"padding_free with attn_implementation={attention!r} (transformers builds the packed "
                        "sequences' block-diagonal mask from position ids only for sdpa, eager, flex_attention and "
                        "flash_attention_*)")
    if problems:
        raise ValueError("rlops cannot compute this GRPOTrainer's loss exactly; unsupported: " + "; ".join(problems))
    hf.lm_head(model)  # refuses heads that are not hidden @ weight.T + bias
    if path == "linear":
        _add_hidden_states_forward(model)
    trainer._compute_loss = MethodType(functools.partial(_compute_loss, path=path, backend=backend,
                                                         padding_free=padding_free), trainer)
    trainer.rlops_path = path
    trainer.rlops_padding_free = padding_free
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


def _compute_loss(self: Any, model: torch.nn.Module, inputs: dict[str, Any], *, path: str, backend: str,
                  padding_free: bool = False) -> Tensor:
    """GRPOTrainer._compute_loss with the loss from rlops (same normalisation and metrics as TRL)."""
    present = [k for k in MULTIMODAL_INPUTS if inputs.get(k) is not None]
    if present:
        raise ValueError(f"the rlops loss does not forward multimodal inputs to the model: {present}")
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    keep = completion_ids.size(1)
    mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
    mode = "train" if self.model.training else "eval"
    accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
    if self.loss_type == "vespo":  # TRL's vespo folds the ratio into phi whenever the batch has one
        is_weights = inputs.get("importance_sampling_ratio")
    else:
        is_weights = inputs["importance_sampling_ratio"] if _vllm_is(self) else None
    threshold = getattr(self, "off_policy_mask_threshold", None)

    options = {
        "mask": mask,
        "old_logprobs": inputs.get("old_per_token_logps"),
        "ref_logprobs": inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
        "is_weights": is_weights,
        # TRL's off-policy mask reads the sampler's log-probs, else the old ones (rlops' default too)
        "rollout_logprobs": inputs.get("sampling_per_token_logps") if threshold is not None else None,
        "off_policy_mask": threshold, "top_entropy_quantile": getattr(self, "top_entropy_quantile", 1.0),
        "temperature": self.temperature, **_objective(self),
        "kl_coef": self.beta, "kl_estimator": "k3", "ratio_level": self.importance_sampling_level,
        "kl_ratio_weighted": bool(getattr(self.args, "use_bias_correction_kl", False)),
        "loss_agg": LOSS_AGGS[self.loss_type], "entropy_agg": "token-mean",
        "entropy_coef": self.entropy_coef if getattr(self, "_entropy_bonus_enabled", False) else 0.0,
        "backend": backend,
    }
    scale = 1.0 / accumulation
    if self.loss_type == "dr_grpo":
        options["norm_len"] = self.max_completion_length
    elif self.loss_type in NUM_ITEMS_NORMALISED:
        # TRL divides the token sum by the batch's share of num_items_in_batch, and only the
        # entropy bonus by the accumulation steps.
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            normalizer = normalizer * accumulation / self.args.steps_per_generation
        options["norm_len"] = float(normalizer) / completion_ids.size(0)
        options["entropy_coef"] = options["entropy_coef"] / accumulation
        scale = 1.0

    base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
    advantages, cu_seqlens = inputs["advantages"], None
    if advantages.dim() == 2 and advantages.shape[1] == 1:  # one per sequence, as TRL's own (B,) unsqueezed
        advantages = advantages[:, 0]
    per_seq_adv = advantages.dim() == 1  # else per token (B, C), packed below as the tokens (N_c,)
    if padding_free:
        batch = _pack_batch(inputs)
        completion_ids, cu_seqlens = batch["tokens"], batch["cu_seqlens"]
        options.update({k: None if options[k] is None else _pack_like(options[k], k, batch["selected"])
                        for k in ("mask", "old_logprobs", "ref_logprobs", "is_weights", "rollout_logprobs")})
        options["cu_seqlens"] = cu_seqlens
        if advantages.dim() == 2:
            advantages = _pack_like(advantages, "advantages", batch["selected"])
        forward = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
        if path == "linear":  # the hidden states predicting each completion token: (N_c, H)
            hidden = model(**forward, rlops_hidden_states=True)[0][batch["predictors"]]
        else:  # the logits of those positions only: (N_c, V)
            rows = batch["predictors"].nonzero().squeeze(1)
            logits = model(**forward, use_cache=False, logits_to_keep=rows).logits[0]
    elif path == "linear":
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        hidden = model(input_ids=input_ids, attention_mask=attention_mask, rlops_hidden_states=True)[:, -keep - 1:-1]
    else:
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        # (B, keep + 1, V) as the model returns them: rlops drops the last position without a slice's copy.
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep + 1).logits

    if path == "linear":
        head = hf.lm_head(base)
        weight, bias = head.weight, head.bias
        if getattr(self.args, "cast_lm_head_to_fp32", False):
            hidden, weight = hidden.float(), weight.float()
            bias = None if bias is None else bias.float()
        out = linear_policy_loss(hidden, weight, completion_ids, advantages, bias=bias, **options)
    else:
        out = policy_loss(logits, completion_ids, advantages, **options)
    log_metrics(self, mode, out, options, advantages, per_seq_adv)
    return out.loss * scale


def _objective(self: Any) -> dict[str, Any]:
    """rlops' objective options of a TRL GRPOTrainer: its loss_type, clipping, SAPO temperatures and
    VESPO's gamma weights."""
    if self.loss_type == "cispo":  # TRL caps the detached ratio at epsilon_high: [1 - 1, 1 + (eps_high - 1)]
        return {"objective": "cispo", "clip_low": 1.0, "clip_high": self.epsilon_high - 1.0}
    if self.loss_type == "vespo":
        args = self.args
        return {"objective": "vespo", "vespo_k_pos": args.vespo_k_pos, "vespo_k_neg": args.vespo_k_neg,
                "vespo_lambda_pos": max(args.vespo_lambda_pos, VESPO_LAMBDA_MIN),
                "vespo_lambda_neg": max(args.vespo_lambda_neg, VESPO_LAMBDA_MIN)}
    options = {"objective": OBJECTIVES.get(self.loss_type, "clip"), "clip_low": self.epsilon_low,
               "clip_high": self.epsilon_high}
    if self.loss_type == "sapo":
        options.update(sapo_tau_pos=self.args.sapo_temperature_pos, sapo_tau_neg=self.args.sapo_temperature_neg)
    else:
        options["ratio_cap"] = getattr(self.args, "delta", None)
    return options


def _pack_batch(inputs: dict[str, Any]) -> dict[str, Tensor]:
    """TRL's padded batch as packed sequences: each row's prompt tokens (prompt_mask, left-padded)
    then its completion tokens (completion_mask, right-padded), rows concatenated.

    Returns input_ids and position_ids (1, N) for the model; predictors (N,) bool, the tokens
    whose hidden state predicts a completion token; selected (B, C) bool, the completion
    tokens kept (completion_mask); tokens (N_c,) those tokens; cu_seqlens (B+1,) of them.
    """
    prompt_mask, completion_mask = inputs["prompt_mask"].bool(), inputs["completion_mask"].bool()
    # One read back: the packed layout needs contiguous rows and a token before every completion.
    bad = torch.stack([(prompt_mask[:, 1:] < prompt_mask[:, :-1]).any(),
                       (completion_mask[:, 1:] > completion_mask[:, :-1]).any(),
                       (~prompt_mask.any(dim=1)).any()]).tolist()
    if bad[0]:
        raise ValueError("padding_free needs inputs['prompt_mask'] left-padded (each row's tokens contiguous, "
                         "padding first)")
    if bad[1]:
        raise ValueError("padding_free needs inputs['completion_mask'] right-padded (each row's tokens a prefix)")
    if bad[2]:
        raise ValueError("padding_free needs at least one prompt token per row (inputs['prompt_mask'] has an "
                         "empty row): the first completion token is predicted from the last prompt token")
    kept = torch.cat([prompt_mask, completion_mask], dim=1)
    target = torch.cat([torch.zeros_like(prompt_mask), completion_mask], dim=1)
    predicts = torch.cat([target[:, 1:], torch.zeros_like(target[:, :1])], dim=1)  # the next token is a target
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    return {
        "input_ids": input_ids[kept][None],
        "position_ids": (kept.cumsum(dim=1) - 1)[kept][None],
        "predictors": predicts[kept],
        "selected": completion_mask,
        "tokens": inputs["completion_ids"][completion_mask],
        "cu_seqlens": cu_seqlens_from_lengths(completion_mask.sum(dim=1)),
    }


def _pack_like(x: Tensor, name: str, selected: Tensor) -> Tensor:
    """A per-token (B, C) tensor of TRL's batch (or a per-sequence (B, 1) one) at the packed tokens (N_c,)."""
    if x.dim() == 2 and x.shape[0] == selected.shape[0] and x.shape[1] in (1, selected.shape[1]):
        return x.expand_as(selected)[selected]
    raise ValueError(f"padding_free: {name} must have shape {tuple(selected.shape)} (completion_mask's) or "
                     f"({selected.shape[0]}, 1), got {tuple(x.shape)}")


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

        Takes TRL's arguments plus rlops_path ("linear" or "logits"), rlops_backend and
        rlops_padding_free (the packed forward and loss: `patch`'s padding_free).
        """

        def __init__(self, *args: Any, rlops_path: str = "linear", rlops_backend: str = "auto",
                     rlops_padding_free: bool = False, **kwargs: Any):
            super().__init__(*args, **kwargs)
            patch(self, path=rlops_path, backend=rlops_backend, padding_free=rlops_padding_free)

    return GRPOTrainer


__all__ = ["entropy_from_logits", "patch", "selective_log_softmax"]  # and GRPOTrainer, made on first use
