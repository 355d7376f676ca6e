"""ShapesWorld v1 scenes and rendering follow docs/world.md exactly."""

import numpy as np
import pytest

from mmbridge.data.shapes.world import (
    BACKGROUNDS,
    COLORS,
    IMAGE_SIZE,
    MAX_JITTER,
    RELATION_MARGIN,
    SHAPES,
    SIZES,
    SPLITS,
    Scene,
    ShapeObject,
    boxes_apart,
    coverage_map,
    make_scene,
    relation,
    render,
    sample_scene,
    scene_seed,
    spec_violations,
    split_of_seed,
)

N = 300


@pytest.fixture(scope="module")
def scenes():
    return [make_scene("train", i) for i in range(N)]


def test_scenes_satisfy_spec(scenes):
    for s in scenes:
        assert spec_violations(s) == [], s
        assert 1 <= len(s.objects) <= 4
        assert s.background in BACKGROUNDS
        for o in s.objects:
            lo, hi = SIZES[o.size]
            assert lo <= o.extent <= hi
            x0, y0, x1, y1 = o.box
            assert x1 - x0 == y1 - y0 == o.extent
            assert x0 >= 1 and y0 >= 1 and x1 <= IMAGE_SIZE - 1 and y1 <= IMAGE_SIZE - 1
            assert all(abs(c - p) <= MAX_JITTER for c, p in zip(o.rgb, COLORS[o.color]))
        for i, a in enumerate(s.objects):
            for b in s.objects[:i]:
                gap_x = max(b.box[0] - a.box[2], a.box[0] - b.box[2])
                gap_y = max(b.box[1] - a.box[3], a.box[1] - b.box[3])
                assert max(gap_x, gap_y) >= 2
                assert (a.shape, a.color) != (b.shape, b.color)


def test_world_is_covered(scenes):
    # every count, shape, color, size and background actually occurs
    assert {len(s.objects) for s in scenes} == {1, 2, 3, 4}
    objs = [o for s in scenes for o in s.objects]
    assert {o.shape for o in objs} == set(SHAPES)
    assert {o.color for o in objs} == set(COLORS)
    assert {o.size for o in objs} == set(SIZES)
    assert {s.background for s in scenes} == set(BACKGROUNDS)
    extents = {o.extent for o in objs}
    assert {8, 11, 16, 22} <= extents and not extents & {12, 13, 14, 15}


def test_spec_violations_catch_bad_scenes():
    a = ShapeObject("circle", "red", "small", 10, 5, 5)
    assert spec_violations(Scene([a, ShapeObject("circle", "red", "large", 16, 30, 30)])) == [
        "objects 0,1: same shape and color"]
    assert "closer" in spec_violations(Scene([a, ShapeObject("square", "red", "small", 8, 16, 5)]))[0]
    assert spec_violations(Scene([a, ShapeObject("square", "red", "small", 8, 17, 5)])) == []
    assert "border" in spec_violations(Scene([ShapeObject("circle", "red", "small", 10, 0, 5)]))[0]
    assert "extent" in spec_violations(Scene([ShapeObject("circle", "red", "small", 13, 5, 5)]))[0]
    assert "5 objects" in spec_violations(Scene([a] * 5))


def test_boxes_apart_and_relation_margin():
    assert boxes_apart((0, 0, 10, 10), (12, 0, 20, 10)) and not boxes_apart((0, 0, 10, 10), (11, 0, 20, 10))
    a = ShapeObject("circle", "red", "small", 8, 10, 10)  # centre (14, 14)
    b = ShapeObject("square", "blue", "small", 8, 10 + RELATION_MARGIN, 30)  # centre x 18: not beyond margin
    c = ShapeObject("cross", "blue", "small", 8, 11 + RELATION_MARGIN, 30)  # centre x 19: beyond
    assert relation(a, b, "x") == 0 and relation(a, c, "x") == 1 and relation(c, a, "x") == -1
    assert relation(a, b, "y") == 1 and relation(b, a, "y") == -1


def test_deterministic_by_seed():
    assert make_scene("val", 7, 3).to_dict() == make_scene("val", 7, 3).to_dict()
    assert np.array_equal(np.asarray(make_scene("val", 7, 3).render()), np.asarray(make_scene("val", 7, 3).render()))
    assert make_scene("val", 7, 3).to_dict() != make_scene("val", 7, 4).to_dict()


def test_splits_never_share_a_seed():
    seeds = {sp: {scene_seed(sp, i, b) for i in range(2000) for b in (0, 1)} for sp in SPLITS}
    assert not seeds["train"] & seeds["val"] and not seeds["train"] & seeds["test"] and not seeds["val"] & seeds["test"]
    assert all(split_of_seed(s) == sp for sp in SPLITS for s in seeds[sp])
    # and the scenes differ too: same index in two splits gives different content
    same = sum(make_scene("train", i).to_dict()["objects"] == make_scene("test", i).to_dict()["objects"]
               for i in range(50))
    assert same == 0
    with pytest.raises(ValueError):
        scene_seed("dev", 0)


def test_roundtrip_dict():
    s = make_scene("test", 5)
    d = s.to_dict()
    assert Scene.from_dict(d).to_dict() == d
    assert d["objects"][0]["centre"] == list(s.objects[0].centre)
    import json

    json.dumps(d)  # JSON-serialisable


def test_render_is_antialiased_64_rgb_and_stays_in_boxes(scenes):
    for s in scenes[:60]:
        img = render(s)
        assert img.size == (64, 64) and img.mode == "RGB"
        arr = np.asarray(img).astype(int)
        bg = np.array(BACKGROUNDS[s.background])
        fg = np.abs(arr - bg).max(-1) > 0
        inside = np.zeros_like(fg)
        for o in s.objects:
            x0, y0, x1, y1 = o.box
            inside[y0:y1, x0:x1] = True
            ys, xs = np.nonzero(fg[y0:y1, x0:x1])
            # the drawn pixels span the annotated box exactly
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (0, 0, o.extent, o.extent)
            # interior pixels carry the object's (jittered) colour exactly
            assert (arr[y0:y1, x0:x1] == np.array(o.rgb)).all(-1).any()
        assert not (fg & ~inside).any()
    # edges are blended: some pixels are strictly between background and object colour
    cov = coverage_map(scenes[0].objects[0])
    assert ((cov > 0) & (cov < 1)).any()


def test_dense_scenes_can_be_sampled():
    for seed in range(20):
        s = sample_scene(seed + 10_000, num_objects=4)
        assert len(s.objects) == 4 and spec_violations(s) == []
