"""The shipped `shapes` model: loadable by name, within its size budget, frozen parts untouched by its
adapters, and answering test-split scenes it never saw. Thresholds sit a little below the numbers
measured when it was shipped (see docs/recipe.md), so a broken artifact or a regression in loading,
processing or generation fails here."""

import json
import re

import pytest

from mmbridge.cli import main
from mmbridge.models import resolve_model_path, sample_images_dir
from mmbridge.pretrain.recipe import SHIPPED_FOUNDATION

# Measured on the shipped artifact with `mmbridge eval` (docs/recipe.md); the tests allow some slack.
MIN_VQA_ACCURACY_30_SCENES = 0.85  # measured 0.923 (271 questions; 0.899 on 1,000 scenes)
MIN_DEMO_RIGHT = 12  # measured 15 of 16 (run j5)
MIN_DEMO_ACT_RIGHT = 9  # measured 12 of 12 (the act head: docs/recipe.md, "Act", run j5; 8 of 12 at threshold 0.25)
MIN_DEMO_POSES_RIGHT = 2  # measured 2 of 2 at OKS 0.99 / 1.00 (keypoint AP 0.965 on 250 figures, run j5)
MIN_DEMO_MISSING_CLASS_RIGHT = 1  # measured 2 of 2 ("There is no shape."; 60 of 80 on the refusal probe, run j5)


@pytest.fixture(scope="module")
def eval_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    assert main(["data", "shapes", "--out", str(out), "--num", "30", "--split", "test", "--format", "eval"]) == 0
    return out


def test_shipped_model_loads_by_name_within_budget():
    from mmbridge.config import MMBridgeConfig

    path = resolve_model_path("shapes")
    # the issues' budget: every model asset of the package (this model + the foundation) within 64 MB
    assets = [f for d in (path, SHIPPED_FOUNDATION) for f in d.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in assets) <= 64 * 2**20
    config = MMBridgeConfig.from_pretrained(path)
    assert config.qformer_instruction and config.llm_lora
    # its draw generator is the foundation's, referenced (not a copy): the model dir holds no generator
    assert config.component_paths == {"draw.generator": "../../foundation/shapes/generator"}
    assert not (path / "generator").exists()
    draw = config.head_configs["draw"]  # the draw head (MiniGPT-5): [IMG0]..[IMG7] -> mapper -> the generator
    assert draw.routes == {"[IMG0]": [f"[IMG{i}]" for i in range(1, 8)]}
    assert draw.mapper_reads_request  # the mapper reads the request's words too (run n: fit by draw_mapper)
    assert "/" not in json.dumps([config.vision_config._name_or_path, config.text_config._name_or_path])
    act = config.head_configs["act"]  # the act head (VisionLLM v2): detect, segment, ground, visual prompts, pose
    assert set(act.routes) == {"[DET]", "[SEG]", "[GRD]", "[POSE]"} and act.visual_prompts and act.text_encoder
    assert act.selection_attributes and act.selection_vocab_size  # the attribute-factored selection
    assert act.score_threshold == 0.15  # best F1 on 300 val scenes (docs/recipe.md, "Run j5": 0.948)
    assert act.region_from_queries  # a <region> is read from the Q-Former query that holds it (runs g1, g4)
    # masks pixel for pixel, cut to their boxes which they tighten, duplicates dropped (runs e2, g4)
    assert act.mask_size == 64 and act.box_refinement and act.masks_in_boxes and act.duplicate_iou == 0.5
    assert act.duplicate_oks == 0.9  # poses: OKS-NMS (on run g1's weights: keypoint AP 0.29 -> 0.40)
    assert act.pose_heatmaps  # keypoints as soft-argmax heatmaps on the pixel decoder (run j3: AP 0.617 -> 0.965)
    assert not act.route_mid_answer  # a route only opens an answer (run h1 routed 4 of 200 captions mid-sentence)


def test_shipped_model_answers_unseen_test_scenes(eval_files, capsys):
    assert main(["eval", "vqa", "--model", "shapes", "--questions", str(eval_files / "vqa_test.jsonl"),
                 "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] > 200 and result["accuracy"] >= MIN_VQA_ACCURACY_30_SCENES, result


def test_chat_by_name_answers_a_sample(capsys):
    sample = json.loads((sample_images_dir() / "samples.json").read_text())[0]
    count = next(q for q in sample["questions"] if q["question"] == "How many shapes are there?")
    assert main(["chat", "--model", "shapes", "--image", str(sample_images_dir() / sample["image"]),
                 "--prompt", count["question"]]) == 0
    assert capsys.readouterr().out.strip() in {"1", "2", "3", "4"}  # a count; its accuracy is measured above


def test_demo_prints_mostly_right_answers(capsys, tmp_path):
    assert main(["demo", "--out", str(tmp_path)]) == 0  # its images and overlays: not into the checkout
    out = capsys.readouterr().out
    right, asked = map(int, re.search(r"(\d+) of (\d+) answers right", out).groups())
    assert asked >= 12 and right >= MIN_DEMO_RIGHT
    act_right, act_asked = map(int, re.search(r"(\d+) of (\d+) act answers right", out).groups())
    assert act_asked == 12 and act_right >= MIN_DEMO_ACT_RIGHT
    missing_right, missing_asked = map(int, re.search(r"(\d+) of (\d+) requests for a missing class", out).groups())
    assert missing_asked == 2 and missing_right >= MIN_DEMO_MISSING_CLASS_RIGHT
    poses_right, poses_asked = map(int, re.search(r"(\d+) of (\d+) poses right", out).groups())
    assert poses_asked == 2 and poses_right >= MIN_DEMO_POSES_RIGHT
    # it draws: each request answered with an image saved under --out, read back and marked right or wrong
    # (how often right is measured on 100s of prompts: docs/recipe.md, "Draw")
    _, draw_asked = map(int, re.search(r"(\d+) of (\d+) drawings right", out).groups())
    assert draw_asked == 2 and len(re.findall(r"image: \S+\.png +\[(?:right|wrong): read", out)) == 2
    assert len(list(tmp_path.glob("*.png"))) == 2 and (tmp_path / "chat.md").is_file()
    assert "multi-turn chat" in out and "Traceback" not in out
