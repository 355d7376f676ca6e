"""The output-head protocol: how draw, act (and any head of a user's) plug into the composed model.

A head owns one or more *routes* (its `HeadConfig.routes`): a trigger token and the slot tokens that follow
it. Wherever a trigger appears in a sequence its slots follow — written by the processor in training data,
forced by the generation loop at inference — and the LLM's last hidden states at the trigger and its slots
are the head's input: `(occurrences, 1 + slots, llm_hidden)`. The head returns tensors only, per route:

* `loss(hidden, targets, route, context)` -> `{loss_name: scalar}` for the occurrences of one route in a
  training batch, where `targets` is what the processor collected for that trigger (one per occurrence,
  in reading order); routes reporting the same loss name add up;
* `decode(hidden, route, context)` -> `{name: tensor}` with a leading occurrence dimension, at inference.

`context` holds what else a head may read, per occurrence: `vision_features` (the frozen vision
encoder's patch features of the image the request is about, the last one before the trigger in its
row; zeros and `has_image` False where there is none) and, at inference, `images` (that image's pixels,
(occurrences, 3, H, W) in [0, 1]: what an editing route starts from). It is empty when no image was given.

A head that works with another one (the act head's `[GEN]` / `[EDIT]` use the draw head's generator)
finds it in `bind(heads)`, which the model calls with all its heads whenever one is added; it keeps a
plain reference, so the other head's weights stay in that head's state dict only.

Turning decoded tensors into user-facing parts (an image, boxes, a count) is `mmbridge.generation`'s job.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmbridge.config import MMBridgeConfig
from mmbridge.heads_config import HeadConfig

#: how many tokens before a route trigger its head may read as the request (the model's `head_context`)
REQUEST_WINDOW = 32

#: head kind -> module class; `register_head` adds one (the draw / act issues, tests' toy heads).
HEAD_MODULES: dict[str, type[OutputHead]] = {}


def register_head(cls: type[OutputHead]) -> type[OutputHead]:
    HEAD_MODULES[cls.kind] = cls
    return cls


class OutputHead(nn.Module):
    kind: str = ""

    def __init__(self, config: HeadConfig, model_config: MMBridgeConfig):
        super().__init__()
        self.config = config
        self.llm_hidden_size = model_config.text_config.hidden_size

    def loss(self, hidden: torch.Tensor, targets: Any, route: str, context: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def decode(self, hidden: torch.Tensor, route: str, context: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def bind(self, heads: dict[str, OutputHead]) -> None:
        """Called with every head of the model (this one included) after heads are built or added."""


def build_head(config: HeadConfig, model_config: MMBridgeConfig) -> OutputHead:
    if config.kind not in HEAD_MODULES:
        raise NotImplementedError(
            f"head {config.name!r}: no module is registered for kind {config.kind!r} "
            f"(registered: {sorted(HEAD_MODULES) or 'none'}); import the module that registers it first")
    return HEAD_MODULES[config.kind](config, model_config)


def slot_positions(input_ids: torch.Tensor, trigger_id: int, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, positions) of every trigger + its slots, in reading order: both (occurrences, 1 + num_slots).
    Occurrences whose slots run past the end of the sequence are left out (cut by truncation)."""
    rows, starts = (input_ids == trigger_id).nonzero(as_tuple=True)
    keep = starts + num_slots < input_ids.shape[1]
    rows, starts = rows[keep], starts[keep]
    offsets = torch.arange(num_slots + 1, device=input_ids.device)
    return rows[:, None].expand(-1, num_slots + 1), starts[:, None] + offsets
