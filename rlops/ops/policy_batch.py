"""The policy loss's inputs checked once for every path (logits, fused-linear, vocabulary-parallel):
tensor shapes, dtypes and devices, packed batches as one row, and the options a batch needs."""

from __future__ import annotations

import torch
from torch import Tensor

from .._layout import positions_of
from .._validation import (
    check_float_tensor,
    check_logits,
    check_mask,
    check_shape,
    check_tensor,
    check_token_ids,
    check_token_range,
)
from ..constants import SAMPLED_KL
from ..options import PolicyBatch, PolicyLossConfig
from ..packing import Layout, check_cu_seqlens
from ..rollout_correction import RolloutCorrectionOutput, corrected_in_layout


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


def one_position_more(logits: Tensor, batch: PolicyBatch) -> bool:
    """Whether logits are a causal LM's for batch's (B, T) tokens from the prompt's last position:
    (B, T + 1, V), as Liger's GRPO loss takes them. Their first T positions predict the tokens; the
    last predicts none (its gradient is 0). The fused token-level path reads them as they are: a
    slice's backward would copy the gradient into a zeroed (B, T + 1, V) buffer."""
    tokens = batch.tokens
    return (batch.cu_seqlens is None and isinstance(logits, Tensor) and isinstance(tokens, Tensor)
            and positions_of(logits, tokens) != logits.shape)


def check_batch(logits: Tensor, ref_logits: Tensor | None, batch: PolicyBatch,
                check_ids: bool = True, shifted: bool = False) -> tuple[Tensor, Tensor | None, PolicyBatch, Layout]:
    """Checks the tensor arguments; returns (logits (B, T, V), ref_logits, batch, layout), the batch with
    advantages (B, T) or (B, 1) and mask bool (B, T). A packed batch (cu_seqlens) comes back as one row:
    logits (1, N, V), per-token tensors (1, N), its layout holding the sequences. shifted (see
    `one_position_more`): logits (B, T + 1, V) come back as they are, ref_logits as (B, T, V).
    Token ids are checked where the mask is 1 only: any id (such as -100) may pad a masked token."""
    vocab = check_logits(logits)
    layout = None
    if batch.cu_seqlens is not None:
        logits, batch, layout = packed_as_row(logits, batch, "logits")
        if ref_logits is not None and ref_logits.dim() == 2:
            ref_logits = ref_logits[None]
    shape = logits.shape
    if len(shape) != 3:
        raise ValueError(f"logits must have shape (B, T, V) or (B, T + 1, V), got {tuple(shape)}")
    if shifted:
        shape = torch.Size((shape[0], shape[1] - 1, shape[2]))
    check_token_ids(batch.tokens, shape[:-1], None, logits)
    if ref_logits is not None:
        check_logits(ref_logits, "ref_logits")
        given = [tuple(logits.shape), tuple(shape)] if shifted else [tuple(shape)]
        check_float_tensor("ref_logits", ref_logits, logits, given, "logits' shape " + " or ".join(map(str, given)))
        if ref_logits.shape != shape:
            ref_logits = ref_logits[:, :-1]
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
            and (batch.rollout_logprobs is None or _plain(batch.rollout_logprobs, (per_token,), device))
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
    for name in ("old_logprobs", "ref_logprobs", "rollout_logprobs"):
        if getattr(batch, name) is not None:
            check_float_tensor(name, getattr(batch, name), tokens, [per_token], token_shape, "tokens")
    if batch.is_weights is not None:
        check_float_tensor("is_weights", batch.is_weights, tokens, [per_token, per_row], f"{token_shape} or (B, 1)",
                           "tokens")
    mask = torch.ones(per_token, dtype=torch.bool, device=tokens.device) if batch.mask is None \
        else check_mask(batch.mask, per_token, tokens, like_name="tokens")
    return batch._replace(advantages=advantages[:, None] if advantages.dim() == 1 else advantages, mask=mask)


def apply_rollout_correction(batch: PolicyBatch, layout: Layout, config: PolicyLossConfig
                             ) -> tuple[PolicyBatch, Layout, RolloutCorrectionOutput | None]:
    """The checked batch with config.rollout_correction applied (docs/rollout_correction.md): its
    importance weights as is_weights and its rejected tokens out of the mask (so out of every
    aggregation's counts); returns (batch, layout, the correction's output or None)."""
    options = config.rollout_correction
    if options is None:
        return batch, layout, None
    if batch.rollout_logprobs is None or batch.old_logprobs is None:
        raise ValueError("rollout_correction needs rollout_logprobs (B, T), the rollout engine's log-probs of the "
                         "sampled tokens, and old_logprobs (B, T), the trainer's (the weights are their ratio)")
    if batch.is_weights is not None:
        raise ValueError("pass either is_weights (importance weights computed by the caller) or rollout_correction "
                         "(rlops computes them), not both")
    # The batch and its layout are checked and built already: the correction reuses them.
    out = corrected_in_layout(batch.old_logprobs, batch.rollout_logprobs, layout, options)
    mask = out.mask
    return batch._replace(mask=mask, is_weights=out.weights), layout._replace(mask=mask), out
