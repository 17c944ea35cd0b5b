"""The PyTorch backend (rlops/torch_backend.py): its chunked evaluation, and every policy-loss case
(GSPO's sequence-level ratio included) against the float64 oracle, which shares no code with it."""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path

import pytest
import test_policy_loss as policy_tests
import torch
import torch.nn.functional as F

import rlops
from rlops import torch_backend

ROOT = Path(__file__).resolve().parents[1]


def _naive_stats(x: torch.Tensor, tokens: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    logp_all = F.log_softmax(x / temperature, dim=-1)
    logp = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return logp, -(logp_all.exp() * logp_all).sum(-1)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, None])
@pytest.mark.parametrize(
    "shape, view",
    [
        ((3, 5, 40), lambda x: x),
        ((3, 5, 40), lambda x: x[:, :-1]),
        ((4, 3, 40), lambda x: x.transpose(0, 1)),
        ((3, 4, 2, 40), lambda x: x[::2, ::2, :-1]),
        ((0, 5, 40), lambda x: x),
    ],
)
def test_chunked_stats_match_unchunked(shape: tuple[int, ...], view: Callable, chunk_size: int | None) -> None:
    torch.manual_seed(0)
    base = torch.randn(shape, dtype=torch.float64) * 3
    x1, x2 = base.clone().requires_grad_(True), base.clone().requires_grad_(True)
    tokens = torch.randint(0, shape[-1], view(base).shape[:-1])
    w1, w2 = torch.randn(tokens.shape, dtype=torch.float64), torch.randn(tokens.shape, dtype=torch.float64)
    logp, ent = torch_backend.token_stats(view(x1), tokens, 0.7, chunk_size=chunk_size)[:2]
    n_logp, n_ent = _naive_stats(view(x2), tokens, 0.7)
    ((logp * w1).sum() + (ent * w2).sum()).backward()
    ((n_logp * w1).sum() + (n_ent * w2).sum()).backward()
    torch.testing.assert_close(logp, n_logp, rtol=0, atol=1e-12)
    torch.testing.assert_close(ent, n_ent, rtol=0, atol=1e-12)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=1e-12)
    lp_only = torch_backend.token_logprobs(view(base), tokens, 0.7, chunk_size=chunk_size)
    torch.testing.assert_close(lp_only, n_logp.detach(), rtol=0, atol=1e-12)


def test_never_holds_more_than_a_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    real = torch.log_softmax

    def spy(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        seen.append(x.shape[0])
        return real(x, *args, **kwargs)

    monkeypatch.setattr(torch, "log_softmax", spy)
    x = torch.randn(6, 9, 50, dtype=torch.bfloat16, requires_grad=True)
    tokens = torch.randint(0, 50, (6, 9))
    logp, ent = torch_backend.token_stats(x, tokens, chunk_size=4)[:2]
    (logp.sum() + ent.sum()).backward()
    assert logp.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    # 54 rows in chunks of 4: 14 chunks in the forward and 14 recomputed in the backward.
    assert len(seen) == 28 and max(seen) == 4


def test_default_chunk_bounds_float32_temporaries() -> None:
    vocab = 151_936
    rows = torch_backend._chunk_rows(vocab, None)
    assert rows >= 1 and rows * vocab * 4 <= 16 * 2**20
    with pytest.raises(ValueError, match="chunk_size"):
        torch_backend._chunk_rows(vocab, 0)


def test_chunked_full_kl() -> None:
    torch.manual_seed(1)
    x = (torch.randn(2, 3, 30, dtype=torch.float64) * 2).requires_grad_(True)
    ref_logits = torch.randn(2, 3, 30, dtype=torch.float64) * 2
    tokens = torch.randint(0, 30, (2, 3))
    kl = torch_backend.token_stats(x, tokens, 0.9, ref_logits, chunk_size=4).full_kl
    p = F.softmax(x / 0.9, -1)
    naive = (p * (F.log_softmax(x / 0.9, -1) - F.log_softmax(ref_logits / 0.9, -1))).sum(-1)
    torch.testing.assert_close(kl, naive, rtol=0, atol=1e-12)
    (g,) = torch.autograd.grad(kl.sum(), x)
    (g_naive,) = torch.autograd.grad(naive.sum(), x)
    torch.testing.assert_close(g, g_naive, rtol=0, atol=1e-12)


def _torch(logits, tokens, advantages, **kw):
    return rlops.policy_loss(logits, tokens, advantages, backend="torch", **kw)


@pytest.mark.parametrize("case", list(policy_tests.CASES))
def test_every_case_matches_the_oracle(case: str) -> None:
    """Values and gradients of backend="torch" against rlops.reference in float64; the gspo cases
    are the sequence-level path that the kernel backends compose from this module too."""
    policy_tests._check(case, torch.float32, fn=_torch)


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
            names.update(f"{'.' * node.level}{node.module or ''}.{a.name}".replace("..", ".") for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_oracle_and_backends_share_no_code() -> None:
    """The oracle imports no backend, and nothing that runs an op imports the oracle."""
    oracle = _imports(ROOT / "rlops" / "reference.py")
    assert not any("torch_backend" in n or "ops" in n.split(".") or "kernels" in n for n in oracle), oracle
    runs_ops = [ROOT / "rlops" / "torch_backend.py", *(ROOT / "rlops" / "ops").glob("*.py"),
                *(ROOT / "kernels").glob("*.py"), ROOT / "rlops" / "_cuda.py", ROOT / "rlops" / "baselines.py",
                ROOT / "rlops" / "advantages.py", *(ROOT / "rlops" / "integrations").glob("*.py")]
    for path in runs_ops:
        assert not any(n.endswith("reference") or ".reference." in n for n in _imports(path)), path
