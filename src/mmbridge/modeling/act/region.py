"""Visual prompts (VisionLLM v2's region encoder): a region the user marks on an input image — a box,
a point, a scribble or a mask, all given to the model as a binary mask — becomes one embedding that
fills a `<region>` placeholder in the LLM's input ("What color is <region>?").

A small conv stem reads the image with the mask as a fourth channel; the feature map is pooled at
points sampled inside the region with `grid_sample` (so a thin scribble and a large box alike give a
fixed-size summary) and projected to the LLM's width. With `vision_hidden_size`, the frozen ViT's patch
features are pooled at the same points and added: they already name what is under each patch (colour,
shape, size), which a fresh conv stem must learn from scratch — a first full-size run answered region
questions from the stem alone at 64 %.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RegionEncoder(nn.Module):
    def __init__(self, llm_hidden_size: int, num_points: int = 16, channels: int = 64,
                 vision_hidden_size: int | None = None):
        super().__init__()
        if vision_hidden_size is not None:
            self.patch_project = nn.Sequential(nn.LayerNorm(vision_hidden_size),
                                               nn.Linear(vision_hidden_size, channels))
        self.stem = nn.Sequential(nn.Conv2d(4, channels // 2, 3, stride=2, padding=1), nn.GELU(),
                                  nn.Conv2d(channels // 2, channels, 3, stride=2, padding=1), nn.GELU(),
                                  nn.Conv2d(channels, channels, 3, padding=1))
        self.project = nn.Linear(channels, llm_hidden_size)
        self.num_points = num_points

    def forward(self, pixel_values: torch.Tensor, masks: torch.Tensor,
                patches: torch.Tensor | None = None) -> torch.Tensor:
        """(R, 3, H, W) images, (R, H, W) region masks in {0, 1}, and (with `vision_hidden_size`) each image's
        square grid of ViT patch features (R, side * side, vision_hidden) -> (R, llm_hidden)."""
        masks = masks.to(pixel_values.dtype)
        features = self.stem(torch.cat([pixel_values, masks[:, None]], dim=1))
        grid = sample_points(masks, self.num_points)[:, :, None]  # (R, P, 1, 2) in [-1, 1]
        pooled = F.grid_sample(features, grid, align_corners=False).squeeze(-1).mean(-1)  # (R, C)
        if hasattr(self, "patch_project"):
            if patches is None:
                raise ValueError("this region encoder reads the ViT's patch features: pass `patches`")
            side = int(patches.shape[1] ** 0.5)
            projected = self.patch_project(patches.to(pixel_values.dtype))  # (R, side * side, C)
            projected = projected.transpose(1, 2).reshape(len(masks), -1, side, side)
            # nearest: each point reads the patch it falls in, not a blend with the background next to it
            pooled = pooled + F.grid_sample(projected, grid, mode="nearest", align_corners=False).squeeze(-1).mean(-1)
        return self.project(pooled)


def sample_points(masks: torch.Tensor, num_points: int) -> torch.Tensor:
    """`num_points` (x, y) positions in grid_sample's [-1, 1] per mask, spread evenly over its pixels
    (deterministic, so an answer does not change from run to run); an empty mask gives the centre."""
    _, height, width = masks.shape
    out = []
    for mask in masks:
        ys, xs = mask.nonzero(as_tuple=True)
        if len(xs) == 0:
            ys, xs = torch.tensor([height // 2]), torch.tensor([width // 2])
        pick = torch.linspace(0, len(xs) - 1, num_points).round().long()
        x = (xs[pick].float() + 0.5) / width * 2 - 1
        y = (ys[pick].float() + 0.5) / height * 2 - 1
        out.append(torch.stack([x, y], dim=-1))
    return torch.stack(out).to(masks.device, masks.dtype)


class QueryRegionReader(nn.Module):
    """`ActConfig.region_from_queries`: a region's embedding is the soft-prompt token (the projected Q-Former
    query) that holds the marked object — the vector the LLM already reads when it answers about the image —
    through a linear map that starts as the identity. Needs a Q-Former with object heads (`QueryObjectHeads`:
    each query names one object and its box). Why: the LLM is frozen, and a fresh embedding in a space of its
    own is read badly however well it encodes the object (run e2: a conv region encoder's embedding named
    colour / shape / size at 96-100 % to a linear probe, the LLM answered 64 %); the query's token is read at
    88-95 % with a linear map alone and at 98-100 % with the LoRA (scripts/region_reading_probe.py --slot)."""

    def __init__(self, llm_hidden_size: int):
        super().__init__()
        self.read = nn.Linear(llm_hidden_size, llm_hidden_size)
        nn.init.eye_(self.read.weight)
        nn.init.zeros_(self.read.bias)

    def forward(self, soft_prompts: torch.Tensor, objects: dict[str, torch.Tensor],
                masks: torch.Tensor) -> torch.Tensor:
        """(R, queries, llm_hidden) soft prompts of each region's image, the Q-Former's object predictions
        for them (`QueryObjectHeads` output: "boxes" (R, queries, 4) as (cx, cy, w, h) in [0, 1], "objectness"
        (R, queries) logits) and (R, H, W) region masks -> `<region>` embeddings (R, llm_hidden)."""
        picked = query_under_region(objects["boxes"], objects["objectness"], masks)
        rows = torch.arange(len(masks), device=soft_prompts.device)
        return self.read(soft_prompts[rows, picked])


def query_under_region(boxes: torch.Tensor, objectness: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per region, the query whose object holds it: the largest share of the region's pixels inside the query's
    box, times its objectness; a slightly smaller box wins a tie (a point inside two boxes names the nearer,
    tighter object). Written by hand: a rule over predicted boxes, not a learned choice — the object heads were
    trained for exactly this (run b8: queries bound to objects 99.5 %). (R, Q, 4), (R, Q), (R, H, W) -> (R,)."""
    _, height, width = masks.shape
    ys = (torch.arange(height, device=masks.device, dtype=boxes.dtype) + 0.5) / height
    xs = (torch.arange(width, device=masks.device, dtype=boxes.dtype) + 0.5) / width
    cx, cy, w, h = boxes.unbind(-1)  # (R, Q)
    in_x = (xs[None, None] >= (cx - w / 2)[..., None]) & (xs[None, None] <= (cx + w / 2)[..., None])  # (R, Q, W)
    in_y = (ys[None, None] >= (cy - h / 2)[..., None]) & (ys[None, None] <= (cy + h / 2)[..., None])  # (R, Q, H)
    region = masks.to(boxes.dtype)
    inside = torch.einsum("rqh,rqw,rhw->rq", in_y.to(boxes.dtype), in_x.to(boxes.dtype), region)
    share = inside / region.sum((1, 2)).clamp(min=1)[:, None]
    return (share * objectness.sigmoid() - 1e-3 * w * h).argmax(-1)
