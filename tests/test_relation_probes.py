"""The relation probes' data (scripts/relation_probe.py, scripts/relation_synthetic.py) says what it claims:
their findings (docs/recipe.md, "the yes/no relation answer is a parity") rest on it."""

import importlib.util
import random
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).parents[1] / "scripts"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def facts_of(tokens: list[int], syn) -> set[tuple[int, int, int]]:
    start = 1  # after BOS
    end = tokens.index(syn.Q)
    body = tokens[start:end]
    return {tuple(body[i:i + 3]) for i in range(0, len(body), 4)}


@pytest.mark.parametrize("object_names", [False, True])
def test_synthetic_answers_follow_the_stated_facts(object_names):
    syn = load("relation_synthetic")
    rng = random.Random(0)
    for _ in range(300):
        choice = rng.random() < 0.5
        tokens, answer = syn.sample(rng, "both", 4, choice=1.0 if choice else 0.0, object_names=object_names)
        facts = facts_of(tokens, syn)
        question = tokens[tokens.index(syn.Q) + 1:tokens.index(syn.QMARK)]
        width = 1 if object_names else 2

        def obj(name):  # the object token a question's name stands for
            return name[0] if object_names else syn.obj_token(name[0] - syn.COLOR0, name[1] - syn.SHAPE0)

        a, b = obj(question[:width]), obj(question[-width:])
        if choice:
            assert question[width:width + 3] == [syn.LEFT, syn.OR, syn.RIGHT]
            assert answer == (syn.LEFT if (a, syn.LEFT, b) in facts else syn.RIGHT)
            assert ((a, syn.LEFT, b) in facts) != ((a, syn.RIGHT, b) in facts)  # every pair stated, one way
        else:
            asked = question[width]
            assert answer == (syn.YES if (a, asked, b) in facts else syn.NO)
            assert (b, syn.RIGHT if asked == syn.LEFT else syn.LEFT, a) in facts or answer == syn.NO


def test_synthetic_once_states_each_pair_one_way_and_answers_stay_balanced():
    syn = load("relation_synthetic")
    rng = random.Random(1)
    yes = 0
    for _ in range(400):
        tokens, answer = syn.sample(rng, "once", 4)
        facts = facts_of(tokens, syn)
        pairs = [frozenset((f[0], f[2])) for f in facts]
        assert len(pairs) == len(set(pairs))
        yes += answer == syn.YES
    assert 0.4 < yes / 400 < 0.6  # no answer prior to learn instead of the facts


def test_which_way_turns_agree_with_the_canonical_relation_answers():
    from mmbridge.data.shapes.annotations import QSpec, answer
    from mmbridge.data.shapes.world import make_scene

    probe = load("relation_probe")
    words = {"left": ("left", "right"), "right": ("left", "right"), "above": ("above", "below"),
             "below": ("above", "below")}
    checked = 0
    for i in range(40):
        scene = make_scene("val", i, 0)
        for question, reply in probe.choice_turns(scene, random.Random(i), 8):
            names = question.removeprefix("Is the ").removesuffix("?")
            first, second = (names.split(" to the left or to the right of the ") if " left or " in names
                             else names.split(" above or below the "))
            (c1, s1), (c2, s2) = first.split(), second.removeprefix("the ").split()
            assert reply in words
            for rel in words[reply]:
                expected = "yes" if rel == reply else "no"
                assert answer(scene, QSpec("relation", c1, s1, rel, c2, s2)) == expected
            checked += 1
    assert checked > 40
