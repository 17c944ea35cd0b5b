"""The eager fast path of the custom ops: the same functions, without torch.library's dispatch.

A `torch.library.custom_op` lets torch.compile graphs hold rlops's kernels, but each call
goes through the dispatcher, pytree flattening and an autograd wrapper: at small sizes that
glue costs more than everything else on the host side of a forward+backward. Outside
torch.compile nothing needs it, so `FastOp` runs the op's own function, setup_context and
backward under a plain `torch.autograd.Function`, and hands compiled code the custom op.
Both paths run the same Python functions, so they compute the same thing (tested).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class FastOp:
    """A registered custom op (`op`) and the functions it was built from: `fn` (its
    implementation), `setup_context` and `backward` (as given to register_autograd)."""

    op: Any
    fn: Callable[..., Tensor]
    setup_context: Callable[[Any, tuple, Tensor], None]
    backward: Callable[..., tuple]

    def __call__(self, *args: Any) -> Tensor:
        if torch.compiler.is_compiling():
            return self.op(*args)
        return _Eager.apply(self, *args)


class _Eager(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fast: FastOp, *args: Any) -> Tensor:
        out = fast.fn(*args)
        fast.setup_context(ctx, args, out)
        ctx.fast_backward = fast.backward
        ctx.eager = True  # the backward calls the launcher, not the custom op (grad_to_logits)
        return out

    @staticmethod
    def backward(ctx, *grads: Tensor) -> tuple:
        # register_autograd's backward returns a list of Nones for a list input; autograd.Function
        # wants None there.
        return (None, *(g if isinstance(g, Tensor) else None for g in ctx.fast_backward(ctx, *grads)))
