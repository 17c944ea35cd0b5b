"""Small N: each row's vocabulary split over several programs (kernels/_common.py, vocab_splits).

When the rows alone would leave a GPU idle, the forward streams each split in its own program
(_row_states_kernel) and merges the splits' online-softmax states in the epilogue kernel; the
backward writes each split in its own program. On the CPU the split is forced (FORCED_PROGRAMS)
and checked against the float64 oracle and against the unsplit kernels: values, gradients (in
place too), masked rows (and that no kernel reads them), the exact KL, misaligned rows of an odd
vocabulary, and sampled tokens in the head, the tail and every split.
"""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, FP32_TOL, assert_values_close, rows_read

import rlops
import rlops.kernels._common as common
from rlops import reference
from rlops.kernels import logits_grad, row_states_fwd, token_stats_fwd


@pytest.fixture
def split(monkeypatch: pytest.MonkeyPatch):
    """Pretend a GPU holding 64 programs, with splits down to 16 logits."""
    monkeypatch.setattr(common, "FORCED_PROGRAMS", 64)
    monkeypatch.setattr(common, "SPLIT_MIN_LOGITS", 16)


def _batch(n: int, vocab: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits with rows 1 element past a 16-byte boundary, reference logits, tokens from the head
    to the tail."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, vocab + 1, generator=g) * 4).to(dtype)[:, 1:]
    ref = (torch.randn(n, vocab, generator=g) * 4).to(dtype)
    tokens = torch.linspace(0, vocab - 1, n).round().long()
    return x.to(DEVICE), ref.to(DEVICE), tokens.to(DEVICE)


def test_splits_fill_the_gpu_only_when_rows_are_few() -> None:
    common.FORCED_PROGRAMS = 1056  # an H200: 132 SMs x 8 CTAs
    try:
        device = torch.device("cpu")
        assert common.vocab_splits(16384, 151936, device) == (1, 151936)
        splits, chunk = common.vocab_splits(64, 151936, device)
        assert splits == 8 and chunk % common.MAX_BLOCK_V == 0 and splits * chunk >= 151936
        assert chunk >= common.SPLIT_MIN_LOGITS
        assert common.vocab_splits(8, 4096, device) == (1, 4096)  # too small to split
    finally:
        common.FORCED_PROGRAMS = None
    assert common.vocab_splits(8, 151936, torch.device("cpu")) == (1, 151936)  # no GPU: never


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [301, 2053])
def test_token_stats_split_matches_oracle_and_unsplit(split, dtype: torch.dtype, vocab: int) -> None:
    x, ref, tokens = _batch(5, vocab, dtype)
    assert common.vocab_splits(5, vocab, x.device)[0] > 1
    mask = torch.tensor([1, 1, 0, 1, 1], dtype=torch.bool, device=DEVICE)
    got = token_stats_fwd(x, tokens, 0.8, ref, mask)
    logp, entropy, kl = reference.token_stats_with_kl(x.double(), tokens, ref.double(), 0.8)
    live = mask.bool()
    for row, want in zip(got[:3], (logp, entropy, kl), strict=True):
        assert_values_close(row[live].double(), want[live])
    assert (got[:, ~live] == 0).all()

    grads = torch.randn(3, 5, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    grads[:, 3] = 0  # a row with no upstream gradient: zeros, unread
    dx = logits_grad(x, tokens, got, grads, 0.8, ref)
    common.FORCED_PROGRAMS = None
    unsplit = token_stats_fwd(x, tokens, 0.8, ref, mask)
    dx_unsplit = logits_grad(x, tokens, unsplit, grads, 0.8, ref)
    assert_values_close(got, unsplit, tol=4 * FP32_TOL)
    assert_values_close(dx.float(), dx_unsplit.float(), tol=4 * FP32_TOL)
    assert (dx[3] == 0).all()


@pytest.mark.skipif(DEVICE.type == "cuda", reason="reads are recorded in Triton's interpreter")
@pytest.mark.parametrize("programs", [None, 64], ids=["unsplit", "split"])
def test_rows_left_out_are_not_read(monkeypatch: pytest.MonkeyPatch, programs: int | None) -> None:
    """The forward kernels read no masked row (the row-state kernel of a vocabulary shard none
    where `live` is 0, and gives it zero states), the backward none without upstream gradient."""
    monkeypatch.setattr(common, "FORCED_PROGRAMS", programs)
    monkeypatch.setattr(common, "SPLIT_MIN_LOGITS", 16)
    x, ref, tokens = _batch(5, 301, torch.float32)
    x = x.contiguous()
    mask = torch.tensor([1, 0, 1, 1, 0], dtype=torch.bool)
    with rows_read(x) as read:
        stats = token_stats_fwd(x, tokens, 0.8, ref, mask)
    assert read == {0, 2, 3}
    grads = torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
    grads[:, ~mask] = 0
    with rows_read(x) as read:
        logits_grad(x, tokens, stats, grads, 0.8, ref)
    assert read == {0, 2, 3}
    with rows_read(x) as read:
        states = row_states_fwd(x, ref, 0.8, mask)
    assert read == {0, 2, 3} and not states[:, ~mask].any()
    assert torch.equal(states[:, mask], row_states_fwd(x, ref, 0.8)[:, mask])


def test_backward_split_in_place(split) -> None:
    x, _, tokens = _batch(4, 1001, torch.bfloat16)
    stats = token_stats_fwd(x, tokens, 1.0)
    grads = torch.randn(3, 4, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    expected = logits_grad(x, tokens, stats, grads, 1.0)
    got = logits_grad(x, tokens, stats, grads, 1.0, out=x)
    assert got.data_ptr() == x.data_ptr()
    assert torch.equal(got, expected)


@pytest.mark.parametrize("inplace", [False, True])
def test_backward_split_of_causal_lm_logits(split, inplace: bool) -> None:
    """(B, T + 1, V) logits of (B, T) tokens: the split programs write the first T positions as for
    the slice [:, :-1], and the programs past the rows write zeros at each last position, on an odd
    vocabulary whose rows start anywhere."""
    full = (torch.randn(3, 5, 1001, generator=torch.Generator().manual_seed(4)) * 4).to(torch.bfloat16).to(DEVICE)
    tokens = torch.randint(0, 1001, (3, 4), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    stats = token_stats_fwd(full, tokens, 1.0)
    assert torch.equal(stats, token_stats_fwd(full[:, :-1], tokens, 1.0))
    grads = torch.randn(3, 3, 4, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    expected = logits_grad(full[:, :-1], tokens, stats, grads, 1.0)
    x = full.clone()
    got = logits_grad(x, tokens, stats, grads, 1.0, out=x if inplace else None)
    assert got.shape == full.shape and (got.data_ptr() == x.data_ptr()) == inplace
    assert torch.equal(got[:, :-1], expected) and not got[:, -1].any()


@pytest.mark.parametrize("kl", ["k3", "full"])
def test_policy_loss_split_matches_unsplit(split, kl: str) -> None:
    """The public loss, values and gradients, with its epilogue on merged split states."""
    b, t, vocab = 2, 3, 777
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(b, t, vocab, generator=g) * 3).to(DEVICE)
    ref_logits = (torch.randn(b, t, vocab, generator=g) * 3).to(DEVICE)
    tokens = torch.randint(0, vocab, (b, t), generator=g).to(DEVICE)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool, device=DEVICE)
    inputs = {"mask": mask, "old_logprobs": -torch.rand(b, t, generator=g).to(DEVICE) * 8,
              "ref_logprobs": -torch.rand(b, t, generator=g).to(DEVICE) * 8, "ref_logits": ref_logits,
              "kl_coef": 0.1, "kl_estimator": kl, "entropy_coef": 0.01, "clip_low": 0.2, "clip_high": 0.28}
    adv = torch.randn(b, t, generator=g).to(DEVICE)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        x = logits.clone().requires_grad_(True)
        out = rlops.policy_loss(x, tokens, adv, backend="triton", **inputs)
        out.loss.backward()
        return out.loss.detach(), x.grad

    loss, grad = run()
    common.FORCED_PROGRAMS = None
    loss_unsplit, grad_unsplit = run()
    want = reference.policy_loss(logits.double(), tokens, adv.double(),
                                 **{k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
                                    for k, v in inputs.items()})
    assert_values_close(loss.double(), want.loss)
    assert_values_close(loss, loss_unsplit, tol=4 * FP32_TOL)
    assert_values_close(grad, grad_unsplit, tol=4 * FP32_TOL)


def test_fused_linear_chunks_are_whole_waves() -> None:
    """The fused-linear loss's default chunk holds whole waves of the vocabulary kernels (an H200:
    1056 programs): rounded down from the 256 MiB buffer target, or up to one wave where that at
    most doubles the buffers; unchanged on a CPU (no wave)."""
    from rlops.ops.chunking import default_chunk_rows

    qwen = (16384, 4096, 151936, 2, False)  # rows, hidden, vocab, bf16, no reference
    assert default_chunk_rows(*qwen) == 838  # 256 MiB of (V + 2H) bf16 rows
    assert default_chunk_rows(*qwen, 1056) == 1056  # 0.79 of a wave -> one wave (+26% buffers)
    assert default_chunk_rows(16384, 4096, 32000, 2, False, 1056) == 3 * 1056  # 3.16 waves -> 3
    assert default_chunk_rows(500, 4096, 151936, 2, False, 1056) == 500  # the whole batch
    assert default_chunk_rows(16384, 8192, 262144, 2, True, 1056) == 248  # a wave would be 4x: small N splits
