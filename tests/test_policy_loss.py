"""The fused policy loss against the float64 reference (SPEC sections 2-4), and against TRL and verl.

On a CPU-only machine the kernels run in Triton's interpreter; on a GPU machine the same
tests run them compiled on CUDA.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import pytest
import torch
from helpers import DEVICE, FP32_TOL, assert_grad_close, assert_values_close, float32_tol

import rlops
from rlops import baselines, kernels, reference
from rlops.options import Epilogue, PolicyBatch, TokenInputs, aggregation_weights
from rlops.packing import Layout

B, T, V = 4, 6, 300
HALF = (torch.bfloat16, torch.float16)


def _batch(dtype: torch.dtype = torch.float32, seed: int = 0, vocab: int = V, masked_row: bool = True,
           spread: float = 0.5, rows: int = B, time: int = T) -> dict[str, torch.Tensor]:
    """Random inputs whose ratios straddle the clip range on both sides.

    old_logprobs and ref_logprobs sit around the true log-probs (spread gives ratios from
    about e^-1 to e^1 and beyond), one row is fully masked and the first fully valid.
    """
    g = torch.Generator().manual_seed(seed)
    B, T = rows, time
    logits = (torch.randn(B, T, vocab, generator=g) * 3).to(dtype)
    tokens = torch.randint(0, vocab, (B, T), generator=g)
    logp = reference.token_logprobs(logits.double(), tokens)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[0] = True
    if masked_row:
        mask[2] = False
    batch = {
        "logits": logits,
        "tokens": tokens,
        "advantages": torch.randn(B, T, generator=g),
        "mask": mask,
        "old_logprobs": (logp + spread * torch.randn(B, T, generator=g, dtype=torch.float64)).float(),
        "ref_logprobs": (logp + spread * torch.randn(B, T, generator=g, dtype=torch.float64)).float(),
        "ref_logits": (logits.float() + 0.5 * torch.randn(B, T, vocab, generator=g)).to(dtype),
        "is_weights": torch.rand(B, T, generator=g) * 1.5 + 0.25,
        "rollout_logprobs": (logp + spread * torch.randn(B, T, generator=g, dtype=torch.float64)).float(),
    }
    return {k: v.to(DEVICE) for k, v in batch.items()}


OLD = ("old_logprobs",)
CASES: dict[str, tuple[tuple[str, ...], dict[str, object]]] = {
    # name: (batch entries passed, options)
    "on-policy": ((), {}),
    "off-policy": (OLD, {}),
    "clip-higher": (OLD, {"clip_low": 0.2, "clip_high": 0.28}),
    "dual-clip": (OLD, {"dual_clip": 1.5}),
    "is-weights": ((*OLD, "is_weights"), {}),
    "is-weights-per-row": ((*OLD, "is_weights:row"), {}),
    "k1": ((*OLD, "ref_logprobs"), {"kl_coef": 0.1, "kl_estimator": "k1"}),
    "k2": ((*OLD, "ref_logprobs"), {"kl_coef": 0.1, "kl_estimator": "k2"}),
    "k3": ((*OLD, "ref_logprobs"), {"kl_coef": 0.1, "kl_estimator": "k3"}),
    "full-kl": ((*OLD, "ref_logits"), {"kl_coef": 0.1, "kl_estimator": "full"}),
    "abs": ((*OLD, "ref_logprobs"), {"kl_coef": 0.1, "kl_estimator": "abs"}),
    "ratio-cap": (OLD, {"clip_low": 0.2, "clip_high": 0.28, "ratio_cap": 1.1}),
    "cispo": ((*OLD, "is_weights"), {"objective": "cispo", "clip_low": 0.1, "clip_high": 0.05, "entropy_coef": 0.01}),
    "sapo": ((*OLD, "ref_logprobs"), {"objective": "sapo", "sapo_tau_pos": 1.0, "sapo_tau_neg": 2.5,
                                      "kl_coef": 0.05, "loss_agg": "seq-mean-token-mean"}),
    "gspo-sapo": (OLD, {"objective": "sapo", "ratio_level": "sequence"}),
    "k3+": ((*OLD, "ref_logprobs"), {"kl_coef": 0.1, "kl_estimator": "k3+"}),
    "abs+-ratio-weighted": ((*OLD, "ref_logprobs"), {"kl_coef": 0.1, "kl_estimator": "abs+",
                                                      "kl_ratio_weighted": True}),
    "reinforce": (("is_weights",), {"objective": "reinforce", "entropy_coef": 0.01}),  # reads no old log-probs
    "dro": ((*OLD, "ref_logprobs"), {"objective": "dro", "dro_beta": 0.7, "kl_coef": 0.05, "kl_estimator": "k2"}),
    # DPPO's bounds at the size of these tokens' probability moves: some inside, some outside.
    "dppo-tv": ((*OLD, "is_weights"), {"objective": "dppo_tv", "clip_low": 1e-5, "clip_high": 2e-5, "ratio_cap": 1.5}),
    "dppo-kl": (OLD, {"objective": "dppo_kl", "clip_low": 2e-6, "clip_high": 1e-6,
                      "loss_agg": "seq-mean-token-mean"}),
    "gmpo": ((*OLD, "is_weights"), {"objective": "gmpo", "clip_low": 0.3, "clip_high": 0.2,
                                    "loss_agg": "seq-mean-token-mean", "entropy_coef": 0.01}),
    "vespo": ((*OLD, "is_weights", "ref_logprobs", "advantages:row"),
              {"objective": "vespo", "kl_coef": 0.05, "vespo_k_neg": 2.5, "vespo_lambda_pos": 2.0}),
    # Clip-Cov with cov_ratio 1 draws every candidate (the oracle's selection); KL-Cov's is deterministic.
    "clip-cov": ((*OLD, "is_weights"), {"objective": "clip_cov", "cov_ratio": 1.0, "cov_low": 0.3, "cov_high": 3.0}),
    "kl-cov": ((*OLD, "ref_logprobs"), {"objective": "kl_cov", "cov_ratio": 0.2, "cov_kl_coef": 0.5, "kl_coef": 0.05,
                                        "loss_agg": "seq-mean-token-mean"}),
    "off-policy-mask": ((*OLD, "rollout_logprobs"), {"off_policy_mask": 0.05}),
    "off-policy-mask-old": ((*OLD, "advantages:row"), {"off_policy_mask": 0.0, "ratio_level": "sequence"}),
    "top-entropy": ((*OLD, "ref_logprobs"), {"top_entropy_quantile": 0.4, "entropy_coef": 0.03, "kl_coef": 0.1,
                                             "loss_agg": "seq-mean-token-mean", "entropy_agg": "token-mean"}),
    "entropy": (OLD, {"entropy_coef": 0.05}),
    "negative-entropy-coef": (OLD, {"entropy_coef": -0.05}),
    "temperature": (OLD, {"temperature": 0.7}),
    "seq-mean-token-mean": (OLD, {"loss_agg": "seq-mean-token-mean", "entropy_coef": 0.01}),
    "seq-mean-token-sum": (OLD, {"loss_agg": "seq-mean-token-sum", "entropy_coef": 0.01}),
    "seq-mean-token-sum-norm": (OLD, {"loss_agg": "seq-mean-token-sum-norm", "entropy_coef": 0.01}),
    "norm-len": (OLD, {"loss_agg": "seq-mean-token-sum-norm", "norm_len": 11}),
    "fractional-norm-len": (OLD, {"loss_agg": "seq-mean-token-sum-norm", "norm_len": 0.37}),
    "entropy-own-agg": (OLD, {"loss_agg": "seq-mean-token-mean", "entropy_coef": 0.05, "entropy_agg": "token-mean"}),
    "k3-ratio-weighted": ((*OLD, "ref_logprobs"), {"kl_coef": 0.1, "kl_estimator": "k3", "kl_ratio_weighted": True}),
    "full-ratio-weighted": ((*OLD, "ref_logits"), {"kl_coef": 0.1, "kl_estimator": "full", "kl_ratio_weighted": True,
                                                    "dual_clip": 2.0}),
    "gspo-ratio-weighted": ((*OLD, "ref_logprobs"), {"ratio_level": "sequence", "kl_coef": 0.1, "kl_estimator": "k2",
                                                      "kl_ratio_weighted": True}),
    "gspo-entropy-own-agg": (OLD, {"ratio_level": "sequence", "loss_agg": "seq-mean-token-sum-norm",
                                   "entropy_coef": 0.05, "entropy_agg": "seq-mean-token-mean"}),
    "advantages-per-row": ((*OLD, "advantages:row"), {}),
    "advantages-flat": ((*OLD, "advantages:flat"), {"loss_agg": "seq-mean-token-mean"}),
    "gspo": (OLD, {"ratio_level": "sequence", "clip_low": 0.05, "clip_high": 0.08}),
    "gspo-with-kl-entropy-is": ((*OLD, "ref_logprobs", "is_weights", "advantages:row"),
                                {"ratio_level": "sequence", "kl_coef": 0.05, "entropy_coef": 0.01,
                                 "loss_agg": "seq-mean-token-mean"}),
    "gspo-full-kl": ((*OLD, "ref_logits"), {"ratio_level": "sequence", "kl_coef": 0.05, "kl_estimator": "full",
                                             "dual_clip": 2.0, "temperature": 0.9}),
    "everything-k3": ((*OLD, "ref_logprobs", "is_weights", "advantages:row"),
                      {"clip_low": 0.2, "clip_high": 0.28, "dual_clip": 1.8, "kl_coef": 0.04, "kl_estimator": "k3",
                       "entropy_coef": 0.01, "loss_agg": "seq-mean-token-mean", "temperature": 0.8}),
    "everything-full": ((*OLD, "ref_logits", "is_weights:row"),
                        {"clip_low": 0.1, "clip_high": 0.3, "dual_clip": 2.5, "kl_coef": 0.2, "kl_estimator": "full",
                         "entropy_coef": 0.02, "loss_agg": "seq-mean-token-sum-norm", "norm_len": 9,
                         "temperature": 1.3}),
}


def _inputs(batch: dict[str, torch.Tensor], entries: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The keyword tensors of a case; 'name:row' passes (B, 1), 'name:flat' passes (B,)."""
    kwargs = {"mask": batch["mask"]}
    for entry in entries:
        name, _, form = entry.partition(":")
        x = batch[name]
        kwargs[name] = x[:, :1] if form == "row" else x[:, 0] if form == "flat" else x
    return kwargs


def _run(fn: Callable, batch: dict[str, torch.Tensor], entries: tuple[str, ...], options: dict[str, object],
         cast: torch.dtype | None = None, grad_scale: float = 0.7):
    """(output, d logits) of fn(logits, tokens, advantages, ...) with the loss scaled by grad_scale."""
    kwargs = _inputs(batch, entries)
    advantages = kwargs.pop("advantages", batch["advantages"])
    if cast is not None:
        kwargs = {k: (v.to(cast) if v.is_floating_point() else v) for k, v in kwargs.items()}
        advantages = advantages.to(cast)
    leaf = (batch["logits"] if cast is None else batch["logits"].to(cast)).detach().clone().requires_grad_(True)
    out = fn(leaf, batch["tokens"], advantages, **kwargs, **options)
    loss = out if isinstance(out, torch.Tensor) else out.loss
    (loss * grad_scale).backward()
    return out, leaf.grad


def _fused(logits, tokens, advantages, **kw):
    return rlops.policy_loss(logits, tokens, advantages, backend="triton", **kw)


def _check(case: str, dtype: torch.dtype, fn: Callable = _fused, seed: int = 0, vocab: int = V) -> None:
    entries, options = CASES[case]
    batch = _batch(dtype, seed, vocab)
    out, grad = _run(fn, batch, entries, options)
    ref, ref_grad = _run(reference.policy_loss, batch, entries, options, cast=torch.float64)
    mask = batch["mask"]
    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0
    assert grad.dtype == dtype
    assert_values_close(out.loss, ref.loss, float32_tol(ref.per_token_loss), "loss")
    for name in ("logprobs", "entropy", "kl", "ratio"):
        got, want = getattr(out, name), getattr(ref, name)
        assert got.dtype == torch.float32 and not got.requires_grad
        if name != "ratio":
            assert_values_close(got[mask], want[mask], float32_tol(want[mask]), name)
        assert not got[~mask].any(), f"{name} must be 0 where mask is 0"
    # The ratio exp(logp - old) multiplies the error of logp by itself (up to ~40 here), so it is
    # judged where SPEC's bound applies, on its log: log-ratio within 1e-5.
    assert_values_close(out.ratio[mask].log(), ref.ratio[mask].log(), FP32_TOL, "log ratio")
    eager = None
    if dtype in HALF:
        _, eager = _run(baselines.eager_policy_loss, batch, entries, options)
    assert_grad_close(grad, ref_grad, eager)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_fp32(case: str) -> None:
    _check(case, torch.float32)


def check_nan_propagates(case: str, fn: Callable = _fused) -> None:
    """A NaN in any counted input of the case (a logit of a counted token, or a per-token input at
    a counted token) gives a NaN loss; the same NaN at a masked token changes nothing (SPEC: NaN
    in counted inputs gives NaN, never a finite number). Forward only: the loss is the claim."""
    entries, options = CASES[case]
    batch = _batch(vocab=37)

    def loss(b: dict[str, torch.Tensor]) -> torch.Tensor:
        kwargs = _inputs(b, entries)
        return fn(b["logits"], b["tokens"], kwargs.pop("advantages", b["advantages"]), **kwargs, **options).loss

    clean = loss(batch)
    # Row 0 counts every token, row 2 none; a per-row input (":row", ":flat") is read at column 0.
    per_token = [(0, 1), (1, int((~batch["mask"][1]).nonzero()[0]))]
    for name, _, form in (e.partition(":") for e in ("logits", *entries)):
        if name == "ref_logits" and options.get("kl_estimator") != "full":
            continue
        if name == "rollout_logprobs":  # NaN there marks a token the engine could not score (TRL's convention)
            continue
        counted, masked = [(0, 0), (2, 0)] if form else per_token
        for where, want_nan in ((counted, True), (masked, False)):
            poisoned = dict(batch)
            poisoned[name] = batch[name].clone()
            poisoned[name][where] = float("nan")  # a whole row of logits, or one token's value
            got = loss(poisoned)
            if want_nan:
                assert got.isnan(), f"NaN {name} at a counted token gave loss {got.item()}"
            else:
                assert got == clean, f"NaN {name} at a masked token changed the loss"


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", list(CASES))
def test_nan_in_a_counted_input_gives_nan(case: str, backend: str) -> None:
    check_nan_propagates(case, lambda *a, **k: rlops.policy_loss(*a, backend=backend, **k))


def check_magnified(case: str, offset: float, temperature: float, fn: Callable = _fused) -> None:
    """The case with logits offset + x * temperature: the same distributions (so the same
    old and ref log-probs) at |x / tau| ~ 1e3-1e4. Every value within SPEC's plain 1e-5, the
    gradient within 1e-5 * max|grad|: nothing may carry the rounding of x / tau or of a
    log-sum-exp at the logits' magnitude."""
    entries, options = CASES[case]
    options = {**options, "temperature": temperature}
    batch = _batch(vocab=301)
    for name in ("logits", "ref_logits"):
        batch[name] = offset + batch[name] * temperature
    out, grad = _run(fn, batch, entries, options)
    ref, ref_grad = _run(reference.policy_loss, batch, entries, options, cast=torch.float64)
    mask = batch["mask"]
    assert_values_close(out.loss, ref.loss, what="loss")
    for name in ("logprobs", "entropy", "kl"):
        assert_values_close(getattr(out, name)[mask], getattr(ref, name)[mask], what=name)
    assert_values_close(out.ratio[mask].log(), ref.ratio[mask].log(), what="log ratio")  # as _check says
    assert_grad_close(grad, ref_grad)


MAGNIFIED = [(1e3, 1.0), (-1e4, 1.0), (5.0, 1e-3)]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("offset, temperature", MAGNIFIED)
@pytest.mark.parametrize("case", ["everything-k3", "everything-full", "gspo-full-kl"])
def test_large_logits_and_small_temperature(case: str, offset: float, temperature: float, backend: str) -> None:
    if backend == "torch" and DEVICE.type != "cpu":
        pytest.skip("the PyTorch backend's precision is checked on the CPU run")
    check_magnified(case, offset, temperature, lambda *a, **k: rlops.policy_loss(*a, backend=backend, **k))


@pytest.mark.parametrize("case", ["off-policy", "dual-clip", "k3", "full-kl", "gspo-full-kl", "everything-k3",
                                  "everything-full", "dro", "dppo-kl", "gmpo", "vespo", "top-entropy"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_reference_half(case: str, dtype: torch.dtype) -> None:
    _check(case, dtype)


@pytest.mark.parametrize("case", ["everything-k3", "everything-full", "gspo-full-kl"])
def test_several_vocabulary_blocks(case: str) -> None:
    _check(case, torch.float32, vocab=9000, seed=3)


@pytest.mark.parametrize("case", ["everything-k3", "everything-full", "gspo-with-kl-entropy-is", "cispo", "sapo",
                                  "reinforce", "dro", "dppo-tv", "dppo-kl", "gmpo", "vespo", "clip-cov", "kl-cov",
                                  "off-policy-mask", "off-policy-mask-old", "top-entropy"])
def test_torch_backend(case: str) -> None:
    def torch_backend(logits, tokens, advantages, **kw):
        return rlops.policy_loss(logits, tokens, advantages, backend="torch", **kw)

    _check(case, torch.float32, torch_backend)


@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_log_ratio_clamp_and_k3_clamp(dual_clip: float | None) -> None:
    # |logp - old| > 20 clamps the log-ratio and stops its gradient: with A < 0 and no dual
    # clip, a ratio of e^20 is the unclipped branch, so its gradient is 0 instead of -A e^20.
    # |ref - logp| > 20 and k3 > 10 clamp the KL likewise.
    batch = _batch()
    batch["old_logprobs"][0, :3] -= 25.0
    batch["advantages"][0, :3] = -1.0
    batch["old_logprobs"][1, :2] += 25.0
    batch["ref_logprobs"][0, 3:] += 30.0
    batch["ref_logprobs"][1, 2:4] += 3.0
    entries = (*OLD, "ref_logprobs")
    options = {"kl_coef": 0.1, "kl_estimator": "k3", "dual_clip": dual_clip}
    out, grad = _run(_fused, batch, entries, options)
    ref, ref_grad = _run(reference.policy_loss, batch, entries, options, cast=torch.float64)
    assert_values_close(out.loss, ref.loss, float32_tol(ref.per_token_loss), "loss")
    assert_values_close(out.ratio, torch.where(batch["mask"], ref.ratio, 0.0), float32_tol(ref.ratio), "ratio")
    assert_grad_close(grad, ref_grad)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("loss_agg", reference.LOSS_AGGS)
def test_empty_mask_gives_zero_loss_and_zero_grad(loss_agg: str, ratio_level: str, backend: str) -> None:
    batch = _batch()
    logits = batch["logits"].clone().requires_grad_(True)
    out = rlops.policy_loss(logits, batch["tokens"], batch["advantages"], mask=torch.zeros_like(batch["mask"]),
                            old_logprobs=batch["old_logprobs"], ref_logits=batch["ref_logits"], kl_coef=0.1,
                            kl_estimator="full", entropy_coef=0.01, loss_agg=loss_agg, ratio_level=ratio_level,
                            backend=backend)
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    assert out.metrics["tokens"] == 0 and all(math.isfinite(v) for v in out.metrics.values())


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_padding_values_never_leak(ratio_level: str, backend: str) -> None:
    # Frameworks pad per-token inputs with anything (0, -inf, NaN): masked tokens must not matter.
    batch = _batch()
    entries = (*OLD, "ref_logprobs", "is_weights")
    options = {"kl_coef": 0.1, "kl_estimator": "k2", "ratio_level": ratio_level, "backend": backend}
    clean_out, clean_grad = _run(rlops.policy_loss, batch, entries, options)
    padded = dict(batch)
    pad = ~batch["mask"]
    padded["advantages"] = batch["advantages"].masked_fill(pad, float("nan"))
    padded["old_logprobs"] = batch["old_logprobs"].masked_fill(pad, float("-inf"))
    padded["ref_logprobs"] = batch["ref_logprobs"].masked_fill(pad, float("inf"))
    padded["is_weights"] = batch["is_weights"].masked_fill(pad, float("nan"))
    padded["tokens"] = batch["tokens"].masked_fill(pad, -100)  # Hugging Face's label padding
    out, grad = _run(rlops.policy_loss, padded, entries, options)
    assert torch.equal(out.loss, clean_out.loss)
    assert torch.equal(grad, clean_grad)


@pytest.mark.parametrize("fn", [_fused, baselines.eager_policy_loss_output,
                                lambda *a, **k: rlops.policy_loss(*a, backend="torch", **k)])
def test_padding_ids_only_where_masked(fn: Callable) -> None:
    """-100 (or any id) may pad a masked token; at a counted token it is refused, naming tokens."""
    batch = _batch()
    padded = dict(batch, tokens=batch["tokens"].masked_fill(~batch["mask"], -100))
    clean, _ = _run(fn, batch, OLD, {})
    out, _ = _run(fn, padded, OLD, {})
    assert torch.equal(out.loss, clean.loss)
    bad = dict(batch, tokens=batch["tokens"].clone())
    bad["tokens"][0, 1] = -100  # row 0 counts every token
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, V\) = \[0, 300\) where the mask is 1"):
        _run(fn, bad, OLD, {})


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_kl_coef_zero_reads_no_reference(backend: str) -> None:
    batch = _batch()
    poisoned = {"ref_logprobs": torch.full_like(batch["ref_logprobs"], float("nan")),
                "ref_logits": torch.full_like(batch["ref_logits"], float("nan"))}
    out, grad = _run(rlops.policy_loss, {**batch, **poisoned}, (*OLD, "ref_logprobs", "ref_logits"),
                     {"kl_coef": 0.0, "kl_estimator": "full", "backend": backend})
    plain, plain_grad = _run(rlops.policy_loss, batch, OLD, {"backend": backend})
    assert torch.equal(out.loss, plain.loss) and torch.equal(grad, plain_grad)
    assert not out.kl.any()


def _metrics_by_hand(batch: dict[str, torch.Tensor], ratio: torch.Tensor, kl: torch.Tensor, entropy: torch.Tensor,
                     clip_low: float, clip_high: float, dual_clip: float) -> dict[str, float]:
    mask, adv = batch["mask"], batch["advantages"]
    valid = [tuple(bt) for bt in mask.nonzero().tolist()]
    n = len(valid)
    r = {bt: ratio[bt].item() for bt in valid}
    a = {bt: adv[bt].item() for bt in valid}
    low = sum(r[bt] < 1 - clip_low and a[bt] < 0 for bt in valid)
    high = sum(r[bt] > 1 + clip_high and a[bt] > 0 for bt in valid)
    # The data must tell the sign conventions apart, or a sign error could pass unnoticed.
    assert low != sum(r[bt] < 1 - clip_low and a[bt] > 0 for bt in valid)
    assert high != sum(r[bt] > 1 + clip_high and a[bt] < 0 for bt in valid)
    return {
        "clip_frac_low": low / n, "clip_frac_high": high / n, "clip_frac": (low + high) / n,
        "dual_clip_frac": sum(r[bt] > dual_clip and a[bt] < 0 for bt in valid) / n,
        "ratio_mean": sum(r.values()) / n, "kl_mean": sum(kl[bt].item() for bt in valid) / n,
        "entropy_mean": sum(entropy[bt].item() for bt in valid) / n,
        "approx_kl_old": sum(r[bt] - 1 - math.log(r[bt]) for bt in valid) / n, "tokens": n,
    }


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_metrics_by_hand(backend: str) -> None:
    batch = _batch(spread=0.8, rows=12, time=16, vocab=64)
    options = {"clip_low": 0.2, "clip_high": 0.28, "dual_clip": 1.6, "kl_coef": 0.1, "kl_estimator": "k3"}
    out, _ = _run(rlops.policy_loss, batch, (*OLD, "ref_logprobs"), {**options, "backend": backend})
    ref, _ = _run(reference.policy_loss, batch, (*OLD, "ref_logprobs"), options, cast=torch.float64)
    expected = _metrics_by_hand(batch, ref.ratio, ref.kl, ref.entropy, 0.2, 0.28, 1.6)
    assert expected["clip_frac_low"] > 0 and expected["clip_frac_high"] > 0 and expected["dual_clip_frac"] > 0
    assert out.metrics.keys() == expected.keys()
    for key, value in expected.items():
        assert out.metrics[key] == pytest.approx(value, abs=1e-5), key


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("kl", ["k3", "full"])
def test_inplace_grad(kl: str, ratio_level: str) -> None:
    batch = _batch()
    entries = (*OLD, "ref_logprobs" if kl == "k3" else "ref_logits")
    options = {"kl_coef": 0.1, "kl_estimator": kl, "entropy_coef": 0.01, "ratio_level": ratio_level,
               "backend": "triton"}
    _, expected = _run(rlops.policy_loss, batch, entries, options)

    # Logits produced by an operation, as an lm_head produces them; the gradient reaches `base`.
    base = batch["logits"].clone().requires_grad_(True)
    logits = base * 1.0
    kwargs = _inputs(batch, entries)
    out = rlops.policy_loss(logits, batch["tokens"], batch["advantages"], inplace_grad=True, **kwargs, **options)
    version = logits._version
    (out.loss * 0.7).backward()
    assert torch.equal(base.grad, expected)
    assert torch.equal(logits, expected), "the logits buffer now holds the gradient"
    assert logits._version > version, "autograd must see the overwrite"


def test_inplace_grad_is_seen_by_later_readers() -> None:
    batch = _batch()
    base = batch["logits"].clone().requires_grad_(True)
    logits = base * 1.0
    side = (logits * logits).sum()  # saves logits for its backward
    out = rlops.policy_loss(logits, batch["tokens"], batch["advantages"], mask=batch["mask"], inplace_grad=True,
                            backend="triton")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (out.loss + side).backward()


def test_inplace_grad_refuses_leaf_logits() -> None:
    batch = _batch()
    leaf = batch["logits"].clone().requires_grad_(True)
    with pytest.raises(ValueError, match="inplace_grad"):
        rlops.policy_loss(leaf, batch["tokens"], batch["advantages"], inplace_grad=True)


@pytest.mark.parametrize("loss_agg", reference.LOSS_AGGS)
def test_aggregation_weights_reproduce_aggregate(loss_agg: str) -> None:
    g = torch.Generator().manual_seed(4)
    per_token = torch.randn(5, 7, generator=g, dtype=torch.float64)
    mask = torch.rand(5, 7, generator=g) > 0.4
    mask[1] = False
    for norm_len in (None, 13):
        w = aggregation_weights(Layout.of(mask), loss_agg, norm_len).double()
        assert not w[~mask].any()
        expected = reference.aggregate(per_token, mask, loss_agg, norm_len)
        assert (w * per_token).sum().item() == pytest.approx(expected.item(), abs=1e-6)


@pytest.mark.parametrize("loss_agg", reference.LOSS_AGGS)
def test_token_inputs_weights_are_the_aggregation_weights(loss_agg: str) -> None:
    """Token-mean reaches the kernels as the mask and its count (the kernel divides): its weights
    are bitwise aggregation_weights', and the kernel's loss and gradient equal those it gives
    when handed those weights as a (B, T) tensor; the other modes carry the tensor itself."""
    batch = _batch()
    mask = batch["mask"].bool()
    config = rlops.PolicyLossConfig(loss_agg=loss_agg, norm_len=9.0)
    policy_batch = PolicyBatch(batch["tokens"], batch["advantages"], mask)
    inputs = TokenInputs.of(policy_batch, Layout.of(mask), config)
    expected = aggregation_weights(Layout.of(mask), loss_agg, 9.0)
    assert inputs.weights.dtype == torch.float32 and torch.equal(inputs.weights, expected)
    assert (inputs.agg_count is not None) == (loss_agg == "token-mean")
    assert inputs.dense().agg_count is None and torch.equal(inputs.dense().agg_weights, expected)
    # A chunk's map keeps the count, one number for the whole batch.
    assert inputs.map(lambda x: x[:, :2]).agg_count is inputs.agg_count
    logits = batch["logits"].float()
    epilogue = Epilogue.of(config)
    out = kernels.policy_loss_fwd(logits, batch["tokens"], None, inputs, epilogue)
    dense = kernels.policy_loss_fwd(logits, batch["tokens"], None, inputs.dense(), epilogue)
    assert torch.equal(out, dense)


def test_module_and_presets() -> None:
    batch = _batch()
    config = rlops.PolicyLossConfig.dapo(entropy_coef=0.01, backend="triton")
    assert (config.clip_low, config.clip_high, config.loss_agg) == (0.2, 0.28, "token-mean")
    module = rlops.PolicyLoss(config)
    kwargs = _inputs(batch, OLD)
    got = module(batch["logits"], batch["tokens"], batch["advantages"], **kwargs)
    want = rlops.policy_loss(batch["logits"], batch["tokens"], batch["advantages"], **kwargs,
                             **dataclasses.asdict(config))
    assert torch.equal(got.loss, want.loss)
    assert "clip_high=0.28" in repr(module)
    assert rlops.PolicyLossConfig.grpo().loss_agg == "seq-mean-token-mean"
    assert rlops.PolicyLossConfig.dr_grpo().loss_agg == "seq-mean-token-sum-norm"
    assert rlops.PolicyLossConfig.gspo().ratio_level == "sequence"
    assert rlops.PolicyLoss(kl_coef=0.5).config.kl_coef == 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.kl_coef = 1.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="clip_low"):
        rlops.PolicyLossConfig(clip_low=-0.1)
    with pytest.raises(ValueError, match="loss_agg"):
        rlops.PolicyLoss(loss_agg="mean")


def test_torch_compile_holds_the_fused_loss() -> None:
    batch = _batch()
    kwargs = _inputs(batch, (*OLD, "ref_logprobs"))

    def loss_fn(logits):
        return rlops.policy_loss(logits, batch["tokens"], batch["advantages"], kl_coef=0.1, backend="triton",
                                 **kwargs).loss

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    x = batch["logits"].clone().requires_grad_(True)
    got = compiled(x)
    (g,) = torch.autograd.grad(got, x)
    want = loss_fn(x)
    (w,) = torch.autograd.grad(want, x)
    assert torch.equal(got.detach(), want.detach()) and torch.equal(g, w)


NEXT_TOKEN_OPTIONS = {
    "k3": {"kl_coef": 0.1, "kl_estimator": "k3"},
    "full-kl": {"kl_coef": 0.1, "kl_estimator": "full"},
    "sequence": {"ratio_level": "sequence", "entropy_coef": 0.01},
    "gmpo": {"objective": "gmpo"},
}


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("options", list(NEXT_TOKEN_OPTIONS))
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_causal_lm_logits_with_one_position_more(backend: str, options: str, inplace: bool) -> None:
    check_causal_lm_logits(backend, options, inplace)


def check_causal_lm_logits(backend: str, options: str, inplace: bool) -> None:
    """Logits (B, T + 1, V) as a causal LM returns them for (B, T) tokens: the same loss as their
    slice [:, :-1] gives, bitwise, and its gradient, with 0 at the last position, written without
    the slice's copy (in place with inplace_grad); a (B, T + 1, V) reference is read the same way."""
    batch = _batch()
    g = torch.Generator().manual_seed(5)
    full = torch.cat([batch["logits"], torch.randn(B, 1, V, generator=g).to(DEVICE)], dim=1)
    ref = torch.cat([batch["ref_logits"], torch.randn(B, 1, V, generator=g).to(DEVICE)], dim=1)
    kwargs = {**_inputs(batch, (*OLD, "ref_logprobs")), **NEXT_TOKEN_OPTIONS[options], "backend": backend,
              "inplace_grad": inplace}
    results = []
    for given, ref_logits in ((lambda x: x, ref), (lambda x: x[:, :-1], ref[:, :-1])):
        leaf = full.clone().requires_grad_(True)
        x = leaf * 1.0  # an lm_head's output: not a leaf, so that inplace_grad may overwrite it
        out = rlops.policy_loss(given(x), batch["tokens"], batch["advantages"], ref_logits=ref_logits, **kwargs)
        (grad,) = torch.autograd.grad(out.loss * 0.7, leaf)
        results.append((out, grad))
    (got, got_grad), (want, want_grad) = results
    assert torch.equal(got.loss, want.loss) and torch.equal(got.logprobs, want.logprobs)
    assert torch.equal(got_grad, want_grad)
    assert not got_grad[:, -1].any() and got_grad[:, :-1].abs().sum() > 0


def test_torch_compile_holds_the_loss_of_causal_lm_logits() -> None:
    batch = _batch()
    kwargs = _inputs(batch, (*OLD, "ref_logprobs"))
    full = torch.cat([batch["logits"], batch["logits"][:, :1]], dim=1)

    def loss_fn(logits):
        return rlops.policy_loss(logits, batch["tokens"], batch["advantages"], kl_coef=0.1, backend="triton",
                                 **kwargs).loss

    x = full.clone().requires_grad_(True)
    got = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)(x)
    (g,) = torch.autograd.grad(got, x)
    want = loss_fn(x[:, :-1])
    (w,) = torch.autograd.grad(want, x)
    assert torch.equal(got.detach(), want.detach()) and torch.equal(g, w) and not g[:, -1].any()


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------

BAD_OPTIONS = [
    ({"clip_low": -0.1}, ValueError, "clip_low must be >= 0"),
    ({"clip_high": -0.2}, ValueError, "clip_high must be >= 0"),
    ({"dual_clip": 1.0}, ValueError, "dual_clip must be > 1"),
    ({"dual_clip": 0.5}, ValueError, "dual_clip must be > 1"),
    ({"kl_estimator": "k4"}, ValueError, "kl_estimator must be one of"),
    ({"loss_agg": "mean"}, ValueError, "loss_agg must be one of"),
    ({"ratio_level": "segment"}, ValueError, "ratio_level must be one of"),
    ({"kl_coef": -1.0}, ValueError, "kl_coef must be >= 0"),
    ({"kl_coef": float("nan")}, ValueError, "kl_coef must be finite"),
    ({"temperature": 0.0}, ValueError, "temperature"),
    ({"norm_len": 0}, ValueError, "norm_len"),
    ({"norm_len": -2.5}, ValueError, "norm_len must be > 0"),
    ({"entropy_agg": "mean"}, ValueError, "entropy_agg must be one of"),
    ({"inplace_grad": 1}, TypeError, "inplace_grad must be a bool"),
    ({"kl_coef": 0.1, "kl_estimator": "k3"}, ValueError, "needs ref_logprobs"),
    ({"kl_coef": 0.1, "kl_estimator": "full"}, ValueError, "needs ref_logits"),
    ({"backend": "gpu"}, ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("options, error, match", BAD_OPTIONS)
def test_bad_options(options: dict[str, object], error: type, match: str) -> None:
    batch = _batch()
    with pytest.raises(error, match=match):
        rlops.policy_loss(batch["logits"], batch["tokens"], batch["advantages"], **options)


BAD_TENSORS = [
    ("logits", lambda b: b["logits"][0], ValueError, r"logits must have shape \(B, T, V\)"),
    ("tokens", lambda b: b["tokens"] + V, ValueError, r"tokens must lie in \[0, V\)"),
    # One token fewer than logits' positions is a causal LM's layout (the last position unread): two is an error.
    ("tokens", lambda b: b["tokens"][:, :-2], ValueError, "tokens must have the shape"),
    ("advantages", lambda b: b["advantages"][:, :-1], ValueError, "advantages must have shape"),
    ("advantages", lambda b: b["advantages"].long(), TypeError, "advantages must be a floating-point"),
    ("mask", lambda b: b["mask"][:-1], ValueError, "mask must have shape"),
    ("mask", lambda b: b["mask"].float() * 0.5, ValueError, "mask must hold only 0 and 1"),
    ("old_logprobs", lambda b: b["old_logprobs"][:, :1], ValueError, "old_logprobs must have shape"),
    ("ref_logprobs", lambda b: b["ref_logprobs"].T, ValueError, "ref_logprobs must have shape"),
    ("is_weights", lambda b: b["is_weights"][:1], ValueError, "is_weights must have shape"),
    ("ref_logits", lambda b: b["ref_logits"][..., :-1], ValueError, "ref_logits must have shape"),
    ("ref_logits", lambda b: b["ref_logits"].long(), TypeError, "ref_logits must be float16"),
]


@pytest.mark.parametrize("name, make, error, match", BAD_TENSORS)
def test_bad_tensors(name: str, make: Callable, error: type, match: str) -> None:
    batch = _batch()
    kwargs = {"logits": batch["logits"], "tokens": batch["tokens"], "advantages": batch["advantages"],
              "kl_coef": 0.1, "kl_estimator": "full" if name == "ref_logits" else "k3",
              "ref_logprobs": batch["ref_logprobs"], "ref_logits": batch["ref_logits"]}
    kwargs[name] = make(batch)
    with pytest.raises(error, match=match):
        rlops.policy_loss(**kwargs)


# ------------------------------------------------------------------------------------------
# Drop-in parity with the frameworks' own loss code (rlops.baselines restates it, with sources)
# ------------------------------------------------------------------------------------------

TRL_TYPES = {
    # TRL loss_type: (rlops options, TRL options)
    "grpo": ({"loss_agg": "seq-mean-token-mean"}, {}),
    "bnpo": ({"loss_agg": "token-mean", "entropy_coef": 0.02}, {"entropy_coef": 0.02}),
    "dapo": ({"loss_agg": "token-mean", "clip_high": 0.28, "entropy_coef": 0.02},
             {"epsilon_high": 0.28, "entropy_coef": 0.02}),
    "dr_grpo": ({"loss_agg": "seq-mean-token-sum-norm", "norm_len": 16}, {"max_completion_length": 16}),
}


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", list(TRL_TYPES))
def test_equals_trl_grpo_loss(loss_type: str, beta: float) -> None:
    # TRL averages fully masked completions into grpo's sequence mean while SPEC excludes them,
    # and its entropy bonus is a token mean for every loss_type: the inputs and options here
    # are where both definitions agree.
    batch = _batch(masked_row=False, spread=0.4)
    ours, theirs = TRL_TYPES[loss_type]
    kl = {"kl_coef": beta, "kl_estimator": "k3"} if beta else {}

    def rlops_loss(logits, tokens, advantages, **kw):
        return rlops.policy_loss(logits, tokens, advantages, temperature=0.9, backend="triton", **kw, **ours, **kl)

    def trl_loss(logits, tokens, advantages, mask, old_logprobs, ref_logprobs, is_weights):
        return baselines.trl_grpo_loss(logits, tokens, advantages, mask, old_per_token_logps=old_logprobs,
                                       ref_per_token_logps=ref_logprobs, loss_type=loss_type, beta=beta,
                                       temperature=0.9, importance_sampling_ratio=is_weights, **theirs)

    entries = (*OLD, "ref_logprobs", "is_weights", "advantages:flat")
    out, grad = _run(rlops_loss, batch, entries, {})
    want, want_grad = _run(trl_loss, batch, entries, {}, cast=torch.float64)
    assert_values_close(out.loss, want, FP32_TOL, f"TRL {loss_type} loss")
    assert_grad_close(grad, want_grad)


VERL_AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


@pytest.mark.parametrize("kl", [None, "kl", "mse", "low_var_kl"])
@pytest.mark.parametrize("loss_agg", VERL_AGGS)
def test_equals_verl_actor_loss(loss_agg: str, kl: str | None) -> None:
    # verl excludes fully masked sequences from every sequence mean; SPEC only from
    # seq-mean-token-mean, so no row is fully masked here.
    batch = _batch(masked_row=False, spread=0.8)
    estimator = {"kl": "k1", "mse": "k2", "low_var_kl": "k3"}.get(kl, "k3")
    kl_coef = 0.05 if kl else 0.0

    def rlops_loss(logits, tokens, advantages, **kw):
        return rlops.policy_loss(logits, tokens, advantages, clip_low=0.2, clip_high=0.28, dual_clip=3.0,
                                 entropy_coef=0.01, kl_coef=kl_coef, kl_estimator=estimator, loss_agg=loss_agg,
                                 backend="triton", **kw)

    def verl_loss(logits, tokens, advantages, mask, old_logprobs, ref_logprobs, is_weights):
        return baselines.verl_actor_loss(logits, tokens, advantages, mask, old_log_prob=old_logprobs,
                                         ref_log_prob=ref_logprobs, loss_agg_mode=loss_agg, clip_ratio_low=0.2,
                                         clip_ratio_high=0.28, clip_ratio_c=3.0, entropy_coeff=0.01,
                                         kl_loss_coef=kl_coef, kl_loss_type=kl or "low_var_kl",
                                         rollout_is_weights=is_weights)

    entries = (*OLD, "ref_logprobs", "is_weights")
    out, grad = _run(rlops_loss, batch, entries, {})
    want, want_grad = _run(verl_loss, batch, entries, {}, cast=torch.float64)
    assert_values_close(out.loss, want, FP32_TOL, f"verl {loss_agg} loss")
    assert_grad_close(grad, want_grad)


def test_clip_cov_draws_its_count_uniformly_among_the_candidates() -> None:
    """Clip-Cov's random draw (rlops.objectives.clip_cov): exactly max(int(cov_ratio * n), 1) of
    the candidates (covariance in range, clip not binding) lose their loss, each as often as the
    others over many draws; no other token does."""
    from rlops import objectives
    from rlops.options import PolicyLossConfig

    g = torch.Generator().manual_seed(1)
    logp = -torch.rand(8, 32, generator=g, dtype=torch.float64) * 6
    old = logp + 0.05 * torch.randn(8, 32, generator=g, dtype=torch.float64)
    adv = torch.randn(8, 32, generator=g, dtype=torch.float64)
    mask = torch.rand(8, 32, generator=g) > 0.2
    config = PolicyLossConfig(objective="clip_cov", cov_ratio=0.03, cov_low=0.2, cov_high=4.0)
    layout = Layout.of(mask)
    k = max(int(int(mask.sum()) * config.cov_ratio), 1)
    full, _, _, _ = objectives.clipped_surrogate((logp - old).clamp(-20, 20), adv, 0.2, 0.2)
    cov = (adv - adv[mask].mean()) * (logp - logp[mask].mean())
    candidates = (cov > 0.2) & (cov < 4.0) & mask & (full == -adv * (logp - old).exp())
    assert int(candidates.sum()) > 3 * k  # the draw is a real choice
    counts = torch.zeros(8, 32)
    torch.manual_seed(0)
    for _ in range(300):
        pg, _ = objectives.clip_cov(logp, old, adv, None, layout, config)
        drawn = (pg == 0) & (full != 0)
        assert int(drawn.sum()) == k and not (drawn & ~candidates).any()
        assert torch.equal(pg[~drawn], full[~drawn])
        counts += drawn
    share = counts[candidates] / 300
    expected = k / int(candidates.sum())
    assert (share - expected).abs().max() < 0.12, (share, expected)
