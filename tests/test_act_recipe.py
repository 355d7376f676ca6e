"""Act, data and stages: instruction data for every act task in many phrasings (held-out phrasings never
in training; classes the world lacks answered in text), written as LLaVA JSON with `targets` and `regions`
that the trainer reads, and the two act stages (recipes/shapes_act_stage{1,2}.yaml) run through the same
Trainer as every stage, resumable, on a see-model that gained the act head."""

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

from mmbridge.data.shapes.act import (
    ATTRIBUTES,
    PHRASINGS,
    UNKNOWN,
    UNKNOWN_ANSWER,
    make_request,
    rle,
    scene_requests,
)
from mmbridge.data.shapes.act_eval import write_act_eval
from mmbridge.data.shapes.world import COLORS, SHAPES, SIZES, make_scene
from mmbridge.pretrain.act import add_act_head, write_act_data
from mmbridge.recipes import __file__ as recipes_init

TINY_ACT = {"decoder_hidden_size": 16, "decoder_layers": 1, "decoder_heads": 2, "num_object_queries": 4,
            "mask_size": 8}


def test_phrasings_held_out_are_never_trained():
    for task, sets in PHRASINGS.items():
        assert len(sets["train"]) >= 3 and sets["heldout"], task
        assert not set(sets["train"]) & set(sets["heldout"]), task
    trained = [w for words in UNKNOWN["train"].values() for w in words]
    heldout = [w for words in UNKNOWN["heldout"].values() for w in words]
    # no held-out word inside a training one either ("crescent" in "crescent moon" would be seen)
    assert not any(h in t for h in heldout for t in trained)
    world = {*COLORS, *SHAPES, *SIZES, "object", "shape", "figure", "person", "box"}
    assert not any(w in t or t in w for w in world for t in trained + heldout)  # the world has none of them
    rng = random.Random(0)
    requests = [r for i in range(60) for r in scene_requests(make_scene("train", i), rng, 3)]
    texts = {r["request"] for r in requests}
    heldout = [t for sets in PHRASINGS.values() for t in sets["heldout"]]
    for template in heldout:  # no training request is written in a held-out phrasing
        pattern = re.escape(template).replace(r"\{one\}", ".+").replace(r"\{many\}", ".+").replace(
            r"\{expr\}", ".+").replace(r"\{attr\}", ".+")
        assert not any(re.fullmatch(pattern, t) for t in texts), template
    assert {r["task"] for r in requests} == {"det", "seg", "grd", "region_vqa", "region_det", "unknown"}
    assert len({r["request"] for r in requests if r["task"] == "det"}) > 20  # many phrasings and categories


def test_requests_target_what_they_name():
    rng = random.Random(1)
    for i in range(40):
        scene = make_scene("train", i)
        det = make_request(scene, "det", rng)
        assert det["route"] == det["answer"] == "[DET]" and "masks" not in det["target"]
        seg = make_request(scene, "seg", rng)
        assert seg["route"] == "[SEG]" and len(seg["target"]["masks"]) == len(seg["target"]["boxes"])
        grd = make_request(scene, "grd", rng)
        assert grd is None or (len(grd["target"]["boxes"]) == 1
                               and grd["target"]["boxes"][0] == [round(v / 64, 4) for v in
                                                                 scene.objects[grd["object"]].box])
        region = make_request(scene, "region_vqa", rng)
        assert "<region>" in region["request"] and region["route"] is None
        assert region["answer"] == getattr(scene.objects[region["object"]], region["type"])
        unknown = make_request(scene, "unknown", rng)
        assert unknown["route"] is None and unknown["answer"] == UNKNOWN_ANSWER
        assert "[" not in unknown["answer"]
    # "Find every red shape" -> every red object; a category missing from the scene -> no boxes
    scene = make_scene("train", 3)
    colors = {o.color for o in scene.objects}
    for _ in range(200):
        req = make_request(scene, "det", rng)
        words = req["category"].split()
        if words[0] in ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "white") and \
                words[1] == "shapes":
            expected = [o for o in scene.objects if o.color == words[0]]
            assert len(req["target"]["boxes"]) == len(expected)
            if words[0] not in colors:
                assert req["target"]["boxes"] == []


def test_rle_round_trips_through_pycocotools():
    from pycocotools import mask as mask_utils

    mask = np.random.RandomState(0).rand(64, 64) > 0.6
    encoded = rle(mask)
    assert (mask_utils.decode(mask_utils.frPyObjects(encoded, 64, 64)) == mask).all()
    from mmbridge.modeling.act.head import _decode_rle

    assert (_decode_rle(encoded) == mask).all()


def test_act_data_is_llava_that_the_trainer_reads(tmp_path):
    from mmbridge.heads_config import ActConfig
    from mmbridge.testing import build_tiny
    from mmbridge.train.data import LlavaJsonDataset

    counts = write_act_data(tmp_path, num_scenes=24)
    assert counts["act_chats"] + counts["refusal_chats"] == counts["see_chats"] == 24
    records = json.loads((tmp_path / "act.json").read_text())
    refusals = json.loads((tmp_path / "refusals.json").read_text())
    assert len(records) == counts["act_chats"] and len(refusals) == counts["refusal_chats"] >= 1
    # act stage 1 (LLM frozen) reads act.json alone: no answer there may be one the frozen LM cannot learn
    assert not any(t["value"] == UNKNOWN_ANSWER for r in records for t in r["conversations"])
    assert all(any(t["value"] == UNKNOWN_ANSWER for t in r["conversations"]) for r in refusals)
    for record in records + refusals:
        answers = " ".join(t["value"] for t in record["conversations"] if t["from"] == "gpt")
        for trigger, targets in record.get("targets", {}).items():
            assert answers.count(trigger) == len(targets)
        asked = " ".join(t["value"] for t in record["conversations"] if t["from"] == "human")
        assert asked.count("<region>") == len(record.get("regions", []))
        assert (tmp_path / record["image"]).is_file()
    # absent.json: each refused request once more, routed to its decoder with no boxes (decoder-only stages)
    absent = json.loads((tmp_path / "absent.json").read_text())
    refused = [q["value"] for r in refusals for q, a in zip(r["conversations"], r["conversations"][1:])
               if q["from"] == "human" and a["value"] == UNKNOWN_ANSWER]
    assert [r["conversations"][0]["value"].removeprefix("<image>\n") for r in absent] == \
        [q.removeprefix("<image>\n") for q in refused]
    for record in absent:
        (route, [target]), = record["targets"].items()
        assert record["conversations"][1]["value"] == route in ("[DET]", "[SEG]")
        assert target["boxes"] == [] and target["objects"]["boxes"]  # nothing to find among the scene's objects
        assert target.get("masks", []) == []
    # region_vqa.json: the act chats with a region question answered in words (act stage 2 weights them up)
    region_vqa = json.loads((tmp_path / "region_vqa.json").read_text())
    assert region_vqa and {r["id"] for r in region_vqa} < {r["id"] for r in records}
    for record in records:
        turns = record["conversations"]
        worded = any("<region>" in q["value"] and not a["value"].startswith("[") for q, a in zip(turns, turns[1:])
                     if q["from"] == "human")
        assert worded == (record in region_vqa)

    model, processor = build_tiny()
    config = ActConfig(**TINY_ACT)
    model.add_head(config, processor.tokenizer)
    processor.register_head(config)
    dataset = LlavaJsonDataset(str(tmp_path / "act.json"))
    conversations = [dataset[i] for i in range(len(dataset))]
    marked = [c for c in conversations if any(p["type"] == "region" for m in c for p in m["content"])]
    assert marked, "some records carry visual prompts"
    user = next(m for m in marked[0] if any(p["type"] == "region" for p in m["content"]))
    texts = [p["text"] for p in user["content"] if p["type"] == "text"]
    assert any(t.endswith(" ") for t in texts)  # "What color is " <region> "?": spaces kept, as at inference
    batch = processor(conversations, return_labels=True)
    assert len(batch["region_masks"]) == sum(len(r.get("regions", [])) for r in records)
    out = model(**batch)
    assert {"lm", "act_cls", "act_l1", "act_giou"} <= set(out.losses)
    assert all(np.isfinite(v.item()) for v in out.losses.values())


def test_pose_data_and_eval_files(tmp_path):
    """`[POSE]` requests on the pose set's stick figures (keypoints as fractions, every one visible), in training
    phrasings for pose.json and held-out ones in the route file, with a COCO keypoints file to score them."""
    from mmbridge.data.shapes.pose import KEYPOINTS
    from mmbridge.heads_config import ActConfig
    from mmbridge.testing import build_tiny
    from mmbridge.train.data import LlavaJsonDataset

    counts = write_act_data(tmp_path / "train", num_scenes=2, see_turns=0, pose_figures=3)
    assert counts["pose_chats"] == 3
    records = json.loads((tmp_path / "train" / "pose.json").read_text())
    for record in records:
        assert [t["value"] for t in record["conversations"]][1] == "[POSE]"
        assert record["conversations"][0]["value"].split("\n", 1)[1] in PHRASINGS["pose"]["train"]
        (people,) = record["targets"]["[POSE]"]
        (person,) = people["keypoints"]
        assert len(person) == len(KEYPOINTS) and all(0 < x < 1 and 0 < y < 1 and v == 2 for x, y, v in person)
        assert (tmp_path / "train" / record["image"]).is_file()
    model, processor = build_tiny()
    config = ActConfig(tasks=["det", "pose"], **TINY_ACT)
    model.add_head(config, processor.tokenizer)
    processor.register_head(config)
    dataset = LlavaJsonDataset(str(tmp_path / "train" / "pose.json"))
    out = model(**processor([dataset[i] for i in range(len(dataset))], return_labels=True))
    assert {"act_keypoints", "act_oks"} <= set(out.losses) and all(np.isfinite(v.item()) for v in out.losses.values())

    summary = write_act_eval(tmp_path / "eval", num_scenes=2, pose_figures=2)
    assert summary["pose_figures"] == 2 and summary["files"]["pose"] == "coco_pose_test.json"
    coco = json.loads((tmp_path / "eval" / "coco_pose_test.json").read_text())
    assert len(coco["images"]) == 2 and all(a["num_keypoints"] == len(KEYPOINTS) for a in coco["annotations"])
    assert all((tmp_path / "eval" / image["file_name"]).is_file() for image in coco["images"])
    routes = [json.loads(line) for line in (tmp_path / "eval" / "route_test.jsonl").read_text().splitlines()]
    poses = [r for r in routes if r["task"] == "pose"]
    assert len(poses) == 2 and all(r["route"] == "[POSE]" and r["request"] in PHRASINGS["pose"]["heldout"]
                                   for r in poses)
    assert not set(PHRASINGS["pose"]["train"]) & set(PHRASINGS["pose"]["heldout"])


def test_a_request_with_more_region_tags_than_regions_is_a_sample_error():
    from mmbridge.train.data import SampleError, llava_to_messages

    turns = [{"from": "human", "value": "What color is <region>?"}, {"from": "gpt", "value": "red"}]
    with pytest.raises(SampleError, match="region"):
        llava_to_messages(turns, [], regions=[])
    with pytest.raises(SampleError, match="region"):
        llava_to_messages(turns[:1] + [{"from": "gpt", "value": "x"}], [], regions=[{"box": [0, 0, 1, 1]}] * 2)


def test_eval_files(tmp_path):
    summary = write_act_eval(tmp_path, num_scenes=8)
    assert summary["ground"] >= 8 and summary["region"] == summary["objects"]
    routes = [json.loads(line) for line in (tmp_path / "route_test.jsonl").read_text().splitlines()]
    heldout = {t for sets in PHRASINGS.values() for t in sets["heldout"]}
    assert routes and all(r["route"] in ("[DET]", "[SEG]", "[GRD]", None) for r in routes)
    assert any(r["route"] is None for r in routes) or len(routes) < 20
    for r in routes:  # every request is in a held-out phrasing
        assert any(re.fullmatch(re.escape(t).replace(r"\{one\}", ".+").replace(r"\{many\}", ".+")
                                .replace(r"\{expr\}", ".+").replace(r"\{attr\}", ".+"), r["request"])
                   for t in heldout), r["request"]
    coco = json.loads((tmp_path / "coco_test.json").read_text())
    assert len(coco["images"]) == 8 and all("segmentation" in a for a in coco["annotations"])


@pytest.mark.usefixtures("fresh_accelerate")
def test_act_stages_train_through_the_trainer_resume_and_the_model_routes(tmp_path):
    from accelerate.state import AcceleratorState, GradientState

    from mmbridge.generation import MMBridgePipeline
    from mmbridge.train.config import load_stage_config
    from mmbridge.train.fixtures import make_base_model
    from mmbridge.train.trainer import Trainer

    make_base_model(tmp_path / "see", init_std=0.02, object_attributes=ATTRIBUTES)  # regions read from its queries
    add_act_head(tmp_path / "see", tmp_path / "base", **TINY_ACT)
    write_act_data(tmp_path / "data", num_scenes=8, see_turns=2)
    recipes = Path(recipes_init).parent
    short = ["schedule.warmup_steps=1", "data.batch_size=2", "data.num_workers=0", "run.progress_bar=false",
             "run.save_every=1"]
    data = [f"data.datasets.0.path={tmp_path / 'data' / 'act.json'}"]
    stage1 = load_stage_config(recipes / "shapes_act_stage1.yaml",
                               [f"model={tmp_path / 'base'}", *data, "schedule.total_steps=3", *short])
    Trainer(stage1, tmp_path / "stage1", max_steps=2).fit()  # interrupted after 2 steps ...
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    result = Trainer(stage1, tmp_path / "stage1", resume=True).fit()  # ... and resumed to the end
    assert result["step"] == 3
    assert {"lm", "act_cls", "act_l1", "act_giou"} <= set(result["losses"])
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    stage2 = load_stage_config(recipes / "shapes_act_stage2.yaml", [
        f"model={tmp_path / 'stage1' / 'model'}", *data,
        f"data.datasets.1.path={tmp_path / 'data' / 'see.json'}",
        'data.datasets.2={"name": "refusals", "type": "llava_json", "weight": 0.3, "path": "%s"}'
        % (tmp_path / "data" / "refusals.json"), "schedule.total_steps=2", *short])
    result = Trainer(stage2, tmp_path / "stage2").fit()
    assert result["step"] == 2 and {"lm_turn", "lm_first"} <= set(result["losses"])  # per answer (runs g1, g4)

    pipe = MMBridgePipeline.from_pretrained(tmp_path / "stage2" / "model")
    assert pipe.model.config.llm_lora and "[GRD]" in pipe.processor.routes and pipe.processor.region_token
    [out] = pipe.generate([{"role": "user", "content": "Find every red shape."}], max_new_tokens=4)
    assert out.finish_reason in ("stop", "length")  # decoding runs with the act head's hook in place


@pytest.mark.usefixtures("fresh_accelerate")
def test_the_recipe_runs_the_act_stages_when_listed_and_exports_the_act_model(tmp_path):
    """`mmbridge train shapes ... stages=[..., act_data, act_stage1, act_stage2, act_pose, act_decoders, export]`:
    on a stage-3 model the act head is added, trained in two trainer stages, its pose decoder alone in a third and
    its box / mask decoder alone (with the missing-class negatives) in a fourth, and exported; a second run skips
    them all."""
    import torch

    from mmbridge.config import MMBridgeConfig
    from mmbridge.pretrain.recipe import RECIPES_DIR, RUN_ORDER, ActStage, Recipe, RecipeConfig, TrainerStage
    from mmbridge.train.fixtures import make_base_model

    assert "act_stage1" not in RecipeConfig(name="x").stages  # opt-in: the see recipe is unchanged
    make_base_model(tmp_path / "base", init_std=0.02, object_attributes=ATTRIBUTES)
    make_base_model(tmp_path / "stage3" / "model", init_std=0.02, object_attributes=ATTRIBUTES)
    short = ["schedule.total_steps=2", "schedule.warmup_steps=1", "data.batch_size=2", "data.num_workers=0"]
    stages = ["act_data", "act_stage1", "act_stage2", "act_pose", "act_decoders", "export"]
    cfg = RecipeConfig(name="act-test", stages=stages, threads=1, see_scenes=0, base_dir=str(RECIPES_DIR),
                       act=ActStage(train_scenes=6, see_turns=2, eval_scenes=3, head=TINY_ACT, pose_figures=4,
                                    eval_pose_figures=2),
                       act_stage1=TrainerStage("shapes_act_stage1.yaml", short),
                       act_stage2=TrainerStage("shapes_act_stage2.yaml", short),
                       act_pose=TrainerStage("shapes_act_pose.yaml", short),
                       act_decoders=TrainerStage("shapes_act_decoders.yaml", short))
    assert [s for s in RUN_ORDER if s in stages] == stages
    report = Recipe(cfg, tmp_path, log=lambda _: None).run()
    assert report["stages"]["act_stage1"]["steps"] == 2 and report["stages"]["act_stage2"]["steps"] == 2
    assert report["stages"]["act_pose"]["steps"] == 2  # the keypoint decoder alone, on stage 2's model
    assert report["stages"]["act_decoders"]["steps"] == 2  # the box / mask decoder alone, on act_pose's model
    assert report["stages"]["act_data"]["eval"]["files"]["route"] == "route_test.jsonl"
    exported = MMBridgeConfig.from_pretrained(tmp_path / "model")
    assert "act" in exported.head_configs and exported.llm_lora
    # the default head finds poses too: stick figures in both stages' mix, the keypoint decoder trained
    assert "[POSE]" in exported.head_configs["act"].routes and report["stages"]["act_data"]["train"]["pose_chats"] == 4
    assert report["stages"]["act_data"]["eval"]["files"]["pose"] == "coco_pose_test.json"
    from mmbridge.modeling import MMBridgeModel

    before, after = (MMBridgeModel.from_pretrained(d).act.pose_decoder.state_dict()
                     for d in (tmp_path / "act" / "base", tmp_path / "model"))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # the export is act_decoders' model: its box decoder moved from act_pose's, and of the LLM only the rows of the
    # tokens the act head added (their embeddings train with every act stage: the query tokens feed the decoders)
    pose, final = (MMBridgeModel.from_pretrained(d).state_dict() for d in (tmp_path / "act" / "pose" / "model",
                                                                           tmp_path / "model"))
    moved = {k for k in pose if not torch.equal(pose[k], final[k])}
    assert any(k.startswith("act.decoders.") for k in moved)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    added = len(tokenizer.get_added_vocab())  # the special tokens: image, region, routes, queries (the last rows)
    for key in moved - {k for k in moved if k.startswith("act.decoders.")}:
        assert key.startswith("llm.") and "embed_tokens" in key or "lm_head" in key, key
        rows = (pose[key] != final[key]).flatten(1).any(1).nonzero().flatten()
        assert rows.min() >= len(pose[key]) - added, (key, rows[:5])
    again = Recipe(cfg, tmp_path, log=lambda _: None).run()
    assert again["stages"] == report["stages"]


@pytest.mark.usefixtures("fresh_accelerate")
def test_the_recipe_adds_the_act_head_to_a_given_see_model_with_the_foundation_text_tower(tmp_path):
    """`see_model=DIR` (or a shipped name): the act stages start from that model, not from this run's stage 3;
    the foundation's CLIP text tower is copied into the head, frozen, and exported with the model."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from mmbridge.modeling import MMBridgeModel
    from mmbridge.pretrain.recipe import RECIPES_DIR, ActStage, Recipe, RecipeConfig, TrainerStage
    from mmbridge.processing import MMBridgeProcessor
    from mmbridge.train.fixtures import make_base_model

    make_base_model(tmp_path / "see", init_std=0.02, object_attributes=ATTRIBUTES)
    vocab = len(MMBridgeProcessor.from_pretrained(tmp_path / "see").tokenizer)
    torch.manual_seed(0)
    tower = CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=64, pad_token_id=3))
    tower.save_pretrained(tmp_path / "foundation" / "text_encoder")
    short = ["schedule.total_steps=1", "schedule.warmup_steps=1", "data.batch_size=2", "data.num_workers=0"]
    stages = ["act_data", "act_stage1", "act_stage2", "export"]
    cfg = RecipeConfig(name="act-test", stages=stages, threads=1, see_scenes=0, base_dir=str(RECIPES_DIR),
                       see_model=str(tmp_path / "see"),
                       act=ActStage(train_scenes=4, see_turns=1, eval_scenes=2, head=TINY_ACT, pose_figures=0),
                       act_stage1=TrainerStage("shapes_act_stage1.yaml", short),
                       act_stage2=TrainerStage("shapes_act_stage2.yaml", short))
    recipe = Recipe(cfg, tmp_path / "run", log=lambda _: None)
    recipe.foundation = tmp_path / "foundation"  # as `foundation=DIR` resolves it (the test has no full one)
    report = recipe.run()
    assert report["stages"]["export"]["frozen_parts_identical"]
    assert "act_relevance" in report["stages"]["act_stage1"]["final_losses"]
    model = MMBridgeModel.from_pretrained(tmp_path / "run" / "model")
    assert model.config.head_configs["act"].text_encoder["hidden_size"] == 16
    assert "[POSE]" not in model.config.head_configs["act"].routes  # no stick figures to train it: no route
    assert all(torch.equal(v, model.act.text_encoder.state_dict()[k]) for k, v in tower.state_dict().items())
    # a model that already has an act head (the shipped one, since 2026-12-03) is refused with the reason
    from mmbridge.train.config import ConfigError

    cfg.see_model = str(tmp_path / "run" / "model")
    again = Recipe(cfg, tmp_path / "run2", log=lambda _: None)
    again.foundation = tmp_path / "foundation"
    with pytest.raises(ConfigError, match="already has an act head"):
        again.run()
