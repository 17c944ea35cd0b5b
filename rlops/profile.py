"""The measuring behind `rlops profile`: where the memory of one RL step goes, stage by stage.

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
responses of full length unless min_response_len spreads their lengths (padding, which the
trainers' packing removes).

The command line (arguments, tables, the timeline plot) is rlops.profile_cli; this module is the
measuring: the allocation meters, the step's configuration and model, and rlops.memory's estimate of it.
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
from .trainers.base import LOSS_IMPLS
from .trainers.rollout import Rollout, Task

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


def default_group_size(batch: int) -> int:
    """GRPO's sequences per prompt when none is given: the largest divisor of batch from 2 to 8 (GRPO
    recipes often sample 8 per prompt), else batch itself (one prompt); 1 for a batch of 1, which GRPO
    cannot use (the advantage is relative to the prompt's group)."""
    return next((g for g in range(min(8, batch), 1, -1) if batch % g == 0), batch)


@dataclass
class ProfileConfig:
    model: str = "Qwen/Qwen2.5-0.5B"
    algo: str = "grpo"
    loss_impl: str = "fused-linear"
    batch: int = 4  # sequences per step (GRPO: prompts x group_size); README's tables use 4
    group_size: int | None = None  # GRPO's sequences per prompt; None: default_group_size(batch)
    prompt_len: int = 256
    response_len: int = 1024
    # Responses' lengths spread evenly from this to response_len (padding in the batch); None: all response_len.
    min_response_len: int | None = None
    packing: bool = False  # the trainers' packing: the sequences in one row without padding
    dtype: str = "bf16"  # weights, activations, gradients and optimizer states
    kl_coef: float = 0.04  # > 0: a reference model; 0: none
    reward_model: bool = True  # PPO: a reward model of the policy's size (GRPO uses rule rewards)
    gradient_checkpointing: bool = False  # recompute each decoder layer in the backward
    generation_chunk: int = 512  # tokens per prefill chunk of the generation stage
    device: str | None = None

    def __post_init__(self) -> None:
        if self.group_size is None and isinstance(self.batch, int):
            self.group_size = default_group_size(self.batch)
        if self.algo not in ALGOS:
            raise ValueError(f"algo must be one of {ALGOS}, got {self.algo!r}")
        if self.loss_impl not in LOSS_IMPLS:
            raise ValueError(f"loss_impl must be one of {LOSS_IMPLS}, got {self.loss_impl!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        for name in ("batch", "prompt_len", "response_len", "generation_chunk"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if self.min_response_len is not None and not (isinstance(self.min_response_len, int)
                                                      and 1 <= self.min_response_len <= self.response_len):
            raise ValueError(f"min_response_len must be an int in [1, response_len = {self.response_len}], got "
                             f"{self.min_response_len!r}")
        if self.algo == "grpo" and (self.group_size < 2 or self.batch % self.group_size):
            raise ValueError(f"GRPO's batch ({self.batch}) must be a multiple of group_size ({self.group_size}), "
                             "and group_size at least 2")


    @property
    def response_lens(self) -> tuple[int, ...]:
        """Each sequence's response tokens: evenly spread from min_response_len up to response_len."""
        low = self.response_len if self.min_response_len is None else self.min_response_len
        return tuple(low + (self.response_len - low) * k // max(self.batch - 1, 1) for k in range(self.batch))


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
              "backend": backend, "gradient_checkpointing": config.gradient_checkpointing,
              "packing": config.packing}
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
        # Each response ends at its length (the rest is padding), as sampling stops at end-of-sequence.
        lens = torch.tensor(config.response_lens[:n], device=device)
        mask = (torch.arange(config.response_len, device=device) < lens[:, None]).long()
        return Rollout(prompt, torch.ones_like(prompt), completion.masked_fill(mask == 0, 0), mask, [""] * n)

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
# The analytic estimate of the same step
# ------------------------------------------------------------------------------------------


def estimate_for(config: ProfileConfig, device: str = "cuda") -> MemoryEstimate:
    """rlops.memory's estimate of the step config describes."""
    dims = ModelDims.from_config(model_config(config.model))
    return estimate(dims, StepShape(
        algo=config.algo, loss_impl=config.loss_impl, batch=config.batch, prompt_len=config.prompt_len,
        response_len=config.response_len, dtype_bytes=torch.finfo(DTYPES[config.dtype]).bits // 8,
        reference=config.kl_coef > 0, reward_model=config.reward_model, generation_chunk=config.generation_chunk,
        gradient_checkpointing=config.gradient_checkpointing, device=device, packing=config.packing,
        response_lens=config.response_lens))
