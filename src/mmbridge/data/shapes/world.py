"""ShapesWorld v1: scene sampling and rendering (docs/world.md, world spec v1).

Other tools render this world independently, so every constant here is part of a contract: change
nothing without bumping ``WORLD_VERSION``.

Coordinates: pixel edges.  An object with box ``(x0, y0, x1, y1)`` covers pixels ``x0..x1-1``; its
extent is ``x1 - x0`` (= ``y1 - y0``, every shape's box is square).  Shapes are defined analytically
inside the box, so the anti-aliased drawing never leaves it and the box of the drawn pixels is the
annotated box exactly (the oracle relies on that).
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

WORLD_VERSION = "shapesworld-v1"
IMAGE_SIZE = 64
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (50, 180, 70),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 50),
    "purple": (160, 70, 210),
    "orange": (245, 145, 35),
    "cyan": (50, 205, 215),
    "white": (240, 240, 240),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"black": (0, 0, 0), "gray": (60, 60, 60)}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SIZES: dict[str, tuple[int, int]] = {"small": (8, 11), "large": (16, 22)}  # extent range, inclusive
MAX_JITTER = 15
MIN_OBJECTS, MAX_OBJECTS = 1, 4
MIN_GAP = 2  # empty pixels between two boxes
BORDER = 1  # empty pixels between a box and the image edge
RELATION_MARGIN = 4
SUPERSAMPLE = 4

SPLITS = ("train", "val", "test")
# Scene seeds are bit fields (base seed | split | index), so two splits can never share a seed, for
# any base seed and any index: disjoint by construction, not by luck of a hash.
_INDEX_BITS, _SPLIT_BITS = 32, 2


def scene_seed(split: str, index: int, base_seed: int = 0) -> int:
    """The seed of scene ``index`` of ``split``; distinct for every (split, index, base_seed)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if not 0 <= index < 1 << _INDEX_BITS:
        raise ValueError(f"scene index {index} out of range")
    if not 0 <= base_seed < 1 << 28:
        raise ValueError(f"base seed {base_seed} out of range [0, 2**28)")
    return (base_seed << (_INDEX_BITS + _SPLIT_BITS)) | (SPLITS.index(split) << _INDEX_BITS) | index


def split_of_seed(seed: int) -> str:
    return SPLITS[(seed >> _INDEX_BITS) & ((1 << _SPLIT_BITS) - 1)]


def rng_for(seed: int, stream: int = 0) -> np.random.Generator:
    """Random stream ``stream`` of a scene: 0 samples the scene, others feed annotations, so adding
    a question type never changes the scenes.  SeedSequence hashes the structured seed, so
    neighbouring seeds give unrelated streams."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream,) if stream else ()))


@dataclass
class ShapeObject:
    shape: str
    color: str
    size: str  # "small" | "large"
    extent: int
    x0: int
    y0: int
    rgb: tuple[int, int, int] | None = None  # drawn colour (palette + jitter); None = exact palette

    @property
    def box(self) -> tuple[int, int, int, int]:
        return (self.x0, self.y0, self.x0 + self.extent, self.y0 + self.extent)

    @property
    def centre(self) -> tuple[float, float]:
        return (self.x0 + self.extent / 2, self.y0 + self.extent / 2)

    @property
    def name(self) -> str:
        """``{size} {color} {shape}``: how captions name the object."""
        return f"{self.size} {self.color} {self.shape}"

    def to_dict(self) -> dict:
        return {
            "shape": self.shape,
            "color": self.color,
            "size": self.size,
            "extent": self.extent,
            "box": list(self.box),
            "centre": list(self.centre),
            "rgb": list(self.rgb) if self.rgb is not None else None,
        }

    @classmethod
    def from_dict(cls, d: dict) -> ShapeObject:
        x0, y0, x1, _ = d["box"]
        rgb = d.get("rgb")
        return cls(d["shape"], d["color"], d["size"], int(d.get("extent", x1 - x0)), int(x0), int(y0),
                   tuple(rgb) if rgb is not None else None)


@dataclass
class Scene:
    objects: list[ShapeObject]
    background: str = "black"
    seed: int | None = None
    version: str = WORLD_VERSION
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"version": self.version, "seed": self.seed, "background": self.background,
                "objects": [o.to_dict() for o in self.objects], **({"meta": self.meta} if self.meta else {})}

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        return cls([ShapeObject.from_dict(o) for o in d["objects"]], d.get("background", "black"),
                   d.get("seed"), d.get("version", WORLD_VERSION), dict(d.get("meta", {})))

    def find(self, color: str | None = None, shape: str | None = None) -> list[ShapeObject]:
        return [o for o in self.objects
                if (color is None or o.color == color) and (shape is None or o.shape == shape)]

    def render(self) -> Image.Image:
        return render(self)

    def masks(self) -> list[np.ndarray]:
        """Binary instance masks (coverage ≥ ½), one 64×64 bool array per object."""
        return [coverage_map(o) >= 0.5 for o in self.objects]


# ----------------------------------------------------------------------------------------------
# spec checks (used by the sampler, the edit generator and the tests)


def boxes_apart(a: Sequence[int], b: Sequence[int], gap: int = MIN_GAP) -> bool:
    """Boxes do not overlap and leave at least ``gap`` empty pixels between them on some axis."""
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def box_inside(box: Sequence[int], border: int = BORDER, size: int = IMAGE_SIZE) -> bool:
    return box[0] >= border and box[1] >= border and box[2] <= size - border and box[3] <= size - border


def relation(a: ShapeObject, b: ShapeObject, axis: str) -> int:
    """+1 if a is left of (axis "x") / above (axis "y") b with the margin, -1 for the converse, 0 if
    neither holds (then no relation question is asked)."""
    i = 0 if axis == "x" else 1
    ca, cb = a.centre[i], b.centre[i]
    if ca + RELATION_MARGIN < cb:
        return 1
    if cb + RELATION_MARGIN < ca:
        return -1
    return 0


def spec_violations(scene: Scene) -> list[str]:
    """Every way ``scene`` breaks world spec v1 (empty list = valid)."""
    errors = []
    n = len(scene.objects)
    if not MIN_OBJECTS <= n <= MAX_OBJECTS:
        errors.append(f"{n} objects")
    if scene.background not in BACKGROUNDS:
        errors.append(f"background {scene.background!r}")
    for i, o in enumerate(scene.objects):
        lo, hi = SIZES.get(o.size, (0, -1))
        if o.shape not in SHAPES or o.color not in COLORS:
            errors.append(f"object {i}: unknown {o.shape!r}/{o.color!r}")
        if not lo <= o.extent <= hi:
            errors.append(f"object {i}: extent {o.extent} not {o.size}")
        if not box_inside(o.box):
            errors.append(f"object {i}: box {o.box} touches the border")
        if o.rgb is not None and max(abs(c - p) for c, p in zip(o.rgb, COLORS.get(o.color, o.rgb))) > MAX_JITTER:
            errors.append(f"object {i}: rgb {o.rgb} jittered beyond ±{MAX_JITTER}")
        for j in range(i):
            p = scene.objects[j]
            if not boxes_apart(o.box, p.box):
                errors.append(f"objects {j},{i}: boxes closer than {MIN_GAP}px")
            if (o.shape, o.color) == (p.shape, p.color):
                errors.append(f"objects {j},{i}: same shape and color")
    return errors


# ----------------------------------------------------------------------------------------------
# sampling


def jitter_rgb(color: str, rng: np.random.Generator) -> tuple[int, int, int]:
    base = np.array(COLORS[color])
    return tuple(int(v) for v in np.clip(base + rng.integers(-MAX_JITTER, MAX_JITTER + 1, 3), 0, 255))


def place(extent: int, others: Iterable[Sequence[int]], rng: np.random.Generator,
          tries: int = 200) -> tuple[int, int] | None:
    """A random top-left corner for a box of ``extent`` that respects border and gaps, or None."""
    others = list(others)
    hi = IMAGE_SIZE - BORDER - extent
    for _ in range(tries):
        x0, y0 = (int(v) for v in rng.integers(BORDER, hi + 1, 2))
        box = (x0, y0, x0 + extent, y0 + extent)
        if all(boxes_apart(box, b) for b in others):
            return x0, y0
    return None


def sample_object(rng: np.random.Generator, taken: set[tuple[str, str]], others: Sequence[Sequence[int]],
                  shape: str | None = None, color: str | None = None, size: str | None = None,
                  jitter: bool = True) -> ShapeObject | None:
    """One new object whose (shape, color) is not in ``taken`` and whose box fits among ``others``."""
    free = [(s, c) for s in SHAPES for c in COLORS
            if (s, c) not in taken and shape in (None, s) and color in (None, c)]
    if not free:
        return None
    s, c = free[rng.integers(len(free))]
    size = size or ("small", "large")[rng.integers(2)]
    extent = int(rng.integers(SIZES[size][0], SIZES[size][1] + 1))
    corner = place(extent, others, rng)
    if corner is None:
        return None
    return ShapeObject(s, c, size, extent, *corner, rgb=jitter_rgb(c, rng) if jitter else None)


def sample_scene(seed: int, num_objects: int | None = None, jitter: bool = True) -> Scene:
    """The scene for ``seed`` (see :func:`scene_seed`); same seed → same scene, on any machine."""
    rng = rng_for(seed)
    n = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1)) if num_objects is None else num_objects
    background = tuple(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    while True:  # four large shapes can paint themselves into a corner: start over (rare)
        objects: list[ShapeObject] = []
        for _ in range(n):
            obj = sample_object(rng, {(o.shape, o.color) for o in objects}, [o.box for o in objects],
                                jitter=jitter)
            if obj is None:
                break
            objects.append(obj)
        if len(objects) == n:
            return Scene(objects, background, seed)


def make_scene(split: str, index: int, base_seed: int = 0) -> Scene:
    return sample_scene(scene_seed(split, index, base_seed))


# ----------------------------------------------------------------------------------------------
# rendering

_S = SUPERSAMPLE
_OFFSETS = (np.arange(_S) + 0.5) / _S  # sample positions inside a pixel


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether normalised box coordinates (u right, v down, both in [0, 1]) lie inside ``shape``."""
    du, dv = np.abs(u - 0.5), np.abs(v - 0.5)
    if shape == "circle":
        return du ** 2 + dv ** 2 <= 0.25
    if shape == "square":
        return np.ones_like(u, dtype=bool)
    if shape == "triangle":  # apex up at (0.5, 0), base along v = 1
        return du <= v / 2
    if shape == "diamond":
        return du + dv <= 0.5
    if shape == "cross":  # plus sign, arm width 1/3 of the extent
        return (du <= 1 / 6) | (dv <= 1 / 6)
    raise ValueError(f"unknown shape {shape!r}")


def shape_coverage(shape: str, extent: int) -> np.ndarray:
    """Fraction of each pixel of an ``extent``×``extent`` box covered by ``shape`` (4×4 supersampling)."""
    t = (np.arange(extent)[:, None] + _OFFSETS[None, :]).ravel() / extent  # sub-sample centres
    v, u = np.meshgrid(t, t, indexing="ij")
    hit = _inside(shape, u, v).astype(np.float32)
    return hit.reshape(extent, _S, extent, _S).mean(axis=(1, 3))


_COVERAGE_CACHE: dict[tuple[str, int], np.ndarray] = {}


def cached_coverage(shape: str, extent: int) -> np.ndarray:
    key = (shape, extent)
    if key not in _COVERAGE_CACHE:
        _COVERAGE_CACHE[key] = shape_coverage(shape, extent)
    return _COVERAGE_CACHE[key]


def coverage_map(obj: ShapeObject, size: int = IMAGE_SIZE) -> np.ndarray:
    cov = np.zeros((size, size), np.float32)
    x0, y0, x1, y1 = obj.box
    cov[y0:y1, x0:x1] = cached_coverage(obj.shape, obj.extent)
    return cov


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """Anti-aliased 64×64 RGB image: each pixel blends object colour and background by coverage."""
    img = np.empty((size, size, 3), np.float32)
    img[:] = BACKGROUNDS[scene.background]
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box
        a = cached_coverage(obj.shape, obj.extent)[..., None]
        rgb = np.array(obj.rgb if obj.rgb is not None else COLORS[obj.color], np.float32)
        img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - a) + rgb * a
    return Image.fromarray(np.rint(img).astype(np.uint8), "RGB")


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()

