"""Captions, canonical questions, referring expressions, conversations and the text corpus."""

import re

import pytest

from mmbridge.data.shapes.annotations import (
    RELATIONS,
    QSpec,
    annotate,
    answer,
    answer_question,
    askable,
    conversation,
    corpus_line,
    description,
    parse_question,
    qa_pairs,
    referring_expressions,
    short_caption,
    text_corpus,
)
from mmbridge.data.shapes.metrics import caption_triple_f1, parse_triples
from mmbridge.data.shapes.world import COLORS, SHAPES, Scene, ShapeObject, make_scene, relation

SCENES = [make_scene("val", i) for i in range(150)]

C, S = "|".join(COLORS), "|".join(SHAPES)
CANONICAL_FORMS = [  # docs/world.md, verbatim
    r"How many shapes are there\?",
    rf"What color is the ({S})\?",
    rf"What shape is the ({C}) object\?",
    rf"Is there a ({C}) ({S})\?",
    rf"What size is the ({C}) ({S})\?",
    rf"Is the ({C}) ({S}) to the left of the ({C}) ({S})\?",
    rf"Is the ({C}) ({S}) to the right of the ({C}) ({S})\?",
    rf"Is the ({C}) ({S}) above the ({C}) ({S})\?",
    rf"Is the ({C}) ({S}) below the ({C}) ({S})\?",
    r"Describe the image\.",
]


def test_every_canonical_form_is_produced_verbatim():
    seen = set()
    for s in SCENES:
        for qa in qa_pairs(s):
            assert qa["canonical"]
            forms = [k for k, f in enumerate(CANONICAL_FORMS) if re.fullmatch(f, qa["question"])]
            assert len(forms) == 1, qa["question"]
            seen.add(forms[0])
            assert parse_question(qa["question"]) is not None
            assert answer_question(s, qa["question"]) == qa["answer"]
    assert seen == set(range(len(CANONICAL_FORMS)))


def test_answers_are_lowercase_words_and_digits():
    for s in SCENES:
        for qa in qa_pairs(s, include_describe=False):
            a = qa["answer"]
            assert a == a.lower() and " " not in a
            if qa["type"] == "count":
                assert a == str(len(s.objects))
            if qa["type"] in ("exists", "relation"):
                assert a in ("yes", "no")


def test_question_conditions():
    for s in SCENES:
        for qa in qa_pairs(s):
            q = parse_question(qa["question"])
            if q.type == "color":
                assert len(s.find(shape=q.shape)) == 1
            if q.type == "shape":
                assert len(s.find(color=q.color)) == 1
            if q.type == "relation":
                a, b = s.find(q.color, q.shape)[0], s.find(q.color2, q.shape2)[0]
                assert relation(a, b, RELATIONS[q.rel][1]) != 0  # margin holds one way or the other
    # a relation inside the margin is not askable
    a = ShapeObject("circle", "red", "small", 8, 10, 10)
    b = ShapeObject("square", "blue", "small", 8, 13, 40)
    s = Scene([a, b])
    assert answer(s, QSpec("relation", "red", "circle", "left", "blue", "square")) is None
    assert answer(s, QSpec("relation", "red", "circle", "above", "blue", "square")) == "yes"
    assert answer(s, QSpec("relation", "blue", "square", "above", "red", "circle")) == "no"
    # two circles: "What color is the circle?" must not be asked
    s2 = Scene([a, ShapeObject("circle", "blue", "small", 8, 40, 40)])
    assert answer(s2, QSpec("color", shape="circle")) is None
    assert all(q.type != "color" or q.shape != "circle" for q in askable(s2)["color"])


def test_yes_no_balance():
    answers = [qa["answer"] for s in SCENES for qa in qa_pairs(s) if qa["type"] in ("exists", "relation")]
    assert 0.45 < answers.count("yes") / len(answers) < 0.55


def test_varied_phrasings_are_flagged():
    qas = [qa for s in SCENES[:40] for qa in qa_pairs(s, varied=True)]
    varied = [qa for qa in qas if not qa["canonical"]]
    assert varied and all(parse_question(qa["question"]) is None for qa in varied)
    assert all(parse_question(qa["question"]) for qa in qas if qa["canonical"])


def _solve_from_text(desc: str, question: str) -> str:
    """A text-only reader: answers a canonical question using only the description."""
    objs = [t for t in _mentions(desc)]
    q = parse_question(question)
    if q.type == "count":
        return re.search(r"There (?:is|are) (\d+) shape", desc)[1]
    if q.type == "color":
        return next(c for _, c, s in objs if s == q.shape)
    if q.type == "shape":
        return next(s for _, c, s in objs if c == q.color)
    if q.type == "exists":
        return "yes" if any((c, s) == (q.color, q.shape) for _, c, s in objs) else "no"
    if q.type == "size":
        return next(z for z, c, s in objs if (c, s) == (q.color, q.shape))
    facts = {}
    for m in re.finditer(rf"The \w+ ({C}) ({S}) is ([a-z ]+?) the \w+ ({C}) ({S})\.", desc):
        facts[(m[1], m[2], m[4], m[5])] = m[3].split(" and ")
    inverse = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    rel = {"left": "left of", "right": "right of", "above": "above", "below": "below"}[q.rel]
    axis = {"left of": "x", "right of": "x", "above": "y", "below": "y"}
    stated = facts.get((q.color, q.shape, q.color2, q.shape2)) or [
        inverse[r] for r in facts.get((q.color2, q.shape2, q.color, q.shape), [])]
    same_axis = [r for r in stated if axis[r] == axis[rel]]
    return "yes" if same_axis == [rel] else "no"


def _mentions(text):
    seen = []
    for t in re.findall(rf"(small|large) ({C}) ({S})", text):
        if t not in seen:
            seen.append(t)
    return seen


def test_description_answers_every_canonical_question_as_text():
    for s in SCENES:
        desc = description(s)
        assert caption_triple_f1(desc, s.objects) == 1.0
        for qa in qa_pairs(s, include_describe=False):
            assert _solve_from_text(desc, qa["question"]) == qa["answer"], (desc, qa)


def test_short_caption_names_every_object():
    for s in SCENES:
        cap = short_caption(s)
        assert parse_triples(cap) == {(o.size, o.color, o.shape) for o in s.objects}
        assert answer_question(s, "Describe the image.") == cap


def test_referring_expressions_are_unique():
    for s in SCENES[:60]:
        for ref in referring_expressions(s):
            o = s.objects[ref["object"]]
            assert ref["box"] == list(o.box)
            words = ref["expression"].split()
            matches = [p for p in s.objects if all(
                w in ("the", "object", "shape", "in", "at", "on") or w in (p.size, p.color, p.shape) for w in words)]
            if "shape" not in words:  # positional phrases are checked by construction
                assert matches == [o], ref


def test_conversation_and_corpus():
    s = SCENES[3]
    conv = conversation(s)
    assert [m["role"] for m in conv] == ["user", "assistant"] * 3
    recs = text_corpus(s)
    kinds = {r["kind"] for r in recs}
    assert kinds == {"description", "qa", "dialogue"}
    for r in recs:
        line = corpus_line(r)
        assert "\n" not in line and line
        if r["kind"] == "qa":
            assert line.endswith(f"Answer: {r['answer']}")
    ann = annotate(s)
    assert {"scene", "caption", "description", "qa", "referring", "conversation"} <= ann.keys()
    assert any(not qa["canonical"] for qa in ann["qa"])


@pytest.mark.parametrize("question", ["what color is the circle?", "Is there an orange circle?", "Hello"])
def test_non_canonical_text_is_not_parsed(question):
    assert parse_question(question) is None
