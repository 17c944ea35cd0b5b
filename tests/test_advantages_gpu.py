"""GAE at real sizes on CUDA (skipped without a GPU): the reverse-scan kernel against verl's loop in float64."""

from __future__ import annotations

import pytest
import torch

import rlops
from rlops import baselines

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("rows, time", [(512, 8192), (8, 32768), (3, 5000)])
def test_gae_long_rows(rows: int, time: int, gpu_backend: str) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    rewards = torch.randn(rows, time, generator=g, device="cuda")
    values = torch.randn(rows, time, generator=g, device="cuda")
    mask = torch.rand(rows, time, generator=g, device="cuda") > 0.2
    bootstrap = torch.randn(rows, generator=g, device="cuda")
    adv, ret = rlops.gae(rewards, values, mask, gamma=0.999, lam=0.95, bootstrap=bootstrap, backend=gpu_backend)
    want_adv, want_ret = baselines.verl_gae_loop(rewards.double(), values.double(), mask, 0.999, 0.95,
                                                 bootstrap.double())
    for got, want in ((adv, want_adv), (ret, want_ret)):
        want = torch.where(mask, want, 0.0)
        tol = 1e-5 * max(1.0, want.abs().max().item())
        assert (got.double() - want).abs().max().item() <= tol
