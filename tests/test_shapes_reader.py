"""The world reader (mmbridge.data.shapes.reader) reads ShapesWorld images back into objects exactly —
from our renderer and from an independent PIL renderer written here from the spec (docs/world.md),
jittered colours, both backgrounds — degrades gracefully on blurred / noisy images, and the
faithfulness scorer built on it judges drawn images.

The scene counts are small by default (CI); READER_SCENES=1000 measures the numbers in docs/data.md:
    READER_SCENES=1000 HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -s tests/test_shapes_reader.py
"""

import os

import numpy as np
import pytest
from PIL import Image, ImageDraw
from scipy import ndimage

from mmbridge.data.shapes.annotations import answer_question, qa_pairs
from mmbridge.data.shapes.edits import make_edit
from mmbridge.data.shapes.faithfulness import (
    Relation,
    as_request,
    faithfulness,
    parse_request,
    story_consistency,
    summarize,
)
from mmbridge.data.shapes.reader import read_image, read_scene
from mmbridge.data.shapes.world import (
    BACKGROUNDS,
    COLORS,
    SHAPES,
    Scene,
    ShapeObject,
    make_scene,
    render,
    rng_for,
    sample_scene,
)

N = int(os.environ.get("READER_SCENES", "60"))  # scenes per split (val, test) for the exact tests
N_NOISY = max(N // 3, 40)  # (both splits together)  # scenes per degradation level


def pil_render(scene: Scene, rng: np.random.Generator, supersample: int = 1, background: str | None = None):
    """An independent renderer from the spec, with PIL's own primitives: colours jittered by ±15 per
    channel here (not the scene's rgb), hard edges (supersample 1) or anti-aliased by drawing at
    ``supersample``× and box-filtering down.  Only the layout (shape, colour, extent, corner) is
    taken from the scene."""
    s = supersample
    img = Image.new("RGB", (64 * s, 64 * s), BACKGROUNDS[background or scene.background])
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        c = tuple(int(v) for v in np.clip(np.array(COLORS[o.color]) + rng.integers(-15, 16, 3), 0, 255))
        x0, y0 = o.x0 * s, o.y0 * s
        e = o.extent * s
        x1, y1 = x0 + e - 1, y0 + e - 1  # PIL's boxes include their last pixel
        mx, my = (x0 + x1) / 2, (y0 + y1) / 2
        if o.shape == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=c)
        elif o.shape == "square":
            draw.rectangle([x0, y0, x1, y1], fill=c)
        elif o.shape == "triangle":
            draw.polygon([(mx, y0), (x1, y1), (x0, y1)], fill=c)
        elif o.shape == "diamond":
            draw.polygon([(mx, y0), (x1, my), (mx, y1), (x0, my)], fill=c)
        else:  # cross: arms round(extent / 3) wide, centred as well as whole pixels allow
            arm = round(e / 3)
            a0 = (e - arm) // 2
            draw.rectangle([x0 + a0, y0, x0 + a0 + arm - 1, y1], fill=c)
            draw.rectangle([x0, y0 + a0, x1, y0 + a0 + arm - 1], fill=c)
    return img.resize((64, 64), Image.BOX) if s > 1 else img


def degrade(image, blur: float, noise: float, rng: np.random.Generator, drift: float = 0) -> Image.Image:
    """What a generator's output may look like: Gaussian blur (σ px), colour drift (every object
    pixel's colour shifted by one random offset of up to ±``drift`` per channel, on top of the
    spec's ±15 jitter) and Gaussian pixel noise (σ)."""
    a = np.asarray(image).astype(np.float64)
    if blur:
        a = ndimage.gaussian_filter(a, (blur, blur, 0))
    if drift:
        a = a + rng.uniform(-drift, drift, 3) * (np.abs(a - a[0, 0]).max(axis=-1, keepdims=True) > 30)
    if noise:
        a = a + rng.normal(0, noise, a.shape)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))


def scenes(n: int = N):
    return [make_scene(split, i) for split in ("val", "test") for i in range(n)]


def score(scene: Scene, reading, box_tol: int = 1) -> dict:
    """Per-scene agreement: each true object matched to the read object nearest its centre."""
    truth, read = scene.objects, reading.objects
    ok_objects = 0
    for o in truth:
        if not read:
            break
        r = min(read, key=lambda q: (q.centre[0] - o.centre[0]) ** 2 + (q.centre[1] - o.centre[1]) ** 2)
        same = (r.shape, r.color, r.size) == (o.shape, o.color, o.size)
        ok_objects += same and max(abs(a - b) for a, b in zip(r.box, o.box)) <= box_tol
    exact = len(read) == len(truth) == ok_objects and reading.background == scene.background
    return {"objects": len(truth), "ok": ok_objects, "exact": exact, "unreadable": reading.unreadable}


def report(name: str, rows: list[dict]) -> dict:
    n = len(rows)
    objs, ok = sum(r["objects"] for r in rows), sum(r["ok"] for r in rows)
    readable = [r for r in rows if not r["unreadable"]]
    out = {"scenes": n, "exact": sum(r["exact"] for r in rows) / n, "objects": ok / objs,
           "unreadable": 1 - len(readable) / n,
           "exact_if_readable": sum(r["exact"] for r in readable) / len(readable) if readable else None}
    print(f"\n[reader] {name}: {n} scenes, {objs} objects: scenes exact {out['exact']:.3f}, objects exact "
          f"{out['objects']:.3f}, flagged unreadable {out['unreadable']:.3f}, exact when not flagged "
          f"{out['exact_if_readable'] if out['exact_if_readable'] is None else round(out['exact_if_readable'], 3)}")
    return out


# ----------------------------------------------------------------------------------------------
# exact on rendered scenes


def test_reads_our_renders_exactly():
    rows = []
    for s in scenes():
        reading = read_image(render(s))
        rows.append(score(s, reading, box_tol=0))  # the boxes are exact, not just within 1 px
        assert not reading.unreadable, (s.seed, reading.to_dict())
    r = report("our renderer (val+test)", rows)
    assert r["exact"] == 1.0


@pytest.mark.parametrize("supersample", [1, 4], ids=["hard-edges", "antialiased"])
@pytest.mark.parametrize("background", ["black", "gray"])
def test_reads_an_independent_pil_renderer_exactly(supersample, background):
    rng = np.random.default_rng(7)
    rows, flagged = [], 0
    for s in scenes(N // 2):
        reading = read_image(pil_render(s, rng, supersample, background))
        rows.append(score(Scene(s.objects, background), reading))
        flagged += reading.unreadable
    r = report(f"PIL renderer, {'hard edges' if supersample == 1 else 'anti-aliased'}, {background}", rows)
    assert r["exact"] == 1.0
    # hard-edged small circles are octagons: the reader reads them right and may say it is unsure
    assert flagged <= (0.05 * len(rows) if supersample == 1 else 0)


def test_every_shape_color_and_extent_on_both_backgrounds():
    rng = np.random.default_rng(3)
    for bg in BACKGROUNDS:
        for shape in SHAPES:
            for color in COLORS:
                for k, extent in enumerate((8, 11, 16, 22)):  # the ends of both size ranges
                    size = "small" if extent < 13 else "large"
                    obj = ShapeObject(shape, color, size, extent, int(rng.integers(1, 41)), int(rng.integers(1, 41)))
                    scene = Scene([obj], bg)
                    image = render(scene) if k % 2 else pil_render(scene, rng, 1 + 3 * (color < "p"))
                    (r,) = read_scene(image)
                    assert (r.shape, r.color, r.size) == (shape, color, size), (bg, obj, r)
                    assert max(abs(a - b) for a, b in zip(r.box, obj.box)) <= 1, (obj.box, r.box)


def test_canonical_questions_answered_from_the_pixels():
    n = 0
    for s in scenes(N // 3):
        seen = read_image(render(s)).to_scene()
        for qa in qa_pairs(s):
            if qa["type"] != "describe":
                assert answer_question(seen, qa["question"]) == qa["answer"], (s.seed, qa)
                n += 1
    assert n > 300


# ----------------------------------------------------------------------------------------------
# robust on generated-looking images

LEVELS = [  # blur σ px, noise σ, colour drift; least share of scenes read exactly, and exactly when not flagged
    (0.5, 0, 0, 0.98, 0.99),
    (0.8, 0, 0, 0.95, 0.98),
    (1.0, 0, 0, 0.95, 0.98),
    (1.5, 0, 0, 0.90, 0.95),  # heavy: many objects flagged, few wrong
    (0, 10, 0, 0.98, 0.99),
    (0, 20, 0, 0.95, 0.99),
    (0, 30, 0, 0.90, 0.97),
    (0.8, 10, 0, 0.90, 0.97),
    (0, 0, 25, 0.95, 0.97),  # beyond the spec's jitter: orange drifts towards yellow
]


@pytest.mark.parametrize("blur,noise,drift,least,least_readable", LEVELS)
def test_blur_noise_and_drift(blur, noise, drift, least, least_readable):
    rng = np.random.default_rng(1)
    rows = [score(s, read_image(degrade(render(s), blur, noise, rng, drift)), box_tol=2)
            for s in scenes(N_NOISY // 2)]
    r = report(f"blur {blur} noise {noise} drift {drift}", rows)
    assert r["exact"] >= least and r["exact_if_readable"] >= least_readable


def test_odd_input_is_reported_not_raised():
    rng = np.random.default_rng(0)
    odd = {
        "uniform noise": rng.integers(0, 256, (64, 64, 3)).astype(np.uint8),
        "white": np.full((64, 64, 3), 255, np.uint8),
        "empty black": np.zeros((64, 64, 3), np.uint8),
        "tiny": np.zeros((2, 2, 3), np.uint8),
        "not an image": "abc",
        "none": None,
    }
    for name, image in odd.items():
        reading = read_image(image)
        assert reading.unreadable and reading.confidence == 0.0 and reading.objects == [], name
        assert reading.to_dict()["unreadable"] is True
    # an off-palette object (gray on black) is read but flagged; so is a heavily blurred scene's doubt
    grey = Image.new("RGB", (64, 64))
    ImageDraw.Draw(grey).rectangle([10, 10, 27, 27], fill=(120, 120, 120))
    (o,) = read_scene(grey)
    assert o.issues and o.confidence < 0.5 and "colour" in o.issues[0]
    # other sizes and layouts: a 256×256 upscale, a channels-first float array in [-1, 1]
    s = make_scene("test", 3)
    want = [o.name for o in read_scene(render(s))]
    assert [o.name for o in read_scene(render(s).resize((256, 256), Image.BICUBIC))] == want
    chw = np.asarray(render(s)).transpose(2, 0, 1).astype(np.float32) / 127.5 - 1
    assert [o.name for o in read_scene(chw)] == want


def test_touching_objects_blurred_together_are_split():
    a = ShapeObject("square", "red", "large", 16, 10, 20)
    b = ShapeObject("circle", "blue", "large", 16, 28, 20)  # 2 px gap, the least the spec allows
    s = Scene([a, b], "gray")
    reading = read_image(degrade(render(s), 1.0, 0, np.random.default_rng(0)))
    assert sorted(o.name for o in reading.objects) == sorted(o.name for o in s.objects)


# ----------------------------------------------------------------------------------------------
# faithfulness


def test_parse_request_and_forms():
    r = parse_request("Draw a large red circle above a small blue square.")
    assert r.objects == [("large", "red", "circle"), ("small", "blue", "square")]
    assert r.relation == Relation(0, "above", 1)
    assert parse_request("a small green cross to the left of a large white diamond").relation.rel == "left"
    assert parse_request("Draw two things: a large red circle and a small blue square").relation is None
    assert parse_request("a green hexagon").objects == []
    same = as_request({"objects": ["large red circle", {"size": "small", "color": "blue", "shape": "square"}],
                       "relation": {"a": {"color": "blue", "shape": "square"}, "rel": "below", "b": 0}})
    assert same.objects == r.objects and same.relation == Relation(1, "below", 0)


def test_faithfulness_of_drawn_images():
    s = Scene([ShapeObject("circle", "red", "large", 18, 10, 5), ShapeObject("square", "blue", "small", 10, 30, 40)])
    reading = read_image(render(s))
    ok = faithfulness(reading, "Draw a large red circle above a small blue square.")
    assert ok["faithful"] and ok["relation"] is True and ok["readable"] and ok["f1"] == 1.0
    wrong_rel = faithfulness(reading, "Draw a large red circle below a small blue square.")
    assert not wrong_rel["faithful"] and wrong_rel["relation"] is False and wrong_rel["objects"]
    wrong_shape = faithfulness(reading, ["large red circle", "small blue circle"])
    assert not wrong_shape["faithful"] and wrong_shape["count"] and wrong_shape["color"] and wrong_shape["size"]
    assert not wrong_shape["shape"] and wrong_shape["missing"] == ["small blue circle"]
    assert wrong_shape["extra"] == ["small blue square"] and wrong_shape["f1"] == 0.5
    too_many = faithfulness(reading, ["large red circle"])
    assert not too_many["count"] and too_many["recall"] == 1.0 and too_many["precision"] == 0.5
    # rendered scenes are faithful to themselves (their own objects, and a relation that holds)
    results = []
    for sc in scenes(N // 5):
        req = {"objects": sc.objects}
        if len(sc.objects) >= 2:
            a, b = sc.objects[:2]
            dx, dy = b.centre[0] - a.centre[0], b.centre[1] - a.centre[1]
            rel = ("left" if dx > 0 else "right") if abs(dx) > abs(dy) else ("above" if dy > 0 else "below")
            if max(abs(dx), abs(dy)) > 4:
                req["relation"] = {"a": 0, "rel": rel, "b": 1}
        results.append(faithfulness(read_image(render(sc)), req))
    summary = summarize(results)
    assert summary["faithful"] == 1.0 and summary["relation"] == 1.0 and summary["relation_n"] > 0


def test_story_consistency_on_rendered_edits():
    rng = rng_for(99, 5)
    n = 0
    for i in range(25):
        scene = sample_scene(10_000 + i)
        for kind in ("add", "remove", "recolor", "resize", "move"):
            edit = make_edit(scene, kind, rng)
            if edit is None:
                continue
            before, after = read_scene(render(edit["before"])), read_scene(render(edit["after"]))
            good = story_consistency(before, after, edit, position_tol=1)
            assert good["consistent"] and good["carried"] == 1.0, (kind, good)
            unchanged = story_consistency(before, before, edit)
            assert not unchanged["edit_applied"], kind
            n += 1
    assert n > 60
