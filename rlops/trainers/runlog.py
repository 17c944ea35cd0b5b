"""The metrics of a run: out_dir/metrics.jsonl (one JSON line per step, each appended and synced:
a kill tears at most the last line, which readers skip), its plot out_dir/metrics.png, and the
progress bar."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from . import atomic


class RunLog:
    """Metrics of a run: one JSON line per step in out_dir/metrics.jsonl, a plot in
    out_dir/metrics.png, and a progress bar. Only rank 0 writes."""

    PLOTTED = ("reward", "accuracy", "eval_accuracy", "kl", "entropy", "response_length", "loss", "value_loss",
               "pairwise_accuracy", "eval_pairwise_accuracy")

    def __init__(self, out_dir: Path | None, total: int, start: int, enabled: bool, desc: str,
                 progress: bool = True) -> None:
        self.path = None if out_dir is None or not enabled else out_dir / "metrics.jsonl"
        self.enabled = enabled
        self.bar = None
        if enabled and progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True)
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
            self.bar.update(1)
            shown = {k: f"{metrics[k]:.3g}" for k in ("loss", "reward", "accuracy", "eval_accuracy", "kl")
                     if k in metrics}
            self.bar.set_postfix(shown, refresh=False)

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


def plot_metrics(jsonl: Path, png: Path) -> bool:
    """One panel per metric of RunLog.PLOTTED present in the JSONL, against step."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    records = read_metrics(jsonl)
    keys = [k for k in RunLog.PLOTTED if any(k in r for r in records)]
    if not keys:
        return False
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, squeeze=False, figsize=(4.5 * cols, 3.2 * rows))
    for ax, key in zip(axes.flat, keys, strict=False):
        points = [(r["step"], r[key]) for r in records if key in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 50 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(jsonl.parent.name)
    fig.tight_layout()
    atomic.write_file(png, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return True

