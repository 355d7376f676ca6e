"""The draw recipe's stages run through the same Trainer as every stage: a see-model gains the draw head,
trains on caption -> image data (stage 1: lm + draw_ldm + draw_caption) and on stories / edit dialogues
with LoRA (stage 2), and draws afterwards."""

import json

import pytest
import torch
import yaml

from mmbridge.data.shapes.act import ATTRIBUTES
from mmbridge.pretrain.draw import add_draw_head, write_draw_data
from mmbridge.pretrain.shapes import write_stage_data
from mmbridge.recipes import __file__ as recipes_init
from mmbridge.testing import build_tiny_sd
from mmbridge.train.config import load_stage_config
from mmbridge.train.fixtures import make_base_model
from mmbridge.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("fresh_accelerate")
TINY_DRAW = {"mapper_hidden_size": 32, "mapper_layers": (1, 1), "mapper_heads": 2, "num_inference_steps": 2}


def test_draw_data_is_llava_with_images_in_answers(tmp_path):
    counts = write_draw_data(tmp_path, num_scenes=3, num_stories=2, see_turns=2)
    # per story: told, told a turn at a time, an edit; a see chat per stage-1 scene (stage 2 mixes them in)
    assert counts == {"stage1_records": 3, "stage2_records": 6, "see_chats": 3}
    stage1 = json.loads((tmp_path / "draw_stage1.json").read_text())
    see = json.loads((tmp_path / "see.json").read_text())
    assert see[0]["image"] == stage1[0]["image"][0] and len(see[0]["conversations"]) >= 4
    assert "<image>" in see[0]["conversations"][0]["value"]
    assert stage1[0]["conversations"][1]["value"] == "<image>"
    assert (tmp_path / stage1[0]["image"][0]).is_file()
    story, turns = json.loads((tmp_path / "draw_stage2.json").read_text())[:2]
    assert story["conversations"][1]["value"].count("<image>") == len(story["image"]) == 3
    assert [m["from"] for m in turns["conversations"]] == ["human", "gpt"] * 3 and turns["image"] == story["image"]
    assert turns["conversations"][2]["value"].startswith("Then ") and turns["conversations"][3]["value"] == "<image>"
    # the stories' openings, for the draw mapper: both tellings cut after their first picture, with its caption
    first = json.loads((tmp_path / "draw_story_first.json").read_text())
    assert [r["id"] for r in first] == ["story-0-first", "story-turns-0-first", "story-1-first", "story-turns-1-first"]
    assert first[0]["image"] == story["image"][:1] and first[0]["captions"] == story["captions"][:1]
    opening = first[0]["conversations"][1]["value"]
    assert opening.count("<image>") == 1 and opening.endswith("<image>")
    assert story["conversations"][1]["value"].startswith(opening)
    assert first[1]["conversations"] == turns["conversations"][:2]


def test_draw_stages_train_through_the_trainer_and_the_model_draws(tmp_path):
    from pathlib import Path

    from mmbridge.generation import MMBridgePipeline

    make_base_model(tmp_path / "see", init_std=0.02)
    build_tiny_sd(tmp_path / "generator")
    add_draw_head(tmp_path / "see", tmp_path / "generator", tmp_path / "base", **TINY_DRAW)
    write_draw_data(tmp_path / "data", num_scenes=6, num_stories=2)
    recipes = Path(recipes_init).parent
    short = ["schedule.total_steps=2", "schedule.warmup_steps=1", "data.batch_size=2", "data.num_workers=0",
             "run.progress_bar=false"]
    stage1 = load_stage_config(recipes / "shapes_draw_stage1.yaml", [
        f"model={tmp_path / 'base'}", f"data.datasets.0.path={tmp_path / 'data' / 'draw_stage1.json'}", *short])
    result = Trainer(stage1, tmp_path / "stage1").fit()
    assert set(result["losses"]) == {"lm", "draw_ldm", "draw_caption"}
    write_stage_data(tmp_path / "see-data", num_scenes=3, qa_per_scene=2)
    stage2 = load_stage_config(recipes / "shapes_draw_stage2.yaml", [
        f"model={tmp_path / 'stage1' / 'model'}", f"data.datasets.0.path={tmp_path / 'data' / 'draw_stage2.json'}",
        f"data.datasets.1.path={tmp_path / 'see-data' / 'instruct.json'}", *short])
    result = Trainer(stage2, tmp_path / "stage2").fit()
    assert set(result["losses"]) == {"lm", "draw_ldm"}

    pipe = MMBridgePipeline.from_pretrained(tmp_path / "stage2" / "model")
    assert pipe.model.config.llm_lora and pipe.processor.image_head == "draw"
    [out] = pipe.generate([{"role": "user", "content": "Draw a small red circle."}], max_new_tokens=4)
    assert out.finish_reason in ("stop", "length")  # decoding runs with the head's hook in place


def test_the_recipe_runs_the_draw_then_the_act_stages_on_a_given_see_model_and_exports_one_model(tmp_path):
    """`mmbridge train shapes ... see_model=DIR 'stages=[draw_data, draw_stage1, draw_stage2, act_data, act_stage1,
    act_stage2, draw_mapper, export]'` (how the shipped model is made from a see-model and the foundation's
    generator): the draw head is added and trained in two trainer stages (stage 2 mixing in draw_data's own see
    chats: this run has no stage-3 data), the act head goes on the draw model, the draw mapper is fit on the
    final LLM's cached states, and the export carries the generator inside (the model dir moves and still draws);
    a second run skips every stage."""
    import shutil

    from mmbridge.config import MMBridgeConfig
    from mmbridge.generation import MMBridgePipeline
    from mmbridge.pretrain.recipe import (
        RECIPES_DIR,
        RUN_ORDER,
        ActStage,
        DrawStage,
        Recipe,
        RecipeConfig,
        TrainerStage,
    )

    assert "draw_stage1" not in RecipeConfig(name="x").stages  # opt-in: the see recipe is unchanged
    make_base_model(tmp_path / "see", init_std=0.02, object_attributes=ATTRIBUTES)  # act reads regions from queries
    build_tiny_sd(tmp_path / "foundation" / "generator")
    short = ["schedule.total_steps=2", "schedule.warmup_steps=1", "data.batch_size=2", "data.num_workers=0"]
    stages = ["draw_data", "draw_stage1", "draw_stage2", "act_data", "act_stage1", "act_stage2", "draw_mapper",
              "export"]
    tiny_act = {"decoder_hidden_size": 16, "decoder_layers": 1, "decoder_heads": 2, "num_object_queries": 4,
                "mask_size": 8}
    cfg = RecipeConfig(name="draw-test", stages=stages, threads=1, see_scenes=0, base_dir=str(RECIPES_DIR),
                       see_model=str(tmp_path / "see"),
                       draw=DrawStage(train_scenes=6, stories=2, see_turns=2, head=TINY_DRAW, mapper_steps=2,
                                      mapper_batch_size=2, mapper_held_out=2),
                       draw_stage1=TrainerStage("shapes_draw_stage1.yaml", short),
                       draw_stage2=TrainerStage("shapes_draw_stage2.yaml", short),
                       act=ActStage(train_scenes=4, see_turns=1, eval_scenes=2, head=tiny_act, text_encoder=False,
                                    pose_figures=2, eval_pose_figures=1),
                       act_stage1=TrainerStage("shapes_act_stage1.yaml", short),
                       act_stage2=TrainerStage("shapes_act_stage2.yaml", short))
    assert [s for s in RUN_ORDER if s in stages] == stages
    recipe = Recipe(cfg, tmp_path / "run", log=lambda _: None)
    recipe.foundation = tmp_path / "foundation"  # as `foundation=DIR` resolves it
    report = recipe.run()
    assert report["stages"]["draw_stage1"]["steps"] == 2 and report["stages"]["draw_stage2"]["steps"] == 2
    assert report["stages"]["act_stage2"]["steps"] == 2
    # the mapper is fit last, on the act model's LLM (act stage 2 moved its LoRA), and that model is exported
    assert report["stages"]["draw_mapper"]["samples"] == 4
    assert report["stages"]["draw_mapper"]["drawings"] == 6 + 2 * 2  # the requests + both tellings' first frames
    assert (tmp_path / "run" / "draw" / "mapper" / "model" / "config.json").is_file()
    # act stage 2 trains the LoRA: the draw requests stay in its mix, or the model forgets to draw
    act2 = yaml.safe_load((tmp_path / "run" / "act" / "stage2" / "config.yaml").read_text())
    # refusals (text answers the frozen LM of stage 1 cannot learn) only here, when the few scenes asked for any
    refusals = ["refusals"] if report["stages"]["act_data"]["train"]["refusal_chats"] else []
    # and the region questions answered in words, when the scenes asked any
    region = ["region_vqa"] if json.loads((tmp_path / "run" / "act" / "data" / "region_vqa.json").read_text()) else []
    assert [d["name"] for d in act2["data"]["datasets"]] == ["act", "see", *region, *refusals, "draw", "pose"]
    act1 = yaml.safe_load((tmp_path / "run" / "act" / "stage1" / "config.yaml").read_text())
    assert [d["name"] for d in act1["data"]["datasets"]] == ["act", "pose"]
    assert act2["losses"]["draw_ldm"] == 1.0 and act2["data"]["datasets"][-2]["path"].endswith("draw_stage1.json")
    assert report["stages"]["export"]["frozen_parts_identical"]
    exported = MMBridgeConfig.from_pretrained(tmp_path / "run" / "model")
    assert exported.component_paths["draw.generator"] == "generator" and exported.llm_lora
    assert {"draw", "act"} <= set(exported.head_configs)
    again = Recipe(cfg, tmp_path / "run", log=lambda _: None)
    again.foundation = tmp_path / "foundation"
    assert again.run()["stages"] == report["stages"]
    shutil.move(tmp_path / "run" / "model", tmp_path / "moved")
    shutil.rmtree(tmp_path / "foundation")  # the export needs no generator outside its own directory
    pipe = MMBridgePipeline.from_pretrained(tmp_path / "moved")
    assert pipe.processor.image_head == "draw"
    [out] = pipe.generate([{"role": "user", "content": "Draw a small red circle."}], max_new_tokens=4)
    assert out.finish_reason in ("stop", "length")


def test_the_draw_stages_say_where_the_generator_comes_from(tmp_path):
    from mmbridge.pretrain.recipe import ConfigError, DrawStage, Recipe, RecipeConfig

    make_base_model(tmp_path / "stage3" / "model", init_std=0.02)
    cfg = RecipeConfig(name="draw-test", stages=["draw_data", "draw_stage1"], threads=1, see_scenes=0,
                       draw=DrawStage(train_scenes=2, stories=1))
    with pytest.raises(ConfigError, match="draw_generator=true"):
        Recipe(cfg, tmp_path, log=lambda _: None).run()


def test_draw_records_say_what_each_drawing_shows_and_the_caption_target_is_that(tmp_path):
    """A record's `"captions"` (one per `<image>` in the answers) become the draw targets' captions — the
    generator's own words for the image, not the user's request; a count that does not match is a clear error."""
    from mmbridge.processing import MMBridgeProcessor
    from mmbridge.train.data import LlavaJsonDataset, SampleError, llava_to_messages

    write_draw_data(tmp_path / "data", num_scenes=2, num_stories=1, see_turns=0)
    [first] = json.loads((tmp_path / "data" / "draw_stage1.json").read_text())[:1]
    request = first["conversations"][0]["value"]
    assert first["captions"][0] != request and first["captions"][0].lower().rstrip(".") in request.lower()
    stage2 = json.loads((tmp_path / "data" / "draw_stage2.json").read_text())
    assert all(len(r["captions"]) == len(r["image"]) for r in stage2)

    make_base_model(tmp_path / "see", init_std=0.02)
    build_tiny_sd(tmp_path / "generator")
    add_draw_head(tmp_path / "see", tmp_path / "generator", tmp_path / "base", **TINY_DRAW)
    processor = MMBridgeProcessor.from_pretrained(tmp_path / "base")
    story = LlavaJsonDataset(str(tmp_path / "data" / "draw_stage2.json"))[0]
    targets = processor([story], return_labels=True)["head_targets"]["[IMG0]"]
    assert [t["caption"] for t in targets] == stage2[0]["captions"]
    # without captions: the user's last words, as before
    plain = llava_to_messages(stage2[0]["conversations"], [None] * 3)
    assert processor.assistant_images_to_heads(plain)[1]["content"][-1]["target"]["caption"].startswith("Tell me")
    with pytest.raises(SampleError, match="captions"):
        llava_to_messages(stage2[0]["conversations"], [None] * 3, captions=["one", "two"])
    with pytest.raises(SampleError, match="left over"):
        llava_to_messages(stage2[0]["conversations"], [None] * 3, captions=["a", "b", "c", "d"])


def test_the_draw_mapper_fits_on_cached_llm_states_alone_and_resumes(tmp_path):
    """`fit_draw_mapper` (the recipe's `draw_mapper`): the frozen LLM runs once over the draw data, the mapper
    alone trains on what it read (held-out caption MSE falls), nothing else moves, and a rerun on the same
    directory resumes from the loop's last save instead of starting again."""
    from safetensors.torch import load_file

    from mmbridge.modeling import MMBridgeModel
    from mmbridge.pretrain.draw import fit_draw_mapper

    make_base_model(tmp_path / "see", init_std=0.02)
    build_tiny_sd(tmp_path / "generator")
    add_draw_head(tmp_path / "see", tmp_path / "generator", tmp_path / "base", mapper_reads_request=True,
                  **TINY_DRAW)
    write_draw_data(tmp_path / "data", num_scenes=24, num_stories=2, see_turns=0)
    data = [tmp_path / "data" / "draw_stage1.json", tmp_path / "data" / "draw_stage2.json"]
    logged = []
    result = fit_draw_mapper(tmp_path / "base", data, tmp_path / "fit", steps=40, batch_size=8, lr=3e-3,
                             held_out=6, log=logged.append)
    assert result["drawings"] == 24 + 2 * 3 * 2 + 2 * 2  # requests, stories told twice, edit dialogues
    mse = result["held_out_caption_mse"]
    assert mse["after"] < 0.8 * mse["before"], mse
    assert any("cached" in entry for entry in logged) and logged[-1]["step"] == 40

    # the saved artifacts (the frozen base rows under the vokens' trainable rows are not saved: never read)
    before = load_file(str(tmp_path / "base" / "trainable.safetensors"))
    after = load_file(str(tmp_path / "fit" / "model" / "trainable.safetensors"))
    assert before.keys() == after.keys()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith("draw.mapper.") for k in moved), sorted(k for k in moved if "mapper" not in k)
    assert MMBridgeModel.from_pretrained(tmp_path / "fit" / "model").config.head_configs["draw"].mapper_reads_request

    trained = load_file(str(tmp_path / "fit" / "work" / "mapper" / "weights.safetensors"))
    again = fit_draw_mapper(tmp_path / "base", data, tmp_path / "fit", steps=40, batch_size=8, lr=3e-3,
                            held_out=6, log=lambda _: None)
    assert again["held_out_caption_mse"]["after"] == mse["after"]  # resumed at step 40: nothing left to train
    assert all(torch.equal(v, load_file(str(tmp_path / "fit" / "work" / "mapper" / "weights.safetensors"))[k])
               for k, v in trained.items())
