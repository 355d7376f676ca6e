"""A classical (non-learned) reader of ShapesWorld images: image → objects (shape, color, size, box).

It scores generated and edited images later, so it must not depend on how *we* render: it only
assumes a solid background and filled, separated blobs of roughly palette colour.

Steps: estimate the background from the border pixels → foreground = pixels that differ from it →
8-connected components → per component: box from its pixels, colour = nearest palette colour of its
most saturated ("core") pixels, coverage (alpha) = difference to the background relative to the
core's, shape = the ideal shape whose coverage template best matches the component's alpha inside
its box (IoU), size by extent (the gap between the ranges 8–11 and 16–22 is split at 13.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from .world import BACKGROUNDS, COLORS, SHAPES, Scene, ShapeObject, cached_coverage

FOREGROUND_THRESHOLD = 12.0  # max channel difference to the background; edge pixels ≥ ¼ covered exceed it
MIN_PIXELS = 6  # smaller components are noise (a small shape covers ≥ 30 pixels)
SIZE_SPLIT = 13.5

_PALETTE_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[c] for c in _PALETTE_NAMES], np.float32)


@dataclass
class Detection:
    shape: str
    color: str
    size: str
    box: tuple[int, int, int, int]
    rgb: tuple[int, int, int]
    shape_score: float  # IoU of the best shape template (1 = perfect)
    color_distance: float  # distance of the core colour to its palette colour

    def to_object(self) -> ShapeObject:
        x0, y0, x1, y1 = self.box
        return ShapeObject(self.shape, self.color, self.size, max(x1 - x0, y1 - y0), x0, y0, self.rgb)


@dataclass
class OracleResult:
    background: str
    background_rgb: tuple[int, int, int]
    detections: list[Detection]

    def to_scene(self) -> Scene:
        # reading order (top to bottom, left to right) so results are stable
        dets = sorted(self.detections, key=lambda d: (d.box[1], d.box[0]))
        return Scene([d.to_object() for d in dets], self.background)


def _as_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    return np.asarray(image, np.float32)[..., :3]


def estimate_background(img: np.ndarray) -> np.ndarray:
    """Median of the 1-px border (objects keep ≥ 1 px off the border, so it is pure background)."""
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    return np.median(border, axis=0)


def _template_iou(alpha: np.ndarray, shape: str) -> float:
    """Soft IoU between a component's alpha and the ideal ``shape`` filling its box (a box that is
    not square — e.g. a generated, squashed shape — gets a stretched template)."""
    h, w = alpha.shape
    if h == w:
        tmpl = cached_coverage(shape, h)
    else:
        tmpl = np.asarray(Image.fromarray(cached_coverage(shape, 64)).resize((w, h), Image.BILINEAR))
    return float(np.minimum(alpha, tmpl).sum() / max(np.maximum(alpha, tmpl).sum(), 1e-6))


def analyse(image, threshold: float = FOREGROUND_THRESHOLD) -> OracleResult:
    """Read the objects of a 64×64 (or any size) RGB image (PIL image or HxWx3 array)."""
    img = _as_array(image)
    bg = estimate_background(img)
    bg_name = min(BACKGROUNDS, key=lambda n: np.abs(np.array(BACKGROUNDS[n]) - bg).sum())
    diff = np.abs(img - bg).max(axis=-1)
    labels, n = ndimage.label(diff > threshold, structure=np.ones((3, 3)))
    detections = []
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        comp = labels[sl] == i
        if comp.sum() < MIN_PIXELS:
            continue
        pix, d = img[sl][comp], diff[sl][comp]
        core = np.median(pix[d >= 0.9 * d.max()], axis=0)
        dist = np.linalg.norm(_PALETTE - core, axis=1)
        color = _PALETTE_NAMES[int(dist.argmin())]
        # alpha: how far each pixel moved from the background towards the core colour
        ref = np.abs(core - bg).max()
        alpha = np.where(comp, np.clip(diff[sl] / max(ref, 1e-6), 0, 1), 0).astype(np.float32)
        scores = {s: _template_iou(alpha, s) for s in SHAPES}
        shape = max(scores, key=scores.get)
        y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
        extent = max(x1 - x0, y1 - y0)
        detections.append(Detection(shape, color, "small" if extent < SIZE_SPLIT else "large",
                                    (x0, y0, x1, y1), tuple(int(round(v)) for v in core),
                                    scores[shape], float(dist.min())))
    return OracleResult(bg_name, tuple(int(round(v)) for v in bg), detections)


def read_scene(image) -> Scene:
    """The oracle's scene for an image (objects in reading order)."""
    return analyse(image).to_scene()


def compare(truth: Scene, read: Scene) -> dict:
    """How well ``read`` (e.g. the oracle's scene) matches ``truth``: objects matched by box IoU
    (Hungarian), then attribute agreement.  ``exact`` = same count and every attribute and box equal."""
    from scipy.optimize import linear_sum_assignment

    def iou(a, b):
        ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
        iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = ix * iy
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    t, r = truth.objects, read.objects
    cost = np.array([[-iou(a.box, b.box) for b in r] for a in t]).reshape(len(t), len(r))
    rows, cols = linear_sum_assignment(cost) if t and r else ([], [])
    pairs = [(t[i], r[j]) for i, j in zip(rows, cols) if -cost[i, j] > 0]
    agree = {k: sum(getattr(a, k) == getattr(b, k) for a, b in pairs) for k in ("shape", "color", "size", "box")}
    exact = len(t) == len(r) == len(pairs) and all(v == len(t) for v in agree.values()) \
        and truth.background == read.background
    return {"truth": len(t), "read": len(r), "matched": len(pairs), **agree, "exact": exact}
