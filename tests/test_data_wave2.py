"""Wave-2 sets: pose stick figures, edit pairs and stories keep their invariants."""

import numpy as np
import pytest

from mmbridge.data.shapes.edits import EDIT_KINDS, edit_pair, make_edit, make_story
from mmbridge.data.shapes.oracle import compare, read_scene
from mmbridge.data.shapes.pose import KEYPOINTS, pose_coverage, sample_pose
from mmbridge.data.shapes.world import Scene, make_scene, render, rng_for, scene_seed, spec_violations


def test_pose_figures():
    for i in range(40):
        p = sample_pose(scene_seed("train", i))
        assert set(KEYPOINTS) <= p.keypoints.keys()
        x0, y0, x1, y1 = p.box
        assert x0 >= 1 and y0 >= 1 and x1 <= 63 and y1 <= 63
        cov = pose_coverage(p)
        for name in KEYPOINTS:  # every keypoint lies on the drawn figure
            x, y = p.keypoints[name]
            assert cov[int(y), int(x)] > 0.2, name
            assert x0 <= x <= x1 and y0 <= y <= y1
        ys, xs = np.nonzero(cov > 0)
        assert xs.min() >= x0 and ys.min() >= y0 and xs.max() < x1 and ys.max() < y1
        # facing the viewer: the figure's left shoulder/hip are on the image's right
        assert p.keypoints["left_shoulder"][0] > p.keypoints["right_shoulder"][0]
        assert p.keypoints["left_hip"][0] > p.keypoints["right_hip"][0]
        assert p.keypoints["nose"][1] < p.keypoints["left_shoulder"][1] < p.keypoints["left_hip"][1]
        assert len(p.coco_keypoints()) == 3 * 17 and "stick figure" in p.caption()
    assert sample_pose(5).to_dict() == sample_pose(5).to_dict()


def _same(a, b):
    return a.to_dict() == b.to_dict()


@pytest.mark.parametrize("kind", EDIT_KINDS)
def test_edits_change_exactly_one_thing(kind):
    done = 0
    for i in range(40):
        before = make_scene("train", i)
        e = make_edit(before, kind, rng_for(i, 9))
        if e is None:
            continue
        done += 1
        after = e["after"]
        assert spec_violations(after) == []
        b, a, t = before.objects, after.objects, e["target"]
        if kind == "add":
            assert len(a) == len(b) + 1 and all(_same(x, y) for x, y in zip(b, a))
            assert a[t].name in e["instruction"]
        elif kind == "remove":
            assert len(a) == len(b) - 1 and b[t].color in e["instruction"]
            assert all(_same(x, y) for x, y in zip(b[:t] + b[t + 1:], a))
        else:
            assert len(a) == len(b)
            assert all(_same(x, y) for k, (x, y) in enumerate(zip(b, a)) if k != t)
            x, y = b[t], a[t]
            if kind == "recolor":
                assert x.color != y.color and (x.shape, x.box) == (y.shape, y.box) and y.color in e["instruction"]
            if kind == "move":
                assert (x.shape, x.color, x.extent) == (y.shape, y.color, y.extent) and x.box != y.box
            if kind == "resize":
                assert x.size != y.size and (x.shape, x.color) == (y.shape, y.color)
                assert max(abs(p - q) for p, q in zip(x.centre, y.centre)) <= 1
        # the after image shows what the after scene says
        assert compare(after, read_scene(render(after)))["exact"]
    assert done >= 10


def test_edit_pairs_cover_all_kinds_and_are_deterministic():
    kinds = {edit_pair("val", i)["kind"] for i in range(60)}
    assert kinds == set(EDIT_KINDS)
    assert edit_pair("val", 3)["after"].to_dict() == edit_pair("val", 3)["after"].to_dict()


def test_stories():
    for i in range(20):
        story = make_story("test", i, steps=3)
        assert len(story) == 3 and story[0]["text"].startswith("At first")
        assert all(s["text"].startswith("Then ") for s in story[1:])
        for prev, step in zip(story, story[1:]):
            assert isinstance(step["scene"], Scene) and spec_violations(step["scene"]) == []
            assert not _same(prev["scene"], step["scene"])
