"""rlops.GlobalBatch: a batch split over ranks (data parallel, context parallel, both) gives each
rank its share of the whole batch's loss, so that the ranks' losses and gradients add up to one
process's on the whole batch.

Two and four gloo processes each take a part of the same full batch: some of the sequences
(data parallel), a share of every sequence's tokens (context parallel: padded, packed, and
through the fused-linear op), or, on four, half the sequences split in halves (both: pairs of
ranks share sequences). The sum of their losses and
each rank's gradient are checked against the float64 oracle (rlops.reference) on the whole
batch, on the Triton (interpreter) and PyTorch backends, with masking (a fully masked sequence
among them), perturbed old log-probs (active clipping), a k3 KL, an entropy term aggregated
apart, the sequence-level ratio (GSPO) and every loss_agg. masked_whiten(group=) likewise.
Counts given instead of all-reduced (GlobalBatch(tokens=, seqs=)) are checked in one process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from gloo_ranks import spawn_ranks

import rlops
from rlops import reference

B, T, V = 4, 8, 16
TOL = 2e-5  # float32 against float64 on a few dozen tokens
CASES = {
    "token-mean, entropy seq-mean-token-mean, k3": dict(
        loss_agg="token-mean", entropy_agg="seq-mean-token-mean", entropy_coef=0.01, kl_coef=0.04,
        kl_estimator="k3", clip_low=0.2, clip_high=0.28),
    "gspo seq-mean-token-mean": dict(ratio_level="sequence", clip_low=0.03, clip_high=0.04,
                                     loss_agg="seq-mean-token-mean"),
    "seq-mean-token-sum-norm, entropy seq-mean-token-sum": dict(
        loss_agg="seq-mean-token-sum-norm", norm_len=6.0, entropy_agg="seq-mean-token-sum", entropy_coef=-0.02),
}


def full_batch() -> dict[str, torch.Tensor]:
    """The whole batch, the same on every rank: logits (B, T, V) float32 and the (B, T) inputs."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, T, V, generator=g) * 2
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[2] = False  # a fully masked sequence
    mask[0, :4] = True
    logp = torch.log_softmax(logits.double(), -1).gather(-1, tokens[..., None])[..., 0].float()
    old = logp + 0.4 * torch.randn(B, T, generator=g)  # off-policy: some ratios are clipped
    tokens = torch.where(mask, tokens, -100)  # padding ids are never read
    return {"logits": logits, "tokens": tokens, "advantages": torch.randn(B, generator=g), "mask": mask,
            "old_logprobs": old, "ref_logprobs": logp + 0.3 * torch.randn(B, T, generator=g)}


def oracle(batch: dict[str, torch.Tensor], options: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 loss of the whole batch and its gradient in the logits."""
    x = batch["logits"].double().requires_grad_(True)
    tokens = torch.where(batch["mask"], batch["tokens"], 0)
    inputs = {k: batch[k].double() for k in ("old_logprobs", "ref_logprobs")}
    loss = reference.policy_loss(x, tokens, batch["advantages"].double(), mask=batch["mask"], **inputs,
                                 **options).loss
    loss.backward()
    return loss.detach(), x.grad


def _parts(rank: int, world: int) -> dict[str, tuple]:
    """Each split's (rows, time steps, GlobalBatch) for this rank, on 2 or 4 ranks."""
    rows, share = B // world, slice(rank * T // world, (rank + 1) * T // world)
    parts = {
        "data": (slice(rank * rows, (rank + 1) * rows), slice(None), rlops.GlobalBatch(group=dist.group.WORLD)),
        "context": (slice(None), share, rlops.GlobalBatch(seq_group=dist.group.WORLD)),
    }
    if world == 4:  # pairs of ranks share half the sequences, each rank half of their tokens
        pair = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
        half = slice((rank % 2) * T // 2, (rank % 2 + 1) * T // 2)
        parts["both"] = (slice(2 * (rank // 2), 2 * (rank // 2) + 2), half,
                         rlops.GlobalBatch(group=dist.group.WORLD, seq_group=pair[rank // 2]))
    return parts


def _rank_loss(batch: dict, rows: slice, steps: slice, split: rlops.GlobalBatch, options: dict, backend: str,
               variant: str = "padded") -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's loss on its part and the gradient in its logits: rlops.policy_loss on them padded
    or packed, or rlops.linear_policy_loss on hidden states = the logits and an identity lm_head."""
    part = {k: v[rows] if v.dim() == 1 else v[rows, steps] for k, v in batch.items()}
    x = part.pop("logits").clone().requires_grad_(True)
    tokens, adv = part.pop("tokens"), part.pop("advantages")
    kwargs = {**part, **options, "global_batch": split, "backend": backend}
    if variant == "packed":  # each (B_r, T_r) row a segment of the packed row, advantages spread to tokens
        n_rows, n_steps = tokens.shape
        kwargs["cu_seqlens"] = torch.arange(0, n_rows * n_steps + 1, n_steps, dtype=torch.int32)
        adv = adv[:, None].expand(n_rows, n_steps)
        x, tokens, adv = x.reshape(-1, V), tokens.reshape(-1), adv.reshape(-1)
        kwargs.update({k: v.reshape(-1) for k, v in part.items()})
        x = x.detach().requires_grad_(True)
    if variant == "linear":
        loss = rlops.linear_policy_loss(x, torch.eye(V), tokens, adv, **kwargs).loss
    else:
        loss = rlops.policy_loss(x, tokens, adv, **kwargs).loss
    loss.backward()
    return loss.detach(), x.grad.reshape(len(range(B)[rows]), len(range(T)[steps]), V)


def _cases(rank: int, world: int) -> dict:
    batch, errors = full_batch(), {}
    parts = _parts(rank, world)
    for i, (case, options) in enumerate(CASES.items()):
        want_loss, want_grad = oracle(batch, options)
        # Each split on both backends over the cases (the Triton interpreter is slow), packed, and
        # through the fused-linear op.
        runs = [(mode, "triton" if (i + j) % 2 else "torch", "padded") for j, mode in enumerate(parts)]
        for mode, backend, variant in [*runs, ("context", "triton", "packed"), ("context", "torch", "linear")]:
            rows, steps, split = parts[mode]
            loss, grad = _rank_loss(batch, rows, steps, split, options, backend, variant)
            dist.all_reduce(loss)
            err = torch.stack([(loss - want_loss).abs().float(),
                               (grad.double() - want_grad[rows, steps]).abs().max().float()])
            dist.all_reduce(err, op=dist.ReduceOp.MAX)
            errors[f"{case}/{mode}/{backend}/{variant}"] = err.tolist()
    # masked_whiten over the ranks' sequences (data parallel) against the whole batch's.
    x, m = batch["old_logprobs"], batch["mask"]
    values = x[m].double()
    want = (x.double() - values.mean()) / torch.sqrt(values.var() + 1e-8)
    rows = parts["data"][0]
    got = rlops.masked_whiten(x[rows], m[rows], group=dist.group.WORLD)
    err = torch.where(m[rows], got.double() - want[rows], 0.0).abs().max().float()[None]
    dist.all_reduce(err, op=dist.ReduceOp.MAX)
    errors["masked_whiten/data"] = [float(err), 0.0]
    return errors  # all-reduced: the same on every rank


@pytest.mark.parametrize("world", [2, 4])
def test_split_batches_add_up_to_the_whole_batch(tmp_path: Path, world: int) -> None:
    errors = spawn_ranks(_cases, world, tmp_path)[0]
    modes = 3 if world == 4 else 2
    assert len(errors) == len(CASES) * (modes + 2) + 1
    bad = {name: e for name, e in errors.items() if not max(e) < TOL}
    assert not bad, bad


def test_given_counts_need_no_group() -> None:
    """GlobalBatch(tokens=, seqs=) in one process: two calls on halves of the batch add up to it."""
    batch = full_batch()
    for options in CASES.values():
        want_loss, want_grad = oracle(batch, options)
        m = batch["mask"]
        valid = int((m.sum(-1) > 0).sum()) if options["loss_agg"] == "seq-mean-token-mean" else B
        split = rlops.GlobalBatch(tokens=int(m.sum()), seqs=valid)
        if options.get("entropy_agg") not in (None, options["loss_agg"]):
            continue  # one seqs number serves one of the two sequence counts
        total = 0.0
        for rows in (slice(0, 1), slice(1, B)):
            loss, grad = _rank_loss(batch, rows, slice(None), split, options, "torch")
            total += float(loss)
            assert (grad.double() - want_grad[rows]).abs().max() < TOL
        assert abs(total - float(want_loss)) < TOL


def test_bad_global_batch_is_refused() -> None:
    batch = full_batch()
    with pytest.raises(ValueError, match="GlobalBatch needs group"):
        rlops.GlobalBatch(tokens=3)
    with pytest.raises(TypeError, match=r"GlobalBatch\.group must be"):
        rlops.GlobalBatch(group="world")
    with pytest.raises(ValueError, match=r"GlobalBatch\.tokens must be"):
        rlops.GlobalBatch(tokens=-1, seqs=2)
    with pytest.raises(TypeError, match=r"global_batch must be an rlops\.GlobalBatch"):
        rlops.policy_loss(batch["logits"], batch["tokens"], batch["advantages"], mask=batch["mask"],
                          global_batch={"tokens": 3})
