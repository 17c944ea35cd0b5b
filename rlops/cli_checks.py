"""The checks of `rlops train`'s arguments, all made before any model is built or file written:
a bad value ends the command with one line naming the option as typed (`--steps must be an
int >= 1, got -1`) and exit status 2, not a traceback after minutes of work."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from .trainers import arithmetic


class UsageError(Exception):
    """A bad command-line value; the message names the option as the user typed it."""


def flag(field: str) -> str:
    """The option of a config field (as cli._add_config_args names it)."""
    return "--out" if field == "out_dir" else "--" + field.replace("_", "-")


def _flagged(error: Exception, names: list[str]) -> UsageError:
    """error, its leading field name (the config classes' messages begin with it) made the option."""
    message = str(error)
    name = next((n for n in sorted(names, key=len, reverse=True) if message.startswith(n + " ")), None)
    return UsageError(message if name is None else flag(name) + message[len(name):])


def checked_config(cls: type, args: argparse.Namespace) -> Any:
    """cls built from args' values of its fields; its own validation's error names the option."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise _flagged(e, list(values)) from None


def check_train_args(args: argparse.Namespace, cls: type) -> Any:
    """The config of `rlops train <args.kind>` once every argument is checked; raises UsageError.
    --out is checked last, by creating it, so that no other bad value leaves a directory behind."""
    config = checked_config(cls, args)
    if args.kind != "r1-toy":
        try:
            arithmetic.check_split(args.heldout, args.demos)
        except ValueError as e:
            raise _flagged(e, ["heldout", "demos"]) from None
        check_model(args.model)
    if args.kind in ("grpo", "ppo") and args.sft_steps < 1:
        raise UsageError(f"--sft-steps must be >= 1, got {args.sft_steps}")
    if args.kind == "ppo":
        check_reward_model(args.reward_model)
    check_device(config.device)
    check_out(config.out_dir)
    return config


def check_device(device: str | None) -> None:
    """cpu, or cuda[:index] when that GPU is present (None: chosen at run time)."""
    if device is None:
        return
    usage = UsageError(f"--device must be cpu, cuda or cuda:<index>, got {device!r}")
    try:
        kind = torch.device(device)
    except RuntimeError:
        raise usage from None
    if kind.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: no CUDA device here (torch.cuda.is_available() is False); "
                             "use --device cpu")
        if kind.index is not None and kind.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: there are {torch.cuda.device_count()} CUDA device(s)")
    elif kind.type != "cpu":
        raise usage


def _looks_like_path(value: str) -> bool:
    """A Hugging Face repo id is "name" or "org/name"; anything else with a separator is a path."""
    return value.startswith(("/", ".", "~")) or value.endswith("/") or value.count("/") > 1 or "\\" in value


def check_model(value: str | None) -> None:
    """--model: an existing directory holds a saved model (config.json); a missing one that looks
    like a path is refused here, while "org/name" is left to transformers (a repo id)."""
    if value is None:
        return
    path = Path(value).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UsageError(f"--model {value} holds no saved model (no config.json in it)")
    elif _looks_like_path(value):
        raise UsageError(f"--model {value} does not exist")


def check_reward_model(value: str | None) -> None:
    """--reward-model (optional: the task's rule reward without it): a directory `rlops train
    reward` wrote."""
    if value is None:
        return
    path = Path(value).expanduser()
    if not path.exists():
        raise UsageError(f"--reward-model {value} does not exist")
    if not (path / "value_model.pt").is_file():
        raise UsageError(f"--reward-model {value} holds no reward model (no value_model.pt; train one with "
                         "`rlops train reward`)")


def check_out(value: str | None) -> None:
    """--out is created (with its parents) and a file written and removed in it."""
    if value is None:
        return
    path = Path(value)
    probe = path / f".rlops-write-test-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"--out {value} is not a writable directory ({e.strerror or e})") from None
