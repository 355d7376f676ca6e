"""The bridge into the LLM: a linear projection of Q-Former outputs to the LLM's embedding width.

MiniGPT-4 calls it `llama_proj`, BLIP-2 `language_projection`; both are one `nn.Linear`.
"""

from __future__ import annotations

from torch import nn

from mmbridge.config import MMBridgeConfig


def build_projection(config: MMBridgeConfig) -> nn.Linear:
    return nn.Linear(config.qformer_config.hidden_size, config.text_config.hidden_size, bias=config.projection_bias)
