"""Triton kernels and their launchers (installed as `rlops.kernels`).

Triton only: no autograd, no backend dispatch, no device query at import. The layer above
(`rlops.ops`) wraps these launchers in autograd-aware custom ops and chooses between them
and their CUDA twins (rlops/_cuda.py, same launcher signatures). Importing this package
imports Triton; with TRITON_INTERPRET=1 set before that import, the kernels run on CPU
tensors in Triton's interpreter.
"""

from ._common import is_interpreted, prepare_interpreter
from .gae import gae_fwd
from .policy_loss import policy_loss_fwd
from .token_stats import _token_stats_fwd_kernel, logits_grad, row_states_fwd, token_stats_fwd

INTERPRETED = is_interpreted(_token_stats_fwd_kernel)
if INTERPRETED:
    prepare_interpreter()

__all__ = ["INTERPRETED", "gae_fwd", "logits_grad", "policy_loss_fwd", "row_states_fwd", "token_stats_fwd"]
