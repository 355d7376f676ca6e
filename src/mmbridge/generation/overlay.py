"""What the act head found, drawn on the image it looked at: boxes with their scores, masks tinted, people's
keypoints and skeletons. `mmbridge chat` and `mmbridge demo` save these next to the JSON of each part.

PIL only (the parts hold fractions of the image and COCO RLE masks, so nothing here depends on the model).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

#: outline / tint colours, one per found object in order (distinct on the world's flat colours and black)
COLORS = [(255, 0, 255), (0, 255, 0), (255, 255, 0), (0, 200, 255), (255, 128, 0), (255, 255, 255)]


def draw_overlay(image: Image.Image, part, scale: int = 4) -> Image.Image:
    """`image` enlarged `scale` times (nearest: the world's pixels stay sharp) with `part` drawn on it: a
    `DetectionsPart` (boxes, scores, masks) or a `KeypointsPart` (points above 0.5 visibility, skeleton)."""
    width, height = image.width * scale, image.height * scale
    canvas = image.convert("RGB").resize((width, height), Image.NEAREST)
    if part.type == "detections" and part.masks:
        canvas = _tint_masks(canvas, part.masks)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for k, (box, score) in enumerate(zip(part.boxes, part.scores)):
        color = COLORS[k % len(COLORS)]
        x0, y0, x1, y1 = box[0] * width, box[1] * height, box[2] * width, box[3] * height
        draw.rectangle([x0 - 1, y0 - 1, x1, y1], outline=color, width=2)
        draw.text((x0 + 2, max(0, y0 - 11)), f"{score:.2f}", fill=color, font=font)
    if part.type == "keypoints":
        for k, person in enumerate(part.keypoints):
            color = COLORS[k % len(COLORS)]
            points = [(x * width, y * height, s) for x, y, s in person]
            for a, b in part.skeleton:
                if points[a][2] > 0.5 and points[b][2] > 0.5:
                    draw.line([points[a][:2], points[b][:2]], fill=color, width=2)
            for x, y, s in points:
                if s > 0.5:
                    draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
    return canvas


def _tint_masks(canvas: Image.Image, masks: list[dict]) -> Image.Image:
    from pycocotools import mask as mask_utils

    pixels = np.asarray(canvas, dtype=np.float32)
    for k, rle in enumerate(masks):
        binary = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()
                                    if isinstance(rle["counts"], str) else rle["counts"]})
        inside = np.asarray(Image.fromarray(binary * 255).resize(canvas.size, Image.NEAREST)) > 127
        pixels[inside] = 0.5 * pixels[inside] + 0.5 * np.array(COLORS[k % len(COLORS)], dtype=np.float32)
    return Image.fromarray(pixels.round().astype(np.uint8))
