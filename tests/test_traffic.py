"""Memory traffic of the kernels, counted in Triton's interpreter: every load and store recorded
by address (helpers.recorded_accesses), against the floor the benchmarks' bandwidth assumes
(bench/common.py: each op states its minimum bytes).

- Token statistics forward: each counted row of the logits (and of the reference logits) read
  once; nothing else of the vocabulary's size is written.
- Backward: each row with an upstream gradient read once (twice with the reference), each
  gradient row written once, in place too.
- policy_loss forward+backward: the logits read twice (forward, backward) and the gradient
  written once: three passes, bench/policy_loss.py's byte count.
- linear_policy_loss: each chunk's projected logits read twice and written once (fwd+bwd).
- GAE: rewards read once, values and mask once more at the next step (the neighbouring lane's
  load of the same cache lines), advantages and returns written once.

Every launch is also checked for what the interpreter runs without complaint and a GPU would
not: no byte that one program stores is loaded or stored by another (Accesses.races: the
interpreter runs a launch's programs one after another, a GPU at once and in any order), and
no byte accessed outside the tensors the launch was given (Accesses.outside: the interpreter
reads host memory wherever a pointer points, a GPU faults).

Beyond the floor, a row may touch its sampled token's element once more (read for logp, and
written again with the one-hot term); the bounds allow two elements per row, far below a second
pass. Rows start 16-byte aligned and one element past it, at an odd vocabulary (head, vector
body, tail), one program per row and split over programs (small N).
"""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, Accesses, recorded_accesses

import rlops
import rlops.kernels._common as common
from rlops import reference
from rlops.kernels import gae_fwd, logits_grad, token_stats_fwd
from rlops.kernels.token_stats import row_states_fwd

pytestmark = pytest.mark.skipif(DEVICE.type == "cuda", reason="accesses are recorded in Triton's interpreter")
N, V = 6, 2053
MASKED = 2  # the row a mask leaves out (and whose upstream gradients are 0)
SLACK = 2  # elements per row beyond one pass: the sampled token's, read or written once more
ROW_FLOATS = 64  # a bound on the float32 written per row besides the gradient (statistics, split states)


@pytest.fixture(params=[None, 64], ids=["row-per-program", "split"])
def programs(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """One program per row (as at large N), or each row split over programs (small N on a GPU)."""
    monkeypatch.setattr(common, "FORCED_PROGRAMS", request.param)
    monkeypatch.setattr(common, "SPLIT_MIN_LOGITS", 16)


def _rows(dtype: torch.dtype, offset: int, seed: int) -> torch.Tensor:
    """(N, V) logits whose rows start `offset` elements past a 16-byte boundary."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, V + offset, generator=g) * 3).to(dtype)[:, offset:]


def _assert_gpu_safe(accesses: Accesses) -> None:
    """What the interpreter runs without complaint and a GPU would not: no race between a launch's
    programs, and no access outside the tensors a launch was given (helpers.Accesses)."""
    assert not accesses.races()
    assert not accesses.outside()


def _assert_passes(bytes_moved: int, passes: float, rows: int, x: torch.Tensor, what: str) -> None:
    """bytes_moved is `passes` passes over `rows` rows of x's vocabulary, plus at most SLACK elements a row."""
    floor = int(passes * rows * V * x.element_size())
    assert floor <= bytes_moved <= floor + SLACK * rows * x.element_size(), (
        f"{what}: {bytes_moved} bytes, {bytes_moved / max(floor, 1):.4f}x the floor of {floor}")


@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_ref", [False, True])
def test_token_stats_read_each_counted_row_once(programs, dtype: torch.dtype, offset: int, with_ref: bool) -> None:
    x, ref = _rows(dtype, offset, 0), _rows(dtype, 0, 1) if with_ref else None
    tokens = torch.linspace(0, V - 1, N).round().long()  # sampled tokens in the head, the body and the tail
    mask = torch.arange(N) != MASKED
    with recorded_accesses() as forward:
        stats = token_stats_fwd(x, tokens, 0.9, ref, mask)
    _assert_passes(forward.loaded(x), 1, N - 1, x, "forward reads of logits")
    if with_ref:
        _assert_passes(forward.loaded(ref), 1, N - 1, ref, "forward reads of ref_logits")
    # The statistics, and split rows' online-softmax states: O(N) floats, not a vocabulary's size.
    assert forward.stored(stats) == stats.numel() * 4 and forward.stored_anywhere() <= ROW_FLOATS * N * 4
    _assert_gpu_safe(forward)

    grads = torch.randn(3, N, generator=torch.Generator().manual_seed(2))
    grads[:, MASKED] = 0
    for out in (None, x.clone()):  # a fresh gradient, and in place over (a copy of) the logits
        source = x if out is None else out
        with recorded_accesses() as backward:
            dx = logits_grad(source, tokens, stats, grads, 0.9, ref, out=out)
        _assert_passes(backward.loaded(source), 1, N - 1, x, "backward reads of logits")
        if with_ref:
            _assert_passes(backward.loaded(ref), 1, N - 1, ref, "backward reads of ref_logits")
        _assert_passes(backward.stored(dx), 1, N, x, "backward writes of the gradient")
        _assert_passes(backward.stored_anywhere(), 1, N, x, "backward writes anywhere")
        _assert_gpu_safe(backward)


def _policy_accesses(dtype: torch.dtype, kl: str) -> tuple[Accesses, torch.Tensor, torch.Tensor, int]:
    """One rlops.policy_loss forward+backward on the Triton backend, every counted token on policy
    (old log-probs = log-probs: no clipped token, so every one has a gradient): the accesses, the
    logits, the reference logits and the counted tokens."""
    b, t = 2, 3
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(b, t, V, generator=g) * 3).to(dtype).requires_grad_(True)
    ref = (torch.randn(b, t, V, generator=g) * 3).to(dtype)
    tokens = torch.randint(0, V, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, 2] = False
    logp = reference.token_logprobs_and_entropy(x.detach().double(), tokens)[0].float()
    with recorded_accesses() as accesses:
        out = rlops.policy_loss(x, tokens, torch.tensor([1.0, -1.0]), mask=mask, old_logprobs=logp, ref_logprobs=logp,
                                ref_logits=ref, kl_coef=0.1, kl_estimator=kl, backend="triton")
        out.loss.backward()
    return accesses, x, ref, int(mask.sum())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kl", ["k3", "full"])
def test_policy_loss_is_three_passes_over_the_logits(programs, dtype: torch.dtype, kl: str) -> None:
    accesses, x, ref, counted = _policy_accesses(dtype, kl)
    _assert_passes(accesses.loaded(x), 2, counted, x, "logits reads, forward and backward")
    _assert_passes(accesses.loaded(ref), 2 if kl == "full" else 0, counted, ref, "ref_logits reads")
    rows = x.shape[0] * x.shape[1]
    _assert_passes(accesses.stored(x.grad), 1, rows, x, "gradient writes")
    # Everything else written is O(B*T): per-token outputs and gradient rows, not a vocabulary's size.
    assert accesses.stored_anywhere() - accesses.stored(x.grad) <= ROW_FLOATS * rows * 4
    _assert_gpu_safe(accesses)


@pytest.mark.parametrize("kl", ["k3", "full"])
def test_linear_policy_loss_streams_each_chunk_of_logits_three_times(kl: str) -> None:
    """The fused-linear loss's kernels read each chunk's projected logits twice (forward, and the
    backward kernel that overwrites them with their gradient) and write them once; the reference
    chunk is read twice with the exact KL. Its logits are temporaries: the bound is on every
    interpreted access, O(N) per-token reads and writes included."""
    b, t, hidden_size = 2, 3, 16
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(b, t, hidden_size, generator=g, requires_grad=True)
    weight = (torch.randn(V, hidden_size, generator=g) / 4).requires_grad_(True)
    tokens = torch.randint(0, V, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, 2] = False
    counted = int(mask.sum())
    logp = reference.token_logprobs_and_entropy((hidden @ weight.T).detach().double(), tokens)[0].float()
    ref = {"ref_hidden": hidden.detach() + 0.1, "ref_weight": weight.detach()} if kl == "full" else {}
    with recorded_accesses() as accesses:
        out = rlops.linear_policy_loss(hidden, weight, tokens, torch.tensor([1.0, -1.0]), mask=mask, chunk_size=2,
                                       old_logprobs=logp, ref_logprobs=logp, kl_coef=0.1, kl_estimator=kl,
                                       backend="triton", **ref)
        out.loss.backward()
    reads = (4 if kl == "full" else 2) * counted * V * 4
    per_token = (SLACK * 4 + ROW_FLOATS * 4) * counted  # sampled tokens, per-token inputs and outputs
    assert reads <= accesses.loaded_anywhere() <= reads + per_token
    assert counted * V * 4 <= accesses.stored_anywhere() <= counted * V * 4 + per_token
    _assert_gpu_safe(accesses)


@pytest.mark.parametrize("packed", [False, True])
def test_gae_reads_and_writes_each_element_once(packed: bool) -> None:
    g = torch.Generator().manual_seed(4)
    shape = (1, 96) if packed else (3, 32)
    rewards, values = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    mask = torch.rand(shape, generator=g) > 0.2
    cu_seqlens = torch.tensor([0, 40, 41, 96]) if packed else None
    with recorded_accesses() as accesses:
        adv, ret = gae_fwd(rewards, values, mask, None, 0.99, 0.95, cu_seqlens)
    assert accesses.loaded(rewards) == rewards.numel() * 4
    # Values and mask are read at t and, for the recurrence, at t + 1: the second load of an
    # element is the neighbouring lane's, from the same cache lines (one pass from DRAM).
    for x in (values, mask):
        counts = accesses.loads_per_element(x)
        assert counts.min() >= 1 and counts.max() <= 2
    for x in (adv, ret):
        assert accesses.stored(x) == x.numel() * x.element_size()
    _assert_gpu_safe(accesses)


@pytest.mark.parametrize("inplace_grad", [False, True])
def test_causal_lm_logits_programs_touch_only_their_own_bytes(programs, inplace_grad: bool) -> None:
    """(B, T + 1, V) logits: the backward's extra programs zero each sequence's last position while
    the others write the first T, in place over the logits too; the exact KL's reference rows too."""
    g = torch.Generator().manual_seed(6)
    leaf = (torch.randn(2, 4, V, generator=g) * 3).to(torch.bfloat16).requires_grad_(True)
    ref = (torch.randn(2, 4, V, generator=g) * 3).to(torch.bfloat16)
    tokens = torch.randint(0, V, (2, 3), generator=g)
    old = torch.randn(2, 3, generator=g) * 0.1 - 8  # ratios far from 1: clipped tokens too
    with recorded_accesses() as accesses:
        out = rlops.policy_loss(leaf * 1 if inplace_grad else leaf, tokens, torch.tensor([1.0, -1.0]),
                                old_logprobs=old, ref_logits=ref, kl_coef=0.1, kl_estimator="full",
                                entropy_coef=0.01, inplace_grad=inplace_grad, backend="triton")
        out.loss.backward()
    assert "_token_stats_bwd_kernel" in accesses.kernels and not leaf.grad[:, -1].any()
    _assert_gpu_safe(accesses)


@pytest.mark.parametrize("vocab", [1, 7, 17, 33])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_short_and_strided_rows_stay_in_their_own_bytes(programs, vocab: int, dtype: torch.dtype) -> None:
    """Rows shorter than a vector, or ending before their first 16-byte boundary, in a (B, T + 1, V)
    view whose rows start anywhere: forward, row states (a mask), and the backward in place over
    the whole view (its last positions zeroed), with the reference logits."""
    g = torch.Generator().manual_seed(7)
    full = (torch.randn(2, 4, vocab + 3, generator=g) * 3).to(dtype)[..., 3:]
    ref = (torch.randn(2, 4, vocab, generator=g) * 3).to(dtype)
    tokens = torch.randint(0, vocab, (2, 3), generator=g)
    live = torch.tensor([[True, False, True], [True, True, False]])
    with recorded_accesses() as accesses:
        stats = token_stats_fwd(full, tokens, 0.7, ref, live)
        row_states_fwd(full[:, :-1], ref[:, :-1], 0.7, live)
        logits_grad(full, tokens, stats, torch.randn(3, 2, 3, generator=g), 0.7, ref, out=full)
    assert {"_row_states_kernel", "_token_stats_bwd_kernel"} <= set(accesses.kernels)
    _assert_gpu_safe(accesses)


def test_races_and_stray_accesses_are_found() -> None:
    """Accesses.races and Accesses.outside can fail: a program reading what another stores, two
    programs storing one byte, a read past the end of the tensor passed."""
    import triton
    import triton.language as tl

    @triton.jit
    def shift(x_ptr, out_ptr, READ_NEXT: tl.constexpr):
        i = tl.program_id(0)
        tl.store(out_ptr + i, tl.load(x_ptr + i + READ_NEXT) + 1.0)

    @triton.jit
    def collide(out_ptr):
        tl.store(out_ptr, tl.program_id(0).to(tl.float32))

    x = torch.zeros(5)
    with recorded_accesses() as separate:
        shift[(4,)](x, x, False)  # in place, each program its own element
    with recorded_accesses() as raced:
        shift[(4,)](x, x, True)  # program i reads element i + 1, which program i + 1 writes
    with recorded_accesses() as collided:
        collide[(3,)](x)
    assert separate.races() == [] and separate.kernels == ["shift"]
    assert raced.races() == ["shift (launch 0): 12 bytes that one program stores are loaded by another, "
                             f"e.g. byte {x.data_ptr() + 4}"]
    assert collided.races() == [f"collide (launch 0): 4 bytes stored by several programs, e.g. byte {x.data_ptr()}"]
    assert separate.outside() == raced.outside() == collided.outside() == []
    memory, out = torch.zeros(8), torch.zeros(4)
    with recorded_accesses() as strayed:
        shift[(4,)](memory[:4], out, True)  # program 3 reads element 4: memory, but not the tensor passed
    assert strayed.races() == [] and out.tolist() == [1.0] * 4
    assert strayed.outside() == ["shift (launch 0): 1 accesses outside its tensors ['out_ptr', 'x_ptr'], "
                                 f"e.g. at byte {memory.data_ptr() + 16}"]
