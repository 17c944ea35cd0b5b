"""rlops.integrations.trl.selective_log_softmax against TRL 1.16's own, on TRL's row_mask contract.

TRL (trl/trainer/utils.py) takes `row_mask` of index's shape, (...) for one id per row and (..., K)
for K ids per row, and zeroes `row_mask == 0`: any other value counts, whatever the dtype. The
drop-in matches that entry by entry, values and gradients.
"""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, assert_grad_close, assert_values_close

from rlops.integrations import trl as rlops_trl


def _masks(shape: tuple[int, ...], g: torch.Generator) -> list[torch.Tensor]:
    """bool, 0/1 int, int with other nonzero values, float with fractions and NaN: TRL's `== 0` rule."""
    keep = torch.rand(shape, generator=g) > 0.3
    values = torch.randint(-2, 3, shape, generator=g)
    fractions = torch.rand(shape, generator=g).round(decimals=1)
    fractions.view(-1)[0] = torch.nan
    return [m.to(DEVICE) for m in (keep, keep.int(), values, fractions, torch.zeros(shape), torch.ones(shape))]


@pytest.mark.parametrize(("logits_shape", "k", "backend"), [
    ((3, 5, 37), None, "auto"), ((3, 5, 37), 4, "auto"), ((6, 37), 3, "auto"), ((6, 37), None, "auto"),
    ((2, 3, 37), None, "triton"),  # the mask reaches the kernel as a bool row mask (Triton's interpreter on CPU)
])
def test_row_mask_of_index_shape_equals_trl(logits_shape: tuple[int, ...], k: int | None, backend: str) -> None:
    from trl.trainer import utils as trl_utils

    g = torch.Generator().manual_seed(len(logits_shape) + (k or 0))
    logits = (torch.randn(logits_shape, generator=g) * 2).to(DEVICE)
    index_shape = logits_shape[:-1] if k is None else (*logits_shape[:-1], k)
    index = torch.randint(0, logits_shape[-1], index_shape, generator=g).to(DEVICE)
    weights = torch.randn(index_shape, generator=g).to(DEVICE)
    masks = _masks(index_shape, g)
    for temperature in (1.0, 0.7) if backend == "auto" else (0.7,):
        for row_mask in masks if backend == "auto" else masks[2:4]:
            ours_x, theirs_x = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
            ours = rlops_trl.selective_log_softmax(ours_x, index, temperature, row_mask, backend=backend)
            theirs = trl_utils.selective_log_softmax(theirs_x, index, temperature, row_mask)
            assert ours.shape == theirs.shape == index.shape
            assert_values_close(ours, theirs)
            (ours * weights).sum().backward()
            (theirs * weights).sum().backward()
            assert_grad_close(ours_x.grad, theirs_x.grad)


def test_row_mask_refusals_name_it() -> None:
    logits, index = torch.randn(3, 5, 11), torch.randint(0, 11, (3, 5, 2))
    with pytest.raises(ValueError, match=r"row_mask must have shape \(3, 5, 2\) or \(3, 5\)"):
        rlops_trl.selective_log_softmax(logits, index, 1.0, torch.ones(3, 2))
    with pytest.raises(TypeError, match=r"row_mask must be a torch\.Tensor"):
        rlops_trl.selective_log_softmax(logits, index, 1.0, [[1] * 5] * 3)
    with pytest.raises(ValueError, match="row_mask is on meta but index is on"):  # another device than index's
        rlops_trl.selective_log_softmax(logits, index, 1.0, torch.ones(3, 5, 2, device="meta"))
