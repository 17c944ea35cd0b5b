"""rlops inside TRL: TRL's helpers, and GRPOTrainer's loss, equal to TRL's own, step by step.

Runs real TRL (CPU, a tiny Llama built from a config and saved locally, a character-level
tokenizer built in memory: nothing is downloaded), through accelerate exactly as TRL does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import DEVICE, assert_grad_close, assert_values_close

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

import rlops.integrations.trl as rlops_trl  # noqa: E402

CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 +-=?")


def _tokenizer() -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", *CHARS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                bos_token="<bos>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _reward(completions: list[str], **kwargs: object) -> list[float]:
    return [sum(c.count(d) for d in "0123456789") / 3 - len(c) / 10 for c in completions]


class _GradRecorder(transformers.TrainerCallback):
    def __init__(self) -> None:
        self.grads: list[list[torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append([p.grad.detach().clone() for p in model.parameters() if p.grad is not None])


def _run(model_path: str, out: Path, rlops_path: str | None, **config: object):
    """Trains two steps; returns every micro-batch's loss and the gradients before each optimizer step."""
    args = trl.GRPOConfig(output_dir=str(out), per_device_train_batch_size=4, num_generations=4,
                          max_completion_length=6, max_steps=2, learning_rate=1e-2, logging_steps=1, report_to=[],
                          use_cpu=True, seed=0, bf16=False, save_strategy="no", **config)
    dataset = datasets.Dataset.from_dict({"prompt": ["1+1=", "2+3=", "4+4=", "5+1=", "7+2=", "3+3="] * 4})
    recorder = _GradRecorder()
    kwargs = dict(model=model_path, reward_funcs=_reward, args=args, train_dataset=dataset,
                  processing_class=_tokenizer(), callbacks=[recorder])
    trainer = (rlops_trl.GRPOTrainer(rlops_path=rlops_path, **kwargs) if rlops_path
               else trl.GRPOTrainer(**kwargs))
    losses = []
    compute = trainer._compute_loss

    def recording(model, inputs):
        loss = compute(model, inputs)
        losses.append(loss.detach().clone())
        return loss

    trainer._compute_loss = recording
    trainer.train()
    return losses, recorder.grads, trainer


CONFIGS = {
    "grpo": {"loss_type": "grpo"},
    "bnpo-kl-bias-corrected": {"loss_type": "bnpo", "beta": 0.04},
    "dr_grpo-clip-higher": {"loss_type": "dr_grpo", "epsilon_high": 0.28},
    "dapo-kl-entropy-accumulation": {"loss_type": "dapo", "beta": 0.04, "use_bias_correction_kl": False,
                                     "entropy_coef": 0.01, "gradient_accumulation_steps": 2},
    "grpo-sequence-level-epochs": {"loss_type": "grpo", "importance_sampling_level": "sequence",
                                   "num_iterations": 2, "temperature": 0.7, "gradient_accumulation_steps": 2},
    "dapo-epochs-entropy": {"loss_type": "dapo", "num_iterations": 2, "entropy_coef": 0.02, "beta": 0.02,
                            "epsilon": 0.1},
}


@pytest.mark.parametrize("path", ["linear", "logits"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_grpo_trainer_steps_equal_trl(name: str, path: str, tiny_model: str, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    for fn in ("linear_policy_loss", "policy_loss"):
        real = getattr(rlops_trl, fn)

        def spy(*args, _real=real, **kwargs):
            calls["n"] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(rlops_trl, fn, spy)
    theirs, their_grads, _ = _run(tiny_model, tmp_path / "trl", None, **CONFIGS[name])
    ours, our_grads, trainer = _run(tiny_model, tmp_path / "rlops", path, **CONFIGS[name])
    assert trainer.rlops_path == path and calls["n"] == len(ours) > 0
    assert len(ours) == len(theirs) and len(our_grads) == len(their_grads) == 2
    for a, b in zip(ours, theirs, strict=True):
        assert_values_close(a, b, 1e-5 * max(1.0, b.abs().item()), "loss")
    for step_ours, step_theirs in zip(our_grads, their_grads, strict=True):
        _assert_step_grads_close(step_ours, step_theirs)


def _assert_step_grads_close(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> None:
    """Two float32 computations of one gradient agree to 1e-5 of its largest entry (SPEC 6).

    The scale is the whole step's gradient: a parameter whose gradient nearly cancels out
    would otherwise be held to a bound below either computation's own rounding.
    """
    assert len(ours) == len(theirs)
    scale = max(b.abs().max().item() for b in theirs)
    for a, b in zip(ours, theirs, strict=True):
        err = (a - b).abs().max().item()
        assert err <= 1e-5 * scale, f"grad: max abs error {err:.3g} > {1e-5 * scale:.3g}"


def _batch(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows, prompt, completion = 4, 5, 7
    completion_mask = torch.ones(rows, completion, dtype=torch.long)
    completion_mask[1, 4:] = 0
    completion_mask[3, 2:] = 0
    return {
        "prompt_ids": torch.randint(4, vocab, (rows, prompt), generator=g),
        "prompt_mask": torch.ones(rows, prompt, dtype=torch.long),
        "completion_ids": torch.randint(4, vocab, (rows, completion), generator=g),
        "completion_mask": completion_mask,
        "advantages": torch.randn(rows, generator=g),
        "old_per_token_logps": -torch.rand(rows, completion, generator=g) * 4 - 2,
        "ref_per_token_logps": -torch.rand(rows, completion, generator=g) * 4 - 2,
        "importance_sampling_ratio": torch.rand(rows, completion, generator=g) + 0.5,
        "tool_mask": (torch.rand(rows, completion, generator=g) > 0.2).long(),
        "num_items_in_batch": torch.tensor(20.0),
    }


@pytest.mark.parametrize("path", ["linear", "logits"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_vllm_importance_sampling_and_tool_mask(loss_type: str, path: str, tiny_model: str, tmp_path: Path) -> None:
    args = trl.GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                          max_completion_length=7, report_to=[], use_cpu=True, bf16=False, loss_type=loss_type,
                          beta=0.04, entropy_coef=0.01)
    trainer = trl.GRPOTrainer(model=tiny_model, reward_funcs=_reward, args=args,
                              train_dataset=datasets.Dataset.from_dict({"prompt": ["1+1="] * 4}),
                              processing_class=_tokenizer())
    trainer.use_vllm = True  # what a vLLM run feeds the loss: the sampler's importance-sampling ratio
    trainer.vllm_importance_sampling_correction = True
    trainer.current_gradient_accumulation_steps = 1
    inputs = _batch(len(trainer.processing_class))
    model = trainer.model

    def loss_and_grads(compute) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        loss = compute(model, inputs)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    want, want_grads = loss_and_grads(lambda m, i: trl.GRPOTrainer._compute_loss(trainer, m, i))
    rlops_trl.patch(trainer, path=path)
    got, got_grads = loss_and_grads(trainer._compute_loss)
    assert_values_close(got, want, 1e-5 * max(1.0, want.abs().item()), "loss")
    _assert_step_grads_close(got_grads, want_grads)


@pytest.mark.parametrize(
    "config, match",
    [
        ({"loss_type": "cispo"}, "loss_type='cispo'"),
        ({"loss_type": "sapo"}, "loss_type='sapo'"),
        ({"delta": 2.0}, "delta"),
        ({"off_policy_mask_threshold": 0.5}, "off_policy_mask_threshold"),
        ({"top_entropy_quantile": 0.5}, "top_entropy_quantile"),
        ({"use_adaptive_entropy": True}, "adaptive entropy"),
    ],
)
def test_options_rlops_cannot_honour_are_refused(config: dict, match: str, tiny_model: str, tmp_path: Path) -> None:
    args = trl.GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, report_to=[],
                          use_cpu=True, bf16=False, **config)
    trainer = trl.GRPOTrainer(model=tiny_model, reward_funcs=_reward, args=args,
                              train_dataset=datasets.Dataset.from_dict({"prompt": ["1+1="] * 4}),
                              processing_class=_tokenizer())
    with pytest.raises(ValueError, match=match):
        rlops_trl.patch(trainer)
    with pytest.raises(ValueError, match="path must be one of"):
        rlops_trl.patch(trainer, path="fused")


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_selective_log_softmax_and_entropy_equal_trl(temperature: float, backend: str) -> None:
    from trl.trainer import utils as trl_utils

    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 50, generator=g) * 3).to(DEVICE)
    index = torch.randint(0, 50, (3, 5), generator=g).to(DEVICE)
    row_mask = (torch.rand(3, 5, generator=g) > 0.3).to(DEVICE)
    for args in ((index,), (index, temperature, row_mask)):
        ours_x, theirs_x = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
        kwargs = {} if len(args) == 1 else {"temperature": args[1], "row_mask": args[2]}
        ours = rlops_trl.selective_log_softmax(ours_x, index, **kwargs, backend=backend)
        theirs = trl_utils.selective_log_softmax(theirs_x, index, **kwargs)
        assert_values_close(ours, theirs)
        w = torch.randn(3, 5, generator=g).to(DEVICE)
        (ours * w).sum().backward()
        (theirs * w).sum().backward()
        assert_grad_close(ours_x.grad, theirs_x.grad)
    top_k = torch.randint(0, 50, (3, 5, 4), generator=g).to(DEVICE)
    assert_values_close(rlops_trl.selective_log_softmax(logits, top_k, temperature, backend=backend),
                        trl_utils.selective_log_softmax(logits, top_k, temperature))
    assert_values_close(rlops_trl.entropy_from_logits(logits, backend=backend), trl_utils.entropy_from_logits(logits))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_selective_log_softmax_top_k_row_mask_of_index_shape_equals_trl(backend: str) -> None:
    """TRL's row_mask has index's shape, (..., K) too, and masks entry by entry."""
    from trl.trainer import utils as trl_utils

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 50, generator=g).to(DEVICE)
    top_k = torch.randint(0, 50, (3, 5, 4), generator=g).to(DEVICE)
    entry_mask = (torch.rand(3, 5, 4, generator=g) > 0.3).to(DEVICE)
    assert_values_close(rlops_trl.selective_log_softmax(logits, top_k, 0.8, entry_mask, backend=backend),
                        trl_utils.selective_log_softmax(logits, top_k, 0.8, entry_mask))
    rows = entry_mask[..., 0]  # a mask of the rows, broadcast over the K ids
    assert_values_close(rlops_trl.selective_log_softmax(logits, top_k, 0.8, rows, backend=backend),
                        trl_utils.selective_log_softmax(logits, top_k, 0.8, rows[..., None].expand_as(top_k)))


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize(("index_shape", "bad", "error", "match"), [
    ((3, 5), {"index": 50}, ValueError, r"index must lie in \[0, V\) = \[0, 50\)"),
    ((3, 5, 4), {"index": 50}, ValueError, r"index must lie in \[0, V\) = \[0, 50\)"),
    ((3, 5, 4), {"temperature": 0.0}, ValueError, "temperature must be a finite number > 0"),
    ((3, 5), {"row_mask": (3, 4)}, ValueError, "row_mask must have shape"),
    ((3, 5, 4), {"row_mask": (3, 4)}, ValueError, "row_mask must have shape"),
    ((3, 5, 4), {"index_dtype": torch.float32}, TypeError, "index must be an integer tensor"),
])
def test_selective_log_softmax_refuses_bad_input_naming_it(index_shape, bad, error, match, backend: str) -> None:
    logits = torch.randn(3, 5, 50, device=DEVICE)
    index = torch.randint(0, 50, index_shape, device=DEVICE).to(bad.get("index_dtype", torch.long))
    if "index" in bad:
        index[0, 0] = bad["index"]
    row_mask = torch.ones(bad["row_mask"], dtype=torch.bool, device=DEVICE) if "row_mask" in bad else None
    with pytest.raises(error, match=match):
        rlops_trl.selective_log_softmax(logits, index, bad.get("temperature", 1.0), row_mask, backend=backend)
