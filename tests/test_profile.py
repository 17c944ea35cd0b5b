"""`rlops profile`: the allocation tracker, the analytic estimate (exact parameter counts, and within
15% of the measured peaks of real GRPO and PPO steps on CPU), and the command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlops import profile_cli
from rlops.memory import STAGES, ModelDims, StepShape, estimate
from rlops.profile import (
    PRESETS,
    AllocationTracker,
    ProfileConfig,
    default_group_size,
    estimate_for,
    model_config,
    profile_step,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 352, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "tie_word_embeddings": True}


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("model") / "config.json"
    path.write_text(json.dumps(TINY))
    return str(path)


def test_tracker_counts_allocations_like_the_cuda_counters() -> None:
    w = torch.randn(256, 256, requires_grad=True)  # made before: not counted
    with AllocationTracker() as tracker:
        x = torch.randn(64, 256)  # 64 KiB
        assert tracker.live == 64 * 256 * 4
        view = x.t()[:10]  # a view: no allocation
        x.mul_(2)  # in place: none
        assert tracker.live == 64 * 256 * 4
        y = (x @ w).exp()  # the matmul's output is freed; exp keeps its own output
        del x, view
        assert tracker.live == 2 * 64 * 256 * 4  # y, and x, which the matmul's backward keeps
        loss = y.sum()
        del y
        assert tracker.live == 2 * 64 * 256 * 4 + 4  # autograd still holds exp's output; the loss
        loss.backward()
        assert tracker.peak >= 3 * 64 * 256 * 4  # the gradients of y and of the matmul's output
        del loss
    assert w.grad is not None and tracker.live == 256 * 256 * 4  # w's gradient alone


@pytest.mark.parametrize("name", list(PRESETS))
def test_parameter_counts_are_exact(name: str) -> None:
    from transformers import AutoModelForCausalLM

    config = model_config(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    counted = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    assert ModelDims.from_config(config).params == counted


def test_estimate_components() -> None:
    dims = ModelDims.from_config(model_config("Qwen/Qwen2.5-0.5B"))
    grpo = estimate(dims, StepShape("grpo", "fused-linear", batch=8, prompt_len=256, response_len=1024))
    ppo = estimate(dims, StepShape("ppo", "fused-linear", batch=8, prompt_len=256, response_len=1024))
    eager = estimate(dims, StepShape("grpo", "eager", batch=8, prompt_len=256, response_len=1024))
    assert grpo.components["policy weights"] == dims.params * 2 == 494_032_768 * 2
    assert grpo.components["critic weights"] == 0 < ppo.components["critic weights"]
    assert ppo.components["optimizer states"] == 2 * ppo.components["gradients"]
    assert grpo.components["logits"] == 0 and eager.components["logits"] == 8 * 1024 * 151936 * 2
    assert eager.peak > grpo.peak and ppo.peak > grpo.peak
    assert list(grpo.stages) == [s for s in STAGES if s in grpo.stages]
    checkpointed = estimate(dims, StepShape("grpo", "fused-linear", batch=8, prompt_len=256, response_len=1024,
                                            gradient_checkpointing=True))
    assert checkpointed.components["activations"] < grpo.components["activations"] / 10


def test_estimate_with_packing_counts_the_packed_tokens() -> None:
    # Responses of 256 to 1024 tokens: packed, the step holds the tokens there are, not B x (P + T).
    dims = ModelDims.from_config(model_config("Qwen/Qwen2.5-0.5B"))
    lens = (256, 512, 768, 1024)
    shape = {"batch": 4, "prompt_len": 256, "response_len": 1024, "response_lens": lens}
    for impl in ("fused-linear", "eager"):
        padded = estimate(dims, StepShape("grpo", impl, **shape))
        packed = estimate(dims, StepShape("grpo", impl, packing=True, **shape))
        assert packed.peak < padded.peak, impl
        n, padded_n = 4 * 256 + sum(lens), 4 * (256 + 1024)
        assert packed.components["activations"] * padded_n == padded.components["activations"] * n
        assert packed.components["attention masks"] == n * n * (1 + 2 * dims.layers)  # sdpa's (N, N) mask
        if impl == "eager":
            assert packed.components["logits"] == sum(lens) * dims.vocab * 2
    # Without padding, packing saves nothing and costs sdpa's (N, N) mask.
    full = {"batch": 4, "prompt_len": 256, "response_len": 1024}
    assert estimate(dims, StepShape("grpo", "fused-linear", packing=True, **full)).peak > \
        estimate(dims, StepShape("grpo", "fused-linear", **full)).peak
    config = ProfileConfig(batch=4, min_response_len=256, packing=True)  # rlops profile --packing's step
    assert config.response_lens == lens
    assert estimate_for(config).peak == estimate(dims, StepShape("grpo", "fused-linear", packing=True, **shape)).peak
    with pytest.raises(ValueError, match="min_response_len"):
        ProfileConfig(response_len=64, min_response_len=65)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_estimate_is_within_15_percent_of_measured_steps(tiny_config: str, algo: str, checkpointing: bool) -> None:
    peaks = {}
    # Three implementations where the loss's stages are the peak (GRPO without checkpointing), the
    # two extremes elsewhere: fused sits between them and shares their estimate's terms.
    impls = ("fused-linear", "fused", "eager") if algo == "grpo" and not checkpointing else ("fused-linear", "eager")
    for impl in impls:
        config = ProfileConfig(model=tiny_config, algo=algo, loss_impl=impl, batch=4, group_size=2, prompt_len=16,
                               response_len=32, generation_chunk=16, gradient_checkpointing=checkpointing)
        measured = profile_step(config)
        est = estimate_for(config, device="cpu")
        assert abs(est.peak / measured.peak_bytes - 1) < 0.15, (impl, est.peak, measured.peak_bytes)
        assert [s.name for s in measured.stages] == list(est.stages)
        for stage in measured.stages:
            assert abs(est.stages[stage.name] / stage.peak_bytes - 1) < 0.25, (impl, stage)
        weights = sum(v for k, v in est.components.items() if k.endswith("weights"))
        assert abs(measured.baseline_bytes - weights) < 0.01 * weights  # the models (and small buffers)
        peaks[impl] = measured.peak_bytes
    if algo == "grpo" and not checkpointing:  # here the loss's stages are the step's peak
        # The fused-linear loss never makes the logits; eager makes three more copies of them.
        assert peaks["fused-linear"] < peaks["fused"] < peaks["eager"], peaks


def _rlops(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlops", "profile", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=900)


def test_profile_estimate_command(tmp_path: Path) -> None:
    out = _rlops("--estimate", "--response-len", "1024", "4096", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    for row in ("policy weights", "reference weights", "critic weights", "reward model weights", "gradients",
                "optimizer states", "activations", "logits", "**step peak**"):
        assert f"| {row} |" in out.stdout, row
    assert "| grpo | 256 + 4096 |" in out.stdout and "| ppo | 256 + 1024 |" in out.stdout
    saved = json.loads((tmp_path / "estimate.json").read_text())
    assert len(saved) == 2 * 2 * 3 and all(s["peak_bytes"] > 0 for s in saved)


def test_profile_command_measures_and_writes(tiny_config: str, tmp_path: Path) -> None:
    out = _rlops("--model", tiny_config, "--algo", "grpo", "--loss", "fused-linear", "eager", "--batch", "4",
                 "--group-size", "2", "--prompt-len", "16", "--response-len", "32", "--generation-chunk", "16",
                 "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "no CUDA device: measuring on CPU" in out.stdout
    (report,) = tmp_path.glob("*-profile.json")
    run = json.loads(report.read_text())
    assert [c["config"]["loss_impl"] for c in run["cases"]] == ["fused-linear", "eager"]
    assert all(isinstance(c["measured"], int) for c in run["cases"])
    assert report.with_name(report.stem + "-timeline.png").stat().st_size > 0
    assert "| grpo | 16 + 32 |" in report.with_suffix(".md").read_text()


@pytest.mark.parametrize("args, message", [
    (("--model", "nope/unknown-model", "--estimate"), "not a preset"),
    (("--batch", "6", "--group-size", "4", "--estimate"),
     "multiple of --group-size (at least 2), got --batch 6 --group-size 4; for example --batch 8 --group-size 4"),
    (("--algo", "dpo", "--estimate"), "invalid choice"),
])
def test_profile_refuses_bad_input(args: tuple[str, ...], message: str) -> None:
    out = _rlops(*args)
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_group_size_defaults_to_a_divisor_of_the_batch(capsys: pytest.CaptureFixture) -> None:
    assert {b: default_group_size(b) for b in (1, 2, 4, 6, 8, 10, 11, 12, 16, 64)} == {
        1: 1, 2: 2, 4: 4, 6: 6, 8: 8, 10: 5, 11: 11, 12: 6, 16: 8, 64: 8}
    # The command's defaults are the library's, and README's tables' 4 sequences.
    assert profile_cli.build_parser().parse_args([]).batch == ProfileConfig().batch == 4
    assert ProfileConfig(batch=12).group_size == 6
    assert profile_cli.main(["--batch", "4", "--algo", "grpo", "--loss", "fused-linear", "--estimate"]) == 0
    assert "batch 4 x (256 + 1024) tokens" in capsys.readouterr().out
    assert profile_cli.main(["--algo", "grpo", "--loss", "fused-linear", "--min-response-len", "256", "--packing",
                             "--estimate"]) == 0
    assert "batch 4 x (256 + 1024) tokens, responses of 256 to 1024 tokens, packed" in capsys.readouterr().out


@pytest.mark.parametrize("args, module, install", [
    (["--estimate"], "transformers", "pip install 'rlops[train]'"),
    (["--device", "cpu"], "triton", "pip install triton"),
    (["--device", "cpu"], "numpy", "pip install numpy"),
])
def test_profile_names_a_missing_module_and_how_to_install_it(monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture, args: list[str],
                                                              module: str, install: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    assert profile_cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{module} is not installed" in err and install in err, err
