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


def _run(model_path: str, out: Path, rlops_path: str | None, padding_free: bool = False, **config: object):
    """Trains two steps; returns every micro-batch's loss and the gradients before each optimizer step."""
    args = trl.GRPOConfig(output_dir=str(out), per_device_train_batch_size=4, num_generations=4,
                          max_completion_length=6, max_steps=2, learning_rate=1e-2, logging_steps=1, report_to=[],
                          use_cpu=True, seed=0, bf16=False, save_strategy="no", **config)
    dataset = datasets.Dataset.from_dict({"prompt": ["1+1=", "2+3=", "4+4=", "5+1=", "7+2=", "3+3="] * 4})
    recorder = _GradRecorder()
    kwargs = dict(model=model_path, reward_funcs=_reward, args=args, train_dataset=dataset,
                  processing_class=_tokenizer(), callbacks=[recorder])
    trainer = (rlops_trl.GRPOTrainer(rlops_path=rlops_path, rlops_padding_free=padding_free, **kwargs) if rlops_path
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
# Configurations whose rlops run packs TRL's batches (patch(..., padding_free=True)): real rollouts,
# completions of different lengths, the second epoch off-policy.
PADDING_FREE = {"dapo-epochs-entropy", "grpo-sequence-level-epochs"}


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
    theirs, their_grads, trl_trainer = _run(tiny_model, tmp_path / "trl", None, **CONFIGS[name])
    ours, our_grads, trainer = _run(tiny_model, tmp_path / "rlops", path, name in PADDING_FREE, **CONFIGS[name])
    assert trainer.rlops_path == path and calls["n"] == len(ours) > 0
    assert trainer.rlops_padding_free == (name in PADDING_FREE)
    assert len(ours) == len(theirs) and len(our_grads) == len(their_grads) == 2
    for a, b in zip(ours, theirs, strict=True):
        assert_values_close(a, b, 1e-5 * max(1.0, b.abs().item()), "loss")
    for step_ours, step_theirs in zip(our_grads, their_grads, strict=True):
        _assert_step_grads_close(step_ours, step_theirs)
    _assert_loss_metrics_equal(trainer.state.log_history, trl_trainer.state.log_history)


LOSS_METRICS = ("kl", "entropy", "policy_loss", "entropy_coef", "clip_ratio/low_mean", "clip_ratio/high_mean",
                "clip_ratio/region_mean", "clip_ratio/low_min", "clip_ratio/high_max")


def _assert_loss_metrics_equal(ours: list[dict], theirs: list[dict]) -> None:
    """The metrics TRL logs from its loss, step by step."""
    assert len(ours) == len(theirs)
    for step_ours, step_theirs in zip(ours, theirs, strict=True):
        keys = [k for k in LOSS_METRICS if k in step_theirs]
        assert [k for k in LOSS_METRICS if k in step_ours] == keys
        for key in keys:
            assert step_ours[key] == pytest.approx(step_theirs[key], rel=1e-5, abs=1e-6, nan_ok=True), key


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


def _loss_grads_metrics(trainer: object, model: torch.nn.Module, inputs: dict, compute
                        ) -> tuple[torch.Tensor, list[torch.Tensor], dict[str, list[float]]]:
    """compute(model, inputs)'s loss, the parameters' gradients and the metrics it logged."""
    model.zero_grad()
    trainer._metrics["train"].clear()
    loss = compute(model, inputs)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()], dict(trainer._metrics["train"])


OBJECTIVE_CONFIGS = {
    "cispo": {"loss_type": "cispo", "epsilon_high": 1.3, "beta": 0.04},
    "sapo": {"loss_type": "sapo", "sapo_temperature_pos": 1.0, "sapo_temperature_neg": 2.0, "entropy_coef": 0.01},
    "sapo-sequence": {"loss_type": "sapo", "importance_sampling_level": "sequence"},
    "grpo-delta": {"loss_type": "grpo", "delta": 1.2, "epsilon_high": 0.28, "beta": 0.04},
}


@pytest.mark.parametrize("path", ["linear", "logits"])
@pytest.mark.parametrize("name", list(OBJECTIVE_CONFIGS))
def test_objectives_equal_trl(name: str, path: str, tiny_model: str, tmp_path: Path) -> None:
    """TRL's cispo, sapo and two-sided clipping (delta): loss, gradients and the metrics TRL logs,
    on a batch with masked tokens and old log-probs far enough off policy that the caps bind."""
    args = trl.GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                          max_completion_length=7, report_to=[], use_cpu=True, bf16=False, **OBJECTIVE_CONFIGS[name])
    trainer = trl.GRPOTrainer(model=tiny_model, reward_funcs=_reward, args=args,
                              train_dataset=datasets.Dataset.from_dict({"prompt": ["1+1="] * 4}),
                              processing_class=_tokenizer())
    trainer.current_gradient_accumulation_steps = 2
    inputs = _batch(len(trainer.processing_class))
    model = trainer.model.train()

    def loss_grads_metrics(compute) -> tuple[torch.Tensor, list[torch.Tensor], dict[str, list[float]]]:
        return _loss_grads_metrics(trainer, model, inputs, compute)

    want, want_grads, want_metrics = loss_grads_metrics(lambda m, i: trl.GRPOTrainer._compute_loss(trainer, m, i))
    if name == "cispo":
        assert want_metrics["cispo_clip_ratio"][0] > 0, "the ratio cap should bind in this batch"
    rlops_trl.patch(trainer, path=path)
    got, got_grads, got_metrics = loss_grads_metrics(trainer._compute_loss)
    assert_values_close(got, want, 1e-5 * max(1.0, want.abs().item()), "loss")
    _assert_step_grads_close(got_grads, want_grads)
    assert got_metrics.keys() == want_metrics.keys()
    for key, values in want_metrics.items():
        assert got_metrics[key] == pytest.approx(values, rel=1e-5, abs=1e-6, nan_ok=True), key


@pytest.mark.parametrize(
    "config, match",
    [
        ({"loss_type": "sapo", "delta": 2.0}, "delta with loss_type='sapo'"),
        ({"loss_type": "vespo", "delta": 2.0}, "delta with loss_type='vespo'"),
        ({"loss_type": "vespo", "vespo_k_neg": -1.0}, "negative vespo_k_pos or vespo_k_neg"),
        ({"off_policy_mask_threshold": -0.1}, "off_policy_mask_threshold < 0"),
        ({"top_entropy_quantile": 0.0}, "top_entropy_quantile <= 0"),
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


# ------------------------------------------------------------------------------------------
# padding_free: the patched loss on the packed batch against TRL's own (padded) loss
# ------------------------------------------------------------------------------------------


def _ragged_batch(model: torch.nn.Module, seed: int, empty_completion: bool) -> dict[str, torch.Tensor]:
    """A batch as TRL's _generate_and_score_completions hands it to the loss: prompts left-padded to
    different lengths, completions ended by EOS at different lengths (one fully masked, as
    mask_truncated_completions does, when empty_completion), a tool mask, the sampler's
    importance ratios, and old log-probs off the model's own so that both clip bounds bind."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    rows, prompt, completion = 4, 5, 7
    prompt_mask = torch.ones(rows, prompt, dtype=torch.long)
    prompt_mask[1, :2] = 0
    prompt_mask[2, :4] = 0  # a one-token prompt
    completion_mask = torch.ones(rows, completion, dtype=torch.long)
    completion_mask[1, 4:] = 0
    completion_mask[2, 1:] = 0  # a one-token completion
    completion_mask[3, 0 if empty_completion else 3:] = 0
    prompt_ids = torch.randint(4, vocab, (rows, prompt), generator=g).masked_fill(prompt_mask == 0, 0)
    completion_ids = torch.randint(4, vocab, (rows, completion), generator=g).masked_fill(completion_mask == 0, 0)
    with torch.no_grad():
        logits = model(input_ids=torch.cat([prompt_ids, completion_ids], 1),
                       attention_mask=torch.cat([prompt_mask, completion_mask], 1)).logits[:, prompt - 1:-1]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, completion_ids[..., None]).squeeze(-1)
    return {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
        "completion_ids": completion_ids, "completion_mask": completion_mask,
        "advantages": torch.tensor([1.0, -0.7, 0.4, -1.2]),
        # rows 0 (A > 0) and 1 (A < 0) sampled well off-policy: clipped above and below at either ratio level
        "old_per_token_logps": logp + 0.3 * torch.randn(rows, completion, generator=g)
        + torch.tensor([-0.4, 0.3, 0.0, 0.0])[:, None],
        "ref_per_token_logps": logp + 0.3 * torch.randn(rows, completion, generator=g),
        "importance_sampling_ratio": torch.rand(rows, completion, generator=g) + 0.5,
        # every completion keeps a valid token: grpo's sequence mean differs from TRL's on one with none
        "tool_mask": (torch.rand(rows, completion, generator=g) > 0.2).long().index_fill(1, torch.tensor([0]), 1),
        "num_items_in_batch": completion_mask.sum().float(),
    }


PACKED_CONFIGS = {
    # token-level ratio, grpo's sequence mean, KL and the sampler's importance weights
    "grpo-kl-vllm-is": ({"loss_type": "grpo", "beta": 0.04, "epsilon_high": 0.28}, False),
    # sequence-level ratio, dapo's token sum, entropy bonus, bias-corrected KL, an empty completion
    "dapo-sequence-entropy": ({"loss_type": "dapo", "beta": 0.04, "importance_sampling_level": "sequence",
                               "entropy_coef": 0.01, "use_bias_correction_kl": True, "epsilon": 0.1}, True),
}


@pytest.mark.parametrize("name", list(PACKED_CONFIGS))
def test_padding_free_equals_trl(name: str, tiny_model: str, tmp_path: Path) -> None:
    config, empty_completion = PACKED_CONFIGS[name]
    args = trl.GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                          max_completion_length=7, report_to=[], use_cpu=True, bf16=False, **config)
    trainer = trl.GRPOTrainer(model=tiny_model, reward_funcs=_reward, args=args,
                              train_dataset=datasets.Dataset.from_dict({"prompt": ["1+1="] * 4}),
                              processing_class=_tokenizer())
    trainer.use_vllm = name == "grpo-kl-vllm-is"
    trainer.vllm_importance_sampling_correction = True
    trainer.current_gradient_accumulation_steps = 2
    model = trainer.model.train()
    inputs = _batch_for(model, name, empty_completion)
    seen = []
    model.model.register_forward_pre_hook(
        lambda module, a, kw: seen.append((tuple(kw["input_ids"].shape), kw.get("attention_mask"))), with_kwargs=True)

    def loss_grads_metrics(compute) -> tuple[torch.Tensor, list[torch.Tensor], dict[str, list[float]]]:
        return _loss_grads_metrics(trainer, model, inputs, compute)

    want, want_grads, want_metrics = loss_grads_metrics(lambda m, i: trl.GRPOTrainer._compute_loss(trainer, m, i))
    clipped = want_metrics["clip_ratio/low_mean"][0], want_metrics["clip_ratio/high_mean"][0]
    assert all(c > 0 for c in clipped), f"both clip bounds should bind in this batch, got {clipped}"
    n = int(inputs["prompt_mask"].sum() + inputs["completion_mask"].sum())
    for path in ("linear", "logits"):
        rlops_trl.patch(trainer, path=path, padding_free=True)
        seen.clear()
        got, got_grads, got_metrics = loss_grads_metrics(trainer._compute_loss)
        assert seen == [((1, n), None)], "one forward on the packed sequences, no attention mask, no padding"
        assert_values_close(got, want, 1e-5 * max(1.0, want.abs().item()), f"{path} loss")
        _assert_step_grads_close(got_grads, want_grads)
        assert got_metrics.keys() == want_metrics.keys()
        for key, values in want_metrics.items():
            assert got_metrics[key] == pytest.approx(values, rel=1e-5, abs=1e-6, nan_ok=True), (path, key)
    if name == "grpo-kl-vllm-is":  # what packing cannot honour is refused, named
        right_padded = dict(inputs, prompt_mask=inputs["prompt_mask"].flip(1))
        with pytest.raises(ValueError, match=r"inputs\['prompt_mask'\] left-padded"):
            trainer._compute_loss(model, right_padded)
        no_prompt = dict(inputs, prompt_mask=inputs["prompt_mask"].index_fill(0, torch.tensor([2]), 0))
        with pytest.raises(ValueError, match="at least one prompt token"):
            trainer._compute_loss(model, no_prompt)
        attention, model.config._attn_implementation = model.config._attn_implementation, "my_attention"
        try:
            with pytest.raises(ValueError, match="padding_free with attn_implementation='my_attention'"):
                rlops_trl.patch(trainer, padding_free=True)
        finally:
            model.config._attn_implementation = attention


def _batch_for(model: torch.nn.Module, name: str, empty_completion: bool) -> dict[str, torch.Tensor]:
    return _ragged_batch(model, seed=sorted(PACKED_CONFIGS).index(name), empty_completion=empty_completion)


# ------------------------------------------------------------------------------------------
# luspo, vespo, the off-policy sequence mask and the top-entropy tokens against TRL's own loss
# ------------------------------------------------------------------------------------------


def _vllm_is_ratio(inputs: dict[str, torch.Tensor], mode: str, low: float | None, high: float | None) -> torch.Tensor:
    """TRL 1.16's vLLM importance-sampling ratio of a batch (_generate_and_score_completions, token modes):
    exp(old - sampling) on the counted tokens, 1 elsewhere, truncated or masked to [low, high]."""
    mask = inputs["completion_mask"] * inputs["tool_mask"]
    ratio = torch.exp(torch.nan_to_num((inputs["old_per_token_logps"] - inputs["sampling_per_token_logps"]) * mask))
    if mode == "token_truncate":
        return torch.clamp(ratio, min=low, max=high)
    low, high = -float("inf") if low is None else low, float("inf") if high is None else high
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)


# name: (GRPOConfig, vLLM importance sampling (mode, low, high) or None, the batch's sampling log-probs
# present, the trainer attributes that turn the option under test off (its effect must show in TRL's loss)).
OPTION_CONFIGS = {
    "luspo-token": ({"loss_type": "luspo", "epsilon_high": 0.28, "beta": 0.04, "entropy_coef": 0.01}, None,
                    False, {}),
    "luspo-sequence-vllm-is": ({"loss_type": "luspo", "importance_sampling_level": "sequence", "delta": 1.5},
                               ("token_truncate", None, 1.5), True, {}),
    "vespo": ({"loss_type": "vespo", "beta": 0.04, "vespo_k_pos": 1.5, "vespo_lambda_neg": 2.5}, None, False, {}),
    # TRL warns (VESPO's weight is sequence-level anyway); the bias-corrected KL then uses the sequence ratio
    "vespo-sequence-kl": ({"loss_type": "vespo", "importance_sampling_level": "sequence", "beta": 0.04}, None, False,
                          {}),
    "vespo-token_truncate": ({"loss_type": "vespo", "entropy_coef": 0.01}, ("token_truncate", None, 1.5), True, {}),
    "vespo-token_mask": ({"loss_type": "vespo", "beta": 0.04}, ("token_mask", 0.6, 1.6), True, {}),
    "off-policy-mask-sampling": ({"loss_type": "grpo", "off_policy_mask_threshold": 0.15, "beta": 0.04}, None, True,
                                 {"off_policy_mask_threshold": None}),
    "off-policy-mask-old": ({"loss_type": "dapo", "off_policy_mask_threshold": 0.15}, None, False,
                            {"off_policy_mask_threshold": None}),
    "top-entropy": ({"loss_type": "dapo", "top_entropy_quantile": 0.3, "entropy_coef": 0.05, "beta": 0.04}, None,
                    False, {"top_entropy_quantile": 1.0}),
}
# Packed (patch(padding_free=True)): vespo with truncated importance ratios, the off-policy mask on the
# sampler's log-probs and the top-entropy tokens with an entropy bonus, all at once.
PACKED_OPTION_CONFIG = ({"loss_type": "vespo", "off_policy_mask_threshold": 0.15, "top_entropy_quantile": 0.3,
                         "entropy_coef": 0.05, "beta": 0.04}, ("token_truncate", None, 1.5), True,
                        {"off_policy_mask_threshold": None, "top_entropy_quantile": 1.0})


def _options_trainer_and_batch(config: dict, vllm_is: tuple | None, sampling: bool, tiny_model: str, tmp_path: Path):
    """A trainer with config, and _ragged_batch's batch (row 1 moved further off policy) with the
    sampler's log-probs (sampling): rows 1 and 3 have A < 0, row 1 off policy from the old log-probs
    (mean old - logp ~ 0.4), row 3 from the sampler's (~ 0.9), a NaN sampling log-prob in a counted
    token and in the padding; and, with vllm_is (mode, low, high), TRL's importance ratios of them."""
    args = trl.GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                          max_completion_length=7, report_to=[], use_cpu=True, bf16=False, **config)
    trainer = trl.GRPOTrainer(model=tiny_model, reward_funcs=_reward, args=args,
                              train_dataset=datasets.Dataset.from_dict({"prompt": ["1+1="] * 4}),
                              processing_class=_tokenizer())
    trainer.current_gradient_accumulation_steps = 2
    model = trainer.model.train()
    inputs = _ragged_batch(model, seed=3, empty_completion=False)
    del inputs["importance_sampling_ratio"]
    g = torch.Generator().manual_seed(7)
    old = inputs["old_per_token_logps"] = inputs["old_per_token_logps"] + torch.tensor([0.0, 0.4, 0.0, 0.0])[:, None]
    if sampling:
        sampler = old + 0.3 * torch.randn(old.shape, generator=g) + torch.tensor([0.0, -0.3, 0.0, 0.6])[:, None]
        sampler[0, 1] = sampler[2, 5] = float("nan")  # a counted token vLLM could not score, and padding
        inputs["sampling_per_token_logps"] = sampler
    trainer.use_vllm = vllm_is is not None
    if vllm_is is not None:
        mode, low, high = vllm_is
        trainer.vllm_importance_sampling_correction = True
        trainer.vllm_importance_sampling_mode = mode
        args.vllm_importance_sampling_clip_min, args.vllm_importance_sampling_clip_max = low, high
        inputs["importance_sampling_ratio"] = _vllm_is_ratio(inputs, mode, low, high)
    return trainer, model, inputs


def _assert_options_bind(name: str, trainer: object, model: torch.nn.Module, inputs: dict, off: dict) -> None:
    """The batch exercises what the configuration tests: clipping, ratios truncated or masked, the
    off-policy mask dropping some but not all negative-advantage sequences; and TRL's loss with each
    option under test turned off differs."""
    mask = inputs["completion_mask"] * inputs["tool_mask"]
    if "importance_sampling_ratio" in inputs:
        ratio = inputs["importance_sampling_ratio"][mask.bool()]
        masked = trainer.vllm_importance_sampling_mode == "token_mask"
        bound = 0.0 if masked else trainer.args.vllm_importance_sampling_clip_max
        assert (ratio == bound).any() and (ratio != bound).any(), "the sampler's ratios should be cut, some of them"
    if trainer.off_policy_mask_threshold is not None:
        with torch.no_grad():
            ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
            attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
            logps, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, attention, ids.size(1) - 5)
        sampler = inputs.get("sampling_per_token_logps", inputs["old_per_token_logps"])
        keep = trl.GRPOTrainer.get_off_policy_mask(inputs["advantages"][:, None], logps, sampler, mask,
                                                    trainer.off_policy_mask_threshold)[:, 0]
        negative = inputs["advantages"] < 0
        assert 0 < int((keep[negative] == 0).sum()) < int(negative.sum()), (name, keep)
    def trl_loss() -> float:
        with torch.no_grad():
            return trl.GRPOTrainer._compute_loss(trainer, model, inputs).item()

    on = trl_loss() if off else 0.0
    for key, value in off.items():
        saved = getattr(trainer, key)
        setattr(trainer, key, value)
        try:
            without = trl_loss()
        finally:
            setattr(trainer, key, saved)
        assert abs(on - without) > 1e-4 * max(1.0, abs(on)), f"{name}: {key} should change TRL's loss"
    trainer._metrics["train"].clear()


def _assert_equal_to_trl(trainer: object, model: torch.nn.Module, inputs: dict, path: str, padding_free: bool,
                         want: tuple) -> None:
    want_loss, want_grads, want_metrics = want
    rlops_trl.patch(trainer, path=path, padding_free=padding_free)
    got, got_grads, got_metrics = _loss_grads_metrics(trainer, model, inputs, trainer._compute_loss)
    assert_values_close(got, want_loss, 1e-5 * max(1.0, want_loss.abs().item()), f"{path} loss")
    _assert_step_grads_close(got_grads, want_grads)
    assert got_metrics.keys() == want_metrics.keys()
    for key, values in want_metrics.items():
        assert got_metrics[key] == pytest.approx(values, rel=1e-5, abs=1e-6, nan_ok=True), (path, key)


@pytest.mark.parametrize("path", ["linear", "logits"])
@pytest.mark.parametrize("name", list(OPTION_CONFIGS))
def test_trl_options_equal_trl(name: str, path: str, tiny_model: str, tmp_path: Path) -> None:
    """TRL's luspo and vespo (with and without the sampler's importance ratios), the off-policy
    sequence mask (on the sampler's or the old log-probs) and the top-entropy tokens with an entropy
    bonus: loss, gradients and every metric TRL logs, on a ragged batch with a tool mask and old
    log-probs off policy."""
    config, vllm_is, sampling, off = OPTION_CONFIGS[name]
    trainer, model, inputs = _options_trainer_and_batch(config, vllm_is, sampling, tiny_model, tmp_path)
    _assert_options_bind(name, trainer, model, inputs, off)
    want = _loss_grads_metrics(trainer, model, inputs, lambda m, i: trl.GRPOTrainer._compute_loss(trainer, m, i))
    if trainer.loss_type == "luspo":
        clipped = want[2]["clip_ratio/low_mean"][0] + want[2]["clip_ratio/high_mean"][0]
        assert clipped > 0, "the clip bounds should bind in this batch"
    if trainer.loss_type == "vespo":
        assert "vespo/phi_seq_mean" in want[2]
    _assert_equal_to_trl(trainer, model, inputs, path, False, want)


@pytest.mark.parametrize("per_token_advantages", [False, True])
def test_trl_options_padding_free_equal_trl(per_token_advantages: bool, tiny_model: str, tmp_path: Path) -> None:
    """The packed batch, with TRL's advantages per sequence or (a subclass's) per token (B, C)."""
    config, vllm_is, sampling, off = PACKED_OPTION_CONFIG
    trainer, model, inputs = _options_trainer_and_batch(config, vllm_is, sampling, tiny_model, tmp_path)
    _assert_options_bind("packed", trainer, model, inputs, off)
    if per_token_advantages:  # the same signs (the same sequences masked), VESPO's weights then per token
        scale = torch.rand(inputs["completion_ids"].shape, generator=torch.Generator().manual_seed(5)) + 0.5
        inputs["advantages"] = inputs["advantages"][:, None] * scale
    want = _loss_grads_metrics(trainer, model, inputs, lambda m, i: trl.GRPOTrainer._compute_loss(trainer, m, i))
    for path in ("linear", "logits"):
        _assert_equal_to_trl(trainer, model, inputs, path, True, want)


def test_options_refused_by_setting(tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What depends on the run rather than the config: vespo with vLLM bounds that exclude 1, and the
    top-entropy quantile over several processes."""
    trainer, _, _ = _options_trainer_and_batch({"loss_type": "vespo"}, ("token_mask", 1.2, 3.0), True, tiny_model,
                                               tmp_path)
    with pytest.raises(ValueError, match="vllm_importance_sampling_clip_min/max excluding 1"):
        rlops_trl.patch(trainer)
    trainer, _, _ = _options_trainer_and_batch({"top_entropy_quantile": 0.5}, None, False, tiny_model, tmp_path)
    monkeypatch.setattr(trainer, "accelerator", type("Accelerator", (), {"num_processes": 2})())
    with pytest.raises(ValueError, match="top_entropy_quantile < 1 with several processes"):
        rlops_trl.patch(trainer)
