"""The trainers' skeleton: the config fields they share, the step loop every trainer runs
(resume, steps, periodic evaluation, metrics, checkpoints), and what GRPO and PPO share on top
of it: the policy and its frozen reference, no-gradient log-probs, the policy loss by loss_impl,
and the one epochs x minibatches optimisation of a step's samples (`RLTrainer.optimise`).
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import baselines
from .._validation import check_choice as check_value_choice
from ..ops.linear_policy_loss import linear_policy_loss, linear_token_logprobs_and_entropy
from ..ops.policy_loss import PolicyLossOutput, policy_loss
from ..ops.token_stats import token_logprobs
from ..options import BACKENDS
from .checkpoint import (
    Checkpoint,
    is_finished,
    mark_finished,
    save_model,
    transformers_progress,
    unmark_finished,
)
from .faults import crash_point
from .packed import PackedRollout, check_packing, row_chunks
from .processes import Processes, seed_everything
from .rollout import PolicyForward, Rollout, Task, Tokenizer, enable_checkpointing, evaluate, minibatches, sample
from .runlog import RunLog, read_metrics

FSDP_HELP = ("under torchrun, shard the models, gradients and optimizer states over the processes (FSDP2's "
             "fully_shard) instead of replicating them (DDP): the same step; with one process it changes nothing")


@dataclass
class TrainConfig:
    """Fields every trainer config has."""

    out_dir: str | None = None  # metrics.jsonl, metrics.png, checkpoint/ and model/ go here
    steps: int = 100
    lr: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    device: str | None = None  # None: CUDA when present, else CPU
    save_every: int = 50  # steps between checkpoints (and one at the end)
    resume: bool = True  # continue from out_dir/checkpoint when it exists
    progress: bool = True  # a progress bar on rank 0
    # Under torchrun: FSDP2 (fully_shard) instead of DDP, the same step (processes.py); one process: no effect.
    fsdp: bool = field(default=False, metadata={"help": FSDP_HELP})

    def __post_init__(self) -> None:
        for name in ("steps", "save_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        check_positive(self, "lr", "max_grad_norm")
        check_nonnegative(self, "weight_decay")
        check_seed(self.seed)


LOSS_IMPLS = ("fused-linear", "fused", "eager")


@dataclass
class RLConfig(TrainConfig):
    """Fields GRPO and PPO share."""

    prompts_per_step: int = 16  # per process
    max_new_tokens: int = 32
    temperature: float = 1.0  # sampling, and the distribution the losses score
    epochs: int = 1  # optimisation passes over each batch of samples
    minibatches: int = 2  # optimizer steps per pass
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.0  # 0 skips the reference model
    entropy_coef: float = 0.0
    # fused-linear: rlops.linear_policy_loss on hidden states (no logits); fused: rlops.policy_loss on
    # the logits; eager: the same loss in eager PyTorch as TRL writes it (a baseline, for comparison).
    loss_impl: str = "fused-linear"
    backend: str = "auto"  # of the fused ops: auto (Triton on CUDA, the reference on CPU), triton, torch
    gradient_checkpointing: bool = False  # recompute each decoder layer in the backward instead of keeping it
    # Each minibatch's sequences in one row without padding (rlops.trainers.packed); the same step as padded.
    packing: bool = False
    eval_every: int = 50  # steps between held-out evaluations (and at the end)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "prompts_per_step", "max_new_tokens", "temperature", "epochs", "minibatches")
        check_nonnegative(self, "clip_low", "clip_high", "kl_coef", "eval_every")
        if not math.isfinite(self.entropy_coef):
            raise ValueError(f"entropy_coef must be finite, got {self.entropy_coef!r}")
        check_choice(self, "loss_impl", LOSS_IMPLS)
        check_choice(self, "backend", BACKENDS)


def check_positive(config: Any, *names: str) -> None:
    """Raises a ValueError naming the first of config's fields names that is not > 0 (NaN is not)."""
    for name in names:
        value = getattr(config, name)
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")


def check_seed(seed: int) -> None:
    """A seed every generator takes (numpy's range; the trainers derive per-step seeds from it)."""
    if not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32 - 1], got {seed!r}")


def check_nonnegative(config: Any, *names: str) -> None:
    """Raises a ValueError naming the first of config's fields names that is not >= 0 (NaN is not)."""
    for name in names:
        value = getattr(config, name)
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")


def check_choice(config: Any, name: str, choices: Sequence[str]) -> None:
    """Raises a ValueError naming config's field name unless its value is one of choices."""
    check_value_choice(name, getattr(config, name), choices)


def clip_and_step(params: Sequence[nn.Parameter], optimizer: torch.optim.Optimizer, max_grad_norm: float) -> float:
    """Clips the gradient norm, steps, zeroes the gradients; returns the norm before clipping (of
    the whole gradient: over FSDP's shards the norm is a replicated DTensor, all-reduced)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


@contextlib.contextmanager
def no_stage(name: str) -> Iterator[None]:
    """The default stage marker of a trainer step (rlops profile replaces it to measure memory)."""
    yield


class Trainer:
    """The loop every trainer shares: resume, steps with periodic evaluation, metrics, checkpoints.

    A subclass sets self.optimizers and implements `step` (one optimisation step, returning its
    metrics), `models` (what a checkpoint holds) and `save_final`; `evaluate` is optional.
    `stage` marks the phases of a step: `with self.stage("backward"): ...`.
    """

    name = "train"

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.procs = Processes(config.device, config.fsdp)
        seed_everything(config.seed + self.procs.rank)
        self.out_dir = None if config.out_dir is None else Path(config.out_dir)
        self.checkpoint = Checkpoint(self.out_dir, self.procs)
        self.step_count = 0
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.stage: Callable[[str], contextlib.AbstractContextManager[None]] = no_stage
        # train_seconds() counts from here; a resumed run moves it back by the checkpoint's time.
        self.clock_start = time.perf_counter()

    def step(self) -> dict[str, float]:
        raise NotImplementedError

    def models(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        return {}

    def save_final(self, directory: Path) -> None:
        raise NotImplementedError

    def batch_rng(self, step: int) -> random.Random:
        """The sampler of step's data: a function of (seed, step, rank), so that a resumed run
        sees the batches the uninterrupted one would."""
        return random.Random(f"{self.config.seed}-{step}-{self.procs.rank}")

    def train(self) -> dict[str, float]:
        """Runs config.steps steps (resuming from out_dir/checkpoint when asked), writes the final
        models, then marks the run finished; returns the last step's metrics. A run killed at any
        moment before the mark, started again, ends as the uninterrupted run does."""
        cfg = self.config
        self.clock_start = time.perf_counter()
        if cfg.resume and self.checkpoint.exists():
            self.step_count, extra = self.checkpoint.load(self.models(), self.optimizers, cfg)
            self.clock_start -= extra.get("train_seconds", 0.0)
        if self.out_dir is not None:
            if self.step_count >= cfg.steps and is_finished(self.out_dir):
                return self.logged_metrics()
            if self.procs.main:  # the outputs are about to change: not finished until written again
                unmark_finished(self.out_dir)
        log = RunLog(self.out_dir, cfg.steps, self.step_count, self.procs.main, self.name, cfg.progress)
        metrics: dict[str, float] = {}
        eval_every = getattr(cfg, "eval_every", 0)
        for model in self.models().values():
            model.train(any(p.requires_grad for p in model.parameters()))
        while self.step_count < cfg.steps:
            metrics = self.step()
            self.step_count += 1
            last = self.step_count == cfg.steps
            if last or (eval_every and self.step_count % eval_every == 0):
                metrics.update(self.evaluate())
            metrics = self.procs.mean(metrics)
            log.log(self.step_count, metrics)
            crash_point("step")
            if last or self.step_count % cfg.save_every == 0:
                self.save()
        log.close()
        self.finish()
        # Started again after the last checkpoint (killed in the final save), no step ran: the
        # last step's metrics are the ones logged.
        return metrics or self.logged_metrics()

    def train_seconds(self) -> float:
        """Wall time of train() so far, over all resumptions up to the checkpoint resumed from (the
        time a killed run spent after its last checkpoint is not counted: those steps run again)."""
        return time.perf_counter() - self.clock_start

    def save(self) -> None:
        """The checkpoint, with the training time so far (every rank: each gives its RNG states, and
        with FSDP writes its shards; rank 0 writes the rest)."""
        if self.out_dir is not None:  # returns on every rank once the checkpoint is complete
            self.checkpoint.save(self.step_count, self.models(), self.optimizers, self.config,
                                 extra={"train_seconds": self.train_seconds()})

    def finish(self) -> None:
        """The final models under out_dir, then the mark that the run is finished, with its
        training time: a run killed before the mark redoes both when started again. Every rank
        calls save_final (a model sharded by FSDP is gathered collectively), rank 0 writes.
        transformers' "Writing model shards" bar follows the progress setting, and like ours
        shows only on a terminal."""
        if self.out_dir is not None:
            with transformers_progress(self.config.progress):
                self.save_final(self.out_dir)
            if self.procs.main:
                mark_finished(self.out_dir, self.step_count, self.train_seconds())
        self.procs.barrier()

    def logged_metrics(self) -> dict[str, float]:
        """The last step's metrics as out_dir/metrics.jsonl holds them ({} without one)."""
        path = None if self.out_dir is None else self.out_dir / "metrics.jsonl"
        records = read_metrics(path) if path is not None and path.is_file() else []
        return {k: v for k, v in records[-1].items() if k not in ("step", "time_s")} if records else {}


# The options of policy_loss that are per-token tensors (B, T), packed with the minibatch.
PER_TOKEN = ("old_logprobs", "ref_logprobs")
# A step's per-sample tensors that the losses of a minibatch read (advantages, old log-probs,
# ...), by name; None where a configuration does without one (no reference model, say).
PerSample = dict[str, Tensor | None]
# (minibatch, its rows of the PerSample) -> the policy's loss, which the loop backpropagates.
PolicyLossFn = Callable[[Rollout, PerSample], PolicyLossOutput]
# (minibatch, its rows) -> metrics, after the policy's backward: a second loss (PPO's critic) that
# backpropagates itself there, once the policy's graph is freed.
AfterBackwardFn = Callable[[Rollout, PerSample], dict[str, float]]


class RLTrainer(Trainer):
    """What GRPO and PPO share: a policy on a task's items, its prompts per step, the frozen
    reference (when kl_coef > 0), no-gradient log-probs, the policy loss and the optimisation
    of a step's samples (`optimise`)."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, task: Task, items: Sequence[Any], config: Any,
                 eval_items: Sequence[Any] = ()) -> None:
        if not items:
            raise ValueError("items must hold at least one training item")
        super().__init__(config)
        self.tokenizer, self.task, self.items, self.eval_items = tokenizer, task, list(items), list(eval_items)
        self.model = model.to(self.procs.device)
        self.reference = None
        if config.kl_coef > 0:  # frozen; with fsdp sharded at once (DDP leaves it whole), so one copy is whole
            self.reference = self.procs.shard(copy.deepcopy(self.model).eval().requires_grad_(False))
        if config.packing:  # before anything trains on a layout the model would get wrong
            check_packing(self.model, "policy")
        if config.gradient_checkpointing:
            enable_checkpointing(self.model)
        # With fsdp the policy is sharded in place here: whatever copies it (the reference above, PPO's
        # critic's decoder) is copied before.
        self.policy = self.procs.wrap(PolicyForward(self.model, logits=config.loss_impl != "fused-linear"),
                                      root=self.model)

    def prompts(self, step: int) -> list[Any]:
        rng = self.batch_rng(step)
        return [self.items[rng.randrange(len(self.items))] for _ in range(self.config.prompts_per_step)]

    def rollout(self, items: Sequence[Any]) -> Rollout:
        with self.stage("generation"):
            return sample(self.model, self.tokenizer, [self.task.prompt(x) for x in items],
                          max_new_tokens=self.config.max_new_tokens, temperature=self.config.temperature)

    @torch.no_grad()
    def logprobs(self, model: nn.Module, rollout: Rollout) -> Tensor:
        """Per-token log-probs (B, T) of the completions under model, no gradient, by loss_impl."""
        if not self.config.packing:
            forward = PolicyForward(model, logits=self.config.loss_impl != "fused-linear")
            out = self._token_logprobs(forward(rollout.input_ids, rollout.attention_mask,
                                               rollout.completion_ids.shape[1]), rollout.completion_ids)
        else:
            out = self.packed_pass(rollout, lambda p: self._token_logprobs(self._packed_forward(model, p),
                                                                           p.completion_ids))
        if model is self.reference:  # frozen: with FSDP, nothing of it stays gathered until the next step
            self.procs.release(model)
        return out

    def _packed_forward(self, model: nn.Module, packed: PackedRollout) -> tuple[Tensor | None, ...]:
        """PolicyForward's outputs (1, R, ...) for the completions of a packed rollout under model."""
        forward = PolicyForward(model, logits=self.config.loss_impl != "fused-linear")
        return forward(packed.input_ids, None, packed.scored, packed.positions)

    def _token_logprobs(self, outs: tuple[Tensor | None, ...], tokens: Tensor) -> Tensor:
        """Log-probs of tokens (B, T) or (1, R) from PolicyForward's outputs, by loss_impl."""
        impl, temperature, backend = self.config.loss_impl, self.config.temperature, self.config.backend
        if impl == "fused-linear":
            return linear_token_logprobs_and_entropy(outs[0], outs[1], tokens, bias=outs[2], temperature=temperature,
                                                     backend=backend)[0]
        if impl == "fused":
            return token_logprobs(outs[0], tokens, temperature, backend=backend)
        return baselines.trl_selective_log_softmax(outs[0] / temperature, tokens).float()

    def packed_pass(self, rollout: Rollout, fn: Callable[[PackedRollout], Tensor]) -> Tensor:
        """fn's per-token values (1, R) on the packed layout, as (B, T) (0 at the padding). The rows are
        packed a minibatch's worth at a time: sdpa and eager attend through an (N, N) mask, so no pass
        is wider than the training forward."""
        parts = [PackedRollout.of(rollout.select(torch.arange(rows.start, rows.stop, device=self.procs.device)))
                 for rows in row_chunks(rollout.completion_ids.shape[0], self.config.minibatches)]
        return torch.cat([p.unpack(fn(p)) for p in parts])

    def policy_loss(self, batch: Rollout, advantages: Tensor, **options: Any) -> PolicyLossOutput:
        """The policy's forward on batch and its loss by loss_impl (options as rlops.policy_loss; the
        per-token tensors (B, T) of the padded layout, advantages (B, T) or (B,))."""
        cfg = self.config
        tokens = batch.completion_ids
        if cfg.packing:
            packed = PackedRollout.of(batch)
            with self.stage("policy_forward"):
                outs = self.policy(packed.input_ids, None, packed.scored, packed.positions)
            # The per-token inputs travel padded with the step's samples; the loss reads the packed layout,
            # each completion a sequence (cu_seqlens), with the padded layout's T for seq-mean-token-sum-norm.
            tokens = packed.completion_ids
            advantages = packed.pack(advantages) if advantages.dim() == 2 else advantages
            options = {"cu_seqlens": packed.cu_seqlens, "norm_len": packed.width,
                       **{k: packed.pack(v) if k in PER_TOKEN and v is not None else v for k, v in options.items()}}
        else:
            with self.stage("policy_forward"):
                outs = self.policy(batch.input_ids, batch.attention_mask, tokens.shape[1])
            options = {"mask": batch.completion_mask.bool(), **options}
        options = {"temperature": cfg.temperature, "clip_low": cfg.clip_low, "clip_high": cfg.clip_high,
                   "entropy_coef": cfg.entropy_coef, **options}
        with self.stage("loss"):
            if cfg.loss_impl == "fused-linear":
                return linear_policy_loss(outs[0], outs[1], tokens, advantages, bias=outs[2], backend=cfg.backend,
                                          **options)
            if cfg.loss_impl == "fused":
                return policy_loss(outs[0], tokens, advantages, backend=cfg.backend, **options)
            return baselines.eager_policy_loss_output(outs[0], tokens, advantages, **options)

    def optimise(self, rollout: Rollout, per_sample: PerSample, loss_fn: PolicyLossFn, *,
                 after_backward: AfterBackwardFn | None = None, kl_metric: bool = False) -> dict[str, float]:
        """config.epochs passes over config.minibatches shuffled minibatches of rollout, each one
        step of every optimizer; returns the minibatches' metrics averaged.

        Per minibatch: loss_fn's policy loss is backpropagated, after_backward runs (when given),
        then each optimizer's parameters are clipped and stepped. The metrics are the loss,
        after_backward's, the entropy, the clip fraction, the first optimizer's gradient norm, and
        the loss's KL when kl_metric.
        """
        cfg = self.config
        # A function of (seed, step), so that a resumed run shuffles as the uninterrupted one does.
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step_count)
        totals: dict[str, float] = {}
        for _ in range(cfg.epochs):
            for rows in minibatches(rollout.completion_ids.shape[0], cfg.minibatches, generator):
                r = rows.to(self.procs.device)
                batch_rows = {k: None if v is None else v[r] for k, v in per_sample.items()}
                metrics = self._update(rollout.select(r), batch_rows, loss_fn, after_backward, kl_metric)
                for k, v in metrics.items():
                    totals[k] = totals.get(k, 0.0) + v / (cfg.epochs * cfg.minibatches)
        return totals

    def _update(self, batch: Rollout, rows: PerSample, loss_fn: PolicyLossFn, after_backward: AfterBackwardFn | None,
                kl_metric: bool) -> dict[str, float]:
        """One step of every optimizer on a minibatch (see `optimise`)."""
        out = loss_fn(batch, rows)
        with self.stage("backward"):
            out.loss.backward()
        extra = {} if after_backward is None else after_backward(batch, rows)
        with self.stage("optimizer"):
            # Each optimizer's gradients are clipped over the parameters it steps (the policy's, the critic's).
            norms = [clip_and_step([p for g in o.param_groups for p in g["params"]], o, self.config.max_grad_norm)
                     for o in self.optimizers.values()]
        m = out.metrics
        metrics = {"loss": out.loss.item(), **extra, "entropy": m["entropy_mean"], "clip_frac": m["clip_frac"],
                   "grad_norm": norms[0]}
        if kl_metric:
            metrics["kl"] = m["kl_mean"]
        return metrics

    def evaluate(self) -> dict[str, float]:
        if not self.eval_items:
            return {}
        return evaluate(self.model, self.tokenizer, self.task, self.eval_items,
                        max_new_tokens=self.config.max_new_tokens)

    def models(self) -> dict[str, nn.Module]:
        models = {"model": self.model}
        if self.reference is not None:
            models["reference"] = self.reference
        return models

    def save_final(self, directory: Path) -> None:
        save_model(self.model, self.tokenizer, directory / "model")

