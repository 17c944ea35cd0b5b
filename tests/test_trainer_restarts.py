"""A run killed at any moment and started again ends as the uninterrupted run does (the metrics
of every step and the final weights bitwise equal), and --seed makes a fresh run reproducible.

The kills are injected with RLOPS_CRASH_AT (rlops/trainers/faults.py): once in a subprocess
with os._exit, the others in-process, faults.die raising an exception that nothing in rlops
catches; either way the files the interrupted write was making are torn first, so what is on
disk is what a kill leaves."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlops import cli
from rlops.trainers import arithmetic, atomic, faults
from rlops.trainers.checkpoint import is_finished
from rlops.trainers.runlog import read_metrics

ROOT = Path(__file__).resolve().parents[1]
# Four SFT steps, checkpoints after steps 2 and 4, a tiny evaluation.
ARGS = ("train", "sft", "--steps", "4", "--save-every", "2", "--batch-size", "4", "--demos", "16", "--heldout", "8",
        "--max-new-tokens", "8", "--no-progress")
_TINY = arithmetic.tiny_model_config
# The CLI's fresh model made smaller (hidden 32, one layer) so that each run takes a fraction of a second.
TINY_PATCH = "from rlops.trainers import arithmetic as a; t = a.tiny_model_config; " \
             "a.tiny_model_config = lambda tok: t(tok, 32, 1)"

Run = Callable[..., int]
Outcome = tuple[list[dict], dict[str, torch.Tensor]]


class InjectedCrash(BaseException):
    """faults.die in-process: a BaseException, so no `except Exception` in rlops or transformers stops it."""


def _tiny(tokenizer: arithmetic.CharTokenizer) -> object:
    return _TINY(tokenizer, 32, 1)


def _run(out: Path, *extra: str) -> int:
    return cli.main([*ARGS, "--out", str(out), *extra])


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch) -> Iterator[Run]:
    """`rlops train sft` in this process on the tiny model; faults.die raises InjectedCrash."""
    monkeypatch.setattr(arithmetic, "tiny_model_config", _tiny)
    monkeypatch.setattr(faults, "die", lambda point: (_ for _ in ()).throw(InjectedCrash(point)))
    faults.reset()
    yield _run
    faults.reset()


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("uninterrupted")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(arithmetic, "tiny_model_config", _tiny)
        mp.delenv(faults.ENV, raising=False)
        assert _run(out) == 0
    return out


def _outcome(out: Path) -> Outcome:
    """Every step's metrics (less the wall time) and the final weights."""
    metrics = [{k: v for k, v in r.items() if k != "time_s"} for r in read_metrics(out / "metrics.jsonl")]
    return metrics, load_file(out / "model" / "model.safetensors")


def _assert_same(a: Outcome, b: Outcome) -> None:
    assert a[0] == b[0]
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        assert torch.equal(a[1][name], b[1][name]), name


@pytest.mark.parametrize("point", [
    "step:1",  # after step 1's metrics, before any checkpoint: starts again from the seeded model
    "metrics-write:3",  # half of step 3's line: resumes from step 2's checkpoint, the torn line dropped
    "checkpoint-write:1",  # the first checkpoint half written: no checkpoint yet
    "checkpoint-write:2",  # the last one half written: resumes from step 2's
    "final-save:1",  # model/ half written under its temporary name: the final save is redone
])
def test_a_killed_run_started_again_ends_as_the_uninterrupted_one(point: str, run: Run, reference: Path,
                                                                  tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(faults.ENV, point)
    with pytest.raises(InjectedCrash):
        run(tmp_path)
    assert not is_finished(tmp_path) and not (tmp_path / "model").exists()
    monkeypatch.delenv(faults.ENV)
    assert run(tmp_path) == 0
    assert is_finished(tmp_path)
    _assert_same(_outcome(tmp_path), _outcome(reference))


def test_a_run_killed_in_its_final_save_by_os_exit(run: Run, reference: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    """The issue's case, killed for real: the model directory half written. Before, the restart
    found the last checkpoint, skipped the final save, and exited 0 with no weights."""
    env = {**os.environ, faults.ENV: "final-save:1"}
    code = f"import sys; {TINY_PATCH}; from rlops.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", code, *ARGS, "--out", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == faults.CRASH_STATUS, proc.stderr[-2000:]
    assert (tmp_path / "checkpoint" / "state.pt").is_file() and (tmp_path / ".model.tmp").is_dir()
    assert not (tmp_path / "model").exists() and not is_finished(tmp_path)
    capsys.readouterr()
    assert run(tmp_path) == 0
    assert "eval_accuracy" in capsys.readouterr().out  # the summary line is the last step's, not empty
    assert is_finished(tmp_path) and not (tmp_path / ".model.tmp").exists()
    _assert_same(_outcome(tmp_path), _outcome(reference))


def test_a_finished_run_started_again_changes_nothing(run: Run, reference: Path, tmp_path: Path) -> None:
    assert run(tmp_path) == 0
    before = (tmp_path / "model" / "model.safetensors").stat().st_mtime_ns
    assert run(tmp_path) == 0
    assert (tmp_path / "model" / "model.safetensors").stat().st_mtime_ns == before
    _assert_same(_outcome(tmp_path), _outcome(reference))


def test_the_seed_makes_a_fresh_run_reproducible(run: Run, reference: Path, tmp_path: Path) -> None:
    # Whatever state the generators are in, --seed decides the model and the run.
    random.seed(12345)
    torch.manual_seed(12345)
    assert run(tmp_path / "same") == 0
    _assert_same(_outcome(tmp_path / "same"), _outcome(reference))
    assert run(tmp_path / "other", "--seed", "1") == 0
    metrics, weights = _outcome(tmp_path / "other")
    assert metrics[0]["loss"] != _outcome(reference)[0][0]["loss"]
    assert not torch.equal(weights["model.embed_tokens.weight"], _outcome(reference)[1]["model.embed_tokens.weight"])


def test_a_directory_is_replaced_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights").write_text("old")
    monkeypatch.setattr(faults, "die", lambda point: (_ for _ in ()).throw(InjectedCrash(point)))
    monkeypatch.setenv(faults.ENV, "final-save:1")
    faults.reset()
    with pytest.raises(InjectedCrash), atomic.directory(target) as tmp:
        (tmp / "weights").write_text("new weights")
    assert (target / "weights").read_text() == "old"  # the kill left the old one, whole
    monkeypatch.delenv(faults.ENV)
    with atomic.directory(target) as tmp:
        (tmp / "weights").write_text("new weights")
    assert (target / "weights").read_text() == "new weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary or old copy left
    monkeypatch.setenv(faults.ENV, "checkpoint_write:1")
    with pytest.raises(ValueError, match=faults.ENV):
        faults.crash_point("step")
