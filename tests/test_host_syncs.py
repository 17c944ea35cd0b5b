"""No device-to-host sync in a forward and backward of any op on non-CPU tensors.

The proof runs every op on `meta` tensors: they have shapes but no data, so any read of a value
back to the host (`.item()`, `int()`, `bool()`, `.tolist()`, `.cpu()`, and `nonzero()` or boolean
indexing, whose output size is data) raises. The kernel launchers are replaced by shape-only
stand-ins, so what runs is rlops' own Python: the checks, the dispatch, the autograd glue and the
PyTorch backend. The proof can fail: with RLOPS_CHECK=1 the value checks read back, and raise.

The rule under test (rlops/_validation.py): the value checks (token ids in [0, V), 0/1 masks,
cu_seqlens) run on CPU tensors always and elsewhere only with RLOPS_CHECK=1; unchecked, a bad
value never reads out of bounds (an out-of-range id gives NaN).

Not covered here: the one-time probe `_accumulate_variant` of the fused-linear path (bf16/fp16
weights only; one read-back per device type per process, cached) and `PolicyLossOutput.metrics`
(one read-back on first access, by design).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch

import rlops
from rlops import _validation
from rlops.constants import N_POLICY_ROWS, N_STATS
from rlops.ops import _backend
from rlops.packing import Layout, cu_seqlens_from_lengths

# The op modules (rlops.ops re-exports functions of the same names, hence import_module).
stats_ops, policy_ops, linear_ops, gae_ops = (importlib.import_module(f"rlops.ops.{name}") for name in
                                              ("token_stats", "policy_loss", "linear_policy_loss", "gae"))

B, T, V, H = 2, 3, 16, 8
LENGTHS = [2, 0, 4]  # packed: S = 3 sequences (one empty), N = 6 tokens
S, N = len(LENGTHS), sum(LENGTHS)
META = torch.device("meta")


# ---- running the ops on meta tensors ------------------------------------------------------------

def _meta_launchers() -> SimpleNamespace:
    """Shape-only stand-ins for the kernel launchers (meta tensors cannot run a kernel)."""
    return SimpleNamespace(
        token_stats_fwd=lambda logits, tokens, temperature, ref_logits=None, mask=None:
            logits.new_empty((N_STATS, *tokens.shape), dtype=torch.float32),
        logits_grad=lambda logits, tokens, stats, grads, temperature, ref_logits=None, out=None, grad_scale=None:
            torch.empty_like(logits) if out is None else out,
        policy_loss_fwd=lambda logits, tokens, ref_logits, inputs, epilogue:
            logits.new_empty((N_POLICY_ROWS, *tokens.shape), dtype=torch.float32),
        gae_fwd=lambda rewards, values, mask, bootstrap, gamma, lam, cu_seqlens=None:
            tuple(rewards.new_empty(rewards.shape, dtype=torch.float32) for _ in range(2)),
    )


@pytest.fixture
def on_meta(monkeypatch: pytest.MonkeyPatch) -> None:
    """Backend resolution accepts meta tensors (as a GPU's: "auto" gives triton there, and any kernel
    backend is taken as asked), and the kernel launchers, which the ops call directly when eager
    (rlops.ops._fast), get shape-only stand-ins. (The launchers' own host code, rlops.kernels and
    rlops._cuda, only shapes, allocates and launches: no value is read back there.)"""
    resolve = _backend.resolve_backend

    def resolve_meta(backend: str, x: torch.Tensor, op: str | None = None) -> str:
        if x.device.type != "meta":
            return resolve(backend, x, op)
        return "triton" if backend == "auto" else backend

    stand_ins = _meta_launchers()
    for module in (stats_ops, policy_ops, linear_ops, gae_ops):
        monkeypatch.setattr(module, "resolve_backend", resolve_meta)
        monkeypatch.setattr(module, "launchers", lambda backend: stand_ins)
    monkeypatch.delenv(_validation.CHECK_ENV, raising=False)


def _inputs(device: torch.device) -> SimpleNamespace:
    """Valid inputs of every op (built on the CPU, then moved): padded (B, T) and packed (N,)."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape: int, grad: bool = False) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device).requires_grad_(grad)

    def ids(*shape: int) -> torch.Tensor:
        return torch.randint(0, V, shape, generator=g).to(device)

    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    tokens = torch.randint(0, V, (B, T), generator=g).masked_fill(mask == 0, -100)  # padding ids where masked
    return SimpleNamespace(
        logits=randn(B, T, V, grad=True), ref_logits=randn(B, T, V), tokens=tokens.to(device),
        lm_logits=randn(B, T + 1, V, grad=True),  # a causal LM's, one position more than the tokens
        mask=mask.to(device),  # int 0/1: the 0/1 check applies
        adv=randn(B), logp=randn(B, T) - 2, ref_logp=randn(B, T) - 2,
        hidden=randn(B, T, H, grad=True), weight=randn(V, H, grad=True), bias=randn(V, grad=True),
        ref_hidden=randn(B, T, H), ref_weight=randn(V, H),
        p_logits=randn(N, V, grad=True), p_tokens=ids(N), p_mask=(torch.arange(N) % 3 != 1).float().to(device),
        p_adv=randn(S), p_logp=randn(N) - 2, p_hidden=randn(N, H, grad=True),
        cu=cu_seqlens_from_lengths(torch.tensor(LENGTHS)).to(device),
        rewards=randn(B, T), values=randn(B, T), boot=randn(B), p_rewards=randn(N), p_values=randn(N), p_boot=randn(S),
        scores=randn(4), group_ids=torch.tensor([3, 1, 3, 1]).to(device),
    )


def _policy(x: SimpleNamespace, backend: str, **kw) -> torch.Tensor:
    return rlops.policy_loss(x.logits, x.tokens, x.adv, mask=x.mask, old_logprobs=x.logp, backend=backend,
                             loss_agg="seq-mean-token-mean", entropy_coef=0.01, **kw).loss


def _packed_policy(x: SimpleNamespace, backend: str, **kw) -> torch.Tensor:
    return rlops.policy_loss(x.p_logits, x.p_tokens, x.p_adv, mask=x.p_mask, old_logprobs=x.p_logp,
                             cu_seqlens=x.cu, backend=backend, kl_coef=0.1, ref_logprobs=x.p_logp - 0.1,
                             loss_agg="seq-mean-token-mean", **kw).loss


def _linear(x: SimpleNamespace, backend: str, **kw) -> torch.Tensor:
    return rlops.linear_policy_loss(x.hidden, x.weight, x.tokens, x.adv, bias=x.bias, mask=x.mask,
                                    old_logprobs=x.logp, backend=backend, **kw).loss


_ROLLOUT = rlops.RolloutCorrection(level="sequence", mode="mask", lower=0.5, upper=2.0, reject={"seq_max_k3": 1.0})


def _sum(*outs: torch.Tensor) -> torch.Tensor:
    return sum(o.sum() for o in outs)


# name -> fn(inputs, backend): the op's output, differentiated when it has a gradient (_run)
KERNEL_OPS: dict[str, Callable[[SimpleNamespace, str], torch.Tensor]] = {
    "token_logprobs": lambda x, b: rlops.token_logprobs(x.logits, x.tokens.clamp(min=0), backend=b),
    "token_logprobs_and_entropy": lambda x, b: _sum(*rlops.token_logprobs_and_entropy(
        x.logits, x.tokens.clamp(min=0), backend=b)),
    "policy_loss-k3-token": lambda x, b: _policy(x, b, kl_coef=0.1, ref_logprobs=x.ref_logp),
    "policy_loss-full-token": lambda x, b: _policy(x, b, kl_coef=0.1, kl_estimator="full", ref_logits=x.ref_logits),
    "policy_loss-k3-sequence": lambda x, b: _policy(x, b, kl_coef=0.1, ref_logprobs=x.ref_logp,
                                                    ratio_level="sequence"),
    "policy_loss-full-sequence": lambda x, b: _policy(x, b, kl_coef=0.1, kl_estimator="full", ref_logits=x.ref_logits,
                                                      ratio_level="sequence"),
    "policy_loss-packed-token": lambda x, b: _packed_policy(x, b),
    "policy_loss-lm-logits": lambda x, b: rlops.policy_loss(x.lm_logits, x.tokens, x.adv, mask=x.mask, backend=b,
                                                           kl_coef=0.1, kl_estimator="full", ref_logits=x.ref_logits,
                                                           inplace_grad=False).loss,
    # The objectives and options that couple tokens (rlops/objectives.py), and the rollout correction.
    "policy_loss-coupled": lambda x, b: _policy(x, b, objective="vespo", off_policy_mask=0.1, top_entropy_quantile=0.5,
                                                rollout_logprobs=x.ref_logp),
    "policy_loss-clip-cov": lambda x, b: _policy(x, b, objective="clip_cov", cov_ratio=0.5),
    "policy_loss-kl-cov": lambda x, b: _policy(x, b, objective="kl_cov", cov_ratio=0.5),
    "policy_loss-gmpo-rollout": lambda x, b: _policy(x, b, objective="gmpo", rollout_logprobs=x.ref_logp,
                                                     rollout_correction=_ROLLOUT),
    "policy_loss-packed-sequence": lambda x, b: _packed_policy(x, b, ratio_level="sequence"),
    "PolicyLoss": lambda x, b: rlops.PolicyLoss(rlops.PolicyLossConfig.grpo(backend=b))(
        x.logits, x.tokens, x.adv, mask=x.mask, ref_logprobs=x.ref_logp).loss,
    "linear_policy_loss-token": lambda x, b: _linear(x, b, kl_coef=0.1, ref_logprobs=x.ref_logp, entropy_coef=0.01),
    "linear_policy_loss-sequence": lambda x, b: _linear(x, b, ratio_level="sequence"),
    "linear_policy_loss-full": lambda x, b: _linear(x, b, kl_coef=0.1, kl_estimator="full", ref_hidden=x.ref_hidden,
                                                    ref_weight=x.ref_weight),
    "linear_policy_loss-packed": lambda x, b: rlops.linear_policy_loss(
        x.p_hidden, x.weight, x.p_tokens, x.p_adv, mask=x.p_mask, cu_seqlens=x.cu, backend=b).loss,
    "linear_token_logprobs_and_entropy": lambda x, b: _sum(*rlops.linear_token_logprobs_and_entropy(
        x.hidden, x.weight, x.tokens.clamp(min=0), bias=x.bias, backend=b)),
    "linear_token_logprobs_and_entropy-packed": lambda x, b: _sum(*rlops.linear_token_logprobs_and_entropy(
        x.p_hidden, x.weight, x.p_tokens, cu_seqlens=x.cu, backend=b)),
    "gae": lambda x, b: _sum(*rlops.gae(x.rewards, x.values, x.mask, gamma=0.9, bootstrap=x.boot, backend=b)),
    "gae-packed": lambda x, b: _sum(*rlops.gae(x.p_rewards, x.p_values, x.p_mask, bootstrap=x.p_boot,
                                              cu_seqlens=x.cu, backend=b)),
}
OTHER_OPS: dict[str, Callable[[SimpleNamespace], torch.Tensor]] = {  # no backend to choose
    "group_advantages-group_size": lambda x: rlops.group_advantages(x.scores, group_size=2),
    "group_advantages-group_ids": lambda x: rlops.group_advantages(x.scores[:, None], group_ids=x.group_ids),
    "group_advantages-packed-tokens": lambda x: rlops.group_advantages(x.p_rewards, group_size=3, cu_seqlens=x.cu),
    "group_advantages-packed-sequences": lambda x: rlops.group_advantages(x.p_boot, group_size=3, cu_seqlens=x.cu,
                                                                          num_tokens=N),
    "masked_whiten": lambda x: rlops.masked_whiten(x.rewards, x.mask.float()),
    "masked_whiten-packed": lambda x: rlops.masked_whiten(x.p_rewards, x.p_mask, cu_seqlens=x.cu),
    "kl_shaped_rewards": lambda x: rlops.kl_shaped_rewards(x.boot, x.logp, x.ref_logp, x.mask, 0.1),
    "kl_shaped_rewards-packed": lambda x: rlops.kl_shaped_rewards(x.p_boot, x.p_logp, x.p_logp - 0.2, x.p_mask, 0.1,
                                                                  cu_seqlens=x.cu),
}
UNCHECKED = {"group_advantages-group_size", "group_advantages-group_ids"}  # no value to check


def _run(name: str, x: SimpleNamespace, backend: str | None) -> torch.Tensor:
    out = OTHER_OPS[name](x) if backend is None else KERNEL_OPS[name](x, backend)
    if out.requires_grad:
        out.sum().backward()
    return out


CASES = [(name, b) for name in KERNEL_OPS for b in ("torch", "triton", "cuda")] + [(name, None) for name in OTHER_OPS]


@pytest.mark.parametrize("name, backend", CASES, ids=[f"{n}-{b}" if b else n for n, b in CASES])
def test_no_host_sync_on_a_device(on_meta, name: str, backend: str | None) -> None:
    if backend in (None, "torch"):  # the inputs are valid: the call passes on the CPU, where every value check runs
        _run(name, _inputs(torch.device("cpu")), backend)
    x = _inputs(META)
    out = _run(name, x, backend)
    assert out.device == META
    for leaf in (x.logits, x.hidden, x.weight, x.bias, x.p_logits, x.p_hidden):
        assert leaf.grad is None or leaf.grad.device == META


@pytest.mark.parametrize("name, backend", [(n, b) for n, b in CASES if n not in UNCHECKED and b != "cuda"])
def test_the_proof_sees_a_sync(on_meta, monkeypatch: pytest.MonkeyPatch, name: str, backend: str | None) -> None:
    # RLOPS_CHECK=1 turns the value checks on off the CPU: each reads values back, and meta tensors raise.
    monkeypatch.setenv(_validation.CHECK_ENV, "1")
    with pytest.raises((RuntimeError, NotImplementedError), match="meta"):
        _run(name, _inputs(META), backend)


def test_the_proof_sees_the_old_linear_row_selection(on_meta, monkeypatch: pytest.MonkeyPatch) -> None:
    # The CPU's way of dropping masked rows (nonzero) sizes a tensor by data: a sync on a GPU.
    monkeypatch.setattr(linear_ops, "_drops_masked_rows", lambda hidden: True)
    with pytest.raises(NotImplementedError, match="nonzero"):
        _run("linear_policy_loss-token", _inputs(META), "triton")


def test_value_checks_gate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(_validation.CHECK_ENV, raising=False)
    cpu, meta = torch.zeros(1), torch.zeros(1, device=META)
    assert _validation.value_checks_enabled(cpu) and not _validation.value_checks_enabled(meta)
    monkeypatch.setenv(_validation.CHECK_ENV, "0")
    assert not _validation.value_checks_enabled(meta)
    monkeypatch.setenv(_validation.CHECK_ENV, "1")
    assert _validation.value_checks_enabled(meta) and _validation.value_checks_enabled(cpu)


# ---- unchecked values: CPU tensors treated as a GPU's ------------------------------------------

@pytest.fixture
def as_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU tensors get a GPU's checks: the value checks run only with RLOPS_CHECK=1."""
    monkeypatch.setattr(_validation, "ALWAYS_CHECKED_DEVICES", ())
    monkeypatch.delenv(_validation.CHECK_ENV, raising=False)


def _bad_calls(x: SimpleNamespace) -> list[tuple[Callable[[], object], str]]:
    """Calls with a bad value and the error that the value checks give."""
    oor = x.tokens.masked_fill(x.mask.bool() & (torch.arange(T) == 0), V)  # id V where the mask is 1
    bad_cu = x.cu.clone()
    bad_cu[-1] = N + 3
    return [
        (lambda: rlops.token_logprobs(x.logits, x.tokens.clamp(min=0) - 1), r"tokens must lie in \[0, V\) = \[0, 16\)"),
        (lambda: rlops.policy_loss(x.logits, oor, x.adv, mask=x.mask), r"tokens must lie in \[0, V\).* where the mask"),
        (lambda: rlops.linear_policy_loss(x.hidden, x.weight, oor, x.adv, mask=x.mask), r"tokens must lie in \[0, V\)"),
        (lambda: rlops.policy_loss(x.logits, x.tokens.clamp(min=0), x.adv, mask=x.mask * 2),
         "mask must hold only 0 and 1"),
        (lambda: rlops.gae(x.rewards, x.values, x.mask * 0.5), "mask must hold only 0 and 1"),
        (lambda: rlops.masked_whiten(x.p_rewards, cu_seqlens=bad_cu), "cu_seqlens must end at"),
        (lambda: rlops.gae(x.p_rewards, x.p_values, cu_seqlens=bad_cu.flip(0)), "cu_seqlens must start at 0"),
    ]


def test_cpu_is_checked_without_rlops_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(_validation.CHECK_ENV, raising=False)
    x = _inputs(torch.device("cpu"))
    for call, match in _bad_calls(x):
        with pytest.raises(ValueError, match=match):
            call()


def test_rlops_check_restores_the_named_errors(as_gpu, monkeypatch: pytest.MonkeyPatch) -> None:
    x = _inputs(torch.device("cpu"))
    for call, _ in _bad_calls(x):
        call()  # unchecked: no error, and no crash
    monkeypatch.setenv(_validation.CHECK_ENV, "1")
    for call, match in _bad_calls(x):
        with pytest.raises(ValueError, match=match):
            call()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_out_of_range_ids_give_nan_unchecked(as_gpu, backend: str) -> None:
    x = _inputs(torch.device("cpu"))
    tokens = x.tokens.clamp(min=0)
    tokens[0, 1], tokens[1, 0] = V, -1  # both counted (mask 1)
    logp, entropy = rlops.token_logprobs_and_entropy(x.logits, tokens, backend=backend)
    bad = tokens >= V
    bad |= tokens < 0
    assert logp[bad].isnan().all() and logp[~bad].isfinite().all() and entropy.isfinite().all()
    (logp.nan_to_num() + entropy).sum().backward()  # runs (the gradient reads no token's logit)
    for kl in ({}, {"kl_coef": 0.1, "ref_logprobs": x.ref_logp}):
        loss = rlops.policy_loss(x.logits, tokens, x.adv, mask=x.mask, backend=backend, **kl).loss
        assert loss.isnan()
        loss.backward()
    loss = rlops.linear_policy_loss(x.hidden, x.weight, tokens, x.adv, mask=x.mask, backend=backend).loss
    assert loss.isnan()
    loss.backward()


def test_bad_mask_values_count_as_nonzero_unchecked(as_gpu) -> None:
    x = _inputs(torch.device("cpu"))
    tokens = x.tokens.clamp(min=0)
    got = rlops.policy_loss(x.logits, tokens, x.adv, mask=x.mask * 0.5, backend="torch")
    want = rlops.policy_loss(x.logits, tokens, x.adv, mask=x.mask != 0, backend="torch")
    assert torch.equal(got.loss, want.loss) and torch.equal(got.mask, want.mask)


def test_bad_cu_seqlens_never_index_out_of_bounds(as_gpu) -> None:
    x = _inputs(torch.device("cpu"))
    ones = torch.ones(N, dtype=torch.bool)
    for cu in ([0, 2, 3], [0, 2, 9], [0, 5, 2, 6], [3, 4, 6], [0]):
        cu = torch.tensor(cu)
        layout = Layout.of(ones, cu)
        assert layout.seq_totals(torch.ones(N)).shape == (len(cu) - 1,)
        assert layout.per_token(torch.ones(len(cu) - 1)).shape == (N,)
        adv = torch.ones(len(cu) - 1)
        for level in ("token", "sequence"):
            for backend in ("torch", "triton") if len(cu) < 4 else ("torch",):
                rlops.policy_loss(x.p_logits, x.p_tokens, adv, cu_seqlens=cu, ratio_level=level, backend=backend)
        rlops.gae(x.p_rewards, x.p_values, cu_seqlens=cu, bootstrap=adv, backend="torch")
        rlops.kl_shaped_rewards(adv, x.p_logp, x.p_logp, ones, 0.1, cu_seqlens=cu)
        rlops.group_advantages(x.p_rewards, group_size=1, cu_seqlens=cu)
    assert Layout.of(ones, torch.tensor([0, 2, 3])).seq_ids.tolist() == [0, 0, 1, 1, 1, 1]  # the tail joins the last


# ---- the fused-linear path of a GPU (every row projected) on CPU tensors ------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_linear_all_rows_path_equals_the_dropped_rows_one(monkeypatch: pytest.MonkeyPatch, backend: str,
                                                           ratio_level: str) -> None:
    # A GPU projects every row (no nonzero()); the CPU drops the masked ones. Same results, and the
    # masked rows' padding (id -100, NaN hidden states) reaches nothing.
    def run(drop: bool) -> tuple[torch.Tensor, ...]:
        monkeypatch.setattr(linear_ops, "_drops_masked_rows", lambda hidden: drop)
        x = _inputs(torch.device("cpu"))
        masked = ~x.mask.bool()[..., None]
        hidden = x.hidden.detach().masked_fill(masked, float("nan")).requires_grad_()
        out = rlops.linear_policy_loss(hidden, x.weight, x.tokens, x.adv, bias=x.bias, mask=x.mask,
                                       old_logprobs=x.logp, kl_coef=0.1, kl_estimator="full",
                                       ref_hidden=x.ref_hidden.masked_fill(masked, float("nan")),
                                       ref_weight=x.ref_weight, entropy_coef=0.01, ratio_level=ratio_level,
                                       backend=backend, chunk_size=4)
        out.loss.backward()
        assert not hidden.grad[masked.expand_as(hidden)].any()
        return out.loss, out.logprobs, out.entropy, out.kl, out.ratio, hidden.grad, x.weight.grad, x.bias.grad

    for got, want in zip(run(False), run(True), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
