"""Wave-2 pose set: one stick figure per 64×64 image with the 17 named COCO keypoints.

Using COCO's keypoint names and skeleton means pycocotools' keypoint COCOeval (with its default
per-keypoint sigmas) works on this set unchanged.  The figure faces the viewer, so its *left*
shoulder/hip are on the image's right — the COCO convention for a person facing the camera.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .world import BACKGROUNDS, BORDER, COLORS, IMAGE_SIZE, SUPERSAMPLE, jitter_rgb, rng_for

KEYPOINTS = ("nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
             "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
             "left_knee", "right_knee", "left_ankle", "right_ankle")
# COCO person skeleton, 1-based keypoint indices (as in person_keypoints_*.json)
SKELETON = [[16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7], [6, 8], [7, 9],
            [8, 10], [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7]]
# What is drawn: limbs as thick lines (the face keypoints sit inside the filled head disc).
LIMBS = [("left_shoulder", "right_shoulder"), ("left_hip", "right_hip"), ("neck", "pelvis"),
         ("left_shoulder", "left_elbow"), ("left_elbow", "left_wrist"), ("right_shoulder", "right_elbow"),
         ("right_elbow", "right_wrist"), ("left_hip", "left_knee"), ("left_knee", "left_ankle"),
         ("right_hip", "right_knee"), ("right_knee", "right_ankle")]
# Body proportions as fractions of the figure's height parameter h.
PROPORTIONS = {"head": 0.09, "torso": 0.32, "shoulder": 0.13, "hip": 0.08, "upper_arm": 0.17,
               "forearm": 0.15, "thigh": 0.22, "shin": 0.2}
HEIGHT_RANGE = (34, 54)
THICKNESS = 2.0  # line width in pixels


@dataclass
class PoseScene:
    keypoints: dict[str, tuple[float, float]]  # the 17 COCO keypoints plus "neck" and "pelvis"
    head_radius: float
    color: str
    rgb: tuple[int, int, int]
    background: str
    seed: int | None = None

    @property
    def box(self) -> tuple[int, int, int, int]:
        """Pixel-edge box of everything drawn (limbs with their thickness, and the head)."""
        pts = np.array(list(self.keypoints.values()))
        hx, hy = self.keypoints["nose"]
        pad = THICKNESS / 2
        x0 = min(pts[:, 0].min() - pad, hx - self.head_radius)
        y0 = min(pts[:, 1].min() - pad, hy - self.head_radius)
        x1 = max(pts[:, 0].max() + pad, hx + self.head_radius)
        y1 = max(pts[:, 1].max() + pad, hy + self.head_radius)
        return (math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1))

    def coco_keypoints(self) -> list[float]:
        """Flat [x, y, v] × 17 with v = 2 (labelled and visible)."""
        out: list[float] = []
        for name in KEYPOINTS:
            x, y = self.keypoints[name]
            out += [round(x, 2), round(y, 2), 2]
        return out

    def arms(self) -> str:
        kp = self.keypoints
        up = [kp[f"{s}_wrist"][1] < kp[f"{s}_shoulder"][1] for s in ("left", "right")]
        return {(True, True): "both arms raised", (False, False): "its arms down",
                (True, False): "its left arm raised", (False, True): "its right arm raised"}[tuple(up)]

    def caption(self) -> str:
        return f"A {self.color} stick figure with {self.arms()} on a {self.background} background."

    def to_dict(self) -> dict:
        return {"keypoints": {k: list(v) for k, v in self.keypoints.items()}, "head_radius": self.head_radius,
                "color": self.color, "rgb": list(self.rgb), "background": self.background,
                "seed": self.seed, "box": list(self.box)}

    @classmethod
    def from_dict(cls, d: dict) -> PoseScene:
        return cls({k: tuple(v) for k, v in d["keypoints"].items()}, d["head_radius"], d["color"],
                   tuple(d["rgb"]), d["background"], d.get("seed"))

    def render(self) -> Image.Image:
        return render_pose(self)


def _skeleton(rng: np.random.Generator, h: float) -> dict[str, tuple[float, float]]:
    """Joint positions relative to the neck at (0, 0); y grows downwards, angles from straight down."""
    P = {k: v * h for k, v in PROPORTIONS.items()}

    def limb(start, angle, length):
        return (start[0] + length * math.sin(angle), start[1] + length * math.cos(angle))

    kp = {"neck": (0.0, 0.0), "pelvis": (0.0, P["torso"])}
    r = P["head"]
    nose = (0.0, -r - 0.5)
    kp.update(nose=nose, left_eye=(nose[0] + 0.4 * r, nose[1] - 0.3 * r),
              right_eye=(nose[0] - 0.4 * r, nose[1] - 0.3 * r),
              left_ear=(nose[0] + 0.9 * r, nose[1]), right_ear=(nose[0] - 0.9 * r, nose[1]))
    for side, sign in (("left", 1), ("right", -1)):  # the figure's left is the image's right (+x)
        sh = (sign * P["shoulder"], 0.15 * P["torso"])
        up = math.radians(rng.uniform(10, 170))  # 0 = hanging down, 180 = straight up
        bend = math.radians(rng.uniform(0, 80))
        el = limb(sh, sign * up, P["upper_arm"])
        wr = limb(el, sign * (up + bend), P["forearm"])
        hip = (sign * P["hip"], P["torso"])
        thigh = math.radians(rng.uniform(0, 35))
        kn = limb(hip, sign * thigh, P["thigh"])
        an = limb(kn, sign * (thigh - math.radians(rng.uniform(0, 40))), P["shin"])
        kp.update({f"{side}_shoulder": sh, f"{side}_elbow": el, f"{side}_wrist": wr,
                   f"{side}_hip": hip, f"{side}_knee": kn, f"{side}_ankle": an})
    return kp


def sample_pose(seed: int) -> PoseScene:
    rng = rng_for(seed, 4)
    color = list(COLORS)[rng.integers(len(COLORS))]
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    rgb = jitter_rgb(color, rng)
    while True:
        h = rng.uniform(*HEIGHT_RANGE)
        rel = _skeleton(rng, h)
        probe = PoseScene(rel, PROPORTIONS["head"] * h, color, rgb, background, seed)
        x0, y0, x1, y1 = probe.box
        lo, hi = BORDER + 1, IMAGE_SIZE - BORDER - 1  # one spare pixel for the anti-aliased fringe
        if x1 - x0 > hi - lo or y1 - y0 > hi - lo:
            continue
        dx = rng.uniform(lo - x0, hi - x1)
        dy = rng.uniform(lo - y0, hi - y1)
        kp = {k: (x + dx, y + dy) for k, (x, y) in rel.items()}
        return PoseScene(kp, probe.head_radius, color, rgb, background, seed)


def pose_coverage(pose: PoseScene, size: int = IMAGE_SIZE) -> np.ndarray:
    """Anti-aliased coverage of the figure: drawn at 4× then box-filtered down."""
    s = SUPERSAMPLE
    canvas = Image.new("L", (size * s, size * s), 0)
    draw = ImageDraw.Draw(canvas)
    kp = {k: (x * s, y * s) for k, (x, y) in pose.keypoints.items()}
    w = THICKNESS * s
    for a, b in LIMBS:
        draw.line([kp[a], kp[b]], fill=255, width=round(w))
    for x, y in kp.values():  # round joints so bent limbs have no notches
        if (x, y) != kp["nose"]:
            draw.ellipse([x - w / 2, y - w / 2, x + w / 2, y + w / 2], fill=255)
    nx, ny = kp["nose"]
    r = pose.head_radius * s
    draw.ellipse([nx - r, ny - r, nx + r, ny + r], fill=255)
    draw.line([kp["neck"], (nx, ny + r - 1)], fill=255, width=round(w))
    return np.asarray(canvas.resize((size, size), Image.BOX), np.float32) / 255.0


def render_pose(pose: PoseScene) -> Image.Image:
    a = pose_coverage(pose)[..., None]
    img = np.array(BACKGROUNDS[pose.background], np.float32) * (1 - a) + np.array(pose.rgb, np.float32) * a
    return Image.fromarray(np.rint(img).astype(np.uint8), "RGB")
