"""Packed (padding-free) batches: every policy op on (N, V) with cu_seqlens equals the padded op.

The padded results are themselves checked against the float64 reference (test_policy_loss,
test_linear_policy_loss, test_csrc), so here the claim is the layout's: the same sequences,
packed into one row with their boundaries in cu_seqlens, give the same loss, per-token values
and gradients, for every case of test_policy_loss (each objective option, aggregation, KL kind,
ratio level and importance weight), on the Triton (interpreter), PyTorch and emulated CUDA
backends. Sequence lengths are random and include 0 and 1.
"""

from __future__ import annotations

import pytest
import test_policy_loss as policy_tests
import torch
from helpers import DEVICE, assert_grad_close, assert_values_close
from test_csrc import emulated, host_lib  # noqa: F401  (fixtures of the emulated CUDA backend)

import rlops
from rlops.packing import (
    Layout,
    check_cu_seqlens,
    cu_seqlens_from_lengths,
    cu_seqlens_from_position_ids,
    pack,
    unpack,
)

NORM = "seq-mean-token-sum-norm"


def _lengths(rows: int, time: int, seed: int) -> torch.Tensor:
    """Random sequence lengths in [0, time] with at least one 0, one 1 and one full row."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, time + 1, (rows,), generator=g)
    lengths[:3] = torch.tensor([time, 0, 1])[: min(rows, 3)]
    return lengths[torch.randperm(rows, generator=g)]


def _packed_kwargs(kwargs: dict[str, torch.Tensor], lengths: torch.Tensor, time: int) -> dict[str, torch.Tensor]:
    """The padded call's per-token tensors packed; per-row ones ((B, 1) or (B,)) stay per sequence
    for advantages (read as (S,)) and are spread to their tokens otherwise (is_weights)."""
    rows = lengths.numel()
    packed = {}
    for name, x in kwargs.items():
        if name == "advantages" and x.shape in ((rows,), (rows, 1)):
            packed[name] = x.reshape(rows)
        else:
            packed[name] = pack(x.expand(rows, time, *x.shape[2:]), lengths)
    return packed


def check_packed_equals_padded(fn, case: str, dtype: torch.dtype = torch.float32, rows: int = 6, time: int = 5,
                               vocab: int = 37, seed: int = 0, empty: float = 0.0, padded_fn=None) -> None:
    """fn(logits, tokens, advantages, **kw) on a padded batch of rows of random lengths (mask 0 past
    each length, and holes inside; a share `empty` of them of length 0) and on the same sequences
    packed: equal loss, per-token outputs and gradient of 0.7 * loss. padded_fn (default fn) runs
    the padded batch."""
    entries, options = policy_tests.CASES[case]
    batch = policy_tests._batch(dtype, seed, vocab, rows=rows, time=time)
    lengths = _lengths(rows, time, seed)
    lengths[torch.rand(rows, generator=torch.Generator().manual_seed(seed)) < empty] = 0
    inside = torch.arange(time, device=DEVICE) < lengths.to(DEVICE)[:, None]
    batch["mask"] = batch["mask"] & inside
    options = dict(options)
    if NORM in (options.get("loss_agg"), options.get("entropy_agg")) and "norm_len" not in options:
        options["norm_len"] = time  # the padded default; a packed batch must say it
    kwargs = policy_tests._inputs(batch, entries)
    kwargs.setdefault("advantages", batch["advantages"])

    padded_leaf = batch["logits"].detach().clone().requires_grad_(True)
    padded = (padded_fn or fn)(padded_leaf, batch["tokens"], **kwargs, **options)
    (padded.loss * 0.7).backward()

    packed_kwargs = _packed_kwargs(kwargs, lengths, time)
    packed_leaf = pack(batch["logits"], lengths).detach().clone().requires_grad_(True)
    packed = fn(packed_leaf, pack(batch["tokens"], lengths), **packed_kwargs, **options,
                cu_seqlens=cu_seqlens_from_lengths(lengths).to(DEVICE))
    (packed.loss * 0.7).backward()

    # The same kernels on the same rows: only the aggregation's summation order differs (10x more
    # room when the padded side runs on another backend).
    tol = 1e-5 if padded_fn else 1e-6
    assert_values_close(packed.loss, padded.loss, tol * (1 + padded.loss.abs().item()), "loss")
    for name in ("logprobs", "entropy", "kl", "ratio"):
        got, want = getattr(packed, name), pack(getattr(padded, name), lengths)
        assert got.shape == want.shape, f"{name} must have tokens' packed shape (N,)"
        assert_values_close(got, want, tol * max(1.0, want.abs().max().item() if want.numel() else 0), name)
    assert not padded_leaf.grad[~inside].any(), "padding past a sequence's end has no gradient"
    want = pack(padded_leaf.grad, lengths)
    if dtype == torch.float32:
        assert_grad_close(packed_leaf.grad, want)
    else:  # one rounding of the same float32 gradient to bf16 apart at most
        assert_values_close(packed_leaf.grad, want, 2.0**-7 * want.abs().max().item(), "bf16 grad")
    assert packed.metrics == pytest.approx(padded.metrics, rel=1e-5, abs=1e-6)


def _backend(name: str):
    def fn(logits, tokens, advantages, **kw):
        return rlops.policy_loss(logits, tokens, advantages, backend=name, **kw)
    return fn


# Packing changes the sequences' bookkeeping, which is backend-independent Python; the kernels'
# own paths (token- and sequence-level ratio, each aggregation, KL kind and per-row input) are
# covered on Triton by a subset, to keep the interpreter's time down.
TRITON_CASES = ["off-policy", "is-weights-per-row", "full-kl", "seq-mean-token-mean", "seq-mean-token-sum", NORM,
                "entropy-own-agg", "advantages-flat", "gspo-ratio-weighted", "gspo-full-kl", "everything-k3",
                "everything-full"]


@pytest.mark.parametrize("case", list(policy_tests.CASES))
def test_policy_loss_packed_equals_padded(case: str) -> None:
    check_packed_equals_padded(_backend("torch"), case, seed=len(case))


@pytest.mark.parametrize("case", TRITON_CASES)
def test_policy_loss_packed_equals_padded_triton(case: str) -> None:
    check_packed_equals_padded(_backend("triton"), case, seed=len(case))


@pytest.mark.usefixtures("emulated")
@pytest.mark.parametrize("case", ["off-policy", "seq-mean-token-mean", "everything-k3", "everything-full",
                                  "gspo-with-kl-entropy-is", "gspo-full-kl", NORM])
def test_policy_loss_packed_equals_padded_cuda(case: str) -> None:
    check_packed_equals_padded(_backend("cuda"), case)


@pytest.mark.parametrize("case", ["everything-k3", "gspo-full-kl"])
def test_policy_loss_packed_bf16(case: str) -> None:
    check_packed_equals_padded(_backend("triton"), case, torch.bfloat16)


@pytest.mark.parametrize("case, backend", [("seq-mean-token-mean", "torch"), ("gspo-with-kl-entropy-is", "torch"),
                                           ("gspo-with-kl-entropy-is", "triton")])
def test_thousands_of_sequences(case: str, backend: str) -> None:
    # 2000 sequences, most of them empty so that the interpreter runs a few hundred rows; the
    # padded side runs on the PyTorch backend (its 2000 x 3 rows would take the interpreter minutes).
    check_packed_equals_padded(_backend(backend), case, rows=2000, time=3, vocab=8, seed=3, empty=0.85,
                               padded_fn=_backend("torch"))


def _linear(backend: str, chunk_size: int | None = None):
    """policy_loss's arguments on the fused-linear op: logits = hidden @ weight.T with a fixed head,
    where 'logits' is the hidden states (the harness packs it like logits)."""
    g = torch.Generator().manual_seed(5)
    weight = (torch.randn(37, 16, generator=g) * 0.5).to(DEVICE)

    def fn(hidden, tokens, advantages, ref_logits=None, **kw):
        ref = {} if ref_logits is None else {"ref_hidden": ref_logits, "ref_weight": weight * 0.9}
        return rlops.linear_policy_loss(hidden, weight.to(hidden.dtype), tokens, advantages, backend=backend,
                                        chunk_size=chunk_size, **ref, **kw)
    return fn


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", ["everything-k3", "everything-full", "gspo-with-kl-entropy-is", NORM])
def test_linear_policy_loss_packed_equals_padded(case: str, backend: str) -> None:
    check_packed_equals_padded(_linear(backend, chunk_size=4), case, vocab=16)


@pytest.mark.usefixtures("emulated")
@pytest.mark.parametrize("case", ["everything-k3", "gspo-with-kl-entropy-is"])
def test_linear_policy_loss_packed_equals_padded_cuda(case: str) -> None:
    check_packed_equals_padded(_linear("cuda", chunk_size=4), case, vocab=16)


def test_policy_loss_module_takes_cu_seqlens() -> None:
    def fn(logits, tokens, advantages, **kw):
        return rlops.PolicyLoss(rlops.PolicyLossConfig.gspo(backend="torch"))(logits, tokens, advantages, **kw)
    check_packed_equals_padded(fn, "off-policy")


def test_hugging_face_layout_one_row() -> None:
    """(1, N, V) logits and (1, N) tensors (padding-free models' output) give the (N, V) result, shaped (1, N)."""
    lengths = torch.tensor([3, 0, 1, 4])
    cu = cu_seqlens_from_lengths(lengths)
    g = torch.Generator().manual_seed(0)
    logits, tokens = torch.randn(8, 11, generator=g), torch.randint(0, 11, (8,), generator=g)
    advantages = torch.randn(4, generator=g)
    flat = rlops.policy_loss(logits, tokens, advantages, cu_seqlens=cu, loss_agg="seq-mean-token-mean")
    row = rlops.policy_loss(logits[None], tokens[None], advantages, cu_seqlens=cu, loss_agg="seq-mean-token-mean")
    assert row.logprobs.shape == (1, 8) and flat.logprobs.shape == (8,)
    assert torch.equal(row.loss, flat.loss) and torch.equal(row.logprobs[0], flat.logprobs)


def test_linear_token_stats_accept_the_packed_layout() -> None:
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(1, 7, 5, generator=g), torch.randn(9, 5, generator=g)
    tokens = torch.randint(0, 9, (1, 7), generator=g)
    cu = torch.tensor([0, 2, 2, 7])
    got = rlops.linear_token_logprobs_and_entropy(hidden, weight, tokens, cu_seqlens=cu)
    want = rlops.linear_token_logprobs_and_entropy(hidden, weight, tokens)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    flat = rlops.linear_token_logprobs_and_entropy(hidden, weight, tokens[0], cu_seqlens=cu)  # (1, N, H), (N,)
    assert all(torch.equal(a, b[0]) for a, b in zip(flat, want, strict=True))
    with pytest.raises(ValueError, match="cu_seqlens must end at the number of packed tokens N = 7"):
        rlops.linear_token_logprobs_and_entropy(hidden, weight, tokens, cu_seqlens=torch.tensor([0, 6]))
    with pytest.raises(ValueError, match=r"hidden must have shape \(N, H\) or \(1, N, H\)"):
        rlops.linear_token_logprobs_and_entropy(hidden.expand(2, 7, 5), weight, tokens.expand(2, 7), cu_seqlens=cu)


# ---- bad input ---------------------------------------------------------------------------------

def _packed_call(**overrides):
    g = torch.Generator().manual_seed(0)
    args = {"logits": torch.randn(6, 5, generator=g), "tokens": torch.randint(0, 5, (6,), generator=g),
            "advantages": torch.randn(3, generator=g), "cu_seqlens": torch.tensor([0, 2, 2, 6])}
    args.update(overrides)
    return rlops.policy_loss(args.pop("logits"), args.pop("tokens"), args.pop("advantages"), **args)


@pytest.mark.parametrize("overrides, error, message", [
    ({"cu_seqlens": torch.tensor([1, 2, 6])}, ValueError, "cu_seqlens must start at 0, got 1"),
    ({"cu_seqlens": torch.tensor([0, 4, 2, 6])}, ValueError, "cu_seqlens must be non-decreasing"),
    ({"cu_seqlens": torch.tensor([0, 2, 5])}, ValueError, r"cu_seqlens must end at the number of packed tokens "
                                                           r"N = 6 \(logits' token dimension\), got 5"),
    ({"cu_seqlens": torch.tensor([0.0, 6.0])}, TypeError, "cu_seqlens must be an int32 or int64 tensor"),
    ({"cu_seqlens": torch.tensor([[0, 6]])}, ValueError, r"cu_seqlens must have shape \(S \+ 1,\)"),
    ({"cu_seqlens": torch.tensor([0, 6], device="meta")}, ValueError, "cu_seqlens is on meta but logits is on cpu"),
    ({"cu_seqlens": [0, 6]}, TypeError, "cu_seqlens must be a torch.Tensor"),
    ({"advantages": torch.randn(4)}, ValueError, r"advantages must have shape \(N,\) = \(6,\) or \(1, N\) with "
                                                 r"cu_seqlens, or \(S,\) = \(3,\) per sequence"),
    ({"mask": torch.ones(2, 3, dtype=torch.bool)}, ValueError, r"mask must have shape \(N,\) = \(6,\) or \(1, N\)"),
    ({"old_logprobs": torch.zeros(5)}, ValueError, r"old_logprobs must have shape \(N,\) = \(6,\)"),
    ({"logits": torch.randn(2, 3, 5)}, ValueError, r"with cu_seqlens, logits must have shape \(N, V\) or "
                                                   r"\(1, N, V\)"),
    ({"tokens": torch.zeros(2, 3, dtype=torch.long)}, ValueError, r"tokens must have shape \(N,\) = \(6,\)"),
    ({"loss_agg": NORM}, ValueError, "needs norm_len"),
])
def test_bad_packed_input_is_named(overrides, error, message) -> None:
    with pytest.raises(error, match=message):
        _packed_call(**overrides)


# ---- the helpers -----------------------------------------------------------------------------

def test_cu_seqlens_from_position_ids() -> None:
    position_ids = torch.tensor([0, 1, 2, 0, 0, 1, 0, 1, 2, 3])
    want = torch.tensor([0, 3, 4, 6, 10], dtype=torch.int32)
    assert torch.equal(cu_seqlens_from_position_ids(position_ids), want)
    assert torch.equal(cu_seqlens_from_position_ids(position_ids[None], num_sequences=4), want)
    assert torch.equal(cu_seqlens_from_position_ids(torch.tensor([2, 3, 0, 1])), torch.tensor([0, 2, 4],
                                                                                             dtype=torch.int32))
    assert torch.equal(cu_seqlens_from_position_ids(torch.zeros(0, dtype=torch.long)),
                       torch.tensor([0], dtype=torch.int32))
    with pytest.raises(ValueError, match="position_ids must be an integer"):
        cu_seqlens_from_position_ids(torch.zeros(2, 3, dtype=torch.long))


def test_pack_unpack_and_layout() -> None:
    lengths = torch.tensor([2, 0, 3, 1])
    padded = torch.arange(16.0).view(4, 4)
    packed = pack(padded, lengths)
    assert packed.tolist() == [0.0, 1.0, 8.0, 9.0, 10.0, 12.0]
    cu = cu_seqlens_from_lengths(lengths)
    assert cu.tolist() == [0, 2, 2, 5, 6] and cu.dtype == torch.int32
    assert torch.equal(unpack(packed, cu, 4), torch.where(torch.arange(4) < lengths[:, None], padded, 0.0))
    layout = Layout.of(torch.ones(1, 6, dtype=torch.bool), check_cu_seqlens(cu, 6, packed))
    assert layout.seq_ids.tolist() == [0, 0, 2, 2, 2, 3] and layout.n_seqs == 4
    assert layout.seq_totals(packed[None]).tolist() == [1.0, 0.0, 27.0, 12.0]
    assert layout.per_token(torch.arange(4.0)).tolist() == [[0.0, 0.0, 2.0, 2.0, 2.0, 3.0]]


# ---- real sizes on a GPU -----------------------------------------------------------------------

def check_half_padded(backend: str, rows: int, time: int, vocab: int, device: str, options: dict) -> None:
    """A bf16 batch whose rows are half padding, padded against packed: equal loss, log-probs and
    (bf16) gradients. Lengths spread from time/4 to 3 time/4, so packed N = rows * time / 2."""
    g = torch.Generator(device=device).manual_seed(0)
    lengths = torch.linspace(time / 4, 3 * time / 4, rows).round().long()
    lengths[-1] += rows * time // 2 - int(lengths.sum())
    logits = (torch.randn(rows, time, vocab, generator=g, device=device) * 3).to(torch.bfloat16)
    tokens = torch.randint(0, vocab, (rows, time), generator=g, device=device)
    old = -torch.rand(rows, time, generator=g, device=device) * 12
    advantages = torch.randn(rows, generator=g, device=device)
    mask = torch.arange(time, device=device) < lengths.to(device)[:, None]
    padded_leaf = logits.requires_grad_(True)
    padded = rlops.policy_loss(padded_leaf, tokens, advantages, mask=mask, old_logprobs=old, ref_logprobs=old - 0.1,
                               backend=backend, **options)
    (padded_grad,) = torch.autograd.grad(padded.loss * 0.7, padded_leaf)
    padded_grad, padded_logp, padded_loss = pack(padded_grad, lengths), pack(padded.logprobs, lengths), padded.loss
    packed_logits = pack(logits.detach(), lengths)
    del logits, padded_leaf, padded
    packed_leaf = packed_logits.requires_grad_(True)
    if device == "cuda":
        assert packed_leaf.numel() > 2**31  # int64 offsets throughout
    cu_seqlens = cu_seqlens_from_lengths(lengths).to(device)
    packed = rlops.policy_loss(packed_leaf, pack(tokens, lengths), advantages, old_logprobs=pack(old, lengths),
                               ref_logprobs=pack(old - 0.1, lengths), cu_seqlens=cu_seqlens, backend=backend, **options)
    (packed_grad,) = torch.autograd.grad(packed.loss * 0.7, packed_leaf)
    assert_values_close(packed.loss, padded_loss, 1e-6 * (1 + padded_loss.abs().item()), "loss")
    assert_values_close(packed.logprobs, padded_logp, 1e-6 * padded_logp.abs().max().item(), "logprobs")
    assert_values_close(packed_grad, padded_grad, 2.0**-7 * padded_grad.abs().max().item(), "bf16 grad")


HALF_PADDED_OPTIONS = {
    "k3": {"kl_coef": 0.04, "kl_estimator": "k3", "clip_high": 0.28, "entropy_coef": 0.01,
           "loss_agg": "seq-mean-token-mean"},
    "gspo": {"ratio_level": "sequence", "clip_low": 3e-4, "clip_high": 4e-4, "loss_agg": "seq-mean-token-mean"},
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(HALF_PADDED_OPTIONS))
def test_half_padded_qwen_vocabulary_past_2_pow_31(case: str, gpu_backend: str) -> None:
    # 32 rows of 1024 tokens, half padding: packed 16384 x 151936 bf16 logits (> 2**31 elements).
    check_half_padded(gpu_backend, 32, 1024, 151_936, "cuda", HALF_PADDED_OPTIONS[case])


@pytest.mark.parametrize("case", list(HALF_PADDED_OPTIONS))
def test_half_padded_small_on_cpu(case: str) -> None:
    # The GPU test's own code at a small size, so that it cannot rot where no GPU runs it.
    check_half_padded("torch", 4, 8, 50, "cpu", HALF_PADDED_OPTIONS[case])


def test_torch_compile_holds_the_packed_loss() -> None:
    lengths = torch.tensor([3, 0, 1, 4])
    g = torch.Generator().manual_seed(1)
    logits, tokens = torch.randn(8, 13, generator=g), torch.randint(0, 13, (8,), generator=g)
    advantages, old = torch.randn(4, generator=g), -torch.rand(8, generator=g)
    cu = cu_seqlens_from_lengths(lengths)

    def loss_fn(x):
        return rlops.policy_loss(x, tokens, advantages, old_logprobs=old, cu_seqlens=cu, backend="triton",
                                 loss_agg="seq-mean-token-mean", ratio_level="sequence").loss

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    x = logits.clone().requires_grad_(True)
    got = compiled(x)
    (g_got,) = torch.autograd.grad(got, x)
    want = loss_fn(x)
    (g_want,) = torch.autograd.grad(want, x)
    assert torch.equal(got.detach(), want.detach()) and torch.equal(g_got, g_want)
