"""The Q-Former: N learned queries that cross-attend to image features (BLIP-2)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import Blip2QFormerModel

from mmbridge.config import MMBridgeConfig


class QFormer(nn.Module):
    """transformers' `Blip2QFormerModel` plus its learned query tokens.

    The query tokens live here (not on the composed model) so that the whole Q-Former — queries
    included — is one component for freezing, saving and importing.
    """

    def __init__(self, config: MMBridgeConfig):
        super().__init__()
        qformer_config = config.qformer_config
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, qformer_config.hidden_size))
        self.model = Blip2QFormerModel(qformer_config)

    @property
    def hidden_size(self) -> int:
        return self.query_tokens.shape[-1]

    def forward(self, image_features: torch.Tensor, image_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(num_images, num_patches, vision_hidden) -> (num_images, num_queries, qformer_hidden)."""
        if image_attention_mask is None:
            image_attention_mask = torch.ones(image_features.shape[:-1], dtype=torch.long, device=image_features.device)
        queries = self.query_tokens.expand(image_features.shape[0], -1, -1)
        outputs = self.model(
            query_embeds=queries,
            encoder_hidden_states=image_features,
            encoder_attention_mask=image_attention_mask,
            return_dict=True,
        )
        return outputs.last_hidden_state
