"""`rlops profile` on CUDA (skipped without a GPU): the allocator's counters and history, and the
analytic estimate within 15% of the measured peak of real GRPO and PPO steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlops.profile import ProfileConfig, estimate_for, profile_step

pytestmark = pytest.mark.gpu

# A Qwen2-style model small enough for a test, with a real vocabulary.
CONFIG = {"model_type": "qwen2", "hidden_size": 512, "intermediate_size": 2816, "num_hidden_layers": 4,
          "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("model") / "config.json"
    path.write_text(json.dumps(CONFIG))
    return str(path)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("algo", ["grpo", "ppo"])
@pytest.mark.parametrize("impl", ["fused-linear", "fused", "eager"])
def test_estimate_is_within_15_percent_on_cuda(model_file: str, algo: str, impl: str, checkpointing: bool) -> None:
    config = ProfileConfig(model=model_file, algo=algo, loss_impl=impl, batch=4, group_size=4, prompt_len=128,
                           response_len=1024, gradient_checkpointing=checkpointing)
    measured = profile_step(config)
    est = estimate_for(config, device="cuda")
    assert abs(est.peak / measured.peak_bytes - 1) < 0.15, (est.stages, [(s.name, s.peak_bytes)
                                                                          for s in measured.stages])
    assert [s.name for s in measured.stages] == list(est.stages)
    assert len(measured.timeline) > 100 and max(measured.timeline) <= measured.peak_bytes * 1.01
    assert measured.device != "cpu"


def test_profile_writes_a_timeline(model_file: str, tmp_path: Path) -> None:
    from rlops.profile_cli import main

    assert main(["--model", model_file, "--algo", "grpo", "--batch", "4", "--group-size", "4", "--prompt-len", "64",
                 "--response-len", "256", "--out", str(tmp_path)]) == 0
    (timeline,) = tmp_path.glob("*-timeline.png")
    assert timeline.stat().st_size > 0
