"""Vocabulary-parallel token statistics (rlops/vocab_parallel.py) on 2 and 4 CPU processes (gloo).

Every rank builds the same full-vocabulary logits, keeps its shard, and checks the
vocabulary-parallel statistics and the gradient of its shard against the float64 oracle on the
full vocabulary, on the Triton (interpreter) and PyTorch backends: equal shards and unequal
ones (vocab_start), the exact KL, -inf logits, a NaN logit, rows left out (live=: zeros, no
gradient), and verl's Megatron-path drop-ins
(rlops.integrations.megatron). It also counts the bytes each call all-gathers (8 floats per
token and rank, the same at two vocabulary sizes and shardings) and the rows of its shard the
policy loss's Triton kernels read (the counted tokens' only).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from gloo_ranks import spawn_ranks
from helpers import rows_read

TOL = 2e-5  # float32 statistics of a few hundred logits against float64


def _oracle(x: torch.Tensor, y: torch.Tensor, tokens: torch.Tensor, tau: float, g: torch.Tensor) -> dict:
    """float64 logp, entropy, exact KL of the full rows and d(g . stats)/dx, by autograd."""
    from rlops import reference

    x = x.double().requires_grad_(True)
    logp, entropy, kl = reference.token_stats_with_kl(x, tokens, y.double(), tau)
    (g[0] * logp + g[1] * entropy + g[2] * kl).sum().backward()
    return {"logp": logp.detach(), "entropy": entropy.detach(), "kl": kl.detach(), "grad": x.grad}


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    finite = torch.isfinite(b)
    if not torch.equal(torch.isfinite(a), finite):
        return float("inf")
    return float((a.double() - b.double())[finite].abs().max()) if finite.any() else 0.0


def _cases(rank: int, world: int) -> dict:
    import rlops.vocab_parallel as vp

    sent = []
    gather = vp._all_gather

    def counting(output, tensor, *args, **kwargs):
        sent.append(tensor.numel() * tensor.element_size())
        return gather(output, tensor, *args, **kwargs)

    vp._all_gather = counting  # every collective of the op goes through here
    results = {}
    gen = torch.Generator().manual_seed(0)
    for vocab, sizes in ((64 * world, None), (40 * world, [40 + 16 * (r % 2) - 8 for r in range(world)])):
        x = torch.randn(2, 3, vocab, generator=gen) * 3
        y = x + torch.randn(2, 3, vocab, generator=gen)
        x[0, 1, 5] = float("-inf")  # a masked vocabulary entry
        tokens = torch.randint(0, vocab, (2, 3), generator=gen)
        tokens[0, 0], tokens[1, 2] = 0, vocab - 1
        g = torch.randn(3, 2, 3, generator=gen)
        want = _oracle(x, y, tokens, 0.7, g)
        shard_sizes = [vocab // world] * world if sizes is None else sizes
        bounds = [sum(shard_sizes[:r]) for r in range(world + 1)]
        lo, hi = bounds[rank], bounds[rank + 1]
        for backend in ("triton", "torch"):
            shard = x[..., lo:hi].clone().requires_grad_(True)
            spec = vp.check_vocab_parallel(shard, tokens, dist.group.WORLD, None if sizes is None else lo, backend,
                                           y[..., lo:hi])
            sent.clear()
            stats = vp.token_stats(shard, tokens, spec, 0.7, backend, y[..., lo:hi])
            (g * stats[:3]).sum().backward()
            key = f"V={vocab}{'' if sizes is None else ' unequal'}/{backend}"
            results[key] = {
                "logp": _err(stats[0], want["logp"]), "entropy": _err(stats[1], want["entropy"]),
                "kl": _err(stats[2], want["kl"]), "grad": _err(shard.grad, want["grad"][..., lo:hi]),
                "bytes": sum(sent),
            }
    # Rows left out (live False): zeros, and no gradient even where the upstream gradient is not 0.
    live = torch.tensor([[True, False, True], [True, True, False]])
    for backend in ("triton", "torch"):
        shard = x[..., lo:hi].clone().requires_grad_(True)
        spec = vp.check_vocab_parallel(shard, tokens, dist.group.WORLD, None if sizes is None else lo, backend)
        stats = vp.token_stats(shard, tokens, spec, 0.7, backend, live=live)
        (g * stats[:3]).sum().backward()
        want = _oracle(x, y, tokens, 0.7, torch.where(live, g, 0.0) * torch.tensor([1.0, 1.0, 0.0])[:, None, None])
        results[f"live/{backend}"] = {
            "logp": _err(stats[0][live], want["logp"][live]), "left_out_zero": not stats[:, ~live].any(),
            "grad": _err(shard.grad, want["grad"][..., lo:hi])}
    # NaN in: a NaN logit in any shard gives NaN statistics for its row, on every rank.
    x = torch.randn(1, 2, 8 * world, generator=gen)
    x[0, 1, 8 * world - 1] = float("nan")
    shard = x[..., 8 * rank:8 * (rank + 1)]
    tokens = torch.tensor([[1, 2]])
    for backend in ("triton", "torch"):
        spec = vp.check_vocab_parallel(shard, tokens, dist.group.WORLD, None, backend)
        stats = vp.token_stats(shard, tokens, spec, 1.0, backend)
        results[f"nan/{backend}"] = {"row0_finite": bool(torch.isfinite(stats[:2, 0, 0]).all()),
                                     "row1_nan": bool(torch.isnan(stats[:2, 0, 1]).all())}
    # verl's Megatron-path drop-ins on the same group (rlops.integrations.megatron).
    from rlops import reference
    from rlops.integrations import megatron

    x = torch.randn(2, 3, 16 * world, generator=gen, dtype=torch.float64) * 2
    tokens = torch.randint(0, 16 * world, (2, 3), generator=gen)
    full = x.clone().requires_grad_(True)
    want_logp, want_entropy = reference.token_logprobs_and_entropy(full, tokens)
    (want_logp.sum() + 2 * want_entropy.sum()).backward()
    shard = x[..., 16 * rank:16 * (rank + 1)].float().requires_grad_(True)
    logp = megatron.vocab_parallel_log_probs_from_logits(shard, tokens, group=dist.group.WORLD)
    entropy = megatron.vocab_parallel_entropy(shard, group=dist.group.WORLD)
    (logp.sum() + 2 * entropy.sum()).backward()
    results["megatron"] = {"logp": _err(logp, want_logp), "entropy": _err(entropy, want_entropy),
                           "grad": _err(shard.grad, full.grad[..., 16 * rank:16 * (rank + 1)])}
    # ... and the public ops' keyword, with this rank's first id given explicitly.
    import rlops

    public = rlops.token_logprobs(shard.detach(), tokens, vocab_group=dist.group.WORLD, vocab_start=16 * rank)
    results["public"] = {"logp": _err(public, want_logp)}
    results.update(_policy_loss_cases(rank, world, gen))
    return results


def _policy_loss_cases(rank: int, world: int, gen: torch.Generator) -> dict:
    """rlops.policy_loss with vocab_group against the float64 oracle on the full vocabulary: the
    loss and this shard's gradient, with masked -100 padding and active clipping (old log-probs
    off policy), the exact KL with an entropy bonus, and GSPO's sequence ratio with k3, padded and
    packed (cu_seqlens)."""
    import rlops
    from rlops import reference

    vocab, lo, hi = 24 * world, 24 * rank, 24 * (rank + 1)
    x = torch.randn(2, 4, vocab, generator=gen, dtype=torch.float64) * 2
    ref = x + torch.randn(2, 4, vocab, generator=gen, dtype=torch.float64) * 0.5
    tokens = torch.randint(0, vocab, (2, 4), generator=gen)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    tokens[~mask] = -100
    x[~mask] += 300  # padding whose logits overflow exp() in float32: never read, its gradient 0
    logp = torch.log_softmax(x, -1).gather(-1, tokens.clamp(min=0)[..., None])[..., 0]
    inputs = {"mask": mask, "old_logprobs": logp + torch.randn(2, 4, generator=gen, dtype=torch.float64) * 0.3,
              "ref_logprobs": logp - 0.1}
    adv = torch.randn(2, 4, generator=gen, dtype=torch.float64)
    cases = {"full-kl": {"kl_coef": 0.1, "kl_estimator": "full", "entropy_coef": 0.01},
             "gspo-k3": {"ratio_level": "sequence", "clip_low": 3e-4, "clip_high": 4e-4, "kl_coef": 0.05,
                         "loss_agg": "seq-mean-token-mean"}}
    results = {}
    for name, options in cases.items():
        full = x.clone().requires_grad_(True)
        want = reference.policy_loss(full, tokens.clamp(min=0), adv, ref_logits=ref, **inputs, **options)
        want.loss.backward()
        for backend in ("triton", "torch"):
            shard = x[..., lo:hi].float().requires_grad_(True)
            with rows_read(shard) as read:  # the rows of the shard the kernels load from
                got = rlops.policy_loss(shard, tokens, adv.float(), ref_logits=ref[..., lo:hi].float(),
                                        **{k: v.float() if v.is_floating_point() else v for k, v in inputs.items()},
                                        **options, backend=backend, vocab_group=dist.group.WORLD)
                got.loss.backward()
            results[f"policy_loss/{name}/{backend}"] = {
                "loss": _err(got.loss, want.loss), "grad": _err(shard.grad, full.grad[..., lo:hi]),
                "rows_read": sorted(read)}
    # Packed: the two rows as two segments of one packed row, the same loss (the last case's).
    shard = x[..., lo:hi].float().reshape(8, -1).requires_grad_(True)
    got = rlops.policy_loss(shard, tokens.reshape(-1), adv.float().reshape(-1), cu_seqlens=torch.tensor([0, 4, 8]),
                            **{k: (v.float() if v.is_floating_point() else v).reshape(-1) for k, v in inputs.items()},
                            **options, backend="torch", vocab_group=dist.group.WORLD)
    got.loss.backward()
    results[f"policy_loss/{name} packed/torch"] = {
        "loss": _err(got.loss, want.loss), "grad": _err(shard.grad, full.grad[..., lo:hi].reshape(8, -1))}
    return results


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_stats_and_grads_equal_the_full_vocabulary(tmp_path: Path, world: int) -> None:
    for rank, results in enumerate(spawn_ranks(_cases, world, tmp_path)):
        for key, r in results.items():
            if key.startswith("live/"):
                assert r.pop("left_out_zero"), (rank, key)
            if key.startswith("nan/"):
                assert r == {"row0_finite": True, "row1_nan": True}, (rank, key, r)
                continue
            for what in ("logp", "entropy", "kl", "grad", "loss"):
                assert r.get(what, 0.0) <= TOL, (rank, key, what, r[what])
            if "bytes" in r:  # 8 float32 per token (6 of them the online-softmax state), whatever V: O(N)
                assert r["bytes"] == 8 * 4 * 6, (rank, key, r["bytes"])
            if "rows_read" in r:  # Triton streams the counted rows of (2, 4) tokens only; PyTorch's reads no kernel
                assert r["rows_read"] == ([0, 1, 2, 4, 5] if key.endswith("/triton") else []), (rank, key, r)
        assert sum("bytes" in r for r in results.values()) == 4 and len(results) == 15, sorted(results)


def test_megatron_drop_ins_need_a_group_without_megatron() -> None:
    from rlops.integrations import megatron

    with pytest.raises(ValueError, match="pass group="):
        megatron.vocab_parallel_entropy(torch.zeros(2, 4))
