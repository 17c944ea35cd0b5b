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


def test_gae_packed(gpu_backend: str) -> None:
    # 1000 sequences of 0 to 6000 tokens (lengths 0 and 1 included) in one row: equal to the padded
    # batch of the same sequences on the same backend, and to verl's loop.
    from rlops.packing import cu_seqlens_from_lengths, pack

    g = torch.Generator(device="cuda").manual_seed(1)
    lengths = torch.randint(0, 6001, (1000,), generator=g, device="cuda")
    lengths[:4] = torch.tensor([0, 1, 0, 1], device="cuda")
    rows, time = lengths.numel(), int(lengths.max())
    rewards = torch.randn(rows, time, generator=g, device="cuda")
    values = torch.randn(rows, time, generator=g, device="cuda")
    mask = (torch.rand(rows, time, generator=g, device="cuda") > 0.2) & (
        torch.arange(time, device="cuda") < lengths[:, None])
    bootstrap = torch.randn(rows, generator=g, device="cuda")
    cu = cu_seqlens_from_lengths(lengths)
    packed = [pack(x, lengths) for x in (rewards, values, mask)]
    packed[0] = packed[0].masked_fill(~packed[2], float("nan"))  # masked values never leak
    adv, ret = rlops.gae(*packed, gamma=0.999, lam=0.95, bootstrap=bootstrap, cu_seqlens=cu, backend=gpu_backend)
    padded = rlops.gae(rewards, values, mask, gamma=0.999, lam=0.95, bootstrap=bootstrap, backend=gpu_backend)
    want_adv, want_ret = baselines.verl_gae_loop(rewards.double(), values.double(), mask, 0.999, 0.95,
                                                 bootstrap.double())
    for got, same, want in ((adv, padded[0], want_adv), (ret, padded[1], want_ret)):
        want = pack(torch.where(mask, want, 0.0), lengths)
        tol = 1e-5 * max(1.0, want.abs().max().item())
        assert (got.double() - want).abs().max().item() <= tol
        assert (got - pack(same, lengths)).abs().max().item() <= tol
