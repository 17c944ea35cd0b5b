"""Run by test_trainer_fsdp.py as each of 2 torchrun-style processes (gloo, CPU): every trainer with
FSDP2, run whole and run killed then started again, in one process group (one start-up for all).

    fsdp_worker.py OUT

For each kind (sft, reward, grpo, ppo), OUT/<kind>/whole is a run of STEPS steps (checkpoints after
steps 2 and 3), and rank r writes the prompts and samples it drew to OUT/<kind>/rollouts-<r>.pt
(the test replays them in one process); OUT/<kind>/killed is the same run killed at CRASHES[kind]
(RLOPS_CRASH_AT; faults.die raises InjectedCrash on both ranks, at the same point, after the torn
files are cut) and started again. OUT/ddp-grpo/{whole,killed} do the same with DDP (each rank's
random generators restored on resumption). OUT/done marks that everything ran.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from trainer_fixtures import SEVENS, sft_examples, small_model

from rlops.trainers import (
    GRPOConfig,
    GRPOTrainer,
    PPOConfig,
    PPOTrainer,
    RewardConfig,
    RewardTrainer,
    SFTConfig,
    SFTTrainer,
    ValueModel,
    arithmetic,
    faults,
    runlog,
)
from rlops.trainers.base import Trainer
from rlops.trainers.r1_toy import TASK

KINDS = ("sft", "reward", "grpo", "ppo")
STEPS = 3
# Where each kind's run is killed: the first sharded checkpoint torn (no checkpoint yet: it starts
# over), after the last step's metrics (resumes from step 2's), the last checkpoint torn (state.pt
# still names step 2's shards).
CRASHES = {"sft": "checkpoint-write:1", "reward": "step:3", "grpo": "checkpoint-write:2",
           "ppo": "checkpoint-write:2", "ddp-grpo": "step:3"}


class InjectedCrash(BaseException):
    """faults.die in this process: nothing in rlops catches a BaseException."""


def make_trainer(kind: str, out_dir: Path | None, fsdp: bool) -> Trainer:
    """The kind's trainer on a tiny model, as small as still exercises its parts: SFT evaluates
    (greedy sampling), GRPO packs its minibatches and keeps a reference (kl_coef), PPO has a
    reference, a critic and two epochs of two minibatches."""
    tok = arithmetic.CharTokenizer()
    model = small_model(tok)
    common: dict[str, Any] = {"out_dir": None if out_dir is None else str(out_dir), "steps": STEPS,
                              "save_every": 2, "progress": False, "fsdp": fsdp}
    if kind == "sft":
        _, heldout = arithmetic.split_problems(100, seed=0)
        return SFTTrainer(model, tok, sft_examples(), SFTConfig(batch_size=4, max_new_tokens=6, **common), TASK,
                          heldout[:4])
    if kind == "reward":
        pairs = arithmetic.preference_pairs(arithmetic.split_problems(100)[0][:40])
        return RewardTrainer(ValueModel.from_causal_lm(model), tok, pairs, RewardConfig(batch_size=4, **common))
    items = list(range(50))
    if kind == "grpo":
        return GRPOTrainer(model, tok, SEVENS, items, GRPOConfig(prompts_per_step=2, group_size=2, max_new_tokens=6,
                                                                 kl_coef=0.1, epochs=2, packing=True, **common))
    return PPOTrainer(model, tok, SEVENS, items, PPOConfig(prompts_per_step=4, max_new_tokens=6, **common))


def record_rollouts(trainer: Any) -> list[dict[str, Any]]:
    """The prompts and samples of each step of trainer (GRPO, PPO), appended as it draws them."""
    drawn: list[dict[str, Any]] = []
    draw = trainer.rollout

    def rollout(items: list[Any]) -> Any:
        samples = draw(items)
        drawn.append({"prompts": [trainer.task.prompt(x) for x in items], "rollout": samples})
        return samples

    trainer.rollout = rollout
    return drawn


def main(out: Path) -> None:
    rank = int(os.environ["RANK"])
    faults.die = lambda point: (_ for _ in ()).throw(InjectedCrash(point))
    # metrics.png is not what is tested here, and drawing it takes rank 0 about 2 s a run on 2 cores.
    runlog.plot_metrics = lambda jsonl, png: False
    for kind in (*KINDS, "ddp-grpo"):
        fsdp, base = not kind.startswith("ddp-"), kind.removeprefix("ddp-")
        trainer = make_trainer(base, out / kind / "whole", fsdp)
        drawn = record_rollouts(trainer) if base in ("grpo", "ppo") else None
        trainer.train()
        if drawn is not None:
            torch.save(drawn, out / kind / f"rollouts-{rank}.pt")
        os.environ[faults.ENV] = CRASHES[kind]
        faults.reset()
        try:
            make_trainer(base, out / kind / "killed", fsdp).train()
            raise AssertionError(f"{kind}: no crash at {CRASHES[kind]}")
        except InjectedCrash:
            pass
        del os.environ[faults.ENV]
        make_trainer(base, out / kind / "killed", fsdp).train()
    (out / "done").touch()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
