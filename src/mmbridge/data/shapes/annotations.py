"""Language annotations of a ShapesWorld scene: captions, VQA, referring expressions, conversations and
the text-only corpus for pretraining the language model.

The canonical question forms (docs/world.md) are produced verbatim and can be parsed back
(:func:`parse_question`) and answered from any scene (:func:`answer`) — which is how the tests check
the rendered pixels against the questions, via the oracle.  The detailed description states every
fact a canonical question can ask (count, size/color/shape of every object and every pairwise
left/right/above/below relation that holds with the margin), so a language model can answer all
canonical questions from the description as text alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .world import COLORS, IMAGE_SIZE, SHAPES, Scene, ShapeObject, relation, rng_for

COUNT_WORDS = ("zero", "one", "two", "three", "four")
RELATIONS = {  # canonical phrase, axis, sign of relation() that makes it true
    "left": ("to the left of", "x", 1),
    "right": ("to the right of", "x", -1),
    "above": ("above", "y", 1),
    "below": ("below", "y", -1),
}
QUESTION_TYPES = ("count", "color", "shape", "exists", "size", "relation", "describe")


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def region(obj: ShapeObject) -> str:
    """Coarse position of the object's centre on a 3×3 grid: "top left", "centre", "bottom", …"""
    third = IMAGE_SIZE / 3
    cx, cy = obj.centre
    v = ("top", "", "bottom")[min(int(cy // third), 2)]
    h = ("left", "", "right")[min(int(cx // third), 2)]
    return f"{v} {h}".strip() or "centre"


def _at(obj: ShapeObject) -> str:
    r = region(obj)
    if r == "centre":
        return "in the centre"
    return f"on the {r}" if r in ("left", "right") else f"at the {r}"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def short_caption(scene: Scene) -> str:
    """One sentence naming every object as ``{size} {color} {shape}`` (the answer to "Describe the image.")."""
    names = [f"{article(o.size)} {o.name}" for o in scene.objects]
    text = f"{_join(names)} on a {scene.background} background."
    return text[0].upper() + text[1:]


def relation_facts(scene: Scene) -> list[str]:
    """One sentence per pair of objects that are apart by the margin on some axis."""
    facts = []
    objs = scene.objects
    for i in range(len(objs)):
        for j in range(i + 1, len(objs)):
            a, b = objs[i], objs[j]
            parts = []
            rx, ry = relation(a, b, "x"), relation(a, b, "y")
            if rx:
                parts.append("left of" if rx > 0 else "right of")
            if ry:
                parts.append("above" if ry > 0 else "below")
            if parts:
                facts.append(f"The {a.name} is {' and '.join(parts)} the {b.name}.")
    return facts


def description(scene: Scene) -> str:
    """Detailed description: count, every object with its coarse position, and the pairwise relations."""
    n = len(scene.objects)
    head = f"There {'is' if n == 1 else 'are'} {n} shape{'' if n == 1 else 's'} on a {scene.background} background: "
    items = [f"{article(o.size)} {o.name} {_at(o)}" for o in scene.objects]
    return " ".join([head + _join(items) + "."] + relation_facts(scene))


# ----------------------------------------------------------------------------------------------
# questions

TEMPLATES: dict[str, tuple[str, ...]] = {  # index 0 is the canonical form, verbatim from docs/world.md
    "count": ("How many shapes are there?", "How many objects are in the image?",
              "Count the shapes in the picture.", "What is the number of shapes?"),
    "color": ("What color is the {shape}?", "What is the color of the {shape}?",
              "Which color does the {shape} have?", "Tell me the color of the {shape}."),
    "shape": ("What shape is the {color} object?", "Which shape is {color}?",
              "What kind of shape is the {color} one?", "Name the shape of the {color} object."),
    "exists": ("Is there a {color} {shape}?", "Do you see {a} {color} {shape}?",
               "Does the image contain {a} {color} {shape}?", "Is {a} {color} {shape} visible?"),
    "size": ("What size is the {color} {shape}?", "Is the {color} {shape} small or large?",
             "How big is the {color} {shape}?"),
    "relation": ("Is the {color} {shape} {rel} the {color2} {shape2}?",
                 "Is the {color} {shape} located {rel} the {color2} {shape2}?",
                 "Looking at the image, is the {color} {shape} {rel} the {color2} {shape2}?"),
    "describe": ("Describe the image.", "What do you see?", "Describe the picture in one sentence.",
                 "What is in this image?"),
}


@dataclass(frozen=True)
class QSpec:
    """What a question asks, independent of its wording."""

    type: str
    color: str | None = None
    shape: str | None = None
    rel: str | None = None  # key of RELATIONS
    color2: str | None = None
    shape2: str | None = None

    def text(self, variant: int = 0) -> str:
        template = TEMPLATES[self.type][variant % len(TEMPLATES[self.type])]
        rel = RELATIONS[self.rel][0] if self.rel else ""
        if self.rel and variant and self.rel in ("left", "right"):
            rel = rel.removeprefix("to the ")  # "left of" — a common casual phrasing
        return template.format(color=self.color, shape=self.shape, rel=rel, color2=self.color2,
                               shape2=self.shape2, a=article(self.color or "x"))


def _one(scene: Scene, color: str | None, shape: str | None) -> ShapeObject | None:
    found = scene.find(color, shape)
    return found[0] if len(found) == 1 else None


def answer(scene: Scene, q: QSpec) -> str | None:
    """The answer to ``q`` on ``scene``, or None where the question must not be asked there."""
    if q.type == "count":
        return str(len(scene.objects))
    if q.type == "color":
        o = _one(scene, None, q.shape)
        return o.color if o else None
    if q.type == "shape":
        o = _one(scene, q.color, None)
        return o.shape if o else None
    if q.type == "exists":
        return "yes" if scene.find(q.color, q.shape) else "no"
    if q.type == "size":
        o = _one(scene, q.color, q.shape)
        return o.size if o else None
    if q.type == "relation":
        a, b = _one(scene, q.color, q.shape), _one(scene, q.color2, q.shape2)
        if a is None or b is None or a is b:
            return None
        _, axis, sign = RELATIONS[q.rel]
        r = relation(a, b, axis)
        return None if r == 0 else ("yes" if r == sign else "no")
    if q.type == "describe":
        return short_caption(scene)
    raise ValueError(f"unknown question type {q.type!r}")


_C, _S = "|".join(COLORS), "|".join(SHAPES)
_PARSERS = [
    (re.compile(r"How many shapes are there\?"), lambda m: QSpec("count")),
    (re.compile(rf"What color is the ({_S})\?"), lambda m: QSpec("color", shape=m[1])),
    (re.compile(rf"What shape is the ({_C}) object\?"), lambda m: QSpec("shape", color=m[1])),
    (re.compile(rf"Is there a ({_C}) ({_S})\?"), lambda m: QSpec("exists", m[1], m[2])),
    (re.compile(rf"What size is the ({_C}) ({_S})\?"), lambda m: QSpec("size", m[1], m[2])),
    (re.compile(rf"Is the ({_C}) ({_S}) (to the left of|to the right of|above|below) the ({_C}) ({_S})\?"),
     lambda m: QSpec("relation", m[1], m[2], {v[0]: k for k, v in RELATIONS.items()}[m[3]], m[4], m[5])),
    (re.compile(r"Describe the image\."), lambda m: QSpec("describe")),
]


def parse_question(text: str) -> QSpec | None:
    """The spec of a canonical question (exact wording), else None."""
    for pattern, build in _PARSERS:
        m = pattern.fullmatch(text.strip())
        if m:
            return build(m)
    return None


def answer_question(scene: Scene, text: str) -> str | None:
    """Answer a canonical question given as text (None: not canonical, or not askable on this scene)."""
    q = parse_question(text)
    return answer(scene, q) if q else None


def askable(scene: Scene, rng: np.random.Generator | None = None) -> dict[str, list[QSpec]]:
    """Every canonical question that may be asked about ``scene``, by type.  "exists" gets as many
    absent combinations (near misses: right color or right shape) as present ones."""
    rng = rng if rng is not None else rng_for(scene.seed or 0, 1)
    objs = scene.objects
    out: dict[str, list[QSpec]] = {t: [] for t in QUESTION_TYPES}
    out["count"].append(QSpec("count"))
    out["describe"].append(QSpec("describe"))
    for s in SHAPES:
        if len(scene.find(shape=s)) == 1:
            out["color"].append(QSpec("color", shape=s))
    for c in COLORS:
        if len(scene.find(color=c)) == 1:
            out["shape"].append(QSpec("shape", color=c))
    present = {(o.color, o.shape) for o in objs}
    near = sorted({(c2, s2) for c, s in present for c2 in COLORS for s2 in SHAPES
                   if (c2 == c) != (s2 == s)} - present)
    absent = [near[i] for i in rng.permutation(len(near))[: len(present)]]
    for c, s in [(o.color, o.shape) for o in objs] + absent:
        out["exists"].append(QSpec("exists", c, s))
    for o in objs:
        out["size"].append(QSpec("size", o.color, o.shape))
    for a in objs:
        for b in objs:
            if a is b:
                continue
            for rel, (_, axis, _) in RELATIONS.items():
                if relation(a, b, axis):
                    out["relation"].append(QSpec("relation", a.color, a.shape, rel, b.color, b.shape))
    return out


def qa_pairs(scene: Scene, rng: np.random.Generator | None = None, per_type: int | None = None,
             varied: bool = False, include_describe: bool = True) -> list[dict]:
    """VQA pairs: canonical wording unless ``varied`` (then a random phrasing, flagged
    ``canonical: False`` where it is not the canonical one).  ``per_type`` caps questions per type
    (a random subset)."""
    rng = rng if rng is not None else rng_for(scene.seed or 0, 1)
    out = []
    for qtype, specs in askable(scene, rng).items():
        if qtype == "describe" and not include_describe:
            continue
        if per_type is not None and len(specs) > per_type:
            specs = [specs[i] for i in sorted(rng.choice(len(specs), per_type, replace=False))]
        for q in specs:
            variant = int(rng.integers(len(TEMPLATES[qtype]))) if varied else 0
            out.append({"question": q.text(variant), "answer": answer(scene, q), "type": qtype,
                        "canonical": variant == 0})
    return out


def referring_expressions(scene: Scene) -> list[dict]:
    """Phrases that pick out exactly one object, with its box: the full name always, shorter ones
    (by shape, by color, by position) where they are unique in the scene."""
    out = []
    regions = [region(o) for o in scene.objects]
    for i, o in enumerate(scene.objects):
        phrases = [f"the {o.name}", f"the {o.color} {o.shape}"]
        if len(scene.find(shape=o.shape)) == 1:
            phrases.append(f"the {o.shape}")
        if len(scene.find(color=o.color)) == 1:
            phrases.append(f"the {o.color} object")
        if regions.count(regions[i]) == 1 and len(scene.objects) > 1:
            phrases.append(f"the shape {_at(o)}")
        out += [{"expression": p, "object": i, "box": list(o.box)} for p in phrases]
    return out


def conversation(scene: Scene, rng: np.random.Generator | None = None, turns: int = 3) -> list[dict]:
    """A multi-turn chat about the scene as ``[{"role": "user"|"assistant", "content": str}, …]``
    (first user turn is about the image; LLaVA writers prepend ``<image>``)."""
    rng = rng if rng is not None else rng_for(scene.seed or 0, 1)
    pool = qa_pairs(scene, rng, varied=True, include_describe=False)
    picks = [pool[i] for i in rng.permutation(len(pool))[: max(turns - 1, 1)]]
    opener = ("Describe the image.", short_caption(scene)) if rng.random() < 0.5 else (
        "Describe the image in detail.", description(scene))
    msgs = []
    for q, a in [opener] + [(p["question"], p["answer"]) for p in picks]:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return msgs[: 2 * turns]


def text_corpus(scene: Scene, rng: np.random.Generator | None = None, num_qa: int = 12) -> list[dict]:
    """Text-only records for pretraining the language model on this scene: the description, Q&A with
    the description as context (canonical and varied wording), and one dialogue."""
    rng = rng if rng is not None else rng_for(scene.seed or 0, 1)
    desc = description(scene)
    records = [{"kind": "description", "text": desc}]
    pool = qa_pairs(scene, rng, varied=False, include_describe=False)
    pool += qa_pairs(scene, rng, per_type=1, varied=True, include_describe=False)
    for i in rng.permutation(len(pool))[:num_qa]:
        records.append({"kind": "qa", "context": desc, "question": pool[i]["question"],
                        "answer": pool[i]["answer"]})
    records.append({"kind": "dialogue", "context": desc, "turns": conversation(scene, rng)})
    return records


def corpus_line(record: dict) -> str:
    """A corpus record as one line of plain text."""
    if record["kind"] == "description":
        return record["text"]
    if record["kind"] == "qa":
        return f"{record['context']} Question: {record['question']} Answer: {record['answer']}"
    turns = " ".join(f"{'User' if t['role'] == 'user' else 'Assistant'}: {t['content']}" for t in record["turns"])
    return f"{record['context']} {turns}"


def annotate(scene: Scene, rng: np.random.Generator | None = None) -> dict:
    """Everything about one scene in one JSON-serialisable dict (the ``key.json`` of a shard)."""
    rng = rng if rng is not None else rng_for(scene.seed or 0, 2)
    return {
        "scene": scene.to_dict(),
        "caption": short_caption(scene),
        "description": description(scene),
        "qa": qa_pairs(scene, rng) + qa_pairs(scene, rng, per_type=2, varied=True),
        "referring": referring_expressions(scene),
        "conversation": conversation(scene, rng),
    }
