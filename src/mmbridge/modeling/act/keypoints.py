"""The act head's `[POSE]` route: per-person keypoints from the super-link states and the ViT's patches.

The same link-conditioned DETR decoder as detection (its own weights, no mask branch) proposes people;
on each query's state a keypoint head regresses K (x, y) positions in [0, 1] of the image and K
visibility logits, next to the decoder's person score and box. Training matches queries to people by
OKS (COCO's object keypoint similarity, with COCO's per-keypoint sigmas: what COCOeval scores) plus
the person score, with scipy's `linear_sum_assignment`.

With `heatmaps`, each keypoint is read off a pixel decoder's fine features instead (at the act head's
`mask_pixel_stride`: 1 in the ShapesWorld recipe, a 64 x 64 grid): the query's state gives one embedding per
keypoint, its dot product with every pixel feature a heatmap, and the keypoint is the heatmap's soft-argmax
(integral regression, Sun et al. 2018) — differentiable, and finer than the grid. A position regressed from a
query that read 8 px patches is off by a pixel or two, and OKS forgives a face keypoint ~1.5 px on a 30 px
figure: run j4, with regression, scored keypoint AP50 0.96 but AP 0.62; run j3, with heatmaps, AP 0.965.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from mmbridge.modeling.act.decoder import LinkConditionedDecoder

#: COCO's per-keypoint OKS sigmas for the 17 person keypoints (nose, eyes, ears, shoulders, elbows, wrists,
#: hips, knees, ankles) — pycocotools' defaults, so training matches what `COCOeval(iouType="keypoints")` scores.
COCO_KEYPOINT_SIGMAS = (0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072, 0.062, 0.062,
                        0.107, 0.107, 0.087, 0.087, 0.089, 0.089)


def keypoint_sigmas(num_keypoints: int) -> torch.Tensor:
    """COCO's sigmas for 17 keypoints; a uniform 0.05 for another keypoint set."""
    if num_keypoints == len(COCO_KEYPOINT_SIGMAS):
        return torch.tensor(COCO_KEYPOINT_SIGMAS)
    return torch.full((num_keypoints,), 0.05)


def oks(predicted: torch.Tensor, target: torch.Tensor, visible: torch.Tensor, area: torch.Tensor,
        sigmas: torch.Tensor) -> torch.Tensor:
    """Object keypoint similarity, as pycocotools computes it: (P, K, 2) predicted and (G, K, 2) true
    positions, (G, K) visibility, (G,) object areas (same units as the positions, squared) -> (P, G).
    exp(-d² / (2 · area · (2σ)²)) averaged over each person's visible keypoints (0 for a person with none)."""
    variances = (2 * sigmas.to(predicted)) ** 2  # (K,)
    d2 = ((predicted[:, None] - target[None]) ** 2).sum(-1)  # (P, G, K)
    e = d2 / variances / (area[None, :, None] + np.spacing(1)) / 2
    vis = visible.to(predicted)[None]  # (1, G, K)
    return (torch.exp(-e) * vis).sum(-1) / vis.sum(-1).clamp(min=1)


@torch.no_grad()
def match_people(keypoints: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, visible: torch.Tensor,
                 area: torch.Tensor, sigmas: torch.Tensor, oks_cost: float = 4.0, class_cost: float = 2.0,
                 l1_cost: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's queries -> its people: (Q, K, 2) keypoints and (Q,) logits against (G, K, 2) / (G, K) /
    (G,) targets. Cost = −OKS (weight 4) − person probability (2) + mean L1 over visible keypoints (1,
    a tie-breaker while every OKS is still ~0). Returns (query indices, person indices)."""
    if target.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.long, device=keypoints.device)
        return empty, empty
    similarity = oks(keypoints, target, visible, area, sigmas)  # (Q, G)
    vis = visible.to(keypoints)[None, :, :, None]
    l1 = ((keypoints[:, None] - target[None]).abs() * vis).sum((-1, -2)) / vis.sum((-1, -2)).clamp(min=1)
    cost = -oks_cost * similarity - class_cost * logits.sigmoid()[:, None] + l1_cost * l1
    rows, cols = linear_sum_assignment(cost.float().cpu().numpy())
    return (torch.as_tensor(rows, dtype=torch.long, device=keypoints.device),
            torch.as_tensor(cols, dtype=torch.long, device=keypoints.device))


class PoseDecoder(nn.Module):
    def __init__(self, llm_hidden_size: int, vision_hidden_size: int, hidden_size: int, num_layers: int,
                 num_heads: int, num_queries: int, num_keypoints: int, heatmaps: bool = False,
                 pixel_stride: int = 2, pixel_channels: int = 64):
        super().__init__()
        self.decoder = LinkConditionedDecoder(llm_hidden_size, vision_hidden_size, hidden_size, num_layers,
                                              num_heads, num_queries, mask_size=None, pixel_decoder=heatmaps,
                                              pixel_stride=pixel_stride, pixel_channels=pixel_channels,
                                              pixel_features=heatmaps)
        if heatmaps:
            self.keypoint_embed = nn.Linear(hidden_size, num_keypoints * hidden_size)
        else:
            self.keypoint_head = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.ReLU(),
                                               nn.Linear(hidden_size, 2 * num_keypoints))
        self.visibility_head = nn.Linear(hidden_size, num_keypoints)
        self.num_keypoints = num_keypoints

    def forward(self, link_hidden: torch.Tensor, vision_features: torch.Tensor | None,
                request_states: torch.Tensor | None = None, request_mask: torch.Tensor | None = None,
                images: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """-> `boxes` (n, q, 4) cx cy w h, `logits` (n, q) person scores, `keypoints` (n, q, K, 2) x y in
        [0, 1], `visibility` (n, q, K) logits (inputs as `LinkConditionedDecoder`'s; `images` (n, 3, H, W)
        for the heatmaps' pixel decoder)."""
        heatmaps = hasattr(self, "keypoint_embed")
        if heatmaps and vision_features is not None and images is None:
            raise ValueError("this pose decoder reads keypoints off the image's pixels: pass `images`")
        out = self.decoder(link_hidden, vision_features, request_states, request_mask,
                           images=images if heatmaps else None)
        hidden = out["hidden"]
        n, q = hidden.shape[:2]
        if not heatmaps:
            keypoints = self.keypoint_head(hidden).sigmoid().view(n, q, self.num_keypoints, 2)
        elif "pixels" in out:
            keypoints = self._soft_argmax(hidden, out["pixels"])
        else:  # no image to read: every keypoint at the person's box centre (the head answers "no image")
            keypoints = out["boxes"][..., None, :2].expand(n, q, self.num_keypoints, 2)
        proposals = {k: v for k, v in out.items() if k.startswith("proposal_")}  # trained by the act head
        return {"boxes": out["boxes"], "logits": out["logits"], "keypoints": keypoints,
                "visibility": self.visibility_head(hidden), **proposals}

    def _soft_argmax(self, hidden: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        """(n, q, d) query states, (n, d, h, w) pixel features -> (n, q, K, 2) x y in [0, 1]: the expected
        position under each keypoint's heatmap (softmax over the h x w cells, each at its centre)."""
        n, q, d = hidden.shape
        h, w = pixels.shape[-2:]
        embed = self.keypoint_embed(hidden).view(n, q * self.num_keypoints, d)
        logits = torch.einsum("nkd,ndp->nkp", embed, pixels.flatten(2)) / math.sqrt(d)
        probs = logits.softmax(-1).view(n, q, self.num_keypoints, h * w)
        xs = (torch.arange(w, device=pixels.device, dtype=probs.dtype) + 0.5) / w
        ys = (torch.arange(h, device=pixels.device, dtype=probs.dtype) + 0.5) / h
        grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1], dim=-1).view(h * w, 2)  # (h*w, x y)
        return probs @ grid
