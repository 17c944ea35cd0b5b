"""What a run leaves on disk besides its metrics: the resumable checkpoint, the final model
(save_pretrained), the mark that the run is finished, and loading such a model back. Each is
written atomically (atomic.py): a kill leaves the old version or the whole new one."""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from . import atomic
from .faults import crash_point
from .processes import Processes, is_sharded
from .rollout import Tokenizer
from .runlog import stderr_is_terminal

SHARDED = "sharded-"  # the prefix of a sharded checkpoint's directory beside state.pt


class Checkpoint:
    """out_dir/checkpoint/state.pt: models, optimizers, every rank's RNG states and the step,
    written atomically; `load` restores them so the next step is the one the uninterrupted run
    takes. Every rank calls save and load (procs: this job's processes; None: a single one).

    With FSDP (procs.fsdp) the models and optimizers are sharded: each rank writes its shards with
    torch.distributed.checkpoint into a new directory out_dir/checkpoint/sharded-<step>-<id>/, and
    state.pt (the step, config, RNG states) names it. state.pt is replaced only once every shard
    is written and synced, and the previous directory removed only after: a kill at any moment
    leaves state.pt naming a complete checkpoint, the previous one or the new one.
    """

    def __init__(self, out_dir: Path | None, procs: Processes | None = None) -> None:
        self.path = None if out_dir is None else out_dir / "checkpoint" / "state.pt"
        self.procs = procs

    @property
    def world(self) -> int:
        return 1 if self.procs is None else self.procs.world

    @property
    def main(self) -> bool:
        return self.procs is None or self.procs.main

    @property
    def sharded(self) -> bool:
        return self.procs is not None and self.procs.fsdp

    def exists(self) -> bool:
        return self.path is not None and self.path.exists()

    def save(self, step: int, models: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
             config: Any, extra: dict[str, Any] | None = None) -> None:
        if self.path is None:
            return
        # Every rank's generators: each rank samples with its own, and a resumed rank must draw what
        # it would have drawn (rank 0's alone would give every rank the same random numbers).
        rng = self._gather(_rng_state())
        state: dict[str, Any] = {"step": step, "world": self.world, "rng": rng, "config": asdict(config),
                                 "extra": extra or {}}
        if self.sharded:
            name = self._from_main(f"{SHARDED}{step:08d}-{uuid.uuid4().hex[:8]}")
            directory = self.path.parent / name
            from torch.distributed import checkpoint as dcp

            # Collective: each rank writes (and syncs) its shards; rank 0 then the metadata.
            dcp.save(_sharded_state(models, optimizers), checkpoint_id=directory)
            if self.main:
                atomic.fsync_dir(directory)
                atomic.fsync_dir(directory.parent)
            # A kill here leaves the new shards (torn) and state.pt naming the previous checkpoint.
            crash_point("checkpoint-write", torn=directory if self.main else None)
            state["sharded"] = name
        else:
            state["models"] = {k: m.state_dict() for k, m in models.items()}
            state["optimizers"] = {k: o.state_dict() for k, o in optimizers.items()}
        if self.main:
            atomic.write_file(self.path, lambda f: torch.save(state, f),
                              point=None if self.sharded else "checkpoint-write")
            # Only now is the previous checkpoint's directory (and any a killed save left) unneeded.
            for old in self.path.parent.glob(f"{SHARDED}*"):
                if old.name != state.get("sharded"):
                    shutil.rmtree(old, ignore_errors=True)
        if self.world > 1:
            dist.barrier()

    def load(self, models: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
             config: Any) -> tuple[int, dict[str, Any]]:
        """Restores everything; returns (step, extra). Refuses a checkpoint of another config or
        another number of processes."""
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        saved, now = state["config"], asdict(config)
        # A field added since the checkpoint was written (packing, say) had its default there.
        saved = {**{f.name: f.default for f in fields(config)}, **saved}
        changed = sorted(k for k in now if k not in _RUN_ONLY and saved.get(k) != now[k])
        if changed:
            raise ValueError(f"{self.path} was written with a different config ({', '.join(changed)}); use a new "
                             "out_dir or resume=False")
        world = state.get("world", self.world)  # checkpoints from before the field: not checked
        if world != self.world:
            raise ValueError(f"{self.path} was written by {world} process(es), this run has {self.world}: each "
                             "rank's data and random generators are its own, so a run resumes exactly only with "
                             "as many processes; use that many, a new out_dir or resume=False")
        if "sharded" in state:
            from torch.distributed import checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

            # The sharded models' and optimizers' own state dicts (the optimizers' states made first,
            # by a step at lr 0), loaded in place from every rank's shards, then set.
            target = _sharded_state(models, optimizers)
            dcp.load(target, checkpoint_id=self.path.parent / state["sharded"])
            for k, m in models.items():
                set_model_state_dict(m, target["models"][k])
            for k, o in optimizers.items():
                set_optimizer_state_dict(_owner(o, models), o, target["optimizers"][k])
        else:
            for k, m in models.items():
                m.load_state_dict(state["models"][k])
            for k, o in optimizers.items():
                o.load_state_dict(state["optimizers"][k])
        rng = state["rng"]
        # Checkpoints from before every rank's states were kept hold rank 0's.
        _set_rng_state(rng[self.procs.rank if self.procs is not None else 0] if isinstance(rng, list) else rng)
        return state["step"], state["extra"]

    def _gather(self, value: Any) -> list[Any]:
        """Every rank's value, in rank order, on rank 0 (elsewhere: [])."""
        if self.world == 1:
            return [value]
        out: list[Any] | None = [None] * self.world if self.main else None
        dist.gather_object(value, out, dst=0)
        return out or []

    def _from_main(self, value: Any) -> Any:
        """Rank 0's value, on every rank."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _owner(optimizer: torch.optim.Optimizer, models: dict[str, nn.Module]) -> nn.Module:
    """The model whose parameters optimizer steps (the policy's or the critic's)."""
    first = optimizer.param_groups[0]["params"][0]
    for model in models.values():
        if any(p is first for p in model.parameters()):
            return model
    raise ValueError("an optimizer steps parameters of none of the checkpointed models")


def _sharded_state(models: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, Any]:
    """The sharded state dicts of models and optimizers (DTensors, keyed by parameter names), as
    torch.distributed.checkpoint saves and loads them, each rank its shards."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"models": {k: get_model_state_dict(m) for k, m in models.items()},
            "optimizers": {k: get_optimizer_state_dict(_owner(o, models), o) for k, o in optimizers.items()}}


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
    leaves the directory as it was (or absent), never half written. Called on every rank; rank 0
    writes. A model sharded by FSDP is gathered first (collectively), whole, on rank 0's CPU."""
    state = None
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = _share_tied(model, get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                                         cpu_offload=True)))
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    with atomic.directory(directory) as tmp:
        if state is None:
            model.save_pretrained(tmp)
        else:
            model.save_pretrained(tmp, state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)


def _share_tied(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """state with the names of one parameter (tied embeddings) on one tensor again: the gathered
    state dict holds a copy per name, which save_pretrained would write twice rather than once."""
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        seen = first.setdefault(id(param), name)
        if seen != name and seen in state and name in state:
            state[name] = state[seen]
    return state


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
