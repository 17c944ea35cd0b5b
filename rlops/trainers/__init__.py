"""Thin trainers on Hugging Face causal LMs, built on rlops' fused ops: SFT, a reward model,
GRPO and PPO, and the R1-style pipeline on a built-in arithmetic task (`rlops train ...`).

Each trainer takes a model, a tokenizer, its data and a config dataclass, and runs in one
process or under torchrun (DDP, or FSDP2 with fsdp=True) unchanged.
"""

from .base import TrainConfig
from .grpo import GRPOConfig, GRPOTrainer
from .ppo import PPOConfig, PPOTrainer
from .r1_toy import R1ToyConfig
from .reward import RewardConfig, RewardTrainer
from .rollout import Rollout, Task, evaluate, sample
from .sft import SFTConfig, SFTTrainer
from .value_head import ValueModel

__all__ = [
    "GRPOConfig",
    "GRPOTrainer",
    "PPOConfig",
    "PPOTrainer",
    "R1ToyConfig",
    "RewardConfig",
    "RewardTrainer",
    "Rollout",
    "SFTConfig",
    "SFTTrainer",
    "Task",
    "TrainConfig",
    "ValueModel",
    "evaluate",
    "sample",
]
