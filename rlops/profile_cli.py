"""`rlops profile`: where the memory of one RL step goes, measured stage by stage.

The command line of `rlops profile`: parses the arguments, runs rlops.profile's measurements (or with
--estimate, rlops.memory's estimate) for each (algo, loss implementation, response length), prints
markdown tables of the stages and of the step peaks, and writes them, as JSON too, with a plot of the
allocation timeline. The module docstring's first paragraph is the command's description.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn

import torch

from .memory import MemoryEstimate
from .profile import (
    ALGOS,
    DTYPES,
    LOSS_IMPLS,
    PRESETS,
    ProfileConfig,
    StepProfile,
    default_group_size,
    estimate_for,
    model_config,
    profile_step,
)


def _gb(n: int | float | None) -> str:
    return "-" if n is None else f"{n / 1e9:.3g}"


def _describe(c: ProfileConfig) -> str:
    ckpt = ", gradient checkpointing" if c.gradient_checkpointing else ""
    spread = "" if c.min_response_len is None else f", responses of {c.min_response_len} to {c.response_len} tokens"
    packing = ", packed" if c.packing else ""
    return f"{c.model}, batch {c.batch} x ({c.prompt_len} + {c.response_len}) tokens{spread}{packing}, {c.dtype}{ckpt}"


def stage_table(profile: StepProfile, est: MemoryEstimate | None = None) -> str:
    """Markdown: each stage's measured peak, the estimate, and the bytes allocated at its end."""
    c = profile.config
    lines = [f"{c.algo.upper()} step, loss {c.loss_impl}, {_describe(c)}, on {profile.device}: peak "
             f"{_gb(profile.peak_bytes)} GB" + ("" if est is None else f" (estimate {_gb(est.peak)} GB)") +
             f"; weights before the step {_gb(profile.baseline_bytes)} GB", "",
             "| stage | peak GB | estimate GB | allocated at end GB |", "|---|---|---|---|"]
    for st in profile.stages:
        lines.append(f"| {st.name} | {_gb(st.peak_bytes)} | {_gb(None if est is None else est.stages.get(st.name))} "
                     f"| {_gb(st.end_bytes)} |")
    return "\n".join(lines) + "\n"


def what_if_table(cases: Sequence[tuple[ProfileConfig, int | str | None, MemoryEstimate]]) -> str:
    """Markdown: the step's peak per loss implementation, one row per (algo, tokens): measured (or the
    error, such as out of memory) and estimated."""
    impls = list(dict.fromkeys(c.loss_impl for c, _, _ in cases))
    rows: dict[tuple, dict[str, str]] = {}
    for c, measured, est in cases:
        if measured is None:
            cell = f"est. {_gb(est.peak)}"
        elif isinstance(measured, str):
            cell = f"{measured} (est. {_gb(est.peak)})"
        else:
            cell = f"{_gb(measured)} (est. {_gb(est.peak)})"
        rows.setdefault((c.algo, c.prompt_len, c.response_len), {})[c.loss_impl] = cell
    lines = ["| algo | tokens per sequence | " + " | ".join(f"{i} peak GB" for i in impls) + " |",
             "|---|---|" + "---|" * len(impls)]
    for (algo, prompt, response), cells in rows.items():
        lines.append(f"| {algo} | {prompt} + {response} | " + " | ".join(cells.get(i, "-") for i in impls) + " |")
    return "\n".join(lines) + "\n"


def components_table(configs: Sequence[ProfileConfig], device: str = "cuda") -> str:
    """Markdown: the estimate's components and stage peaks, one column per config (PPO vs GRPO, ...)."""
    ests = [estimate_for(c, device) for c in configs]
    names = [f"{c.algo.upper()} {c.loss_impl}" for c in configs]
    lines = ["| GB | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key in ests[0].components:
        lines.append(f"| {key} | " + " | ".join(_gb(e.components[key]) for e in ests) + " |")
    stages = list(dict.fromkeys(k for e in ests for k in e.stages))
    for stage in stages:
        lines.append(f"| peak in {stage} | " + " | ".join(_gb(e.stages.get(stage)) for e in ests) + " |")
    lines.append("| **step peak** | " + " | ".join(f"**{_gb(e.peak)}**" for e in ests) + " |")
    return "\n".join(lines) + "\n"


def plot_timeline(profiles: Sequence[StepProfile], path: Path) -> bool:
    """Allocated bytes over the allocation events of each step, stages shaded; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    if not profiles:
        return False
    fig, axes = plt.subplots(len(profiles), 1, squeeze=False, figsize=(11, 2.8 * len(profiles)))
    for ax, p in zip(axes[:, 0], profiles, strict=True):
        ax.plot([b / 1e9 for b in p.timeline], linewidth=0.8, color="black")
        for k, st in enumerate(p.stages):
            ax.axvspan(st.first_event, max(st.last_event, st.first_event + 1), alpha=0.25, color=f"C{k % 10}",
                       label=st.name)
        c = p.config
        ax.set_title(f"{c.algo} / {c.loss_impl}: {c.batch} x ({c.prompt_len} + {c.response_len}) tokens, peak "
                     f"{_gb(p.peak_bytes)} GB", fontsize=9)
        ax.set_ylabel("allocated (GB)")
        ax.legend(fontsize=6, ncol=6, loc="upper left")
    axes[-1, 0].set_xlabel("allocation event")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def build_parser(prog: str = "rlops profile") -> argparse.ArgumentParser:
    """The arguments of `rlops profile`: every option has a help line, with its choices and unit.
    Defaults are ProfileConfig's, so the command and the library describe the same step."""
    d = ProfileConfig
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=d.model,
                        help=f"a preset ({', '.join(PRESETS)}), a config.json, or a model in the local Hugging Face "
                             f"cache; random weights, nothing is downloaded (default: {d.model})")
    parser.add_argument("--algo", nargs="+", default=list(ALGOS), choices=ALGOS, metavar="ALGO",
                        help=f"RL algorithms, one or more of: {', '.join(ALGOS)} (default: all)")
    parser.add_argument("--loss", nargs="+", default=list(LOSS_IMPLS), choices=LOSS_IMPLS, metavar="IMPL",
                        help=f"loss implementations, one or more of: {', '.join(LOSS_IMPLS)} (default: all)")
    parser.add_argument("--batch", type=int, default=d.batch, metavar="N",
                        help=f"sequences per step; for GRPO, prompts x --group-size (default: {d.batch})")
    parser.add_argument("--group-size", type=int, metavar="N",
                        help="GRPO's sequences per prompt (default: the largest divisor of --batch from 2 to 8, "
                             "else --batch itself)")
    parser.add_argument("--prompt-len", type=int, default=d.prompt_len, metavar="TOKENS",
                        help=f"prompt tokens per sequence (default: {d.prompt_len})")
    parser.add_argument("--response-len", type=int, nargs="+", default=[d.response_len], metavar="TOKENS",
                        help=f"response tokens per sequence; one or more, a step each (default: {d.response_len})")
    parser.add_argument("--min-response-len", type=int, metavar="TOKENS",
                        help="shortest response in tokens: the responses' lengths spread evenly from it to "
                             "--response-len, the rest of each row padding (default: every response full length)")
    parser.add_argument("--packing", action="store_true",
                        help="the trainers' packing: each step's sequences in one row without padding (sdpa then "
                             "needs an (N, N) mask of the N packed tokens)")
    parser.add_argument("--dtype", default=d.dtype, choices=list(DTYPES),
                        help=f"dtype of weights, activations, gradients and optimizer states, one of: "
                             f"{', '.join(DTYPES)} (default: {d.dtype})")
    parser.add_argument("--kl-coef", type=float, default=d.kl_coef, metavar="COEF",
                        help=f"KL penalty coefficient (no unit); > 0 keeps a reference model (default: {d.kl_coef})")
    parser.add_argument("--no-reward-model", action="store_true", help="PPO without a reward model (rule rewards)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute each decoder layer in the backward (less activation memory)")
    parser.add_argument("--generation-chunk", type=int, default=d.generation_chunk, metavar="TOKENS",
                        help=f"tokens per prefill chunk of the generation stage (default: {d.generation_chunk})")
    parser.add_argument("--device", help="torch device to measure on, such as cuda, cuda:1 or cpu "
                                         "(default: cuda when present, else cpu: small configs only)")
    parser.add_argument("--estimate", action="store_true",
                        help="the analytic estimate only (rlops.memory): no model is run, no GPU needed")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="folder for the reports (default: bench/results/<device>/ of this checkout; "
                             "with --estimate, nothing is written without --out)")
    return parser


def check_dependencies(args: argparse.Namespace, prog: str) -> str | None:
    """One line naming a module the command needs that is not installed (and how to install it), or None.
    The models come from Hugging Face configs; measuring runs the Triton kernels (on CPU, interpreted)."""
    from .bench.common import missing_dependency

    needs = {"transformers": ("the models' configs and layers (Hugging Face)", "pip install 'rlops[train]'")}
    if not args.estimate:
        needs["triton"] = ("the fused kernels; Triton ships Linux wheels only", "pip install triton")
        if (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cpu"):
            needs["numpy"] = ("Triton's interpreter, which runs the kernels on CPU", "pip install numpy")
    return missing_dependency(prog, needs)


def _refuse(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    """Exits with status 2 and one line (argparse's error() would print the whole usage first)."""
    parser.exit(2, f"{parser.prog}: error: {message}\n")


def _group_size(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """--group-size, or its default for --batch; refuses (one line, before any work) a pair GRPO cannot use."""
    group = args.group_size or default_group_size(args.batch)
    if "grpo" in args.algo and args.batch >= 1 and (group < 2 or args.batch % group):
        example_group = max(group, 2)
        example_batch = max(example_group, -(-args.batch // example_group) * example_group)
        _refuse(parser, f"GRPO needs --batch to be a multiple of --group-size (at least 2), got --batch {args.batch} "
                        f"--group-size {group}; for example --batch {example_batch} --group-size {example_group}")
    return group


def main(argv: list[str] | None = None, prog: str = "rlops profile") -> int:
    """`rlops profile`: measure (or with --estimate, estimate) one RL step's memory per loss implementation."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    missing = check_dependencies(args, prog)
    if missing:
        print(missing, file=sys.stderr)
        return 2
    group = _group_size(args, parser)
    try:
        configs = [ProfileConfig(model=args.model, algo=algo, loss_impl=loss, batch=args.batch,
                                 group_size=group, prompt_len=args.prompt_len, response_len=t,
                                 min_response_len=args.min_response_len, packing=args.packing,
                                 dtype=args.dtype, kl_coef=args.kl_coef, reward_model=not args.no_reward_model,
                                 gradient_checkpointing=args.gradient_checkpointing,
                                 generation_chunk=args.generation_chunk, device=args.device)
                   for algo in args.algo for t in args.response_len for loss in args.loss]
        model_config(args.model)
    except ValueError as e:
        _refuse(parser, str(e))
    if args.estimate:
        return _print_estimates(configs, args)
    return _measure(configs, args)


def _print_estimates(configs: list[ProfileConfig], args: Any) -> int:
    """What --estimate prints (and writes with --out): components per (algo, loss), the what-if table."""
    text = [f"Estimated memory of one step (rlops.memory; no GPU used): {_describe(configs[0])}", ""]
    for t in args.response_len:
        same_t = [c for c in configs if c.response_len == t]
        text += [f"Response length {t}:", "", components_table(same_t)]
    text += ["Step peak per loss implementation (estimated):", "",
             what_if_table([(c, None, estimate_for(c)) for c in configs])]
    report = "\n".join(text)
    print(report)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "estimate.md").write_text(report)
        (args.out / "estimate.json").write_text(json.dumps(
            [{"config": asdict(c), "components": estimate_for(c).components, "stages": estimate_for(c).stages,
              "peak_bytes": estimate_for(c).peak} for c in configs], indent=1) + "\n")
    return 0


def _measure(configs: list[ProfileConfig], args: Any) -> int:
    """Runs every config's step, prints its stages, then writes JSON, markdown and the timeline plot."""
    from .bench.common import default_out_dir, environment, results_stem

    env = environment()
    device = configs[0].device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        print("no CUDA device: measuring on CPU (allocation tracker, Triton interpreter); small configs only")
    profiles, cases = [], []
    for k, config in enumerate(configs, 1):
        label = f"[{k}/{len(configs)}] {config.algo} {config.loss_impl} T={config.prompt_len}+{config.response_len}"
        est = estimate_for(config, "cuda" if device.startswith("cuda") else "cpu")
        try:
            profile = profile_step(config)
        except torch.cuda.OutOfMemoryError:
            print(f"{label}: out of memory (estimate {_gb(est.peak)} GB)", flush=True)
            cases.append((config, "out of memory", est))
            continue
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        print(f"{label}: peak {_gb(profile.peak_bytes)} GB (estimate {_gb(est.peak)} GB), {profile.seconds:.1f} s",
              flush=True)
        print(stage_table(profile, est), flush=True)
        profiles.append(profile)
        cases.append((config, profile.peak_bytes, est))
    table = what_if_table(cases)
    print(table)
    out = args.out or default_out_dir(str(profiles[0].device if profiles else device))
    out.mkdir(parents=True, exist_ok=True)
    stem = results_stem(env) + "-profile"
    report = "\n".join([f"Memory of one RL step: {_describe(configs[0])}; {env['device']}, commit {env['commit']}, "
                        f"{env['date']}, torch {env['torch']}", "", table,
                        *(stage_table(p, estimate_for(p.config, 'cuda' if device.startswith('cuda') else 'cpu'))
                          for p in profiles)])
    (out / f"{stem}.md").write_text(report)
    (out / f"{stem}.json").write_text(json.dumps({**env, "steps": [p.to_json() for p in profiles], "cases": [
        {"config": asdict(c), "measured": m, "estimate_bytes": e.peak} for c, m, e in cases]}, indent=1) + "\n")
    written = [out / f"{stem}.md", out / f"{stem}.json"]
    if plot_timeline(profiles, out / f"{stem}-timeline.png"):
        written.append(out / f"{stem}-timeline.png")
    for path in written:
        print(f"wrote {path}")
    return 0
