"""torch.ops.rlops_cuda on CPU tensors: the CUDA kernels' arithmetic compiled for the host.

`HostOps` has the four ops of csrc/ops.cpp with their exact signatures. Each one reads the
rows the way the kernel addresses them (the same row layout arguments), gives every row the
vector width and unaligned head that the kernel would use for that dtype and address, and
runs the kernel's own functions (csrc/rlops_math.h, through tests/csrc_host.cpp), merging
per-thread states in the kernel's warp-shuffle order. With it patched in, the public API
with backend="cuda" runs end to end on a machine without a GPU: everything but the
kernels' loads, shuffles and launch is checked.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import torch

from rlops.constants import N_GRADS, N_POLICY_ROWS, N_STATS, ROW

ROOT = Path(__file__).resolve().parents[1]
KERNEL_WARPS = 8  # token_stats.cu: 256 threads per row (kThreads)
KERNEL_IN_FLIGHT = 4  # token_stats.cu: 16-byte loads per thread per trip of the vector loop (kInFlight)
GAE_THREADS = 128  # gae.cu (kThreads)
GAE_ITEMS = 8  # gae.cu: steps per thread (kItems; tests/csrc_host.cpp's K)


def build(out_dir: Path) -> ctypes.CDLL | str:
    """The host library, or why it cannot be built here."""
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        return "no C++ compiler on this machine"
    lib = out_dir / "csrc_host.so"
    cmd = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-Wall", "-Werror", f"-I{ROOT / 'csrc'}",
           str(ROOT / "tests" / "csrc_host.cpp"), "-o", str(lib)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"compiling tests/csrc_host.cpp failed:\n{done.stderr}")
    return ctypes.CDLL(str(lib))


def _ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    """t's address for C; the caller keeps t alive until the call returns."""
    if t is not None and t.device.type != "cpu":
        raise ValueError(f"the host emulation of the CUDA backend reads CPU tensors, got {t.device}")
    return ctypes.c_void_p(None if t is None else t.data_ptr())


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous()


def _vec(t: torch.Tensor | None, dtype: torch.dtype, n: int, name: str) -> torch.Tensor | None:
    """A per-row input as the kernel reads it through its pointer: the first n elements, after the
    checks of ops.cpp's vec() (dtype, contiguous, at least n elements), whatever t's shape."""
    if t is None:
        return None
    if t.dtype != dtype or not t.is_contiguous() or t.numel() < n:
        raise RuntimeError(f"rlops_cuda: {name} must be {dtype}, contiguous with >= {n} elements")
    return t.reshape(-1)[:n]


class HostOps:
    """The ops of torch.ops.rlops_cuda, same arguments, on CPU tensors."""

    def __init__(self, lib: ctypes.CDLL, gae_threads: int = GAE_THREADS, in_flight: int = KERNEL_IN_FLIGHT) -> None:
        self.lib = lib
        self.gae_threads = gae_threads
        self.in_flight = in_flight

    @staticmethod
    def _view(t: torch.Tensor, n: int, vocab: int, inner: int, outer_stride: int, inner_stride: int) -> torch.Tensor:
        """The (n / inner, inner, vocab) view of t that the kernel's row layout addresses."""
        return t.as_strided((n // inner, inner, vocab), (outer_stride, inner_stride, 1), t.storage_offset())

    @staticmethod
    def _heads(t: torch.Tensor, n: int, vocab: int, inner: int, outer_stride: int, inner_stride: int) -> torch.Tensor:
        """token_stats.cu's head_len for each row: elements before its first 16-byte boundary."""
        size = t.element_size()
        rows = torch.arange(n, dtype=torch.int64)
        mis = (t.data_ptr() + ((rows // inner) * outer_stride + (rows % inner) * inner_stride) * size) % 16
        heads = torch.where(mis > 0, (16 - mis) // size, 0).clamp(max=vocab)
        return torch.where(mis % size == 0, heads, vocab)

    def _stats(self, x: torch.Tensor, x_layout: tuple, ref: torch.Tensor | None, ref_layout: tuple,
               tokens: torch.Tensor, inv_tau: float) -> torch.Tensor:
        n, vocab = x_layout[:2]
        heads = self._heads(x, *x_layout)
        y = None
        if ref is not None:  # rows whose reference is aligned differently are read element by element
            heads = torch.where(heads == self._heads(ref, *ref_layout), heads, vocab)
            y = _f32(self._view(ref, *ref_layout).reshape(n, vocab))
        out = torch.empty(N_STATS, n)
        # Every tensor whose pointer goes to C is held in a local, so it outlives the call.
        x_rows, tokens = _f32(self._view(x, *x_layout).reshape(n, vocab)), tokens.contiguous()
        self.lib.rlops_row_stats(_ptr(x_rows), _ptr(y), _ptr(tokens), _ptr(heads), ctypes.c_int64(n),
                                 ctypes.c_int64(vocab),
                                 ctypes.c_int(16 // x.element_size()), ctypes.c_int(KERNEL_WARPS),
                                 ctypes.c_int(self.in_flight), ctypes.c_float(inv_tau), _ptr(out))
        return out

    def token_stats_fwd(self, x, ref, tokens, mask, out, n_rows, vocab, inner, stride_outer, stride_inner, ref_inner,
                        ref_stride_outer, ref_stride_inner, inv_tau) -> None:
        tokens, mask = _vec(tokens, torch.int64, n_rows, "tokens"), _vec(mask, torch.uint8, n_rows, "mask")
        stats = self._stats(x, (n_rows, vocab, inner, stride_outer, stride_inner), ref,
                            (n_rows, vocab, ref_inner, ref_stride_outer, ref_stride_inner), tokens, inv_tau)
        if mask is not None:
            stats[:, mask == 0] = 0.0
        out.view(-1)[:N_STATS * n_rows].copy_(stats.view(-1))

    def policy_loss_fwd(self, x, ref, tokens, weights, ent_weights, adv, old_logp, ref_logp, isw, out, n_rows, vocab,
                        inner, stride_outer, stride_inner, ref_inner, ref_stride_outer, ref_stride_inner, inv_tau,
                        clip_low, clip_high, dual_clip, kl_coef, kl_kind, kl_ratio, objective, ratio_cap, param_pos,
                        param_neg) -> None:
        tokens = _vec(tokens, torch.int64, n_rows, "tokens")
        weights, ent_weights, adv, old_logp, ref_logp, isw = (
            _vec(t, torch.float32, n_rows, name) for t, name in ((weights, "weights"), (ent_weights, "entropy_weights"),
                                                                 (adv, "advantages"), (old_logp, "old_logprobs"),
                                                                 (ref_logp, "ref_logprobs"), (isw, "is_weights")))
        stats = self._stats(x, (n_rows, vocab, inner, stride_outer, stride_inner), ref,
                            (n_rows, vocab, ref_inner, ref_stride_outer, ref_stride_inner), tokens, inv_tau)
        zeros = torch.zeros(n_rows)
        inputs = torch.stack([stats[ROW["logp"]], stats[ROW["entropy"]], stats[ROW["kl"]], weights,
                              *(zeros if t is None else t for t in (ent_weights, adv, old_logp, ref_logp)),
                              torch.ones(n_rows) if isw is None else isw]).contiguous()
        token_out = torch.empty(6, n_rows)
        self.lib.rlops_policy_token(
            _ptr(inputs), ctypes.c_int64(n_rows), *(ctypes.c_float(v) for v in (clip_low, clip_high, dual_clip,
                                                                                  kl_coef)),
            *(ctypes.c_int(int(v)) for v in (kl_kind, old_logp is not None, isw is not None,
                                             ent_weights is not None, kl_ratio, objective)),
            *(ctypes.c_float(v) for v in (ratio_cap, param_pos, param_neg)), _ptr(token_out))
        full = torch.cat([stats, token_out[1:]])  # the rows of rlops.constants.ROW: ratio.. follow the stats
        full[ROW["kl"]] = token_out[0]
        full[:, weights == 0] = 0.0
        out.view(-1)[:N_POLICY_ROWS * n_rows].copy_(full.view(-1))

    def token_stats_bwd(self, x, ref, tokens, stats, grads, dx, n_rows, vocab, inner, stride_outer, stride_inner,
                        ref_inner, ref_stride_outer, ref_stride_inner, dx_stride_outer, dx_stride_inner,
                        inv_tau) -> None:
        x_rows = _f32(self._view(x, n_rows, vocab, inner, stride_outer, stride_inner).reshape(n_rows, vocab))
        y_rows = None if ref is None else _f32(
            self._view(ref, n_rows, vocab, ref_inner, ref_stride_outer, ref_stride_inner).reshape(n_rows, vocab))
        tokens = _vec(tokens, torch.int64, n_rows, "tokens")
        stats = _vec(stats, torch.float32, N_STATS * n_rows, "stats")
        grads = _vec(grads, torch.float32, N_GRADS * n_rows, "grads")
        d = torch.empty(n_rows, vocab)
        self.lib.rlops_logit_grad(_ptr(x_rows), _ptr(y_rows), _ptr(tokens), _ptr(stats), _ptr(grads),
                                  ctypes.c_int64(n_rows), ctypes.c_int64(vocab), ctypes.c_float(inv_tau), _ptr(d))
        target = self._view(dx, n_rows, vocab, inner, dx_stride_outer, dx_stride_inner)
        target.copy_(d.to(dx.dtype).view(target.shape))

    def gae(self, rewards, values, mask, bootstrap, cu_seqlens, adv, ret, gamma, lam) -> None:
        packed = cu_seqlens is not None
        if packed and rewards.dim() != 1:
            raise ValueError("rlops_cuda: rewards must be (N,)")  # as ops.cpp checks
        n_rows, n_time = (cu_seqlens.numel() - 1, rewards.numel()) if packed else rewards.shape
        rewards, values, mask = _f32(rewards), _f32(values), mask.contiguous()
        bootstrap = None if bootstrap is None else _f32(bootstrap)
        cu = None if cu_seqlens is None else cu_seqlens.to(torch.int64).contiguous()
        out_adv, out_ret = torch.empty(adv.shape), torch.empty(ret.shape)
        self.lib.rlops_gae(_ptr(rewards), _ptr(values), _ptr(mask), _ptr(bootstrap), _ptr(cu), ctypes.c_int64(n_rows),
                           ctypes.c_int64(n_time), ctypes.c_int(self.gae_threads), ctypes.c_float(gamma),
                           ctypes.c_float(lam), _ptr(out_adv), _ptr(out_ret))
        adv.copy_(out_adv)
        ret.copy_(out_ret)
