"""GAE (reverse-scan kernel and reference), group advantages, whitening, KL-shaped rewards (SPEC section 5).

The oracle for GAE is a plain reversed Python loop in float64, written the way verl writes
it; verl's and TRL's own advantage code is restated below with its source.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from helpers import DEVICE
from hypothesis import given, settings
from hypothesis import strategies as st

import rlops
from rlops import baselines, reference
from rlops.packing import Layout, cu_seqlens_from_lengths, pack


def verl_style_gae(rewards, values, mask, gamma, lam, bootstrap=None):
    """The oracle: verl's reversed loop (rlops.baselines.verl_gae_loop) in float64 on the CPU,
    with SPEC's zeros at masked positions."""
    m = mask.double().cpu()
    adv, ret = baselines.verl_gae_loop(rewards.double().cpu(), values.double().cpu(), m, gamma, lam,
                                       None if bootstrap is None else bootstrap.double().cpu())
    return adv * m, ret * m


def _gae_inputs(rows: int, time: int, seed: int = 0, dtype: torch.dtype = torch.float32, p_mask: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(rows, time, generator=g).to(dtype)
    values = torch.randn(rows, time, generator=g).to(dtype)
    mask = torch.rand(rows, time, generator=g) > p_mask
    if rows > 2 and time > 6:
        mask[1, 2:5] = False  # an interior masked run (multi-turn observation tokens)
        mask[2] = False  # a row with no valid token
    bootstrap = torch.randn(rows, generator=g).to(dtype)
    return rewards.to(DEVICE), values.to(DEVICE), mask.to(DEVICE), bootstrap.to(DEVICE)


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    # Float32 sums of many discounted terms: 1e-5 of the largest magnitude (and of 1).
    expected = expected.to(actual.device, torch.float64)
    tol = 1e-5 * max(1.0, expected.abs().max().item() if expected.numel() else 0.0)
    err = (actual.double() - expected).abs().max().item() if actual.numel() else 0.0
    assert math.isfinite(err) and err <= tol, f"{what}: max abs error {err:.3g} > {tol:.3g}"


GAE_CASES = [
    # rows, time, gamma, lam, bootstrap
    (4, 7, 0.99, 0.95, False),
    (4, 7, 0.99, 0.95, True),
    (3, 1, 0.9, 0.8, True),
    (5, 300, 1.0, 0.95, False),
    (5, 300, 1.0, 1.0, True),
    (3, 1500, 0.99, 0.95, True),  # two blocks of the scan
    (2, 64, 0.0, 0.5, True),
    (2, 64, 0.7, 0.0, False),
]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("rows, time, gamma, lam, with_bootstrap", GAE_CASES)
def test_gae_matches_the_loop(rows, time, gamma, lam, with_bootstrap, backend) -> None:
    rewards, values, mask, bootstrap = _gae_inputs(rows, time)
    bootstrap = bootstrap if with_bootstrap else None
    adv, ret = rlops.gae(rewards, values, mask, gamma=gamma, lam=lam, bootstrap=bootstrap, backend=backend)
    want_adv, want_ret = verl_style_gae(rewards, values, mask, gamma, lam, bootstrap)
    assert adv.dtype == ret.dtype == torch.float32 and adv.shape == (rows, time)
    _close(adv, want_adv, "advantages")
    _close(ret, want_ret, "returns")
    assert not adv[~mask].any() and not ret[~mask].any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_gae_input_dtypes(dtype: torch.dtype) -> None:
    rewards, values, mask, bootstrap = _gae_inputs(3, 50, dtype=dtype)
    adv, ret = rlops.gae(rewards, values, mask.float(), gamma=0.99, lam=0.95, bootstrap=bootstrap, backend="triton")
    want_adv, want_ret = verl_style_gae(rewards, values, mask, 0.99, 0.95, bootstrap)
    _close(adv, want_adv, "advantages")
    _close(ret, want_ret, "returns")


def test_gae_strided_rows_and_empty() -> None:
    rewards, values, mask, _ = _gae_inputs(6, 40)
    adv, ret = rlops.gae(rewards[::2, 3:], values[::2, 3:], mask[::2, 3:], gamma=0.9, backend="triton")
    want_adv, want_ret = verl_style_gae(rewards[::2, 3:], values[::2, 3:], mask[::2, 3:], 0.9, 0.95)
    _close(adv, want_adv, "advantages")
    _close(ret, want_ret, "returns")
    for shape in ((0, 5), (3, 0)):
        empty = torch.zeros(shape, device=DEVICE)
        adv, ret = rlops.gae(empty, empty, backend="triton")
        assert adv.shape == ret.shape == shape


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gae_padding_values_never_leak(backend: str) -> None:
    rewards, values, mask, bootstrap = _gae_inputs(4, 30)
    clean = rlops.gae(rewards, values, mask, gamma=0.99, bootstrap=bootstrap, backend=backend)
    nan_r = rewards.masked_fill(~mask, float("nan"))
    nan_v = values.masked_fill(~mask, float("inf"))
    padded = rlops.gae(nan_r, nan_v, mask, gamma=0.99, bootstrap=bootstrap, backend=backend)
    assert torch.equal(clean[0], padded[0]) and torch.equal(clean[1], padded[1])


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 4),
    time=st.integers(1, 70),
    gamma=st.floats(0.0, 1.0),
    lam=st.floats(0.0, 1.0),
    p_mask=st.floats(0.0, 0.9),
    with_bootstrap=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_gae_property(rows, time, gamma, lam, p_mask, with_bootstrap, seed) -> None:
    rewards, values, mask, bootstrap = _gae_inputs(rows, time, seed, p_mask=p_mask)
    bootstrap = bootstrap if with_bootstrap else None
    adv, ret = rlops.gae(rewards, values, mask, gamma=gamma, lam=lam, bootstrap=bootstrap, backend="triton")
    want_adv, want_ret = verl_style_gae(rewards, values, mask, gamma, lam, bootstrap)
    _close(adv, want_adv, "advantages")
    _close(ret, want_ret, "returns")


def test_gae_closed_forms() -> None:
    # lam = 0: A_t = delta_t. gamma = lam = 1, no mask: A_t = sum_{s>=t} r_s + bootstrap - V_t.
    rewards, values, _, bootstrap = _gae_inputs(3, 40)
    adv, _ = rlops.gae(rewards, values, gamma=0.8, lam=0.0, bootstrap=bootstrap, backend="triton")
    next_values = torch.cat([values[:, 1:], bootstrap[:, None]], dim=1)
    _close(adv, rewards + 0.8 * next_values - values, "lam=0")
    adv, ret = rlops.gae(rewards, values, gamma=1.0, lam=1.0, bootstrap=bootstrap, backend="triton")
    to_go = rewards.double().flip(-1).cumsum(-1).flip(-1)
    _close(adv, to_go + bootstrap.double()[:, None] - values.double(), "gamma=lam=1")
    _close(ret, to_go + bootstrap.double()[:, None], "returns = rewards-to-go")


def verl_compute_gae_advantage_return(token_level_rewards, values, response_mask, gamma, lam):
    """verl (volcengine/verl @ 012be9d9) verl/trainer/ppo/core_algos.py compute_gae_advantage_return,
    restated, with verl_F.masked_whiten (verl/utils/torch_functional.py): mean and unbiased
    variance over the mask, (x - mean) * rsqrt(var + 1e-8)."""
    # verl's advantages at masked positions carry lastgaelam rather than 0: compared on mask=1 only.
    adv, _ = verl_style_gae(token_level_rewards, values, response_mask, gamma, lam)
    m = response_mask.double().cpu()
    returns = adv + values.double().cpu()
    mean = (adv * m).sum() / m.sum()
    var = ((adv - mean) ** 2 * m).sum() / (m.sum() - 1)
    return (adv - mean) * torch.rsqrt(var + 1e-8), returns


def test_gae_equals_verl() -> None:
    rewards, values, mask, _ = _gae_inputs(6, 80, seed=7)
    adv, ret = rlops.gae(rewards, values, mask, gamma=0.99, lam=0.95)
    white = rlops.masked_whiten(adv, mask)
    want_adv, want_ret = verl_compute_gae_advantage_return(rewards, values, mask, 0.99, 0.95)
    valid = mask.cpu()
    _close(white.cpu()[valid], want_adv[valid], "whitened advantages")
    _close(ret.cpu()[valid], want_ret[valid], "returns")


def trl_ppo_advantages(logprobs, ref_logprobs, values, scores, sequence_lengths, kl_coef, gamma, lam):
    """TRL's PPOTrainer.train (trl/trainer/ppo_trainer.py, v0.11-v0.19), restated: padding
    past the last generated token, values kept one position further, k1 KL rewards with the
    score on the position after the last token, GAE over every position, whitening on the
    unpadded tokens. sequence_lengths is the index of each row's last generated token."""
    idx = torch.arange(logprobs.shape[1]).repeat(logprobs.shape[0], 1)
    padding_mask = idx > sequence_lengths[:, None]
    padding_mask_p1 = idx > (sequence_lengths + 1)[:, None]
    logprobs = logprobs.masked_fill(padding_mask, 1.0)  # TRL's INVALID_LOGPROB
    ref_logprobs = ref_logprobs.masked_fill(padding_mask, 1.0)
    values = values.masked_fill(padding_mask_p1, 0)
    rewards = -kl_coef * (logprobs - ref_logprobs)
    actual_end = torch.where(sequence_lengths + 1 < rewards.size(1), sequence_lengths + 1, sequence_lengths)
    rewards[torch.arange(rewards.size(0)), actual_end] += scores
    lastgaelam = 0
    advantages_reversed = []
    gen_length = rewards.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    returns = advantages + values
    valid = ~padding_mask
    mean = advantages[valid].mean()
    var = advantages[valid].var()
    advantages = ((advantages - mean) * torch.rsqrt(var + 1e-8)).masked_fill(padding_mask, 0)
    return advantages, returns, rewards


def test_kl_rewards_and_gae_equal_trl_ppo() -> None:
    g = torch.Generator().manual_seed(11)
    rows, time = 5, 24
    logprobs = -torch.rand(rows, time, generator=g, dtype=torch.float64) * 3
    ref_logprobs = -torch.rand(rows, time, generator=g, dtype=torch.float64) * 3
    values = torch.randn(rows, time, generator=g, dtype=torch.float64)
    scores = torch.randn(rows, generator=g, dtype=torch.float64)
    sequence_lengths = torch.tensor([5, 23, 0, 12, 22])
    want_adv, want_ret, want_rewards = trl_ppo_advantages(logprobs, ref_logprobs, values, scores,
                                                          sequence_lengths, 0.05, 1.0, 0.95)
    # TRL's value and reward positions run one past the last generated token (the "p1" mask).
    idx = torch.arange(time).repeat(rows, 1)
    generated = idx <= sequence_lengths[:, None]
    p1 = idx <= (sequence_lengths + 1)[:, None]
    lp = torch.where(generated, logprobs, ref_logprobs)  # TRL's KL is 0 past the generated tokens
    rewards = rlops.kl_shaped_rewards(scores, lp, ref_logprobs, p1, kl_coef=0.05, estimator="k1")
    _close(rewards[p1], want_rewards[p1], "rewards")
    adv, ret = rlops.gae(rewards.to(DEVICE), values.to(DEVICE), p1.to(DEVICE), gamma=1.0, lam=0.95)
    white = rlops.masked_whiten(adv, generated.to(DEVICE)).cpu()
    _close(white[generated], want_adv[generated], "whitened advantages")
    _close(ret.cpu()[p1], want_ret[p1], "returns")


def test_gae_under_torch_compile() -> None:
    rewards, values, mask, bootstrap = _gae_inputs(3, 20)

    def fn(r, v, m, b):
        return rlops.gae(r, v, m, gamma=0.99, lam=0.95, bootstrap=b, backend="triton")

    got = torch.compile(fn, backend="aot_eager", fullgraph=True)(rewards, values, mask, bootstrap)
    want = fn(rewards, values, mask, bootstrap)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"values": "short"}, ValueError, "values must have shape"),
        ({"mask": "short"}, ValueError, "mask must have shape"),
        ({"bootstrap": "wrong"}, ValueError, "bootstrap must have shape"),
        ({"gamma": 1.5}, ValueError, r"gamma must lie in \[0, 1\]"),
        ({"lam": -0.1}, ValueError, r"lam must lie in \[0, 1\]"),
        ({"gamma": "0.9"}, TypeError, "gamma must be a float"),
        ({"rewards": "int"}, ValueError, "rewards must be a floating-point"),
        ({"backend": "gpu"}, ValueError, "backend must be one of"),
    ],
)
def test_gae_bad_input(kwargs, error, match) -> None:
    rewards, values, mask, bootstrap = _gae_inputs(3, 10)
    args = {"rewards": rewards, "values": values, "mask": mask, "bootstrap": bootstrap}
    replacements = {"short": lambda x: x[:, :-1], "wrong": lambda x: x[:-1], "int": lambda x: x.long()}
    for key, value in kwargs.items():
        args[key] = replacements[value](args[key]) if value in replacements else value
    with pytest.raises(error, match=match):
        rlops.gae(args.pop("rewards"), args.pop("values"), args.pop("mask"), **args)


# ------------------------------------------------------------------------------------------
# Packed (padding-free) GAE: the same sequences in one row of N tokens, boundaries in cu_seqlens
# ------------------------------------------------------------------------------------------

PACKED_LENGTHS = [5, 0, 1, 17, 0, 1, 40, 3, 2, 1, 9]  # lengths 0 and 1, and one longer than a tile of 16


def _packed_gae_inputs(lengths: list[int], seed: int = 0, p_mask: float = 0.3):
    """(padded, packed, bootstrap, cu_seqlens, lengths): padded = rewards, values, mask (S, max_len) with
    the padding masked; packed = the same three (N,)."""
    rewards, values, mask, _ = _gae_inputs(len(lengths), max(max(lengths), 1), seed, p_mask=p_mask)
    lengths = torch.tensor(lengths, device=DEVICE)
    mask &= torch.arange(mask.shape[1], device=DEVICE) < lengths[:, None]
    bootstrap = torch.randn(len(lengths), generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE)
    padded = (rewards, values, mask)
    return padded, tuple(pack(x, lengths) for x in padded), bootstrap, cu_seqlens_from_lengths(lengths), lengths


def _check_packed_gae(backend: str, lengths: list[int], seed: int = 0, gamma: float = 0.97, lam: float = 0.9,
                      with_bootstrap: bool = True, row: bool = False, padded_backend: str | None = None) -> None:
    """Packed GAE of `backend` equals the padded GAE (of padded_backend, default the same) on the same
    sequences, and the float64 loop."""
    padded, packed, bootstrap, cu, n = _packed_gae_inputs(lengths, seed)
    bootstrap = bootstrap if with_bootstrap else None
    if row:  # Hugging Face's padding-free layout (1, N)
        packed = tuple(x[None] for x in packed)
    adv, ret = rlops.gae(*packed, gamma=gamma, lam=lam, bootstrap=bootstrap, cu_seqlens=cu, backend=backend)
    assert adv.dtype == ret.dtype == torch.float32 and adv.shape == ret.shape == packed[0].shape
    want = rlops.gae(*padded, gamma=gamma, lam=lam, bootstrap=bootstrap, backend=padded_backend or backend)
    oracle = verl_style_gae(*padded, gamma, lam, bootstrap)
    for got, same, exact, what in zip((adv, ret), want, oracle, ("advantages", "returns"), strict=True):
        _close(got.reshape(-1), pack(same, n), f"{what} vs padded")
        _close(got.reshape(-1), pack(exact.to(DEVICE), n), f"{what} vs the loop")
    assert not adv.reshape(-1)[~packed[2].reshape(-1)].any()


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("with_bootstrap, row", [(True, False), (False, True)])
def test_gae_packed_equals_padded(backend: str, with_bootstrap: bool, row: bool) -> None:
    _check_packed_gae(backend, PACKED_LENGTHS, with_bootstrap=with_bootstrap, row=row)


def test_gae_packed_triton_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tiles of 16 tokens: several programs of several sequences each, sequences across tiles.
    from rlops.kernels import gae as gae_kernels

    monkeypatch.setattr(gae_kernels, "MAX_BLOCK_T", 16)
    for seed in range(2):
        _check_packed_gae("triton", PACKED_LENGTHS[seed:], seed=seed, gamma=1.0, lam=0.95, padded_backend="torch")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gae_packed_many_short_sequences(backend: str) -> None:
    g = torch.Generator().manual_seed(4)
    lengths = torch.randint(0, 3, (2000,), generator=g).tolist()
    _check_packed_gae(backend, lengths, seed=4, padded_backend="torch")  # 2000 interpreted rows would take a minute


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gae_packed_padding_values_never_leak(backend: str) -> None:
    _, (rewards, values, mask), bootstrap, cu, _ = _packed_gae_inputs(PACKED_LENGTHS, seed=3)
    clean = rlops.gae(rewards, values, mask, gamma=0.99, bootstrap=bootstrap, cu_seqlens=cu, backend=backend)
    dirty = rlops.gae(rewards.masked_fill(~mask, float("nan")), values.masked_fill(~mask, float("inf")), mask,
                      gamma=0.99, bootstrap=bootstrap, cu_seqlens=cu, backend=backend)
    assert torch.equal(clean[0], dirty[0]) and torch.equal(clean[1], dirty[1])


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gae_packed_empty(backend: str) -> None:
    empty = torch.zeros(0, device=DEVICE)
    for cu in ([0], [0, 0, 0]):
        adv, ret = rlops.gae(empty, empty, cu_seqlens=torch.tensor(cu, device=DEVICE), backend=backend)
        assert adv.shape == ret.shape == (0,)


def test_gae_packed_under_torch_compile() -> None:
    _, packed, bootstrap, cu, _ = _packed_gae_inputs(PACKED_LENGTHS)

    def fn(r, v, m, b, c):
        return rlops.gae(r, v, m, gamma=0.99, lam=0.95, bootstrap=b, cu_seqlens=c, backend="triton")

    got = torch.compile(fn, backend="aot_eager", fullgraph=True)(*packed, bootstrap, cu)
    want = fn(*packed, bootstrap, cu)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"cu_seqlens": lambda cu: cu[:-1]}, ValueError, "cu_seqlens must end at the number of packed tokens"),
        ({"cu_seqlens": lambda cu: cu.float()}, TypeError, "cu_seqlens must be an int32 or int64"),
        ({"cu_seqlens": lambda cu: cu.flip(0)}, ValueError, "cu_seqlens must start at 0"),
        ({"bootstrap": lambda b: b[:-1]}, ValueError, r"bootstrap must have shape \(S,\) = \(11,\)"),
        ({"rewards": lambda r: torch.stack([r, r])}, ValueError,
         r"with cu_seqlens, rewards must be a floating-point \(N,\)"),
        ({"values": lambda v: v[:-1]}, ValueError, "values must have shape"),
        ({"mask": lambda m: m[None]}, ValueError, "mask must have shape"),
    ],
)
def test_gae_packed_bad_input(change, error, match) -> None:
    _, (rewards, values, mask), bootstrap, cu, _ = _packed_gae_inputs(PACKED_LENGTHS)
    args = {"rewards": rewards, "values": values, "mask": mask, "bootstrap": bootstrap, "cu_seqlens": cu}
    args.update({key: fn(args[key]) for key, fn in change.items()})
    with pytest.raises(error, match=match):
        rlops.gae(args.pop("rewards"), args.pop("values"), args.pop("mask"), backend="torch", **args)


# ------------------------------------------------------------------------------------------
# Group advantages, whitening, KL-shaped rewards
# ------------------------------------------------------------------------------------------


def _by_hand_group(rewards: list[float], ids: list[int], scale: bool, eps: float) -> list[float]:
    out = []
    for r, i in zip(rewards, ids, strict=True):
        group = [x for x, j in zip(rewards, ids, strict=True) if j == i]
        mean = statistics.mean(group)
        if len(group) == 1:
            out.append(0.0)
            continue
        out.append((r - mean) / (statistics.stdev(group) + eps) if scale else r - mean)
    return out


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_group_advantages(scale_by_std: bool) -> None:
    g = torch.Generator().manual_seed(3)
    rewards = torch.randn(12, generator=g).to(DEVICE)
    got = rlops.group_advantages(rewards, group_size=4, scale_by_std=scale_by_std)
    want = _by_hand_group(rewards.tolist(), [i // 4 for i in range(12)], scale_by_std, 1e-6)
    assert got.tolist() == pytest.approx(want, abs=1e-5)
    # Explicit ids in any order, with a group of one (advantage 0).
    ids = torch.tensor([7, 3, 7, 3, 3, 9, 7, 3, 7, 7, 3, 3], device=DEVICE)
    got = rlops.group_advantages(rewards[:, None], group_ids=ids, scale_by_std=scale_by_std)
    want = _by_hand_group(rewards.tolist(), ids.tolist(), scale_by_std, 1e-6)
    assert got.tolist() == pytest.approx(want, abs=1e-5)
    assert got[5].item() == 0.0
    same = rlops.group_advantages(torch.ones(6, device=DEVICE), group_size=3)
    assert not same.any()  # equal rewards: std 0, advantage 0 (eps keeps it finite)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "exactly one of group_size"),
        ({"group_size": 4, "group_ids": torch.zeros(12, dtype=torch.long)}, "exactly one of group_size"),
        ({"group_size": 5}, "does not divide"),
        ({"group_size": 0}, "group_size must be an int >= 1"),
        ({"group_ids": torch.zeros(11, dtype=torch.long)}, "group_ids must be an integer"),
        ({"group_ids": torch.zeros(12)}, "group_ids must be an integer"),
    ],
)
def test_group_advantages_bad_input(kwargs, match) -> None:
    kwargs = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=match):
        rlops.group_advantages(torch.randn(12, device=DEVICE), **kwargs)


def test_masked_whiten() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 9, generator=g, dtype=torch.float64) * 3 + 2
    mask = torch.rand(4, 9, generator=g) > 0.4
    vals = x[mask].tolist()
    mean, var = statistics.mean(vals), statistics.variance(vals)
    want = torch.where(mask, (x - mean) / math.sqrt(var + 1e-8), 0.0)
    got = rlops.masked_whiten(x.to(DEVICE), mask.to(DEVICE)).cpu()
    _close(got, want, "whitened")
    got = rlops.masked_whiten(x.to(DEVICE), mask.to(DEVICE), shift_mean=False).cpu()
    _close(got, torch.where(mask, want + mean, 0.0), "whitened, mean kept")
    one = torch.zeros(4, 9, dtype=torch.bool)
    one[2, 3] = True
    assert not rlops.masked_whiten(x.to(DEVICE), one.to(DEVICE)).any()  # one entry: itself minus its mean
    assert not rlops.masked_whiten(x.to(DEVICE), torch.zeros_like(one).to(DEVICE)).any()
    with pytest.raises(TypeError, match="x must be a floating-point"):
        rlops.masked_whiten(torch.ones(3, dtype=torch.long))


def test_kl_shaped_rewards_by_hand() -> None:
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, -1.0], [-0.2, -0.3, -0.4, -0.5], [-1.0, -1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, -9.0], [-0.2, -0.1, -0.4, -0.9], [-1.0, -1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 0, 1], [0, 0, 0, 0]], dtype=torch.bool)
    scores = torch.tensor([2.0, -1.0, 5.0])
    got = rlops.kl_shaped_rewards(scores.to(DEVICE), logprobs.to(DEVICE), ref.to(DEVICE), mask.to(DEVICE), 0.1)
    want = torch.tensor([
        [-0.1 * 0.5, -0.1 * -1.0, -0.1 * 0.0 + 2.0, 0.0],  # score on the last valid token
        [0.0, -0.1 * -0.2, 0.0, -0.1 * 0.4 - 1.0],
        [0.0, 0.0, 0.0, 0.0],  # no valid token: no score
    ])
    _close(got.cpu(), want, "k1 rewards")
    got = rlops.kl_shaped_rewards(scores[:, None].to(DEVICE), logprobs.to(DEVICE), ref.to(DEVICE),
                                  mask.to(DEVICE), 0.1, estimator="k3")
    d = ref - logprobs
    k3 = torch.where(mask, torch.exp(d) - d - 1, 0.0)
    want = torch.where(mask, -0.1 * k3, 0.0)
    want[0, 2] += 2.0
    want[1, 3] -= 1.0
    _close(got.cpu(), want, "k3 rewards")
    with pytest.raises(ValueError, match="estimator must be one of"):
        rlops.kl_shaped_rewards(scores, logprobs, ref, mask, 0.1, estimator="full")
    with pytest.raises(ValueError, match="kl_coef must be >= 0"):
        rlops.kl_shaped_rewards(scores, logprobs, ref, mask, -0.1)
    with pytest.raises(ValueError, match="scores must have shape"):
        rlops.kl_shaped_rewards(scores[:2], logprobs, ref, mask, 0.1)


def test_reference_gae_is_the_loop() -> None:
    rewards, values, mask, bootstrap = _gae_inputs(4, 33, seed=2)
    adv, ret = reference.gae(rewards.double(), values.double(), mask, 0.97, 0.9, bootstrap.double())
    want_adv, want_ret = verl_style_gae(rewards, values, mask, 0.97, 0.9, bootstrap)
    torch.testing.assert_close(adv.cpu(), want_adv, rtol=0, atol=1e-12)
    torch.testing.assert_close(ret.cpu(), want_ret, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------
# Packed group advantages, whitening and KL-shaped rewards: equal to the padded ones
# ------------------------------------------------------------------------------------------


def _packed_layout(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor, Layout]:
    """(lengths, cu_seqlens, layout of the N packed tokens)."""
    lengths = torch.tensor(lengths, device=DEVICE)
    cu = cu_seqlens_from_lengths(lengths)
    n = int(lengths.sum())
    return lengths, cu, Layout.of(torch.ones(n, dtype=torch.bool, device=DEVICE), cu.long())


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_group_advantages_packed(scale_by_std: bool) -> None:
    lengths, cu, layout = _packed_layout([3, 0, 1, 4, 1, 2, 0, 5, 1, 1, 2, 6])  # 12 sequences, 3 groups of 4
    g = torch.Generator().manual_seed(8)
    scores = torch.randn(12, generator=g).to(DEVICE)
    ids = torch.tensor([7, 3, 7, 3, 3, 9, 7, 3, 7, 7, 3, 3], device=DEVICE)
    # Token-level rewards whose sums per sequence are the scores (an empty sequence sums to 0).
    scores = torch.where(lengths > 0, scores, 0.0)
    token_rewards = layout.per_token(scores) / layout.per_token(lengths.clamp(min=1).float())
    for groups in ({"group_size": 4}, {"group_ids": ids}):
        padded = rlops.group_advantages(scores, **groups, scale_by_std=scale_by_std)
        want = layout.per_token(padded)  # each token its sequence's advantage
        for rewards in (scores, scores[:, None], token_rewards, token_rewards[None]):
            got = rlops.group_advantages(rewards, **groups, scale_by_std=scale_by_std, cu_seqlens=cu)
            assert got.dtype == torch.float32 and got.shape == (layout.mask.numel(),)
            _close(got, want, f"{groups.keys()} {tuple(rewards.shape)}")


def test_group_advantages_packed_reading_rule() -> None:
    # S == N == 4 with an empty sequence: (N,) and (1, N) are read per token (as policy_loss reads
    # advantages), (S, 1) per sequence.
    _, cu, _ = _packed_layout([2, 0, 1, 1])
    x = torch.tensor([1.0, 2.0, 4.0, 8.0], device=DEVICE)
    for rewards, want in ((x, [1.5, 1.5, -2.0, 2.0]),  # sums 3, 0 | 4, 8
                          (x[None], [1.5, 1.5, -2.0, 2.0]),
                          (x[:, None], [-0.5, -0.5, -2.0, 2.0])):  # scores 1, 2 | 4, 8
        assert rlops.group_advantages(rewards, group_size=2, scale_by_std=False, cu_seqlens=cu).tolist() == want


@pytest.mark.parametrize(
    "rewards, kwargs, error, match",
    [
        (torch.ones(5), {"group_size": 2}, ValueError, r"rewards must have shape \(S,\) = \(4,\) or \(S, 1\) \(one per "
                                                      r"sequence\), or \(N,\) = \(4,\) or \(1, N\)"),
        (torch.ones(4, 2), {"group_size": 2}, ValueError, r"with cu_seqlens, rewards must have shape \(S,\)"),
        (torch.ones(4), {"group_ids": torch.zeros(5, dtype=torch.long)}, ValueError,
         r"group_ids must be an integer \(S,\) = \(4,\)"),
        (torch.ones(4), {"group_size": 3}, ValueError, "does not divide the batch of 4 sequences"),
        (torch.ones(1, 4), {"group_size": 2, "cu_seqlens": torch.tensor([0, 2, 1, 4, 4])}, ValueError,
         "non-decreasing"),
        (torch.ones(1, 4), {"group_size": 2, "cu_seqlens": torch.tensor([0, 2, 2, 3, 4.0])}, TypeError,
         "cu_seqlens must be an int32 or int64"),
    ],
)
def test_group_advantages_packed_bad_input(rewards, kwargs, error, match) -> None:
    kwargs = {"cu_seqlens": torch.tensor([0, 2, 2, 3, 4]), **kwargs}
    kwargs = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    with pytest.raises(error, match=match):
        rlops.group_advantages(rewards.to(DEVICE), **kwargs)


def test_masked_whiten_packed() -> None:
    padded, (x, _, mask), _, cu, lengths = _packed_gae_inputs(PACKED_LENGTHS, seed=9)
    for shift_mean in (True, False):
        want = pack(rlops.masked_whiten(padded[0], padded[2], shift_mean=shift_mean), lengths)
        _close(rlops.masked_whiten(x, mask, shift_mean=shift_mean, cu_seqlens=cu), want, "whitened")
        _close(rlops.masked_whiten(x[None], mask[None], shift_mean=shift_mean, cu_seqlens=cu)[0], want, "(1, N)")
    nan_x = x.masked_fill(~mask, float("nan"))
    assert torch.equal(rlops.masked_whiten(nan_x, mask, cu_seqlens=cu), rlops.masked_whiten(x, mask, cu_seqlens=cu))
    with pytest.raises(ValueError, match=r"with cu_seqlens, x must have shape \(N,\) or \(1, N\)"):
        rlops.masked_whiten(torch.stack([x, x]), cu_seqlens=cu)
    with pytest.raises(ValueError, match="cu_seqlens must end at the number of packed tokens"):
        rlops.masked_whiten(x[:-1], cu_seqlens=cu)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_shaped_rewards_packed(estimator: str) -> None:
    lengths = [4, 0, 1, 6, 3, 1, 5]
    g = torch.Generator().manual_seed(12)
    rows, time = len(lengths), max(lengths)
    logprobs = (-torch.rand(rows, time, generator=g) * 3).to(DEVICE)
    ref = (-torch.rand(rows, time, generator=g) * 3).to(DEVICE)
    n = torch.tensor(lengths, device=DEVICE)
    mask = (torch.rand(rows, time, generator=g) > 0.3).to(DEVICE) & (torch.arange(time, device=DEVICE) < n[:, None])
    mask[3] = False  # a sequence with tokens but none valid: no score
    mask[4, 2] = True  # ends on a valid token
    mask[4, 1] = False
    scores = torch.randn(rows, generator=g).to(DEVICE)
    cu = cu_seqlens_from_lengths(n)
    want = pack(rlops.kl_shaped_rewards(scores, logprobs, ref, mask, 0.1, estimator), n)
    # NaN where the mask is 0 must not leak (padding logprobs of any value).
    lp, rf, m = (pack(x, n) for x in (logprobs.masked_fill(~mask, float("nan")), ref, mask))
    for s in (scores, scores[:, None]):
        got = rlops.kl_shaped_rewards(s, lp, rf, m, 0.1, estimator, cu_seqlens=cu)
        assert got.shape == lp.shape and got.dtype == torch.float32
        _close(got, want, "packed rewards")
    got = rlops.kl_shaped_rewards(scores, lp[None], rf[None], m[None], 0.1, estimator, cu_seqlens=cu)
    assert got.shape == (1, lp.numel())
    _close(got[0], want, "(1, N) rewards")
    with pytest.raises(ValueError, match=r"scores must have shape \(S,\) or \(S, 1\), one per packed sequence \(S = 7"):
        rlops.kl_shaped_rewards(scores[:-1], lp, rf, m, 0.1, cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"with cu_seqlens, logprobs must be a floating-point \(N,\) or \(1, N\)"):
        rlops.kl_shaped_rewards(scores, torch.stack([lp, lp]), rf, m, 0.1, cu_seqlens=cu)
    with pytest.raises(ValueError, match="ref_logprobs must have shape"):
        rlops.kl_shaped_rewards(scores, lp, rf[:-1], m, 0.1, cu_seqlens=cu)
