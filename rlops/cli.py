"""The `rlops` command (also `python -m rlops`).

    rlops train r1-toy --out DIR                  cold-start SFT -> GRPO -> rejection sampling + SFT -> evaluation
    rlops train sft | reward | grpo | ppo         one trainer on the built-in arithmetic task
    rlops bench [--ops ...] [--quick] [--out DIR] GPU benchmarks of the fused ops (bench/README.md)
    rlops profile [--estimate] [--model ...]      memory of one GRPO / PPO step, stage by stage

Each subcommand has its own --help.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._interpreter import speed_up_interpreter


def _bench(argv: list[str]) -> int:
    import torch

    # Without CUDA the rlops-triton providers run in Triton's interpreter (smoke runs only); the
    # variable must be set before triton is first imported.
    # (--sass compiles the kernels instead, which the interpreter would replace.)
    if not torch.cuda.is_available() and "--sass" not in argv:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    speed_up_interpreter()  # nothing is timed in the interpreter: its checks only cost time
    from .bench.run import main

    return main(argv, prog="rlops bench")


def _add_config_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """One --option per field of the config dataclass cls: its help line (cli_help), type,
    default and, where it has them, its choices."""
    from .cli_checks import flag as option
    from .cli_help import CHOICES, HELP, METAVARS

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = option(f.name)
        text = HELP.get(f.name) or f.metadata["help"]  # a field's own help where cli_help has none (fsdp)
        help_ = text if "(default:" in text else f"{text} (default: %(default)s)"
        kind = hints[f.name]
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                                help=help_)
            continue
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        choices = CHOICES.get(f.name)
        parser.add_argument(flag, dest=f.name, type=base, default=f.default, choices=choices, help=help_,
                            metavar=None if choices else METAVARS.get(f.name, base.__name__.upper()))


class OneLineErrors(argparse.ArgumentParser):
    """An argument parser whose errors (`--steps abc`) are one line, as the value checks' are."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def train_parser() -> argparse.ArgumentParser:
    """The parser of `rlops train`: one subcommand per trainer, one option per config field."""
    from .cli_help import HELP
    from .trainers import GRPOConfig, PPOConfig, R1ToyConfig, RewardConfig, SFTConfig

    configs = {"r1-toy": R1ToyConfig, "sft": SFTConfig, "reward": RewardConfig, "grpo": GRPOConfig, "ppo": PPOConfig}
    parser = OneLineErrors(prog="rlops train", description="Trainers on the built-in arithmetic task "
                                     "(rlops.trainers); progress bars, metrics.jsonl, metrics.png, checkpoints "
                                     "and the final model go to --out.")
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="{r1-toy,sft,reward,grpo,ppo}")
    helps = {"r1-toy": "cold-start SFT -> GRPO -> rejection sampling + SFT -> held-out evaluation",
             "sft": "supervised fine-tuning on demonstrations", "reward": "a Bradley-Terry reward model on "
             "preference pairs", "grpo": "GRPO with the rule rewards", "ppo": "PPO with a critic and GAE"}
    for kind, cls in configs.items():
        sub = kinds.add_parser(kind, help=helps[kind], description=helps[kind])
        if kind != "r1-toy":
            sub.add_argument("--model", help="initial model: a directory saved by rlops or a Hugging Face causal LM "
                             "name or directory (default: a fresh small model; for grpo and ppo, after a cold-start "
                             "SFT written to OUT/sft)")
            sub.add_argument("--demos", type=int, default=200, help=f"{HELP['demos']} (default: %(default)s)")
            sub.add_argument("--heldout", type=int, default=500, help=f"{HELP['heldout']} (default: %(default)s)")
        if kind in ("grpo", "ppo"):
            sub.add_argument("--sft-steps", type=int, default=300, help=f"{HELP['sft_steps']} (default: %(default)s)")
        if kind == "ppo":
            sub.add_argument("--reward-model", help="a reward model trained by `rlops train reward` (default: the "
                             "task's rule reward)")
        _add_config_args(sub, cls)
        sub.set_defaults(out_dir=f"runs/{kind}", config_class=cls)
    return parser


def _train(argv: list[str]) -> int:
    import importlib.util

    missing = [m for m in ("transformers", "tqdm") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"rlops train needs {' and '.join(missing)}: pip install 'rlops[train]'", file=sys.stderr)
        return 2
    parser = train_parser()
    args = parser.parse_args(argv)
    from .cli_checks import UsageError, check_train_args

    try:
        config = check_train_args(args, args.config_class)
    except UsageError as e:
        print(f"rlops train {args.kind}: error: {e}", file=sys.stderr)
        return 2
    try:
        if args.kind == "r1-toy":
            from .trainers.r1_toy import run

            summary = run(config)
            print(f"held-out accuracy: {summary['accuracy']}; summary in {Path(args.out_dir) / 'summary.json'}")
            return 0
        return _train_one(args, config)
    except KeyboardInterrupt:
        # Not a traceback: what was saved, and how to go on from it.
        print(f"\nrlops train {args.kind}: interrupted. Run the same command again to resume from the last "
              f"checkpoint under {config.out_dir} (one every --save-every steps); --no-resume starts over.",
              file=sys.stderr)
        return 130


def _train_one(args: argparse.Namespace, config: Any) -> int:
    from .trainers import GRPOTrainer, PPOTrainer, RewardTrainer, SFTTrainer, ValueModel, arithmetic
    from .trainers.checkpoint import load_pretrained
    from .trainers.processes import Processes, seed_everything
    from .trainers.r1_toy import TASK, cold_start

    train, heldout = arithmetic.split_problems(args.heldout, seed=config.seed)
    demos, rest = train[:args.demos], train[args.demos:]
    device = Processes(config.device).device
    # Before any model is built: a fresh run, or one started again before its first checkpoint,
    # begins from the same weights (the cold start seeds itself the same way).
    seed_everything(config.seed)
    out = Path(config.out_dir)
    if args.model is not None:
        model, tokenizer = load_pretrained(args.model, device, progress=config.progress)
    elif args.kind in ("grpo", "ppo"):
        cold = {k: getattr(config, k) for k in ("seed", "device", "progress", "resume", "fsdp")}
        from .trainers import SFTConfig

        model = cold_start(out / "sft", demos, heldout, SFTConfig(steps=args.sft_steps, **cold))
        tokenizer = arithmetic.CharTokenizer()
        config = dataclasses.replace(config, out_dir=str(out / args.kind))
    else:
        from transformers import LlamaForCausalLM

        tokenizer = arithmetic.CharTokenizer()
        model = LlamaForCausalLM(arithmetic.tiny_model_config(tokenizer))
    try:
        if args.kind == "sft":
            trainer = SFTTrainer(model, tokenizer, [(p.prompt, p.solution) for p in demos], config, TASK, heldout)
        elif args.kind == "reward":
            pairs = arithmetic.preference_pairs(rest, 0), arithmetic.preference_pairs(heldout, 1)
            trainer = RewardTrainer(ValueModel.from_causal_lm(model), tokenizer, pairs[0], config, pairs[1])
        elif args.kind == "grpo":
            trainer = GRPOTrainer(model, tokenizer, TASK, rest, config, heldout)
        else:
            reward_model = None if args.reward_model is None else ValueModel.from_pretrained(args.reward_model, device)
            trainer = PPOTrainer(model, tokenizer, TASK, rest, config, heldout, reward_model=reward_model)
    except ValueError as e:  # a model the options cannot train (--packing with its attention): one line
        print(f"rlops train {args.kind}: error: {e}", file=sys.stderr)
        return 2
    metrics = trainer.train()
    if trainer.procs.main:
        shown = ", ".join(f"{k} {v:.3g}" for k, v in metrics.items() if k.startswith(("eval_", "reward", "loss")))
        print(f"{args.kind}: {shown}; metrics, plot and model in {config.out_dir}")
    return 0


def _profile(argv: list[str]) -> int:
    import torch

    # Measured on CPU, the fused ops run their Triton kernels in the interpreter (see rlops.profile).
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    speed_up_interpreter()  # what is measured there is memory, not the interpreter's time
    from .profile_cli import main

    return main(argv, prog="rlops profile")


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "train": (_train, "trainers on the built-in arithmetic task: r1-toy, sft, reward, grpo, ppo"),
    "bench": (_bench, "GPU benchmarks of the fused ops against eager, torch.compile, Liger, ..."),
    "profile": (_profile, "memory of one GRPO / PPO step per stage and loss implementation (--estimate: no GPU)"),
}


def main(argv: list[str] | None = None) -> int:
    """Runs `rlops <command> [args]`; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        lines = [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: rlops <command> [args]   (rlops <command> --help for its arguments)\n\ncommands:")
        print("\n".join(lines))
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"rlops {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"rlops: unknown command {argv[0]!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]][0](argv[1:])
