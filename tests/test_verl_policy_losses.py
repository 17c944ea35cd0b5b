"""verl 0.9.1's remaining policy losses (rlops.integrations.verl_policy_losses) against verl itself.

Every name of verl's POLICY_LOSS_REGISTRY is served by rlops' get_policy_loss_fn; here the ones
not covered by tests/test_estimators.py (gpg, dro, dppo_tv, dppo_kl, geo_mean, clip_cov, kl_cov,
bypass_mode, and compute_policy_loss_reinforce) run on identical inputs through verl's real
function (verl/trainer/ppo/core_algos.py) and rlops', comparing the loss, its gradient with
respect to log_prob and every metric, in float64 and float32.

Inputs: right padding, random holes and a fully masked response; old log-probs perturbed so
that every bound binds (the tests assert that the clip fractions lie strictly between 0 and 1),
with planted tokens far off policy (past DPPO's truncation and verl's +-20 log-ratio clamp);
rollout IS weights given and not; several loss_agg_mode values and verl's global_batch_info.
clip_cov draws from torch's global RNG: each call is preceded by the same torch.manual_seed.

verl is imported as tests/test_estimators.py imports it (tests/verl_standins stand in for a
missing ray / tensordict / orjson while verl is imported); verl.protocol.DataProto needs the real
tensordict, so bypass mode's rollout helper wraps its weights in a plain holder instead
(everything verl computes is its own). Without verl installed the tests skip.
"""

from __future__ import annotations

import inspect
import math
from types import SimpleNamespace

import pytest
import torch
from verl_import import import_verl

from rlops.integrations import verl as r_verl
from rlops.integrations import verl_policy_losses as vpl

B, T = 6, 8
MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
DTYPES = (torch.float64, torch.float32)


@pytest.fixture(scope="module")
def verl() -> SimpleNamespace:
    """verl 0.9.1's core_algos, rollout_corr_helper and config classes, imported with stand-ins."""
    ca, helper, actor, algorithm = import_verl("verl.trainer.ppo.core_algos", "verl.trainer.ppo.rollout_corr_helper",
                                               "verl.workers.config.actor", "verl.trainer.config.algorithm")
    return SimpleNamespace(ca=ca, helper=helper, ActorConfig=actor.ActorConfig,
                           PolicyLossConfig=actor.PolicyLossConfig,
                           RolloutCorrectionConfig=algorithm.RolloutCorrectionConfig)


class _Proto:
    """Holds the weights where verl's rollout helper would build a DataProto (needs the real tensordict)."""

    @staticmethod
    def from_dict(tensors: dict[str, torch.Tensor]) -> SimpleNamespace:
        return SimpleNamespace(batch=tensors)


@pytest.fixture
def proto(verl: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verl.helper, "DataProto", _Proto)


def _actor(verl: SimpleNamespace, policy_loss: dict | None = None, **fields: object):
    """verl's ActorConfig (clip_ratio_c defaults to 3.0 there) with a PolicyLossConfig."""
    fields = {"clip_ratio": 0.2, "clip_ratio_low": 0.1, "clip_ratio_high": 0.15, **fields}
    return verl.ActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, rollout_n=1,
                            policy_loss=verl.PolicyLossConfig(**(policy_loss or {})), **fields)


def _dict_config(**fields: object):
    from omegaconf import OmegaConf  # verl's configs answer both .get(key) and attribute access

    return OmegaConf.create({"clip_ratio": 0.2, "clip_ratio_low": None, "clip_ratio_high": None,
                             "global_batch_info": {}, **fields})


# ---- inputs -------------------------------------------------------------------------------------------------

def _batch(seed: int, dtype: torch.dtype, *, far: bool = True, seq_adv: bool = False) -> SimpleNamespace:
    """(B, T) log-probs, old log-probs off policy, advantages (token- or sequence-level), a float
    mask (right padding, holes, row 2 fully masked) and IS weights. far: plants a token with log
    ratio 3.5 (past DPPO's truncation 20) and one with 24 (past verl's +-20 clamp), both counted."""
    g = torch.Generator().manual_seed(seed)
    log_prob = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = log_prob + 0.6 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = 1.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    if seq_adv:
        adv = adv[:, :1].expand(B, T).clone()
    mask = (torch.rand(B, T, generator=g) > 0.2).double()
    mask[:, 6:] *= torch.tensor([[1.0], [0.0], [1.0], [0.0], [1.0], [0.0]])  # right padding
    mask[2] = 0.0  # a fully masked response
    mask[0, 0] = mask[3, 1] = mask[4, 2] = 1.0
    if far:
        log_prob[0, 0], old[0, 0] = -0.5, -4.0
        log_prob[3, 1], old[3, 1] = -0.05, -24.05
    isw = torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5
    return SimpleNamespace(log_prob=log_prob.to(dtype), old=old.to(dtype), adv=adv.to(dtype), mask=mask.to(dtype),
                           isw=isw.to(dtype))


def _call(fn, x: SimpleNamespace, mode: str, config: object, isw: bool, seed: int | None = None
          ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(loss, gradient of 0.7 * loss wrt log_prob, metrics) of one policy-loss function."""
    lp = x.log_prob.clone().requires_grad_(True)
    if seed is not None:
        torch.manual_seed(seed)
    loss, metrics = fn(x.old, lp, x.adv, x.mask, mode, config, x.isw if isw else None)
    (grad,) = torch.autograd.grad(loss * 0.7, lp, allow_unused=True)
    return loss.detach(), torch.zeros_like(lp) if grad is None else grad, metrics


def _tol(dtype: torch.dtype) -> float:
    return 1e-9 if dtype == torch.float64 else 2e-5


def _assert_same(ours: tuple, theirs: tuple, dtype: torch.dtype, metric_tol: float | None = None,
                 tol: float | None = None) -> None:
    tol = tol or _tol(dtype)
    torch.testing.assert_close(ours[0], theirs[0], rtol=tol, atol=tol, equal_nan=True)
    torch.testing.assert_close(ours[1], theirs[1], rtol=tol, atol=tol)
    assert ours[2].keys() == theirs[2].keys()
    mtol = metric_tol or tol
    for key, value in theirs[2].items():
        assert isinstance(ours[2][key], float), key
        assert math.isclose(ours[2][key], float(value), rel_tol=mtol, abs_tol=mtol), (key, ours[2][key], value)


def _both(verl: SimpleNamespace, name: str, x: SimpleNamespace, mode: str, config: object, isw: bool,
          seed: int | None = None) -> tuple[tuple, tuple]:
    ours = _call(r_verl.get_policy_loss_fn(name), x, mode, config, isw, seed)
    theirs = _call(verl.ca.get_policy_loss_fn(name), x, mode, config, isw, seed)
    return ours, theirs


def _strictly_inside(value: float) -> bool:
    return 0.0 < value < 1.0


def _assert_ppo_kl_clamped(metrics: dict, x: SimpleNamespace, *, clamped: bool) -> None:
    """actor/ppo_kl is the masked mean of -log r with log r clamped to [-20, 20] (or not), and the
    planted token makes the two differ."""
    d = (x.log_prob - x.old).double()
    means = [((-v * x.mask).sum() / (x.mask.sum() + 1e-8)).item() for v in (d.clamp(-20, 20), d)]
    assert abs(means[0] - means[1]) > 0.05
    assert metrics["actor/ppo_kl"] == pytest.approx(means[0 if clamped else 1], rel=1e-5)


# ---- the registry -------------------------------------------------------------------------------------------

def test_registry_covers_verls(verl: SimpleNamespace) -> None:
    """get_policy_loss_fn serves every name of verl's registry, with verl's signature and defaults."""
    assert set(r_verl.POLICY_LOSSES) == set(verl.ca.POLICY_LOSS_REGISTRY)
    pairs = [(r_verl.get_policy_loss_fn(n), verl.ca.get_policy_loss_fn(n)) for n in verl.ca.POLICY_LOSS_REGISTRY]
    pairs.append((vpl.compute_policy_loss_reinforce, verl.ca.compute_policy_loss_reinforce))
    for ours, theirs in pairs:
        assert ours.__name__ == theirs.__name__
        got = [(p.name, p.default) for p in inspect.signature(ours).parameters.values()]
        want = [(p.name, p.default) for p in inspect.signature(theirs).parameters.values()]
        assert got == want, ours.__name__
        assert getattr(r_verl, ours.__name__) is ours
    with pytest.raises(ValueError, match="not covered"):
        r_verl.get_policy_loss_fn("no_such_loss")


# ---- gpg, dro, dppo_tv, dppo_kl: rlops.objectives.surrogate -----------------------------------------------------

@pytest.mark.parametrize("isw", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["gpg", "dro", "dppo_tv", "dppo_kl"])
def test_per_token_losses_match_verl(verl: SimpleNamespace, name: str, mode: str, dtype: torch.dtype,
                                     isw: bool) -> None:
    config = _actor(verl, {"dro_beta": 0.3}, clip_ratio_c=2.0)
    x = _batch(1, dtype)
    ours, theirs = _both(verl, name, x, mode, config, isw)
    _assert_same(ours, theirs, dtype)
    if name.startswith("dppo"):  # the trust region and the truncation both bind
        assert _strictly_inside(theirs[2]["actor/pg_clipfrac"]), theirs[2]
        assert _strictly_inside(theirs[2]["actor/pg_clipfrac_lower"]), theirs[2]
    if name != "gpg":  # the planted token beyond the clamp: verl's ppo_kl clamps it for dppo only
        _assert_ppo_kl_clamped(theirs[2], x, clamped=name.startswith("dppo"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["dppo_tv", "dppo_kl"])
def test_dppo_default_truncation_and_global_batch(verl: SimpleNamespace, name: str, dtype: torch.dtype) -> None:
    """Without clip_ratio_c in the config DPPO truncates at 20 (verl's config.get default); symmetric
    bounds from clip_ratio alone; verl's global_batch_info (dp_size, global counts)."""
    x = _batch(2, dtype)
    info = {"dp_size": 2, "batch_num_tokens": 61, "global_batch_size": 9}
    for mode in ("token-mean", "seq-mean-token-sum"):
        ours, theirs = _both(verl, name, x, mode, _dict_config(clip_ratio=0.12, global_batch_info=info), True)
        _assert_same(ours, theirs, dtype)
        assert _strictly_inside(theirs[2]["actor/pg_clipfrac"])
        assert _strictly_inside(theirs[2]["actor/pg_clipfrac_lower"])  # the planted ratio e^3.5 > 20


def test_dro_without_beta_raises_as_verl(verl: SimpleNamespace) -> None:
    x = _batch(3, torch.float64)
    for config in (_actor(verl), _actor(verl, {"dro_beta": -1.0})):
        for fn in (r_verl.get_policy_loss_fn("dro"), verl.ca.get_policy_loss_fn("dro")):
            with pytest.raises(ValueError, match="dro_beta"):
                fn(x.old, x.log_prob, x.adv, x.mask, "token-mean", config)


def test_dppo_truncation_at_or_below_one_is_refused(verl: SimpleNamespace) -> None:
    """rlops' ratio_cap must exceed 1; verl would accept clip_ratio_c <= 1 (see the module docstring)."""
    x = _batch(3, torch.float64)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        r_verl.get_policy_loss_fn("dppo_tv")(x.old, x.log_prob, x.adv, x.mask, "token-mean",
                                             _dict_config(clip_ratio_c=1.0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum"])
def test_reinforce_matches_verl(verl: SimpleNamespace, mode: str, dtype: torch.dtype) -> None:
    """compute_policy_loss_reinforce (bypass mode's REINFORCE), by its default mode and others."""
    x = _batch(4, dtype)
    for isw in (False, True):
        ours = _call(vpl.compute_policy_loss_reinforce, x, mode, _actor(verl), isw)
        theirs = _call(verl.ca.compute_policy_loss_reinforce, x, mode, _actor(verl), isw)
        _assert_same(ours, theirs, dtype)
    lp = x.log_prob.clone().requires_grad_(True)
    ours = vpl.compute_policy_loss_reinforce(x.old, lp, x.adv, x.mask, config=_actor(verl))
    theirs = verl.ca.compute_policy_loss_reinforce(x.old, lp, x.adv, x.mask, config=_actor(verl))
    torch.testing.assert_close(ours[0], theirs[0], rtol=_tol(dtype), atol=_tol(dtype))


# ---- geo_mean: rlops.objectives.gmpo ------------------------------------------------------------------------------

@pytest.mark.parametrize("isw", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seq_adv", [True, False])
def test_geo_mean_matches_verl(verl: SimpleNamespace, seq_adv: bool, dtype: torch.dtype, isw: bool) -> None:
    """GMPO: sequence-level advantages as verl assumes (token-level ones too: verl averages them);
    torch.mean over every row (the fully masked one counts 0), whatever loss_agg_mode says; a row
    of zero advantages (a group of equal rewards): sign 0, counted in neither clip fraction."""
    x = _batch(5, dtype, seq_adv=seq_adv)
    x.adv[5] = 0.0
    for mode in ("token-mean", "seq-mean-token-mean"):
        ours, theirs = _both(verl, "geo_mean", x, mode, _actor(verl), isw)
        _assert_same(ours, theirs, dtype)
        assert _strictly_inside(theirs[2]["actor/pg_clipfrac"]), theirs[2]
        assert _strictly_inside(theirs[2]["actor/pg_clipfrac_lower"]), theirs[2]
        _assert_ppo_kl_clamped(theirs[2], x, clamped=False)  # the planted d = 24 counts in full


# ---- clip_cov and kl_cov: batch-global selection ------------------------------------------------------------------

CLIP_COV = {"clip_cov_ratio": 0.2, "clip_cov_lb": 0.3, "clip_cov_ub": 4.0}


@pytest.mark.parametrize("isw", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_clip_cov_matches_verl(verl: SimpleNamespace, mode: str, dtype: torch.dtype, isw: bool) -> None:
    """Clip-Cov with the same global RNG state: the same tokens drawn, so the same loss and gradient;
    the PPO clip binds (ratio unclamped, far tokens included) and the draw cuts a share of tokens."""
    x = _batch(6, dtype)
    for seed in (0, 1):
        ours, theirs = _both(verl, "clip_cov", x, mode, _actor(verl, CLIP_COV), isw, seed)
        _assert_same(ours, theirs, dtype)
        assert _strictly_inside(theirs[2]["actor/pg_clipfrac"]), theirs[2]
        assert ours[2]["actor/pg_clipfrac"] * x.mask.sum().item() == pytest.approx(int(0.2 * x.mask.sum().item()))
    other = _call(r_verl.get_policy_loss_fn("clip_cov"), x, mode, _actor(verl, CLIP_COV), isw, seed=2)
    assert not torch.equal(other[1], ours[1])  # the draw matters: another seed cuts other tokens


@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_cov_defaults_match_verl(verl: SimpleNamespace, dtype: torch.dtype) -> None:
    """verl's defaults (ratio 0.0002: one token; lb 1, ub 5), from its PolicyLossConfig and from None
    fields (verl's in-function defaults)."""
    x = _batch(11, dtype)  # four candidates in (1, 5)
    nones = {"clip_cov_ratio": None, "clip_cov_lb": None, "clip_cov_ub": None}
    for config in (_actor(verl), _dict_config(policy_loss=nones)):
        ours, theirs = _both(verl, "clip_cov", x, "token-mean", config, True, seed=3)
        _assert_same(ours, theirs, dtype)
        assert theirs[2]["actor/pg_clipfrac"] * x.mask.sum().item() == pytest.approx(1.0)


KL_COV = {"kl_cov_ratio": 0.1, "ppo_kl_coef": 0.5}


@pytest.mark.parametrize("isw", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_kl_cov_matches_verl(verl: SimpleNamespace, mode: str, dtype: torch.dtype, isw: bool) -> None:
    x = _batch(8, dtype, far=False)
    config = _actor(verl, KL_COV)
    ours, theirs = _both(verl, "kl_cov", x, mode, config, isw)
    _assert_same(ours, theirs, dtype)
    plain = _call(r_verl.get_policy_loss_fn("kl_cov"), x, mode, _actor(verl, {**KL_COV, "ppo_kl_coef": 0.0}), isw)
    assert not torch.equal(plain[1], ours[1])  # the penalty reaches the selected tokens


@pytest.mark.parametrize("dtype", DTYPES)
def test_kl_cov_defaults_match_verl(verl: SimpleNamespace, dtype: torch.dtype) -> None:
    """verl's PolicyLossConfig defaults (ratio 0.0002: one token, coefficient 0.1), and None fields
    (verl's in-function defaults: 0.0002 and coefficient 1)."""
    x = _batch(9, dtype, far=False)
    nones = {"kl_cov_ratio": None, "ppo_kl_coef": None}
    for config in (_actor(verl), _dict_config(policy_loss=nones)):
        for mode in ("token-mean", "seq-mean-token-sum"):
            ours, theirs = _both(verl, "kl_cov", x, mode, config, False)
            _assert_same(ours, theirs, dtype)


# ---- bypass mode: rlops' rollout correction ---------------------------------------------------------------------

BYPASS = [
    {"loss_type": "ppo_clip", "rollout_is": "token", "rollout_rs": "token_k1", "rollout_rs_threshold": "0.6_1.6"},
    {"loss_type": "reinforce", "rollout_is": "sequence", "rollout_is_threshold": 2.0,
     "rollout_is_batch_normalize": True, "rollout_rs": "seq_mean_k3", "rollout_rs_threshold": 0.2},
    {"loss_type": "reinforce", "rollout_is": "token", "rollout_is_threshold": "0.5_1.8"},
    {"loss_type": "reinforce", "rollout_is": None},
    {},  # verl's defaults: sequence-level TIS weights (metrics only), PPO-clip
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("case", range(len(BYPASS)))
def test_bypass_mode_matches_verl(verl: SimpleNamespace, proto: None, case: int, mode: str,
                                  dtype: torch.dtype) -> None:
    """old_log_prob is the rollout's: weights pi / pi_rollout and the rejection mask from rlops'
    rollout correction, then PPO-clip on the mask or REINFORCE with the weights; verl's metrics
    merged. rlops' rollout masked means divide by the token count where verl's add 1e-8 to it
    (docs/rollout_correction.md): ~1e-9 relative in batch-normalised weights, hence 1e-7 on the
    loss and 1e-6 on the metrics in float64."""
    x = _batch(10, dtype, far=False)
    correction = verl.RolloutCorrectionConfig(**BYPASS[case])
    config = _actor(verl, {"loss_mode": "bypass_mode", "rollout_correction": correction}, clip_ratio_c=2.0)
    ours, theirs = _both(verl, "bypass_mode", x, mode, config, True)
    wide = dtype == torch.float64
    _assert_same(ours, theirs, dtype, metric_tol=1e-6 if wide else 2e-5, tol=1e-7 if wide else 2e-5)
    metrics = theirs[2]
    assert any(k.startswith("rollout_corr/") for k in metrics)
    if "actor/pg_clipfrac" in metrics:
        assert _strictly_inside(metrics["actor/pg_clipfrac"]), metrics
    if BYPASS[case].get("rollout_rs"):  # the rejection binds: some tokens dropped, not all
        dropped = [v for k, v in metrics.items() if k.endswith("masked_fraction") or "rejected" in k]
        assert any(_strictly_inside(v) for v in dropped), metrics


def test_bypass_mode_config_errors_as_verl(verl: SimpleNamespace, proto: None) -> None:
    x = _batch(11, torch.float64)
    bad = _actor(verl, {"rollout_correction": verl.RolloutCorrectionConfig(loss_type="nope")})
    for config, match in ((_dict_config(policy_loss={"rollout_correction": None}), "rollout_correction"),
                          (bad, "Invalid loss_type")):
        for fn in (r_verl.get_policy_loss_fn("bypass_mode"), verl.ca.get_policy_loss_fn("bypass_mode")):
            with pytest.raises(ValueError, match=match):
                fn(x.old, x.log_prob, x.adv, x.mask, "token-mean", config)


# ---- an empty mask --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gpg", "dro", "dppo_tv", "dppo_kl", "geo_mean", "clip_cov", "kl_cov"])
def test_empty_mask_matches_verl(verl: SimpleNamespace, name: str) -> None:
    """An all-zero response_mask: metrics 0 (masked_mean's + 1e-8), the loss as verl's (NaN for a
    token mean over no token, except geo_mean's 0), no draw and no selection. The gradient of a NaN
    loss is not compared: verl's masked_sum gives 0 there, rlops' agg_loss NaN."""
    x = _batch(12, torch.float64)
    x.mask = torch.zeros_like(x.mask)
    config = _actor(verl, {"dro_beta": 0.3, **CLIP_COV, **KL_COV})
    for mode in ("token-mean", "token-sum"):
        ours, theirs = _both(verl, name, x, mode, config, True, seed=4)
        assert torch.isnan(theirs[0]) == (mode == "token-mean" and name != "geo_mean")
        if torch.isnan(theirs[0]):
            ours, theirs = (ours[0], theirs[1], ours[2]), (theirs[0], theirs[1], theirs[2])
        _assert_same(ours, theirs, torch.float64)
        assert all(v == 0.0 for v in ours[2].values())


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64])
def test_bool_and_integer_masks_match_verl(verl: SimpleNamespace, proto: None, mask_dtype: torch.dtype) -> None:
    """verl's actor passes the response mask as it comes (bool or integer attention-mask slices)."""
    x = _batch(13, torch.float64)
    x.mask = x.mask.to(mask_dtype)
    correction = verl.RolloutCorrectionConfig(loss_type="reinforce", rollout_is="token", rollout_rs="token_k3",
                                              rollout_rs_threshold=0.1)
    config = _actor(verl, {"dro_beta": 0.3, **CLIP_COV, **KL_COV, "rollout_correction": correction})
    for name in sorted(verl.ca.POLICY_LOSS_REGISTRY):
        ours, theirs = _both(verl, name, x, "seq-mean-token-mean", config, True, seed=5)
        _assert_same(ours, theirs, torch.float64, metric_tol=1e-6, tol=1e-7)
