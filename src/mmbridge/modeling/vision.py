"""The frozen vision encoder: any HF image model that returns a sequence of patch features."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModel, PreTrainedModel

from mmbridge.config import MMBridgeConfig


class VisionEncoder(nn.Module):
    """Wraps an HF vision model (ViT, CLIP/SigLIP vision, BLIP-2 vision) and picks the feature layer.

    BLIP-2 feeds the Q-Former the encoder's `last_hidden_state`; LLaVA-style setups prefer a
    penultimate layer. `config.vision_feature_layer` chooses, `config.drop_cls_token` strips CLS.
    """

    def __init__(self, config: MMBridgeConfig, model: PreTrainedModel | None = None):
        super().__init__()
        self.model = model if model is not None else AutoModel.from_config(config.vision_config)
        self.feature_layer = config.vision_feature_layer
        self.drop_cls_token = config.drop_cls_token

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(num_images, 3, H, W) -> (num_images, num_tokens, hidden)."""
        dtype = next(self.model.parameters()).dtype
        outputs = self.model(
            pixel_values=pixel_values.to(dtype),
            output_hidden_states=self.feature_layer is not None,
            return_dict=True,
        )
        if self.feature_layer is None:
            features = outputs.last_hidden_state
        else:
            features = outputs.hidden_states[self.feature_layer]
        return features[:, 1:] if self.drop_cls_token else features
