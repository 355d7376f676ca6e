"""A DETR-style box and mask decoder conditioned on the super-link queries' hidden states.

Object queries (learned) cross-attend to a memory made of the frozen ViT's patch features and the
request's super-link states (the "category text" of an open-vocabulary detector: what to find comes
from the user's words, not a class list). Each query predicts a box (cx, cy, w, h in [0, 1]), one
logit "is this what was asked for", and a mask as the dot product of its embedding with per-patch
embeddings (upsampled). The transformer is torch's; no maintained library ships this conditioning.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LinkConditionedDecoder(nn.Module):
    def __init__(self, llm_hidden_size: int, vision_hidden_size: int, hidden_size: int, num_layers: int,
                 num_heads: int, num_queries: int, mask_size: int | None):
        super().__init__()
        self.link_proj = nn.Linear(llm_hidden_size, hidden_size)
        self.vision_proj = nn.Linear(vision_hidden_size, hidden_size)
        self.queries = nn.Parameter(torch.randn(1, num_queries, hidden_size) * 0.02)
        layer = nn.TransformerDecoderLayer(hidden_size, num_heads, 4 * hidden_size, dropout=0.0, batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, num_layers)
        self.box_head = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, 4))
        self.score_head = nn.Linear(hidden_size, 1)
        if mask_size is not None:  # None: no mask branch (the pose decoder)
            self.mask_embed = nn.Linear(hidden_size, hidden_size)
            self.pixel_embed = nn.Linear(vision_hidden_size, hidden_size)
        self.mask_size = mask_size

    def forward(self, link_hidden: torch.Tensor, vision_features: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """(n, 1 + slots, llm_hidden), (n, tokens, vision_hidden) or None -> per query: `boxes` (n, q, 4)
        cx cy w h, `logits` (n, q), `masks` (n, q, mask_size, mask_size) logits (None without an image or
        a mask branch), and `hidden` (n, q, hidden_size): each query's state, for task heads on top."""
        link = self.link_proj(link_hidden.to(self.link_proj.weight.dtype))
        patches = _patch_grid(vision_features)
        memory = link if patches is None else torch.cat([self.vision_proj(patches), link], dim=1)
        queries = self.queries.expand(link.shape[0], -1, -1) + link.mean(dim=1, keepdim=True)
        hidden = self.decoder(queries, memory)
        out = {"boxes": self.box_head(hidden).sigmoid(), "logits": self.score_head(hidden).squeeze(-1),
               "masks": None, "hidden": hidden}
        if patches is not None and self.mask_size is not None:
            side = int(math.isqrt(patches.shape[1]))
            pixels = self.pixel_embed(patches)  # (n, side*side, d)
            masks = torch.einsum("nqd,npd->nqp", self.mask_embed(hidden), pixels).view(*hidden.shape[:2], side, side)
            out["masks"] = F.interpolate(masks, size=(self.mask_size, self.mask_size), mode="bilinear",
                                         align_corners=False)
        return out


def _patch_grid(vision_features: torch.Tensor | None) -> torch.Tensor | None:
    """The square grid of patch tokens (a leading CLS token, as ViT / CLIP have, is dropped)."""
    if vision_features is None:
        return None
    tokens = vision_features.shape[1]
    if math.isqrt(tokens) ** 2 == tokens:
        return vision_features
    if math.isqrt(tokens - 1) ** 2 == tokens - 1:
        return vision_features[:, 1:]
    raise ValueError(f"the act decoder needs a square grid of patch features, got {tokens} tokens")
