"""The fused-linear policy loss against `policy_loss` on materialised logits in float64, and against Liger.

Every loss option of test_policy_loss runs here too, on hidden states and an lm_head instead
of logits; the Triton kernels run in the interpreter on a CPU-only machine.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, FP32_TOL, assert_grad_close, assert_values_close, float32_tol
from test_policy_loss import CASES

import rlops
from rlops import baselines, reference

B, T, H, V = 4, 6, 16, 300
HALF = (torch.bfloat16,)


def _batch(dtype: torch.dtype = torch.float32, seed: int = 0, masked_row: bool = True,
           with_bias: bool = True) -> dict[str, torch.Tensor | None]:
    """Hidden states, an lm_head and a reference model's, with old and reference log-probs
    around the true ones so that ratios straddle the clip range."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.6
    bias = torch.randn(V, generator=g) if with_bias else None
    tokens = torch.randint(0, V, (B, T), generator=g)
    logits = hidden.double() @ weight.double().T + (0 if bias is None else bias.double())
    logp = reference.token_logprobs(logits, tokens)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[0] = True
    if masked_row:
        mask[2] = False
    batch = {
        "hidden": hidden.to(dtype), "weight": weight.to(dtype), "bias": None if bias is None else bias.to(dtype),
        "tokens": tokens, "advantages": torch.randn(B, T, generator=g), "mask": mask,
        "old_logprobs": (logp + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)).float(),
        "ref_logprobs": (logp + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)).float(),
        "ref_hidden": (hidden + 0.3 * torch.randn(B, T, H, generator=g)).to(dtype),
        "ref_weight": (weight + 0.1 * torch.randn(V, H, generator=g)).to(dtype),
        "is_weights": torch.rand(B, T, generator=g) * 1.5 + 0.25,
        "rollout_logprobs": (logp + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)).float(),
    }
    return {k: None if v is None else v.to(DEVICE) for k, v in batch.items()}


def _kwargs(batch: dict, entries: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The case's tensors; "ref_logits" means the reference model's hidden states and head."""
    kwargs = {"mask": batch["mask"]}
    for entry in entries:
        name, _, form = entry.partition(":")
        if name == "ref_logits":
            kwargs["ref_hidden"], kwargs["ref_weight"] = batch["ref_hidden"], batch["ref_weight"]
            continue
        x = batch[name]
        kwargs[name] = x[:, :1] if form == "row" else x[:, 0] if form == "flat" else x
    return kwargs


def _run_linear(batch, entries, options, backend="triton", chunk_size=None, grad_scale=0.7):
    kwargs = _kwargs(batch, entries)
    advantages = kwargs.pop("advantages", batch["advantages"])
    leaves = [batch[k].detach().clone().requires_grad_(True) for k in ("hidden", "weight", "bias")
              if batch[k] is not None]
    out = rlops.linear_policy_loss(leaves[0], leaves[1], batch["tokens"], advantages,
                                   bias=leaves[2] if len(leaves) > 2 else None, chunk_size=chunk_size,
                                   backend=backend, **kwargs, **options)
    (out.loss * grad_scale).backward()
    return out, [x.grad for x in leaves]


def _run_materialised(fn: Callable, batch, entries, options, cast=None, grad_scale=0.7):
    """fn(logits, tokens, advantages, ...) on hidden @ weight.T + bias, in `cast` (float64) or the batch dtype."""
    kwargs = _kwargs(batch, entries)
    advantages = kwargs.pop("advantages", batch["advantages"])
    if cast is not None:
        kwargs = {k: v.to(cast) if v.is_floating_point() else v for k, v in kwargs.items()}
        advantages = advantages.to(cast)
    leaves = [(batch[k] if cast is None else batch[k].to(cast)).detach().clone().requires_grad_(True)
              for k in ("hidden", "weight", "bias") if batch[k] is not None]
    logits = F.linear(leaves[0], leaves[1], leaves[2] if len(leaves) > 2 else None)
    ref_hidden, ref_weight = kwargs.pop("ref_hidden", None), kwargs.pop("ref_weight", None)
    if ref_hidden is not None:
        kwargs["ref_logits"] = F.linear(ref_hidden, ref_weight)
    out = fn(logits, batch["tokens"], advantages, **kwargs, **options)
    loss = out if isinstance(out, torch.Tensor) else out.loss
    (loss * grad_scale).backward()
    return out, [x.grad for x in leaves]


def _check(case: str, dtype: torch.dtype = torch.float32, backend: str = "triton", chunk_size: int | None = None,
           batch: dict | None = None) -> None:
    entries, options = CASES[case]
    batch = batch or _batch(dtype)
    out, grads = _run_linear(batch, entries, options, backend, chunk_size)
    ref, ref_grads = _run_materialised(reference.policy_loss, batch, entries, options, cast=torch.float64)
    mask = batch["mask"]
    for name in ("logprobs", "entropy", "kl", "ratio"):
        assert not getattr(out, name)[~mask].any()
    if dtype in HALF:
        # bf16 inputs give bf16 logits, as the model's own lm_head would: values must equal
        # policy_loss on those materialised logits; gradients, element by element, must be as
        # close to float64 as eager PyTorch's are (SPEC section 6).
        on_logits, _ = _run_materialised(rlops.policy_loss, batch, entries, {**options, "backend": backend})
        _, eager_grads = _run_materialised(baselines.eager_policy_loss, batch, entries, options)
        assert_values_close(out.loss, on_logits.loss, float32_tol(on_logits.logprobs), "loss")
        targets = {name: getattr(on_logits, name)[mask] for name in ("logprobs", "entropy", "kl", "ratio")}
    else:
        assert_values_close(out.loss, ref.loss, float32_tol(ref.per_token_loss), "loss")
        targets = {name: getattr(ref, name)[mask] for name in ("logprobs", "entropy", "kl", "ratio")}
        eager_grads = [None] * len(grads)
    for name, want in targets.items():
        assert_values_close(getattr(out, name)[mask], want, float32_tol(want), name)
    for what, got, want, yardstick in zip(("hidden", "weight", "bias"), grads, ref_grads, eager_grads, strict=False):
        assert got.dtype == dtype
        assert_grad_close(got, want, yardstick, f"grad of {what}")


@pytest.mark.parametrize("case", list(CASES))
def test_matches_policy_loss_on_logits(case: str) -> None:
    _check(case, chunk_size=5)  # 5 divides neither the 24 tokens nor the counted ones


@pytest.mark.parametrize("case", ["off-policy", "k3", "full-kl", "gspo-full-kl", "everything-k3", "everything-full"])
def test_bf16(case: str) -> None:
    _check(case, torch.bfloat16, chunk_size=7)


@pytest.mark.parametrize("chunk_size", [1, 4, None])
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", ["everything-k3", "everything-full", "gspo-with-kl-entropy-is"])
def test_backends_and_chunks(case: str, backend: str, chunk_size: int | None) -> None:
    _check(case, backend=backend, chunk_size=chunk_size)


@pytest.mark.parametrize("case", ["everything-k3", "gspo-full-kl"])
def test_torch_backend_bf16(case: str) -> None:
    # The reference projects in bf16 too, so it equals policy_loss on the bf16 logits.
    _check(case, torch.bfloat16, backend="torch", chunk_size=5)


def test_without_bias() -> None:
    _check("everything-full", batch=_batch(with_bias=False), chunk_size=3)


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_reference_head_with_bias(backend: str, ratio_level: str) -> None:
    batch = _batch()
    ref_bias = torch.randn(V, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    options = {"kl_coef": 0.2, "kl_estimator": "full", "old_logprobs": batch["old_logprobs"], "mask": batch["mask"],
               "ratio_level": ratio_level}
    leaves = [batch[k].detach().clone().requires_grad_(True) for k in ("hidden", "weight", "bias")]
    out = rlops.linear_policy_loss(*leaves[:2], batch["tokens"], batch["advantages"], bias=leaves[2],
                                   ref_hidden=batch["ref_hidden"], ref_weight=batch["ref_weight"], ref_bias=ref_bias,
                                   chunk_size=5, backend=backend, **options)
    out.loss.backward()
    leaves64 = [batch[k].double().requires_grad_(True) for k in ("hidden", "weight", "bias")]
    ref_logits = F.linear(batch["ref_hidden"].double(), batch["ref_weight"].double(), ref_bias.double())
    ref = reference.policy_loss(F.linear(*leaves64), batch["tokens"], batch["advantages"].double(),
                                ref_logits=ref_logits, **{k: v.double() if k == "old_logprobs" else v
                                                          for k, v in options.items()})
    ref.loss.backward()
    assert_values_close(out.loss, ref.loss, float32_tol(ref.per_token_loss), "loss")
    assert_values_close(out.kl[batch["mask"]], ref.kl[batch["mask"]], float32_tol(ref.kl), "kl")
    for a, b in zip(leaves, leaves64, strict=True):
        assert_grad_close(a.grad, b.grad)


def test_packed_rows_equal_one_sequence() -> None:
    batch = _batch()
    n = B * T
    flat = {k: rlops.linear_policy_loss(
        batch["hidden"].reshape(n, H), batch["weight"], batch["tokens"].reshape(n), batch["advantages"].reshape(n),
        bias=batch["bias"], mask=batch["mask"].reshape(n), old_logprobs=batch["old_logprobs"].reshape(n),
        loss_agg="token-mean", backend=k) for k in ("triton", "torch")}
    batched = rlops.linear_policy_loss(batch["hidden"], batch["weight"], batch["tokens"], batch["advantages"],
                                       bias=batch["bias"], mask=batch["mask"], old_logprobs=batch["old_logprobs"],
                                       loss_agg="token-mean", backend="triton")
    for out in flat.values():
        assert out.logprobs.shape == (n,)
        assert_values_close(out.loss, batched.loss, FP32_TOL, "loss")
        assert_values_close(out.logprobs, batched.logprobs.reshape(n), FP32_TOL, "logprobs")


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_masked_rows_are_never_projected(ratio_level: str, backend: str) -> None:
    batch = _batch()
    entries, options = (("old_logprobs", "ref_logits"), {"kl_coef": 0.1, "kl_estimator": "full",
                                                         "ratio_level": ratio_level})
    clean, clean_grads = _run_linear(batch, entries, options, backend, 4)
    poisoned = dict(batch)
    poisoned["hidden"] = batch["hidden"].masked_fill(~batch["mask"][..., None], float("nan"))
    poisoned["ref_hidden"] = batch["ref_hidden"].masked_fill(~batch["mask"][..., None], float("nan"))
    out, grads = _run_linear(poisoned, entries, options, backend, 4)
    assert torch.equal(out.loss, clean.loss)
    for got, want in zip(grads, clean_grads, strict=True):
        assert torch.equal(got, want)
    assert not grads[0][~batch["mask"]].any()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_projection_never_exceeds_a_chunk(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    real = F.linear

    def spy(x, w, b=None):
        seen.append(x.shape[0])
        return real(x, w, b)

    monkeypatch.setattr(F, "linear", spy)
    batch = _batch()
    _run_linear(batch, ("old_logprobs",), {}, backend, chunk_size=3)
    assert seen and max(seen) <= 3


def test_token_stats_equal_materialised() -> None:
    batch = _batch()
    w = torch.randn(B, T, device=DEVICE)
    leaves = [batch[k].detach().clone().requires_grad_(True) for k in ("hidden", "weight", "bias")]
    logp, ent = rlops.linear_token_logprobs_and_entropy(leaves[0], leaves[1], batch["tokens"], bias=leaves[2],
                                                        temperature=0.8, chunk_size=5, backend="triton")
    ((logp * w).sum() + (ent * w.flip(0)).sum()).backward()
    leaves64 = [batch[k].double().requires_grad_(True) for k in ("hidden", "weight", "bias")]
    r_logp, r_ent = reference.token_logprobs_and_entropy(F.linear(*leaves64), batch["tokens"], 0.8)
    ((r_logp * w.double()).sum() + (r_ent * w.flip(0).double()).sum()).backward()
    assert_values_close(logp, r_logp)
    assert_values_close(ent, r_ent)
    for a, b in zip(leaves, leaves64, strict=True):
        assert_grad_close(a.grad, b.grad)


BAD = [
    ({"weight": lambda b: b["weight"][:, :-1]}, ValueError, r"weight must have shape \(V, H\)"),
    ({"weight": lambda b: b["weight"].double()}, TypeError, "must have one dtype"),
    ({"bias": lambda b: b["bias"][:-1]}, ValueError, "bias must have shape"),
    ({"bias": lambda b: b["bias"].double()}, TypeError, "must have one dtype"),
    ({"hidden": lambda b: b["hidden"][None]}, ValueError, r"hidden must have shape \(B, T, H\) or \(N, H\)"),
    ({"tokens": lambda b: b["tokens"] + V}, ValueError, r"tokens must lie in \[0, V\)"),
    ({"ref_hidden": lambda b: b["ref_hidden"]}, ValueError, "needs both ref_hidden and ref_weight"),
    ({"ref_hidden": lambda b: b["ref_hidden"][:, :-1], "ref_weight": lambda b: b["ref_weight"]}, ValueError,
     "ref_hidden must have hidden's leading shape"),
    ({"ref_hidden": lambda b: b["ref_hidden"], "ref_weight": lambda b: b["ref_weight"][:-1]}, ValueError,
     "ref_weight must have the policy's vocabulary"),
    ({"chunk_size": lambda b: 0}, ValueError, "chunk_size must be None or an int >= 1"),
    ({"kl_coef": lambda b: 0.1, "kl_estimator": lambda b: "full"}, ValueError, "needs ref_hidden and ref_weight"),
    ({"clip_low": lambda b: -1.0}, ValueError, "clip_low must be >= 0"),
]


@pytest.mark.parametrize("changes, error, match", BAD)
def test_bad_input(changes: dict, error: type, match: str) -> None:
    batch = _batch()
    kwargs = {"hidden": batch["hidden"], "weight": batch["weight"], "tokens": batch["tokens"],
              "advantages": batch["advantages"], "bias": batch["bias"]}
    kwargs.update({k: make(batch) for k, make in changes.items()})
    with pytest.raises(error, match=match):
        rlops.linear_policy_loss(**kwargs)


# ------------------------------------------------------------------------------------------
# Hugging Face causal LMs
# ------------------------------------------------------------------------------------------


def _tiny_llama(tied: bool, with_bias: bool, seed: int = 0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    model = transformers.AutoModelForCausalLM.from_config(config).to(DEVICE)
    if with_bias:
        head = torch.nn.Linear(32, 97, bias=True, device=DEVICE)
        head.weight = model.lm_head.weight  # keeps the tie when there is one
        torch.nn.init.normal_(head.bias)
        model.lm_head = head
    return model


@pytest.mark.parametrize("tied, with_bias", [(True, False), (False, False), (False, True), (True, True)])
def test_hf_lm_head_inputs_reproduce_the_model(tied: bool, with_bias: bool) -> None:
    model = _tiny_llama(tied, with_bias)
    ids = torch.randint(0, 97, (3, 12), device=DEVICE)
    attention = torch.ones_like(ids)
    attention[1, :2] = 0  # left padding
    inputs = rlops.hf.lm_head_inputs(model, ids, attention, logits_to_keep=5)
    assert (inputs.weight is model.get_input_embeddings().weight) == tied
    assert (inputs.bias is None) != with_bias
    logits = model(input_ids=ids, attention_mask=attention).logits[:, -6:-1]
    torch.testing.assert_close(F.linear(inputs.hidden, inputs.weight, inputs.bias), logits, rtol=1e-5, atol=1e-5)
    everything = rlops.hf.lm_head_inputs(model, ids, attention)
    assert everything.hidden.shape == (3, 11, 32)


def test_hf_end_to_end_gradients_equal_the_logits_path() -> None:
    model = _tiny_llama(tied=True, with_bias=False)
    ids = torch.randint(0, 97, (4, 10), device=DEVICE)
    completion = ids[:, -6:]
    g = torch.Generator().manual_seed(1)
    advantages = torch.randn(4, generator=g).to(DEVICE)
    mask = (torch.rand(4, 6, generator=g) > 0.2).to(DEVICE)

    def grads(loss: torch.Tensor) -> list[torch.Tensor]:
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    inputs = rlops.hf.lm_head_inputs(model, ids, logits_to_keep=6)
    fused = rlops.linear_policy_loss(inputs.hidden, inputs.weight, completion, advantages, mask=mask,
                                     entropy_coef=0.01, loss_agg="seq-mean-token-mean", backend="triton")
    logits = model(input_ids=ids).logits[:, -7:-1]
    plain = rlops.policy_loss(logits, completion, advantages, mask=mask, entropy_coef=0.01,
                              loss_agg="seq-mean-token-mean", backend="triton")
    assert_values_close(fused.loss, plain.loss, FP32_TOL, "loss")
    for a, b in zip(grads(fused.loss), grads(plain.loss), strict=True):
        assert_grad_close(a, b)


def test_hf_refuses_heads_it_cannot_reproduce() -> None:
    model = _tiny_llama(tied=False, with_bias=False)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        rlops.hf.lm_head_inputs(model, torch.zeros(1, 4, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="logits_to_keep"):
        rlops.hf.lm_head_inputs(_tiny_llama(True, False), torch.zeros(1, 4, dtype=torch.long, device=DEVICE),
                                logits_to_keep=0)


# ------------------------------------------------------------------------------------------
# Parity with Liger's LigerFusedLinearGRPOLoss (plain PyTorch, chunked)
# ------------------------------------------------------------------------------------------

LIGER_TYPES = {
    # Liger loss_type: rlops options (Liger's grpo averages over every sequence, as TRL does,
    # so no sequence is fully masked here)
    "grpo": {"loss_agg": "seq-mean-token-mean"},
    "bnpo": {"loss_agg": "token-mean"},
    "dapo": {"loss_agg": "token-mean"},
    "dr_grpo": {"loss_agg": "seq-mean-token-sum-norm", "norm_len": 9},
}


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", list(LIGER_TYPES))
def test_equals_liger_fused_linear_grpo(loss_type: str, beta: float) -> None:
    chunked_loss = pytest.importorskip("liger_kernel.chunked_loss")
    batch = _batch(masked_row=False)
    liger = chunked_loss.LigerFusedLinearGRPOLoss(
        beta=beta, compiled=False, use_ref_model=beta > 0, chunk_size=2, epsilon_low=0.2, epsilon_high=0.28,
        loss_type=loss_type, max_completion_length=9, temperature=0.9)
    leaves = [batch[k].detach().clone().requires_grad_(True) for k in ("hidden", "weight", "bias")]
    theirs, _ = liger(leaves[0], leaves[1], batch["tokens"], batch["mask"].float(), batch["advantages"][:, 0],
                      bias=leaves[2], ref_per_token_logps=batch["ref_logprobs"] if beta else None,
                      old_per_token_logps=batch["old_logprobs"])
    theirs.backward()
    kl = {"kl_coef": beta, "kl_estimator": "k3", "ref_logprobs": batch["ref_logprobs"]} if beta else {}
    mine = [batch[k].detach().clone().requires_grad_(True) for k in ("hidden", "weight", "bias")]
    ours = rlops.linear_policy_loss(mine[0], mine[1], batch["tokens"], batch["advantages"][:, 0], bias=mine[2],
                                    mask=batch["mask"], old_logprobs=batch["old_logprobs"], clip_high=0.28,
                                    temperature=0.9, chunk_size=5, backend="triton", **kl, **LIGER_TYPES[loss_type])
    ours.loss.backward()
    assert_values_close(ours.loss, theirs.detach(), float32_tol(theirs.detach()), f"Liger {loss_type} loss")
    for a, b in zip(mine, leaves, strict=True):
        assert_grad_close(a.grad, b.grad)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_empty_batch_gives_zero_loss(backend: str, ratio_level: str) -> None:
    """B = 0 (an empty minibatch): loss 0 and empty or zero gradients on both backends, no reshape error."""
    hidden = torch.randn(0, 3, 8, device=DEVICE, requires_grad=True)
    weight = torch.randn(13, 8, device=DEVICE, requires_grad=True)
    tokens = torch.zeros(0, 3, dtype=torch.long, device=DEVICE)
    out = rlops.linear_policy_loss(hidden, weight, tokens, torch.randn(0, device=DEVICE), ratio_level=ratio_level,
                                   backend=backend)
    assert out.loss.item() == 0.0 and out.logprobs.shape == (0, 3)
    out.loss.backward()
    assert hidden.grad.shape == (0, 3, 8) and not weight.grad.any()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_padding_ids_only_where_masked(backend: str) -> None:
    """Masked tokens are never projected: any id may pad them; a counted -100 is refused."""
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(2, 4, 8, generator=g).to(DEVICE), torch.randn(13, 8, generator=g).to(DEVICE)
    tokens = torch.randint(0, 13, (2, 4), generator=g).to(DEVICE)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool, device=DEVICE)
    adv = torch.randn(2, 4, generator=g).to(DEVICE)
    clean = rlops.linear_policy_loss(hidden, weight, tokens, adv, mask=mask, backend=backend).loss
    padded = rlops.linear_policy_loss(hidden, weight, tokens.masked_fill(~mask, -100), adv, mask=mask,
                                      backend=backend).loss
    assert torch.equal(clean, padded)
    with pytest.raises(ValueError, match=r"tokens must lie in .* where the mask is 1"):
        rlops.linear_policy_loss(hidden, weight, tokens.masked_fill(mask, -100), adv, mask=mask, backend=backend)
