"""An analytic estimate of the GPU memory of one RL step (GRPO or PPO), stage by stage.

`rlops profile --estimate` prints it for any model config without a GPU; `rlops profile`
prints it beside the measured peaks. Every term counts the tensors that rlops' trainers and
the Hugging Face Llama/Qwen2 code they run keep alive, for a batch of B sequences of
L = prompt + response tokens (N = B * L tokens, R = B * response tokens scored) in dtype of
b bytes; with the trainers' packing, N and R are the sums of the sequences' own lengths, and sdpa
attends through an (N, N) mask:

- weights: the policy, the frozen reference (when kl_coef > 0), and for PPO the critic and
  the reward model (each a copy of the decoder with a scalar head);
- gradients (one per trained weight) and AdamW's two moments, plus the one temporary of its
  multi-tensor update (sqrt of the second moment);
- activations kept for the backward, per token and layer: the RMSNorms' float32 input and
  normalised copy and output, q, k, v, the attention output (and its float32 log-sum-exp),
  the output projection's input, and the MLP's gate, SiLU, up and product:
  2 (4 + 2b) h + b (3 n_q d + 2 n_kv d) + 4 n_q + 4 b i bytes;
- the vocabulary-sized tensors of the loss, which is what rlops removes: eager PyTorch keeps
  the logits (R V b) and three more copies (log-softmax for the log-probs, log-softmax and
  its exponential for the entropy) and adds a gradient of the same size; rlops' fused loss
  keeps the logits and writes one gradient; the fused-linear loss keeps neither (a chunk
  of logits at a time, and a float32 weight gradient V h);
- generation's key-value cache, 2 layers B L n_kv d b, and one prefill chunk's work;
- sdpa's attention mask where a forward needs one (padding: B L^2; packing: N^2 bytes), and the
  additive copy in the dtype that each layer makes and keeps for its backward.

The estimate is checked against measured peaks (tests on CPU with small configs; on a GPU
with `rlops profile`), and aims at 15%.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .ops.chunking import default_chunk_rows

FP32 = 4


@dataclass(frozen=True)
class ModelDims:
    """The sizes of a Llama/Qwen2-style decoder that set its memory."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool

    @classmethod
    def from_config(cls, config: Any) -> ModelDims:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(layers=config.num_hidden_layers, hidden=config.hidden_size, intermediate=config.intermediate_size,
                   heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
                   vocab=config.vocab_size, tied=bool(getattr(config, "tie_word_embeddings", False)),
                   qkv_bias=bool(getattr(config, "attention_bias", False)) or config.model_type == "qwen2")

    @property
    def layer_params(self) -> int:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        attention = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if self.qkv_bias else 0)
        return attention + 3 * h * self.intermediate + 2 * h

    @property
    def params(self) -> int:
        """Exact parameter count of the causal LM."""
        head = 0 if self.tied else self.vocab * self.hidden
        return self.vocab * self.hidden + self.layers * self.layer_params + self.hidden + head

    @property
    def decoder_params(self) -> int:
        """Parameters of the decoder alone (a critic or reward model adds a head of hidden + 1)."""
        return self.params - (0 if self.tied else self.vocab * self.hidden)

    def activation_bytes(self, b: int) -> int:
        """Bytes kept for the backward per token and layer (see the module docstring)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return 2 * (FP32 + 2 * b) * self.hidden + b * (3 * q + 2 * kv) + FP32 * self.heads + 4 * b * self.intermediate


@dataclass(frozen=True)
class StepShape:
    """One step: algorithm, loss implementation, batch and lengths, dtype bytes, which models."""

    algo: str  # grpo | ppo
    loss_impl: str  # fused-linear | fused | eager
    batch: int
    prompt_len: int
    response_len: int
    dtype_bytes: int = 2
    reference: bool = True
    reward_model: bool = True  # PPO
    generation_chunk: int = 512
    temperature: float = 1.0
    gradient_checkpointing: bool = False
    device: str = "cuda"  # AdamW's update is multi-tensor on CUDA, one tensor at a time on CPU
    packing: bool = False  # the sequences in one row without padding (the trainers' packing)
    response_lens: tuple[int, ...] | None = None  # each sequence's response tokens; None: all response_len


# The stages of a trainer step, in the order a step runs them.
STAGES = ("generation", "reward", "old_logprobs", "reference_logprobs", "values", "advantages", "policy_forward",
          "loss", "backward", "critic", "optimizer")


@dataclass
class MemoryEstimate:
    """Named components (bytes) and the estimated peak of each stage of the step."""

    components: dict[str, int] = field(default_factory=dict)
    stages: dict[str, int] = field(default_factory=dict)

    @property
    def peak(self) -> int:
        return max(self.stages.values())


def estimate(dims: ModelDims, s: StepShape) -> MemoryEstimate:
    """The memory of one GRPO or PPO step of rlops' trainers (see the module docstring)."""
    b, h, i, v = s.dtype_bytes, dims.hidden, dims.intermediate, dims.vocab
    L = s.prompt_len + s.response_len
    lens = s.response_lens or (s.response_len,) * s.batch
    # Padded, every sequence takes L positions and T scored tokens; packed, its own prompt + response.
    n_pad, r_pad = s.batch * L, s.batch * s.response_len
    n, r = (sum(s.prompt_len + t for t in lens), sum(lens)) if s.packing else (n_pad, r_pad)
    # sdpa's boolean mask, which a forward needs once there is padding (or packing: (N, N)); each layer's sdpa
    # makes an additive copy in the dtype and keeps it for its backward.
    mask_pad = s.batch * L * L if min(lens) < s.response_len else 0
    mask = n * n if s.packing else mask_pad
    ppo = s.algo == "ppo"
    policy = dims.params * b
    value_model = (dims.decoder_params + h + 1) * b
    est = MemoryEstimate()
    c = est.components
    c["policy weights"] = policy
    c["reference weights"] = policy if s.reference else 0
    c["critic weights"] = value_model if ppo else 0
    c["reward model weights"] = value_model if ppo and s.reward_model else 0
    weights = sum(c.values())
    c["gradients"] = policy + (value_model if ppo else 0)
    c["optimizer states"] = 2 * c["gradients"]
    c["kv cache (generation)"] = 2 * dims.layers * s.batch * (L - 1) * dims.kv_heads * dims.head_dim * b
    # With gradient checkpointing each layer keeps its input only, and the backward recomputes one layer
    # at a time (its activations, and the transient gradients of its MLP).
    per_layer = h * b if s.gradient_checkpointing else dims.activation_bytes(b)
    c["activations"] = n * (dims.layers * per_layer + (FP32 + 2 * b) * h)
    recompute = n * (dims.activation_bytes(b) + 2 * i * b + FP32 * h) if s.gradient_checkpointing else 0
    c["attention masks"] = mask + (1 if s.gradient_checkpointing else dims.layers) * mask * b
    c["logits"] = 0 if s.loss_impl == "fused-linear" else r * v * b

    # A no-gradient forward over tokens at its widest moment (the MLP: gate after SiLU, up, product;
    # the residual stream and the norm's output), and generation's prefill of one chunk against the cache.
    def no_grad_forward(tokens: int) -> int:
        return tokens * ((3 * i + 2 * h) * b + FP32 * h)

    chunk_tokens = s.batch * min(s.generation_chunk, L - 1)
    est.stages["generation"] = weights + c["kv cache (generation)"] * (dims.layers + 1) // dims.layers + \
        no_grad_forward(chunk_tokens) + s.batch * v * (b + FP32)

    # The head of a no-gradient log-prob pass: what each implementation makes from the last hidden states.
    chunk_rows = default_chunk_rows(r, h, v, b, False)
    if s.loss_impl == "fused-linear":
        logprob_head = chunk_rows * v * b
    elif s.loss_impl == "fused":
        logprob_head = r * v * b
    else:  # the logits, divided by the temperature (a copy), then one row's log-softmax at a time (packed: one row)
        logprob_head = r * v * b + r * v * b + (r if s.packing else s.response_len) * v * b
    # Without gradients each layer's copy of the mask is freed after its attention: the boolean mask stays.
    logprob_pass = weights + mask + max(no_grad_forward(n), n * h * b + logprob_head)
    if ppo:  # PPO's several updates per batch are clipped against the old log-probs
        est.stages["old_logprobs"] = logprob_pass
    if s.reference:
        est.stages["reference_logprobs"] = logprob_pass
    if ppo:
        # The reward model scores the padded rollout; GAE runs on the padded (B, T) layout.
        est.stages["reward"] = weights + mask_pad + no_grad_forward(n_pad) if s.reward_model else weights
        est.stages["values"] = weights + mask + no_grad_forward(n)
        est.stages["advantages"] = weights + 8 * r_pad * FP32  # rewards, values, advantages, returns: (B, T) floats

    forward = weights + c["activations"] + c["attention masks"] + c["logits"]
    # A checkpointed forward runs each layer without keeping its work: one layer's worth at a time.
    est.stages["policy_forward"] = weights + c["activations"] + c["attention masks"] + max(
        c["logits"], no_grad_forward(n) if s.gradient_checkpointing else 0)
    copies = 3 + (0 if s.temperature == 1.0 else 1)
    loss_buffers = {
        # grad of hidden, float32 grad of the weight, one chunk of logits
        "fused-linear": r * h * b + v * h * FP32 + chunk_rows * v * b,
        "fused": 10 * r * FP32,
        "eager": copies * r * v * b,
    }[s.loss_impl]
    est.stages["loss"] = forward + loss_buffers
    # The backward's start holds what the loss kept and the head's gradients. fused-linear: its gradients,
    # the float32 weight gradient cast. fused: the logits (its backward reads them) and their gradient.
    # eager: its three copies but not the logits (log-softmax keeps its output, not its input), and its
    # gradients replace the copies as it goes.
    backward_head = {
        "fused-linear": loss_buffers - chunk_rows * v * b + v * h * b,
        "fused": loss_buffers + r * v * b + v * h * b,
        "eager": loss_buffers - r * v * b + v * h * b,
    }[s.loss_impl]
    est.stages["backward"] = forward + backward_head
    if recompute:  # after the head's backward, the layers: the logits are gone, the head's gradient stays
        est.stages["backward"] = max(est.stages["backward"], forward - c["logits"] + v * h * b + recompute)
    if ppo:
        critic_activations = n * dims.layers * per_layer + c["attention masks"] + recompute
        # The critic's gradients but its embedding's, which arrives when the activations are gone.
        est.stages["critic"] = weights + policy + critic_activations + value_model - v * h * b
    # AdamW's first step: the gradients, the two moments it creates, and the temporaries of its update:
    # sqrt(second moment) of every tensor at once on CUDA (multi-tensor), of one tensor at a time on CPU
    # (about two copies of the largest, the embedding). PPO steps the policy (its gradients then freed),
    # then the critic.
    critic = value_model if ppo else 0

    def temporaries(weights_bytes: int) -> int:
        return weights_bytes if s.device == "cuda" else 2 * v * h * b

    est.stages["optimizer"] = weights + max(3 * policy + critic + temporaries(policy),
                                            2 * policy + 3 * critic + (temporaries(critic) if ppo else 0))
    est.stages = {k: est.stages[k] for k in STAGES if k in est.stages}
    return est


__all__ = ["STAGES", "MemoryEstimate", "ModelDims", "StepShape", "estimate"]
