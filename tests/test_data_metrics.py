"""Official-VQA-style answer normalisation and the caption triple F1."""

import pytest

from mmbridge.data.shapes.metrics import (
    caption_triple_f1,
    caption_triple_scores,
    normalize_answer,
    parse_triples,
    vqa_match,
)
from mmbridge.data.shapes.world import ShapeObject


@pytest.mark.parametrize("raw, norm", [
    ("Red", "red"), ("red.", "red"), (" The red ", "red"), ("Three", "3"), ("3", "3"), ("a circle!", "circle"),
    ("Yes, it is.", "yes it is"), ("dont", "don't"), ("1,000", "1000"), ("3.5", "3.5"), ("none", "0"),
    ("left-right", "left right"), ("an orange", "orange"),
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_vqa_match():
    assert vqa_match("Two.", "2") and vqa_match("YES", "yes") and not vqa_match("no", "yes")


OBJS = [ShapeObject("circle", "red", "small", 8, 1, 1), ShapeObject("square", "blue", "large", 16, 20, 20)]


def test_triple_f1():
    assert caption_triple_f1("A small red circle and a large blue square.", OBJS) == 1.0
    # repeated mentions count once; plural forms are read
    assert caption_triple_f1("small red circles, a small red circle, large blue squares", OBJS) == 1.0
    s = caption_triple_scores("A small red circle and a small green cross.", OBJS)
    assert s == {"precision": 0.5, "recall": 0.5, "f1": 0.5}
    assert caption_triple_f1("a red circle", OBJS) == 0.0  # size missing: not a triple
    assert caption_triple_f1("", [{"shape": "circle", "color": "red", "size": "small"}]) == 0.0
    assert parse_triples("LARGE WHITE DIAMOND") == {("large", "white", "diamond")}
