"""The classical oracle reads rendered scenes back exactly, so every canonical answer computed from
the scene matches what was drawn."""

import numpy as np
from PIL import Image

from mmbridge.data.shapes.annotations import answer_question, qa_pairs
from mmbridge.data.shapes.oracle import analyse, compare, read_scene
from mmbridge.data.shapes.world import COLORS, SHAPES, Scene, ShapeObject, make_scene, render

SCENES = [make_scene("test", i) for i in range(200)]


def test_oracle_reads_rendered_scenes_exactly():
    results = [compare(s, read_scene(render(s))) for s in SCENES]
    assert all(r["exact"] for r in results), [r for r in results if not r["exact"]][:3]


def test_every_canonical_answer_matches_the_pixels():
    # questions and answers come from the scene; the oracle's scene comes from the pixels only
    n = 0
    for s in SCENES:
        seen = read_scene(render(s))
        for qa in qa_pairs(s):
            if qa["type"] == "describe":
                continue
            assert answer_question(seen, qa["question"]) == qa["answer"], qa
            n += 1
    assert n > 2000


def test_every_shape_color_size_on_both_backgrounds():
    for bg in ("black", "gray"):
        for i, shape in enumerate(SHAPES):
            for j, color in enumerate(COLORS):
                for size, extent in (("small", 8), ("large", 22)):
                    obj = ShapeObject(shape, color, size, extent, 1 + 3 * i, 1 + 4 * j)
                    got = analyse(render(Scene([obj], bg)))
                    assert got.background == bg
                    (d,) = got.detections
                    assert (d.shape, d.color, d.size, d.box) == (shape, color, size, obj.box)


def test_oracle_tolerates_noise_and_foreign_images():
    rng = np.random.default_rng(0)
    s = SCENES[0]
    noisy = np.clip(np.asarray(render(s)).astype(int) + rng.integers(-4, 5, (64, 64, 3)), 0, 255).astype(np.uint8)
    r = compare(s, read_scene(Image.fromarray(noisy)))
    assert r["matched"] == r["truth"] and r["shape"] == r["color"] == r["size"] == r["truth"]
    assert analyse(Image.new("RGB", (64, 64))).detections == []
    big = render(s).resize((128, 128), Image.NEAREST)  # other sizes work, boxes scale
    assert [d.shape for d in analyse(big).detections] == [d.shape for d in analyse(render(s)).detections]
