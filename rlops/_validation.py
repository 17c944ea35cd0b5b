"""Argument checks shared by every public entry point.

Each check raises TypeError (wrong kind of object or dtype) or ValueError (wrong shape,
range or option) with the argument's name and what was expected, so a bad call fails at
the boundary instead of as a wrong number or an illegal memory access inside a kernel.

Two kinds of checks. Checks of types, shapes, devices and options read only metadata and
always run. Checks of tensor *values* (token ids inside [0, V), 0/1 masks, cu_seqlens
boundaries) must read the values back to the host, a device-to-host sync that stalls the
CPU until the GPU has caught up. They run on CPU tensors always, and on any other device
only when the environment variable RLOPS_CHECK=1 is set (read on every call, so it can be
switched on for a debugging run); never inside a torch.compile graph. Without them a bad
value never reads or writes out of bounds: an out-of-range token id gives a NaN log-prob
(every backend), a mask value other than 0/1 counts as mask != 0, and a bad cu_seqlens
gives wrong sums (sequence ids are clamped into [0, S)), never a crash.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# The environment variable that turns on the value checks on non-CPU tensors.
CHECK_ENV = "RLOPS_CHECK"
# Devices whose tensors are always value-checked: reading them back costs no sync.
ALWAYS_CHECKED_DEVICES = ("cpu",)


def compiling() -> bool:
    # Data-dependent checks (reading tensor values back to the host) would break a
    # torch.compile graph; the kernels mask out-of-range ids instead of crashing.
    return torch.compiler.is_compiling()


def value_checks_enabled(x: torch.Tensor) -> bool:
    """Whether the value checks (which read tensor values back to the host) run on tensors like x.

    CPU tensors: always (there is nothing to sync with). Any other device: only with RLOPS_CHECK=1
    in the environment, since the read-back is a device-to-host sync. Never under torch.compile.
    """
    if compiling():
        return False
    return x.device.type in ALWAYS_CHECKED_DEVICES or os.environ.get(CHECK_ENV) == "1"


def check_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_logits(x: object, name: str = "logits") -> int:
    """Checks a (..., V) floating tensor and returns V."""
    x = check_tensor(name, x)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"{name} must have shape (..., V) with V >= 1, got {tuple(x.shape)}")
    return x.shape[-1]


def check_tokens(tokens: object, logits: torch.Tensor, name: str = "tokens") -> torch.Tensor:
    """Checks integer ids of shape logits.shape[:-1], on logits' device, inside [0, V)."""
    return check_token_ids(tokens, tuple(logits.shape[:-1]), logits.shape[-1], logits, name)


def check_token_ids(tokens: object, shape: tuple[int, ...], vocab: int | None, like: torch.Tensor,
                    name: str = "tokens", like_name: str = "logits") -> torch.Tensor:
    """Checks integer ids of the given shape, on like's device, inside [0, vocab) (vocab None: the
    range is checked later, by `check_token_range` against a mask)."""
    tokens = check_tensor(name, tokens)
    dtype = tokens.dtype
    if dtype == torch.bool or dtype.is_floating_point or dtype.is_complex:
        raise TypeError(f"{name} must be an integer tensor (int64 or int32), got {tokens.dtype}")
    if tokens.shape != shape and tuple(tokens.shape) != tuple(shape):  # a Size equals a tuple of its sizes
        raise ValueError(f"{name} must have the shape of {like_name} without its last dimension, "
                         f"{tuple(shape)}, got {tuple(tokens.shape)}")
    check_same_device(name, tokens, like, like_name)
    if vocab is not None:
        check_token_range(tokens, vocab, name)
    return tokens


def check_token_range(tokens: torch.Tensor, vocab: int, name: str = "tokens",
                      counted: torch.Tensor | None = None) -> None:
    """Ids inside [0, vocab), only where `counted` (a bool mask of tokens' shape) is True when given:
    a masked token is never read, so padding ids such as Hugging Face's -100 may stand there.

    A value check (one read-back of two numbers): skipped unless `value_checks_enabled` (CPU
    tensors, or RLOPS_CHECK=1); unchecked, an id outside [0, vocab) gives a NaN log-prob."""
    if not tokens.numel() or not value_checks_enabled(tokens):
        return
    lo, hi = torch.aminmax(tokens)
    lo, hi = int(lo), int(hi)
    if lo >= 0 and hi < vocab:  # every id in range: the mask need not be read (one op fewer)
        return
    if counted is not None:
        lo, hi = (int(v) for v in torch.aminmax(torch.where(counted, tokens, 0)))
        if lo >= 0 and hi < vocab:
            return
    where = "" if counted is None else " where the mask is 1 (any id may pad where it is 0)"
    raise ValueError(f"{name} must lie in [0, V) = [0, {vocab}){where}, found id {lo if lo < 0 else hi}")


def check_same_device(name: str, x: torch.Tensor, like: torch.Tensor, like_name: str = "logits") -> None:
    if x.device != like.device:
        raise ValueError(f"{name} is on {x.device} but {like_name} is on {like.device}")


def check_shape(name: str, x: torch.Tensor, shapes: Sequence[tuple[int, ...]], described: str) -> None:
    # torch.Size equals the tuple of its sizes: no conversion on the path that passes.
    if x.shape not in shapes and tuple(x.shape) not in [tuple(s) for s in shapes]:
        raise ValueError(f"{name} must have shape {described}, got {tuple(x.shape)}")


def check_positive_float(name: str, value: object) -> float:
    """Checks a finite real number > 0 (temperature and the like) and returns it as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive float, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value  # type: ignore[return-value]


def check_float(name: str, value: object, *, ge: float | None = None, gt: float | None = None,
                le: float | None = None) -> float:
    """Checks a finite real number (optionally >= ge or > gt, and <= le) and returns it as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if ge is not None and value < ge:
        raise ValueError(f"{name} must be >= {ge}, got {value}")
    if gt is not None and value <= gt:
        raise ValueError(f"{name} must be > {gt}, got {value}")
    if le is not None and value > le:
        raise ValueError(f"{name} must be <= {le}, got {value}")
    return value


def check_float_tensor(name: str, x: object, like: torch.Tensor, shapes: Sequence[tuple[int, ...]],
                       described: str, like_name: str = "logits") -> torch.Tensor:
    """A floating tensor of one of `shapes`, on like's device."""
    x = check_tensor(name, x)
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    check_shape(name, x, shapes, described)
    check_same_device(name, x, like, like_name)
    return x


def check_mask(mask: object, shape: tuple[int, ...], like: torch.Tensor, name: str = "mask",
               like_name: str = "logits") -> torch.Tensor:
    """A 0/1 mask (bool, integer or float) of the given shape, returned as bool (mask != 0).

    That it holds only 0 and 1 is a value check (one read-back), made when `value_checks_enabled`
    (CPU tensors, or RLOPS_CHECK=1); unchecked, any nonzero value counts as 1."""
    mask = check_tensor(name, mask)
    check_shape(name, mask, [shape], str(shape))
    check_same_device(name, mask, like, like_name)
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex():
        raise TypeError(f"{name} must be bool or 0/1 numbers, got {mask.dtype}")
    if mask.numel() and value_checks_enabled(mask) and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} must hold only 0 and 1 (1 = the token counts)")
    return mask != 0


def check_head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               names: tuple[str, str, str]) -> int:
    """Checks hidden (..., H), weight (V, H) and bias (V,) of one dtype and device; returns V."""
    h_name, w_name, b_name = names
    check_logits(hidden, h_name)
    check_logits(weight, w_name)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{w_name} must have shape (V, H) with H = {h_name}.shape[-1] = {hidden.shape[-1]}, "
                         f"got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{w_name} ({weight.dtype}) and {h_name} ({hidden.dtype}) must have one dtype")
    check_float_tensor(w_name, weight, hidden, [tuple(weight.shape)], "(V, H)", h_name)
    if bias is not None:
        check_float_tensor(b_name, bias, hidden, [(weight.shape[0],)], f"(V,) = ({weight.shape[0]},)", h_name)
        if bias.dtype != hidden.dtype:
            raise TypeError(f"{b_name} ({bias.dtype}) and {h_name} ({hidden.dtype}) must have one dtype")
    return weight.shape[0]


def check_ref_head(hidden: torch.Tensor, vocab: int, ref_hidden: torch.Tensor | None, ref_weight: torch.Tensor | None,
                    ref_bias: torch.Tensor | None) -> None:
    if ref_hidden is None or ref_weight is None:
        raise ValueError("the exact KL needs both ref_hidden and ref_weight (and ref_bias if the reference has one)")
    if ref_hidden.shape[:-1] != hidden.shape[:-1]:
        raise ValueError(f"ref_hidden must have hidden's leading shape {tuple(hidden.shape[:-1])}, got "
                         f"{tuple(ref_hidden.shape[:-1])}")
    if check_head(ref_hidden, ref_weight, ref_bias, ("ref_hidden", "ref_weight", "ref_bias")) != vocab:
        raise ValueError(f"ref_weight must have the policy's vocabulary V = {vocab}, got {ref_weight.shape[0]}")
