"""What `MMBridgeModel.forward` returns (tensors only; turning them into answers is generation's job)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput


@dataclass
class MMBridgeOutput(ModelOutput):
    """`loss` is the plain sum of `losses`, the named parts (LAVIS' convention): `lm` over answer
    tokens, `itc` / `itm` / `itg` for BLIP-2 stage 1, and each head's own. A trainer weights the parts
    itself (`StageConfig.losses`). `head_outputs[trigger]` holds, per head route found in the batch, the
    LLM's last hidden states at each occurrence's trigger and slots (`hidden_states`: (occurrences,
    1 + slots, hidden)) and where they are (`rows`, `positions` of the trigger)."""

    loss: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] | None = None
    logits: torch.Tensor | None = None
    past_key_values: object | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    head_outputs: dict[str, dict[str, torch.Tensor]] | None = None  # route trigger -> tensors
