"""Faithfulness of a drawn image to its request, from the objects the world reader reads back
(:mod:`mmbridge.data.shapes.reader`): issue 14's draw evaluation.

A generated image counts (``faithful``) when the objects read back equal the request: the same count
and the same (size, color, shape) of every object as a multiset, and — when the request has one —
the requested relation holds between the two objects by the world's rule (box centres, 4 px margin).
Each attribute is also scored alone (``count``, ``shape``, ``color``, ``size`` as multisets), with the
triples' precision / recall / F1, so a report can say *what* a generator gets wrong.

Requests are written as in the draw prompts: ``parse_request("Draw a large red circle above a small
blue square.")``, or given as objects (dicts, world / read objects, ``"large red circle"`` strings),
or ``{"objects": [...], "relation": {"a": 0, "rel": "above", "b": 1}}``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .world import COLORS, RELATION_MARGIN, SHAPES, SIZES, Scene

RELATIONS = {"left": ("x", 1), "right": ("x", -1), "above": ("y", 1), "below": ("y", -1)}
_REL_WORDS = {"to the left of": "left", "left of": "left", "to the right of": "right", "right of": "right",
              "above": "above", "over": "above", "on top of": "above", "below": "below", "under": "below",
              "beneath": "below", "left": "left", "right": "right"}
Triple = tuple[str, str, str]  # (size, color, shape), as captions name objects


@dataclass(frozen=True)
class Relation:
    a: int  # index of the subject in the request's objects
    rel: str  # left | right | above | below (a is <rel> b)
    b: int


@dataclass
class Request:
    objects: list[Triple]
    relation: Relation | None = None

    @property
    def text(self) -> str:
        names = [" ".join(t) for t in self.objects]
        if self.relation:
            r = self.relation
            phrase = {"left": "to the left of", "right": "to the right of"}.get(r.rel, r.rel)
            return f"a {names[r.a]} {phrase} a {names[r.b]}"
        return ", ".join(f"a {n}" for n in names)


def request_for(scene: Scene, rng, relation_rate: float = 1.0) -> Request:
    """The draw request a scene answers: its objects in order and, for a 2-object scene, one relation
    that holds between them (with probability `relation_rate`; `rng` is a numpy Generator). The shape of
    the eval prompts (bench/draw_prompts.py) and of the generator's training captions."""
    objects = [(o.size, o.color, o.shape) for o in scene.objects]
    relation = None
    if len(objects) == 2 and (relation_rate >= 1 or rng.random() < relation_rate):
        held = [r for r in RELATIONS if relation_holds(scene.objects[0], scene.objects[1], r)]
        if held:
            relation = Relation(0, held[int(rng.integers(len(held)))], 1)
    return Request(objects, relation)


def draw_prompt_records(n: int, min_objects: int = 1, max_objects: int = 2, seed: int = 0) -> list[dict]:
    """`n` draw requests from test-split scenes of `min_objects`–`max_objects` objects (a relation when two):
    `{"prompt": "Draw a large red circle above a small blue square.", "objects": [...], "relation"?: {...}}`,
    the lines `mmbridge eval draw --prompts` reads and the faithfulness score compares against."""
    from .world import rng_for, sample_scene, scene_seed

    rng = rng_for(seed, stream=14)
    out = []
    for i in range(n):
        scene = sample_scene(scene_seed("test", i, seed), num_objects=int(rng.integers(min_objects, max_objects + 1)))
        request = request_for(scene, rng)
        record = {"prompt": f"Draw {request.text}.", "objects": [" ".join(t) for t in request.objects]}
        if request.relation:
            record["relation"] = {"a": 0, "rel": request.relation.rel, "b": 1}
        out.append(record)
    return out


def _triple(obj) -> Triple:
    if isinstance(obj, str):
        words = obj.lower().split()
        return (words[-3], words[-2], words[-1])
    if isinstance(obj, (tuple, list)):
        return tuple(obj)  # type: ignore[return-value]
    if isinstance(obj, dict):
        return (obj["size"], obj["color"], obj["shape"])
    return (obj.size, obj.color, obj.shape)


def _relation(rel, objects: list[Triple]) -> Relation | None:
    if rel is None or isinstance(rel, Relation):
        return rel
    if isinstance(rel, (tuple, list)):
        a, name, b = rel
    else:
        name = rel.get("rel") or rel.get("relation")
        a, b = rel.get("a", rel.get("subject", 0)), rel.get("b", rel.get("object", 1))

    def index(x):
        if isinstance(x, int):
            return x
        t = _triple(x) if not isinstance(x, dict) or "size" in x else (None, x["color"], x["shape"])
        return next(i for i, o in enumerate(objects) if o[1:] == t[1:] and (t[0] is None or o[0] == t[0]))

    name = _REL_WORDS.get(str(name).lower().strip(), str(name).lower().strip())
    if name not in RELATIONS:
        raise ValueError(f"unknown relation {name!r}; expected one of {sorted(RELATIONS)}")
    return Relation(index(a), name, index(b))


def as_request(requested) -> Request:
    """A :class:`Request` from a Request, a prompt string, a Scene, a list of objects, or a dict with
    ``objects`` and optional ``relation``."""
    if isinstance(requested, Request):
        return requested
    if isinstance(requested, str):
        return parse_request(requested)
    if isinstance(requested, Scene):
        return Request([_triple(o) for o in requested.objects])
    if isinstance(requested, dict):
        objects = [_triple(o) for o in requested["objects"]]
        return Request(objects, _relation(requested.get("relation"), objects))
    return Request([_triple(o) for o in requested])


_TRIPLE_RE = re.compile(r"\b({})\s+({})\s+({})e?s?\b".format("|".join(SIZES), "|".join(COLORS), "|".join(SHAPES)))
_REL_RE = re.compile("|".join(sorted((re.escape(w) for w in _REL_WORDS), key=len, reverse=True)))


def parse_request(text: str) -> Request:
    """The objects (``{size} {color} {shape}`` mentions, in order) and relation of a draw prompt, e.g.
    "Draw a large red circle above a small blue square." → 2 objects, red circle *above* blue square
    (a relation word between the first two mentions)."""
    low = text.lower()
    found = list(_TRIPLE_RE.finditer(low))
    objects = [(m[1], m[2], m[3]) for m in found]
    relation = None
    if len(found) >= 2:
        between = low[found[0].end():found[1].start()]
        m = _REL_RE.search(between)
        if m:
            relation = Relation(0, _REL_WORDS[m[0]], 1)
    return Request(objects, relation)


def _objects(read) -> list:
    """Objects with size/color/shape/centre from a Reading, a Scene or a list."""
    if hasattr(read, "objects"):
        return list(read.objects)
    return list(read)


def _find(objs: Sequence, t: Triple):
    """The read object for a requested triple: the one of that size, color and shape if exactly one,
    else the one of that color and shape if exactly one, else None."""
    for key in (lambda o: _triple(o) == t, lambda o: _triple(o)[1:] == t[1:]):
        hits = [o for o in objs if key(o)]
        if len(hits) == 1:
            return hits[0]
    return None


def relation_holds(a, b, rel: str, margin: float = RELATION_MARGIN) -> bool:
    """Whether ``a`` is ``rel`` (left/right/above/below) ``b`` by box centres with the world's margin."""
    axis, sign = RELATIONS[rel]
    i = 0 if axis == "x" else 1
    d = b.centre[i] - a.centre[i]
    return d > margin if sign > 0 else -d > margin


def faithfulness(read, requested, margin: float = RELATION_MARGIN) -> dict:
    """Score one drawn image.  ``read``: a :class:`~mmbridge.data.shapes.reader.Reading` (or its
    objects, or any objects with size/color/shape/centre); ``requested``: see :func:`as_request`.

    Returns ``faithful`` (count, triples as a multiset and the relation if requested all hold),
    ``count``/``shape``/``color``/``size`` (each attribute's multiset equal), ``objects`` (the triples'
    multiset equal), ``relation`` (True/False, None when not requested), ``readable`` (the reader had
    no doubts), triple ``precision``/``recall``/``f1``, and the ``missing`` / ``extra`` object names."""
    req = as_request(requested)
    objs = _objects(read)
    got = [_triple(o) for o in objs]
    want = req.objects

    def same(k: int) -> bool:
        return Counter(t[k] for t in got) == Counter(t[k] for t in want)

    hit = sum((Counter(got) & Counter(want)).values())
    precision = hit / len(got) if got else float(not want)
    recall = hit / len(want) if want else float(not got)
    rel = None
    if req.relation is not None:
        r = req.relation
        a, b = _find(objs, want[r.a]), _find(objs, want[r.b])
        rel = a is not None and b is not None and a is not b and relation_holds(a, b, r.rel, margin)
    count = len(got) == len(want)
    objects_ok = Counter(got) == Counter(want)
    readable = not getattr(read, "unreadable", False) and not any(getattr(o, "issues", None) for o in objs)
    return {
        "faithful": bool(count and objects_ok and rel is not False),
        "count": count, "shape": same(2), "color": same(1), "size": same(0), "objects": objects_ok,
        "relation": rel, "readable": readable,
        "requested": len(want), "read": len(got),
        "precision": precision, "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "missing": [" ".join(t) for t in (Counter(want) - Counter(got)).elements()],
        "extra": [" ".join(t) for t in (Counter(got) - Counter(want)).elements()],
    }


def summarize(results: Iterable[dict]) -> dict:
    """Rates over many :func:`faithfulness` results: ``faithful`` and each attribute's share of images,
    ``relation`` over the requests that had one, mean triple F1, ``readable`` share, and ``n``."""
    results = list(results)
    n = len(results)
    out: dict = {"n": n}
    for k in ("faithful", "count", "shape", "color", "size", "objects", "readable"):
        out[k] = sum(bool(r[k]) for r in results) / n if n else 0.0
    rel = [r["relation"] for r in results if r["relation"] is not None]
    out["relation"] = sum(rel) / len(rel) if rel else None
    out["relation_n"] = len(rel)
    out["f1"] = sum(r["f1"] for r in results) / n if n else 0.0
    return out


def story_consistency(prev_objects, objects, edit: dict, position_tol: float | None = None) -> dict:
    """Whether a story step's image follows from the previous one under ``edit``.

    ``edit``: a dict with ``kind`` (add | remove | recolor | resize | move) and, as
    :func:`mmbridge.data.shapes.edits.make_edit` returns them, ``before``/``after`` scenes and
    ``target`` (index of the edited object in ``before``; for add, in ``after``).  The objects read
    from the previous image other than the target must be carried over (same size, color, shape; and
    centre within ``position_tol`` px when given); the edit itself must show: the added object
    present, the removed one gone, the recoloured one in its new colour only, the resized one in its
    new size, the moved one elsewhere (centre ≥ 5 px away).  Returns ``consistent``, ``carried``
    (fraction of the previous objects carried over), ``edit_applied`` and ``missing``."""
    prev, now = _objects(prev_objects), _objects(objects)
    kind = edit["kind"]
    before = edit["before"].objects if "before" in edit else None
    after = edit["after"].objects if "after" in edit else None
    target = edit.get("target")
    old = before[target] if before is not None and kind != "add" else None
    new = after[target] if after is not None and kind != "remove" else None
    old_key = (old.color, old.shape) if old is not None else None

    carried, missing = 0, []
    keep = [o for o in prev if (o.color, o.shape) != old_key]
    for o in keep:
        match = _find(now, _triple(o))
        ok = match is not None and _triple(match) == _triple(o)
        if ok and position_tol is not None:
            ok = max(abs(match.centre[0] - o.centre[0]), abs(match.centre[1] - o.centre[1])) <= position_tol
        carried += ok
        if not ok:
            missing.append(" ".join(_triple(o)))
    present = {_triple(o) for o in now}
    pairs = {t[1:] for t in present}
    if kind == "add":
        applied = new is not None and _triple(new) in present
    elif kind == "remove":
        applied = old_key not in pairs
    elif kind == "recolor":
        applied = old_key not in pairs and new is not None and _triple(new)[1:] in pairs
    elif kind == "resize":
        applied = new is not None and _triple(new) in present
    elif kind == "move":
        was = _find(prev, _triple(old)) if old is not None else None
        moved = _find(now, _triple(old)) if old is not None else None
        applied = was is not None and moved is not None and max(
            abs(moved.centre[0] - was.centre[0]), abs(moved.centre[1] - was.centre[1])) >= 5
    else:
        raise ValueError(f"unknown edit kind {kind!r}")
    frac = carried / len(keep) if keep else 1.0
    return {"consistent": bool(applied and carried == len(keep)), "carried": frac, "edit_applied": bool(applied),
            "missing": missing}
