"""What a run leaves on disk besides its metrics: the resumable checkpoint, the final model
(save_pretrained), the mark that the run is finished, and loading such a model back. Each is
written atomically (atomic.py): a kill leaves the old version or the whole new one."""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Iterator
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import atomic
from .rollout import Tokenizer
from .runlog import stderr_is_terminal


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
        atomic.write_file(self.path, lambda f: torch.save(state, f), point="checkpoint-write")

    def load(self, models: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
             config: Any) -> tuple[int, dict[str, Any]]:
        """Restores everything; returns (step, extra). Refuses a checkpoint of another config."""
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        saved, now = state["config"], asdict(config)
        # A field added since the checkpoint was written (packing, say) had its default there.
        saved = {**{f.name: f.default for f in fields(config)}, **saved}
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


@contextlib.contextmanager
def transformers_progress(progress: bool) -> Iterator[None]:
    """Within it, transformers' own progress bars (save_pretrained's "Writing model shards",
    from_pretrained's "Loading weights") show only where ours do: with progress on and stderr a
    terminal (in a redirected log a bar is carriage returns and redraws). Their previous state
    comes back afterwards. (transformers' switch also switches huggingface_hub's bars; both are
    on again after, as they were.)"""
    from transformers.utils import logging as hf_logging

    silence = not (progress and stderr_is_terminal()) and hf_logging.is_progress_bar_enabled()
    if silence:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if silence:
            hf_logging.enable_progress_bar()


def save_model(model: nn.Module, tokenizer: Tokenizer | None, directory: Path) -> None:
    """model.save_pretrained (+ tokenizer.save_pretrained) into directory, atomically: a kill
    leaves the directory as it was (or absent), never half written."""
    with atomic.directory(directory) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)


FINISHED = "finished.json"  # in out_dir: written after the final models, so it marks a complete run


def is_finished(out_dir: Path) -> bool:
    """Whether the run in out_dir wrote its final models (Trainer.train marks it last)."""
    return (out_dir / FINISHED).is_file()


def mark_finished(out_dir: Path, step: int, train_seconds: float | None = None) -> None:
    """out_dir/finished.json: the last step and the run's training time in seconds (over all its
    resumptions, see Trainer.train), so a run loaded later still reports what training it took."""
    info: dict[str, Any] = {"step": step}
    if train_seconds is not None:
        info["train_seconds"] = round(train_seconds, 3)
    atomic.write_text(out_dir / FINISHED, json.dumps(info) + "\n")


def finished_info(out_dir: Path) -> dict[str, Any]:
    """What mark_finished wrote ({} for an unfinished run); runs marked before train_seconds was
    recorded have only "step"."""
    path = out_dir / FINISHED
    return json.loads(path.read_text()) if path.is_file() else {}


def unmark_finished(out_dir: Path) -> None:
    """Before a run changes what its outputs would hold (more steps, a fresh start)."""
    (out_dir / FINISHED).unlink(missing_ok=True)


def config_from_dict(cls: type, values: dict[str, Any]) -> Any:
    """cls(**values) for the fields cls has; unknown names raise a ValueError naming them."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {unknown}; fields: {sorted(names)}")
    return cls(**values)


def load_pretrained(path: str | Path, device: torch.device | str = "cpu",
                    progress: bool = True) -> tuple[nn.Module, Tokenizer]:
    """(model, tokenizer) from a directory rlops saved (the character tokenizer) or any Hugging
    Face causal LM name or directory (its own tokenizer); transformers' loading bar as
    transformers_progress(progress) allows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .arithmetic import CharTokenizer

    if (Path(path) / "char_tokenizer.json").is_file():
        tokenizer: Tokenizer = CharTokenizer.from_pretrained(path)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path)
    with transformers_progress(progress):
        model = AutoModelForCausalLM.from_pretrained(path)
    return model.to(device), tokenizer
