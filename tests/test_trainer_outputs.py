"""What the trainers leave for a person to read: the metrics plot (stage markers, one loss per
panel, sensible axes for single points, smoothed noisy curves), the one-line notice without
matplotlib, summary.json's training times, and quiet output where no terminal is watching.

Plots are judged by their matplotlib Figure (titles, lines, texts, limits), never by pixels, and
built from synthetic metrics; the few runs are the tiny SFT of tests/trainer_fixtures.py."""

from __future__ import annotations

import io
import itertools
import json
import math
import random
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from trainer_fixtures import sft_examples, small_model

from rlops.trainers import R1ToyConfig, SFTConfig, SFTTrainer, arithmetic, checkpoint, runlog
from rlops.trainers.r1_toy import STAGES, _combined_metrics, run

# Synthetic r1-toy stages: (stage, steps, per-step metrics); each ends with a held-out evaluation.
STAGE_METRICS = (("sft", 30, ("loss", "entropy")), ("grpo", 30, ("loss", "reward", "entropy")),
                 ("rejection_sft", 10, ("loss", "entropy")))


class Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def _write_stage_metrics(out: Path) -> None:
    rng = random.Random(0)
    for stage, steps, keys in STAGE_METRICS:
        records = [{"step": s, **{k: rng.random() + (3.0 if k == "loss" and stage != "grpo" else 0.0) for k in keys}}
                   for s in range(1, steps + 1)]
        records[-1]["eval_accuracy"] = 0.1 * len(records)
        (out / stage).mkdir(parents=True)
        (out / stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _axes(fig: Any) -> dict[str, Any]:
    return {ax.get_title(): ax for ax in fig.axes if ax.get_title()}


def _boundaries(ax: Any) -> list[float]:
    return [line.get_xdata()[0] for line in ax.lines if line.get_gid() == "stage-boundary"]


def test_combined_plot_marks_stages_and_never_shares_a_loss_panel(tmp_path: Path) -> None:
    _write_stage_metrics(tmp_path)
    _combined_metrics(tmp_path)
    assert (tmp_path / "metrics.png").stat().st_size > 0
    axes = _axes(runlog.metrics_figure(runlog.read_metrics(tmp_path / "metrics.jsonl")))
    # SFT's NLL and GRPO's policy loss: one panel each, each holding only its stage's steps.
    assert "loss" not in axes
    spans = {"sft": (1, 30), "grpo": (31, 60), "rejection_sft": (61, 70)}
    for stage, (first, last) in spans.items():
        steps = [x for line in axes[f"loss ({stage})"].lines for x in line.get_xdata()]
        assert min(steps) == first and max(steps) == last
        assert not _boundaries(axes[f"loss ({stage})"])
    assert "reward (grpo)" in axes  # logged by one stage only: named by it
    for key in ("entropy", "eval_accuracy"):  # the same quantity in every stage: one panel, stages marked
        assert sorted(_boundaries(axes[key])) == [30.5, 60.5]
        assert {t.get_text().strip() for t in axes[key].texts} >= set(STAGES)


def test_single_points_get_sensible_axes_and_whole_step_ticks() -> None:
    records = [{"step": s, "loss": 1.0 / s} for s in range(1, 301)]
    records[-1]["eval_accuracy"] = 0.3
    records[:5] = [{**r, "kl": 0.0} for r in records[:5]]  # a constant series
    axes = _axes(runlog.metrics_figure(records))
    ax = axes["eval_accuracy"]
    lo, hi = ax.get_ylim()
    assert lo <= 0.0 and hi >= 0.3 * 1.2  # not matplotlib's 0.285 .. 0.315
    assert ax.get_xlim()[0] < 1 and ax.get_xlim()[1] > 300  # the run's steps, not 285 .. 315
    assert ax.lines[0].get_marker() == "o" and [t.get_text() for t in ax.texts] == ["0.3"]
    lo, hi = axes["kl"].get_ylim()
    assert lo <= 0.0 < 0.5 < hi
    for ax in axes.values():
        assert all(float(t).is_integer() for t in ax.get_xticks())
    one = _axes(runlog.metrics_figure([{"step": 1, "eval_accuracy": 0.5}]))["eval_accuracy"]
    assert one.get_xlim() == (0.0, 2.0) and all(float(t).is_integer() for t in one.get_xticks())


def test_long_noisy_series_get_a_smoothed_line_over_the_raw_one() -> None:
    rng = random.Random(0)
    records = [{"step": s, "reward": rng.random()} for s in range(1, 101)]
    ax = _axes(runlog.metrics_figure(records))["reward"]
    raw, smooth = ax.lines
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["raw", f"EMA (smoothing {runlog.SMOOTHING})"]
    assert raw.get_alpha() < 1 and smooth.get_linewidth() > raw.get_linewidth()
    assert smooth.get_ydata()[0] == pytest.approx(records[0]["reward"])  # debiased: not pulled to 0

    def roughness(y: Any) -> float:
        return sum(abs(b - a) for a, b in itertools.pairwise(y))

    assert roughness(smooth.get_ydata()) < roughness(raw.get_ydata()) / 3
    short = _axes(runlog.metrics_figure(records[:runlog.SMOOTH_FROM - 1]))["reward"]
    assert len(short.lines) == 1 and short.get_legend() is None


def test_ema_is_debiased_and_skips_non_finite_values() -> None:
    assert runlog.ema([2.0] * 5) == pytest.approx([2.0] * 5)
    out = runlog.ema([1.0, math.nan, 3.0], weight=0.5)
    assert out[0] == 1.0 and math.isnan(out[1]) and out[2] == pytest.approx((0.25 * 1 + 0.5 * 3) / 0.75)


def test_missing_matplotlib_is_said_once_per_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setattr(runlog, "_said", set())
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n')
    assert not runlog.plot_metrics(path, tmp_path / "a.png") and not runlog.plot_metrics(path, tmp_path / "b.png")
    runlog.RunLog(tmp_path, total=1, start=1, enabled=True, desc="x", progress=False).close()
    assert capsys.readouterr().err.splitlines() == [
        "matplotlib is not installed: no metrics.png (pip install matplotlib)"]
    assert not list(tmp_path.glob("*.png"))


def _finished_stage(out: Path, tokenizer: arithmetic.CharTokenizer, seconds: float) -> None:
    checkpoint.save_model(small_model(tokenizer), tokenizer, out / "model")
    checkpoint.mark_finished(out, 3, train_seconds=seconds)


def test_a_reloaded_stage_reports_its_training_time(tmp_path: Path) -> None:
    tokenizer = arithmetic.CharTokenizer()
    trained = {"sft": 123.4, "grpo": 56.7, "rejection_sft": 8.9}
    for stage, seconds in trained.items():
        _finished_stage(tmp_path / stage, tokenizer, seconds)
    stats = {"prompts": 4, "samples_correct": 0.5, "kept": 2, "seconds": 1.5}
    (tmp_path / "rejection_sft" / "rejection_sampling.json").write_text(json.dumps(stats))
    summary = run(R1ToyConfig(out_dir=str(tmp_path), heldout=8, max_new_tokens=4, progress=False))
    # Not the load-and-evaluate time of this run; rejection sampling counts towards its stage.
    assert summary["seconds"] == {"sft": 123.4, "grpo": 56.7, "rejection_sft": 10.4}
    assert set(summary["eval_seconds"]) == set(STAGES) and all(0 <= s < 60 for s in summary["eval_seconds"].values())
    assert json.loads((tmp_path / "summary.json").read_text())["seconds"] == summary["seconds"]


def _sft(out: Path, steps: int) -> SFTTrainer:
    config = SFTConfig(out_dir=str(out), steps=steps, save_every=2, batch_size=4, progress=False)
    return SFTTrainer(small_model(arithmetic.CharTokenizer()), arithmetic.CharTokenizer(), sft_examples(), config)


def test_training_time_is_recorded_and_accumulates_across_resumes(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    _sft(tmp_path, 2).train()
    first = checkpoint.finished_info(tmp_path)
    assert first["step"] == 2 and first["train_seconds"] > 0
    state_path = tmp_path / "checkpoint" / "state.pt"
    state = torch.load(state_path, weights_only=False)
    assert state["extra"]["train_seconds"] > 0
    state["extra"]["train_seconds"] = 1000.0  # as if the first two steps had taken that long
    torch.save(state, state_path)
    _sft(tmp_path, 3).train()  # resumed from step 2
    assert 1000.0 <= checkpoint.finished_info(tmp_path)["train_seconds"] < 1100.0
    assert "Writing model shards" not in capsys.readouterr().err  # --no-progress: no transformers bar either


@pytest.mark.parametrize("terminal, progress, shown", [(True, True, True), (True, False, False),
                                                       (False, True, False)])
def test_transformers_bars_follow_progress_and_the_terminal(terminal: bool, progress: bool, shown: bool,
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers.utils import logging as hf_logging

    stderr = Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    tokenizer = arithmetic.CharTokenizer()
    with checkpoint.transformers_progress(progress):
        checkpoint.save_model(small_model(tokenizer), tokenizer, tmp_path / "model")
    assert ("Writing model shards" in stderr.getvalue()) == shown
    assert hf_logging.is_progress_bar_enabled()  # the previous state is back


def test_progress_without_a_terminal_is_plain_lines(capsys: pytest.CaptureFixture) -> None:
    log = runlog.RunLog(None, total=20, start=0, enabled=True, desc="sft", progress=True)
    for step in range(1, 21):
        log.log(step, {"loss": 1.0 / step})
    log.close()
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err  # no redraws or cursor codes in a redirected log
    lines = err.splitlines()
    assert len(lines) == 10 and lines[0].startswith("sft:  10% 2/20 steps") and lines[0].endswith("loss=0.5")
    assert lines[-1].startswith("sft: 100% 20/20 steps")


def test_progress_on_a_terminal_is_a_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", Terminal())
    log = runlog.RunLog(None, total=2, start=0, enabled=True, desc="sft", progress=True)
    log.log(1, {"loss": 1.0})
    log.close()
    assert "\r" in sys.stderr.getvalue() and "sft:  50%|" in sys.stderr.getvalue()
