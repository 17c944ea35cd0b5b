"""`rlops profile`: where the memory of one RL step goes, measured stage by stage.

One GRPO or PPO step of rlops' own trainers (rlops.trainers) runs on a model built from a
config with random weights (nothing is downloaded), with the loss computed in eager PyTorch,
by rlops' fused kernels on the logits, or by the fused-linear kernels that never make them.
Each stage of the step (generation, reference log-probs, policy forward, loss, backward,
optimizer step, and for PPO the reward model and the critic) reports its peak and its
end-of-stage allocated bytes, and the allocations of the whole step are drawn as a timeline.

Measured with the CUDA caching allocator's counters (`torch.cuda.max_memory_allocated`) and
its allocation history (`torch.cuda.memory._record_memory_history`). Without CUDA, the same
step runs on CPU with `AllocationTracker`, which counts the bytes of the tensors torch
allocates the way the CUDA counters do, so that small configurations can be profiled, and the
estimate of `rlops.memory` checked, on any machine.

The generation stage is the memory of decoding, measured without decoding token by token: a
chunked prefill of prompt and response that fills the same key-value cache (generation's
peak is the full cache plus one step's activations). The sampled tokens are random ids, all
responses of full length.
"""

from __future__ import annotations

import contextlib
import gc
import json
import time
import types
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .memory import MemoryEstimate, ModelDims, StepShape, estimate
from .trainers._common import LOSS_IMPLS, Rollout, Task

ALGOS = ("grpo", "ppo")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Architecture sizes of public models (their config.json), so no download is needed. Weights are random.
PRESETS: dict[str, dict[str, Any]] = {
    "Qwen/Qwen2.5-0.5B": {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
                          "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                          "vocab_size": 151936, "tie_word_embeddings": True},
    "Qwen/Qwen2.5-1.5B": {"model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960,
                          "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
                          "vocab_size": 151936, "tie_word_embeddings": True},
    "Qwen/Qwen2.5-7B": {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
                        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                        "vocab_size": 152064, "tie_word_embeddings": False},
    "meta-llama/Llama-3.2-1B": {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
                                "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
                                "vocab_size": 128256, "tie_word_embeddings": True},
    "meta-llama/Llama-3.1-8B": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
                                "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                                "vocab_size": 128256, "tie_word_embeddings": False},
}


def model_config(model: str) -> Any:
    """A transformers config: a PRESETS name, a config.json (or a directory holding one), or a
    name in the local Hugging Face cache. Nothing is downloaded."""
    from transformers import AutoConfig

    if model in PRESETS:
        values = dict(PRESETS[model])
        return AutoConfig.for_model(values.pop("model_type"), **values)
    path = Path(model)
    if path.is_file():
        values = json.loads(path.read_text())
        if "model_type" not in values:
            raise ValueError(f"{path} has no model_type")
        return AutoConfig.for_model(values.pop("model_type"), **values)
    try:
        return AutoConfig.from_pretrained(model, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"model {model!r} is not a preset ({', '.join(PRESETS)}), a config.json, or a directory or "
                         "name in the local Hugging Face cache") from e


# ------------------------------------------------------------------------------------------
# Meters: bytes allocated, stage by stage
# ------------------------------------------------------------------------------------------


class AllocationTracker(TorchDispatchMode):
    """Counts the bytes of the tensor storages created while it is active, and their peak, as
    CUDA's allocated-bytes counters do (without the caching allocator's rounding).

    A storage counts from the operation that makes it until it is freed, which a weak
    reference observes, however long autograd keeps it. Storages made before the tracker
    started (weights, inputs) are not counted: add them as a baseline.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.timeline: list[int] = []  # live bytes after each allocation or free
        self._sizes: dict[tuple[str, int], int] = {}

    def _free(self, key: tuple[str, int]) -> None:
        size = self._sizes.pop(key, 0)
        if size:
            self.live -= size
            self.timeline.append(self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Views and in-place results share an input's storage: no allocation.
        inputs = {(str(t.device), t.untyped_storage().data_ptr())
                  for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = (str(t.device), storage.data_ptr())
                if storage.nbytes() and key not in self._sizes and key not in inputs:
                    self._sizes[key] = storage.nbytes()
                    weakref.finalize(storage, self._free, key)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    self.timeline.append(self.live)
        return out


@dataclass
class Stage:
    name: str
    start_bytes: int
    peak_bytes: int
    end_bytes: int
    first_event: int  # index into the timeline
    last_event: int


class Meter:
    """Stage-by-stage bytes on one device: CUDA's counters, or an AllocationTracker on CPU."""

    def __init__(self, device: torch.device, cpu_baseline: int = 0) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        # Bytes allocated before the step: CUDA counts them itself; on CPU the tracker sees only new ones.
        self.baseline = cpu_baseline
        if self.cuda:
            torch.cuda.synchronize(device)
            self.baseline = torch.cuda.memory_allocated(device)
        self.stages: list[Stage] = []
        self.tracker: AllocationTracker | None = None
        self._history: list[dict[str, Any]] | None = None

    def allocated(self) -> int:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device)
        return self.baseline + (self.tracker.live if self.tracker else 0)

    def _events(self) -> int:
        if self.cuda:
            return len(self._trace())
        return len(self.tracker.timeline) if self.tracker else 0

    def _trace(self) -> list[dict[str, Any]]:
        snapshot = torch.cuda.memory._snapshot(self.device)
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        return snapshot["device_traces"][index]

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Counts (and on CUDA records the allocation history) while the step runs."""
        if self.cuda:
            # No stack traces: the timeline needs only sizes, and recording stacks would slow the step.
            torch.cuda.memory._record_memory_history(context=None, max_entries=2_000_000, device=self.device)
            try:
                yield
            finally:
                self._history = self._trace()
                torch.cuda.memory._record_memory_history(enabled=None, device=self.device)
            return
        self.tracker = AllocationTracker()
        with self.tracker:
            yield

    def _reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.tracker is not None:
            self.tracker.peak = self.tracker.live

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return self.baseline + (self.tracker.peak if self.tracker else 0)

    def _collect(self) -> None:
        # Triton's interpreter keeps each launch's arguments in a reference cycle until the next
        # collection, which compiled kernels on a GPU do not: collect so the CPU counts match.
        if not self.cuda:
            gc.collect()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Measures the block as one stage of the step."""
        self._collect()
        start, first = self.allocated(), self._events()
        self._reset_peak()
        yield
        peak = self.peak()
        self._collect()
        self.stages.append(Stage(name, start, peak, self.allocated(), first, self._events()))

    def timeline(self) -> list[int]:
        """Allocated bytes after each allocation and free of the step."""
        if not self.cuda:
            return [self.baseline + b for b in (self.tracker.timeline if self.tracker else [])]
        level, points = self.baseline, []
        entries = self._history or []
        frees = "free_requested" if any(e["action"] == "free_requested" for e in entries) else "free_completed"
        for e in entries:
            if e["action"] == "alloc":
                level += e["size"]
            elif e["action"] == frees:
                level -= e["size"]
            else:
                continue
            points.append(level)
        return points


# ------------------------------------------------------------------------------------------
# One profiled step
# ------------------------------------------------------------------------------------------


@dataclass
class ProfileConfig:
    model: str = "Qwen/Qwen2.5-0.5B"
    algo: str = "grpo"
    loss_impl: str = "fused-linear"
    batch: int = 8  # sequences per step (GRPO: prompts x group_size)
    group_size: int = 8  # GRPO
    prompt_len: int = 256
    response_len: int = 1024
    dtype: str = "bf16"  # weights, activations, gradients and optimizer states
    kl_coef: float = 0.04  # > 0: a reference model; 0: none
    reward_model: bool = True  # PPO: a reward model of the policy's size (GRPO uses rule rewards)
    gradient_checkpointing: bool = False  # recompute each decoder layer in the backward
    generation_chunk: int = 512  # tokens per prefill chunk of the generation stage
    device: str | None = None

    def __post_init__(self) -> None:
        if self.algo not in ALGOS:
            raise ValueError(f"algo must be one of {ALGOS}, got {self.algo!r}")
        if self.loss_impl not in LOSS_IMPLS:
            raise ValueError(f"loss_impl must be one of {LOSS_IMPLS}, got {self.loss_impl!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        for name in ("batch", "prompt_len", "response_len", "generation_chunk"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if self.algo == "grpo" and (self.group_size < 2 or self.batch % self.group_size):
            raise ValueError(f"GRPO's batch ({self.batch}) must be a multiple of group_size ({self.group_size} >= 2)")


@dataclass
class StepProfile:
    config: ProfileConfig
    device: str
    baseline_bytes: int  # weights (and nothing else) before the step
    peak_bytes: int
    stages: list[Stage]
    timeline: list[int] = field(repr=False)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"config": asdict(self.config), "device": self.device, "baseline_bytes": self.baseline_bytes,
                "peak_bytes": self.peak_bytes, "stages": [asdict(s) for s in self.stages], "seconds": self.seconds}


class _Tokens:
    """The ids a trainer needs from a tokenizer, for random token sequences."""

    def __init__(self, vocab: int) -> None:
        self.pad_token_id, self.eos_token_id, self.bos_token_id = 0, 1, None
        self.vocab = vocab

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        return ""


def _tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _build(config: ProfileConfig, device: torch.device) -> tuple[Any, list[nn.Module]]:
    """The trainer of one step, with a synthetic rollout; and every model it holds."""
    from transformers import AutoModelForCausalLM

    from .trainers import GRPOConfig, GRPOTrainer, PPOConfig, PPOTrainer, ValueModel

    dtype = DTYPES[config.dtype]
    hf_config = model_config(config.model)
    hf_config.use_cache = False
    with torch.device(device):
        try:
            policy = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation="sdpa")
        except TypeError:  # transformers before 4.56 names it torch_dtype
            policy = AutoModelForCausalLM.from_config(hf_config, torch_dtype=dtype, attn_implementation="sdpa")
    task: Task[int] = Task(prompt=lambda i: "", reward=lambda text, i: float(i % 3), correct=lambda text, i: 0.0)
    tokens = _Tokens(hf_config.vocab_size)
    # On CPU the fused ops run their Triton kernels in the interpreter, so the bytes are the kernels' (the
    # CPU reference path of backend="auto" allocates differently).
    from . import kernels

    backend = "triton" if device.type == "cpu" and kernels.INTERPRETED else "auto"
    common = {"steps": 1, "progress": False, "device": str(device), "max_new_tokens": config.response_len,
              "minibatches": 1, "epochs": 1, "kl_coef": config.kl_coef, "loss_impl": config.loss_impl,
              "backend": backend, "gradient_checkpointing": config.gradient_checkpointing}
    if config.algo == "grpo":
        trainer = GRPOTrainer(policy, tokens, task, list(range(config.batch)), GRPOConfig(
            prompts_per_step=config.batch // config.group_size, group_size=config.group_size, **common))
    else:
        reward_model = ValueModel.from_causal_lm(policy) if config.reward_model else None
        trainer = PPOTrainer(policy, tokens, task, list(range(config.batch)),
                             PPOConfig(prompts_per_step=config.batch, **common), reward_model=reward_model)
    trainer.rollout = types.MethodType(_synthetic_rollout(config), trainer)
    models = [trainer.model, trainer.reference, getattr(trainer, "critic", None),
              getattr(trainer, "reward_model", None)]
    return trainer, [m for m in models if m is not None]


def _synthetic_rollout(config: ProfileConfig):
    def rollout(self: Any, items: Sequence[Any]) -> Rollout:
        device, n = self.procs.device, len(items)
        vocab = self.model.config.vocab_size
        with self.stage("generation"), torch.no_grad():
            # Ids from 2 up: never the pad (0) or end-of-sequence (1) id, so every response has full length.
            prompt = torch.randint(2, vocab, (n, config.prompt_len), device=device)
            completion = torch.randint(2, vocab, (n, config.response_len), device=device)
            prefill(self.model, torch.cat([prompt, completion], dim=1)[:, :-1], config.generation_chunk)
        ones = torch.ones_like
        return Rollout(prompt, ones(prompt), completion, ones(completion), [""] * n)

    return rollout


@torch.no_grad()
def prefill(model: nn.Module, ids: torch.Tensor, chunk: int) -> None:
    """Fills a key-value cache with ids, chunk tokens at a time, as decoding them would."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config) if "config" in DynamicCache.__init__.__code__.co_varnames \
        else DynamicCache()
    was_training = model.training
    model.eval()  # as generate() runs: gradient checkpointing (a training-mode feature) would drop the cache
    for start in range(0, ids.shape[1], chunk):
        part = ids[:, start:start + chunk]
        positions = torch.arange(start, start + part.shape[1], device=ids.device).expand(part.shape)
        model(input_ids=part, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1)
    model.train(was_training)
    del cache


def profile_step(config: ProfileConfig) -> StepProfile:
    """Runs one GRPO or PPO step and measures it stage by stage."""
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    trainer, models = _build(config, device)
    tensors = [t for m in models for t in (*m.parameters(), *m.buffers())]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    meter = Meter(device, _tensor_bytes(tensors))
    baseline = meter.baseline
    trainer.stage = meter.stage
    started = time.perf_counter()
    meter._reset_peak()
    with meter.recording():
        trainer.step()
    peak = meter.peak()
    seconds = time.perf_counter() - started
    return StepProfile(config, str(torch.cuda.get_device_name(device) if meter.cuda else "cpu"), baseline,
                       max([peak, *(s.peak_bytes for s in meter.stages)]), meter.stages, meter.timeline(), seconds)


# ------------------------------------------------------------------------------------------
# Estimates, reports and the command
# ------------------------------------------------------------------------------------------


def estimate_for(config: ProfileConfig, device: str = "cuda") -> MemoryEstimate:
    """rlops.memory's estimate of the step config describes."""
    dims = ModelDims.from_config(model_config(config.model))
    return estimate(dims, StepShape(
        algo=config.algo, loss_impl=config.loss_impl, batch=config.batch, prompt_len=config.prompt_len,
        response_len=config.response_len, dtype_bytes=torch.finfo(DTYPES[config.dtype]).bits // 8,
        reference=config.kl_coef > 0, reward_model=config.reward_model, generation_chunk=config.generation_chunk,
        gradient_checkpointing=config.gradient_checkpointing, device=device))


def _gb(n: int | float | None) -> str:
    return "-" if n is None else f"{n / 1e9:.3g}"


def _describe(c: ProfileConfig) -> str:
    ckpt = ", gradient checkpointing" if c.gradient_checkpointing else ""
    return f"{c.model}, batch {c.batch} x ({c.prompt_len} + {c.response_len}) tokens, {c.dtype}{ckpt}"


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


def main(argv: list[str] | None = None, prog: str = "rlops profile") -> int:
    """`rlops profile`: measure (or with --estimate, estimate) one RL step's memory per loss implementation."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="Qwen/Qwen2.5-0.5B",
                        help=f"a preset ({', '.join(PRESETS)}), a config.json, or a local Hugging Face model "
                             "(random weights; nothing is downloaded)")
    parser.add_argument("--algo", nargs="+", default=list(ALGOS), choices=ALGOS)
    parser.add_argument("--loss", nargs="+", default=list(LOSS_IMPLS), choices=LOSS_IMPLS)
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--group-size", type=int, default=8, help="GRPO's samples per prompt")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--response-len", type=int, nargs="+", default=[1024])
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--kl-coef", type=float, default=0.04, help="> 0 keeps a reference model")
    parser.add_argument("--no-reward-model", action="store_true", help="PPO without a reward model (rule rewards)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--generation-chunk", type=int, default=512)
    parser.add_argument("--device", help="default: cuda when present, else cpu (small configs only)")
    parser.add_argument("--estimate", action="store_true", help="the analytic estimate only: no model is run")
    parser.add_argument("--out", type=Path, help="default: bench/results/<device>/ of this checkout")
    args = parser.parse_args(argv)
    try:
        configs = [ProfileConfig(model=args.model, algo=algo, loss_impl=loss, batch=args.batch,
                                 group_size=args.group_size, prompt_len=args.prompt_len, response_len=t,
                                 dtype=args.dtype, kl_coef=args.kl_coef, reward_model=not args.no_reward_model,
                                 gradient_checkpointing=args.gradient_checkpointing,
                                 generation_chunk=args.generation_chunk, device=args.device)
                   for algo in args.algo for t in args.response_len for loss in args.loss]
        model_config(args.model)
    except ValueError as e:
        parser.error(str(e))
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
