"""`mmbridge eval all`: the eval files written once and reused, every task the model can do scored with its
own evaluator on one loaded model, the ones it cannot do listed with the reason, one markdown table + JSON."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from mmbridge.cli import main
from mmbridge.evaluate_all import DATA_MANIFEST, TASKS, markdown_table, write_eval_data
from mmbridge.heads_config import ActConfig, DrawConfig
from mmbridge.testing import build_tiny, build_tiny_sd


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_eval_data(tmp_path_factory.mktemp("eval-data"), scenes=3, progress=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny model that sees, draws and acts (detect, segment, ground, visual prompts, pose) but cannot edit."""
    sd_dir = tmp_path_factory.mktemp("tiny-sd")
    build_tiny_sd(sd_dir)
    model, processor = build_tiny(seed=0, init_std=0.5, image_text_hidden_size=16)  # with ITC: retrieval
    model.config.qformer_cls_token_id = processor.tokenizer.bos_token_id  # ITC text starts with it (as BLIP-2's)
    draw = DrawConfig(pipeline_path=str(sd_dir), mapper_hidden_size=32, mapper_layers=(1, 1), mapper_heads=2,
                      num_inference_steps=2)
    act = ActConfig(tasks=["det", "seg", "grd", "pose"], decoder_hidden_size=16, decoder_layers=1, decoder_heads=2,
                    num_object_queries=4, mask_size=8)
    for config in (draw, act):
        model.add_head(config, processor.tokenizer)
        processor.register_head(config)
    path = tmp_path_factory.mktemp("see-draw-act")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_eval_data_has_every_tasks_files_and_is_reused(data_dir):
    for name in ("vqa_test.jsonl", "caption_test.jsonl", "act/coco_test.json", "act/ground_test.jsonl",
                 "act/region_test.jsonl", "act/route_test.jsonl", "act/coco_pose_test.json",
                 "edits/edits_test.jsonl", "prompts_12.jsonl", "prompts_34.jsonl"):
        assert (data_dir / name).is_file(), name
    prompts = [json.loads(line) for line in (data_dir / "prompts_34.jsonl").read_text().splitlines()]
    assert len(prompts) == 3 and all(3 <= len(p["objects"]) <= 4 for p in prompts)
    stamp = (data_dir / "vqa_test.jsonl").stat().st_mtime_ns
    write_eval_data(data_dir, scenes=3, progress=False)  # same scenes and seed: nothing rewritten
    assert (data_dir / "vqa_test.jsonl").stat().st_mtime_ns == stamp
    assert json.loads((data_dir / DATA_MANIFEST).read_text())["scenes"] == 3


def test_eval_all_scores_what_the_model_can_do_and_says_what_it_cannot(model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "all"
    assert main(["eval", "all", "--model", str(model_dir), "--data", str(data_dir), "--scenes", "3", "--limit", "2",
                 "--out", str(out), "--no-progress", "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"`mmbridge eval all --model {model_dir}`: 3 test scenes, at most 2 items per task")
    assert "| task | metric | value | n | seconds |" in printed and (out / "all.md").read_text().strip() in printed
    results = json.loads((out / "all.json").read_text())["tasks"]
    assert list(results) == list(TASKS)
    assert results["edit"]["skipped"] == "this model has no act head with an [EDIT] route: it cannot edit images"
    assert "| edit | — | not supported: this model has no act head with an [EDIT] route" in printed
    for task in set(TASKS) - {"edit"}:
        assert "skipped" not in results[task], (task, results[task])
        assert json.loads((out / f"{task}.json").read_text()) == results[task]
    assert results["vqa"]["n"] >= 2 and 0 <= results["vqa"]["accuracy"] <= 1 and " " in results["vqa"]["worst_type"]
    assert results["retrieval"]["n"] == 2 and results["caption"]["n"] == 2
    assert results["detect"]["images"] == 2 and "bbox_ap" in results["detect"]
    assert "f1_by_threshold" not in results["detect"]  # the table's JSON keeps the headline numbers lean
    assert results["segment"]["requests"] == 2 * 5 and "segm_ap" in results["segment"]
    assert results["ground"]["n"] == 2 and results["region"]["n"] == 2 and results["route"]["n"] == 2
    assert results["pose"]["images"] == 1 and "keypoints_ap" in results["pose"]
    assert results["draw12"]["prompts"] == results["draw34"]["prompts"] == 2
    assert results["story"]["stories"] == 2 and (out / "story").is_dir()
    assert len(list((out / "draw12").glob("*.png"))) == results["draw12"]["drawn"]


def test_coco_tasks_lower_the_score_threshold_for_their_block_only():
    from mmbridge.evaluate_all import _score_threshold

    model, processor = build_tiny()
    model.add_head(ActConfig(tasks=["det"], score_threshold=0.35), processor.tokenizer)
    with _score_threshold(model, 0.05):
        assert model.act.config.score_threshold == 0.05
    assert model.act.config.score_threshold == 0.35


def test_eval_all_on_a_see_only_model_and_bad_arguments(tiny_model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "see"
    assert main(["eval", "all", "--model", str(tiny_model_dir), "--data", str(data_dir), "--scenes", "3",
                 "--tasks", "vqa,detect,draw12", "--limit", "2", "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "all.json").read_text())["tasks"]
    assert list(results) == ["vqa", "detect", "draw12"] and "accuracy" in results["vqa"]
    assert "no act head" in results["detect"]["skipped"] and "no draw head" in results["draw12"]["skipped"]
    capsys.readouterr()
    assert main(["eval", "all", "--model", str(tiny_model_dir), "--data", str(data_dir), "--tasks", "vqa,hexagons",
                 "--no-progress"]) != 0
    assert "--tasks: unknown ['hexagons']" in capsys.readouterr().err


def test_markdown_table_rows():
    table = markdown_table({"caption": {"task": "caption", "f1": 0.9351, "n": 1000, "seconds": 12.0},
                            "pose": {"task": "pose", "skipped": "no [POSE] route", "seconds": 0.0}})
    assert table.splitlines()[2:] == ["| caption | triple F1 | 0.935 | 1000 | 12.0 |",
                                      "| pose | — | not supported: no [POSE] route | | |"]
