"""The linear probes behind the foundation's vision gate and the bridges' soft-prompt check."""

import random

import torch

from mmbridge.data.shapes.world import COLORS, SHAPES
from mmbridge.pretrain.shapes import _probe_items, linear_probe


def test_linear_probe_reads_what_is_linear_and_not_noise():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (600,), generator=g)
    separable = torch.nn.functional.one_hot(labels, 4).float() + 0.1 * torch.randn(600, 4, generator=g)
    noise = torch.randn(600, 16, generator=g)
    assert linear_probe(separable[:400], labels[:400], separable[400:], labels[400:]) == 1.0
    assert linear_probe(noise[:400], labels[:400], noise[400:], labels[400:]) < 0.45  # chance: 0.25


def test_bound_probe_items_name_one_object_and_label_its_other_attribute():
    for kind in ("bound_color", "bound_shape"):
        items = _probe_items("val", 60, kind, random.Random(0))
        assert len(items) == 60
        for scene, question, label in items:
            assert len(scene.objects) >= 2
            if kind == "bound_color":
                shape = question.removeprefix("What color is the ").removesuffix("?")
                (obj,) = [o for o in scene.objects if o.shape == shape]
                assert label == list(COLORS).index(obj.color)
            else:
                color = question.removeprefix("What shape is the ").removesuffix(" object?")
                (obj,) = [o for o in scene.objects if o.color == color]
                assert label == SHAPES.index(obj.shape)
    single = _probe_items("val", 20, "single_color", random.Random(0))
    assert all(len(s.objects) == 1 and label == list(COLORS).index(s.objects[0].color) for s, _, label in single)
