"""What every trainer shares: config fields, device and processes, sampling, checkpoints, logs.

The trainers run in one process or under `torchrun` (DistributedDataParallel; gloo on CPU,
nccl on CUDA) with the same code: each rank samples its own prompts, gradients are averaged
by DDP, metrics are averaged across ranks, and rank 0 writes the files.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import baselines, hf
from ..ops.linear_policy_loss import linear_policy_loss, linear_token_logprobs_and_entropy
from ..ops.policy_loss import PolicyLossOutput, policy_loss
from ..ops.token_stats import token_logprobs

Item = TypeVar("Item")


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer the trainers use (CharTokenizer implements it too)."""

    pad_token_id: int | None
    eos_token_id: int | None
    bos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: Any, skip_special_tokens: bool = ...) -> str: ...

    def save_pretrained(self, directory: str | Path) -> Any: ...


@dataclass(frozen=True)
class Task(Generic[Item]):
    """A verifiable task: the prompt of an item, the reward of a response to it, and whether the
    response is correct (the accuracy that evaluation reports)."""

    prompt: Callable[[Item], str]
    reward: Callable[[str, Item], float]
    correct: Callable[[str, Item], float]


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
    for name in names:
        value = getattr(config, name)
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")


class Processes:
    """This process's place in a torchrun job (or a job of one) and its device."""

    def __init__(self, device: str | None = None) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device is None:
            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, module: nn.Module) -> nn.Module:
        """DDP around module when there are several processes."""
        if self.world == 1:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Each metric averaged over the processes."""
        if self.world == 1 or not values:
            return values
        t = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return dict(zip(values, (t / self.world).tolist(), strict=True))

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


class PolicyForward(nn.Module):
    """A causal LM whose forward returns what a policy loss reads for the completion: (hidden,
    weight, bias) for rlops' fused-linear ops, or (logits,). This is what DDP wraps, so the
    decoder's and the head's gradients are averaged across processes."""

    def __init__(self, model: nn.Module, logits: bool = False) -> None:
        super().__init__()
        self.model, self.logits = model, logits

    def forward(self, input_ids: Tensor, attention_mask: Tensor, completion_len: int) -> tuple[Tensor | None, ...]:
        positions = position_ids(attention_mask)
        if self.logits:
            # Without the last token no logits need slicing off (whose backward would copy all of them).
            out = self.model(input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1],
                             position_ids=positions[:, :-1], logits_to_keep=completion_len, use_cache=False)
            return (out.logits,)
        inputs = hf.lm_head_inputs(self.model, input_ids, attention_mask, logits_to_keep=completion_len,
                                   position_ids=positions, use_cache=False)
        return inputs.hidden, inputs.weight, inputs.bias


def enable_checkpointing(model: nn.Module) -> None:
    """Hugging Face gradient checkpointing of each decoder layer (non-reentrant)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name is deprecated
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions counted over the attended tokens, as generate() numbers left-padded prompts."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class Rollout:
    """Sampled completions: prompt (B, P) left-padded, completion (B, T) right-padded; masks 1 on
    real tokens (a completion's mask covers its end-of-sequence token)."""

    prompt_ids: Tensor
    prompt_mask: Tensor
    completion_ids: Tensor
    completion_mask: Tensor
    texts: list[str]

    @property
    def input_ids(self) -> Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    def select(self, rows: Tensor) -> Rollout:
        return Rollout(self.prompt_ids[rows], self.prompt_mask[rows], self.completion_ids[rows],
                       self.completion_mask[rows], [self.texts[i] for i in rows.tolist()])


def encode_left_padded(tokenizer: Tokenizer, texts: Sequence[str], device: torch.device) -> tuple[Tensor, Tensor]:
    """(ids, mask) of texts, each after a BOS token where the tokenizer has one, left-padded."""
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    rows = [bos + tokenizer.encode(t, add_special_tokens=False) for t in texts]
    width = max(len(r) for r in rows)
    pad = pad_id(tokenizer)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


def pad_id(tokenizer: Tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer needs a pad or an end-of-sequence token")
    return tokenizer.eos_token_id


def completion_mask(ids: Tensor, eos_id: int | None) -> Tensor:
    """1 up to and including each row's first end-of-sequence token (all of a row without one)."""
    if eos_id is None:
        return torch.ones_like(ids)
    is_eos = ids == eos_id
    after = (is_eos.cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    return (~after).long()


@torch.no_grad()
def sample(model: nn.Module, tokenizer: Tokenizer, prompts: Sequence[str], *, max_new_tokens: int,
           temperature: float = 1.0, greedy: bool = False) -> Rollout:
    """Completions of prompts by model.generate (sampling at temperature, or greedy)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = encode_left_padded(tokenizer, prompts, device)
    kwargs = {"do_sample": False} if greedy else {"do_sample": True, "temperature": temperature, "top_k": 0,
                                                  "top_p": 1.0}
    out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=max_new_tokens,
                         pad_token_id=pad_id(tokenizer), eos_token_id=tokenizer.eos_token_id, **kwargs)
    model.train(was_training)
    completion = out[:, prompt_ids.shape[1]:]
    if completion.shape[1] == 0:
        completion = torch.full((len(prompts), 1), pad_id(tokenizer), device=device)
    mask = completion_mask(completion, tokenizer.eos_token_id)
    completion = completion.masked_fill(mask == 0, pad_id(tokenizer))
    texts = [tokenizer.decode(row[m.bool()], skip_special_tokens=True) for row, m in zip(completion, mask,
                                                                                          strict=True)]
    return Rollout(prompt_ids, prompt_mask, completion, mask, texts)


def minibatches(n: int, count: int, generator: torch.Generator) -> Iterator[Tensor]:
    """count shuffled index sets covering range(n)."""
    order = torch.randperm(n, generator=generator)
    size = math.ceil(n / count)
    for start in range(0, n, size):
        yield order[start:start + size]


class RunLog:
    """Metrics of a run: one JSON line per step in out_dir/metrics.jsonl, a plot in
    out_dir/metrics.png, and a progress bar. Only rank 0 writes."""

    PLOTTED = ("reward", "accuracy", "eval_accuracy", "kl", "entropy", "response_length", "loss", "value_loss",
               "pairwise_accuracy", "eval_pairwise_accuracy")

    def __init__(self, out_dir: Path | None, total: int, start: int, enabled: bool, desc: str,
                 progress: bool = True) -> None:
        self.path = None if out_dir is None or not enabled else out_dir / "metrics.jsonl"
        self.enabled = enabled
        self.bar = None
        if enabled and progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if start == 0 and self.path.exists():
                self.path.unlink()
            else:
                self._truncate(start)
        self.started = time.perf_counter()

    def _truncate(self, start: int) -> None:
        """Drops lines past the step being resumed from (a run that went on after its checkpoint)."""
        if self.path is None or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if json.loads(line).get("step", 0) <= start]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: round(v, 6) for k, v in metrics.items()},
                  "time_s": round(time.perf_counter() - self.started, 3)}
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if self.bar is not None:
            self.bar.update(1)
            shown = {k: f"{metrics[k]:.3g}" for k in ("loss", "reward", "accuracy", "eval_accuracy", "kl")
                     if k in metrics}
            self.bar.set_postfix(shown, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.path is not None and self.path.exists():
            plot_metrics(self.path, self.path.with_suffix(".png"))


def read_metrics(path: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(jsonl: Path, png: Path) -> bool:
    """One panel per metric of RunLog.PLOTTED present in the JSONL, against step."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    records = read_metrics(jsonl)
    keys = [k for k in RunLog.PLOTTED if any(k in r for r in records)]
    if not keys:
        return False
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, squeeze=False, figsize=(4.5 * cols, 3.2 * rows))
    for ax, key in zip(axes.flat, keys, strict=False):
        points = [(r["step"], r[key]) for r in records if key in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 50 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(jsonl.parent.name)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return True


class Checkpoint:
    """out_dir/checkpoint/state.pt: models, optimizers, RNG states and the step, written
    atomically; `load` restores them so the next step is the one the uninterrupted run takes."""

    def __init__(self, out_dir: Path | None) -> None:
        self.path = None if out_dir is None else out_dir / "checkpoint" / "state.pt"

    def exists(self) -> bool:
        return self.path is not None and self.path.exists()

    def save(self, step: int, models: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
             config: Any, extra: dict[str, Any] | None = None) -> None:
        if self.path is None:
            return
        state = {
            "step": step,
            "models": {k: m.state_dict() for k, m in models.items()},
            "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
            "rng": {"python": random.getstate(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "config": asdict(config),
            "extra": extra or {},
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)

    def load(self, models: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
             config: Any) -> tuple[int, dict[str, Any]]:
        """Restores everything; returns (step, extra). Refuses a checkpoint of another config."""
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        saved, now = state["config"], asdict(config)
        changed = sorted(k for k in now if k not in _RUN_ONLY and saved.get(k) != now[k])
        if changed:
            raise ValueError(f"{self.path} was written with a different config ({', '.join(changed)}); use a new "
                             "out_dir or resume=False")
        for k, m in models.items():
            m.load_state_dict(state["models"][k])
        for k, o in optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        random.setstate(state["rng"]["python"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        return state["step"], state["extra"]


# Config fields that may change between a run and its resumption.
_RUN_ONLY = {"out_dir", "steps", "device", "save_every", "resume", "progress"}


def save_model(model: nn.Module, tokenizer: Tokenizer, directory: Path) -> None:
    """model.save_pretrained + tokenizer.save_pretrained into directory."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def config_from_dict(cls: type, values: dict[str, Any]) -> Any:
    """cls(**values) for the fields cls has; unknown names raise a ValueError naming them."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {unknown}; fields: {sorted(names)}")
    return cls(**values)


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


class RLTrainer(Trainer):
    """What GRPO and PPO share: a policy on a task's items, its prompts per step, the frozen
    reference (when kl_coef > 0) and no-gradient log-probs."""

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


def encode_pairs(tokenizer: Tokenizer, prompts: Sequence[str], responses: Sequence[str],
                 device: torch.device) -> Rollout:
    """Prompts (left-padded, after BOS) with given responses (each ending in EOS, right-padded)."""
    prompt_ids, prompt_mask = encode_left_padded(tokenizer, prompts, device)
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    rows = [tokenizer.encode(r, add_special_tokens=False) + eos for r in responses]
    width = max(len(r) for r in rows)
    pad = pad_id(tokenizer)
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    return Rollout(prompt_ids, prompt_mask, ids, mask, list(responses))


@torch.no_grad()
def evaluate(model: nn.Module, tokenizer: Tokenizer, task: Task, items: Sequence[Any], *, max_new_tokens: int,
             batch_size: int = 256) -> dict[str, float]:
    """Greedy responses to items: eval_accuracy, eval_reward and eval_response_length (tokens)."""
    correct = rewards = length = 0.0
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        rollout = sample(model, tokenizer, [task.prompt(x) for x in chunk], max_new_tokens=max_new_tokens,
                         greedy=True)
        for text, item in zip(rollout.texts, chunk, strict=True):
            correct += task.correct(text, item)
            rewards += task.reward(text, item)
        length += float(rollout.completion_mask.sum())
    n = max(len(items), 1)
    return {"eval_accuracy": correct / n, "eval_reward": rewards / n, "eval_response_length": length / n}


def load_pretrained(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, Tokenizer]:
    """(model, tokenizer) from a directory rlops saved (the character tokenizer) or any Hugging
    Face causal LM name or directory (its own tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .arithmetic import CharTokenizer

    if (Path(path) / "char_tokenizer.json").is_file():
        tokenizer: Tokenizer = CharTokenizer.from_pretrained(path)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path).to(device), tokenizer
