"""Typed output parts of an answer, and the one serializer every front end uses.

`generate` answers with a list of parts — text, and whatever the model's heads produced (an image, boxes,
keypoints, …) in the order they were written — so the CLI, the API and the web UI never parse strings
to find out what the model did. A head kind registers how its decoded tensors become a part
(`register_part`); without one, its tensors come back as a generic `HeadPart`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch


@dataclass
class TextPart:
    text: str
    type: Literal["text"] = "text"


@dataclass
class HeadPart:
    """A head's output with no dedicated part type: its decoded tensors as plain lists / numbers."""

    head: str
    data: dict[str, Any]
    type: Literal["head"] = "head"


@dataclass
class ImagePart:
    """An image the model drew (the draw head, or the act head's `[GEN]` / `[EDIT]`: `route` says which), as a
    PIL image; serialized as a PNG data URL."""

    image: Any  # PIL.Image.Image
    head: str = "draw"
    type: Literal["image"] = "image"
    route: str | None = None  # the act head's [GEN] / [EDIT]; None for the draw head's vokens

    def to_dict(self) -> dict[str, Any]:
        import base64
        import io

        buffer = io.BytesIO()
        self.image.save(buffer, "PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        return {"type": "image", "head": self.head, **({"route": self.route} if self.route else {}), "url": url,
                "width": self.image.width, "height": self.image.height}


@dataclass
class DetectionsPart:
    """What the act head found for `[DET]` / `[SEG]` / `[GRD]`: boxes as (x0, y0, x1, y1) fractions of the
    image, their scores, and for segmentation COCO RLE masks (pycocotools) at `mask_size`."""

    route: str
    boxes: list[list[float]]
    scores: list[float]
    masks: list[dict] | None = None
    mask_size: int | None = None
    head: str = "act"
    type: Literal["detections"] = "detections"


#: Text, images, detections, and each head kind's part types (keypoints, … as they land).
OutputPart = Any

#: head kind -> fn(head name, route trigger, decoded tensors of one occurrence) -> part
PART_BUILDERS: dict[str, Callable[[str, str, dict[str, torch.Tensor]], Any]] = {}


def register_part(kind: str, build: Callable[[str, str, dict[str, torch.Tensor]], Any]) -> None:
    PART_BUILDERS[kind] = build


def build_part(kind: str, head: str, route: str, tensors: dict[str, torch.Tensor]):
    if kind in PART_BUILDERS:
        return PART_BUILDERS[kind](head, route, tensors)
    return HeadPart(head, {k: _plain(v) for k, v in tensors.items()})


def _plain(value):
    if torch.is_tensor(value):
        value = value.detach().cpu()
        return value.item() if value.ndim == 0 else value.tolist()
    return value


def part_to_dict(part) -> dict[str, Any]:
    """JSON-ready dict with `type` first — what the API returns in `message.parts` and the UI shows."""
    if hasattr(part, "to_dict"):
        return part.to_dict()
    fields = {k: _plain(v) for k, v in dataclasses.asdict(part).items() if k != "type"}
    return {"type": part.type, **fields}


def part_to_text(part) -> str:
    """A one-line rendering for terminals and chat bubbles."""
    if part.type == "text":
        return part.text
    if part.type == "image":
        return f"[image {part.image.width}x{part.image.height}]"
    if part.type == "detections":
        boxes = "; ".join(f"({', '.join(f'{v:.2f}' for v in box)}) {score:.2f}"
                          for box, score in zip(part.boxes, part.scores))
        return f"[{part.route} {len(part.boxes)} found{': ' + boxes if boxes else ''}]"
    if hasattr(part, "to_text"):
        return part.to_text()
    fields = ", ".join(f"{k}={v}" for k, v in part_to_dict(part).items() if k != "type")
    return f"[{part.type}: {fields}]"


def _image_part(head: str, route: str, tensors: dict[str, torch.Tensor]) -> ImagePart:
    from PIL import Image

    array = (tensors["image"].detach().float().cpu().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return ImagePart(Image.fromarray(array), head)


register_part("draw", _image_part)


def _detections_part(head: str, route: str, tensors: dict[str, torch.Tensor]) -> DetectionsPart:
    keep = tensors["keep"].bool()
    order = tensors["scores"][keep].argsort(descending=True)
    boxes = tensors["boxes"][keep][order]
    part = DetectionsPart(route, [[round(float(v), 4) for v in box] for box in boxes],
                          [round(float(s), 4) for s in tensors["scores"][keep][order]], head=head)
    if "masks" in tensors:
        import numpy as np
        from pycocotools import mask as mask_utils

        masks = tensors["masks"][keep][order].cpu().numpy().astype(np.uint8)
        part.masks = [{**rle, "counts": rle["counts"].decode()}
                      for rle in (mask_utils.encode(np.asfortranarray(m)) for m in masks)]
        part.mask_size = int(masks.shape[-1]) if len(masks) else None
    return part


register_part("act", _detections_part)


@dataclass
class KeypointsPart:
    """What the act head found for `[POSE]`: per person its keypoints as [x, y, score] with x, y fractions
    of the image and score the keypoint's visibility probability, the person's score and box (x0, y0, x1,
    y1 fractions), and the skeleton as 0-based keypoint index pairs (COCO's person skeleton for 17)."""

    route: str
    keypoints: list[list[list[float]]]
    scores: list[float]
    boxes: list[list[float]]
    skeleton: list[list[int]]
    head: str = "act"
    type: Literal["keypoints"] = "keypoints"

    def to_text(self) -> str:
        people = "; ".join(f"{len(kps)} keypoints {score:.2f}" for kps, score in zip(self.keypoints, self.scores))
        return f"[{self.route} {len(self.keypoints)} found{': ' + people if people else ''}]"


def keypoint_skeleton(num_keypoints: int) -> list[list[int]]:
    """COCO's person skeleton (0-based) for 17 keypoints; none known for another keypoint set."""
    if num_keypoints != 17:
        return []
    from mmbridge.data.shapes.pose import SKELETON

    return [[a - 1, b - 1] for a, b in SKELETON]


#: what the act head's `[EDIT]` answers when the request holds no image to edit
NO_IMAGE_TO_EDIT = "I need an image to edit: send the picture together with the instruction."
#: what a perception route (`[DET]`, `[SEG]`, `[GRD]`, `[POSE]`) answers when the conversation holds no image
NO_IMAGE_TO_LOOK_AT = "I need an image to look at: send the picture together with the request."


def _act_part(head: str, route: str, tensors: dict[str, torch.Tensor]):
    if route in ("[GEN]", "[EDIT]"):
        if route == "[EDIT]" and not bool(tensors["has_image"]):
            return TextPart(NO_IMAGE_TO_EDIT)
        part = _image_part(head, route, tensors)
        part.route = route
        return part
    if "has_image" in tensors and not bool(tensors["has_image"]):
        return TextPart(NO_IMAGE_TO_LOOK_AT)
    if route != "[POSE]":
        return _detections_part(head, route, tensors)
    keep = tensors["keep"].bool()
    scores = tensors["scores"][keep]
    order = scores.argsort(descending=True)
    points = torch.cat([tensors["keypoints"][keep][order], tensors["keypoint_scores"][keep][order][..., None]], -1)
    return KeypointsPart(route, [[[round(float(v), 4) for v in point] for point in person] for person in points],
                         [round(float(s), 4) for s in scores[order]],
                         [[round(float(v), 4) for v in box] for box in tensors["boxes"][keep][order]],
                         keypoint_skeleton(tensors["keypoints"].shape[-2]), head=head)


register_part("act", _act_part)
