"""The trainers' skeleton: the config fields they share, the step loop every trainer runs
(resume, steps, periodic evaluation, metrics, checkpoints), and what GRPO and PPO share on top
of it: the policy and its frozen reference, no-gradient log-probs, the policy loss by loss_impl,
and the one epochs x minibatches optimisation of a step's samples (`RLTrainer.optimise`).
"""

from __future__ import annotations

import contextlib
import copy
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import baselines
from ..ops.linear_policy_loss import linear_policy_loss, linear_token_logprobs_and_entropy
from ..ops.policy_loss import PolicyLossOutput, policy_loss
from ..ops.token_stats import token_logprobs
from .checkpoint import Checkpoint, save_model
from .processes import Processes, seed_everything
from .rollout import PolicyForward, Rollout, Task, Tokenizer, enable_checkpointing, evaluate, minibatches, sample
from .runlog import RunLog


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

    def __post_init__(self) -> None:
        for name in ("steps", "save_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


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
    eval_every: int = 50  # steps between held-out evaluations (and at the end)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "prompts_per_step", "max_new_tokens", "temperature", "epochs", "minibatches")
        if self.loss_impl not in LOSS_IMPLS:
            raise ValueError(f"loss_impl must be one of {LOSS_IMPLS}, got {self.loss_impl!r}")


def check_positive(config: Any, *names: str) -> None:
    """Raises a ValueError naming the first of config's fields names that is not > 0."""
    for name in names:
        value = getattr(config, name)
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")


def clip_and_step(params: Sequence[nn.Parameter], optimizer: torch.optim.Optimizer, max_grad_norm: float) -> float:
    """Clips the gradient norm, steps, zeroes the gradients; returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


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
        self.procs = Processes(config.device)
        seed_everything(config.seed + self.procs.rank)
        self.out_dir = None if config.out_dir is None else Path(config.out_dir)
        self.checkpoint = Checkpoint(self.out_dir)
        self.step_count = 0
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.stage: Callable[[str], contextlib.AbstractContextManager[None]] = no_stage

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
        """Runs config.steps steps (resuming from out_dir/checkpoint when asked); returns the last metrics."""
        cfg = self.config
        if cfg.resume and self.checkpoint.exists():
            self.step_count, _ = self.checkpoint.load(self.models(), self.optimizers, cfg)
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
            if last or self.step_count % cfg.save_every == 0:
                self.save()
        log.close()
        return metrics

    def save(self) -> None:
        """The checkpoint, and after the last step the final models under out_dir (rank 0)."""
        if self.procs.main and self.out_dir is not None:
            self.checkpoint.save(self.step_count, self.models(), self.optimizers, self.config)
            if self.step_count == self.config.steps:
                self.save_final(self.out_dir)
        self.procs.barrier()


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
        if config.kl_coef > 0:
            self.reference = copy.deepcopy(self.model).eval().requires_grad_(False)
        if config.gradient_checkpointing:
            enable_checkpointing(self.model)
        self.policy = self.procs.wrap(PolicyForward(self.model, logits=config.loss_impl != "fused-linear"))

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
        impl, temperature, tokens = self.config.loss_impl, self.config.temperature, rollout.completion_ids
        outs = PolicyForward(model, logits=impl != "fused-linear")(rollout.input_ids, rollout.attention_mask,
                                                                   tokens.shape[1])
        backend = self.config.backend
        if impl == "fused-linear":
            return linear_token_logprobs_and_entropy(outs[0], outs[1], tokens, bias=outs[2], temperature=temperature,
                                                     backend=backend)[0]
        if impl == "fused":
            return token_logprobs(outs[0], tokens, temperature, backend=backend)
        return baselines.trl_selective_log_softmax(outs[0] / temperature, tokens).float()

    def policy_loss(self, batch: Rollout, advantages: Tensor, **options: Any) -> PolicyLossOutput:
        """The policy's forward on batch and its loss by loss_impl (options as rlops.policy_loss)."""
        cfg = self.config
        with self.stage("policy_forward"):
            outs = self.policy(batch.input_ids, batch.attention_mask, batch.completion_ids.shape[1])
        options = {"mask": batch.completion_mask.bool(), "temperature": cfg.temperature, "clip_low": cfg.clip_low,
                   "clip_high": cfg.clip_high, "entropy_coef": cfg.entropy_coef, **options}
        with self.stage("loss"):
            if cfg.loss_impl == "fused-linear":
                return linear_policy_loss(outs[0], outs[1], batch.completion_ids, advantages, bias=outs[2],
                                          backend=cfg.backend, **options)
            if cfg.loss_impl == "fused":
                return policy_loss(outs[0], batch.completion_ids, advantages, backend=cfg.backend, **options)
            return baselines.eager_policy_loss_output(outs[0], batch.completion_ids, advantages, **options)

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

