"""The shape of the code that the architecture page (docs/architecture.md) promises: short files,
short parameter lists (options travel as one object), one-way layers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / "rlops").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")])
MAX_LINES = 450
MAX_PARAMS = 8
# Public keyword entry points, whose keyword signatures are their API: rlops's own, and the
# restatements and drop-ins that keep a framework's signature (TRL, verl, OpenRLHF).
KEYWORD_ENTRY_POINTS = {
    "rlops/ops/policy_loss.py": {"policy_loss"},
    "rlops/ops/linear_policy_loss.py": {"linear_policy_loss", "linear_token_logprobs_and_entropy"},
    "rlops/losses.py": {"forward"},  # PolicyLoss.forward: policy_loss's tensors
    "rlops/baselines.py": {"trl_grpo_loss", "verl_actor_loss"},
    "rlops/integrations/openrlhf.py": {"__init__"},  # openrlhf.models.loss.PolicyLoss.__init__
    "rlops/integrations/verl.py": {"compute_policy_loss"},  # verl.trainer.ppo.core_algos.compute_policy_loss
    # verl's estimators with verl's signatures (core_algos.py), and the private call they share
    "rlops/integrations/verl_advantages.py": {
        "compute_gdpo_outcome_advantage", "compute_optimal_token_baseline_advantage",
        "compute_multi_turn_optimal_token_baseline_advantage"},
    "rlops/estimators.py": {"optimal_token_baseline_advantages"},  # its keywords: verl's options
}


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _n_params(node: ast.FunctionDef) -> int:
    a = node.args
    n = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + (a.vararg is not None) + (a.kwarg is not None)
    return n - (bool(a.args) and a.args[0].arg in ("self", "cls", "ctx"))


@pytest.mark.parametrize("path", SOURCES, ids=_rel)
def test_file_is_short(path: Path) -> None:
    assert len(path.read_text().splitlines()) <= MAX_LINES


@pytest.mark.parametrize("path", SOURCES, ids=_rel)
def test_functions_take_few_parameters(path: Path) -> None:
    allowed = KEYWORD_ENTRY_POINTS.get(_rel(path), set())
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        if any("jit" in ast.unparse(d) for d in node.decorator_list) or node.name in allowed:
            continue  # Triton kernels list their arguments grouped by kind instead
        assert _n_params(node) <= MAX_PARAMS, f"{node.name} (line {node.lineno}) takes {_n_params(node)} parameters"


def _imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names.update(f"{node.module or ''}.{a.name}" for a in node.names)
            names.add(node.module or "")
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_ops_never_import_the_oracle() -> None:
    for path in (ROOT / "rlops" / "ops").glob("*.py"):
        assert not any(n == "reference" or n.endswith(".reference") or n.startswith("reference")
                       for n in _imported(path)), path


def test_kernels_are_triton_only() -> None:
    """kernels/ launches Triton and nothing else: no CUDA twin, no autograd, no backend choice."""
    for path in (ROOT / "kernels").glob("*.py"):
        imported = _imported(path)
        assert not any("_cuda" in n or n.startswith("rlops.ops") or "torch.autograd" in n for n in imported), path
        code = path.read_text()
        assert "backend ==" not in code and "backend=" not in code, f"{path} chooses a backend"
