"""The trainers: the arithmetic task, the R1 pipeline shortened (GRPO must raise the reward), PPO,
the reward model's accuracy, resuming, DDP under torchrun, and the `rlops train` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import free_port
from trainer_fixtures import SEVENS, sft_examples, small_model

from rlops.trainers import (
    GRPOConfig,
    GRPOTrainer,
    PPOConfig,
    PPOTrainer,
    R1ToyConfig,
    RewardConfig,
    RewardTrainer,
    SFTConfig,
    SFTTrainer,
    ValueModel,
    arithmetic,
)
from rlops.trainers.base import LOSS_IMPLS, clip_and_step
from rlops.trainers.checkpoint import load_pretrained
from rlops.trainers.r1_toy import TASK, run
from rlops.trainers.rollout import completion_mask, encode_pairs
from rlops.trainers.runlog import read_metrics

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------
# The task
# ------------------------------------------------------------------------------------------


def test_arithmetic_task() -> None:
    tok = arithmetic.CharTokenizer()
    p = arithmetic.Problem(47, 38)
    assert p.solution == "<think>7+8=15 4+3+1=8</think><answer>85</answer>"
    assert arithmetic.Problem(99, 99).solution.endswith("<answer>198</answer>")
    ids = tok.encode(p.prompt + p.solution)
    assert tok.decode(ids) == p.prompt + p.solution
    assert ids.count(tok.encode("<think>")[0]) == 1 and len(tok.encode("<think>")) == 1  # tags are single tokens
    assert arithmetic.reward(p.solution, p) == pytest.approx(1.1)
    assert arithmetic.reward(p.solution.replace("85", "86"), p) == pytest.approx(0.1)
    assert arithmetic.reward("<answer>85</answer>", p) == 0.0  # no think: no format, no credit
    assert arithmetic.correctness(" " + p.solution + " ", p) == 1.0
    train, heldout = arithmetic.split_problems(500, seed=0)
    assert len(train) + len(heldout) == 100 * 100 and not set(train) & set(heldout)
    pairs = arithmetic.preference_pairs(train[:300], seed=0)
    for (prompt, chosen, rejected), q in zip(pairs, train, strict=False):
        assert prompt == q.prompt and arithmetic.correctness(chosen, q) == 1.0
        assert arithmetic.correctness(rejected, q) == 0.0
    with pytest.raises(ValueError, match="alphabet"):
        tok.encode("a+b=")


def test_completion_mask_and_pairs() -> None:
    ids = torch.tensor([[5, 6, 2, 0, 0], [5, 2, 2, 2, 0], [5, 6, 7, 8, 9]])
    assert completion_mask(ids, 2).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    tok = arithmetic.CharTokenizer()
    enc = encode_pairs(tok, ["1+2=", "10+20="], ["3", "30"], torch.device("cpu"))
    assert enc.prompt_mask.tolist() == [[0, 0, 1, 1, 1, 1, 1], [1] * 7]  # BOS + prompt, left-padded
    assert enc.completion_ids[0].tolist() == [*tok.encode("3"), tok.eos_token_id, tok.pad_token_id]


# ------------------------------------------------------------------------------------------
# Learning: the shortened R1 pipeline, PPO, the reward model
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def r1_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("r1")
    run(R1ToyConfig(out_dir=str(out), heldout=300, sft_steps=300, grpo_steps=100, rs_prompts=200, rs_steps=20,
                    progress=False))
    return out


def test_shortened_r1_pipeline_grpo_raises_reward(r1_run: Path) -> None:
    summary = json.loads((r1_run / "summary.json").read_text())
    acc = summary["accuracy"]
    assert set(acc) == {"sft", "grpo", "rejection_sft"}
    assert acc["grpo"] >= acc["sft"] + 0.05, acc  # held-out, greedy
    grpo = read_metrics(r1_run / "grpo" / "metrics.jsonl")
    first, last = grpo[:25], grpo[-25:]
    assert sum(r["reward"] for r in last) / 25 > sum(r["reward"] for r in first) / 25 + 0.05
    for stage in ("sft", "grpo", "rejection_sft"):
        assert (r1_run / stage / "model" / "config.json").is_file()
        assert (r1_run / stage / "metrics.png").stat().st_size > 0
    combined = read_metrics(r1_run / "metrics.jsonl")
    assert [r["step"] for r in combined] == list(range(1, 300 + 100 + 20 + 1))
    assert summary["rejection_sampling"]["kept"] > 0


def test_ppo_raises_reward(r1_run: Path) -> None:
    model, tokenizer = load_pretrained(r1_run / "sft" / "model")
    train, heldout = arithmetic.split_problems(300, seed=0)
    trainer = PPOTrainer(model, tokenizer, TASK, train[200:], PPOConfig(steps=50, eval_every=0, progress=False),
                         heldout[:200])
    rewards = []
    for _ in range(50):
        rewards.append(trainer.step()["reward"])
        trainer.step_count += 1
    assert sum(rewards[-15:]) / 15 > sum(rewards[:15]) / 15 + 0.05, rewards


def test_reward_model_ranks_heldout_pairs() -> None:
    tok = arithmetic.CharTokenizer()
    train, heldout = arithmetic.split_problems(500, seed=0)
    torch.manual_seed(0)
    from transformers import LlamaForCausalLM

    model = ValueModel.from_causal_lm(LlamaForCausalLM(arithmetic.tiny_model_config(tok)))
    trainer = RewardTrainer(model, tok, arithmetic.preference_pairs(train, 0), RewardConfig(progress=False),
                            arithmetic.preference_pairs(heldout, 1))
    before = trainer.pairwise_accuracy(trainer.eval_pairs)
    metrics = trainer.train()
    assert metrics["eval_pairwise_accuracy"] > 0.9, (before, metrics)


# ------------------------------------------------------------------------------------------
# Checkpoints: a resumed run takes the step the uninterrupted run takes
# ------------------------------------------------------------------------------------------


def _trainer(kind: str, out: Path, steps: int) -> object:
    tok = arithmetic.CharTokenizer()
    model = small_model(tok)
    common = {"out_dir": str(out), "steps": steps, "save_every": 2, "progress": False}
    if kind == "sft":
        return SFTTrainer(model, tok, sft_examples(), SFTConfig(batch_size=8, **common))
    if kind == "reward":
        pairs = arithmetic.preference_pairs(arithmetic.split_problems(100)[0][:40])
        return RewardTrainer(ValueModel.from_causal_lm(model), tok, pairs, RewardConfig(batch_size=8, **common))
    items = list(range(50))
    if kind == "grpo":
        return GRPOTrainer(model, tok, SEVENS, items, GRPOConfig(prompts_per_step=2, group_size=4, max_new_tokens=8,
                                                                 kl_coef=0.1, epochs=2, **common))
    return PPOTrainer(model, tok, SEVENS, items, PPOConfig(prompts_per_step=6, max_new_tokens=8, **common))


@pytest.mark.parametrize("kind", ["sft", "reward", "grpo", "ppo"])
def test_resume_takes_the_same_next_step(kind: str, tmp_path: Path) -> None:
    _trainer(kind, tmp_path / "whole", 3).train()
    _trainer(kind, tmp_path / "parts", 2).train()  # checkpoint after step 2
    _trainer(kind, tmp_path / "parts", 3).train()  # resumes: only step 3 runs
    whole, parts = (read_metrics(tmp_path / d / "metrics.jsonl") for d in ("whole", "parts"))
    assert [r["step"] for r in parts] == [1, 2, 3]
    drop = {"time_s"}
    assert {k: v for k, v in parts[2].items() if k not in drop} == {k: v for k, v in whole[2].items() if k not in drop}
    assert parts[2]["loss"] == whole[2]["loss"]
    # A checkpoint of another config is refused rather than mixed in.
    with pytest.raises(ValueError, match="different config"):
        trainer = _trainer(kind, tmp_path / "parts", 4)
        trainer.config.lr *= 2
        trainer.train()


@pytest.mark.parametrize("kind", ["grpo", "ppo"])
def test_loss_impls_take_the_same_step(kind: str) -> None:
    # In float32 the eager loss, the fused loss on the logits and the fused-linear loss are one
    # function of the same samples: the step's metrics and the updated weights agree.
    results = {}
    for impl in LOSS_IMPLS:
        tok = arithmetic.CharTokenizer()
        model = small_model(tok)
        if kind == "grpo":
            trainer = GRPOTrainer(model, tok, SEVENS, list(range(50)), GRPOConfig(
                prompts_per_step=2, group_size=4, max_new_tokens=8, kl_coef=0.1, epochs=2, loss_impl=impl))
        else:
            trainer = PPOTrainer(model, tok, SEVENS, list(range(50)), PPOConfig(
                prompts_per_step=6, max_new_tokens=8, kl_mode="loss", entropy_coef=0.01, loss_impl=impl))
        results[impl] = trainer.step(), [p.detach().clone() for p in model.parameters()]
    metrics, params = results["fused-linear"]
    for impl in ("fused", "eager"):
        for key in ("loss", "entropy", "clip_frac", "reward"):
            assert results[impl][0][key] == pytest.approx(metrics[key], abs=1e-5), (impl, key)
        for a, b in zip(results[impl][1], params, strict=True):
            assert torch.allclose(a, b, atol=1e-6), impl
    assert metrics["loss"] != 0.0


# ------------------------------------------------------------------------------------------
# Two processes under torchrun (DDP, gloo)
# ------------------------------------------------------------------------------------------


def _torchrun(kind: str, out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(free_port()), str(ROOT / "tests" / "ddp_worker.py"),
                           kind, str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_ddp_sft_averages_the_ranks_gradients(tmp_path: Path) -> None:
    _torchrun("sft", tmp_path)
    p0, p1 = (torch.load(tmp_path / f"params-{r}.pt") for r in (0, 1))
    # The same two steps in one process: each rank's batch, gradients averaged, one optimizer step.
    tok = arithmetic.CharTokenizer()
    model = small_model(tok)
    trainer = SFTTrainer(model, tok, sft_examples(), SFTConfig(steps=2, batch_size=6, progress=False))
    opt = trainer.optimizers["optimizer"]
    for step in range(2):
        grads = []
        for rank in (0, 1):
            trainer.procs.rank = rank
            rng = trainer.batch_rng(step)
            loss, _ = trainer.loss([trainer.examples[rng.randrange(len(trainer.examples))] for _ in range(6)])
            grads.append(torch.autograd.grad(loss, list(model.parameters())))
        for p, g0, g1 in zip(model.parameters(), *grads, strict=True):
            p.grad = (g0 + g1) / 2
        clip_and_step(list(model.parameters()), opt, trainer.config.max_grad_norm)
    for name, value in model.state_dict().items():
        assert torch.equal(p0[name], p1[name]), name  # the ranks agree
        assert torch.allclose(p0[name], value, atol=1e-6, rtol=1e-5), name  # and equal the averaged step


def test_ddp_grpo_keeps_the_ranks_in_step(tmp_path: Path) -> None:
    _torchrun("grpo", tmp_path)
    p0, p1 = (torch.load(tmp_path / f"params-{r}.pt") for r in (0, 1))
    start = small_model(arithmetic.CharTokenizer()).state_dict()
    assert all(torch.equal(p0[k], p1[k]) for k in p0)
    assert any(not torch.equal(p0[k], start[k]) for k in p0)  # it trained
    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")  # rank 0 alone writes
    assert [r["step"] for r in metrics] == [1, 2]


# ------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------


def _rlops(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlops", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_rlops_train_r1_toy_command(tmp_path: Path) -> None:
    args = ("train", "r1-toy", "--out", str(tmp_path), "--heldout", "40", "--sft-steps", "4", "--grpo-steps", "2",
            "--rs-prompts", "30", "--rs-steps", "2", "--hidden-size", "32", "--layers", "1")
    out = _rlops(*args)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["accuracy"]) == {"sft", "grpo", "rejection_sft"}
    assert all(0.0 <= a <= 1.0 for a in summary["accuracy"].values())
    for stage in ("sft", "grpo"):
        assert (tmp_path / stage / "metrics.jsonl").is_file() and (tmp_path / stage / "metrics.png").is_file()
        assert (tmp_path / stage / "checkpoint" / "state.pt").is_file()
    # Progress: stderr is a pipe here, so plain lines, no bar redraws, no transformers bar.
    assert "sft: 100%" in out.stderr and "grpo: 100%" in out.stderr
    assert "\r" not in out.stderr and "Writing model shards" not in out.stderr
    # Started again, the finished stages are loaded, not retrained.
    again = _rlops(*args)
    assert again.returncode == 0 and "sft: 100%" not in again.stderr, again.stderr[-2000:]
    assert "Loading weights" not in again.stderr  # transformers' bar, off without a terminal


def test_rlops_train_grpo_and_ppo_commands(tmp_path: Path) -> None:
    common = ("--heldout", "20", "--sft-steps", "3", "--steps", "2", "--max-new-tokens", "8", "--no-progress")
    out = _rlops("train", "reward", "--out", str(tmp_path / "rm"), "--steps", "2", "--heldout", "20",
                 "--batch-size", "4", "--no-progress")
    assert out.returncode == 0, out.stderr[-2000:]
    out = _rlops("train", "ppo", "--out", str(tmp_path / "ppo"), "--reward-model", str(tmp_path / "rm" / "model"),
                 "--prompts-per-step", "4", *common)
    assert out.returncode == 0, out.stderr[-2000:]
    assert [r["step"] for r in read_metrics(tmp_path / "ppo" / "ppo" / "metrics.jsonl")] == [1, 2]
    assert (tmp_path / "ppo" / "ppo" / "critic" / "value_model.pt").is_file()
    out = _rlops("train", "grpo", "--out", str(tmp_path / "grpo"), "--prompts-per-step", "2", "--group-size", "2",
                 *common)
    assert out.returncode == 0, out.stderr[-2000:]
    # Bad values (--group-size 1, ...) are refused before any work: test_cli_checks.py.


@pytest.mark.parametrize("cls, bad, message", [
    (GRPOConfig, {"group_size": 1}, "group_size"),
    (GRPOConfig, {"steps": 0}, "steps"),
    (PPOConfig, {"kl_mode": "both"}, "kl_mode"),
    (SFTConfig, {"lr": 0.0}, "lr"),
    (R1ToyConfig, {"grpo_steps": 0}, "grpo_steps"),
    (R1ToyConfig, {"rs_lr": -1.0}, "rs_lr"),
    (R1ToyConfig, {"heldout": 500, "demos": 9500}, "demos"),
    (GRPOConfig, {"loss_agg": "mean"}, "loss_agg"),
    (GRPOConfig, {"backend": "gpu"}, "backend"),
    (PPOConfig, {"lam": 1.5}, "lam"),
    (SFTConfig, {"max_grad_norm": float("nan")}, "max_grad_norm"),
    (RewardConfig, {"eval_every": -1}, "eval_every"),
])
def test_bad_configs_are_refused(cls: type, bad: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cls(**bad)


def test_resume_survives_a_torn_last_metrics_line(tmp_path: Path) -> None:
    """A run killed while writing metrics.jsonl leaves half a line: resuming drops it (and the
    steps past the checkpoint); a malformed line anywhere else is an error, not skipped data."""
    from rlops.trainers.runlog import RunLog

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    RunLog(tmp_path, total=5, start=1, enabled=True, desc="test", progress=False).close()
    assert path.read_text() == '{"step": 1, "loss": 0.5}\n'
    path.write_text('{"step": 1, "lo\n{"step": 2, "loss": 0.4}\n')
    with pytest.raises(json.JSONDecodeError):
        read_metrics(path)
