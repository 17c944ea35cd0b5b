"""FSDP2 (fully_shard) in the trainers, on CPU with gloo: a 2-process run of each trainer takes the
step one process takes on the same global batch, and a run killed mid-way and started again ends
as the uninterrupted one does (bitwise).

One torchrun start runs everything multi-process (tests/fsdp_worker.py: every trainer whole and
killed, plus a killed DDP GRPO run); the tests share its outputs. The one-process side runs the two
ranks' batches in this process: two copies of the trainer, rank 0's and rank 1's data (GRPO's and
PPO's samples replayed from the ranks' records), in two threads that meet before every optimizer
step to average their gradients. That is gradient accumulation over the global batch, the step
DDP and FSDP take; both copies stay equal.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fsdp_worker import CRASHES, KINDS, STEPS, make_trainer
from helpers import free_port
from safetensors.torch import load_file

from rlops.cli import train_parser
from rlops.trainers import base, faults, reward, sft
from rlops.trainers.base import Trainer
from rlops.trainers.processes import Processes
from rlops.trainers.runlog import read_metrics

ROOT = Path(__file__).resolve().parents[1]

Weights = dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The worker's outputs: OUT/<kind>/{whole,killed}, the ranks' samples, OUT/done."""
    out = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(faults.ENV, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(free_port()), str(ROOT / "tests" / "fsdp_worker.py"), str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and (out / "done").is_file(), proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


def _metrics(run: Path) -> list[dict[str, float]]:
    return [{k: v for k, v in r.items() if k != "time_s"} for r in read_metrics(run / "metrics.jsonl")]


def _weights(run: Path) -> dict[str, Weights]:
    """The final models a run wrote: model/ (and PPO's critic/), as state dicts."""
    out = {}
    for name in ("model", "critic"):
        if (run / name / "model.safetensors").is_file():
            out[name] = load_file(run / name / "model.safetensors")
        elif (run / name / "value_model.pt").is_file():
            out[name] = torch.load(run / name / "value_model.pt")
    return out


# ------------------------------------------------------------------------------------------
# The same step as one process
# ------------------------------------------------------------------------------------------


def _replay(trainer: Any, drawn: list[dict[str, Any]]) -> Callable[[list[Any]], Any]:
    """trainer.rollout giving back, step by step, the samples a rank drew (for the prompts it draws)."""
    steps: Iterator[dict[str, Any]] = iter(drawn)

    def rollout(items: list[Any]) -> Any:
        record = next(steps)
        assert [trainer.task.prompt(x) for x in items] == record["prompts"]
        return record["rollout"]

    return rollout


def _one_process(kind: str, drawn: list[list[dict[str, Any]]] | None,
                 monkeypatch: pytest.MonkeyPatch) -> tuple[list[dict[str, float]], dict[str, Weights]]:
    """STEPS steps of kind on the 2 ranks' batches in this process (see the module docstring): the
    metrics averaged over the ranks, as the processes average them, and the final weights."""
    trainers: list[Trainer] = [make_trainer(kind, None, fsdp=False) for _ in range(2)]
    for rank, trainer in enumerate(trainers):
        trainer.procs.rank = rank  # its batches (batch_rng); both were seeded as rank 0 (FSDP broadcasts rank 0's)
        if drawn is not None:
            trainer.rollout = _replay(trainer, drawn[rank])  # type: ignore[attr-defined]
    meet, me, grads = threading.Barrier(2, timeout=120), threading.local(), [[], []]
    clip_and_step = base.clip_and_step

    def averaged(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, max_norm: float) -> float:
        grads[me.rank] = [p.grad for p in params]
        meet.wait()
        mean = [None if a is None else (a + b) / 2 for a, b in zip(*grads, strict=True)]
        meet.wait()  # both have read both before either steps
        for p, g in zip(params, mean, strict=True):
            p.grad = g
        return clip_and_step(params, optimizer, max_norm)

    for module in (base, sft, reward):
        monkeypatch.setattr(module, "clip_and_step", averaged)
    results: list[list[dict[str, float]]] = [[], []]
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        me.rank, trainer = rank, trainers[rank]
        try:
            for model in trainer.models().values():  # as Trainer.train does
                model.train(any(p.requires_grad for p in model.parameters()))
            for step in range(STEPS):
                metrics = trainer.step()
                trainer.step_count += 1
                if step == STEPS - 1:
                    metrics.update(trainer.evaluate())
                results[rank].append(metrics)
        except BaseException as e:
            errors.append(e)
            meet.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    metrics = [{k: (a[k] + b[k]) / 2 for k in a} for a, b in zip(*results, strict=True)]
    models = trainers[0].models()
    weights = {name: {k: v.detach().clone() for k, v in models[name].state_dict().items()}
               for name in ("model", "critic") if name in models}
    for name, state in weights.items():  # the two copies took the same steps
        assert all(torch.equal(v, trainers[1].models()[name].state_dict()[k]) for k, v in state.items()), name
    return metrics, weights


@pytest.mark.parametrize("kind", KINDS)
def test_fsdp_takes_the_one_process_step(kind: str, runs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    drawn = [torch.load(runs / kind / f"rollouts-{r}.pt", weights_only=False) for r in range(2)] \
        if kind in ("grpo", "ppo") else None
    metrics, weights = _one_process(kind, drawn, monkeypatch)
    fsdp = _metrics(runs / kind / "whole")
    assert [r.pop("step") for r in fsdp] == list(range(1, STEPS + 1))
    for step, (got, want) in enumerate(zip(fsdp, metrics, strict=True), 1):
        assert got.keys() == want.keys(), step
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (step, key)
    saved = _weights(runs / kind / "whole")
    assert saved.keys() == weights.keys()
    for name, state in saved.items():
        for k, v in state.items():  # safetensors keeps one name of the tied embeddings
            if kind == "reward" and k == "head.bias":
                # The bias cancels in the Bradley-Terry margin: its gradient is rounding noise, which
                # AdamW scales to steps of +-lr, of a sign no two summation orders agree on.
                continue
            assert torch.allclose(v, weights[name][k], atol=1e-6, rtol=1e-5), (name, k)
    start = make_trainer(kind, None, fsdp=False).models()["model"].state_dict()
    assert any(not torch.equal(v, start[k]) for k, v in saved["model"].items())  # it trained


# ------------------------------------------------------------------------------------------
# Killed and started again
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [*KINDS, "ddp-grpo"])
def test_a_killed_run_started_again_ends_as_the_whole_one(kind: str, runs: Path) -> None:
    """Killed at CRASHES[kind] (a torn first or last sharded checkpoint, or after a step), started
    again: every step's metrics and the final weights bitwise those of the uninterrupted run.
    GRPO and PPO sample after the resumption, so each rank's generators must come back (also
    with DDP, whose checkpoints kept only rank 0's before)."""
    whole, killed = runs / kind / "whole", runs / kind / "killed"
    assert _metrics(killed) == _metrics(whole), CRASHES[kind]
    a, b = _weights(killed), _weights(whole)
    assert a.keys() == b.keys() and a
    for name in a:
        assert a[name].keys() == b[name].keys()
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name]), name


def test_a_sharded_checkpoint_is_one_directory_named_by_state_pt(runs: Path) -> None:
    checkpoint = runs / "ppo" / "killed" / "checkpoint"
    state = torch.load(checkpoint / "state.pt", weights_only=False)
    assert state["step"] == STEPS and state["world"] == 2 and len(state["rng"]) == 2
    assert "models" not in state  # in the shards
    # The torn attempt and step 2's checkpoint are gone once step 3's is named.
    assert sorted(p.name for p in checkpoint.iterdir()) == sorted([state["sharded"], "state.pt"])
    assert (checkpoint / state["sharded"] / ".metadata").is_file()
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # each rank's own


def test_a_checkpoint_resumes_only_as_written(runs: Path) -> None:
    """A 2-process checkpoint is refused by one process (each rank's data and generators are its
    own), and an FSDP one by a DDP run (another config), before any step."""
    run = runs / "sft" / "whole"
    with pytest.raises(ValueError, match=r"written by 2 process\(es\), this run has 1"):
        trainer = make_trainer("sft", run, fsdp=True)
        trainer.config.steps = STEPS + 1
        trainer.train()
    with pytest.raises(ValueError, match=r"different config \(fsdp\)"):
        trainer = make_trainer("sft", run, fsdp=False)
        trainer.config.steps = STEPS + 1
        trainer.train()


# ------------------------------------------------------------------------------------------
# One process, the command
# ------------------------------------------------------------------------------------------


def test_fsdp_in_one_process_changes_nothing() -> None:
    procs = Processes("cpu", fsdp=True)
    assert not procs.fsdp
    module = torch.nn.Linear(2, 2)
    assert procs.wrap(module) is module and procs.shard(module) is module


def test_the_fsdp_option() -> None:
    parser = train_parser()
    for kind in ("sft", "reward", "grpo", "ppo"):
        assert parser.parse_args([kind, "--fsdp"]).fsdp is True
        assert parser.parse_args([kind]).fsdp is False
    kinds = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert "shard the models, gradients and optimizer states" in " ".join(kinds["grpo"].format_help().split())
    with pytest.raises(SystemExit):
        parser.parse_args(["r1-toy", "--fsdp"])  # the pipeline runs its stages with DDP only
