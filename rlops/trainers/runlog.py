"""The metrics of a run: out_dir/metrics.jsonl (one JSON line per step, each appended and synced:
a kill tears at most the last line, which readers skip), its plot out_dir/metrics.png, and the
progress shown while it runs (a bar on a terminal, a plain line every tenth of the run otherwise)."""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import atomic


def stderr_is_terminal() -> bool:
    """Whether progress goes to a terminal: a redirected log gets no bar (its carriage returns
    and redraws are noise in a file) but plain lines instead."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty is not None and isatty())


class LineProgress:
    """Progress for a stream that is not a terminal: one plain line every tenth of the run and at
    its end ("sft:  30% 90/300 steps, 12 s, loss=0.52"), no carriage returns or cursor codes.
    Has the two tqdm methods RunLog calls."""

    def __init__(self, desc: str, total: int, start: int) -> None:
        self.desc, self.total, self.n = desc, total, start
        self.every = max(1, math.ceil(total / 10))
        self.postfix: dict[str, str] = {}
        self.started = time.perf_counter()

    def set_postfix(self, shown: dict[str, str], refresh: bool = False) -> None:
        self.postfix = dict(shown)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n % self.every and self.n < self.total:
            return
        shown = "".join(f", {k}={v}" for k, v in self.postfix.items())
        print(f"{self.desc}: {100 * self.n / max(self.total, 1):3.0f}% {self.n}/{self.total} steps, "
              f"{time.perf_counter() - self.started:.0f} s{shown}", file=sys.stderr, flush=True)

    def close(self) -> None:
        """Nothing to clear: every line is final."""


def progress_bar(desc: str, total: int, start: int) -> Any:
    """A tqdm bar on a terminal, else LineProgress."""
    if not stderr_is_terminal():
        return LineProgress(desc, total, start)
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True)


class RunLog:
    """Metrics of a run: one JSON line per step in out_dir/metrics.jsonl, a plot in
    out_dir/metrics.png, and the progress (progress_bar). Only rank 0 writes."""

    PLOTTED = ("reward", "accuracy", "eval_accuracy", "kl", "entropy", "response_length", "loss", "value_loss",
               "pairwise_accuracy", "eval_pairwise_accuracy")

    def __init__(self, out_dir: Path | None, total: int, start: int, enabled: bool, desc: str,
                 progress: bool = True) -> None:
        self.path = None if out_dir is None or not enabled else out_dir / "metrics.jsonl"
        self.enabled = enabled
        self.bar = progress_bar(desc, total, start) if enabled and progress else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if start == 0 and self.path.exists():
                self.path.unlink()
            else:
                self._truncate(start)
        self.started = time.perf_counter()

    def _truncate(self, start: int) -> None:
        """Drops lines past the step being resumed from (a run that went on after its checkpoint),
        and a torn last line (a run killed while writing it)."""
        if self.path is None or not self.path.exists():
            return
        kept = [json.dumps(r) for r in read_metrics(self.path) if r.get("step", 0) <= start]
        atomic.write_text(self.path, "".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: round(v, 6) for k, v in metrics.items()},
                  "time_s": round(time.perf_counter() - self.started, 3)}
        if self.path is not None:
            atomic.append_line(self.path, json.dumps(record))
        if self.bar is not None:
            shown = {k: f"{metrics[k]:.3g}" for k in ("loss", "reward", "accuracy", "eval_accuracy", "kl")
                     if k in metrics}
            # Before the update, so the line (or redraw) it triggers shows this step's values.
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.path is not None and self.path.exists():
            plot_metrics(self.path, self.path.with_suffix(".png"))


def read_metrics(path: Path) -> list[dict[str, float]]:
    """The records of a metrics.jsonl, one dict per step; a torn last line (a run killed while
    writing it) is skipped, a malformed line anywhere else raises."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise
    return records


# Plots. A metric whose meaning differs per stage of a multi-stage run (r1-toy) gets one panel per
# stage: SFT's loss is the NLL of the demonstrations, GRPO's the clipped policy loss; one axis
# would put two unrelated scales on one curve.
STAGE_DEPENDENT = frozenset({"loss"})
SMOOTH_FROM = 20  # points from which a series gets a smoothed line over its faint raw one
SMOOTHING = 0.9  # the EMA's weight of the past (TensorBoard's "smoothing")
NO_MATPLOTLIB = "matplotlib is not installed: no metrics.png (pip install matplotlib)"
_said: set[str] = set()  # messages printed once per process


@dataclass
class Panel:
    """One axes of a plot: key's (step, value, stage) points; scope, the records its x axis spans."""

    key: str
    title: str
    scope: list[dict[str, Any]]
    points: list[tuple[int, float, str | None]] = field(default_factory=list)


def _stage(record: dict[str, Any]) -> str | None:
    stage = record.get("stage")
    return stage if isinstance(stage, str) else None


def panels(records: list[dict[str, Any]]) -> list[Panel]:
    """One panel per metric of RunLog.PLOTTED in records; where records carry a "stage", a metric
    of STAGE_DEPENDENT, or one that only one stage logs, gets a panel per stage ("loss (grpo)")."""
    out = []
    for key in RunLog.PLOTTED:
        stages = list(dict.fromkeys(_stage(r) for r in records if key in r))
        if not stages:
            continue
        if None in stages or (len(stages) > 1 and key not in STAGE_DEPENDENT):
            groups = [(key, set(stages))]
        else:
            groups = [(f"{key} ({s})", {s}) for s in stages]
        for title, chosen in groups:
            scope = [r for r in records if _stage(r) in chosen]
            out.append(Panel(key, title, scope, [(r["step"], r[key], _stage(r)) for r in scope if key in r]))
    return out


def ema(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """The debiased exponential moving average (TensorBoard's smoothing, Adam's bias correction):
    s_t = w s_{t-1} + (1 - w) x_t from s_0 = 0, divided by 1 - w^t so that the first points are
    not pulled towards 0. A non-finite value is skipped (NaN in its place)."""
    out, state, n = [], 0.0, 0
    for x in values:
        if not math.isfinite(x):
            out.append(math.nan)
            continue
        n += 1
        state = weight * state + (1 - weight) * x
        out.append(state / (1 - weight**n))
    return out


def _smoothed(points: list[tuple[int, float, str | None]]) -> list[float]:
    """ema of each stage's run of points, restarted at a stage boundary (a new stage, a new curve)."""
    out: list[float] = []
    start = 0
    for i in range(1, len(points) + 1):
        if i == len(points) or points[i][2] != points[start][2]:
            out += ema([p[1] for p in points[start:i]])
            start = i
    return out


def _spans(scope: list[dict[str, Any]]) -> list[tuple[str, int, int]]:
    """(stage, first step, last step) of each run of records of one stage, in order."""
    spans: list[list[Any]] = []
    for r in scope:
        stage = _stage(r)
        if stage is not None and spans and spans[-1][0] == stage:
            spans[-1][2] = r["step"]
        elif stage is not None:
            spans.append([stage, r["step"], r["step"]])
    return [(s, a, b) for s, a, b in spans]


def _mark_stages(ax: Any, scope: list[dict[str, Any]]) -> None:
    """Every other stage shaded, a dashed line at each boundary, each stage's name at its start."""
    spans = _spans(scope)
    if len(spans) < 2:
        return
    for i, (stage, first, last) in enumerate(spans):
        if i % 2:
            ax.axvspan(first - 0.5, last + 0.5, color="0.93", zorder=0)
        if i:
            ax.axvline(first - 0.5, color="0.45", linestyle="--", linewidth=0.8, gid="stage-boundary")
        ax.text(first - 0.5, 0.98, f" {stage}", transform=ax.get_xaxis_transform(), ha="left", va="top",
                fontsize=7, color="0.3")


def _draw_series(ax: Any, panel: Panel) -> None:
    """A long series: faint raw line under its EMA, named in a legend; a short one: the points."""
    steps, values = [p[0] for p in panel.points], [p[1] for p in panel.points]
    if len(values) >= SMOOTH_FROM:
        ax.plot(steps, values, color="C0", alpha=0.3, linewidth=0.8, label="raw")
        ax.plot(steps, _smoothed(panel.points), color="C0", linewidth=1.6, label=f"EMA (smoothing {SMOOTHING})")
        ax.legend(fontsize=7)
        return
    single = len(values) == 1
    ax.plot(steps, values, color="C0", marker="o" if single else ".", markersize=6 if single else 5)
    if single:
        ax.annotate(f"{values[0]:.3g}", (steps[0], values[0]), textcoords="offset points", xytext=(0, 6),
                    ha="center", fontsize=8)


def _set_limits(ax: Any, panel: Panel) -> None:
    """x: the steps of the panel's scope (so panels of one run line up), whole-number ticks; y, for
    one point or a constant series: from 0 to a quarter past the value, not matplotlib's +-5%."""
    from matplotlib.ticker import MaxNLocator

    steps = [r["step"] for r in panel.scope]
    margin = max(1.0, 0.03 * (max(steps) - min(steps)))
    ax.set_xlim(min(steps) - margin, max(steps) + margin)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    values = {v for _, v, _ in panel.points if math.isfinite(v)}
    if len(values) == 1:
        lo, hi = sorted((0.0, 1.25 * values.pop()))
        hi = hi if hi > lo else 1.0
        ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))


def metrics_figure(records: list[dict[str, Any]], title: str = "") -> Any:
    """The matplotlib Figure of records' panels (None without matplotlib or a plotted metric).
    A bare Figure, not pyplot: no backend is switched and nothing global is left open."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        say_once(NO_MATPLOTLIB)
        return None
    chosen = panels(records)
    if not chosen:
        return None
    cols = min(3, len(chosen))
    rows = math.ceil(len(chosen) / cols)
    fig = Figure(figsize=(4.5 * cols, 3.2 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, panel in zip(axes.flat, chosen, strict=False):
        _mark_stages(ax, panel.scope)
        _draw_series(ax, panel)
        ax.set_title(panel.title)
        ax.set_xlabel("step")
        _set_limits(ax, panel)
    for ax in list(axes.flat)[len(chosen):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_metrics(jsonl: Path, png: Path) -> bool:
    """metrics_figure of the JSONL's records into png; False when nothing was drawn."""
    fig = metrics_figure(read_metrics(jsonl), jsonl.parent.name)
    if fig is None:
        return False
    atomic.write_file(png, lambda f: fig.savefig(f, format="png", dpi=100))
    return True


def say_once(message: str) -> None:
    """message on stderr, the first time this process says it (not once per plot)."""
    if message not in _said:
        _said.add(message)
        print(message, file=sys.stderr, flush=True)
