"""The act head's eval files, on a split the training never sees (data: evaluation reads them without the
code that trains; `pretrain/act.py` writes the training data from the same requests):

* `write_act_eval`: COCO instances, referring expressions, region questions, requests in the held-out phrasings
  (the routing accuracy) and, with stick figures, a COCO keypoints file — the files of
  `mmbridge eval detect|segment|ground|region|route|pose` (and of `mmbridge eval all`);
* `pose_records`: `[POSE]` requests on the pose set's stick figures, their images written (training and eval).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from mmbridge.data.formats.coco import CocoBuilder, encode_mask

from .act import (
    TASK_WEIGHTS,
    canonical_region_questions,
    grounding_expressions,
    make_request,
    pose_request,
    relational_expressions,
)
from .pose import sample_pose
from .world import IMAGE_SIZE, make_scene, png_bytes, render, scene_seed


def pose_records(out: Path, num: int, split: str, seed: int, phrasings: str) -> list[tuple]:
    """(key, image path, `[POSE]` request, figure) for figures 0 … `num` - 1 of the pose set's `split`, their
    images written under `out/images/` (the seeds of `mmbridge data shapes --format wave2`'s pose set)."""
    rng, records = random.Random(seed + 17), []
    for i in range(num):
        figure = sample_pose(scene_seed(split, i, seed))
        key = f"{split}-{i:06d}"
        image = f"images/pose-{key}.png"
        (out / image).write_bytes(png_bytes(figure.render()))
        records.append((key, image, pose_request(figure, rng, phrasings), figure))
    return records


def write_act_eval(out: str | Path, num_scenes: int, split: str = "test", seed: int = 0, pose_figures: int = 0) -> dict:
    """Eval files for the act tasks on `num_scenes` scenes of `split` (image paths relative to `out`):

    * `coco_{split}.json`: COCO instances (boxes + RLE masks; the five shapes are the categories, colour and
      size attributes) — `mmbridge eval detect|segment --coco`;
    * `ground_{split}.jsonl`: `{"image", "expression", "box" (pixels x0 y0 x1 y1), "width", "height"}`, up to
      two per scene (one relational where the scene has one) — `mmbridge eval ground`;
    * `region_{split}.jsonl`: `{"image", "question" with <region>, "region", "answer", "type"}`, one per
      object — `mmbridge eval region`;
    * `route_{split}.jsonl`: `{"image", "request", "route" (null: a text answer), "task", "region"?}` in the
      held-out phrasings only — `mmbridge eval route`;
    * with `pose_figures`: `coco_pose_{split}.json` (COCO keypoints of that many stick figures of the pose set,
      as `mmbridge data shapes --format wave2` writes them) — `mmbridge eval pose` — and one held-out `[POSE]`
      request per figure in the route file."""
    from mmbridge.data.build import PERSON_CATEGORY, SHAPE_CATEGORIES

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed + 16)
    coco = CocoBuilder(SHAPE_CATEGORIES, {"description": f"ShapesWorld {split} (act eval)"})
    ground, regions, routes = [], [], []
    for i in range(num_scenes):
        scene = make_scene(split, i, seed)
        key = f"{split}-{i:06d}"
        image = f"images/{key}.png"
        (out / image).write_bytes(png_bytes(render(scene)))
        image_id = coco.add_image(image, IMAGE_SIZE, IMAGE_SIZE, key=key)
        for obj, mask in zip(scene.objects, scene.masks()):
            coco.add_annotation(image_id, obj.shape, obj.box, rle=encode_mask(mask), color=obj.color, size=obj.size)
        relational = relational_expressions(scene)
        plain = [e for e in grounding_expressions(scene) if e not in relational]
        picks = ([rng.choice(plain)] if plain else []) + ([rng.choice(relational)] if relational else [])
        for k, pick in enumerate(picks):
            ground.append({"id": f"{key}-g{k}", "image": image, "expression": pick["expression"],
                           "box": list(scene.objects[pick["object"]].box), "width": IMAGE_SIZE,
                           "height": IMAGE_SIZE, "relational": pick in relational})
        for k, item in enumerate(canonical_region_questions(scene, rng)):
            regions.append({"id": f"{key}-r{k}", "image": image, **item})
        for k, task in enumerate(rng.sample(list(TASK_WEIGHTS), 2)):
            req = make_request(scene, task, rng, split="heldout")
            if req is not None:
                routes.append({"id": f"{key}-q{k}", "image": image, "request": req["request"], "route": req["route"],
                               "task": task, **({"region": req["region"]} if req["region"] is not None else {})})
    coco.save(str(out / f"coco_{split}.json"))
    files = {"coco": f"coco_{split}.json"}
    poses = pose_records(out, pose_figures, split, seed, "heldout")
    if poses:
        pose_coco = CocoBuilder(PERSON_CATEGORY, {"description": f"ShapesWorld stick figures {split} (act eval)"})
        for key, image, req, figure in poses:
            image_id = pose_coco.add_image(image, IMAGE_SIZE, IMAGE_SIZE, key=key, caption=figure.caption())
            pose_coco.add_annotation(image_id, "person", figure.box, keypoints=figure.coco_keypoints(),
                                     color=figure.color)
            routes.append({"id": f"pose-{key}", "image": image, "request": req["request"], "route": "[POSE]",
                           "task": "pose"})
        pose_coco.save(str(out / f"coco_pose_{split}.json"))
        files["pose"] = f"coco_pose_{split}.json"
    for name, rows in (("ground", ground), ("region", regions), ("route", routes)):
        with open(out / f"{name}_{split}.jsonl", "w") as f:
            f.writelines(json.dumps(row, separators=(",", ":")) + "\n" for row in rows)
        files[name] = f"{name}_{split}.jsonl"
    return {"scenes": num_scenes, "files": files, "objects": len(coco.annotations), "ground": len(ground),
            "region": len(regions), "route": len(routes), "pose_figures": len(poses)}
