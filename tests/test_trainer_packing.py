"""GRPO and PPO with packing=True: each minibatch's sequences in one row without padding, position
ids restarting per sequence, the loss on the packed layout (cu_seqlens). A packed step must be
the padded step (same loss, same updated weights), and a model whose attention would mix the
packed sequences is refused when the trainer is built."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from trainer_fixtures import SEVENS, small_model

from rlops.trainers import GRPOConfig, GRPOTrainer, PPOConfig, PPOTrainer, ValueModel, arithmetic
from rlops.trainers.checkpoint import Checkpoint
from rlops.trainers.packed import PackedRollout, check_packing
from rlops.trainers.rollout import Rollout, encode_pairs

# Responses of 1 to 10 tokens (with EOS) after prompts of 5 to 7: padding on both sides of every batch.
RESPONSES = ["7", "77 7", "1+2=3 7", "", "7777777", "12", "7 7", "0"]


def _fixed_rollout(tok: arithmetic.CharTokenizer) -> Any:
    def rollout(items: list[int]) -> Rollout:
        return encode_pairs(tok, [SEVENS.prompt(x) for x in items], RESPONSES[:len(items)], torch.device("cpu"))
    return rollout


def test_packed_rollout_layout() -> None:
    tok = arithmetic.CharTokenizer()
    rollout = encode_pairs(tok, ["1+2=", "10+20="], ["3", "30"], torch.device("cpu"))
    packed = PackedRollout.of(rollout)
    # BOS + 4 prompt tokens + "3" EOS, then BOS + 6 prompt tokens + "30" EOS.
    assert packed.positions.tolist() == [[*range(7), *range(10)]]
    assert packed.input_ids[0].tolist() == rollout.input_ids[0, 2:-1].tolist() + rollout.input_ids[1].tolist()
    assert packed.scored.tolist() == [4, 5, 13, 14, 15]  # the states before each completion token
    assert packed.input_ids[0, packed.scored + 1].tolist() == packed.completion_ids[0].tolist()
    assert packed.cu_seqlens.tolist() == [0, 2, 5] and packed.width == 3
    x = torch.arange(6.0).view(2, 3)
    assert packed.unpack(packed.pack(x)).tolist() == [[0.0, 1.0, 0.0], [3.0, 4.0, 5.0]]
    holey = Rollout(rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                    torch.tensor([[1, 0, 1], [1, 1, 1]]), rollout.texts)
    with pytest.raises(ValueError, match="prefix"):
        PackedRollout.of(holey)


def _step(kind: str, packing: bool, **options: Any) -> tuple[dict[str, float], list[torch.Tensor], list[tuple]]:
    """One step from seed 0 on the fixed rollout: its metrics, the updated weights (policy, and
    critic for PPO), and the (input_ids shape, position_ids) of the decoder's packed calls."""
    tok = arithmetic.CharTokenizer()
    model = small_model(tok)
    if kind == "grpo":
        trainer = GRPOTrainer(model, tok, SEVENS, list(range(50)), GRPOConfig(
            prompts_per_step=2, group_size=4, max_new_tokens=8, kl_coef=0.1, epochs=2, packing=packing, **options))
    else:
        trainer = PPOTrainer(model, tok, SEVENS, list(range(50)), PPOConfig(
            prompts_per_step=6, max_new_tokens=8, kl_mode="loss", entropy_coef=0.01, packing=packing, **options))
    trainer.rollout = _fixed_rollout(tok)
    calls: list[tuple] = []

    def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if kwargs.get("attention_mask") is None:
            calls.append((tuple(kwargs["input_ids"].shape), kwargs["position_ids"]))

    hooks = [m.register_forward_pre_hook(record, with_kwargs=True)
             for m in [model.get_decoder(), *([trainer.critic.decoder] if kind == "ppo" else [])]]
    metrics = trainer.step()
    for hook in hooks:
        hook.remove()
    params = [*model.parameters(), *(trainer.critic.parameters() if kind == "ppo" else [])]
    return metrics, [p.detach().clone() for p in params], calls


@pytest.mark.parametrize("kind, options", [
    ("grpo", {"loss_agg": "seq-mean-token-sum-norm"}),  # the padded layout's T as norm_len
    ("grpo", {"loss_impl": "eager", "loss_agg": "seq-mean-token-mean"}),
    ("ppo", {}),  # the critic's values and value loss packed too
], ids=["grpo-fused-linear", "grpo-eager", "ppo-fused-linear"])
def test_packing_takes_the_same_step(kind: str, options: dict) -> None:
    padded, padded_params, padded_calls = _step(kind, False, **options)
    packed, packed_params, calls = _step(kind, True, **options)
    assert not padded_calls and calls
    for shape, positions in calls:  # one row, several sequences, each counted from 0
        assert shape[0] == 1 and positions.shape == shape and int((positions == 0).sum()) >= 2
    assert padded.keys() == packed.keys() and padded["loss"] != 0.0
    for key, value in padded.items():
        assert packed[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    for a, b in zip(padded_params, packed_params, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_packing_refuses_attention_that_mixes_sequences(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AttentionInterface, masking_utils
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    # sdpa's kernel under a name transformers builds no mask for: it would attend across sequences.
    AttentionInterface.register("rlops_test_unmasked", sdpa_attention_forward)
    tok = arithmetic.CharTokenizer()
    bad = small_model(tok)
    bad.set_attn_implementation("rlops_test_unmasked")
    with pytest.raises(ValueError, match=r"packing=True .*policy's attention implementation 'rlops_test_unmasked'"):
        GRPOTrainer(bad, tok, SEVENS, [1], GRPOConfig(packing=True))
    GRPOTrainer(bad, tok, SEVENS, [1], GRPOConfig(packing=False))  # padded, any attention works
    with pytest.raises(ValueError, match=r"packing=True .*critic's attention implementation 'rlops_test_unmasked'"):
        PPOTrainer(small_model(tok), tok, SEVENS, [1], PPOConfig(packing=True), critic=ValueModel.from_causal_lm(bad))
    # A registered implementation whose layers still mix the sequences is caught by the probe.
    good = small_model(tok)
    check_packing(good, "policy")
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(ValueError, match=r"packing=True: in the policy .*'sdpa'.* mix packed sequences"):
        check_packing(good, "policy")


def test_a_checkpoint_from_before_packing_resumes(tmp_path: Path) -> None:
    """A checkpoint written before the packing field existed holds no value for it: it had the
    default then, so it resumes a run with the default and refuses one with packing=True."""
    checkpoint = Checkpoint(tmp_path)
    model = torch.nn.Linear(2, 2)
    checkpoint.save(3, {"model": model}, {}, GRPOConfig())
    state = torch.load(checkpoint.path, weights_only=False)
    del state["config"]["packing"]
    torch.save(state, checkpoint.path)
    assert checkpoint.load({"model": model}, {}, GRPOConfig())[0] == 3
    with pytest.raises(ValueError, match=r"different config \(packing\)"):
        checkpoint.load({"model": model}, {}, GRPOConfig(packing=True))
