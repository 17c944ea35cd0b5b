"""Token log-probs and entropy from logits in one pass over the vocabulary (SPEC.md section 1).

    z = x / tau,  lse = logsumexp(z),  logp = z[a] - lse,  H = lse - sum_v softmax(z)_v z_v

Forward: one program per row streams the row's V logits once with an online max / sum-exp /
sum p*z and writes three float32 per row (logp, entropy, lse). Backward: one program per row
reads the row again and writes its gradient once,

    d/dx_v = [g_logp * (1[v == a] - p_v) - g_H * p_v * (log p_v + H)] / tau.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT32_LOWEST, block_v, online_softmax_update, row_layout, row_start


@triton.jit
def _token_stats_fwd_kernel(
    x_ptr, tokens_ptr, logp_ptr, entropy_ptr, lse_ptr,
    V, inner, stride_outer, stride_inner, inv_tau,
    BLOCK_V: tl.constexpr,
):
    """Reads N*V logits once plus N token ids; writes 3 float32 per row (12*N bytes)."""
    row = tl.program_id(0)
    x_row = x_ptr + row_start(row, inner, stride_outer, stride_inner)
    # torch.compile may pass Python floats as float64; the contract is float32 arithmetic.
    inv_tau = tl.cast(inv_tau, tl.float32)
    m = tl.full([], FLOAT32_LOWEST, tl.float32)
    s = tl.zeros([], tl.float32)
    t = tl.zeros([], tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(x_row + offs, mask=offs < V, other=float("-inf"))
        m, s, t = online_softmax_update(x.to(tl.float32) * inv_tau, m, s, t)
    log_s = tl.log(s)
    lse = m + log_s
    # An id outside [0, V) (only possible when the host check is skipped under torch.compile)
    # gives NaN rather than an out-of-bounds read.
    tok = tl.load(tokens_ptr + row).to(tl.int64)
    valid = (tok >= 0) & (tok < V)
    z_tok = tl.load(x_row + tl.where(valid, tok, 0)).to(tl.float32) * inv_tau
    tl.store(logp_ptr + row, tl.where(valid, z_tok - lse, float("nan")))
    tl.store(entropy_ptr + row, log_s - t / s)
    tl.store(lse_ptr + row, lse)


@triton.jit
def _token_stats_bwd_kernel(
    x_ptr, tokens_ptr, lse_ptr, entropy_ptr, g_logp_ptr, g_entropy_ptr, dx_ptr,
    V, inner, stride_outer, stride_inner, dx_stride_outer, dx_stride_inner, inv_tau,
    BLOCK_V: tl.constexpr,
):
    """Reads N*V logits and writes N*V gradients (2*N*V*elem bytes) plus 5 scalars per row."""
    row = tl.program_id(0)
    x_row = x_ptr + row_start(row, inner, stride_outer, stride_inner)
    dx_row = dx_ptr + row_start(row, inner, dx_stride_outer, dx_stride_inner)
    inv_tau = tl.cast(inv_tau, tl.float32)
    lse = tl.load(lse_ptr + row)
    entropy = tl.load(entropy_ptr + row)
    g_logp = tl.load(g_logp_ptr + row)
    g_entropy = tl.load(g_entropy_ptr + row)
    tok = tl.load(tokens_ptr + row).to(tl.int64)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        in_row = offs < V
        z = tl.load(x_row + offs, mask=in_row, other=float("-inf")).to(tl.float32) * inv_tau
        log_p = z - lse
        p = tl.exp(log_p)
        # Where a logit is -inf, p = 0 and log p = -inf: the term is 0, not 0 * -inf = NaN.
        soft = p * (g_logp + g_entropy * (tl.where(p > 0, log_p, 0.0) + entropy))
        dz = tl.where(offs == tok, g_logp, 0.0) - soft
        tl.store(dx_row + offs, (dz * inv_tau).to(dx_ptr.dtype.element_ty), mask=in_row)


def token_stats_fwd(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launches the forward kernel.

    logits (..., V) float16/bfloat16/float32/float64, any row strides; tokens (...) integer ids
    in [0, V). Returns float32 (logp, entropy, lse), each of tokens' shape.
    """
    if tokens.shape != logits.shape[:-1]:
        raise ValueError(f"tokens must have shape {tuple(logits.shape[:-1])}, got {tuple(tokens.shape)}")
    rows = row_layout(logits)
    logp, entropy, lse = (torch.empty(tokens.shape, dtype=torch.float32, device=logits.device) for _ in range(3))
    if rows.n_rows:
        vocab = logits.shape[-1]
        _token_stats_fwd_kernel[(rows.n_rows,)](
            rows.tensor, tokens.reshape(-1), logp, entropy, lse,
            vocab, rows.inner, rows.stride_outer, rows.stride_inner, 1.0 / temperature,
            BLOCK_V=block_v(vocab), num_warps=8,
        )
    return logp, entropy, lse


def token_stats_bwd(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor,
    temperature: float = 1.0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launches the backward kernel: d logits from per-row upstream gradients.

    lse, entropy: float32 (...) from `token_stats_fwd`; grad_logp, grad_entropy: (...) float.
    Returns a tensor of logits' shape and dtype; `out` (which may be `logits` itself, as every
    row is read before it is written) receives it when given.
    """
    rows = row_layout(logits)
    vocab = logits.shape[-1]
    if out is None:
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if out.shape != logits.shape or out.dtype != logits.dtype:
        raise ValueError(f"out must have logits' shape {tuple(logits.shape)} and dtype {logits.dtype}")
    if out.is_contiguous():
        dx_stride_outer, dx_stride_inner = rows.inner * vocab, vocab
    elif out is logits and rows.tensor is logits:
        dx_stride_outer, dx_stride_inner = rows.stride_outer, rows.stride_inner
    else:
        raise ValueError("out must be contiguous or be logits itself")
    if rows.n_rows:

        def per_row(v: torch.Tensor) -> torch.Tensor:
            return v.reshape(-1).to(torch.float32).contiguous()

        _token_stats_bwd_kernel[(rows.n_rows,)](
            rows.tensor, tokens.reshape(-1), per_row(lse), per_row(entropy),
            per_row(grad_logp), per_row(grad_entropy), out,
            vocab, rows.inner, rows.stride_outer, rows.stride_inner,
            dx_stride_outer, dx_stride_inner, 1.0 / temperature,
            BLOCK_V=block_v(vocab), num_warps=8,
        )
    return out
