"""The per-op plots of a benchmark run, drawn from its JSON: time and extra memory against each
swept shape dimension (N, V, ...) per provider, or per shape as bars where no dimension is swept."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .common import extra_gb, shape_text, total_ms

Row = tuple[str, Callable[[dict[str, Any]], float | None]]
Panel = tuple[str | None, dict[str, int], list[dict[str, Any]]]
TITLE_POINTS = 11
PANEL_INCHES = (5.5, 3.8)  # width, height of one panel


def _sweeps(records: list[dict[str, Any]]) -> list[Panel]:
    """(axis, fixed dims, records) for each shape key that varies with the other dims held fixed:
    the slice with the most points along it, ties to the largest fixed dims."""
    sweeps: list[Panel] = []
    for axis in records[0]["shape"]:
        slices: dict[tuple, list[dict[str, Any]]] = {}
        for r in records:
            fixed = tuple((k, v) for k, v in r["shape"].items() if k != axis)
            slices.setdefault(fixed, []).append(r)
        fixed, chosen = max(slices.items(), key=lambda kv: (len({r["shape"][axis] for r in kv[1]}), kv[0]))
        if len({r["shape"][axis] for r in chosen}) > 1:
            sweeps.append((axis, dict(fixed), chosen))
    return sweeps


def title(op: str, run: dict[str, Any], width_inches: float) -> str:
    """The figure's title, wrapped to the figure's width: device names and commits vary in length,
    and a title wider than its figure is clipped at both ends."""
    # About 0.6 em per character on average; 0.65 leaves a margin for wide glyphs.
    chars = max(20, int(width_inches * 72 / (TITLE_POINTS * 0.65)))
    return textwrap.fill(f"{op} on {run['device']} ({run['commit']})", width=chars)


def _bars(ax: Any, chosen: list[dict[str, Any]], value: Callable, providers: list[str]) -> None:
    """One group of bars per shape, one bar per provider."""
    names = list(dict.fromkeys(shape_text(r["shape"]) for r in chosen))
    width = 0.8 / len(providers)
    for k, provider in enumerate(providers):
        pts = [(names.index(shape_text(r["shape"])), value(r))
               for r in chosen if r["provider"] == provider and value(r) is not None]
        offset = (k - (len(providers) - 1) / 2) * width
        ax.bar([x + offset for x, _ in pts], [y for _, y in pts], width, label=provider)
    ax.set_xticks(range(len(names)), names, fontsize=8)


def _lines(ax: Any, panel: Panel, value: Callable, providers: list[str]) -> None:
    """One line per provider along the panel's swept axis (log 2: shapes double)."""
    axis, fixed, chosen = panel
    for provider in providers:
        pts = sorted((r["shape"][axis], value(r)) for r in chosen if r["provider"] == provider and value(r) is not None)
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=provider)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"{axis}  ({shape_text(fixed)})" if fixed else axis)


def _rows(records: list[dict[str, Any]]) -> list[Row]:
    """The quantities with at least one value: time, and extra memory where it was measured (CUDA)."""
    rows: list[Row] = [("time (ms): fwd+bwd, or fwd alone", total_ms), ("extra peak memory (GB)", extra_gb)]
    return [(label, value) for label, value in rows if any(value(r) is not None for r in records)]


def figure(op: str, run: dict[str, Any], records: list[dict[str, Any]]) -> Any:
    """The op's figure (a matplotlib Figure); records are the op's, each with a time or a memory value."""
    import matplotlib.pyplot as plt

    rows, panels = _rows(records), _sweeps(records) or [(None, {}, records)]
    width = PANEL_INCHES[0] * len(panels)
    # Constrained layout keeps the (wrapped) title, labels and legends inside the figure.
    fig, axes = plt.subplots(len(rows), len(panels), squeeze=False, layout="constrained",
                             figsize=(width, PANEL_INCHES[1] * len(rows)))
    for col, panel in enumerate(panels):
        providers = list(dict.fromkeys(r["provider"] for r in panel[2]))
        for row, (label, value) in enumerate(rows):
            ax = axes[row, col]
            if panel[0] is None:
                _bars(ax, panel[2], value, providers)
            else:
                _lines(ax, panel, value, providers)
            ax.set_ylabel(label)
            if value is total_ms:  # times span decades; extra memory can be 0 or negative (in-place providers)
                ax.set_yscale("log")
            ax.legend(fontsize=7)
    fig.suptitle(title(op, run, width), fontsize=TITLE_POINTS)
    return fig


def plots(run: dict[str, Any], out_dir: Path, stem: str) -> list[Path]:
    """One figure per op with a time or a memory value, written as <stem>-<op>.png. A run without
    timing (the interpreter, no CUDA) has neither, and draws nothing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots written")
        return []
    written = []
    for op in dict.fromkeys(r["op"] for r in run["records"]):
        records = [r for r in run["records"] if r["op"] == op and not r.get("error")
                   and (total_ms(r) is not None or extra_gb(r) is not None)]
        if not records:
            continue
        fig = figure(op, run, records)
        path = out_dir / f"{stem}-{op}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    if not written and run.get("note"):
        print(f"no plots: {run['note']}")
    return written
