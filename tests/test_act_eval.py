"""`mmbridge eval segment|ground|region|route` end to end on a tiny act model (each prints one JSON
object with its metric), and each scoring path checked exact: answers made from the ground truth score
1.0 (segment: AP 1.0 through COCOeval)."""

import hashlib
import json
import re

import numpy as np
import pytest

from mmbridge.cli import main
from mmbridge.data.shapes.act_eval import write_act_eval
from mmbridge.data.shapes.world import IMAGE_SIZE, make_scene
from mmbridge.generation import DetectionsPart, GenerationResult, TextPart
from mmbridge.heads_config import ActConfig
from mmbridge.testing import build_tiny

NUM_SCENES = 4


def tiny_act(**kw):
    model, processor = build_tiny(**kw)
    config = ActConfig(decoder_hidden_size=16, decoder_layers=1, decoder_heads=2, num_object_queries=4, mask_size=8)
    model.add_head(config, processor.tokenizer)
    processor.register_head(config)
    return model, processor


@pytest.fixture(scope="module")
def act_dir(tmp_path_factory):
    model, processor = tiny_act(seed=0, init_std=0.5)
    path = tmp_path_factory.mktemp("act-model")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("act-eval")
    write_act_eval(path, NUM_SCENES)
    return path


def run(capsys, *argv):
    assert main(["eval", *argv, "--no-progress", "--batch-size", "4"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_each_act_eval_prints_one_json_object(act_dir, eval_dir, capsys, tmp_path):
    summary = run(capsys, "ground", "--model", str(act_dir), "--questions", str(eval_dir / "ground_test.jsonl"),
                  "--out", str(tmp_path / "ground.jsonl"))
    assert summary["task"] == "ground" and summary["metric"] == "grounding_acc@0.5"
    assert 0 <= summary["accuracy"] <= 1 and summary["n"] >= NUM_SCENES and set(summary["per_kind"]) <= {
        "plain", "relational"}
    assert len((tmp_path / "ground.jsonl").read_text().splitlines()) == summary["n"]

    summary = run(capsys, "region", "--model", str(act_dir), "--questions", str(eval_dir / "region_test.jsonl"))
    assert summary["metric"] == "region_vqa_accuracy" and set(summary["per_type"]) <= {"color", "shape", "size"}

    summary = run(capsys, "route", "--model", str(act_dir), "--questions", str(eval_dir / "route_test.jsonl"))
    assert summary["metric"] == "routing_accuracy" and summary["n"] > 0 and summary["confusion"]

    summary = run(capsys, "segment", "--model", str(act_dir), "--coco", str(eval_dir / "coco_test.json"),
                  "--limit", "2", "--out", str(tmp_path / "segment.json"))
    assert summary["task"] == "segment" and {"segm_ap", "bbox_ap", "segm_ap50"} <= set(summary)
    assert summary["requests"] == 2 * 5  # one per (image, shape category), as `eval detect`
    assert summary["score_threshold"] == 0.05  # COCO-eval's usual cut, not the serving threshold
    assert isinstance(json.loads((tmp_path / "segment.json").read_text()), list)
    summary = run(capsys, "segment", "--model", str(act_dir), "--coco", str(eval_dir / "coco_test.json"),
                  "--limit", "1", "--score-threshold", "0.3")
    assert summary["score_threshold"] == 0.3
    assert main(["eval", "detect", "--model", str(act_dir), "--coco", str(eval_dir / "coco_test.json"),
                 "--score-threshold", "1.5"]) == 2
    assert "--score-threshold must be in (0, 1)" in capsys.readouterr().err


def test_act_evals_explain_what_is_missing(tiny_model_dir, eval_dir, capsys):
    assert main(["eval", "ground", "--model", str(tiny_model_dir), "--questions",
                 str(eval_dir / "ground_test.jsonl"), "--no-progress"]) != 0
    assert "no act head with a [GRD] route" in capsys.readouterr().err
    assert main(["eval", "region", "--model", str(tiny_model_dir), "--questions",
                 str(eval_dir / "region_test.jsonl"), "--no-progress"]) != 0
    assert "reads no visual prompts" in capsys.readouterr().err
    assert main(["eval", "segment", "--model", str(tiny_model_dir), "--coco", str(eval_dir / "coco_test.json"),
                 "--no-progress"]) != 0
    assert "[SEG]" in capsys.readouterr().err
    assert main(["eval", "route", "--model", str(tiny_model_dir), "--no-progress"]) != 0
    assert "needs --questions" in capsys.readouterr().err


class Oracle:
    """A pipeline that answers from the ground truth (the scene behind each image), through the same parts
    a model returns."""

    def __init__(self, model, processor):
        self.model, self.processor = model, processor
        self.scenes = {}
        for i in range(NUM_SCENES):
            scene = make_scene("test", i)
            self.scenes[hashlib.sha1(np.asarray(scene.render()).tobytes()).hexdigest()] = scene

    def scene(self, image):
        return self.scenes[hashlib.sha1(np.asarray(image.convert("RGB")).tobytes()).hexdigest()]

    def generate(self, conversations, images, **kwargs):
        return [self.answer(conv[0]["content"], self.scene(image)) for conv, image in zip(conversations, images)]

    def answer(self, content, scene):
        text = "".join(p.get("text", "<region>") if p["type"] != "image" else "" for p in content)
        region = next((p for p in content if p["type"] == "region"), None)
        ids = self.processor.tokenizer.convert_tokens_to_ids
        if self.route is not None:  # routing: the expected route of the request
            route = self.route[text]
            tokens = [ids(route)] if route else []
            return GenerationResult([TextPart("")], "stop", 1, 1, tokens)
        if region is not None and text.startswith("What"):  # region VQA: the marked object
            obj = self.marked(scene, region)
            attr = re.match(r"What (\w+) is", text)[1]
            return GenerationResult([TextPart(getattr(obj, attr))], "stop", 1, 1)
        expression = re.fullmatch(r"Find (.+)\.", text)[1]
        from mmbridge.data.shapes.act import grounding_expressions

        index = next(e["object"] for e in grounding_expressions(scene) if e["expression"] == expression)
        box = [v / IMAGE_SIZE for v in scene.objects[index].box]
        return GenerationResult([DetectionsPart("[GRD]", [box], [1.0])], "stop", 1, 1)

    route = None

    @staticmethod
    def marked(scene, region):
        """The object a visual prompt covers most."""
        from mmbridge.data.shapes.act import object_mask
        from mmbridge.processing import region_mask

        mask = region_mask(region, IMAGE_SIZE, IMAGE_SIZE)
        return max(scene.objects, key=lambda o: (object_mask(o) & mask).sum())


def test_ground_truth_answers_score_one(eval_dir):
    from mmbridge.evaluate_act import evaluate_grounding, evaluate_region, evaluate_routing, read_act_jsonl

    oracle = Oracle(*tiny_act())

    records, skipped = read_act_jsonl(str(eval_dir / "ground_test.jsonl"), ("image", "expression", "box"))
    assert not skipped
    summary, _ = evaluate_grounding(oracle, records, progress=False)
    assert summary["accuracy"] == 1.0 and summary["mean_iou"] == pytest.approx(1.0)

    records, _ = read_act_jsonl(str(eval_dir / "region_test.jsonl"), ("image", "question", "region", "answer"))
    summary, _ = evaluate_region(oracle, records, progress=False)
    assert summary["accuracy"] == 1.0

    records, _ = read_act_jsonl(str(eval_dir / "route_test.jsonl"), ("image", "request", "route"))
    oracle.route = {r["request"]: r["route"] for r in records}
    summary, _ = evaluate_routing(oracle, records, progress=False)
    assert summary["accuracy"] == 1.0 and summary["n"] == len(records)
    oracle.route = {r["request"]: "[DET]" for r in records}  # a model that always detects
    summary, _ = evaluate_routing(oracle, records, progress=False)
    assert summary["accuracy"] == pytest.approx(np.mean([r["route"] == "[DET]" for r in records]), abs=1e-4)
    assert summary["confusion"]["[DET]"] == {"[DET]": sum(r["route"] == "[DET]" for r in records)}


def test_segment_scores_ground_truth_masks_ap_one(eval_dir):
    """`eval segment`'s path (per-category requests, RLE masks back to the image) on ground-truth answers."""
    from mmbridge.commands.eval_act import SEGMENT_PROMPT
    from mmbridge.data.shapes.act import object_mask, rle
    from mmbridge.evaluate import evaluate_detection

    oracle = Oracle(*tiny_act())
    from pycocotools import mask as mask_utils

    def generate(conversations, images, **kwargs):
        out = []
        for conv, image in zip(conversations, images):
            scene = oracle.scene(image)
            name = re.fullmatch(r"Segment every (\w+)\.", conv[0]["content"][1]["text"])[1]
            objs = [o for o in scene.objects if o.shape == name]
            masks = [mask_utils.frPyObjects(rle(object_mask(o)), IMAGE_SIZE, IMAGE_SIZE) for o in objs]
            masks = [{**m, "counts": m["counts"].decode()} for m in masks]
            out.append(GenerationResult([DetectionsPart("[SEG]", [[v / IMAGE_SIZE for v in o.box] for o in objs],
                                                        [1.0] * len(objs), masks, IMAGE_SIZE)], "stop", 1, 1))
        return out

    oracle.generate = generate
    summary, _ = evaluate_detection(oracle, str(eval_dir / "coco_test.json"), SEGMENT_PROMPT, progress=False)
    assert not summary["class_agnostic"]
    assert summary["segm_ap"] == pytest.approx(1.0) and summary["bbox_ap"] == pytest.approx(1.0)
    # with --limit, the images left out are not scored as missed (they were: AP fell with the limit)
    summary, _ = evaluate_detection(oracle, str(eval_dir / "coco_test.json"), SEGMENT_PROMPT, limit=1,
                                    progress=False)
    assert summary["images"] == 1 and summary["bbox_ap"] == pytest.approx(1.0)


def test_f1_by_threshold_counts_what_a_server_keeping_scores_above_t_returns():
    from mmbridge.evaluate import f1_by_threshold

    dataset = {"annotations": [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10]},
                               {"image_id": 1, "category_id": 1, "bbox": [20, 20, 10, 10]}]}

    def det(score, x, y, category=1):
        return {"image_id": 1, "category_id": category, "score": score, "bbox": [x, y, 10, 10]}

    detections = [det(0.9, 0, 0), det(0.6, 50, 50), det(0.4, 1, 0), det(0.3, 20, 20, category=2), det(0.2, 20, 20)]
    f1 = f1_by_threshold(dataset, detections, thresholds=(0.1, 0.25, 0.35, 0.5, 0.7, 0.95))
    # kept / right: 0.1 -> 5 / 2 (the duplicate and the other category miss), 0.25 -> 4 / 1, 0.35 -> 3 / 1,
    # 0.5 -> 2 / 1, 0.7 -> 1 / 1, 0.95 -> nothing kept
    assert f1 == {0.1: round(4 / 7, 4), 0.25: round(2 / 6, 4), 0.35: round(2 / 5, 4), 0.5: 0.5, 0.7: round(2 / 3, 4),
                  0.95: 0.0}
