"""README.md runs as written: every fenced block is executed or accounted for.

Each block is preceded by a directive comment `<!-- readme-test: ... -->`:
- `setup=NAME`: a Python block run after the setup NAME below, which binds the names the
  snippet takes from its surroundings (logits, a model, a batch, ...), at small sizes on CPU;
- `commands`: a bash block whose `rlops ...` lines are parsed by the real argument parsers
  (options and values must exist and be valid) without running them;
- `skip: REASON`: not run here, and why (GPU-only, or long and tested elsewhere).
A block without a directive fails the test, so README cannot gain an unchecked snippet.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"(?:<!-- readme-test: (?P<directive>.*?) -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)```", re.S)


def blocks() -> list[tuple[int, str, str, str]]:
    """(line, language, directive or "", body) of every fenced block of README.md."""
    text = README.read_text()
    return [(text[:m.start("body")].count("\n"), m["lang"], m["directive"] or "", m["body"])
            for m in BLOCK.finditer(text)]


def _policy_batch() -> dict[str, object]:
    g = torch.Generator().manual_seed(0)
    b, t, v = 2, 5, 11
    logp = -torch.rand(b, t, generator=g)
    return {
        "logits": torch.randn(b, t, v, generator=g, requires_grad=True),
        "tokens": torch.randint(0, v, (b, t), generator=g),
        "advantages": torch.randn(b, t, generator=g),
        "completion_mask": torch.ones(b, t, dtype=torch.bool),
        "mask": torch.ones(b, t, dtype=torch.bool),
        "old_logps": logp, "ref_logps": logp - 0.1,
    }


def _tiny_model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1))


def _loop() -> dict[str, object]:
    policy = _tiny_model()
    b, prompt_len, completion_len = 2, 3, 4
    input_ids = torch.randint(0, 32, (b, prompt_len + completion_len))
    return {"policy": policy, "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "prompt_len": prompt_len, "group_advantages": torch.randn(b),
            "completion_mask": torch.ones(b, completion_len, dtype=torch.bool),
            "old_logps": -torch.rand(b, completion_len), "ref_logps": -torch.rand(b, completion_len),
            "optimizer": torch.optim.SGD(policy.parameters(), lr=0.1)}


def _hf() -> dict[str, object]:
    loop = _loop()
    completion_len = 4
    return {"model": loop["policy"], "input_ids": loop["input_ids"], "attention_mask": loop["attention_mask"],
            "completion_len": completion_len, "completion_ids": loop["input_ids"][:, -completion_len:],
            "advantages": torch.randn(2, completion_len), "completion_mask": loop["completion_mask"],
            "old_logps": loop["old_logps"], "ref_logps": loop["ref_logps"]}


def _advantages() -> dict[str, object]:
    b, t = 16, 6
    return {"scores": torch.randn(b), "logprobs": -torch.rand(b, t), "ref_logprobs": -torch.rand(b, t),
            "mask": torch.ones(b, t, dtype=torch.bool), "values": torch.randn(b, t),
            "sequence_rewards": torch.rand(b)}


def _verl() -> dict[str, object]:
    batch = _policy_batch()
    return {"logits": batch["logits"], "responses": batch["tokens"], "old_log_prob": batch["old_logps"],
            "log_prob": batch["old_logps"] + 0.1, "advantages": batch["advantages"],
            "response_mask": batch["mask"], "loss_agg_mode": "token-mean",
            "config": {"clip_ratio": 0.2, "clip_ratio_high": 0.28},
            "rewards": torch.randn(2, 5), "values": torch.randn(2, 5), "gamma": 1.0, "lam": 0.95}


def _openrlhf() -> dict[str, object]:
    batch = _policy_batch()
    return {"logits": batch["logits"], "labels": batch["tokens"], "old_log_probs": batch["old_logps"],
            "advantages": batch["advantages"], "action_mask": batch["mask"], "base_log_probs": batch["ref_logps"]}


def _packed() -> dict[str, object]:
    g = torch.Generator().manual_seed(0)
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 0, 1, 2]])  # three sequences, no padding
    n, v = position_ids.shape[1], 11
    return {"position_ids": position_ids, "logits": torch.randn(1, n, v, generator=g, requires_grad=True),
            "tokens": torch.randint(0, v, (1, n), generator=g), "advantages": torch.randn(3, generator=g),
            "old_logps": -torch.rand(1, n, generator=g), "completion_mask": torch.ones(1, n, dtype=torch.bool)}


SETUPS: dict[str, Callable[[], dict[str, object]]] = {
    "policy": _policy_batch, "loop": _loop, "hf": _hf, "advantages": _advantages, "verl": _verl,
    "openrlhf": _openrlhf, "packed": _packed,
}


def _parsers() -> dict[str, Callable[[list[str]], object]]:
    """`rlops <command>`'s argument parsing, without running the command."""
    from rlops import cli

    def train(args: list[str]) -> object:
        parsed = cli.train_parser().parse_args(args)
        from rlops.cli_checks import checked_config

        return checked_config(parsed.config_class, parsed)

    from rlops.bench.run import build_parser as bench_parser
    from rlops.profile_cli import build_parser as profile_parser

    return {"train": train, "bench": bench_parser().parse_args, "profile": profile_parser().parse_args}


def _check_commands(body: str) -> int:
    """Parses each `rlops <command> ...` line of a bash block; returns how many were checked."""
    parsers, checked = _parsers(), 0
    for line in body.splitlines():
        words = shlex.split(line.split("#")[0])
        if words[:1] != ["rlops"] or len(words) < 2 or words[1] not in parsers:
            continue
        try:
            parsers[words[1]](words[2:])
        except SystemExit as e:
            pytest.fail(f"README: `{' '.join(words)}` does not parse (exit {e.code})")
        checked += 1
    return checked


CASES = blocks()


@pytest.mark.parametrize("line, lang, directive, body", CASES, ids=[f"line{c[0]}" for c in CASES])
def test_readme_block(line: int, lang: str, directive: str, body: str, monkeypatch: pytest.MonkeyPatch,
                      tmp_path: Path) -> None:
    assert directive, f"README.md line {line}: a ```{lang} block without a <!-- readme-test: ... --> directive"
    kind, _, value = directive.partition("=") if "=" in directive else directive.partition(":")
    if kind.strip() == "skip":
        assert value.strip(), f"README.md line {line}: skip without a reason"
        pytest.skip(f"README.md line {line}: {value.strip()}")
    if kind.strip() == "commands":
        assert lang == "bash" and _check_commands(body) > 0
        return
    assert kind.strip() == "setup" and lang == "python", f"README.md line {line}: unknown directive {directive!r}"
    monkeypatch.chdir(tmp_path)
    import rlops

    # `import rlops` comes once, in the first snippet; the later ones take it as given.
    namespace = {"rlops": rlops, "torch": torch, **SETUPS[value.strip()]()}
    exec(compile(body, f"README.md:{line}", "exec"), namespace)  # the README's own code
