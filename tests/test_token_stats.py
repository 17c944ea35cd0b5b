"""Token log-probs and entropy: the Triton kernels against the float64 reference (SPEC section 1).

On a CPU-only machine the kernels run in Triton's interpreter; on a GPU machine the same
tests run them compiled on CUDA.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
from helpers import DEVICE, FP32_TOL, assert_grad_close, assert_values_close, float32_tol
from hypothesis import given, settings
from hypothesis import strategies as st

import rlops
from rlops import baselines, reference
from rlops._layout import row_layout
from rlops.kernels import logits_grad as token_stats_bwd
from rlops.kernels import token_stats_fwd

HALF = (torch.bfloat16, torch.float16)


def _logits(shape: tuple[int, ...], dtype: torch.dtype, scale: float = 4.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype).to(DEVICE)


def _tokens(shape: tuple[int, ...], vocab: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, vocab, shape, generator=g)
    if t.numel() >= 2:  # the first and last ids exercise the edges of the row
        t.view(-1)[0], t.view(-1)[-1] = 0, vocab - 1
    return t.to(DEVICE)


def _grad_weights(shape: tuple[int, ...], seed: int = 2, device: torch.device = DEVICE
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device), torch.randn(shape, generator=g).to(device)


def _run(fn: Callable, base: torch.Tensor, tokens: torch.Tensor, temperature: float,
         view: Callable[[torch.Tensor], torch.Tensor], w_logp: torch.Tensor | None, w_ent: torch.Tensor | None,
         cast: torch.dtype | None = None):
    """Evaluates fn(view(leaf), tokens, temperature) -> (logp, entropy) and the gradient of
    sum(w_logp * logp) + sum(w_ent * entropy) with respect to the leaf `base`."""
    leaf = (base if cast is None else base.to(cast)).detach().clone().requires_grad_(True)
    logp, ent = fn(view(leaf), tokens, temperature)
    # The loss is formed in float32 (float64 for the oracle) whatever the outputs' dtype, so that
    # rounding the weights does not inflate eager's error, the yardstick of half precision.
    acc = torch.promote_types(logp.dtype, torch.float32)
    loss = sum((w.to(acc) * o.to(acc)).sum() for w, o in ((w_logp, logp), (w_ent, ent)) if w is not None)
    loss.backward()
    return logp.detach(), None if ent is None else ent.detach(), leaf.grad


def _triton(x, t, tau):
    return rlops.token_logprobs_and_entropy(x, t, tau, backend="triton")


def _check(base: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
           view: Callable[[torch.Tensor], torch.Tensor] = lambda x: x, grads: str = "both",
           extreme: bool = False, fn: Callable = _triton) -> None:
    """fn(logits, tokens, temperature) -> (logp, entropy), values and gradients, against the float64 reference."""
    w_logp, w_ent = _grad_weights(tokens.shape, device=base.device)
    w_logp = None if grads == "entropy" else w_logp
    w_ent = None if grads == "logp" else w_ent
    logp, ent, grad = _run(fn, base, tokens, temperature, view, w_logp, w_ent)
    r_logp, r_ent, r_grad = _run(reference.token_logprobs_and_entropy, base, tokens, temperature, view,
                                 w_logp, w_ent, cast=torch.float64)
    assert logp.dtype == ent.dtype == torch.float32
    assert grad.dtype == base.dtype
    # Arithmetic is float32 whatever the input dtype, so values meet the float32 bound on
    # half-precision inputs too (compared with float64 on the same rounded input).
    assert_values_close(logp, r_logp, float32_tol(r_logp) if extreme else FP32_TOL, what="logp")
    assert_values_close(ent, r_ent, float32_tol(r_ent) if extreme else FP32_TOL, what="entropy")
    eager = None
    if base.dtype in HALF:
        _, _, eager = _run(baselines.eager_token_stats, base, tokens, temperature, view, w_logp, w_ent)
    assert_grad_close(grad, r_grad, eager)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [1, 7, 1000, 4096, 4097, 32001])
def test_matches_reference(vocab: int, dtype: torch.dtype) -> None:
    shape = (2, 3) if vocab <= 4097 else (1, 3)
    _check(_logits((*shape, vocab), dtype), _tokens(shape, vocab))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [0.6, 1.7])
def test_temperature(temperature: float, dtype: torch.dtype) -> None:
    _check(_logits((3, 4, 999), dtype), _tokens((3, 4), 999), temperature)


def test_vocab_beyond_2_pow_17() -> None:
    vocab = (1 << 17) + 3
    _check(_logits((2, vocab), torch.float32), _tokens((2,), vocab))


@pytest.mark.parametrize("grads", ["logp", "entropy", "both"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_paths(grads: str, dtype: torch.dtype) -> None:
    _check(_logits((2, 5, 300), dtype), _tokens((2, 5), 300), 0.9, grads=grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_alone(dtype: torch.dtype) -> None:
    base, tokens = _logits((3, 4, 513), dtype), _tokens((3, 4), 513)
    w, _ = _grad_weights(tokens.shape)

    def only_logp(backend_fn):
        return lambda x, t, tau: (backend_fn(x, t, tau), None)

    logp, _, grad = _run(only_logp(lambda x, t, tau: rlops.token_logprobs(x, t, tau, backend="triton")),
                         base, tokens, 0.8, lambda x: x, w, None)
    r_logp, _, r_grad = _run(only_logp(reference.token_logprobs), base, tokens, 0.8, lambda x: x, w, None,
                             cast=torch.float64)
    assert_values_close(logp, r_logp)
    eager = None
    if dtype in HALF:
        def eager_fn(x, t, tau):
            return baselines.trl_selective_log_softmax(x / tau, t), None
        _, _, eager = _run(eager_fn, base, tokens, 0.8, lambda x: x, w, None)
    assert_grad_close(grad, r_grad, eager)


@pytest.mark.parametrize(
    "name, shape, view",
    [
        ("causal shift logits[:, :-1]", (3, 6, 200), lambda x: x[:, :-1]),
        ("batch and time transposed", (5, 3, 200), lambda x: x.transpose(0, 1)),
        ("every other row", (8, 200), lambda x: x[::2]),
        ("padded rows", (4, 5, 256), lambda x: x[..., :200]),
        ("three strided leading dims", (3, 4, 3, 64), lambda x: x[::2, ::2, :-1]),
        ("strided vocabulary", (3, 4, 400), lambda x: x[..., ::2]),
        ("single row", (1, 1, 300), lambda x: x),
        ("one-dimensional", (300,), lambda x: x),
    ],
)
def test_layouts(name: str, shape: tuple[int, ...], view: Callable) -> None:
    base = _logits(shape, torch.float32)
    probe = view(base)
    _check(base, _tokens(probe.shape[:-1], probe.shape[-1]), 1.3, view=view)


@pytest.mark.parametrize(
    "shape, view, in_place",
    [
        ((3, 6, 10), lambda x: x[:, :-1], True),
        ((5, 3, 10), lambda x: x.transpose(0, 1), True),
        ((8, 10), lambda x: x[1::3], True),
        ((4, 1, 5, 10), lambda x: x[:, :, 1:], True),
        ((10,), lambda x: x, True),
        ((2, 4, 3, 10), lambda x: x[:, ::2, :-1], True),
        ((3, 4, 3, 10), lambda x: x[::2, ::2, :-1], False),
        ((3, 10), lambda x: x[:, ::2], False),
    ],
)
def test_row_layout_addresses_every_row(shape: tuple[int, ...], view: Callable, in_place: bool) -> None:
    # Every element holds its own storage index, so reading memory at the computed row starts
    # must give each row's first element, whether the rows were read in place or copied.
    x = view(torch.arange(math.prod(shape), dtype=torch.float64).view(shape))
    rows = row_layout(x)
    assert (rows.tensor is x) == in_place
    r = torch.arange(rows.n_rows)
    starts = (r // rows.inner) * rows.stride_outer + (r % rows.inner) * rows.stride_inner
    memory = torch.as_strided(rows.tensor, (int(starts.max()) + 1,), (1,), rows.tensor.storage_offset())
    assert torch.equal(memory[starts], x.reshape(-1, x.shape[-1])[:, 0])


@pytest.mark.parametrize("shape", [(0, 50), (2, 0, 50), (0, 7)])
def test_empty_input(shape: tuple[int, ...]) -> None:
    x = _logits(shape, torch.float32).requires_grad_(True)
    tokens = torch.zeros(shape[:-1], dtype=torch.long, device=DEVICE)
    logp, ent = rlops.token_logprobs_and_entropy(x, tokens, backend="triton")
    assert logp.shape == ent.shape == shape[:-1]
    (logp.sum() + ent.sum()).backward()
    assert x.grad.shape == shape and not x.grad.any()


def test_masked_vocabulary_with_minus_inf() -> None:
    # Trainers mask padded vocabulary entries with -inf; 0 * log 0 must stay 0, never NaN.
    base = _logits((4, 6, 300), torch.float32)
    base[..., 250:] = float("-inf")
    base[0, 0, :128] = float("-inf")  # a whole first block of -inf
    tokens = 128 + _tokens((4, 6), 250 - 128)  # sampled tokens are never masked ones
    _check(base, tokens)


@pytest.mark.parametrize("scale", [1e-4, 30.0, 3000.0])
def test_extreme_logit_scales(scale: float) -> None:
    # Near-uniform rows (tiny scale) and one-hot rows (huge scale) stress the online rescaling.
    _check(_logits((3, 4, 777), torch.float32, scale=scale), _tokens((3, 4), 777), extreme=True)


# Large |logits / tau| with outputs of ordinary size (issue: lse rounded at the logits'
# magnitude put 3e-5 into log p): (logits, temperature) whose z = x / tau is 1e3-1e4 away
# from 0 while the distribution itself is ordinary, so SPEC's plain 1e-5 applies.
def magnified_cases() -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    base, tokens = _logits((2, 3, 301), torch.float32, scale=3.0).cpu(), _tokens((2, 3), 301).cpu()
    return {
        "two-way tie at 1e3": (torch.tensor([[1e3, 1e3, 0.0, -1e3]]), torch.tensor([0]), 1.0),
        "offset 1e3": (1e3 + base, tokens, 1.0),
        "offset -1e4": (base - 1e4, tokens, 1.0),
        "temperature 1e-3": (5.0 + 1e-3 * base, tokens, 1e-3),
        "temperature 1e-3, logits near 0": (1e-3 * base, tokens, 1e-3),
    }


MAGNIFIED = magnified_cases()
BACKEND_FNS = {
    "stats": lambda backend: lambda x, t, tau: rlops.token_logprobs_and_entropy(x, t, tau, backend=backend),
    "logp": lambda backend: lambda x, t, tau: (rlops.token_logprobs(x, t, tau, backend=backend), None),
}


def check_magnified(case: str, which: str, backend: str) -> None:
    """Values within 1e-5 and gradients within 1e-5 * max|grad| of float64 (SPEC 6) at |x / tau| >= 1e3."""
    x, tokens = (t.to(DEVICE) for t in MAGNIFIED[case][:2])
    tau = MAGNIFIED[case][2]
    w_logp, w_ent = _grad_weights(tokens.shape, device=x.device)
    w_ent = w_ent if which == "stats" else None
    logp, ent, grad = _run(BACKEND_FNS[which](backend), x, tokens, tau, lambda v: v, w_logp, w_ent)
    oracle = reference.token_logprobs_and_entropy if which == "stats" else (
        lambda *a: (reference.token_logprobs(*a), None))
    r_logp, r_ent, r_grad = _run(oracle, x, tokens, tau, lambda v: v, w_logp, w_ent, cast=torch.float64)
    assert_values_close(logp, r_logp, what="logp")
    if which == "stats":
        assert_values_close(ent, r_ent, what="entropy")
    assert_grad_close(grad, r_grad)


@pytest.mark.parametrize("which", list(BACKEND_FNS))
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", list(MAGNIFIED))
def test_large_logits_and_small_temperature(case: str, backend: str, which: str) -> None:
    if backend == "torch" and DEVICE.type != "cpu":
        pytest.skip("the PyTorch backend's precision is checked on the CPU run")
    check_magnified(case, which, backend)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(0, 5),
    vocab=st.integers(1, 300),
    scale=st.floats(1e-3, 100.0),
    temperature=st.floats(0.05, 5.0),
    half=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_properties(rows: int, vocab: int, scale: float, temperature: float, half: bool, seed: int) -> None:
    dtype = torch.bfloat16 if half else torch.float32
    x = _logits((rows, vocab), dtype, scale, seed)
    tokens = _tokens((rows,), vocab, seed + 1)
    logp, ent = rlops.token_logprobs_and_entropy(x, tokens, temperature, backend="triton")
    r_logp, r_ent = reference.token_logprobs_and_entropy(x.double(), tokens, temperature)
    # logp = z[a] - (max + log s) with s >= 1 is <= 0 exactly; so is -H = t/s - log s.
    assert (logp <= 0).all()
    assert (ent >= 0).all()
    assert (ent <= math.log(vocab) + 1e-5).all()
    # Logits up to 100 / 0.05 = 2000: |logp| may exceed the range where 1e-5 is representable.
    assert_values_close(logp, r_logp, float32_tol(r_logp))
    assert_values_close(ent, r_ent, float32_tol(r_ent))


def test_backward_into_logits_buffer() -> None:
    # The launcher may write the gradient over the logits themselves (every row is read first).
    x = _logits((3, 5, 600), torch.float32)
    tokens = _tokens((3, 5), 600)
    stats = token_stats_fwd(x, tokens, 0.9)
    grads = torch.stack([*_grad_weights(tokens.shape), torch.zeros(tokens.shape, device=DEVICE)])
    expected = token_stats_bwd(x, tokens, stats, grads, 0.9)
    inplace = x.clone()
    out = token_stats_bwd(inplace, tokens, stats, grads, 0.9, out=inplace)
    assert out is inplace
    assert torch.equal(out, expected)


def test_auto_uses_reference_on_cpu_and_kernels_for_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    import rlops.kernels

    def refuse(*args, **kwargs):
        raise AssertionError("kernel launched")

    monkeypatch.setattr(rlops.kernels, "token_stats_fwd", refuse)
    x, tokens = _logits((2, 3, 40), torch.float32).cpu(), _tokens((2, 3), 40).cpu()
    logp, ent = rlops.token_logprobs_and_entropy(x, tokens)  # auto on CPU: the reference
    r_logp, r_ent = reference.token_logprobs_and_entropy(x.double(), tokens)
    assert_values_close(logp, r_logp)
    assert_values_close(ent, r_ent)
    assert logp.dtype == torch.float32
    with pytest.raises(AssertionError, match="kernel launched"):
        rlops.token_logprobs_and_entropy(x.to(DEVICE), tokens.to(DEVICE), backend="triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backend_matches_reference(dtype: torch.dtype) -> None:
    base, tokens = _logits((2, 5, 333), dtype).cpu(), _tokens((2, 5), 333).cpu()

    def torch_backend(x, t, tau):
        return rlops.token_logprobs_and_entropy(x, t, tau, backend="torch")

    w_logp, w_ent = (w.cpu() for w in _grad_weights(tokens.shape))
    logp, ent, grad = _run(torch_backend, base, tokens, 1.1, lambda x: x, w_logp, w_ent)
    r_logp, r_ent, r_grad = _run(reference.token_logprobs_and_entropy, base, tokens, 1.1, lambda x: x,
                                 w_logp, w_ent, cast=torch.float64)
    assert_values_close(logp, r_logp)
    assert_values_close(ent, r_ent)
    eager = None
    if dtype in HALF:
        _, _, eager = _run(baselines.eager_token_stats, base, tokens, 1.1, lambda x: x, w_logp, w_ent)
    assert_grad_close(grad, r_grad, eager)


def test_torch_compile_holds_the_custom_op() -> None:
    x = _logits((2, 4, 100), torch.float32).requires_grad_(True)
    tokens = _tokens((2, 4), 100)

    def loss_fn(logits, toks):
        logp, ent = rlops.token_logprobs_and_entropy(logits, toks, 0.8, backend="triton")
        return (logp * 2.0 - ent).sum()

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    got = compiled(x, tokens)
    (g,) = torch.autograd.grad(got, x)
    want = loss_fn(x, tokens)
    (w,) = torch.autograd.grad(want, x)
    assert torch.equal(got.detach(), want.detach())
    assert torch.equal(g, w)


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------

FNS = [rlops.token_logprobs, rlops.token_logprobs_and_entropy]


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda x, t: (x, t.masked_fill(t == 0, -1)), ValueError, r"tokens must lie in \[0, V\) .* id -1"),
        (lambda x, t: (x, t.masked_fill(t == 0, 50)), ValueError, r"tokens must lie in \[0, V\) = \[0, 50\)"),
        (lambda x, t: (x, t[:, :-1]), ValueError, "tokens must have the shape"),
        (lambda x, t: (x, t.float()), TypeError, "tokens must be an integer"),
        (lambda x, t: (x, t.bool()), TypeError, "tokens must be an integer"),
        (lambda x, t: (x.long(), t), TypeError, "logits must be float16"),
        (lambda x, t: (x.tolist(), t), TypeError, "logits must be a torch.Tensor"),
        (lambda x, t: (x[..., :0], t), ValueError, "logits must have shape"),
    ],
)
def test_bad_input(fn: Callable, backend: str, make: Callable, error: type, match: str) -> None:
    x, tokens = _logits((2, 3, 50), torch.float32), _tokens((2, 3), 50)
    bad_x, bad_tokens = make(x, tokens)
    with pytest.raises(error, match=match):
        fn(bad_x, bad_tokens, backend=backend)


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize(
    "temperature, error",
    [(0.0, ValueError), (-1.0, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
     ("1.0", TypeError), (True, TypeError), (None, TypeError)],
)
def test_bad_temperature(fn: Callable, temperature: object, error: type) -> None:
    x, tokens = _logits((2, 3, 50), torch.float32), _tokens((2, 3), 50)
    with pytest.raises(error, match="temperature"):
        fn(x, tokens, temperature)


def test_bad_backend() -> None:
    x, tokens = _logits((2, 3, 50), torch.float32), _tokens((2, 3), 50)
    with pytest.raises(ValueError, match="backend must be one of"):
        rlops.token_logprobs(x, tokens, backend="gpu")
    with pytest.raises(RuntimeError, match="backend='cuda' runs on CUDA tensors"):
        rlops.token_logprobs(x, tokens, backend="cuda")


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environ.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, timeout=300)


def test_triton_backend_on_cpu_without_interpreter_says_how() -> None:
    code = (
        "import torch, rlops\n"
        "try:\n"
        "    rlops.token_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), backend='triton')\n"
        "except RuntimeError as e:\n"
        "    print('raised:', e)\n"
    )
    out = _python(code)
    assert out.returncode == 0, out.stderr
    assert "raised:" in out.stdout and "TRITON_INTERPRET=1" in out.stdout
