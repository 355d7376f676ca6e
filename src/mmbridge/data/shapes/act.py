"""Act instructions on a ShapesWorld scene: requests that route to the act head's tasks, in many phrasings.

Every request is a dict `{"task", "request", "route", "answer", "target", "region"}`:

* `task`: `det` (boxes of every object a category names), `seg` (the same with masks), `grd` (the one
  object a referring expression names), `region_vqa` ("What color is <region>?"), `region_det` ("Find all
  objects of the same shape as <region>": routes to `[DET]`), `unknown` (a class the world lacks), `pose`
  (the 17 keypoints of a stick figure: `pose_request`, on the pose set's images, not on a scene);
* `request`: the user's words; `<region>` where a visual prompt fills in;
* `route`: the routing token the answer writes (`[DET]`, `[SEG]`, `[GRD]`, `[POSE]`), or None for a text answer;
* `answer`: the assistant's text: the routing token alone, or a word / a sentence;
* `target`: what the route's decoder must return: boxes `[x0, y0, x1, y1]` as fractions of the image and,
  for `[SEG]` / `[GRD]`, masks as COCO RLE (`{"size", "counts"}`), and for all three the scene's `objects`
  (every object's box, color, shape and size: what the decoder's attribute selection learns from); for
  `[POSE]` `{"keypoints": [per person 17 × [x, y, visibility]], "boxes"}`, fractions too;
* `region`: the visual prompt (`box` / `point` / `scribble` / `mask`, fractions of the image), or None.

Categories are open vocabulary: the request names them ("red shapes", "large circles", "every object"),
and the target is every object that fits. A category the world has but the scene lacks routes with no
boxes (the decoder learns to find nothing); one the world lacks ("hexagons", "pink shapes", "cars") gets
a text answer that says so.

Phrasings come in two disjoint sets: `split="train"` for the training data, `split="heldout"` for
measuring whether the model picks the right route for wordings it never saw (`route_records`).
numpy + Pillow only (the data layer): the recipe (`pretrain/act.py`) writes files from these records and
`mmbridge eval` reads them.
"""

from __future__ import annotations

import random
import re

import numpy as np

from .annotations import RELATIONS, referring_expressions
from .pose import KEYPOINTS
from .world import COLORS, IMAGE_SIZE, SHAPES, Scene, ShapeObject, coverage_map, relation

ROUTES = {"det": "[DET]", "seg": "[SEG]", "grd": "[GRD]", "region_det": "[DET]", "pose": "[POSE]"}
SIZES = ("small", "large")
ATTRIBUTES = {"color": tuple(COLORS), "shape": SHAPES, "size": SIZES}  # each object's, and their values
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds",
          "cross": "crosses"}

# {one}: a category in the singular ("red shape"), {many}: the plural ("red shapes"); {expr}: a referring
# expression ("the small shape left of the blue square"). The two sets of a task share no template, and no
# training template is written the way a held-out one is (`REQUEST_FORMS` below; a test checks both).
PHRASINGS: dict[str, dict[str, tuple[str, ...]]] = {
    "det": {
        "train": ("Find every {one}.", "Detect all {many}.", "Where are the {many}?", "Locate all {many}.",
                  "Find all {many} in the image.", "Detect every {one}.", "Show me the {many}.",
                  "Give me the boxes of all {many}.", "Mark every {one} with a box.",
                  "Find the {many}.", "Detect the {many} in this picture.", "Identify all {many}.",
                  "Draw a box around each {one}.", "Pick out the {many}.", "Look for every {one}.",
                  "Box every {one}.", "Where is each {one} in the image?", "Spot the {many} in the picture.",
                  # every verb with more than one determiner, as in "seg": run i1 gave the seg verbs "each" /
                  # "all" / "the" and held-out "Spot all {many}." / "Please detect each {one}." went to [SEG]
                  "Box each {one}.", "Find each {one}.", "Locate every {one}.", "Identify the {many}.",
                  "Detect the {many}.", "Box all {many}."),
        "heldout": ("Can you find the {many}?", "Put boxes around the {many}.", "I am looking for every {one}.",
                    "Spot all {many}.", "Please detect each {one}."),
    },
    "seg": {
        "train": ("Segment every {one}.", "Segment all {many}.", "Give me the masks of the {many}.",
                  "Outline every {one}.", "Find the exact pixels of all {many}.", "Segment the {many}.",
                  "Give me a mask for each {one}.", "Which pixels are {many}? Segment them.",
                  "Mask every {one}.", "Cut every {one} out of the image.", "Draw the outline of each {one}.",
                  "Separate the {many} from the background.", "Make a segmentation mask of the {many}.",
                  "Extract the pixels of every {one}.", "Give me the segmentation of all {many}.",
                  # the same verbs with other determiners: with "all" / "each" mostly in the detection
                  # phrasings, run h5 routed held-out "Mask all {many}." to [DET] (seg routing 26 %)
                  "Mask the {many}.", "Mask each {one}.", "Segment each {one}.", "Cut the {many} out.",
                  "Outline all {many}.", "Give me a segmentation of the {many}."),
        "heldout": ("Cut out the {many}.", "Produce a segmentation of every {one}.", "Mask all {many}.",
                    "Can you segment each {one}?"),
    },
    "grd": {
        "train": ("Find {expr}.", "Where is {expr}?", "Locate {expr}.", "Point out {expr}.", "Show me {expr}.",
                  "Put a box around {expr}.", "Which object is {expr}? Find it.", "Identify {expr}.",
                  "Spot {expr} in the image.", "Mark {expr} with a box.", "Pick out {expr}.",
                  "Where can I find {expr}?", "Draw a box around {expr}."),
        "heldout": ("Can you spot {expr}?", "Highlight {expr}.", "Give me the box of {expr}.",
                    "I need the location of {expr}."),
    },
    "region_vqa": {  # {attr}: color / shape / size; the answer is one word
        "train": ("What {attr} is <region>?", "Which {attr} does <region> have?", "Tell me the {attr} of <region>.",
                  "What is the {attr} of the object in <region>?"),
        "heldout": ("What is the {attr} of <region>?", "Name the {attr} of <region>.",
                    "Can you tell me which {attr} <region> is?"),
    },
    "pose": {  # on an image of the pose set (one stick figure)
        "train": ("Find the pose of every figure.", "Find the pose of the figure.", "Estimate the pose of the "
                  "stick figure.", "Detect the keypoints of the figure.", "Where are the joints of the figure?",
                  "Show me the skeleton of the stick figure.", "Mark the body keypoints.",
                  "What pose is the person in? Find the keypoints.", "Locate the joints of the figure.",
                  "Draw the skeleton of the person.", "Estimate the keypoints of the stick figure.",
                  "Find the body joints of the person."),
        "heldout": ("Can you estimate the figure's pose?", "Give me the keypoints of the person.",
                    "Trace the skeleton of this figure.", "Locate every joint of the stick figure."),
    },
    "region_det": {  # {attr}: shape / color
        "train": ("Find all objects of the same {attr} as <region>.", "Detect every object with the {attr} of "
                  "<region>.", "Where are the objects that share the {attr} of <region>?",
                  # three phrasings were too few: run i4 answered held-out ones with the region's colour or
                  # shape in words, as a region question (region_det routing 53 %)
                  "Show me every object with the same {attr} as <region>.", "Mark all objects that share the "
                  "{attr} of <region>.", "Which objects have the {attr} of <region>? Find them.",
                  "Locate each object whose {attr} is the {attr} of <region>."),
        "heldout": ("Find everything that has the same {attr} as <region>.",
                    "Spot all objects matching the {attr} of <region>."),
    },
}
# People ask the same thing as an order, a plea or a question: each imperative training template is also
# trained in these forms ("Please locate all {many}.", "Could you outline every {one}?"). Run g4, trained on
# the bare orders alone, routed 35 % of the held-out detection phrasings right. A form that would write a
# held-out template is left out, so the held-out routing number still measures sentences never trained.
REQUEST_FORMS = ("Please {}.", "Can you {}?", "Could you {}?", "I want you to {}.", "I would like you to {}.")


def _template_pattern(template: str) -> re.Pattern:
    """A template as a regex over the requests it writes: each placeholder matches any text."""
    return re.compile(re.sub(r"\\\{\w+\\\}", ".+", re.escape(template)))


def _writes_heldout(template: str) -> bool:
    """Whether `template` can write a request that a held-out template (of any task) writes too."""
    text = re.sub(r"\{\w+\}", "the X", template)
    return any(_template_pattern(h).fullmatch(text) for sets in PHRASINGS.values() for h in sets["heldout"])


def _with_request_forms(sets: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    orders = [t for t in sets["train"] if t.endswith(".") and not t.startswith(("What", "Which", "Where"))]
    forms = [form.format(t[0].lower() + t[1:-1]) for t in orders for form in REQUEST_FORMS]
    return {"train": tuple(dict.fromkeys([*sets["train"], *(f for f in forms if not _writes_heldout(f))])),
            "heldout": sets["heldout"]}


PHRASINGS = {task: sets if task == "region_vqa" else _with_request_forms(sets) for task, sets in PHRASINGS.items()}
# A class the world lacks: shapes, colours and things it never has (docs/world.md lists what it has). Many
# training words, so that what the LM learns is "a category that is not the world's" rather than a dozen
# spellings: the foundation tokenizer writes most such words as letters ("h e x a g on s"), as it writes some
# of the world's own plurals and verbs ("cro s s es", "e v er y"). With 12 training words run i5 refused 28 of
# 40 requests for held-out words, and routed 132 of 640 held-out det requests for real classes to the refusal.
UNKNOWN = {
    "train": {"shape": ("hexagon", "star", "pentagon", "heart", "oval", "rhombus", "trapezoid", "ellipse",
                        "spiral", "cube", "sphere", "cone", "kite", "rectangle", "zigzag", "ring"),
              "color": ("pink", "brown", "black", "beige", "gold", "silver", "violet", "navy", "teal", "maroon",
                        "turquoise", "lime", "indigo", "olive"),
              "thing": ("car", "dog", "tree", "house", "boat", "bird", "chair", "apple", "ball", "phone", "book",
                        "cup", "lamp", "fish", "horse", "plane", "clock", "key", "shoe", "train")},
    "heldout": {"shape": ("octagon", "crescent", "arrow"), "color": ("gray", "magenta"),
                "thing": ("cat", "bicycle", "flower")},
}
THING_PLURAL = {"cross": "crosses", "bicycle": "bicycles", "rhombus": "rhombuses", "fish": "fish"}
#: The canonical request of each task (what `mmbridge eval` asks; a training phrasing).
CANONICAL = {"det": "Find every {one}.", "seg": "Segment every {one}.", "grd": "Find {expr}.",
             "pose": "Find the pose of every figure.",
             "color": "What color is <region>?", "shape": "What shape is <region>?",
             "size": "What size is <region>?"}
TASK_WEIGHTS = {"det": 3, "seg": 3, "grd": 3, "region_vqa": 2, "region_det": 2, "unknown": 1}


def plural(word: str) -> str:
    return PLURAL.get(word) or THING_PLURAL.get(word) or word + "s"


#: The text answer to a request for a class the world lacks (no route): a shape, a colour or a thing alike.
#: Made only of words the frozen LM *writes* — that appear in the answers and descriptions its stage-0
#: training put a loss on (a test checks). A word it only ever read (in a question: "color", "kind") or never
#: saw ("here") has an output row that training only ever pushed down, like every other such row: the rows
#: are one vector (cosine 1.00 between those of "kind", "here", "color", "What" in the shipped LM), so no
#: adapter can single one out. Measured on run h3: "There is no shape of the kind
#: here." kept p("kind") = 0.003 and p("here") = 0.004 under teacher forcing (1 / ~300 such rows) while the
#: six words before it reached 0.97-0.99, and 40 more steps on refusals alone moved them to 0.007 / 0.014;
#: "There is no shape." learns its "." to 0.996 in 10 steps. Earlier: "I can only find circles, …" (pieces
#: of words, run g1), "no such shape here." came out "no s shape here." (run g7).
UNKNOWN_ANSWER = "There is no shape."


def rle(mask: np.ndarray) -> dict:
    """A binary mask as COCO RLE with `counts` a str (pycocotools' column-major runs, uncompressed)."""
    flat = np.asarray(mask, dtype=bool).flatten(order="F")
    change = np.flatnonzero(np.diff(np.concatenate([[False], flat, [not flat[-1]]]).astype(np.int8)))
    runs = np.diff(np.concatenate([[0], change]))
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(r) for r in runs]}


def object_mask(obj: ShapeObject) -> np.ndarray:
    return coverage_map(obj) >= 0.5  # as `Scene.masks` and the COCO files


def _box(obj: ShapeObject) -> list[float]:
    return [round(v / IMAGE_SIZE, 4) for v in obj.box]


def categories(scene: Scene, rng: random.Random) -> list[tuple[str, str, list[int]]]:
    """(singular, plural, indices of the objects that fit) for a mix of the world's categories: every object,
    a colour, a shape, a colour + shape, a size, a size + shape — present in the scene or not."""
    objs = scene.objects
    out = [("object", "objects", list(range(len(objs)))), ("shape", "shapes", list(range(len(objs))))]
    present = [o for o in objs]
    color = rng.choice(present).color if rng.random() < 0.75 else rng.choice(list(COLORS))
    shape = rng.choice(present).shape if rng.random() < 0.75 else rng.choice(SHAPES)
    size = rng.choice(SIZES)
    pick = rng.choice(present)
    out += [
        (f"{color} shape", f"{color} shapes", [i for i, o in enumerate(objs) if o.color == color]),
        (shape, plural(shape), [i for i, o in enumerate(objs) if o.shape == shape]),
        (f"{pick.color} {pick.shape}", f"{pick.color} {plural(pick.shape)}",
         [i for i, o in enumerate(objs) if o.color == pick.color and o.shape == pick.shape]),
        (f"{size} shape", f"{size} shapes", [i for i, o in enumerate(objs) if o.size == size]),
        (f"{pick.size} {pick.shape}", f"{pick.size} {plural(pick.shape)}",
         [i for i, o in enumerate(objs) if o.size == pick.size and o.shape == pick.shape]),
    ]
    return out


def relational_expressions(scene: Scene) -> list[dict]:
    """"the small shape left of the blue square": an object named by its size (or as "the shape") and its
    relation to another object named by colour and shape, where exactly one object fits."""
    objs, out = scene.objects, []
    words = {"left": "left of", "right": "right of", "above": "above", "below": "below"}
    for b in objs:
        for rel, (_, axis, sign) in RELATIONS.items():
            fits = [i for i, a in enumerate(objs) if a is not b and relation(a, b, axis) == sign]
            for size in (None, *SIZES):
                chosen = [i for i in fits if size is None or objs[i].size == size]
                if len(chosen) == 1:
                    head = "the shape" if size is None else f"the {size} shape"
                    out.append({"expression": f"{head} {words[rel]} the {b.color} {b.shape}", "object": chosen[0]})
    return out


def grounding_expressions(scene: Scene) -> list[dict]:
    """Every referring expression of the scene (`annotations.referring_expressions` and the relational
    ones), each `{"expression", "object"}`."""
    plain = [{"expression": r["expression"], "object": r["object"]} for r in referring_expressions(scene)]
    return plain + relational_expressions(scene)


def visual_prompt(obj: ShapeObject, rng: random.Random, kinds=("box", "point", "scribble", "mask")) -> dict:
    """A region marking `obj` as a user would: its box (a little loose), a point on it, a scribble across
    it, or its mask (16 x 16; the processor scales it to the image)."""
    kind = rng.choice(kinds)
    mask = object_mask(obj)
    ys, xs = np.nonzero(mask)
    if kind == "box":
        x0, y0, x1, y1 = obj.box
        pad = rng.choice((0, 0, 1, 2))
        box = [max(0, x0 - pad), max(0, y0 - pad), min(IMAGE_SIZE, x1 + pad), min(IMAGE_SIZE, y1 + pad)]
        return {"box": [round(v / IMAGE_SIZE, 4) for v in box]}
    if kind == "point":
        k = rng.randrange(len(xs))
        return {"point": [round((xs[k] + 0.5) / IMAGE_SIZE, 4), round((ys[k] + 0.5) / IMAGE_SIZE, 4)]}
    if kind == "scribble":
        picks = sorted(rng.sample(range(len(xs)), min(3, len(xs))), key=lambda k: xs[k])
        return {"scribble": [[round((xs[k] + 0.5) / IMAGE_SIZE, 4), round((ys[k] + 0.5) / IMAGE_SIZE, 4)]
                             for k in picks]}
    small = mask.reshape(16, 4, 16, 4).any(axis=(1, 3))
    return {"mask": small.astype(int).tolist()}


def _detection(task: str, indices: list[int], scene: Scene) -> dict:
    # "objects": every object of the scene with its attributes, what the decoder's attribute-factored
    # selection learns to read off the patches (`ActConfig.selection_attributes`)
    target = {"boxes": [_box(scene.objects[i]) for i in indices],
              "objects": {"boxes": [_box(o) for o in scene.objects], **{a: [getattr(o, a) for o in scene.objects]
                                                                       for a in ATTRIBUTES}}}
    if task in ("seg", "grd"):
        target["masks"] = [rle(object_mask(scene.objects[i])) for i in indices]
    return target


def make_request(scene: Scene, task: str, rng: random.Random, split: str = "train") -> dict | None:
    """One request of `task` about `scene` in a random phrasing of `split` ("train" / "heldout"); None
    where the scene offers nothing to ask (no referring expression)."""
    templates = PHRASINGS.get(task, {}).get(split, ())
    base = {"task": task, "region": None}
    if task in ("det", "seg"):
        one, many, indices = rng.choice(categories(scene, rng))
        text = rng.choice(templates).format(one=one, many=many)
        return {**base, "request": text, "route": ROUTES[task], "answer": ROUTES[task],
                "target": _detection(task, indices, scene), "category": many}
    if task == "grd":
        expressions = grounding_expressions(scene)
        if not expressions:
            return None
        pick = rng.choice(expressions)
        text = rng.choice(templates).format(expr=pick["expression"])
        return {**base, "request": text, "route": "[GRD]", "answer": "[GRD]",
                "target": _detection("grd", [pick["object"]], scene), "expression": pick["expression"],
                "object": pick["object"]}
    if task == "region_vqa":
        index = rng.randrange(len(scene.objects))
        obj = scene.objects[index]
        attr = rng.choice(("color", "shape", "size"))
        return {**base, "request": rng.choice(templates).format(attr=attr), "route": None,
                "answer": getattr(obj, attr), "target": None, "region": visual_prompt(obj, rng), "object": index,
                "type": attr}
    if task == "region_det":
        index = rng.randrange(len(scene.objects))
        obj = scene.objects[index]
        attr = rng.choice(("shape", "color"))
        indices = [i for i, o in enumerate(scene.objects) if getattr(o, attr) == getattr(obj, attr)]
        return {**base, "request": rng.choice(templates).format(attr=attr), "route": "[DET]", "answer": "[DET]",
                "target": _detection("det", indices, scene), "region": visual_prompt(obj, rng), "object": index}
    if task == "unknown":
        kind = rng.choice(("shape", "shape", "color", "thing"))
        word = rng.choice(UNKNOWN[split][kind])
        one, many = (f"{word} shape", f"{word} shapes") if kind == "color" else (word, plural(word))
        route_task = rng.choice(("det", "seg"))
        text = rng.choice(PHRASINGS[route_task][split]).format(one=one, many=many)
        # what the decoder must return if the request reaches it anyway (`absent_request`): nothing
        return {**base, "request": text, "route": None, "answer": UNKNOWN_ANSWER, "target": None,
                "category": many, "decoder_route": ROUTES[route_task],
                "decoder_target": _detection(route_task, [], scene)}
    raise ValueError(f"unknown act task {task!r}; tasks: {list(TASK_WEIGHTS)}")


def pose_request(figure, rng: random.Random, split: str = "train") -> dict:
    """A `[POSE]` request about a stick figure of the pose set (`data.shapes.pose.PoseScene`) in a random
    phrasing of `split`: every keypoint is labelled and visible (v = 2), as in the pose set's COCO file."""
    keypoints = [[x / IMAGE_SIZE, y / IMAGE_SIZE, 2] for x, y in (figure.keypoints[name] for name in KEYPOINTS)]
    return {"task": "pose", "region": None, "request": rng.choice(PHRASINGS["pose"][split]), "route": "[POSE]",
            "answer": "[POSE]", "target": {"keypoints": [keypoints], "boxes": [[v / IMAGE_SIZE for v in figure.box]]}}


def absent_request(request: dict) -> dict:
    """An `unknown` request (a class the world lacks) routed to its decoder with an empty target: the
    decoder's negative — it learns to find nothing when the words name nothing the world has, as an
    open-vocabulary detector learns from categories absent in the image. Only for a stage whose LLM does not
    learn from it (the LLM's answer is the refusal): the LM routes most such requests to the refusal, not all."""
    if request["task"] != "unknown":
        raise ValueError(f"absent_request takes an 'unknown' request, not {request['task']!r}")
    return {**request, "route": request["decoder_route"], "answer": request["decoder_route"],
            "target": request["decoder_target"]}


def scene_requests(scene: Scene, rng: random.Random, num: int, split: str = "train",
                   weights: dict[str, float] | None = None) -> list[dict]:
    """`num` requests about `scene`, tasks drawn by `weights` (default `TASK_WEIGHTS`)."""
    weights = weights or TASK_WEIGHTS
    tasks, w = list(weights), list(weights.values())
    out = []
    while len(out) < num:
        request = make_request(scene, rng.choices(tasks, w)[0], rng, split)
        if request is not None:
            out.append(request)
    return out


def canonical_region_questions(scene: Scene, rng: random.Random) -> list[dict]:
    """Region VQA eval items: per object one canonical colour / shape / size question with a visual prompt."""
    out = []
    for index, obj in enumerate(scene.objects):
        attr = rng.choice(("color", "shape", "size"))
        out.append({"question": CANONICAL[attr], "answer": getattr(obj, attr), "type": attr,
                    "region": visual_prompt(obj, rng), "object": index})
    return out
