"""What `rlops train <kind> --help` says of each config field's option: one line, with its unit
where it has one; fields with a fixed set of values take them from the code that checks them,
so that the help and the checks cannot disagree."""

from __future__ import annotations

from .options import BACKENDS, LOSS_AGGS
from .trainers.base import LOSS_IMPLS
from .trainers.ppo import KL_MODES

CHOICES: dict[str, tuple[str, ...]] = {
    "loss_impl": LOSS_IMPLS,
    "backend": BACKENDS,
    "loss_agg": LOSS_AGGS,
    "kl_mode": KL_MODES,
}

METAVARS = {"out_dir": "DIR", "device": "DEVICE"}

HELP: dict[str, str] = {
    # every trainer
    "out_dir": "directory for metrics.jsonl, metrics.png, checkpoint/ and model/; a run there is resumed",
    "steps": "optimizer steps to train for",
    "lr": "AdamW learning rate",
    "weight_decay": "AdamW weight decay",
    "max_grad_norm": "largest gradient norm; larger ones are scaled down to it",
    "seed": "seed of every random generator, in [0, 2**32); the same seed repeats a run bitwise",
    "device": "cpu, cuda or cuda:N (default: CUDA when present, else the CPU)",
    "save_every": "steps between checkpoints (and one after the last step)",
    "resume": "continue from OUT/checkpoint when it exists",
    "progress": "progress bars on the terminal (never in redirected output)",
    "eval_every": "steps between held-out evaluations, and one after the last step (0: only then)",
    "max_new_tokens": "longest sampled response, in tokens",
    # sft and reward
    "batch_size": "examples (sft) or preference pairs (reward) per step and process",
    # grpo and ppo
    "prompts_per_step": "prompts sampled per step and process",
    "temperature": "sampling temperature, also the one the losses score the samples at",
    "epochs": "optimisation passes over each step's samples",
    "minibatches": "optimizer steps per pass over the samples",
    "clip_low": "lower clip range of the importance ratio: 1 - clip_low",
    "clip_high": "upper clip range of the importance ratio: 1 + clip_high (0.28: DAPO's clip-higher)",
    "kl_coef": "weight of the KL to the frozen reference model (0: no reference model)",
    "entropy_coef": "weight of the entropy bonus (subtracted from the loss)",
    "loss_impl": "fused-linear: rlops.linear_policy_loss on hidden states; fused: rlops.policy_loss on logits; "
                 "eager: the same loss in eager PyTorch",
    "backend": "backend of the fused ops: auto (Triton on CUDA, PyTorch on CPU), triton, cuda or torch",
    "gradient_checkpointing": "recompute each decoder layer in the backward instead of keeping its activations",
    "packing": "pack each minibatch's sequences into one row without padding (position ids restart at 0 per "
               "sequence); the same step as padded, fewer tokens; needs sdpa, eager, flex or flash attention",
    # grpo
    "group_size": "samples per prompt; advantages are relative to the group",
    "loss_agg": "how token losses are aggregated (SPEC.md): token-mean (DAPO), seq-mean-token-mean (GRPO), ...",
    "scale_by_std": "divide advantages by the group's standard deviation (--no-scale-by-std: Dr. GRPO)",
    # ppo
    "critic_lr": "AdamW learning rate of the critic",
    "value_clip": "the critic's new values stay within this of the old ones in the value loss",
    "gamma": "discount of GAE, in [0, 1]",
    "lam": "lambda of GAE, in [0, 1]",
    "kl_mode": "reward: -kl_coef * k1 in the token rewards; loss: kl_coef * k3 in the loss",
    "whiten_advantages": "whiten the advantages over the batch",
    # r1-toy
    "demos": "cold-start demonstrations",
    "heldout": "held-out problems for evaluation",
    "hidden_size": "hidden size of the fresh Llama-style model",
    "layers": "decoder layers of the fresh model",
    "sft_steps": "steps of the cold-start SFT",
    "grpo_steps": "steps of GRPO",
    "grpo_lr": "AdamW learning rate of GRPO",
    "rs_prompts": "training prompts sampled for rejection sampling",
    "rs_samples": "samples per prompt in rejection sampling; the correct ones are kept",
    "rs_steps": "steps of SFT on the rejection samples",
    "rs_lr": "AdamW learning rate of the SFT on rejection samples",
}
