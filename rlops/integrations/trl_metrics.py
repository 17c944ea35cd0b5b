"""TRL 1.16's logged metrics of GRPOTrainer._compute_loss, from what the patched loss returns
(rlops.integrations.trl): kl, entropy, the clip ratios, cispo's clip ratio, vespo's mean weight,
policy_loss and entropy_coef, as global means over the processes exactly as TRL takes them."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..objectives import high_entropy_mask, vespo_weights
from ..options import PolicyLossConfig
from ..packing import Layout

# TRL's loss_type as rlops' objective (the others are the clipped surrogate, and log clip ratios).
OBJECTIVES = {"cispo": "cispo", "sapo": "sapo", "vespo": "vespo"}


def _nanmin(x: Tensor) -> float:
    """TRL's nanmin / nanmax (NaN when every value is NaN), for the clip-ratio extremes."""
    x = x[~x.isnan()]
    return x.min().item() if x.numel() else float("nan")


def log_metrics(self: Any, mode: str, out: Any, options: dict[str, Any], advantages: Tensor,
                 per_seq_adv: bool) -> None:
    """TRL's metrics of the loss: kl, entropy, the clip ratios or vespo's mean weight (global means
    over processes), and with the entropy bonus policy_loss and entropy_coef. Padded (B, C) or
    packed (N_c,) tokens; options: those of the rlops call; advantages one per sequence
    (per_seq_adv) or one per token."""
    mask, cu_seqlens, entropy_coef = options["mask"], options.get("cu_seqlens"), options["entropy_coef"]
    # The sequences are the rows (padded) or the packed segments: rlops.packing.Layout.
    layout = Layout.of(mask != 0, None if cu_seqlens is None else cu_seqlens.long())
    mask = mask.to(torch.float32)
    counts = layout.seq_totals(mask)
    adv = layout.per_token(advantages) if per_seq_adv else advantages
    sequence = self.importance_sampling_level == "sequence"
    ratio = out.ratio
    if self.loss_type == "vespo":  # out.ratio is the token ratio; TRL's coef_1 (for the KL metric) is of its level
        log_r = _log_ratio(out.logprobs, options["old_logprobs"], layout)
        ratio = torch.exp(layout.per_token(layout.seq_totals(log_r) / counts.clamp(min=1.0)) if sequence else log_r)
    elif sequence:  # TRL's (B, 1) ratio: the sequence ratio (that of its valid tokens), 1 with none
        masked = ratio * mask
        seq_ratio = masked.amax(-1).clamp(min=0) if layout.seq_ids is None else \
            mask.new_zeros(layout.n_seqs).scatter_reduce(0, layout.seq_ids, masked.reshape(-1), "amax")
        seq_ratio = torch.where(counts > 0, seq_ratio, 1.0)
        ratio = layout.per_token(seq_ratio)
    per_sequence = sequence and per_seq_adv  # TRL's metrics then hold one value per sequence

    def global_mean(x: Tensor, one_per_sequence: bool = False) -> float:
        if one_per_sequence:
            local = torch.stack([x.sum(), torch.tensor(float(x.shape[0]), device=x.device)])
        else:
            local = torch.stack([(x * mask).sum(), mask.sum()])
        totals = self.accelerator.reduce(local, reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    metrics = self._metrics[mode]
    if getattr(self, "_entropy_bonus_enabled", False):
        # TRL's policy_loss: the loss before the entropy bonus (over the tokens it acts on: TRL's
        # effective_mask) and the accumulation scaling.
        effective = mask
        if options["top_entropy_quantile"] < 1.0:
            effective = mask * high_entropy_mask(out.entropy, layout.mask, options["top_entropy_quantile"])
        policy = out.loss.detach() + entropy_coef * (out.entropy * effective).sum() / effective.sum().clamp(min=1.0)
        metrics["policy_loss"].append(self.accelerator.gather(policy.reshape(())).nanmean().item())
        if mode == "train" and self.accelerator.sync_gradients:
            metrics["entropy_coef"].append(self.entropy_coef)
    if self.beta != 0.0:
        weighted = getattr(self.args, "use_bias_correction_kl", False)  # TRL logs the KL term as used
        metrics["kl"].append(global_mean(out.kl * ratio if weighted else out.kl))
    metrics["entropy"].append(global_mean(out.entropy))
    if self.loss_type in OBJECTIVES:  # TRL logs cispo's clip ratio, vespo's mean weight, and none for sapo
        if self.loss_type == "cispo":
            clipped = ((ratio > self.epsilon_high) & (adv > 0)).float()
            metrics["cispo_clip_ratio"].append(global_mean(clipped, per_sequence))
        elif self.loss_type == "vespo":  # TRL's phi_seq: one per sequence, or per token with per-token advantages
            config = PolicyLossConfig(**{k: v for k, v in options.items() if k.startswith("vespo_")})
            phi = vespo_weights(log_r, options["is_weights"], advantages if per_seq_adv else adv, layout, config,
                                per_seq_adv)
            metrics["vespo/phi_seq_mean"].append(global_mean(phi, per_seq_adv))
        return
    delta = getattr(self.args, "delta", None)
    if delta is not None:  # TRL's clip ratios are those of its ratio after the cap (coef_1 = clamp(coef_1, max=delta))
        ratio = ratio.clamp(max=delta)
        seq_ratio = seq_ratio.clamp(max=delta) if per_sequence else None
    if per_sequence:
        low = ((seq_ratio < 1 - self.epsilon_low) & (advantages < 0)).float()
        high = ((seq_ratio > 1 + self.epsilon_high) & (advantages > 0)).float()
        seq_low, seq_high = low, high
    else:
        low = ((ratio < 1 - self.epsilon_low) & (adv < 0)).float()
        high = ((ratio > 1 + self.epsilon_high) & (adv > 0)).float()
        seq_low, seq_high = layout.seq_totals(low * mask) / counts, layout.seq_totals(high * mask) / counts
    metrics["clip_ratio/low_mean"].append(global_mean(low, per_sequence))
    metrics["clip_ratio/high_mean"].append(global_mean(high, per_sequence))
    metrics["clip_ratio/region_mean"].append(global_mean(torch.maximum(low, high), per_sequence))
    metrics["clip_ratio/low_min"].append(_nanmin(self.accelerator.gather(seq_low)))
    metrics["clip_ratio/high_max"].append(-_nanmin(-self.accelerator.gather(seq_high)))


def _log_ratio(logp: Tensor, old: Tensor | None, layout: Layout) -> Tensor:
    """TRL's per-token log ratio logp - old of the counted tokens (0 elsewhere; on policy without old)."""
    if old is None:
        return torch.zeros_like(logp)
    return torch.where(layout.mask, logp - old.to(logp.dtype), 0.0)
