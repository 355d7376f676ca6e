"""The ShapesWorld act recipe's pieces: a see-model gains VisionLLM v2's act head, and its training data.

* `add_act_head`: a trained see-model -> the same model with routing tokens `[DET]` / `[SEG]` / `[GRD]` /
  `[POSE]`, their super-link queries, `<region>`, fresh DETR and keypoint decoders and a region encoder (the
  LLM stays frozen).
* `write_act_data`: instruction data for every act task in many phrasings (`data/shapes/act.py`), as
  LLaVA JSON the trainer reads — the routing token in the answer, its decoder's target in `"targets"`,
  visual prompts in `"regions"` — and see chats about the same scenes to mix in (so that see quality
  does not drop while the LoRA trains on act requests), and `[POSE]` requests on the pose set's stick figures.
* `write_act_eval`: the eval files of `mmbridge eval detect|segment|ground|region|route`, on a split the
  training never sees: COCO instances, referring expressions, region questions, and requests in the
  held-out phrasings (the routing accuracy).

The stages are `recipes/shapes_act_stage{1,2}.yaml` (docs/recipe.md, "Act").
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SHAPES_ACT_HEAD = {"tasks": ["det", "seg", "grd", "pose"], "decoder_hidden_size": 128, "decoder_layers": 2,
                   "decoder_heads": 4, "num_object_queries": 8, "mask_size": 32, "region_patch_features": True,
                   "mask_pixel_decoder": True}


def add_act_head(model_dir: str | Path, out: str | Path, text_encoder: str | Path | None = None,
                 **act_settings) -> Path:
    """`model_dir` + an act head (`ActConfig`; defaults sized for ShapesWorld, `SHAPES_ACT_HEAD`) -> `out`.
    `text_encoder`: a transformers text-model directory (the foundation's CLIP text tower) copied in, frozen,
    to read the request's words for the decoder; its tokenizer must be the model's (checked)."""
    from transformers import AutoModel

    from mmbridge.heads_config import ActConfig
    from mmbridge.modeling import MMBridgeModel
    from mmbridge.processing import MMBridgeProcessor

    model = MMBridgeModel.from_pretrained(model_dir)
    processor = MMBridgeProcessor.from_pretrained(model_dir)
    tower = None
    if text_encoder is not None:
        tower = AutoModel.from_pretrained(text_encoder)
        vocab = processor.tokenizer.get_vocab()
        tokenizer_dir = Path(text_encoder).parent / "tokenizer"
        if tokenizer_dir.is_dir():
            from transformers import AutoTokenizer

            if AutoTokenizer.from_pretrained(tokenizer_dir).get_vocab().items() - vocab.items():
                raise ValueError(f"act: the text tower {text_encoder} was trained with another tokenizer than "
                                 f"{model_dir}'s; its words would be read as other words")
        settings = {k: v for k, v in tower.config.to_dict().items()
                    if k not in ("_name_or_path", "transformers_version", "architectures")}
        act_settings = {**act_settings, "text_encoder": settings}
    config = ActConfig(**{**SHAPES_ACT_HEAD, **act_settings})
    head = model.add_head(config, processor.tokenizer)
    if tower is not None:
        head.text_encoder.load_state_dict(tower.state_dict())
    processor.register_head(config)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return Path(out)


def act_record(key: str, image: str, requests: list[dict]) -> dict:
    """One LLaVA record: a chat of `requests` (data.shapes.act) about one image, with `targets` per routing
    token and `regions` per `<region>` in reading order."""
    conversations, targets, regions = [], {}, []
    for k, req in enumerate(requests):
        conversations += [{"from": "human", "value": ("<image>\n" if k == 0 else "") + req["request"]},
                          {"from": "gpt", "value": req["answer"]}]
        if req["route"]:
            targets.setdefault(req["route"], []).append(req["target"])
        if req["region"] is not None:
            regions.append(req["region"])
    record = {"id": key, "image": image, "conversations": conversations}
    if targets:
        record["targets"] = targets
    if regions:
        record["regions"] = regions
    return record


def write_act_data(out: str | Path, num_scenes: int, requests_per_scene: int = 3, see_turns: int = 4,
                   split: str = "train", seed: int = 0, first_scene: int = 0, pose_figures: int = 0) -> dict:
    """`out/act.json` (act requests, 1 to `requests_per_scene` per chat, training phrasings) and
    `out/see.json` (see chats of `see_turns` questions about the same scenes), images under `out/images/`.
    Scenes `first_scene` … `first_scene + num_scenes - 1` of `split`. With `pose_figures`, `out/pose.json`:
    one `[POSE]` request per stick figure of the pose set (figures 0 … `pose_figures` - 1 of `split`)."""
    from mmbridge.data.formats.llava import to_llava, write_llava
    from mmbridge.data.shapes.act import scene_requests
    from mmbridge.data.shapes.world import make_scene, png_bytes, render
    from mmbridge.pretrain.shapes import qa_turns

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed + 15)
    act, see, tasks = [], [], {}
    for i in range(first_scene, first_scene + num_scenes):
        scene = make_scene(split, i, seed)
        key = f"{split}-{i:06d}"
        image = f"images/{key}.png"
        (out / image).write_bytes(png_bytes(render(scene)))
        requests = scene_requests(scene, rng, rng.randint(1, requests_per_scene))
        for req in requests:
            tasks[req["task"]] = tasks.get(req["task"], 0) + 1
        act.append(act_record(f"act-{key}", image, requests))
        if see_turns:
            messages = [m for q, a in qa_turns(scene, rng, see_turns)
                        for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
            see.append(to_llava(f"see-{key}", image, messages))
    write_llava(act, str(out / "act.json"))
    if see_turns:
        write_llava(see, str(out / "see.json"))
    poses = _pose_records(out, pose_figures, split, seed, "train")
    if poses:
        write_llava([act_record(f"pose-{key}", image, [req]) for key, image, req, _ in poses], str(out / "pose.json"))
    return {"scenes": num_scenes, "act_chats": len(act), "act_requests": sum(tasks.values()), "tasks": tasks,
            "see_chats": len(see), "pose_chats": len(poses)}


def _pose_records(out: Path, num: int, split: str, seed: int, phrasings: str) -> list[tuple]:
    """(key, image path, `[POSE]` request, figure) for figures 0 … `num` - 1 of the pose set's `split`, their
    images written under `out/images/` (the seeds of `mmbridge data shapes --format wave2`'s pose set)."""
    from mmbridge.data.shapes.act import pose_request
    from mmbridge.data.shapes.pose import sample_pose
    from mmbridge.data.shapes.world import png_bytes, scene_seed

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
    from mmbridge.data.build import SHAPE_CATEGORIES
    from mmbridge.data.formats.coco import CocoBuilder, encode_mask
    from mmbridge.data.shapes.act import (
        TASK_WEIGHTS,
        canonical_region_questions,
        grounding_expressions,
        make_request,
        relational_expressions,
    )
    from mmbridge.data.shapes.world import IMAGE_SIZE, make_scene, png_bytes, render

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
    poses = _pose_records(out, pose_figures, split, seed, "heldout")
    if poses:
        from mmbridge.data.build import PERSON_CATEGORY

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
