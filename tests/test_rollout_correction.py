"""Rollout correction (rlops.rollout_correction, rlops.integrations.verl_rollout) against verl 0.9.1,
TRL 1.16 and a float64 oracle.

verl: the real functions of verl/trainer/ppo/rollout_corr_helper.py, imported as tests/test_estimators.py
imports verl (tests/verl_standins stand in for a missing ray / tensordict / orjson while verl is
imported). verl.protocol.DataProto does not work on the stand-in tensordict, so the parity test of
`compute_rollout_correction_and_rejection_mask` replaces the helper module's `DataProto` name (used
only to wrap the finished weights) by a plain holder; everything verl computes is its own.

TRL: GRPOTrainer computes the vLLM importance-sampling ratio inline, so `_trl_is` below restates
trl/trainer/grpo_trainer.py of TRL 1.16 (lines 2660-2707, the ratio; 2860-2893, its metrics).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from types import ModuleType, SimpleNamespace

import pytest
import torch
from verl_import import import_verl

from rlops.integrations import verl_rollout as vr
from rlops.packing import cu_seqlens_from_lengths, pack, unpack
from rlops.rollout_correction import REJECTION_OPTIONS, RolloutCorrection, rollout_correction

TOL64 = 1e-6
TOL32 = 2e-5


@pytest.fixture(scope="module")
def verl() -> ModuleType:
    """verl 0.9.1's rollout_corr_helper, imported with stand-ins for what is missing."""
    (helper,) = import_verl("verl.trainer.ppo.rollout_corr_helper")
    assert set(REJECTION_OPTIONS) == helper.SUPPORTED_ROLLOUT_RS_OPTIONS
    return helper


# ---- inputs ---------------------------------------------------------------------------------------------------

LENGTHS = [7, 4, 0, 6, 1, 5]  # right padding, an empty response, a single token
B, T = len(LENGTHS), 7


def _batch(seed: int, dtype: torch.dtype = torch.float64, spread: float = 0.4, nan_pad: bool = True,
           holes: bool = True) -> SimpleNamespace:
    """(B, T) trainer / engine log-probs, a bool mask (right padding, multi-turn holes, one fully
    masked row inside its length) and the lengths. NaN engine log-probs on some padding (verl and
    TRL must not let them through)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(LENGTHS)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    if holes:
        mask[0, 2:4] = False  # observation tokens of a multi-turn response
        mask[5, :] = False  # a response whose every token is masked (its length is still 5)
    lp = -3 * torch.rand(B, T, generator=g, dtype=torch.float64)
    rlp = lp + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    rlp[1, 1] = lp[1, 1] + 2.5  # far-off tokens: ratios e^-2.5 and e^1.5
    rlp[0, 4] = lp[0, 4] - 1.5
    if nan_pad:
        rlp[1, 5:] = float("nan")
    return SimpleNamespace(lp=lp.to(dtype), rlp=rlp.to(dtype), mask=mask, lengths=lengths)


def _close(actual: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor, tol: float) -> None:
    a, e = actual.double()[mask], expected.double()[mask]
    torch.testing.assert_close(a, e, rtol=tol, atol=tol, equal_nan=True)


def _metrics_close(ours: dict[str, float], theirs: dict[str, float], tol: float) -> None:
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert math.isclose(ours[key], value, rel_tol=tol, abs_tol=tol) or (
            math.isnan(ours[key]) and math.isnan(value)), (key, ours[key], value)


def _prefixed(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k.startswith("rollout_corr/")}


# ---- verl parity ----------------------------------------------------------------------------------------------

IS_CASES = [(level, threshold, norm) for level in ("token", "sequence")
            for threshold in (2.0, "1.3", "0.5_2.0", "0.6_1.6") for norm in (False, True)]


@pytest.mark.parametrize(("level", "threshold", "normalize"), IS_CASES)
def test_weights_match_verl(verl: ModuleType, level: str, threshold: object, normalize: bool) -> None:
    x = _batch(1)
    lr = x.lp - x.rlp
    w_verl, m_verl = verl.compute_rollout_correction_weights(lr, x.mask.double(), level, threshold, normalize)
    w, m = vr.compute_rollout_correction_weights(lr, x.mask.double(), level, threshold, normalize)
    assert w.dtype == w_verl.dtype and w.shape == w_verl.shape
    _close(w, w_verl, x.mask, TOL64)
    assert torch.equal(w[~x.mask], torch.zeros_like(w[~x.mask]))  # verl's are NaN where the padding was NaN
    _metrics_close(m, m_verl, TOL64)
    assert m_verl["rollout_is_ratio_fraction_high"] > 0 or level == "sequence"


RS_CASES = [("token_k1", "0.5_1.5"), ("token_k1", 1.5), ("token_k2", 0.1), ("token_k3", 0.05),
            ("seq_sum_k1", "0.5_2.0"), ("seq_sum_k2", 0.3), ("seq_sum_k3", 0.2), ("seq_mean_k1", 1.2),
            ("seq_mean_k2", 0.06), ("seq_mean_k3", "0.06"), ("seq_max_k2", 0.2), ("seq_max_k3", 0.3),
            ("token_k2, seq_mean_k1,token_k2", "0.12,0.95_1.2"), ("seq_max_k3,seq_sum_k1,token_k1", "0.4,0.6_1.8,2")]


@pytest.mark.parametrize(("options", "threshold"), RS_CASES)
def test_rejection_matches_verl(verl: ModuleType, options: str, threshold: object) -> None:
    x = _batch(2)
    lr = x.lp - x.rlp
    mask_verl, m_verl = verl.compute_rollout_rejection_mask(lr, x.mask.double(), options, threshold)
    mask, m = vr.compute_rollout_rejection_mask(lr, x.mask.double(), options, threshold)
    assert mask.dtype == mask_verl.dtype
    assert torch.equal(mask, mask_verl)
    assert 0 < mask.sum() < x.mask.sum(), "thresholds must reject some tokens, not all"
    _metrics_close(m, m_verl, TOL64)


def test_icepop_rejecting_everything(verl: ModuleType) -> None:
    """verl divides by a zero mean in its effective sample size (a Python ZeroDivisionError) when
    IcePop zeroes every weight; rlops reports an effective sample size of inf instead."""
    x = _batch(1)
    lr, mask = x.lp - x.rlp, x.mask.double()
    with pytest.raises(ZeroDivisionError):
        verl.compute_rollout_correction_weights(lr, mask, "sequence", "0.99_1.01")
    w, m = vr.compute_rollout_correction_weights(lr, mask, "sequence", "0.99_1.01")
    assert not w.any() and m["rollout_is_eff_sample_size"] == math.inf


def test_all_rejection_options_covered(verl: ModuleType) -> None:
    named = {o.strip() for spec, _ in RS_CASES for o in spec.split(",")}
    assert named == verl.SUPPORTED_ROLLOUT_RS_OPTIONS


class _Proto:
    """Holds the weights where verl would build a DataProto (needs the real tensordict)."""

    @staticmethod
    def from_dict(tensors: dict[str, torch.Tensor]) -> SimpleNamespace:
        return SimpleNamespace(batch=tensors)


FULL_CASES = [dict(rollout_is="token", rollout_is_threshold=2.0),
              dict(rollout_is="sequence", rollout_is_threshold="0.5_3.0", rollout_is_batch_normalize=True,
                   rollout_rs="seq_mean_k3,token_k1", rollout_rs_threshold="0.06,0.4_2.5"),
              dict(rollout_is="token", rollout_is_threshold="0.7_1.5", rollout_is_batch_normalize=True,
                   rollout_rs="seq_max_k2", rollout_rs_threshold=0.3),
              dict(rollout_rs="token_k3", rollout_rs_threshold=0.05),
              dict(rollout_is="sequence", rollout_is_threshold=None)]


@pytest.mark.parametrize("kwargs", FULL_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_unified_matches_verl(verl: ModuleType, monkeypatch: pytest.MonkeyPatch, kwargs: dict,
                              dtype: torch.dtype) -> None:
    monkeypatch.setattr(verl, "DataProto", _Proto)
    tol = TOL64 if dtype == torch.float64 else TOL32
    x = _batch(3, dtype)
    proto_v, mask_v, m_v = verl.compute_rollout_correction_and_rejection_mask(x.lp, x.rlp, x.mask.float(), **kwargs)
    proto, mask, m = vr.compute_rollout_correction_and_rejection_mask(x.lp, x.rlp, x.mask.float(), **kwargs)
    assert torch.equal(mask, mask_v) and mask.dtype == mask_v.dtype
    _metrics_close(m, m_v, tol)
    out = rollout_correction(x.lp, x.rlp, x.mask, RolloutCorrection.from_verl(**kwargs))
    _metrics_close(_prefixed(out.metrics), m_v, tol)
    assert torch.equal(out.mask, mask_v.bool())
    if proto_v is None:
        assert proto is None and out.weights is None
        return
    w_v = proto_v.batch["rollout_is_weights"]
    _close(proto.batch["rollout_is_weights"], w_v, x.mask, tol)
    assert out.weights.dtype == torch.float32 and not out.weights.requires_grad
    _close(out.weights, w_v, x.mask, tol)


@pytest.mark.parametrize("kwargs", [dict(rollout_is="token", rollout_is_threshold="0.5_2.0",
                                         rollout_rs="token_k2,seq_sum_k1", rollout_rs_threshold="0.1,0.3_3"),
                                    dict(rollout_is="sequence", rollout_is_threshold=2.0)])
def test_nan_propagates_as_in_verl(verl: ModuleType, monkeypatch: pytest.MonkeyPatch, kwargs: dict) -> None:
    """A NaN engine log-prob at a counted token: verl lets it through (NaN token weight, 0 under
    IcePop; its sequence fails every rejection criterion); from_verl does the same."""
    monkeypatch.setattr(verl, "DataProto", _Proto)
    x = _batch(4)
    x.rlp[3, 2] = float("nan")
    proto_v, mask_v, m_v = verl.compute_rollout_correction_and_rejection_mask(x.lp, x.rlp, x.mask.float(), **kwargs)
    out = rollout_correction(x.lp, x.rlp, x.mask, RolloutCorrection.from_verl(**kwargs))
    _close(out.weights, proto_v.batch["rollout_is_weights"], x.mask, TOL64)
    assert torch.equal(out.mask, mask_v.bool())
    _metrics_close(_prefixed(out.metrics), m_v, TOL64)


def test_weights_proto_without_tensordict() -> None:
    x = _batch(5)
    proto, _, _ = vr.compute_rollout_correction_and_rejection_mask(x.lp, x.rlp, x.mask, rollout_is="token")
    if importlib.util.find_spec("tensordict") is None:
        assert isinstance(proto, vr.RolloutISWeights)
    assert proto.batch["rollout_is_weights"].shape == (B, T)


# ---- TRL parity -----------------------------------------------------------------------------------------------

def _trl_is(old: torch.Tensor, sampling: torch.Tensor, completion_mask: torch.Tensor, mode: str,
            clip_min: float | None, clip_max: float | None) -> tuple[torch.Tensor, dict[str, float]]:
    """TRL 1.16, trl/trainer/grpo_trainer.py, GRPOTrainer._generate_and_score_completions (no tool
    mask, one process): the ratio (lines 2660-2707) and its metrics (lines 2860-2893)."""
    mask = completion_mask
    per_token_logps_diff = (old - sampling) * mask
    per_token_logps_diff = torch.nan_to_num(per_token_logps_diff, nan=0.0)
    sequence_level_is = mode in ["sequence_mask", "sequence_truncate"]
    logps_diff = per_token_logps_diff.sum(dim=-1, keepdim=True) if sequence_level_is else per_token_logps_diff
    ratio = torch.exp(logps_diff)
    if mode in ["sequence_truncate", "token_truncate"]:
        ratio = torch.clamp(ratio, min=clip_min, max=clip_max)
    else:
        min_val = clip_min if clip_min is not None else -math.inf
        max_val = clip_max if clip_max is not None else math.inf
        ratio = ratio.masked_fill((ratio < min_val) | (ratio > max_val), value=0.0)
    delta = torch.abs(old - sampling)
    mask = completion_mask.bool()
    delta = delta[mask & ~torch.isnan(delta)]
    flat = ratio.flatten() if sequence_level_is else ratio[mask]
    metrics = {"sampling/sampling_logp_difference/mean": torch.mean(delta).item() if delta.numel() else 0.0,
               "sampling/sampling_logp_difference/max": torch.max(delta).item() if delta.numel() else 0.0,
               "sampling/importance_sampling_ratio/min": torch.min(flat).item(),
               "sampling/importance_sampling_ratio/mean": torch.mean(flat).item(),
               "sampling/importance_sampling_ratio/max": torch.max(flat).item()}
    return ratio.expand_as(old), metrics


TRL_CASES = [(mode, lo, hi) for mode in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
             for lo, hi in ((None, 3.0), (0.5, 1.6), (0.9, None)) if not (mode == "token_truncate" and hi is None)]


@pytest.mark.parametrize(("mode", "clip_min", "clip_max"), TRL_CASES)
def test_matches_trl(mode: str, clip_min: float | None, clip_max: float | None) -> None:
    x = _batch(6, spread=0.5 if mode.startswith("token") else 0.15)
    x.rlp[0, 5] = float("nan")  # vLLM could not score it: TRL counts a zero difference
    w_trl, m_trl = _trl_is(x.lp, x.rlp, x.mask.double(), mode, clip_min, clip_max)
    opts = RolloutCorrection.from_trl(mode, clip_min, clip_max)
    out = rollout_correction(x.lp, x.rlp, x.mask, opts)
    _close(out.weights, w_trl, x.mask, TOL64)
    ours = {k: v for k, v in out.metrics.items() if k.startswith("sampling/")}
    _metrics_close(ours, m_trl, TOL64)
    assert all(math.isfinite(v) for v in out.metrics.values())
    edges = torch.tensor([v for v in (0.0, clip_min, clip_max) if v is not None])
    bound = torch.isin(out.weights[x.mask], edges)
    assert 0 < bound.sum() < bound.numel(), "the bounds must bind on some tokens, not all"


# ---- float64 oracle -------------------------------------------------------------------------------------------

def _oracle(lp: list[list[float]], rlp: list[list[float]], mask: list[list[bool]], o: RolloutCorrection):
    """The formulas, one token at a time in Python floats (NaN log-ratios as 0)."""
    def clamp(v: float, lo: float | None, hi: float | None) -> float:
        return min(max(v, -math.inf if lo is None else lo), math.inf if hi is None else hi)

    b = math.inf if o.log_ratio_bound is None else o.log_ratio_bound
    rows = [[(lp[i][t] - rlp[i][t]) if not math.isnan(lp[i][t] - rlp[i][t]) else 0.0
             for t in range(len(lp[i])) if mask[i][t]] for i in range(len(lp))]
    weights = []
    for r in rows:
        raws = [math.exp(clamp(v, -b, b)) for v in r] if o.level == "token" else \
            [math.exp(clamp(sum(r), -b, b))] * len(r)
        if o.mode == "truncate":
            weights.append([clamp(w, o.lower, o.upper) for w in raws])
        else:
            weights.append([w if (o.lower or 0) <= w <= (o.upper or math.inf) else 0.0 for w in raws])
    if o.batch_normalize:
        flat = [w for r in weights for w in r] if o.level == "token" else [r[0] for r in weights if r]
        mean = sum(flat) / len(flat)
        weights = [[w / mean for w in r] for r in weights] if mean > 1e-8 else weights
    keep = []
    for r in rows:
        keep_row = [True] * len(r)
        for option, lo, hi in o.reject:
            scope, k = option.rsplit("_", 1)
            stats = [{"k1": -v, "k2": v * v / 2, "k3": math.exp(v) - 1 - v}[k] for v in (clamp(u, -b, b) for u in r)]
            if scope != "token":
                agg = {"seq_sum": sum, "seq_mean": lambda s: sum(s) / len(s), "seq_max": max}[scope]
                stats = [agg(stats)] * len(stats) if stats else []
            ok = [math.log(lo) <= s <= math.log(hi) if k == "k1" else s <= hi for s in stats]
            keep_row = [a and c for a, c in zip(keep_row, ok, strict=True)]
        keep.append(keep_row)
    return weights, keep


ORACLE_OPTIONS = [
    RolloutCorrection(level="token", mode="truncate", upper=1.5, lower=0.8),
    RolloutCorrection(level="token", mode="mask", upper=1.4, lower=None, batch_normalize=True, log_ratio_bound=0.3),
    RolloutCorrection(level="sequence", mode="truncate", upper=2.5, batch_normalize=True,
                      reject={"token_k1": (0.6, 1.5), "seq_mean_k2": 0.05}),
    RolloutCorrection(level="sequence", mode="mask", upper=3.0, lower=0.4, reject=[("seq_max_k3", 0.25)]),
    RolloutCorrection(reject={"seq_sum_k1": 2.0, "token_k3": 0.08}, log_ratio_bound=None),
]


@pytest.mark.parametrize("options", ORACLE_OPTIONS)
def test_matches_float64_oracle(options: RolloutCorrection) -> None:
    x = _batch(7)
    x.rlp[3, 1] = float("nan")  # the default "zero" policy: an on-policy token
    out = rollout_correction(x.lp, x.rlp, x.mask, options)
    weights, keep = _oracle(x.lp.tolist(), x.rlp.tolist(), x.mask.tolist(), options)
    got_keep = [[bool(out.mask[i, t]) for t in range(T) if x.mask[i, t]] for i in range(B)]
    assert got_keep == keep
    assert not (out.mask & ~x.mask).any()
    if options.level is None:
        assert out.weights is None
        return
    expected = torch.zeros(B, T, dtype=torch.float64)
    expected[x.mask] = torch.tensor([w for r in weights for w in r], dtype=torch.float64)
    torch.testing.assert_close(out.weights.double(), expected, rtol=TOL64, atol=TOL64)


# ---- layouts --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [
    RolloutCorrection(level="sequence", mode="mask", upper=2.0, lower=0.5, batch_normalize=True,
                      reject={"seq_max_k2": 0.2, "token_k1": 1.6}),
    RolloutCorrection.from_trl("token_truncate", 0.6, 1.8),
    RolloutCorrection.from_verl("token", 2.0, True, "seq_sum_k3,seq_mean_k1", "0.3,0.9_1.1"),
])
@pytest.mark.parametrize("row", [False, True])
def test_packed_matches_padded(options: RolloutCorrection, row: bool) -> None:
    x = _batch(8, nan_pad=False)
    padded = rollout_correction(x.lp, x.rlp, x.mask, options)
    cu = cu_seqlens_from_lengths(x.lengths)
    lp, rlp, mask = (pack(t, x.lengths) for t in (x.lp, x.rlp, x.mask))
    if row:  # Hugging Face's padding-free (1, N)
        lp, rlp, mask = lp[None], rlp[None], mask[None]
    packed = rollout_correction(lp, rlp, mask, options, cu_seqlens=cu)
    assert packed.mask.shape == lp.shape
    assert torch.equal(unpack(packed.mask.reshape(-1), cu, T, False), padded.mask)
    torch.testing.assert_close(unpack(packed.weights.reshape(-1), cu, T), padded.weights, rtol=TOL32, atol=TOL32)
    _metrics_close(packed.metrics, padded.metrics, 1e-9)


def test_fully_masked_row_and_batch() -> None:
    x = _batch(9)
    opts = RolloutCorrection(level="sequence", mode="truncate", upper=2.0, reject={"seq_mean_k3": 0.5})
    out = rollout_correction(x.lp, x.rlp, x.mask, opts)
    assert torch.equal(out.weights[5], torch.zeros(T)) and not out.mask[5].any()
    assert all(math.isfinite(v) for v in out.metrics.values())
    empty = rollout_correction(x.lp, x.rlp, torch.zeros(B, T, dtype=torch.bool), opts)
    assert torch.equal(empty.weights, torch.zeros(B, T)) and not empty.mask.any()
    # verl raises on a batch without a counted token; only TRL's metrics (0 / its sequence ratios) remain
    assert empty.metrics["sampling/sampling_logp_difference/mean"] == 0.0
    assert not _prefixed(empty.metrics)


def test_nan_policies() -> None:
    x = _batch(10, nan_pad=False)
    x.rlp[3, 2] = float("nan")
    zero = rollout_correction(x.lp, x.rlp, x.mask, RolloutCorrection(level="token", upper=5.0, reject={"token_k2": 9}))
    assert zero.weights[3, 2] == 1.0 and zero.mask[3, 2]
    assert all(math.isfinite(v) for v in zero.metrics.values())
    seq = rollout_correction(x.lp, x.rlp, x.mask, RolloutCorrection(level="sequence", upper=math.e**9))
    others = (x.lp - x.rlp)[3, [0, 1, 3, 4, 5]].sum()
    torch.testing.assert_close(seq.weights[3, 0].double(), others.exp(), rtol=TOL32, atol=0)
    prop = RolloutCorrection(level="token", upper=5.0, reject={"token_k2": 9}, nan_log_ratio="propagate")
    out = rollout_correction(x.lp, x.rlp, x.mask, prop)
    assert out.weights[3, 2].isnan() and not out.mask[3, 2] and out.mask[3, 3]
    masked = rollout_correction(x.lp, x.rlp, x.mask, RolloutCorrection(level="sequence", mode="mask", upper=5.0,
                                                                         nan_log_ratio="propagate"))
    assert torch.equal(masked.weights[3], torch.zeros(T))


def test_weights_detached() -> None:
    x = _batch(11)
    lp = x.lp.clone().requires_grad_()
    out = rollout_correction(lp, x.rlp, x.mask, RolloutCorrection(level="token"))
    assert not out.weights.requires_grad and out.weights.dtype == torch.float32


# ---- bad arguments --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(level="tokens"), ValueError, "level"),
    (dict(mode="clip"), ValueError, "mode"),
    (dict(upper=0.0), ValueError, "upper"),
    (dict(upper="2"), TypeError, "upper"),
    (dict(lower=-1.0), ValueError, "lower"),
    (dict(lower=3.0, upper=2.0), ValueError, "lower must be <= upper"),
    (dict(batch_normalize=1), TypeError, "batch_normalize"),
    (dict(reject={"seq_max_k1": 2.0}), ValueError, "reject option"),
    (dict(reject={"token_k2": (0.1, 0.2)}), ValueError, "token_k2"),
    (dict(reject={"token_k1": (2.0, 0.5)}), ValueError, "token_k1"),
    (dict(reject="token_k1"), TypeError, "reject"),
    (dict(nan_log_ratio="ignore"), ValueError, "nan_log_ratio"),
    (dict(log_ratio_bound=math.inf), ValueError, "log_ratio_bound"),
])
def test_bad_options(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        RolloutCorrection(**kwargs)


@pytest.mark.parametrize(("factory", "match"), [
    (lambda: RolloutCorrection.from_verl("token", "abc"), "rollout_is_threshold"),
    (lambda: RolloutCorrection.from_verl("token", "2.0_0.5"), "rollout_is_threshold"),
    (lambda: RolloutCorrection.from_verl("seq", 2.0), "rollout_is"),
    (lambda: RolloutCorrection.from_verl(rollout_rs="token_k1,token_k2", rollout_rs_threshold="1,2,3"),
     "rollout_rs_threshold"),
    (lambda: RolloutCorrection.from_verl(rollout_rs="token_k2"), "rollout_rs_threshold"),
    (lambda: RolloutCorrection.from_verl(rollout_rs=" , "), "rollout_rs"),
    (lambda: RolloutCorrection.from_trl("token_clip"), "vllm_importance_sampling_mode"),
])
def test_bad_library_options(factory, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        factory()


def test_bad_tensors() -> None:
    x = _batch(12)
    opts = RolloutCorrection(level="token")
    cases = [
        ((x.lp[0], x.rlp[0], x.mask[0], opts), ValueError, "logprobs must have shape"),
        ((x.lp, x.rlp[:, :3], x.mask, opts), ValueError, "rollout_logprobs must have shape"),
        ((x.lp, x.rlp, x.mask[:, :3], opts), ValueError, "mask must have shape"),
        ((x.lp, x.rlp, x.mask.long() * 2, opts), ValueError, "mask must hold only 0 and 1"),
        ((x.lp.long(), x.rlp, x.mask, opts), TypeError, "logprobs must be a floating-point"),
        ((x.lp, x.rlp, x.mask, "token"), TypeError, "options"),
    ]
    for args, error, match in cases:
        with pytest.raises(error, match=match):
            rollout_correction(*args)
    lp = pack(x.lp, x.lengths)
    with pytest.raises(ValueError, match="cu_seqlens must end"):
        rollout_correction(lp, lp, torch.ones_like(lp), opts, cu_seqlens=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="logprobs must have shape"):
        rollout_correction(x.lp, x.rlp, x.mask, opts, cu_seqlens=torch.tensor([0, T]))
