"""The ShapesWorld recipe end to end on tiny settings (`shapes-smoke`), and `mmbridge eval` on its result."""

import json
import os
from pathlib import Path

import pytest
import torch

from mmbridge.cli import main


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe") / "run"
    torch.manual_seed(0)
    assert main(["train", "shapes-smoke", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def eval_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    assert main(["data", "shapes", "--out", str(out), "--num", "6", "--split", "test", "--format", "eval"]) == 0
    return out


def test_every_stage_runs_and_reports(smoke_run):
    from mmbridge.pretrain.recipe import STAGES

    report = json.loads((smoke_run / "report.json").read_text())
    assert list(report["stages"]) == list(STAGES)
    assert all(report["stages"][s]["seconds"] >= 0 for s in STAGES)
    assert set(report["stages"]["stage1"]["final_losses"]) == {"itc", "itm", "itg", "objects"}
    assert report["stages"]["stage2"]["steps"] == 2 and report["stages"]["stage3"]["steps"] == 2
    assert report["stages"]["export"]["frozen_parts_identical"] is True
    # draw's stage 0: a StableDiffusionPipeline dir conditioned on the stage-0 CLIP text tower
    generator = Path(report["stages"]["generator"]["generator_dir"])
    assert (generator / "model_index.json").is_file() and (generator / "unet").is_dir()
    assert 0 <= report["stages"]["generator"]["vae_reconstructions_read_back_faithful_val300"] <= 1
    # stage 3 learned from the LLaVA chats the data stage wrote; stage 2 from both shard sets
    assert (smoke_run / "data" / "instruct.json").is_file()
    assert list((smoke_run / "data" / "captions").glob("shard-*.tar"))


def test_report_has_the_see_table_retrieval_and_the_soft_prompt_scale(smoke_run):
    """Issue 13: stages 2-3 keep ITC; after stages 1-3 the report holds retrieval R@1, after 2-3 the see
    rows (teacher-forced, free, question-only per type), and the frozen LM's blind baselines; the composed
    bridge scales soft prompts to the LM's token embeddings."""
    report = json.loads((smoke_run / "report.json").read_text())
    stages = report["stages"]
    assert set(stages["stage2"]["final_losses"]) == set(stages["stage3"]["final_losses"]) == {"lm", "itc", "objects"}
    assert all(stages[s]["itc_recall_at_1_val1000"]["n"] == 1000 for s in ("stage1", "stage2", "stage3"))
    table = report["see_table"]
    assert list(table["retrieval"]) == ["stage1", "stage2", "stage3"]
    assert [(r["stage"], r["row"]) for r in table["rows"]] == [
        *((s, row) for s in ("stage2", "stage3") for row in ("teacher_forced", "free", "question_only")),
        ("frozen LM", "text_upper_bound"), ("frozen LM", "question_only_lm")]
    assert all({"count", "color", "shape", "exists"} <= set(r) for r in table["rows"])
    assert stages["compose"]["projection_norm_scale"] > 0
    for stage in ("stage1", "stage2", "stage3"):  # attributes and their binding in the soft prompt
        probes = stages[stage]["soft_prompt_probes"]
        assert "single_color" in probes and all(0 <= v <= 1 for v in probes.values())
        slots = stages[stage]["object_slots"]  # the object set loss's queries (modeling/objects.py)
        assert slots["objects"] > 500 and 0 <= slots["bound"] <= min(slots["color"], slots["shape"], slots["size"])


def test_frozen_parts_are_bit_identical_after_stages_1_to_3(smoke_run):
    from mmbridge.modeling import MMBridgeModel

    base = MMBridgeModel.from_pretrained(smoke_run / "base").state_dict()
    final = MMBridgeModel.from_pretrained(smoke_run / "model").state_dict()
    # stage 3 wraps the LM's layers with LoRA: `q_proj.weight` is now `q_proj.base_layer.weight`
    assert any(".lora_B." in k for k in final)
    final = {k.replace(".base_layer.", "."): v for k, v in final.items()}
    frozen = [k for k in base if k.startswith(("vision.", "llm."))]
    assert frozen and all(torch.equal(base[k], final[k]) for k in frozen)
    trained = [k for k in base if k.startswith(("qformer.model.", "projection."))]
    assert any(not torch.equal(base[k], final[k]) for k in trained)


def test_rerun_skips_finished_stages(smoke_run, capsys):
    assert main(["train", "shapes-smoke", "--out", str(smoke_run)]) == 0
    out = capsys.readouterr().out
    assert "[stage3] done before, skipped" in out and "[lm] running" not in out


def test_lm_gate_stops_the_recipe_and_keeps_the_trained_lm(tmp_path, capsys):
    out = str(tmp_path / "run")
    args = ["train", "shapes-smoke", "--out", out, "--until", "lm_gate"]
    assert main(args + ["lm_gate.min_accuracy=0.98"]) == 2
    assert "LM gate: text-only QA on held-out scenes is" in capsys.readouterr().err
    assert (tmp_path / "run" / "lm" / "config.json").is_file()
    assert main(args) == 0  # the smoke recipe's gate (0): goes on without training the LM again
    assert "[lm] done before, skipped" in capsys.readouterr().out


BRIDGES = "stages=[compose,data,stage1,stage2,stage3,export]"


def test_bridges_train_on_a_foundation_directory_and_keep_it_frozen(smoke_run, tmp_path, monkeypatch):
    """`shapes` trains only the bridges, reading the frozen stage-0 models from a foundation dir
    (`foundation=DIR`, or the package's `shipped` one) as the seeds read downloaded weights. Both
    directories relative, as the README writes them (the trainer stages once resolved the data paths
    against their YAML's folder and found no shards)."""
    from transformers import AutoModelForCausalLM

    from mmbridge.modeling import MMBridgeModel

    monkeypatch.chdir(tmp_path)
    foundation = os.path.relpath(smoke_run, tmp_path)
    assert main(["train", "shapes-smoke", "--out", "bridges", BRIDGES, f"foundation={foundation}"]) == 0
    out = tmp_path / "bridges"
    report = json.loads((out / "report.json").read_text())
    assert list(report["stages"]) == ["compose", "data", "stage1", "stage2", "stage3", "export"]
    assert report["foundation"] == str(smoke_run.resolve()) and not (out / "lm").exists()
    model = MMBridgeModel.from_pretrained(out / "model").state_dict()
    foundation_lm = AutoModelForCausalLM.from_pretrained(smoke_run / "lm").state_dict()
    model = {k.replace(".base_layer.", "."): v for k, v in model.items()}
    assert all(torch.equal(model[f"llm.model.{k}"], v) for k, v in foundation_lm.items() if f"llm.model.{k}" in model)
    assert sum(f"llm.model.{k}" in model for k in foundation_lm) > 5


def test_a_missing_or_mixed_foundation_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "shapes-smoke", "--out", str(tmp_path / "a"), BRIDGES, f"foundation={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "not a foundation directory" in err and "shapes-foundation" in err
    assert main(["train", "shapes-smoke", "--out", str(tmp_path / "b"), f"foundation={tmp_path}"]) == 2
    assert "cannot also train one" in capsys.readouterr().err
    assert main(["train", "shapes-smoke", "--out", str(tmp_path / "c"), "stages=[lm,stage9]"]) == 2
    assert "stage9" in capsys.readouterr().err


def test_shipped_recipes_split_foundation_and_bridges():
    from mmbridge.pretrain.recipe import BRIDGE_STAGES, FOUNDATION_STAGES, load_recipe

    assert load_recipe("shapes-foundation").stages == list(FOUNDATION_STAGES)
    bridges = load_recipe("shapes")
    assert bridges.stages == list(BRIDGE_STAGES) and bridges.foundation == "shipped"


def test_unknown_recipe_and_bad_until_are_named(tmp_path, capsys):
    assert main(["train", "shapez", "--out", str(tmp_path / "x")]) == 2
    assert "shapes-smoke" in capsys.readouterr().err
    assert main(["train", "shapes-smoke", "--out", str(tmp_path / "y"), "--until", "stage9"]) == 2
    assert "stage9" in capsys.readouterr().err


def test_eval_commands_print_one_json_object(smoke_run, eval_files, tmp_path, capsys):
    model = str(smoke_run / "model")
    for task, file in (("vqa", "vqa_test.jsonl"), ("caption", "caption_test.jsonl"),
                       ("retrieval", "caption_test.jsonl")):
        preds = tmp_path / f"{task}.jsonl"
        assert main(["eval", task, "--model", model, "--questions", str(eval_files / file), "--out", str(preds),
                     "--no-progress", "--batch-size", "4"]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["task"] == task and summary["n"] == len(preds.read_text().splitlines()) > 0


def test_eval_rejects_missing_or_wrong_files(eval_files, tmp_path, capsys):
    assert main(["eval", "vqa", "--model", "x", "--questions", str(tmp_path / "none.jsonl")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["eval", "vqa", "--model", "x", "--questions", str(eval_files / "caption_test.jsonl")]) == 2
    assert "no usable vqa records" in capsys.readouterr().err


class _CannedPipeline:
    """Answers from a table, so the scoring itself is what is tested."""

    def __init__(self, answers):
        self.answers = answers

    def generate(self, conversations, images=None, **kwargs):
        from mmbridge.generation import GenerationResult, TextPart

        out = []
        for conv in conversations:
            text = self.answers[conv[0]["content"][1]["text"]]
            out.append(GenerationResult([TextPart(text)], "stop", 0, 0, [], text))
        return out


def test_vqa_scoring_uses_the_official_normalisation(eval_files):
    from mmbridge.data.formats.evaljsonl import read_eval_jsonl
    from mmbridge.evaluate import evaluate_vqa

    records = list(read_eval_jsonl(str(eval_files / "vqa_test.jsonl"), kind="vqa"))[:4]
    # "Red." / "Three" normalise to "red" / "3"; the last answer is wrong on purpose.
    variants = {0: lambda a: a.capitalize() + ".", 1: lambda a: a, 2: lambda a: f" {a} ", 3: lambda a: "nope"}
    answers = {r["question"]: variants[i](r["answer"]) for i, r in enumerate(records)}
    summary, preds = evaluate_vqa(_CannedPipeline(answers), records, batch_size=3, progress=False)
    assert [p["correct"] for p in preds] == [True, True, True, False]
    assert summary["accuracy"] == 0.75 and summary["n"] == 4
    assert sum(v["n"] for v in summary["per_type"].values()) == 4


def test_caption_scoring_counts_triples(eval_files):
    from mmbridge.data.formats.evaljsonl import read_eval_jsonl
    from mmbridge.evaluate import evaluate_caption

    rec = next(read_eval_jsonl(str(eval_files / "caption_test.jsonl"), kind="caption"))
    perfect = ", ".join(f"a {o['size']} {o['color']} {o['shape']}" for o in rec["objects"]) + "."
    summary, _ = evaluate_caption(_CannedPipeline({"Describe the image.": perfect}), [rec], progress=False)
    assert summary["f1"] == 1.0
    summary, _ = evaluate_caption(_CannedPipeline({"Describe the image.": "nothing here"}), [rec], progress=False)
    assert summary["f1"] == 0.0


def test_vision_gate_stops_the_foundation_and_names_the_probe(smoke_run, tmp_path, capsys):
    """A ViT whose object features do not carry colour, shape, size and position is not frozen."""
    import shutil

    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(smoke_run / "vision", out / "vision")
    args = ["train", "shapes-smoke", "--out", str(out), "stages=[vision_gate]"]
    assert main(args + ["vision_gate.min_accuracy=0.99"]) == 2
    assert "vision gate: linear probes" in capsys.readouterr().err
    assert main(args) == 0
    probes = json.loads((out / "report.json").read_text())["stages"]["vision_gate"]["probes_val"]
    assert set(probes) == {"color", "shape", "size", "region", "objects_val"}
