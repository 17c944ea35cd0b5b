"""Vocabulary-parallel fused-linear ops (rlops/linear_vocab_parallel.py) on 2 and 4 CPU processes (gloo).

Every rank builds the same hidden states and full lm_head, keeps its rows of the head, and
checks rlops.linear_token_logprobs_and_entropy and rlops.linear_policy_loss with vocab_group
against the float64 oracle on the full vocabulary (rlops.reference on hidden @ W.T + b, by
autograd): the values and the gradients of hidden (all-reduced: every rank's equals the
single-device one), of this rank's weight rows and of its bias, on the Triton (interpreter) and
PyTorch backends; equal shards and unequal ones (vocab_start), masked -100 padding (with the
masked rows dropped, as on CPU, and projected, as on a GPU), active clipping, k3 and the exact
KL, GSPO's sequence ratio, an entropy bonus and an upstream gradient != 1. It also counts the
bytes each call all-gathers: 8 floats per token and rank, the same at two vocabulary sizes.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from gloo_ranks import spawn_ranks

TOL = 2e-5  # float32 against float64, relative to the largest value compared (at least 1)
SHAPE, H, TAU = (2, 3), 8, 0.8
# Rows per chunk: two chunks on the PyTorch backend (the chunk loop is the backends' shared
# code), one on Triton, whose interpreter's time grows with the launches.
CHUNKS = {"torch": 4, "triton": None}


def _backends(world: int) -> tuple[str, ...]:
    """Triton on 2 ranks only: its interpreter costs about a second of CPU per rank and call, and
    tests/test_vocab_parallel.py runs the same kernels (row states, local-id gradient) on 4."""
    return ("triton", "torch") if world == 2 else ("torch",)


def _err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max abs error relative to max(1, max|want|); inf unless every value is finite."""
    got, want = got.detach().double(), want.detach().double()
    if got.shape != want.shape or not torch.isfinite(got).all():
        return float("inf")
    return float((got - want).abs().max() / max(1.0, float(want.abs().max())))


def _grads_err(leaves: tuple, want: tuple, rows: slice) -> dict:
    """Errors of hidden's gradient (whole) and of this rank's weight and bias rows' gradients."""
    (hidden, weight, bias), (want_h, want_w, want_b) = leaves, want
    return {"d_hidden": _err(hidden.grad, want_h), "d_weight": _err(weight.grad, want_w[rows]),
            "d_bias": _err(bias.grad, want_b[rows])}


def _oracle_leaves(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> tuple:
    return tuple(x.double().requires_grad_(True) for x in (hidden, weight, bias))


def _shard_leaves(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, rows: slice) -> tuple:
    return hidden.clone().requires_grad_(True), weight[rows].clone().requires_grad_(True), \
        bias[rows].clone().requires_grad_(True)


def _token_stats_cases(rank: int, world: int, gen: torch.Generator, sent: list[int]) -> dict:
    """linear_token_logprobs_and_entropy with an upstream gradient on both outputs, equal shards and
    unequal ones (vocab_start); `sent` collects the bytes each call all-gathers."""
    import rlops
    from rlops import reference

    results = {}
    for vocab, sizes in ((16 * world, None), (12 * world, [12 + 6 * (r % 2) - 3 for r in range(world)])):
        hidden, weight, bias = torch.randn(*SHAPE, H, generator=gen), torch.randn(vocab, H, generator=gen), \
            torch.randn(vocab, generator=gen)
        tokens = torch.randint(0, vocab, SHAPE, generator=gen)
        tokens[0, 0], tokens[1, 2] = 0, vocab - 1
        g = torch.randn(2, *SHAPE, generator=gen, dtype=torch.float64)
        full = _oracle_leaves(hidden, weight, bias)
        want_logp, want_entropy = reference.token_logprobs_and_entropy(full[0] @ full[1].T + full[2], tokens, TAU)
        (g[0] * want_logp + g[1] * want_entropy).sum().backward()
        bounds = [sum(([vocab // world] * world if sizes is None else sizes)[:r]) for r in range(world + 1)]
        rows = slice(bounds[rank], bounds[rank + 1])
        for backend in _backends(world):
            leaves = _shard_leaves(hidden, weight, bias, rows)
            sent.clear()
            logp, entropy = rlops.linear_token_logprobs_and_entropy(
                leaves[0], leaves[1], tokens, bias=leaves[2], temperature=TAU, chunk_size=CHUNKS[backend],
                backend=backend, vocab_group=dist.group.WORLD, vocab_start=None if sizes is None else rows.start)
            (g[0].float() * logp + g[1].float() * entropy).sum().backward()
            results[f"stats/V={vocab}{'' if sizes is None else ' unequal'}/{backend}"] = {
                "logp": _err(logp, want_logp), "entropy": _err(entropy, want_entropy), "bytes": sum(sent),
                **_grads_err(leaves, tuple(x.grad for x in full), rows)}
    return results


# Each case: the options of linear_policy_loss (and of the oracle), its upstream gradient, and the
# (backend, masked rows dropped) runs: dropped as on CPU tensors, or projected as on a GPU. The
# epilogue is PyTorch's on either backend: Triton runs once, for the exact KL's reference states.
_LOSS_CASES = {
    "k3-entropy": ({"kl_coef": 0.1, "kl_estimator": "k3", "entropy_coef": 0.02, "clip_low": 0.1,
                    "clip_high": 0.15}, 3.0, (("torch", True), ("torch", False))),
    "gspo-k3": ({"ratio_level": "sequence", "clip_low": 3e-4, "clip_high": 4e-4, "kl_coef": 0.05,
                 "loss_agg": "seq-mean-token-mean"}, -2.0, (("torch", True), ("torch", False))),
    "full-kl": ({"kl_coef": 0.1, "kl_estimator": "full", "entropy_coef": 0.01}, 0.5,
                (("triton", True), ("torch", True), ("torch", False))),
}


def _policy_loss_cases(rank: int, world: int, gen: torch.Generator) -> dict:
    """linear_policy_loss against the oracle on the full vocabulary: masked -100 padding, clipping
    active (old log-probs off policy), each case of _LOSS_CASES (the exact KL with the reference's
    own hidden states, H + 2 wide, and its head's rows and bias), masked rows dropped and projected."""
    import rlops
    from rlops import reference

    linear_ops = importlib.import_module("rlops.ops.linear_policy_loss")  # the module, not rlops.ops's function

    vocab, rows = 16 * world, slice(16 * rank, 16 * (rank + 1))
    hidden, weight, bias = torch.randn(*SHAPE, H, generator=gen), torch.randn(vocab, H, generator=gen) * 0.7, \
        torch.randn(vocab, generator=gen)
    ref_hidden, ref_weight = torch.randn(*SHAPE, H + 2, generator=gen), torch.randn(vocab, H + 2, generator=gen)
    ref_bias = torch.randn(vocab, generator=gen)
    ref_logits = ref_hidden.double() @ ref_weight.double().T + ref_bias.double()
    tokens = torch.randint(0, vocab, SHAPE, generator=gen)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    tokens[~mask] = -100
    logits = hidden.double() @ weight.double().T + bias.double()
    logp = torch.log_softmax(logits / TAU, -1).gather(-1, tokens.clamp(min=0)[..., None])[..., 0]
    adv = torch.randn(*SHAPE, generator=gen, dtype=torch.float64)
    # Two counted tokens far off policy in their advantage's direction (clipped: no pg gradient), the others near.
    off_policy = torch.tensor([[0.5, 0.05, 0.5], [-0.05, 0.5, 0.05]], dtype=torch.float64) * adv.sign()
    inputs = {"mask": mask, "old_logprobs": logp - off_policy,
              "ref_logprobs": logp - 0.2 * torch.rand(*SHAPE, generator=gen, dtype=torch.float64)}
    results, drops = {}, linear_ops._drops_masked_rows
    for name, (options, scale, runs) in _LOSS_CASES.items():
        full = _oracle_leaves(hidden, weight, bias)
        want = reference.policy_loss(full[0] @ full[1].T + full[2], tokens.clamp(min=0), adv, ref_logits=ref_logits,
                                     temperature=TAU, **inputs, **options)
        (scale * want.loss).backward()
        assert (want.clipped_low | want.clipped_high)[mask].any(), name  # the clip's gradient path is tested
        for backend, dropped in (run for run in runs if run[0] in _backends(world)):
            linear_ops._drops_masked_rows = lambda hidden, dropped=dropped: dropped  # False: every row, as on a GPU
            leaves = _shard_leaves(hidden, weight, bias, rows)
            got = rlops.linear_policy_loss(
                leaves[0], leaves[1], tokens, adv.float(), bias=leaves[2], ref_hidden=ref_hidden,
                ref_weight=ref_weight[rows], ref_bias=ref_bias[rows], temperature=TAU, chunk_size=CHUNKS[backend],
                backend=backend, vocab_group=dist.group.WORLD,
                **{k: v.float() if v.is_floating_point() else v for k, v in inputs.items()}, **options)
            (scale * got.loss).backward()
            results[f"loss/{name}/{backend}{'' if dropped else '/all-rows'}"] = {
                "loss": _err(got.loss, want.loss), "logp": _err(got.logprobs, torch.where(mask, want.logprobs, 0.0)),
                "kl": _err(got.kl, torch.where(mask, want.kl, 0.0)),
                **_grads_err(leaves, tuple(x.grad for x in full), rows)}
    linear_ops._drops_masked_rows = drops
    return results


def _cases(rank: int, world: int) -> dict:
    import rlops.vocab_parallel as vp

    sent: list[int] = []
    gather = vp._all_gather

    def counting(output, tensor, *args, **kwargs):
        sent.append(tensor.numel() * tensor.element_size())
        return gather(output, tensor, *args, **kwargs)

    vp._all_gather = counting  # every all_gather of the ops goes through here
    gen = torch.Generator().manual_seed(0)  # the same inputs on every rank
    return {**_token_stats_cases(rank, world, gen, sent), **_policy_loss_cases(rank, world, gen)}


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_linear_ops_equal_the_full_vocabulary(tmp_path: Path, world: int) -> None:
    for rank, results in enumerate(spawn_ranks(_cases, world, tmp_path)):
        backends = _backends(world)
        runs = [run for case in _LOSS_CASES.values() for run in case[2] if run[0] in backends]
        assert len(results) == 2 * len(backends) + len(runs), sorted(results)
        for key, r in results.items():
            for what, err in r.items():
                if what == "bytes":  # 8 float32 per token (6 of them the online-softmax state), whatever V: O(N)
                    assert err == 8 * 4 * SHAPE[0] * SHAPE[1], (rank, key, err)
                else:
                    assert err <= TOL, (rank, key, what, err)


def test_vocab_parallel_linear_ops_refuse_bad_options() -> None:
    import rlops

    hidden, weight, tokens = torch.randn(2, 3, H), torch.randn(16, H), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="backend 'auto', 'triton' or 'torch'"):
        rlops.linear_token_logprobs_and_entropy(hidden, weight, tokens, backend="cuda", vocab_group=object())
    with pytest.raises(ValueError, match="backend 'auto', 'triton' or 'torch'"):
        rlops.linear_policy_loss(hidden, weight, tokens, torch.ones(2, 3), backend="cuda", vocab_group=object())
    with pytest.raises(ValueError, match=r"vocab_start .* needs vocab_group"):
        rlops.linear_policy_loss(hidden, weight, tokens, torch.ones(2, 3), vocab_start=16)
    with pytest.raises(ValueError, match=r"vocab_start .* needs vocab_group"):
        rlops.linear_token_logprobs_and_entropy(hidden, weight, tokens, vocab_start=16)
    with pytest.raises(TypeError, match=r"vocab_group must be a torch\.distributed ProcessGroup"):
        rlops.linear_token_logprobs_and_entropy(hidden, weight, tokens, vocab_group=object())
