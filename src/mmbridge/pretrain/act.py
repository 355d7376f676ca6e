"""The ShapesWorld act recipe's pieces: a see-model gains VisionLLM v2's act head, and its training data.

* `add_act_head`: a trained see-model -> the same model with routing tokens `[DET]` / `[SEG]` / `[GRD]` /
  `[POSE]`, their super-link queries, `<region>`, fresh DETR and keypoint decoders and a region encoder (the
  LLM stays frozen).
* `write_act_data`: instruction data for every act task in many phrasings (`data/shapes/act.py`), as
  LLaVA JSON the trainer reads — the routing token in the answer, its decoder's target in `"targets"`,
  visual prompts in `"regions"` — and see chats about the same scenes to mix in (so that see quality
  does not drop while the LoRA trains on act requests), and `[POSE]` requests on the pose set's stick figures.
The eval files (`mmbridge eval detect|segment|ground|region|route|pose`) are data, written by
`data.shapes.act_eval.write_act_eval` (evaluation must not need the code that trains).

The stages are `recipes/shapes_act_stage{1,2}.yaml` (docs/recipe.md, "Act").
"""

from __future__ import annotations

import random
from pathlib import Path

from mmbridge.data.shapes.act import ATTRIBUTES

SHAPES_ACT_HEAD = {"tasks": ["det", "seg", "grd", "pose"], "decoder_hidden_size": 128, "decoder_layers": 2,
                   "decoder_heads": 4, "num_object_queries": 8,
                   # <region> read from the Q-Former query that holds the object (run f1; was a region encoder
                   # over the image and the ViT's patches: region VQA 64 %)
                   "region_from_queries": True,
                   # masks pixel for pixel (64 x 64 images), boxes refined on the same features
                   "mask_size": 64, "mask_pixel_decoder": True, "mask_pixel_stride": 1, "mask_pixel_channels": 16,
                   "box_refinement": True, "masks_in_boxes": True, "duplicate_iou": 0.5,  # decoding (run e2)
                   "duplicate_oks": 0.9,  # decoding [POSE]: OKS-NMS (run g1: keypoint AP 0.29 -> 0.40)
                   "pose_heatmaps": True,  # [POSE] keypoints read off the pixel decoder (run j3)
                   "route_mid_answer": False,  # every answer of the act data opens with its route (run h1)
                   # the world's attributes: the decoder's attribute-factored selection (`AttributeSelection`)
                   "selection_attributes": {name: list(values) for name, values in ATTRIBUTES.items()}}

#: What the recipe's `act_edit` gives the act head with `[EDIT]`: the source-residual editor (run k1: it starts
#: as an exact copy of the source; ε-prediction never learned the copy, run i2), so only the instruction is guided
#: — and not at all at inference (run k2: guidance 1 kept more untouched objects than 7.5, same accuracy).
SHAPES_EDIT_SETTINGS = {"edit_source_residual": True, "edit_image_guidance_scale": 1.0, "edit_guidance_scale": 1.0}


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


def extend_act_head(model_dir: str | Path, out: str | Path, *tasks: str, **act_settings) -> Path:
    """`model_dir`, whose act head is trained, -> `out`: the same model with the act head's `tasks` added
    (`MMBridgeModel.extend_head`; e.g. "edit" after the draw head exists) and `act_settings` changed. A new
    editor's mapper starts from the draw head's mapper."""
    from mmbridge.modeling import MMBridgeModel
    from mmbridge.processing import MMBridgeProcessor

    model = MMBridgeModel.from_pretrained(model_dir)
    processor = MMBridgeProcessor.from_pretrained(model_dir)
    have = model.config.head_configs["act"].tasks
    model.extend_head("act", processor.tokenizer, tasks=[*have, *(t for t in tasks if t not in have)], **act_settings)
    editor, draw = getattr(model.heads["act"], "editor", None), model.heads.get("draw")
    if "edit" in tasks and editor is not None and draw is not None:
        # the edit mapper starts as the trained draw mapper (same shape): it already speaks the UNet's
        # condition language, where a fresh one's output did not move the UNet at all (run h2)
        # (the parts both have: an edit mapper does not read the request's words)
        own = editor.mapper.state_dict()
        editor.mapper.load_state_dict({k: v for k, v in draw.mapper.state_dict().items() if k in own})
    processor.register_head(model.config.head_configs["act"])
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


def region_answer_chats(records: list[dict]) -> list[dict]:
    """The LLaVA chats in which a human turn with a `<region>` is answered in words ("What color is <region>?"
    -> "red"), not routed to a decoder. Act stage 2 weights them up: each is one or two answer tokens among
    the see chats' sentences, and the LM loss is a mean over tokens (run f1: 4.5 % of stage 2's answer tokens;
    the LoRA read the region at 72 %, and at 98-100 % after 300 steps of region questions alone)."""
    def answers_a_region(record: dict) -> bool:
        turns = record["conversations"]
        return any(asked["from"] == "human" and "<region>" in asked["value"] and not answer["value"].startswith("[")
                   for asked, answer in zip(turns, turns[1:]))
    return [r for r in records if answers_a_region(r)]


def write_act_data(out: str | Path, num_scenes: int, requests_per_scene: int = 3, see_turns: int = 4,
                   split: str = "train", seed: int = 0, first_scene: int = 0, pose_figures: int = 0) -> dict:
    """`out/act.json` (act requests, 1 to `requests_per_scene` per chat, training phrasings), `out/refusals.json`
    (the chats among them that ask for a class the world lacks), `out/absent.json` (those requests routed to
    their decoder with an empty target: `absent_request`, for decoder-only stages), `out/region_vqa.json` (the
    act chats that ask about a marked region in words: `region_answer_chats`) and `out/see.json` (see chats of
    `see_turns` questions about the same scenes), images under `out/images/`.
    The refusals are their own file because only a stage that trains the LLM can learn them: the frozen LM
    has never written the refusal sentence (~15 nats per token), and in act stage 1 (LLM and LoRA
    frozen) that loss — most of the batch's answer tokens — could only flow into what does train before it in
    the chat: the routing rows and the `<region>` embedding, which grew to norm 735 steering the LM towards
    the refusal's list of colours (run d5: "What shape is <region>?" answered with a colour, 11 %).
    Scenes `first_scene` … `first_scene + num_scenes - 1` of `split`. With `pose_figures`, `out/pose.json`:
    one `[POSE]` request per stick figure of the pose set (figures 0 … `pose_figures` - 1 of `split`)."""
    from mmbridge.data.formats.llava import to_llava, write_llava
    from mmbridge.data.shapes.act import absent_request, scene_requests
    from mmbridge.data.shapes.act_eval import pose_records
    from mmbridge.data.shapes.world import make_scene, png_bytes, render
    from mmbridge.pretrain.shapes import qa_turns

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed + 15)
    act, refusals, absent, see, tasks = [], [], [], [], {}
    for i in range(first_scene, first_scene + num_scenes):
        scene = make_scene(split, i, seed)
        key = f"{split}-{i:06d}"
        image = f"images/{key}.png"
        (out / image).write_bytes(png_bytes(render(scene)))
        requests = scene_requests(scene, rng, rng.randint(1, requests_per_scene))
        for req in requests:
            tasks[req["task"]] = tasks.get(req["task"], 0) + 1
        record = act_record(f"act-{key}", image, requests)
        (refusals if any(req["task"] == "unknown" for req in requests) else act).append(record)
        absent += [act_record(f"absent-{key}-{k}", image, [absent_request(req)])
                   for k, req in enumerate(requests) if req["task"] == "unknown"]
        if see_turns:
            messages = [m for q, a in qa_turns(scene, rng, see_turns)
                        for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
            see.append(to_llava(f"see-{key}", image, messages))
    write_llava(act, str(out / "act.json"))
    write_llava(refusals, str(out / "refusals.json"))
    write_llava(absent, str(out / "absent.json"))
    write_llava(region_answer_chats(act), str(out / "region_vqa.json"))
    if see_turns:
        write_llava(see, str(out / "see.json"))
    poses = pose_records(out, pose_figures, split, seed, "train")
    if poses:
        write_llava([act_record(f"pose-{key}", image, [req]) for key, image, req, _ in poses], str(out / "pose.json"))
    return {"scenes": num_scenes, "act_chats": len(act), "refusal_chats": len(refusals),
            "act_requests": sum(tasks.values()), "tasks": tasks, "see_chats": len(see), "pose_chats": len(poses)}


def write_edit_data(out: str | Path, num_pairs: int, split: str = "train", seed: int = 0,
                    first_pair: int = 0) -> dict:
    """`out/edit.json`: one `[EDIT]` chat per edit pair of `split` (`data.shapes.edits.edit_pair`, pairs
    `first_pair` … `first_pair + num_pairs - 1`): the user sends the scene and the instruction, the answer is
    the route, its target the edited scene, its source and the instruction as the text the editor's mapper
    learns to say as the generator's text encoder does (`"targets": {"[EDIT]": [{"image", "source",
    "caption"}]}`; InstructPix2Pix's UNet reads the encoded instruction — run k2: the edited scene's short
    caption there left the editor unable to tell what to change),
    images under `out/images/`. An instruction the world cannot do needs no training turn: the `[EDIT]`
    route answers it in words (`data.shapes.edit_eval.edit_instruction_issue`)."""
    from mmbridge.data.formats.llava import to_llava, write_llava
    from mmbridge.data.shapes.edits import edit_pair
    from mmbridge.data.shapes.world import png_bytes, render

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records, kinds = [], {}
    for i in range(first_pair, first_pair + num_pairs):
        edit = edit_pair(split, i, seed)
        kinds[edit["kind"]] = kinds.get(edit["kind"], 0) + 1
        source, result = f"images/edit-{split}-{i:06d}-0.png", f"images/edit-{split}-{i:06d}-1.png"
        (out / source).write_bytes(png_bytes(render(edit["before"])))
        (out / result).write_bytes(png_bytes(render(edit["after"])))
        record = to_llava(f"edit-{split}-{i:06d}", source, [{"role": "user", "content": edit["instruction"]},
                                                           {"role": "assistant", "content": "[EDIT]"}])
        target = {"image": result, "source": source, "caption": edit["instruction"]}
        records.append({**record, "targets": {"[EDIT]": [target]}})
    write_llava(records, str(out / "edit.json"))
    return {"edit_chats": len(records), "kinds": kinds}
