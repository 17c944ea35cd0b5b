"""DeepSeek-R1's recipe in miniature, on the built-in arithmetic task, on any machine:

1. cold-start SFT of a small Llama-style model on a few hundred demonstrations;
2. GRPO with the rule rewards (format and correctness) on the other training prompts;
3. rejection sampling: several samples per training prompt from the GRPO policy, the
   correct ones kept, and SFT on them;
4. evaluation of each stage's model on held-out prompts (greedy decoding).

Each stage writes its metrics, plot, checkpoint and model under DIR/<stage>/; a finished
stage (marked by DIR/<stage>/finished.json, written after its model) is skipped when the run is
started again, and an interrupted one resumes from its checkpoint. DIR/summary.json, written
last and atomically, holds the held-out accuracy after each stage and each stage's training time
(recorded in its finished.json, so a stage loaded from an earlier run reports it too).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from . import arithmetic, atomic
from .base import check_positive, check_seed
from .checkpoint import finished_info, is_finished, load_pretrained
from .grpo import GRPOConfig, GRPOTrainer
from .processes import Processes, is_sharded, seed_everything
from .rollout import Task, evaluate, sample
from .runlog import plot_metrics, read_metrics
from .sft import SFTConfig, SFTTrainer

TASK: Task[arithmetic.Problem] = Task(prompt=lambda p: p.prompt, reward=arithmetic.reward,
                                      correct=arithmetic.correctness)
STAGES = ("sft", "grpo", "rejection_sft")


@dataclass
class R1ToyConfig:
    out_dir: str = "runs/r1-toy"
    seed: int = 0
    device: str | None = None
    demos: int = 200  # cold-start demonstrations
    heldout: int = 500  # held-out problems for evaluation
    hidden_size: int = 128
    layers: int = 3
    sft_steps: int = 300
    grpo_steps: int = 300
    grpo_lr: float = 2e-4
    rs_prompts: int = 1000  # training prompts sampled for rejection sampling
    rs_samples: int = 4  # samples per prompt; the correct ones are kept
    rs_steps: int = 100
    rs_lr: float = 1e-4
    max_new_tokens: int = 32
    progress: bool = True
    resume: bool = True

    def __post_init__(self) -> None:
        for name in ("demos", "heldout", "hidden_size", "layers", "sft_steps", "grpo_steps", "rs_prompts",
                     "rs_samples", "rs_steps", "max_new_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        check_positive(self, "grpo_lr", "rs_lr")
        check_seed(self.seed)
        arithmetic.check_split(self.heldout, self.demos)


def _load(directory: Path, device: torch.device, progress: bool) -> torch.nn.Module:
    return load_pretrained(directory, device, progress)[0]


def cold_start(out: Path, demos: list[arithmetic.Problem], heldout: list[arithmetic.Problem], config: SFTConfig,
               hidden_size: int = 128, layers: int = 3) -> torch.nn.Module:
    """A fresh small model after SFT on demos' solutions, trained into out (or loaded from out/model
    when that stage has finished). With config.fsdp under torchrun the SFT shards the model in
    place; the saved model/ (the same weights, gathered) is returned instead, whole, for the next
    trainer to copy and shard."""
    from transformers import LlamaForCausalLM

    procs = Processes(config.device)
    if is_finished(out):
        return _load(out / "model", procs.device, config.progress)
    seed_everything(config.seed)
    tokenizer = arithmetic.CharTokenizer()
    model = LlamaForCausalLM(arithmetic.tiny_model_config(tokenizer, hidden_size, layers))
    SFTTrainer(model, tokenizer, [(p.prompt, p.solution) for p in demos], replace(config, out_dir=str(out)), TASK,
               heldout).train()
    return _load(out / "model", procs.device, config.progress) if is_sharded(model) else model


def rejection_samples(model: torch.nn.Module, tokenizer: arithmetic.CharTokenizer, problems: list[Any], samples: int,
                      max_new_tokens: int, batch_size: int = 512) -> tuple[list[tuple[str, str]], float]:
    """(prompt, response) for one correct sample per problem that has one, and the fraction of
    samples that were correct."""
    kept: dict[Any, tuple[str, str]] = {}
    correct = 0
    items = [p for p in problems for _ in range(samples)]
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        rollout = sample(model, tokenizer, [TASK.prompt(p) for p in chunk], max_new_tokens=max_new_tokens)
        for text, p in zip(rollout.texts, chunk, strict=True):
            if TASK.correct(text, p):
                correct += 1
                kept.setdefault(p, (TASK.prompt(p), text))
    return list(kept.values()), correct / max(len(items), 1)


def run(config: R1ToyConfig) -> dict[str, Any]:
    """Runs (or resumes) the pipeline; returns the summary written to out_dir/summary.json:
    held-out accuracy, reward and response length after each stage, each stage's training time
    ("seconds", also for a stage loaded from an earlier run) and its evaluation time ("eval_seconds")."""
    out = Path(config.out_dir)
    procs = Processes(config.device)
    tokenizer = arithmetic.CharTokenizer()
    train, heldout = arithmetic.split_problems(config.heldout, seed=config.seed)
    demos, rl_items = train[:config.demos], train[config.demos:]
    summary: dict[str, Any] = {"accuracy": {}, "reward": {}, "response_length": {}, "seconds": {},
                               "eval_seconds": {}, "device": str(procs.device), "config": asdict(config)}

    def finish(stage: str, model: torch.nn.Module, train_seconds: float | None) -> None:
        started = time.perf_counter()
        scores = evaluate(model, tokenizer, TASK, heldout, max_new_tokens=config.max_new_tokens)
        summary["accuracy"][stage] = scores["eval_accuracy"]
        summary["reward"][stage] = scores["eval_reward"]
        summary["response_length"][stage] = scores["eval_response_length"]
        summary["seconds"][stage] = train_seconds
        summary["eval_seconds"][stage] = round(time.perf_counter() - started, 1)
        if procs.main:
            print(f"{stage}: held-out accuracy {scores['eval_accuracy']:.3f} ({len(heldout)} problems)", flush=True)

    model = cold_start(out / "sft", demos, heldout, SFTConfig(steps=config.sft_steps,
                                                              max_new_tokens=config.max_new_tokens, **_common(config)),
                       config.hidden_size, config.layers)
    finish("sft", model, _stage_seconds(out / "sft"))

    if is_finished(out / "grpo"):
        model = _load(out / "grpo" / "model", procs.device, config.progress)
    else:
        grpo = GRPOConfig(out_dir=str(out / "grpo"), steps=config.grpo_steps, lr=config.grpo_lr,
                          max_new_tokens=config.max_new_tokens, **_common(config))
        GRPOTrainer(model, tokenizer, TASK, rl_items, grpo, heldout).train()
    finish("grpo", model, _stage_seconds(out / "grpo"))

    model, summary["rejection_sampling"] = rejection_stage(out / "rejection_sft", model, rl_items, heldout, config)
    finish("rejection_sft", model, _stage_seconds(out / "rejection_sft", summary["rejection_sampling"].get("seconds")))

    if procs.main:
        _combined_metrics(out)
        atomic.write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    procs.barrier()
    return summary


def _common(config: R1ToyConfig) -> dict[str, Any]:
    """The stage trainers' config fields that the pipeline's config sets."""
    return {"seed": config.seed, "device": config.device, "progress": config.progress, "resume": config.resume}


def _stage_seconds(out: Path, before: float | None = 0.0) -> float | None:
    """A stage's training time: what its trainer recorded in out/finished.json (over all its
    resumptions; 0 when no trainer ran), plus before (the stage's work ahead of its trainer:
    rejection sampling). None when unknown: a stage finished by an older rlops recorded no time."""
    info = finished_info(out)
    trained = info.get("train_seconds", None if info else 0.0)
    return None if trained is None or before is None else round(before + trained, 1)


def rejection_stage(out: Path, model: torch.nn.Module, rl_items: list[arithmetic.Problem],
                    heldout: list[arithmetic.Problem], config: R1ToyConfig) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rejection sampling from model and SFT on the correct samples, into out (or the model loaded
    from out when the stage has finished); returns the model and the sampling's statistics (its
    "seconds": the sampling's time, which the stage's training time includes)."""
    procs = Processes(config.device)
    stats_path = out / "rejection_sampling.json"
    if is_finished(out):
        return _load(out / "model", procs.device, config.progress), json.loads(stats_path.read_text())
    started = time.perf_counter()
    # Seeded: a run started again after a kill samples what the uninterrupted one did.
    seed_everything(config.seed)
    rng = torch.Generator().manual_seed(config.seed)
    chosen = [rl_items[i] for i in torch.randperm(len(rl_items), generator=rng)[:config.rs_prompts].tolist()]
    tokenizer = arithmetic.CharTokenizer()
    examples, rate = rejection_samples(model, tokenizer, chosen, config.rs_samples, config.max_new_tokens)
    stats = {"prompts": len(chosen), "samples_correct": rate, "kept": len(examples),
             "seconds": round(time.perf_counter() - started, 1)}
    if procs.main:
        atomic.write_text(stats_path, json.dumps(stats) + "\n")
    if examples:
        rs = SFTConfig(out_dir=str(out), steps=config.rs_steps, lr=config.rs_lr, max_new_tokens=config.max_new_tokens,
                       **_common(config))
        SFTTrainer(model, tokenizer, examples, rs, TASK, heldout).train()
    elif procs.main:
        print("rejection sampling kept no correct sample (train longer): no fine-tuning on it; the GRPO model "
              "is evaluated as is", file=sys.stderr, flush=True)
    return model, stats


def _combined_metrics(out: Path) -> None:
    """out/metrics.jsonl and metrics.png: the stages' metrics one after another, numbered on."""
    lines, offset = [], 0
    for stage in STAGES:
        path = out / stage / "metrics.jsonl"
        if not path.exists():
            continue
        records = read_metrics(path)
        lines += [json.dumps({**r, "stage": stage, "step": r["step"] + offset}) for r in records]
        offset += max((r["step"] for r in records), default=0)
    atomic.write_text(out / "metrics.jsonl", "".join(line + "\n" for line in lines))
    plot_metrics(out / "metrics.jsonl", out / "metrics.png")
