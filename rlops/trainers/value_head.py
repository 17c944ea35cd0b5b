"""A scalar head on a causal LM's decoder: the PPO critic (a value per token) and the reward
model (the value at a sequence's last token)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor, nn

from .rollout import position_ids


class ValueModel(nn.Module):
    """decoder (a Hugging Face base model, e.g. LlamaModel) + Linear(hidden, 1)."""

    def __init__(self, decoder: nn.Module) -> None:
        super().__init__()
        self.decoder = decoder
        self.config = decoder.config
        weight = next(decoder.parameters())
        self.head = nn.Linear(decoder.config.hidden_size, 1, dtype=weight.dtype, device=weight.device)
        # Small but not zero: a zero head would give the decoder no gradient until the head moves.
        nn.init.normal_(self.head.weight, std=1 / (decoder.config.hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_causal_lm(cls, model: nn.Module) -> ValueModel:
        """A value model on a copy of model's decoder (the critic or reward model starts from the policy)."""
        return cls(copy.deepcopy(model.get_decoder()))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None, positions: Tensor | None = None) -> Tensor:
        """(B, L) float32 values, one per position (the value of the prefix ending there). Packed
        (rlops.trainers.packed): attention_mask None and positions (1, N) restarting at 0 per sequence."""
        if positions is None:
            positions = position_ids(attention_mask)
        out = self.decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False)
        # A new tensor, not a view of the head's output: FSDP2 warns of a sharded module's outputs that
        # are views (an in-place op on one would skip its backward hook). B x L floats, no new values.
        return self.head(out.last_hidden_state).squeeze(-1).to(torch.float32, copy=True)

    def score(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B,) the value at each row's last attended token: the reward model's score."""
        values = self(input_ids, attention_mask)
        return values.gather(1, self.last_positions(attention_mask)[:, None]).squeeze(1)

    @staticmethod
    def last_positions(attention_mask: Tensor) -> Tensor:
        """(B,) index of each row's last attended token (0 for a row with none)."""
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        return torch.where(attention_mask.bool(), positions, -1).amax(-1).clamp(min=0)

    def save_pretrained(self, directory: str | Path, state_dict: dict[str, Tensor] | None = None) -> None:
        """The decoder's config and the weights (state_dict: these instead of the module's own, as
        transformers' save_pretrained takes them; a model sharded by FSDP gives its gathered ones)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(directory)
        torch.save(self.state_dict() if state_dict is None else state_dict, directory / "value_model.pt")

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> ValueModel:
        from transformers import AutoConfig, AutoModel

        directory = Path(directory)
        if not (directory / "value_model.pt").is_file():
            raise FileNotFoundError(f"{directory} holds no value model (value_model.pt); train one with "
                                    "`rlops train reward`")
        model = cls(AutoModel.from_config(AutoConfig.from_pretrained(directory)))
        model.load_state_dict(torch.load(directory / "value_model.pt", map_location="cpu", weights_only=True))
        return model.to(device)
