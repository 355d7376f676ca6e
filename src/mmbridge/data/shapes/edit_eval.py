"""Instruction edits, model-free: which instructions the world can do, the chat turns that train the act
head's `[EDIT]` route, and the score of an edited image read back by the world reader
(:mod:`mmbridge.data.shapes.reader`) — issue 16's edit evaluation.

An edited image is **correct** when, read back, it equals the requested result:

* ``objects``: the (size, color, shape) triples read equal the edited scene's, as a multiset (count too);
* ``untouched``: every object the edit does not name is still there, same triple, centre within
  ``position_tol`` px of where it was;
* ``edit_applied``: the named object changed as asked — recoloured / resized in place (centre within
  ``position_tol``), moved into the named region, added in the named region, or gone.

The world reader reads the world's own render of the edited scene exactly, so an oracle editor
scores 1.0 (the tests check it).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

from .annotations import region
from .edits import EDIT_KINDS
from .world import COLORS, SHAPES, SIZES

POSITION_TOL = 3.0  # px (world pixels) an untouched object may drift and still count as kept

#: what the act head's `[EDIT]` route can do, said when an instruction asks for something else
CAN_DO = (f"I can recolour ({', '.join(COLORS)}), resize ({' or '.join(SIZES)}), move, add or remove a shape "
          f"(a {', '.join(SHAPES)})")
_VERBS = {"recolor": ("recolor", "recolour", "paint", "colour", "color", "turn", "make", "change"),
          "resize": ("make", "turn", "change", "resize", "grow", "shrink", "enlarge"),
          "move": ("move", "shift", "put", "place", "slide", "drag"),
          "add": ("add", "put", "place", "draw", "insert"),
          "remove": ("remove", "delete", "erase", "take", "drop", "get rid")}
_SIZE_WORDS = {"small": "small", "smaller": "small", "tiny": "small", "large": "large", "larger": "large",
               "big": "large", "bigger": "large"}
_REGION_WORDS = {"left", "right", "top", "bottom", "centre", "center", "middle", "up", "down"}
#: properties and things ShapesWorld lacks (docs/world.md): asked for, the answer says so
_LACKS = ("transparent", "translucent", "invisible", "see-through", "opaque", "glowing", "shiny", "striped",
          "dotted", "spotted", "blurry", "blurred", "3d", "hexagon", "hexagonal", "pentagon", "pentagonal", "star",
          "heart", "oval", "ellipse", "rectangle", "rectangular", "octagon", "arrow", "rotate", "rotated",
          "rotating", "spin", "flip", "mirror", "tilt", "bend", "rainbow", "gradient", "outline", "hollow",
          "pink", "brown", "black", "gray", "grey", "magenta", "violet", "gold", "silver")


def edit_instruction_issue(instruction: str) -> str | None:
    """None when ShapesWorld can do the edit ``instruction`` asks for (recolour, resize, move, add,
    remove one shape); otherwise one clear sentence saying why not and what can be done."""
    low = instruction.lower()
    words = re.findall(r"[a-z0-9-]+", low)
    lacking = [w for w in words if w in _LACKS]
    if lacking:
        return f'I cannot do that edit: ShapesWorld has nothing "{lacking[0]}". {CAN_DO}.'
    if not words:
        return f"There is no instruction to follow. {CAN_DO}."
    colors = [w for w in words if w in COLORS]
    sizes = [w for w in words if w in _SIZE_WORDS]
    shapes = [w for w in words if w in SHAPES or w[:-1] in SHAPES or w[:-2] in SHAPES
              or w in ("it", "shape", "shapes", "object", "one", "them")]
    verb = next((kind for kind in EDIT_KINDS if any(re.search(rf"\b{v}\b", low) for v in _VERBS[kind])), None)
    if verb is None:
        return f"That is not an edit I can make. {CAN_DO}."
    if not shapes:
        return f"Which shape? {CAN_DO}."
    if verb in ("recolor", "resize") and words[0] in ("make", "turn", "change") and not (colors or sizes):
        return f"A shape can only become another colour or size. {CAN_DO}."
    if verb == "move" and not (_REGION_WORDS & set(words)):
        return "Move it where? Name a place: left, right, top, bottom, a corner or the centre."
    return None


def edit_messages(edit: dict, source=None, target=None) -> list[dict]:
    """The chat turns of one edit pair (:func:`mmbridge.data.shapes.edits.edit_pair`): the user sends the
    image and the instruction, the assistant answers with the `[EDIT]` route, whose target is the edited
    image, its source and the instruction as the text the editor's mapper is pulled towards
    (`write_edit_data`'s records hold the same). ``source`` / ``target`` default to the world's renders of
    the two scenes."""
    source = source if source is not None else edit["before"].render()
    target = target if target is not None else edit["after"].render()
    return [{"role": "user", "content": [{"type": "image", "image": source},
                                         {"type": "text", "text": edit["instruction"]}]},
            {"role": "assistant", "content": [{"type": "head", "head": "[EDIT]",
                                               "target": {"image": target, "source": source,
                                                          "caption": edit["instruction"]}}]}]


#: instructions the world cannot do, for refusal turns in the `[EDIT]` training mix
IMPOSSIBLE_EDITS = ("Make it transparent.", "Turn the square into a hexagon.", "Make the circle glow.",
                    "Rotate the triangle.", "Make the cross striped.", "Add a pink star.", "Make it 3D.",
                    "Flip the image.", "Make the diamond see-through.", "Draw a rainbow behind the shapes.")


def refusal_messages(instruction: str, image) -> list[dict]:
    """A refusal turn: an instruction the world cannot do, answered in words (no `[EDIT]`)."""
    reason = edit_instruction_issue(instruction) or f"I cannot do that edit. {CAN_DO}."
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": instruction}]},
            {"role": "assistant", "content": reason}]


def _triple(o) -> tuple[str, str, str]:
    return (o.size, o.color, o.shape)


def _near(a, b, tol: float) -> bool:
    return max(abs(a.centre[0] - b.centre[0]), abs(a.centre[1] - b.centre[1])) <= tol


def _one(objects: list, triple) -> object | None:
    hits = [o for o in objects if _triple(o) == triple]
    return hits[0] if len(hits) == 1 else None


def edit_score(read, edit: dict, position_tol: float = POSITION_TOL) -> dict:
    """Score one edited image. ``read``: a :class:`~mmbridge.data.shapes.reader.Reading` (or its
    objects); ``edit``: ``{"kind", "target", "before", "after"}`` as :func:`~mmbridge.data.shapes.edits.make_edit`
    returns it (``target`` indexes ``before``; for add, ``after``). Returns ``correct``, ``objects``,
    ``untouched``, ``edit_applied``, ``kept`` (fraction of untouched objects kept), ``readable``,
    ``missing`` / ``extra`` (triples) and ``moved`` (untouched objects found but displaced). ``read`` None
    (no image came back) scores all false, ``no_image`` true."""
    kind, i = edit["kind"], edit["target"]
    before, after = edit["before"].objects, edit["after"].objects
    if kind not in EDIT_KINDS:
        raise ValueError(f"unknown edit kind {kind!r}; known: {list(EDIT_KINDS)}")
    if read is None:  # the model answered without an image
        return {"correct": False, "objects": False, "untouched": False, "edit_applied": False, "kept": 0.0,
                "readable": False, "kind": kind, "no_image": True, "missing": [" ".join(_triple(o)) for o in after],
                "extra": [], "moved": []}
    objects = list(read.objects) if hasattr(read, "objects") else list(read)
    got, want = Counter(map(_triple, objects)), Counter(map(_triple, after))
    untouched = [o for j, o in enumerate(before) if kind == "add" or j != i]
    kept, moved = 0, []
    for o in untouched:
        match = _one(objects, _triple(o))
        if match is not None and _near(match, o, position_tol):
            kept += 1
        elif match is not None:
            moved.append(" ".join(_triple(o)))
    if kind == "remove":
        gone = before[i]
        applied = not any((o.color, o.shape) == (gone.color, gone.shape) for o in objects)
    else:
        new = after[i]
        match = _one(objects, _triple(new))
        if match is None:
            applied = False
        elif kind in ("add", "move"):
            applied = region(match) == region(new)
        else:  # recolor, resize: in place
            applied = _near(match, before[i], position_tol)
    readable = not getattr(read, "unreadable", False) and not any(getattr(o, "issues", None) for o in objects)
    all_kept = kept == len(untouched)
    return {"correct": bool(got == want and all_kept and applied), "objects": got == want, "untouched": all_kept,
            "edit_applied": bool(applied), "kept": kept / len(untouched) if untouched else 1.0,
            "readable": readable, "kind": kind, "no_image": False,
            "missing": [" ".join(t) for t in (want - got).elements()],
            "extra": [" ".join(t) for t in (got - want).elements()], "moved": moved}


def summarize_edits(results: Iterable[dict]) -> dict:
    """Rates over many :func:`edit_score` results: ``accuracy`` (correct edits over all requests),
    ``objects`` / ``untouched`` / ``edit_applied`` / ``readable`` rates, mean ``kept``, ``no_image``
    (requests answered without an image), per-kind ``n`` and accuracy, and ``n``."""
    results = list(results)
    n = len(results)
    out: dict = {"n": n, "no_image": sum(bool(r["no_image"]) for r in results)}
    for k in ("correct", "objects", "untouched", "edit_applied", "readable"):
        out["accuracy" if k == "correct" else k] = sum(bool(r[k]) for r in results) / n if n else 0.0
    out["kept"] = sum(r["kept"] for r in results) / n if n else 0.0
    by_kind: dict[str, list] = {}
    for r in results:
        by_kind.setdefault(r["kind"], []).append(bool(r["correct"]))
    out["per_kind"] = {k: {"n": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(by_kind.items())}
    return out
