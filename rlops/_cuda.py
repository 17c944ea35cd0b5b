"""The CUDA C++ backend (csrc/): `torch.ops.rlops_cuda`, from the prebuilt `rlops._C` or built on
first use, and its launchers, with the signatures of rlops.kernels' Triton launchers.

`setup.py` builds `rlops._C` when it finds a CUDA build of PyTorch and nvcc (see its
docstring). Without it, the first op run with backend="cuda" compiles csrc/ through
`torch.utils.cpp_extension.load` (about a minute, cached under ~/.cache/torch_extensions).
Set RLOPS_CUDA_JIT=0 to forbid that build. Nothing here runs at `import rlops`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from ._layout import (
    RowLayout,
    byte_mask,
    check_policy_launch,
    flat,
    grad_strides,
    leading_rows,
    per_token,
    positions_of,
    row_layouts,
    unit_stride,
    zero_last_position,
)
from .constants import N_GRADS, N_POLICY_ROWS, N_STATS
from .options import Epilogue, TokenInputs

SOURCES = ("ops.cpp", "token_stats.cu", "gae.cu")
_state: dict[str, str | None] = {}


def source_dir() -> Path:
    """csrc/: installed inside the package as rlops/csrc, or beside it in a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if all((candidate / name).is_file() for name in SOURCES):
            return candidate
    raise FileNotFoundError(f"the CUDA sources {', '.join(SOURCES)} are not installed beside {here}")


def _registered() -> bool:
    return hasattr(torch.ops, "rlops_cuda") and hasattr(torch.ops.rlops_cuda, "token_stats_fwd")


def _jit_build() -> None:
    from torch.utils import cpp_extension

    src = source_dir()
    print("rlops: compiling the CUDA backend from csrc/ (first use only, about a minute)...", file=sys.stderr)
    cpp_extension.load(
        name="rlops_cuda",
        sources=[str(src / name) for name in SOURCES],
        extra_include_paths=[str(src)],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "-lineinfo"],
        is_python_module=False,
        verbose=os.environ.get("RLOPS_CUDA_VERBOSE") == "1",
    )


def _load() -> str | None:
    if torch.version.cuda is None:
        return f"PyTorch {torch.__version__} here is not a CUDA build"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    if _registered():
        return None
    try:
        from . import _C  # noqa: F401  (registers torch.ops.rlops_cuda)

        return None
    except ImportError:
        pass
    if os.environ.get("RLOPS_CUDA_JIT", "1") == "0":
        return "rlops._C was not built and RLOPS_CUDA_JIT=0 forbids building it on first use"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return ("rlops._C was not built and there is no CUDA toolkit (nvcc) to build it on first use; "
                "install one and set CUDA_HOME, or use backend='triton'")
    try:
        _jit_build()
    except Exception as err:  # the compiler's own message is the useful part
        return f"building the CUDA backend from {source_dir()} failed: {err}"
    return None if _registered() else "the CUDA backend built but registered no torch.ops.rlops_cuda ops"


def unavailable_reason() -> str | None:
    """Why backend="cuda" cannot run here, or None when it can (loads or builds it once)."""
    if "reason" not in _state:
        _state["reason"] = _load()
    return _state["reason"]


def can_build() -> bool:
    """True when a missing extension could be built here (a CUDA PyTorch, a device and nvcc)."""
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and torch.cuda.is_available() and CUDA_HOME is not None


def ops():
    """torch.ops.rlops_cuda, loading or building it on first use; RuntimeError with the reason if it cannot."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"backend='cuda' is unavailable: {reason}")
    return torch.ops.rlops_cuda


# --------------------------------------------------------------------------------------
# Launchers: the signatures of rlops.kernels' Triton launchers, over torch.ops.rlops_cuda
# --------------------------------------------------------------------------------------


def _rows_args(logits: torch.Tensor, ref_logits: torch.Tensor | None,
               shape: torch.Size) -> tuple[dict[str, object], RowLayout]:
    """The row-layout arguments every vocabulary op of csrc/ops.cpp takes, by name, and the logits'
    rows (those of `shape`: rlops._layout.positions_of)."""
    rows, ref_rows = row_layouts(logits, ref_logits, shape)
    return dict(x=rows.tensor, ref=None if ref_logits is None else ref_rows.tensor, n_rows=rows.n_rows,
                vocab=logits.shape[-1], inner=rows.inner, stride_outer=rows.stride_outer,
                stride_inner=rows.stride_inner, ref_inner=ref_rows.inner, ref_stride_outer=ref_rows.stride_outer,
                ref_stride_inner=ref_rows.stride_inner), rows


def _ids(tokens: torch.Tensor) -> torch.Tensor:
    """The token ids as the kernels read them, N contiguous int64 through the pointer: the tensor
    itself when it is that already (no (N,) view per launch: ops.cpp checks only dtype, contiguity
    and count), else a copy."""
    return flat(tokens.to(torch.int64))


def token_stats_fwd(logits: torch.Tensor, tokens: torch.Tensor, temperature: float,
                    ref_logits: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """rlops.kernels.token_stats_fwd on the CUDA kernel."""
    stats = torch.empty((N_STATS, *tokens.shape), dtype=torch.float32, device=logits.device)
    if tokens.numel():
        args, _ = _rows_args(logits, ref_logits, positions_of(logits, tokens))
        ops().token_stats_fwd(**args, tokens=_ids(tokens), mask=None if mask is None else byte_mask(flat(mask)),
                              out=stats, inv_tau=1.0 / temperature)
    return stats


def logits_grad(logits: torch.Tensor, tokens: torch.Tensor, stats: torch.Tensor, grads: torch.Tensor,
                temperature: float, ref_logits: torch.Tensor | None = None,
                out: torch.Tensor | None = None, grad_scale: torch.Tensor | None = None) -> torch.Tensor:
    """rlops.kernels.logits_grad on the CUDA kernel (which takes grads already scaled: the product is
    taken here)."""
    if grad_scale is not None:
        grads = grads * grad_scale
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device) if out is None else out
    shape = positions_of(logits, tokens)
    args, rows = _rows_args(logits, ref_logits, shape)
    dx_stride_outer, dx_stride_inner = grad_strides(out, logits, rows, shape)
    zero_last_position(out, shape)
    n = args["n_rows"]
    if n:
        ops().token_stats_bwd(**args, tokens=_ids(tokens), stats=leading_rows(stats, N_STATS, n),
                              grads=leading_rows(grads, N_GRADS, n), dx=out,
                              dx_stride_outer=dx_stride_outer, dx_stride_inner=dx_stride_inner,
                              inv_tau=1.0 / temperature)
    return out


def policy_loss_fwd(logits: torch.Tensor, tokens: torch.Tensor, ref_logits: torch.Tensor | None,
                    inputs: TokenInputs, epilogue: Epilogue) -> torch.Tensor:
    """rlops.kernels.policy_loss_fwd on the CUDA kernel."""
    shape = check_policy_launch(logits, tokens, ref_logits, inputs, epilogue)
    out = torch.empty((N_POLICY_ROWS, *tokens.shape), dtype=torch.float32, device=logits.device)
    if tokens.numel():
        # The CUDA kernel reads float32 weights: token-mean's mask and count become them here.
        v = TokenInputs(*(per_token(x, tokens.shape) for x in inputs.dense()))
        ops().policy_loss_fwd(
            **_rows_args(logits, ref_logits, shape)[0], tokens=_ids(tokens), out=out,
            weights=v.agg_weights, ent_weights=v.entropy_coefs, adv=v.advantages, old_logp=v.old_logprobs,
            ref_logp=v.ref_logprobs, isw=v.is_weights, inv_tau=1.0 / epilogue.temperature, clip_low=epilogue.clip_low,
            clip_high=epilogue.clip_high, dual_clip=epilogue.dual_clip, kl_coef=epilogue.kl_coef,
            kl_kind=epilogue.kl_kind, kl_ratio=epilogue.kl_ratio_weighted, objective=epilogue.objective,
            ratio_cap=epilogue.ratio_cap, param_pos=epilogue.param_pos, param_neg=epilogue.param_neg)
    return out


def gae_fwd(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, bootstrap: torch.Tensor | None,
            gamma: float, lam: float, cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """rlops.kernels.gae_fwd on the CUDA kernel, which reads float32 values and a uint8 mask (an
    O(B*T) cast, small beside the scan). Packed (cu_seqlens (S+1,)): rewards, values and mask (N,)
    or (1, N), one block per sequence."""
    adv = torch.empty(rewards.shape, dtype=torch.float32, device=rewards.device)
    ret = torch.empty_like(adv)
    if adv.numel():
        packed = cu_seqlens is not None
        r, v, m = (x.reshape(-1) if packed else x for x in (rewards, values, mask))
        r, v = (unit_stride(x.to(torch.float32)) for x in (r, v))
        boot = None if bootstrap is None else bootstrap.reshape(-1).to(torch.float32).contiguous()
        cu = cu_seqlens.to(torch.int64).contiguous() if packed else None
        ops().gae(rewards=r, values=v, mask=unit_stride(byte_mask(m)), bootstrap=boot, cu_seqlens=cu,
                  adv=adv.view(-1) if packed else adv, ret=ret.view(-1) if packed else ret, gamma=gamma, lam=lam)
    return adv, ret
