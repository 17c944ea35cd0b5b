"""Run by test_trainers.py under `torchrun --nproc-per-node 2`: a few steps of a trainer with DDP
(gloo, CPU); rank r writes its final parameters to OUT/params-<r>.pt."""

import sys
from pathlib import Path

import torch
from trainer_fixtures import SEVENS, sft_examples, small_model
from transformers import LlamaForCausalLM

from rlops.trainers import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer, arithmetic

kind, out = sys.argv[1], Path(sys.argv[2])
tokenizer = arithmetic.CharTokenizer()
model: LlamaForCausalLM = small_model(tokenizer)
if kind == "sft":
    trainer = SFTTrainer(model, tokenizer, sft_examples(), SFTConfig(out_dir=str(out / "run"), steps=2, batch_size=6,
                                                                    progress=False))
else:
    trainer = GRPOTrainer(model, tokenizer, SEVENS, list(range(50)), GRPOConfig(
        out_dir=str(out / "run"), steps=2, prompts_per_step=2, group_size=4, max_new_tokens=8, progress=False))
trainer.train()
torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out / f"params-{trainer.procs.rank}.pt")
