"""Triton kernels and their launchers (installed as `rlops.kernels`).

No autograd here and no device query at import: the layer above (`rlops.ops`) wraps these
launchers in autograd-aware custom ops. Importing this package imports Triton; with
TRITON_INTERPRET=1 set before that import, the kernels run on CPU tensors in Triton's
interpreter.
"""

from ._common import is_interpreted
from .gae import gae_fwd
from .policy_loss import KL_KINDS, ROW, policy_loss_fwd
from .token_stats import _token_stats_fwd_kernel, token_stats_bwd, token_stats_fwd

INTERPRETED = is_interpreted(_token_stats_fwd_kernel)

__all__ = ["INTERPRETED", "KL_KINDS", "ROW", "gae_fwd", "policy_loss_fwd", "token_stats_bwd", "token_stats_fwd"]
