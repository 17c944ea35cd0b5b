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


@pytest.mark.parametrize("rel, name", [("rlops/ops/policy_loss.py", "policy_loss"),
                                       ("rlops/ops/linear_policy_loss.py", "linear_policy_loss")])
def test_options_named_for_torch_compile_are_every_config_parameter(rel: str, name: str) -> None:
    """Under torch.compile the public functions pass their options to PolicyLossConfig as an explicit
    dict (Dynamo before PyTorch 2.13 cannot trace locals()): each of its keywords is the parameter of
    the same name, and every parameter that is a config field is there."""
    from rlops.options import CONFIG_FIELDS

    fn = next(n for n in ast.walk(ast.parse((ROOT / rel).read_text()))
              if isinstance(n, ast.FunctionDef) and n.name == name)
    params = {a.arg for a in [*fn.args.args, *fn.args.kwonlyargs]} & set(CONFIG_FIELDS)
    calls = [n for n in ast.walk(fn) if isinstance(n, ast.Call) and ast.unparse(n.func) == "dict"]
    assert len(calls) == 1, f"{name}: expected one dict(...) of its options"
    keywords = calls[0].keywords
    assert all(isinstance(k.value, ast.Name) and k.value.id == k.arg for k in keywords)
    assert {k.arg for k in keywords} == params and len(keywords) == len(params)
