"""Advantage estimators (rlops.estimators, rlops.integrations.verl) against verl 0.9.1 itself and a float64 oracle.

verl comes from `pip install --no-deps verl==0.9.1 omegaconf antlr4-python3-runtime==4.9.3 codetiming`
(install.sh); its import-time dependencies ray, tensordict and orjson, which the compared functions do
not use, are replaced by tests/verl_standins only where they are missing, and only while verl is
imported. Without verl installed the parity tests skip; the oracle tests run anyway.

Inputs: groups of varied sizes (one, two, several) under string uids in shuffled order, binary
scores (ties) and continuous ones, response masks with right padding, an empty response and
multi-turn holes, and the estimators' options (epsilon, std normalisation, gamma, f_norm, rollout
IS weights, zero tail, GDPO's reward keys and weights).
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import DEVICE
from verl_import import import_verl

import rlops
from rlops import estimators as est
from rlops.integrations import verl as r_verl


@pytest.fixture(scope="module")
def verl() -> SimpleNamespace:
    """verl 0.9.1's core_algos and torch_functional, imported with stand-ins for what is missing."""
    core_algos, torch_functional = import_verl("verl.trainer.ppo.core_algos", "verl.utils.torch_functional")
    return SimpleNamespace(ca=core_algos, F=torch_functional)


def _config(**fields: object):
    from omegaconf import OmegaConf  # verl's configs answer both .get(key) and attribute access

    return OmegaConf.create(fields)


# ---- inputs -------------------------------------------------------------------------------------------------

SIZES = [1, 3, 2, 5, 1, 4, 2]  # groups of one (twice), two, several
PAIRS = [2, 3, 2, 5, 2, 4]  # the same batch size without groups of one (pass@k needs two)
B, T = sum(SIZES), 9


def _batch(seed: int, *, binary: bool = True, holes: bool = False, sizes: list[int] = SIZES,
           device: torch.device = DEVICE) -> SimpleNamespace:
    """A verl batch: uids (np.ndarray of str, groups shuffled), response_mask (B, T) float (right padding,
    one empty response in a group with others, multi-turn holes), outcome rewards on each response's
    last token, dense token rewards, the OTB inputs and rollout IS weights."""
    g = torch.Generator().manual_seed(seed)
    group = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    group = group[torch.randperm(B, generator=g)]
    uids = np.array([f"uid-{int(k) * 7919 % 101}" for k in group], dtype=object)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[(group == 1).nonzero()[0, 0]] = 0  # an empty response in a group of three
    lengths[(group == 3).nonzero()[:2, 0]] = T  # two full-length responses tie for the longest
    mask = (torch.arange(T) < lengths[:, None]).float()
    if holes:  # multi-turn observation tokens inside the responses
        mask = mask * (torch.rand(B, T, generator=g) > 0.25).float()
        mask[:, 0] = (lengths > 0).float()
    scores = (torch.rand(B, generator=g) > 0.5).float() if binary else torch.randn(B, generator=g)
    last = (mask * torch.arange(1, T + 1)).argmax(-1)
    outcome = torch.zeros(B, T).scatter_(1, last[:, None], scores[:, None]) * mask
    old = -torch.rand(B, T, generator=g) * 3
    pi = old.exp()
    return SimpleNamespace(
        uids=uids, group=group.to(device), mask=mask.to(device), scores=scores.to(device), outcome=outcome.to(device),
        dense=(torch.randn(B, T, generator=g) * mask).to(device), old=old.to(device),
        spp=(pi**2 + torch.rand(B, T, generator=g) * (1 - pi**2) * 0.3).to(device),
        is_w=(0.5 + torch.rand(B, T, generator=g)).to(device),
        components=torch.rand(B, 2, generator=g).round(decimals=1).numpy(),
        baselines=torch.rand(B, generator=g).to(device),
    )


def _close(ours: torch.Tensor, theirs: torch.Tensor, tol: float = 2e-5) -> None:
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, (ours.shape, theirs.shape, ours.dtype,
                                                                         theirs.dtype)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours.cpu().double(), theirs.cpu().double(), rtol=tol, atol=tol)


# ---- parity with verl's own functions ------------------------------------------------------------------------

def _parity_cases() -> list[tuple[str, dict, dict]]:
    """(estimator, batch options, call options) for every estimator of verl 0.9.1's registry but gae
    (tests/test_integrations_verl_openrlhf.py compares it)."""
    cases = []
    for name in ("grpo", "grpo_vectorized", "gdpo"):
        for eps, norm in ((1e-6, True), (0.1, True), (1e-6, False)):
            cases.append((name, {"binary": True}, {"epsilon": eps, "norm_adv_by_std_in_grpo": norm}))
        cases.append((name, {"binary": False, "holes": True}, {}))
    for norm in (True, False):
        for binary in (True, False):
            cases.append(("grpo_passk", {"binary": binary, "sizes": PAIRS},
                          {"epsilon": 0.01, "config": {"norm": norm}}))
    for name in ("rloo", "rloo_vectorized", "opo", "reinforce_plus_plus_baseline"):
        cases += [(name, {"binary": True}, {}), (name, {"binary": False, "holes": True}, {})]
    cases += [("gpg", {"binary": True}, {}), ("gpg", {"binary": False}, {"f_norm": 2.5, "alpha": 7.0})]
    for gamma in (1.0, 0.9, 0.0):
        cases.append(("reinforce_plus_plus", {"holes": True}, {"config": {"gamma": gamma}}))
    cases += [("remax", {"holes": holes}, {}) for holes in (False, True)]
    for name in ("optimal_token_baseline", "tir_optimal_token_baseline"):
        for holes in (False, True):
            for tail in (True, False):
                cases.append((name, {"holes": holes}, {"handle_zero_tail": tail, "is_w": holes}))
    cases.append(("gdpo", {"binary": True}, {"keys": True}))
    return cases


def _call(fn, name: str, batch: SimpleNamespace, options: dict):
    options = dict(options)
    dense = name in ("reinforce_plus_plus", "remax", "optimal_token_baseline", "tir_optimal_token_baseline")
    kwargs = {"token_level_rewards": (batch.dense if dense else batch.outcome).clone(),
              "response_mask": batch.mask.clone()}
    if name not in ("reinforce_plus_plus", "remax"):
        kwargs["index"] = batch.uids.copy()
    if "config" in options:
        c = options.pop("config")
        kwargs["config"] = _config(**({"norm_adv_by_std_in_grpo": c["norm"]} if "norm" in c else c))
    if name == "remax":
        kwargs["reward_baselines"] = batch.baselines.clone()
    if name.endswith("optimal_token_baseline"):
        kwargs.update(old_log_probs=batch.old.clone(), sum_pi_squared=batch.spp.clone(),
                      rollout_is_weights=batch.is_w.clone() if options.pop("is_w") else None)
    if options.pop("keys", False):
        kwargs.update(config=_config(gdpo_reward_keys=["fmt", "acc"], gdpo_reward_weights=[0.5, 2.0]),
                      non_tensor_batch={"fmt": batch.components[:, 0], "acc": batch.components[:, 1],
                                        "uid": batch.uids},
                      batch={"prompts": torch.zeros(B, 3, dtype=torch.long, device=batch.mask.device),
                             "attention_mask": torch.cat([torch.ones(B, 3, device=batch.mask.device),
                                                          batch.mask], -1).long()})
    return fn(**kwargs, **options)


CASES = _parity_cases()


@pytest.mark.parametrize(("name", "batch_options", "options"), CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_estimator_equals_verl(verl: SimpleNamespace, name: str, batch_options: dict, options: dict) -> None:
    batch = _batch(CASES.index((name, batch_options, options)), **batch_options)
    ours = _call(r_verl.get_adv_estimator_fn(name), name, batch, options)
    theirs = _call(verl.ca.get_adv_estimator_fn(name), name, batch, options)
    for mine, verls in zip(ours, theirs, strict=True):
        _close(mine, verls)


def test_registry_names_and_signatures_equal_verl(verl: SimpleNamespace) -> None:
    """Every name of verl's ADV_ESTIMATOR_REGISTRY, with verl's parameters (names, order, defaults)."""
    assert set(r_verl.ADV_ESTIMATORS) == set(verl.ca.ADV_ESTIMATOR_REGISTRY)
    for name, theirs in verl.ca.ADV_ESTIMATOR_REGISTRY.items():
        ours = r_verl.get_adv_estimator_fn(verl.ca.AdvantageEstimator(name))
        assert ours.__name__ == theirs.__name__
        mine = [(p.name, p.kind, p.default) for p in inspect.signature(ours).parameters.values()
                if p.kind is not p.KEYWORD_ONLY]  # rlops' own keyword-only extras (backend=)
        assert mine == [(p.name, p.kind, p.default) for p in inspect.signature(theirs).parameters.values()], name
    with pytest.raises(ValueError, match="Unknown advantage estimator 'nope'"):
        r_verl.get_adv_estimator_fn("nope")


def test_passk_refuses_a_group_of_one_as_verl(verl: SimpleNamespace) -> None:
    batch = _batch(0)
    args = (batch.outcome, batch.mask, batch.uids)
    with pytest.raises(ValueError, match="at least 2"):
        verl.ca.compute_grpo_passk_outcome_advantage(*args, config=_config())
    with pytest.raises(ValueError, match="at least 2 responses per group"):
        r_verl.compute_grpo_passk_outcome_advantage(*args, config=_config())
    with pytest.raises(ValueError, match="needs config"):
        r_verl.compute_grpo_passk_outcome_advantage(*args)


def test_policy_loss_metrics_of_an_empty_mask_are_zero_as_verl(verl: SimpleNamespace) -> None:
    """verl's metrics use masked_mean, whose denominator has + 1e-8: an all-zero response_mask gives 0."""
    from verl.workers.config import ActorConfig

    config = ActorConfig(strategy="fsdp", clip_ratio=0.2, clip_ratio_high=0.28, ppo_micro_batch_size_per_gpu=1,
                         rollout_n=1)
    g = torch.Generator().manual_seed(0)
    log_prob = -torch.rand(4, 6, generator=g)
    old, adv = log_prob + 0.3 * torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    for mask in (torch.zeros(4, 6), torch.zeros(4, 6, dtype=torch.bool), (torch.rand(4, 6, generator=g) > 0.5).float()):
        for fn, mode in (("compute_policy_loss_vanilla", "token-mean"),
                         ("compute_policy_loss_gspo", "seq-mean-token-mean")):
            _, ours = getattr(r_verl, fn)(old, log_prob, adv, mask, mode, config)
            _, theirs = getattr(verl.ca, fn)(old, log_prob, adv, mask, mode, config)
            assert ours.keys() == theirs.keys()
            for key in ours:
                assert ours[key] == pytest.approx(theirs[key], abs=1e-6), (fn, key)
        _, *ours = r_verl.compute_policy_loss(old, log_prob, adv, mask, 0.2)
        assert all(torch.isfinite(x) for x in ours)
    assert r_verl._masked_mean(torch.full((2, 3), torch.nan), torch.zeros(2, 3)) == 0  # NaN outside the mask: 0
    x, m = torch.randn(3, 5, generator=g), (torch.rand(3, 5, generator=g) > 0.5).float()
    torch.testing.assert_close(r_verl._masked_mean(x, m), verl.F.masked_mean(x, m))


# ---- the native API against a float64 oracle ----------------------------------------------------------------

def _groups_of(labels: list) -> dict:
    members = defaultdict(list)
    for i, label in enumerate(labels):
        members[label].append(i)
    return members


def _oracle_whiten(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    v = x[m.bool()]
    var = v.var() if v.numel() > 1 else torch.zeros((), dtype=x.dtype)
    return torch.where(m.bool(), (x - v.mean()) / torch.sqrt(var + 1e-8), 0.0)


def _oracle(name: str, b: SimpleNamespace, labels: list, singleton: str, **o) -> tuple[torch.Tensor, ...]:
    """The formulas of docs/advantages.md, group by group and step by step, in float64."""
    m = b.mask.double().cpu()
    r = b.scores.double().cpu()
    n, t = m.shape
    out = torch.zeros(n, dtype=torch.float64)
    for members in _groups_of(labels).values():
        idx = torch.tensor(members)
        g = r[idx]
        k = len(members)
        if name == "passk":
            std = g.std() if o["norm"] else torch.tensor(1.0)
            top = torch.sort(g, descending=True).values
            if top[0] > top[1]:
                out[idx[g.argmax()]] = (top[0] - top[1]) / (std + (o["eps"] if o["norm"] else 0.0))
            continue
        if k == 1:  # verl's mean 0 (and std 1: R / (1 + eps) for GRPO)
            alone = float(g[0]) / (1 + o["eps"]) if name == "grpo" and o["norm"] else float(g[0])
            out[idx] = {"zero": 0.0, "score": alone}[singleton]
            continue
        if name == "grpo":
            out[idx] = (g - g.mean()) / (g.std() + o["eps"]) if o["norm"] else g - g.mean()
        elif name == "rloo":
            out[idx] = torch.stack([g[i] - (g.sum() - g[i]) / (k - 1) for i in range(k)])
        elif name == "opo":
            lengths = m[idx].sum(-1)
            out[idx] = g - (lengths * g).sum() / lengths.sum()
        elif name in ("gpg", "rfpp_baseline"):
            out[idx] = g - g.mean()
    if name == "gpg":  # alpha (R - mean) / f_norm; a group of one holds 0 or R from above
        out = out * n / max(int((r != 0).sum()), 1) / o["f_norm"]
    if name == "rfpp_baseline":
        return (_oracle_whiten(out[:, None].expand(n, t), m),)
    return (out,)


def _oracle_rfpp(b: SimpleNamespace, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    r, m = b.dense.double().cpu(), b.mask.double().cpu()
    returns = torch.zeros_like(r)
    for i in range(r.shape[0]):
        running = 0.0
        for t in reversed(range(r.shape[1])):
            if m[i, t]:
                running = r[i, t] + gamma * running
                returns[i, t] = running
    return _oracle_whiten(returns, m), returns


def _oracle_otb(b: SimpleNamespace, labels: list, singleton: str, tail: bool, multi_turn: bool,
                is_w: bool) -> tuple[torch.Tensor, torch.Tensor]:
    r, m = b.dense.double().cpu(), b.mask.double().cpu()
    n, t = r.shape
    returns = torch.stack([torch.tensor([(r[i, s:] * m[i, s:]).sum() for s in range(t)]) for i in range(n)])
    w = 1 - 2 * b.old.double().cpu().exp() + b.spp.double().cpu()
    if is_w:
        w = w * b.is_w.double().cpu() ** 2
    cum_w = (w * m).cumsum(-1)
    # step of each valid token: its column, or its rank among the response's valid tokens
    steps = [[(int(m[i, :s].sum()) if multi_turn else s) for s in range(t)] for i in range(n)]
    lengths = m.sum(-1)
    adv = torch.zeros(n, t, dtype=torch.float64)
    for members in _groups_of(labels).values():
        members = [i for i in members if lengths[i] > 0] if multi_turn else members
        num, den = defaultdict(float), defaultdict(float)
        for i in members:
            for s in range(t):
                if m[i, s]:
                    num[steps[i][s]] += float(returns[i, s] * cum_w[i, s])
                    den[steps[i][s]] += float(cum_w[i, s])
        ranked = sorted(float(lengths[i]) for i in members)
        for i in members:
            for s in range(t):
                if not m[i, s]:
                    continue
                if len(members) == 1:
                    adv[i, s] = 0.0 if singleton == "zero" else returns[i, s]
                    continue
                step = steps[i][s]
                baseline = num[step] / (den[step] + 1e-8)
                unique_longest = lengths[i] == ranked[-1] and ranked[-1] > ranked[-2]
                if tail and unique_longest and step >= ranked[-2]:
                    baseline = 0.0
                adv[i, s] = returns[i, s] - baseline
    return adv, returns


def _assert_oracle(ours: torch.Tensor, oracle: torch.Tensor) -> None:
    assert ours.dtype == torch.float32 and ours.shape == oracle.shape
    scale = max(1.0, float(oracle.abs().max()))
    torch.testing.assert_close(ours.cpu().double(), oracle, rtol=0, atol=2e-5 * scale)


@pytest.mark.parametrize("singleton", ["zero", "score"])
@pytest.mark.parametrize("binary", [True, False])
def test_group_estimators_equal_float64_oracle(singleton: str, binary: bool) -> None:
    b = _batch(3 + binary, binary=binary, holes=not binary)
    labels, ids = list(b.uids), b.group
    for eps, norm in ((1e-6, True), (0.5, True), (1e-6, False)):
        _assert_oracle(est.grpo_advantages(b.scores, group_ids=ids, eps=eps, scale_by_std=norm, singleton=singleton),
                       *_oracle("grpo", b, labels, singleton, eps=eps, norm=norm))
        _assert_oracle(rlops.group_advantages(b.scores, group_ids=ids, eps=eps, scale_by_std=norm,
                                              singleton=singleton),
                       *_oracle("grpo", b, labels, singleton, eps=eps, norm=norm))
    _assert_oracle(est.rloo_advantages(b.scores, group_ids=ids, singleton=singleton),
                   *_oracle("rloo", b, labels, singleton))
    _assert_oracle(est.opo_advantages(b.scores, b.mask.sum(-1).long(), group_ids=ids, singleton=singleton),
                   *_oracle("opo", b, labels, singleton))
    _assert_oracle(est.gpg_advantages(b.scores, group_ids=ids, f_norm=1.5, singleton=singleton),
                   *_oracle("gpg", b, labels, singleton, f_norm=1.5))
    _assert_oracle(est.reinforce_plus_plus_baseline_advantages(b.scores, b.mask, group_ids=ids, singleton=singleton),
                   *_oracle("rfpp_baseline", b, labels, singleton))
    # gdpo with one component is whitened grpo; with two, the weighted sum of each normalised one
    two = torch.stack([b.scores, b.scores.flip(0) * 3], -1)
    parts = [_oracle("grpo", SimpleNamespace(mask=b.mask, scores=two[:, k]), labels, singleton, eps=1e-6, norm=True)[0]
             for k in range(2)]
    _assert_oracle(est.gdpo_advantages(two, b.mask, group_ids=ids, weights=[0.5, 2.0], singleton=singleton),
                   _oracle_whiten((0.5 * parts[0] + 2.0 * parts[1])[:, None].expand(B, T), b.mask.double().cpu()))


def test_grpo_passk_equals_float64_oracle() -> None:
    labels = [k for k, size in enumerate([2, 3, 4, 2, 5]) for _ in range(size)]
    g = torch.Generator().manual_seed(5)
    for scores in (torch.randn(16, generator=g), (torch.rand(16, generator=g) > 0.5).float(), torch.zeros(16)):
        b = SimpleNamespace(scores=scores.to(DEVICE), mask=torch.ones(16, 1, device=DEVICE))
        perm = torch.randperm(16, generator=g)  # groups in any order
        ids = torch.tensor(labels)[perm].to(DEVICE)
        for norm in (True, False):
            _assert_oracle(est.grpo_passk_advantages(b.scores, group_ids=ids, eps=0.01, scale_by_std=norm),
                           *_oracle("passk", b, ids.tolist(), "zero", eps=0.01, norm=norm))
    with pytest.raises(ValueError, match="group_ids gives a group of 1"):
        est.grpo_passk_advantages(torch.randn(3), group_ids=torch.tensor([0, 0, 1]))


@pytest.mark.parametrize("gamma", [1.0, 0.95, 0.0])
def test_reinforce_plus_plus_and_remax_equal_float64_oracle(gamma: float) -> None:
    b = _batch(7, holes=True)
    adv, returns = est.reinforce_plus_plus_advantages(b.dense, b.mask, gamma=gamma)
    oracle_adv, oracle_returns = _oracle_rfpp(b, gamma)
    _assert_oracle(returns, oracle_returns)
    _assert_oracle(adv, oracle_adv)
    adv, returns = est.remax_advantages(b.dense, b.mask, b.baselines)
    togo = est.reward_to_go(b.dense, b.mask)
    _, oracle_returns = _oracle_rfpp(b, 1.0)  # reward-to-go: the undiscounted return where m = 1
    _assert_oracle(torch.where(b.mask.bool(), returns, 0.0), oracle_returns)
    torch.testing.assert_close(togo, returns)
    _assert_oracle(adv, torch.where(b.mask.bool().cpu(), oracle_returns - b.baselines.double().cpu()[:, None], 0.0))


@pytest.mark.parametrize("multi_turn", [False, True])
@pytest.mark.parametrize("singleton", ["zero", "score"])
def test_optimal_token_baseline_equals_float64_oracle(multi_turn: bool, singleton: str) -> None:
    b = _batch(11, holes=True)
    for tail, is_w in ((True, False), (False, True)):
        adv, returns = est.optimal_token_baseline_advantages(
            b.dense, b.mask, b.old, b.spp, group_ids=b.group, is_weights=b.is_w if is_w else None,
            handle_zero_tail=tail, multi_turn=multi_turn, singleton=singleton)
        oracle_adv, oracle_returns = _oracle_otb(b, list(b.uids), singleton, tail, multi_turn, is_w)
        _assert_oracle(returns, oracle_returns)
        _assert_oracle(adv, oracle_adv)


def test_group_size_equals_group_ids_and_empty_batches() -> None:
    g = torch.Generator().manual_seed(2)
    scores, mask = torch.randn(12, generator=g), torch.ones(12, 4)
    ids = torch.arange(12) // 3 * 10 - 5  # any integer labels
    for fn, extra in ((est.grpo_advantages, ()), (est.rloo_advantages, ()), (est.gpg_advantages, ()),
                      (est.grpo_passk_advantages, ()), (est.opo_advantages, (torch.full((12,), 4),)),
                      (est.reinforce_plus_plus_baseline_advantages, (mask,)), (est.gdpo_advantages, (mask,))):
        torch.testing.assert_close(fn(scores, *extra, group_size=3), fn(scores, *extra, group_ids=ids))
        empty = fn(torch.zeros(0), *(x[:0] for x in extra), group_size=2)
        assert empty.shape[0] == 0 and empty.dtype == torch.float32
    adv, returns = est.optimal_token_baseline_advantages(torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0, 4),
                                                         torch.zeros(0, 4), group_size=1)
    assert adv.shape == returns.shape == (0, 4)
    adv, returns = est.reinforce_plus_plus_advantages(torch.zeros(3, 0), torch.zeros(3, 0))
    assert adv.shape == (3, 0)
    # a fully masked batch: zeros, never NaN
    adv, _ = est.reinforce_plus_plus_advantages(torch.randn(3, 4, generator=g), torch.zeros(3, 4))
    assert not adv.any()
    assert not est.reinforce_plus_plus_baseline_advantages(scores, torch.zeros(12, 4), group_size=3).any()


# ---- no device-to-host sync; CUDA ---------------------------------------------------------------------------

def _run_all(device: torch.device, index: object) -> list[torch.Tensor]:
    """Every native estimator and verl drop-in once, on inputs of `device` (group ids `index`)."""
    n, t = 6, 5
    x = {k: torch.ones(n, t, device=device) for k in ("r", "m", "old", "spp", "w")}
    s, ids = torch.ones(n, device=device), index
    out = [est.grpo_advantages(s, group_ids=ids), est.grpo_passk_advantages(s, group_ids=ids),
           est.rloo_advantages(s, group_ids=ids), est.opo_advantages(s, s, group_ids=ids),
           est.gpg_advantages(s, group_ids=ids), est.reinforce_plus_plus_baseline_advantages(s, x["m"], group_ids=ids),
           est.gdpo_advantages(torch.ones(n, 2, device=device), x["m"], group_ids=ids, weights=[1.0, 2.0]),
           *est.reinforce_plus_plus_advantages(x["r"], x["m"], gamma=0.9),
           *est.remax_advantages(x["r"], x["m"], s),
           *est.optimal_token_baseline_advantages(x["r"], x["m"], x["old"], x["spp"], group_ids=ids, is_weights=x["w"]),
           *est.optimal_token_baseline_advantages(x["r"], x["m"], x["old"], x["spp"], group_ids=ids, multi_turn=True)]
    config = {"gamma": 0.9, "norm_adv_by_std_in_grpo": True}
    for name, fn in r_verl.ADV_ESTIMATORS.items():
        if name == "gae":
            continue
        kwargs = {"token_level_rewards": x["r"], "response_mask": x["m"], "config": config}
        if name == "remax":
            kwargs["reward_baselines"] = s
        elif name != "reinforce_plus_plus":
            kwargs["index"] = ids
        if name.endswith("optimal_token_baseline"):
            kwargs.update(old_log_probs=x["old"], sum_pi_squared=x["spp"])
        out += list(fn(**kwargs))
    return out


def test_no_host_sync_on_meta_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    """Meta tensors have no data: any read-back (.item(), bool(), nonzero(), torch.unique's size) raises."""
    monkeypatch.delenv("RLOPS_CHECK", raising=False)
    meta = torch.device("meta")
    outputs = _run_all(meta, torch.tensor([3, 3, 1, 1, 1, 8]).to(meta))
    assert all(o.device.type == "meta" for o in outputs) and len(outputs) == 41


@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs CUDA")
def test_cuda_no_sync_and_equal_to_cpu() -> None:
    ids = torch.tensor([3, 3, 1, 1, 1, 8])
    cpu = _run_all(torch.device("cpu"), ids)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cuda = _run_all(DEVICE, ids.to(DEVICE))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for a, b in zip(cuda, cpu, strict=True):
        torch.testing.assert_close(a.cpu(), b)


# ---- bad input ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("call", "error", "match"), [
    (lambda: est.grpo_advantages(torch.ones(4, 2), group_size=2), ValueError, r"scores must have shape \(B,\)"),
    (lambda: est.grpo_advantages(torch.ones(4, dtype=torch.long), group_size=2), TypeError,
     "scores must be a floating"),
    (lambda: est.rloo_advantages(torch.ones(4), group_size=3), ValueError, "group_size 3 does not divide"),
    (lambda: est.rloo_advantages(torch.ones(4)), ValueError, "exactly one of group_size"),
    (lambda: est.gpg_advantages(torch.ones(4), group_ids=torch.zeros(3, dtype=torch.long)), ValueError,
     r"group_ids must be an integer \(B,\) = \(4,\)"),
    (lambda: est.gpg_advantages(torch.ones(4), group_size=2, f_norm=0.0), ValueError, "f_norm must be > 0"),
    (lambda: est.grpo_advantages(torch.ones(4), group_size=2, singleton="one"), ValueError, "singleton must be one of"),
    (lambda: est.opo_advantages(torch.ones(4), torch.ones(3), group_size=2), ValueError,
     r"lengths must be an integer or float \(B,\)"),
    (lambda: est.reinforce_plus_plus_advantages(torch.ones(2, 3), torch.ones(2, 4)), ValueError,
     r"response_mask must have shape \(2, 3\)"),
    (lambda: est.reinforce_plus_plus_advantages(torch.ones(2, 3), torch.full((2, 3), 2.0)), ValueError,
     "response_mask must hold only 0 and 1"),
    (lambda: est.reinforce_plus_plus_advantages(torch.ones(2, 3), torch.ones(2, 3), gamma=1.5), ValueError,
     r"gamma must lie in \[0, 1\]"),
    (lambda: est.remax_advantages(torch.ones(2, 3), torch.ones(2, 3), torch.ones(3)), ValueError,
     r"reward_baselines must have shape \(B,\) or \(B, 1\) with B = 2"),
    (lambda: est.optimal_token_baseline_advantages(torch.ones(2, 3), torch.ones(2, 3), torch.ones(2, 2),
                                                   torch.ones(2, 3), group_size=2), ValueError,
     r"old_logprobs must have shape \(2, 3\) \(as token_rewards\)"),
    (lambda: est.gdpo_advantages(torch.ones(4, 2), torch.ones(4, 3), group_size=2, weights=[1.0]), ValueError,
     r"weights must have shape \(K,\) = \(2,\)"),
    (lambda: est.reinforce_plus_plus_baseline_advantages(torch.ones(4), torch.ones(3, 2), group_size=2), ValueError,
     r"response_mask must have shape \(B, T\) with B = 4"),
    (lambda: r_verl.compute_rloo_outcome_advantage(torch.ones(4, 3), torch.ones(4, 3), np.array(["a", "b"])),
     ValueError, r"index must hold one group label per response, shape \(B,\) = \(4,\)"),
    (lambda: r_verl.compute_rloo_outcome_advantage(torch.ones(4, 3), torch.ones(4, 3), torch.ones(4)), TypeError,
     "index must hold integer group labels"),
    (lambda: r_verl.compute_grpo_outcome_advantage(torch.ones(4, 3), torch.ones(4, 2), ["a"] * 4), ValueError,
     r"response_mask must be a tensor of token_level_rewards' shape \(4, 3\)"),
    (lambda: r_verl.compute_reinforce_plus_plus_outcome_advantage(torch.ones(4, 3), torch.ones(4, 3)), ValueError,
     "needs config with gamma"),
    (lambda: r_verl.compute_gdpo_outcome_advantage(torch.ones(2, 3), torch.ones(2, 3), ["a", "a"], config={},
                                                   non_tensor_batch={}, batch={}), ValueError,
     "GDPO requires 'algorithm.gdpo_reward_keys'"),
])
def test_bad_input_is_refused_naming_the_argument(call, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        call()


def test_exposed_in_rlops() -> None:
    assert isinstance(rlops.estimators, ModuleType)
    for name in est.__all__:
        assert getattr(est, name).__doc__ and inspect.signature(getattr(est, name)).return_annotation != inspect._empty


@pytest.mark.parametrize("name", ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "k1+", "k2+", "k3+",
                                  "low_var_kl+", "abs+"])
def test_verl_kl_penalty_matches_verl(verl: SimpleNamespace, name: str) -> None:
    """rlops.integrations.verl.kl_penalty, and the policy loss's KL estimator of the same name, against
    verl 0.9.1's kl_penalty (core_algos.py): values and gradients, spread enough to reach the clamps."""
    g = torch.Generator().manual_seed(1)
    logp = (-torch.rand(4, 9, generator=g, dtype=torch.float64) * 30).requires_grad_(True)
    ref = -torch.rand(4, 9, generator=g, dtype=torch.float64) * 30
    ref[0, 0] = logp[0, 0].detach()  # d = 0: abs's gradient there is torch.abs's, 0
    want = verl.ca.kl_penalty(logp, ref, name)
    (want_grad,) = torch.autograd.grad(want.sum() * 0.5, logp)
    got = r_verl.kl_penalty(logp, ref, name)
    (got_grad,) = torch.autograd.grad(got.sum() * 0.5, logp)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=1e-12)
    from rlops import reference

    estimator = {"kl": "k1", "mse": "k2", "low_var_kl": "k3"}.get(name.removesuffix("+"), name.removesuffix("+"))
    estimator += "+" if name.endswith("+") else ""
    oracle = reference.kl_penalty(logp, ref, estimator)
    (oracle_grad,) = torch.autograd.grad(oracle.sum() * 0.5, logp)
    torch.testing.assert_close(oracle, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(oracle_grad, want_grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["cispo", "sapo"])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_verl_policy_losses_match_verl(verl: SimpleNamespace, name: str, mode: str) -> None:
    """get_policy_loss_fn("cispo" / "sapo") against verl 0.9.1's (core_algos.py): loss, gradient and
    metrics, with masking, rollout IS weights and old log-probs off policy (the clamp binds)."""
    from verl.workers.config import ActorConfig

    config = ActorConfig(strategy="fsdp", clip_ratio=0.2, clip_ratio_low=0.15, clip_ratio_high=0.25,
                         ppo_micro_batch_size_per_gpu=1, rollout_n=1, tau_pos=1.2, tau_neg=2.0)
    g = torch.Generator().manual_seed(2)
    log_prob = -torch.rand(4, 6, generator=g, dtype=torch.float64) * 3
    old = log_prob + 0.5 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    adv = torch.randn(4, 6, generator=g, dtype=torch.float64)
    mask = (torch.rand(4, 6, generator=g) > 0.3).double()
    mask[1] = 0  # a fully masked response
    isw = torch.rand(4, 6, generator=g, dtype=torch.float64) + 0.5
    ratio = (log_prob - old).exp()
    assert ((ratio > 1.25) & (mask > 0)).any() and ((ratio < 0.85) & (mask > 0)).any()
    results = []
    for fn in (r_verl.get_policy_loss_fn(name), verl.ca.get_policy_loss_fn(name)):
        x = log_prob.clone().requires_grad_(True)
        loss, metrics = fn(old, x, adv, mask, mode, config, isw)
        (grad,) = torch.autograd.grad(loss * 0.7, x)
        results.append((loss.detach(), grad, metrics))
    (ours, our_grad, our_metrics), (theirs, their_grad, their_metrics) = results
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    torch.testing.assert_close(our_grad, their_grad, rtol=0, atol=1e-12)
    assert our_metrics.keys() == their_metrics.keys()
    for key in our_metrics:
        assert our_metrics[key] == pytest.approx(float(their_metrics[key]), abs=1e-9), key
