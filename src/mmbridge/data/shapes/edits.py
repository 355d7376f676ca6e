"""Wave-2 sets built from scene edits: instruction + before/after pairs (recolor, move, add, remove,
resize) and short interleaved stories (scenes with narration between them).

Every edit changes exactly one object (or adds/removes one) and leaves the others untouched, and the
edited scene still satisfies world spec v1 — the tests check both.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .annotations import region, short_caption
from .world import (
    BORDER,
    COLORS,
    IMAGE_SIZE,
    SIZES,
    Scene,
    ShapeObject,
    boxes_apart,
    jitter_rgb,
    rng_for,
    sample_object,
    sample_scene,
    scene_seed,
    spec_violations,
)

EDIT_KINDS = ("recolor", "move", "add", "remove", "resize")
MIN_MOVE = 10  # pixels (L1) a moved object travels at least
REGIONS = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")


def _to(region_name: str) -> str:
    return "to the centre" if region_name == "centre" else f"to the {region_name}"


def _fits(box, others) -> bool:
    return (box[0] >= BORDER and box[1] >= BORDER and box[2] <= IMAGE_SIZE - BORDER
            and box[3] <= IMAGE_SIZE - BORDER and all(boxes_apart(box, b) for b in others))


def _recolor(scene: Scene, i: int, rng) -> tuple[ShapeObject, str, str] | None:
    o = scene.objects[i]
    taken = {(p.shape, p.color) for p in scene.objects}
    free = [c for c in COLORS if (o.shape, c) not in taken]
    c = free[rng.integers(len(free))]
    new = replace(o, color=c, rgb=jitter_rgb(c, rng))
    return new, f"Make the {o.color} {o.shape} {c}.", f"the {o.color} {o.shape} turned {c}"


def _move(scene: Scene, i: int, rng):
    o = scene.objects[i]
    others = [p.box for j, p in enumerate(scene.objects) if j != i]
    for target in [REGIONS[k] for k in rng.permutation(len(REGIONS))]:
        if target == region(o):
            continue
        for _ in range(100):
            x0, y0 = (int(v) for v in rng.integers(BORDER, IMAGE_SIZE - BORDER - o.extent + 1, 2))
            new = replace(o, x0=x0, y0=y0)
            moved = abs(new.x0 - o.x0) + abs(new.y0 - o.y0) >= MIN_MOVE  # visibly, not across a region line
            if moved and region(new) == target and _fits(new.box, others):
                return (new, f"Move the {o.color} {o.shape} {_to(target)}.",
                        f"the {o.color} {o.shape} moved {_to(target)}")
    return None


def _resize(scene: Scene, i: int, rng):
    o = scene.objects[i]
    size = "large" if o.size == "small" else "small"
    others = [p.box for j, p in enumerate(scene.objects) if j != i]
    cx, cy = o.centre
    for extent in rng.permutation(np.arange(SIZES[size][0], SIZES[size][1] + 1)):
        e = int(extent)
        new = replace(o, size=size, extent=e, x0=int(round(cx - e / 2)), y0=int(round(cy - e / 2)))
        if _fits(new.box, others):  # grow or shrink in place, about the same centre
            verb = "grew" if size == "large" else "shrank"
            return new, f"Make the {o.color} {o.shape} {size}.", f"the {o.color} {o.shape} {verb}"
    return None


def make_edit(scene: Scene, kind: str, rng: np.random.Generator) -> dict | None:
    """Apply one edit of ``kind`` to ``scene``: ``{"kind", "instruction", "narration", "target",
    "before", "after"}`` (scenes), or None if this edit is impossible here (e.g. add to 4 objects)."""
    objs = scene.objects
    if kind == "add":
        if len(objs) >= 4:
            return None
        new = sample_object(rng, {(o.shape, o.color) for o in objs}, [o.box for o in objs])
        if new is None:
            return None
        after = replace(scene, objects=objs + [new], seed=None)
        where = "in the centre" if region(new) == "centre" else f"at the {region(new)}"
        return {"kind": kind, "instruction": f"Add a {new.name} {where}.",
                "narration": f"a {new.name} appeared {where}", "target": len(objs), "before": scene, "after": after}
    if kind == "remove":
        if len(objs) < 2:
            return None
        i = int(rng.integers(len(objs)))
        o = objs[i]
        after = replace(scene, objects=objs[:i] + objs[i + 1:], seed=None)
        return {"kind": kind, "instruction": f"Remove the {o.color} {o.shape}.",
                "narration": f"the {o.color} {o.shape} disappeared", "target": i, "before": scene, "after": after}
    i = int(rng.integers(len(objs)))
    result = {"recolor": _recolor, "move": _move, "resize": _resize}[kind](scene, i, rng)
    if result is None:
        return None
    new, instruction, narration = result
    after = replace(scene, objects=objs[:i] + [new] + objs[i + 1:], seed=None)
    return {"kind": kind, "instruction": instruction, "narration": narration, "target": i,
            "before": scene, "after": after}


def edit_pair(split: str, index: int, base_seed: int = 0) -> dict:
    """The edit pair for scene ``index``: its scene, edited by a kind chosen from the seed (kinds
    that are impossible on that scene are skipped in a seeded order)."""
    seed = scene_seed(split, index, base_seed)
    scene = sample_scene(seed)
    rng = rng_for(seed, 5)
    for k in rng.permutation(len(EDIT_KINDS)):
        edit = make_edit(scene, EDIT_KINDS[k], rng)
        if edit is not None:
            assert not spec_violations(edit["after"]), spec_violations(edit["after"])
            return edit
    raise RuntimeError("no edit applies")  # unreachable: recolor always applies


def make_story(split: str, index: int, base_seed: int = 0, steps: int = 3) -> list[dict]:
    """A short story: ``steps`` scenes, each introduced by a sentence: the first describes the
    scene, the next ones narrate the edit that leads to it: ``[{"text", "scene"}, {"text", "scene", "edit"},
    …]`` (``edit`` as :func:`make_edit` returns it: what a story score checks a step against)."""
    seed = scene_seed(split, index, base_seed)
    rng = rng_for(seed, 3)
    scene = sample_scene(seed ^ (1 << 63), num_objects=int(rng.integers(1, 3)))  # own scene stream
    scene = replace(scene, seed=None)
    caption = short_caption(scene)
    story = [{"text": f"At first there was {caption[0].lower() + caption[1:]}", "scene": scene}]
    while len(story) < steps:
        # stories mostly grow: adding is twice as likely as any other edit
        kind = ("add", "add", "move", "recolor", "resize", "remove")[rng.integers(6)]
        edit = make_edit(scene, kind, rng)
        if edit is None:
            continue
        scene = edit["after"]
        story.append({"text": f"Then {edit['narration']}.", "scene": scene, "edit": edit})
    return story
