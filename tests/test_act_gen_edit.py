"""The act head's [GEN] and [EDIT] routes on a tiny random Stable-Diffusion-layout generator.

[GEN]: the routing token's super-link states go through the draw head's mapper into its UNet (one
generator, two ways to ask). [EDIT]: InstructPix2Pix — a UNet widened for the source latent, initialised
from the draw UNet, trained with ε-MSE on ShapesWorld edit pairs, sampled with 3-way CFG in one batched
UNet call. Both answer with an ImagePart; [EDIT] without an image answers in words. `mmbridge eval edit`
reads edited images back with the world reader (an oracle edit scores 1.0)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json

import pytest
import torch
from PIL import Image

from mmbridge.data.shapes.edit_eval import (
    IMPOSSIBLE_EDITS,
    edit_instruction_issue,
    edit_messages,
    edit_score,
    refusal_messages,
)
from mmbridge.data.shapes.edits import EDIT_KINDS, edit_pair
from mmbridge.data.shapes.reader import read_image
from mmbridge.generation import ImagePart, MMBridgePipeline, TextPart, part_to_dict
from mmbridge.generation.parts import NO_IMAGE_TO_EDIT, build_part
from mmbridge.heads_config import ActConfig, DrawConfig
from mmbridge.testing import build_tiny, build_tiny_sd, overfit

QUERIES = 8  # super-link queries per [GEN] / [EDIT] in these tests (64 by default)


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-sd")
    build_tiny_sd(directory)
    return directory


def with_gen_edit(sd_dir, seed=0, tasks=("gen", "edit"), **kw):
    model, processor = build_tiny(seed=seed)
    torch.manual_seed(seed)  # the heads' weights, whatever ran before
    draw = DrawConfig(pipeline_path=str(sd_dir), mapper_hidden_size=32, mapper_layers=(1, 1), mapper_heads=2,
                      num_inference_steps=3)
    model.add_head(draw, processor.tokenizer)
    processor.register_head(draw)
    act = ActConfig(tasks=list(tasks), queries_per_generation_task=QUERIES, visual_prompts=False,
                    edit_num_inference_steps=3, **kw)
    model.add_head(act, processor.tokenizer)
    processor.register_head(act)
    return model, processor


def gen_turns(text="Draw a red square.", color=(220, 40, 40)):
    return [{"role": "user", "content": text},
            {"role": "assistant", "content": [{"type": "head", "head": "[GEN]", "target": {
                "image": Image.new("RGB", (16, 16), color), "caption": "a red square"}}]}]


def test_default_routes_components_and_loss_names(sd_dir):
    config = ActConfig(tasks=["det", "gen", "edit"])
    assert len(config.routes["[GEN]"]) == len(config.routes["[EDIT]"]) == 64  # the seed's default for gen/edit
    assert len(config.routes["[DET]"]) == 4
    assert "act.editor" in config.components and not any("gen" in c for c in config.components)
    model, _ = with_gen_edit(sd_dir)
    assert model.config.trainable["act.editor"] and not model.config.trainable["draw.generator"]
    assert {"act_gen", "act_gen_caption", "act_edit"} <= set(model.config.loss_names)
    # [GEN] uses the draw head's modules: no copy of them in the act head's weights
    assert not any(k.startswith("act.") and ".generator." in k for k in model.state_dict())
    assert model.act._draw is model.draw


def test_gen_and_edit_need_a_draw_head():
    model, processor = build_tiny()
    with pytest.raises(ValueError, match="add the draw head first"):
        model.add_head(ActConfig(tasks=["gen"], visual_prompts=False), processor.tokenizer)
    with pytest.raises(ValueError, match="edit_condition_dropout"):
        ActConfig(tasks=["edit"], edit_condition_dropout=0.5).validate()


def test_editor_starts_as_the_draw_unet(sd_dir):
    """InstructPix2Pix's init: the source latent's input channels have zero weights, so before training the
    editing UNet predicts exactly what the draw UNet does, whatever the source image."""
    model, _ = with_gen_edit(sd_dir)
    unet, editor = model.draw.generator.unet, model.act.editor.unet
    assert editor.config.in_channels == 2 * unet.config.in_channels == editor.conv_in.in_channels
    assert torch.all(editor.conv_in.weight[:, unet.config.in_channels:] == 0)
    torch.manual_seed(0)
    noisy, source = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    condition = torch.randn(2, 8, 16)
    with torch.no_grad():
        want = unet(noisy, 5, encoder_hidden_states=condition).sample
        got = editor(torch.cat([noisy, source], 1), 5, encoder_hidden_states=condition).sample
    torch.testing.assert_close(got, want)
    assert editor.conv_in.weight.data_ptr() != unet.conv_in.weight.data_ptr()  # its own weights: they train


def test_three_way_cfg_is_one_batched_unet_call(sd_dir):
    model, _ = with_gen_edit(sd_dir)
    calls = []
    model.act.editor.unet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape))
    hidden = torch.randn(2, 1 + QUERIES, 32)
    sources = torch.rand(2, 3, 16, 16) * 2 - 1
    images = model.act.editor.sample(model.draw.generator, hidden, sources, 7.5, 1.5, 3,
                                     torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 16, 16) and 0 <= images.min() and images.max() <= 1
    assert [s[0] for s in calls] == [6, 6, 6] and calls[0][1] == 8  # 3 conditions x 2 in one call; 4 + 4 channels
    calls.clear()
    model.act.editor.sample(model.draw.generator, hidden, sources, 1.0, 1.0, 3)
    assert [s[0] for s in calls] == [2, 2, 2]  # no guidance: one branch


def test_a_source_residual_editor_starts_as_an_exact_copy(sd_dir):
    """edit_source_residual: the UNet predicts a correction to the source latent, its conv_out zero at
    creation — so before any training an edit returns the VAE's reconstruction of the source, and the
    guided branch pair is one batched UNet call (instruction / none, both with the image)."""
    model, _ = with_gen_edit(sd_dir, edit_source_residual=True, edit_image_guidance_scale=1.0)
    editor, generator = model.act.editor, model.draw.generator
    assert editor.source_residual and torch.all(editor.unet.conv_out.weight == 0)
    calls = []
    editor.unet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    torch.manual_seed(0)
    hidden, sources = torch.randn(2, 1 + QUERIES, 32), torch.rand(2, 3, 16, 16) * 2 - 1
    images = editor.sample(generator, hidden, sources, 7.5, 1.0, 3, torch.Generator().manual_seed(0))
    assert calls == [4, 4, 4]
    with torch.no_grad():
        copy = generator.vae.decode(generator.vae.encode(sources).latent_dist.mode()).sample
    torch.testing.assert_close(images, (copy / 2 + 0.5).clamp(0, 1), atol=1e-5, rtol=1e-4)


def test_a_source_residual_editor_learns_a_correction(sd_dir):
    """Its loss is the x0-MSE of the correction (the edited latent minus the source's): at creation the
    correction is zero, so the loss is exactly the distance of the edited latent from the source's; the
    gradient reaches the zeroed conv_out; the source is never dropped (it is the anchor)."""
    model, processor = with_gen_edit(sd_dir, edit_source_residual=True, edit_image_guidance_scale=1.0)
    editor, generator = model.act.editor, model.draw.generator
    vae = generator.vae
    torch.manual_seed(0)
    sources, hidden = torch.rand(2, 3, 16, 16) * 2 - 1, torch.randn(2, 1 + QUERIES, 32)
    targets = -sources
    torch.manual_seed(1)
    loss = editor.loss(generator, hidden, sources, targets)
    torch.manual_seed(1)
    with torch.no_grad():
        edited = vae.encode(targets).latent_dist.mode() * vae.config.scaling_factor
        anchor = vae.encode(sources).latent_dist.mode() * vae.config.scaling_factor
    torch.testing.assert_close(loss, ((edited - anchor) ** 2).mean())
    loss.backward()
    assert editor.unet.conv_out.weight.grad.abs().sum() > 0
    assert editor.unet.conv_in.weight.grad[:, 4:].abs().sum() == 0  # zero conv_out: nothing upstream moves yet
    model.train()
    batch = processor([edit_messages(edit_pair("train", 0))], return_labels=True)
    assert torch.isfinite(model(**batch).losses["act_edit"])
    with pytest.raises(ValueError, match="edit_image_guidance_scale"):
        ActConfig(tasks=["edit"], edit_source_residual=True).validate()


def test_losses_and_what_trains(sd_dir):
    model, processor = with_gen_edit(sd_dir)
    edit = edit_pair("train", 0)
    batch = processor([edit_messages(edit), gen_turns()], return_labels=True)
    assert set(batch["head_targets"]) == {"[EDIT]", "[GEN]"}
    model.train()
    out = model(**batch)
    assert {"lm", "act_gen", "act_gen_caption", "act_edit", "act_edit_caption"} <= set(out.losses)
    assert all(torch.isfinite(v) for v in out.losses.values())
    out.loss.backward()
    assert model.act.editor.unet.conv_in.weight.grad[:, 4:].abs().sum() > 0  # the source channels learn
    assert model.act.editor.mapper.out.weight.grad is not None
    assert model.draw.mapper.out.weight.grad is not None  # [GEN] trains the draw head's mapper


def test_the_edit_caption_loss_pulls_the_mapper_towards_the_text_encoder(sd_dir):
    # run h2: a fresh edit mapper's output never moved the UNet; the caption loss says what the UNet reads
    model, processor = with_gen_edit(sd_dir)
    edit = edit_pair("train", 3)
    turns = edit_messages(edit)
    hidden = torch.randn(1, 1 + QUERIES, model.config.text_config.hidden_size)
    generator = model.draw.generator
    expected = generator.caption_embeds([turns[1]["content"][0]["target"]["caption"]])
    loss = model.act.editor.caption_loss(generator, hidden, [turns[1]["content"][0]["target"]["caption"]])
    assert torch.allclose(loss, torch.nn.functional.mse_loss(model.act.editor.mapper(hidden), expected))
    assert "act_edit_caption" in model(**processor([turns], return_labels=True)).losses
    del turns[1]["content"][0]["target"]["caption"]
    assert "act_edit_caption" not in model(**processor([turns], return_labels=True)).losses
    assert all(p.grad is None for p in model.draw.generator.parameters())  # the generator stays frozen


def test_edit_target_needs_its_source(sd_dir):
    model, processor = with_gen_edit(sd_dir)
    turns = edit_messages(edit_pair("train", 1))
    del turns[1]["content"][0]["target"]["source"]
    with pytest.raises(ValueError, match="'source' image"):
        model(**processor([turns], return_labels=True))


def test_llava_edit_records_load_the_source_and_the_result(tmp_path):
    from mmbridge.train.data import LlavaJsonDataset

    edit = edit_pair("train", 2)
    edit["before"].render().save(tmp_path / "before.png")
    edit["after"].render().save(tmp_path / "after.png")
    record = {"id": "e", "image": "before.png",
              "conversations": [{"from": "human", "value": "<image>\n" + edit["instruction"]},
                                {"from": "gpt", "value": "[EDIT]"}],
              "targets": {"[EDIT]": [{"image": "after.png", "source": "before.png"}]}}
    (tmp_path / "edits.json").write_text(json.dumps([record]))
    messages = LlavaJsonDataset(str(tmp_path / "edits.json"))[0]
    target = messages[1]["content"][0]["target"]
    assert messages[1]["content"][0]["head"] == "[EDIT]"
    assert list(target["source"].getdata()) == list(edit["before"].render().getdata())
    assert list(target["image"].getdata()) == list(edit["after"].render().getdata())

@pytest.fixture(scope="module")
def trained(sd_dir, tmp_path_factory):
    """Trained 40 steps on two edit pairs and two [GEN] requests (the frozen LM learns the routing tokens),
    saved and loaded back."""
    model, processor = with_gen_edit(sd_dir, seed=1, edit_condition_dropout=0.0)
    edits = [edit_pair("train", i) for i in range(2)]
    gens = [gen_turns(), gen_turns("Draw a blue circle.", (40, 40, 220))]
    batch = processor([*(edit_messages(e) for e in edits), *gens], return_labels=True)
    edit_losses = [losses["act_edit"] for losses in overfit(model, batch, steps=40, lr=1e-2)]
    directory = tmp_path_factory.mktemp("gen-edit-model")
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return {"model": model, "processor": processor, "edits": edits, "dir": directory, "losses": edit_losses}


def test_edit_route_end_to_end(trained):
    """Train a few steps, ask with an image and an instruction: the answer is an edited ImagePart, the same
    through a saved-and-loaded model and through a chat session."""
    assert min(trained["losses"][-5:]) < trained["losses"][0]
    edit = trained["edits"][0]
    source = edit["before"].render()
    pipe = MMBridgePipeline.from_pretrained(trained["dir"])
    assert not any(f.name == "model.safetensors" for f in trained["dir"].iterdir())  # generator referenced
    [result] = pipe.generate([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                              "text": edit["instruction"]}]}],
                             images=[source], max_new_tokens=QUERIES + 4)
    images = [p for p in result.parts if isinstance(p, ImagePart)]
    assert images, f"the trained model should edit: {result.raw_text!r}"
    assert images[0].route == "[EDIT]" and images[0].image.size == (16, 16)
    assert part_to_dict(images[0])["route"] == "[EDIT]"
    ids, added = result.token_ids, pipe.model.config.added_tokens
    start = ids.index(added["[EDIT]"])
    assert ids[start + 1:start + 1 + QUERIES] == [added[f"[EDIT_Q{i}]"] for i in range(QUERIES)]  # forced
    # the loaded editor is the trained one, and the answer is the in-memory model's
    [direct] = MMBridgePipeline(trained["model"], trained["processor"]).generate(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": edit["instruction"]}]}],
        images=[source], max_new_tokens=QUERIES + 4)
    assert [p for p in direct.parts if isinstance(p, ImagePart)][0].image.tobytes() == images[0].image.tobytes()
    again = pipe.chat().ask(edit["instruction"], images=[source], max_new_tokens=QUERIES + 4)
    assert [p for p in again.parts if isinstance(p, ImagePart)][0].image.tobytes() == images[0].image.tobytes()


def test_gen_route_end_to_end(trained):
    pipe = MMBridgePipeline(trained["model"], trained["processor"])
    [result] = pipe.generate([{"role": "user", "content": "Draw a red square."}], max_new_tokens=QUERIES + 4)
    images = [p for p in result.parts if isinstance(p, ImagePart)]
    assert images, f"the trained model should draw through [GEN]: {result.raw_text!r}"
    assert images[0].route == "[GEN]" and images[0].head == "act" and images[0].image.size == (16, 16)
    # one generator: [GEN] decodes exactly as the draw head would on the same states
    hidden = torch.randn(1, 1 + QUERIES, 32)
    model = trained["model"]
    torch.testing.assert_close(model.act.decode(hidden, "[GEN]", {})["image"],
                               model.draw.decode(hidden, "[IMG0]", {})["image"])


def test_edit_without_an_image_is_a_clear_answer(trained):
    model, processor = trained["model"], trained["processor"]
    turns = [{"role": "user", "content": "Make the red circle blue."},
             {"role": "assistant", "content": [{"type": "head", "head": "[EDIT]", "target": None}]}]
    ids = processor([turns])["input_ids"]
    [(row, _, name, route, tensors)] = model.decode_heads(ids)
    assert route == "[EDIT]" and not bool(tensors["has_image"])
    part = build_part("act", name, route, tensors)
    assert isinstance(part, TextPart) and part.text == NO_IMAGE_TO_EDIT
    # and through the pipeline: whatever the tiny model answers, no crash
    pipe = MMBridgePipeline(model, processor)
    for text in ("Make the red circle blue.", *IMPOSSIBLE_EDITS[:2]):
        [result] = pipe.generate([{"role": "user", "content": text}], max_new_tokens=QUERIES + 4)
        assert all(p.type in ("text", "image") for p in result.parts)


def test_instructions_the_world_cannot_do_get_a_clear_answer():
    for kind in EDIT_KINDS:
        edit = next(e for e in (edit_pair("train", i) for i in range(40)) if e["kind"] == kind)
        assert edit_instruction_issue(edit["instruction"]) is None, edit["instruction"]
    for text in ("make the circle blue", "remove the square", "move the triangle left", "make it large"):
        assert edit_instruction_issue(text) is None, text  # the issue's examples
    for text in IMPOSSIBLE_EDITS:
        reason = edit_instruction_issue(text)
        assert reason and "I can recolour" in reason, text
    assert '"transparent"' in edit_instruction_issue("Make it transparent.")
    turns = refusal_messages("Make it transparent.", edit_pair("train", 0)["before"].render())
    assert turns[1]["content"] == edit_instruction_issue("Make it transparent.")


def test_edit_score_oracle_is_exact_and_the_unedited_source_fails():
    for i in range(60):
        edit = edit_pair("test", i)
        score = edit_score(read_image(edit["after"].render()), edit)
        assert score["correct"] and score["untouched"] and score["edit_applied"], (edit["instruction"], score)
        assert not edit_score(read_image(edit["before"].render()), edit)["correct"], edit["instruction"]
    assert edit_score(None, edit)["no_image"]


def _write_edits(directory, n=6):
    from mmbridge.data.build import generate

    generate(str(directory), num=n, seed=0, split="test", formats=["wave2"], workers=1, wave2_num=n,
             progress=False)
    return directory / "edits" / "edits_test.jsonl"


def test_eval_edit_oracle_scores_one(tmp_path):
    from mmbridge.evaluate import evaluate_edit, read_edit_records

    records = read_edit_records(_write_edits(tmp_path))
    by_source = {r["source"]: r["edit"]["after"].render() for r in records}
    summary, rows = evaluate_edit(lambda requests: [(by_source[src], "done") for src, _ in requests], records,
                                  tmp_path / "out", batch_size=4, progress=False)
    assert summary["accuracy"] == summary["untouched"] == summary["edit_applied"] == 1.0 and summary["n"] == 6
    assert len(rows) == 6 and all((tmp_path / "out" / f"{r['id']}.png").exists() for r in rows)


def test_eval_edit_cli_on_a_tiny_model(trained, tmp_path, capsys):
    from mmbridge.cli import main

    edits = _write_edits(tmp_path, n=3)
    code = main(["eval", "edit", "--model", str(trained["dir"]), "--edits", str(edits), "--out",
                 str(tmp_path / "out"), "--no-progress", "--batch-size", "2"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["task"] == "edit" and summary["n"] == 3
    for key in ("accuracy", "objects", "untouched", "edit_applied", "readable", "kept", "no_image", "per_kind"):
        assert key in summary
    assert 0.0 <= summary["accuracy"] <= 1.0
    assert len((tmp_path / "out" / "edit.jsonl").read_text().splitlines()) == 3
    # a model without [EDIT] gets one clear line
    model, processor = build_tiny()
    model.save_pretrained(tmp_path / "plain")
    processor.save_pretrained(tmp_path / "plain")
    assert main(["eval", "edit", "--model", str(tmp_path / "plain"), "--edits", str(edits)]) == 2
    assert "no act head with an [EDIT] route" in capsys.readouterr().err


def test_the_openai_client_gets_the_edited_image(trained):
    """As for draw: the API returns the edited image in `message.images` (and typed parts on request)."""
    import base64
    import io

    import httpx
    import openai

    from mmbridge.serve.app import ServeSettings, create_app
    from mmbridge.serve.testing import running_server

    edit = trained["edits"][0]
    source = edit["before"].render()
    pipe = MMBridgePipeline(trained["model"], trained["processor"])
    [result] = pipe.generate([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                              "text": edit["instruction"]}]}],
                             images=[source], max_new_tokens=QUERIES + 4)
    [expected] = [p.image for p in result.parts if isinstance(p, ImagePart)]
    buffer = io.BytesIO()
    source.save(buffer, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": edit["instruction"]}]}]
    with running_server(create_app(pipe, ServeSettings(model_name="edit"))) as base_url:
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model="edit", messages=messages, max_tokens=QUERIES + 4)
        body = {"model": "edit", "messages": messages, "max_tokens": QUERIES + 4, "output_parts": True}
        typed = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=60).json()
    [image] = reply.choices[0].message.images
    got = Image.open(io.BytesIO(base64.b64decode(image["image_url"]["url"].split(",", 1)[1])))
    assert got.convert("RGB").tobytes() == expected.tobytes()
    [part] = [p for p in typed["choices"][0]["message"]["parts"] if p["type"] == "image"]
    assert part["route"] == "[EDIT]" and part["head"] == "act"


def test_a_trained_act_head_gains_the_edit_route(sd_dir, tmp_path):
    """`extend_head`: the shipped act head learns [EDIT] later; what it had (weights, token ids) stays."""
    from mmbridge.modeling import MMBridgeModel
    from mmbridge.processing import MMBridgeProcessor

    model, processor = with_gen_edit(sd_dir, tasks=["det", "gen"], decoder_hidden_size=16, decoder_layers=1,
                                     decoder_heads=2, num_object_queries=4, mask_size=8)  # no [EDIT] ...
    with pytest.raises(ValueError, match="reshape"):
        model.extend_head("act", processor.tokenizer, decoder_hidden_size=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = dict(model.config.added_tokens)
    head = model.extend_head("act", processor.tokenizer, tasks=["det", "gen", "edit"])  # ... and give it one
    processor.register_head(model.config.head_configs["act"])
    assert model.act is head and hasattr(head, "editor") and model.config.trainable["act.editor"]
    assert {k: v for k, v in model.config.added_tokens.items() if k in ids} == ids  # old rows keep their ids
    assert "[EDIT]" in model.config.added_tokens
    after = model.state_dict()
    kept = [k for k in before if "embed" not in k and "lm_head" not in k]
    assert all(torch.equal(before[k], after[k]) for k in kept)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = MMBridgeModel.from_pretrained(tmp_path)
    assert "[EDIT]" in MMBridgeProcessor.from_pretrained(tmp_path).heads["act"]
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items() if "editor" in k)


def test_the_recipe_gives_a_drawing_act_model_the_edit_route(sd_dir, tmp_path):
    """`stages=[..., act_stage2, act_edit, export]`: edit pairs written, the act head extended, the editor trained
    (`recipes/shapes_act_edit.yaml`); a model that cannot draw gets a clear error."""
    from mmbridge.config import MMBridgeConfig
    from mmbridge.modeling import MMBridgeModel
    from mmbridge.pretrain.recipe import RECIPES_DIR, ActStage, ConfigError, Recipe, RecipeConfig, TrainerStage

    stage2 = tmp_path / "act" / "stage2" / "model"
    edit_json = tmp_path / "act" / "data" / "edit.json"
    short = ["schedule.total_steps=2", "schedule.warmup_steps=1", "data.batch_size=2", "data.num_workers=0",
             f"data.datasets.1.path={edit_json}", f"data.datasets.2.path={edit_json}"]  # no act / see chats here
    cfg = RecipeConfig(name="edit-test", stages=["act_stage2", "act_edit", "export"], threads=1, see_scenes=0,
                       base_dir=str(RECIPES_DIR), act=ActStage(edit_pairs=4),
                       act_edit=TrainerStage("shapes_act_edit.yaml", short))
    model, processor = build_tiny(seed=0)
    model.save_pretrained(stage2)
    processor.save_pretrained(stage2)
    with pytest.raises(ConfigError, match="draw stages first"):
        Recipe(cfg, tmp_path, log=lambda _: None)._act_edit()

    model, processor = with_gen_edit(sd_dir, tasks=["gen"])
    model.save_pretrained(stage2)
    processor.save_pretrained(stage2)
    result = Recipe(cfg, tmp_path, log=lambda _: None)._act_edit()
    assert result["steps"] == 2 and result["data"]["edit_chats"] == 4
    record = json.loads(edit_json.read_text())[0]
    target = record["targets"]["[EDIT]"][0]
    # the mapper's text is the instruction (run k2), the one the user sent
    assert target["source"].startswith("images/edit-train-")
    assert target["caption"] in record["conversations"][0]["value"]
    trained = tmp_path / "act" / "edit" / "model"
    act = MMBridgeConfig.from_pretrained(trained).head_configs["act"]
    assert "[EDIT]" in act.routes
    assert act.edit_source_residual and act.edit_guidance_scale == act.edit_image_guidance_scale == 1.0  # run k2
    base = MMBridgeModel.from_pretrained(tmp_path / "act" / "edit" / "base")
    assert torch.all(base.act.editor.unet.conv_out.weight == 0)  # the residual editor starts as a copy
    draw_mapper = base.draw.mapper.state_dict()  # the edit mapper starts as the draw head's
    assert all(torch.equal(v, draw_mapper[k]) for k, v in base.act.editor.mapper.state_dict().items())
    trained_model = MMBridgeModel.from_pretrained(trained)
    start = base.act.editor.state_dict()
    after = trained_model.act.editor.state_dict()
    assert any(not torch.equal(start[k], after[k]) for k in start)
    # token_rows: only [EDIT] and its queries train; the rows of every other added token stay bit-identical
    # (run k3: an edit stage that trained them all lost the other routes)
    added = trained_model.config.added_tokens
    new_ids = [i for t, i in added.items() if t.startswith("[EDIT")]
    old_ids = [i for t, i in added.items() if not t.startswith("[EDIT")]
    def rows(model, ids):  # the rows as the layers use them (the trainable-rows adapter splices its own in)
        llm = model.llm.model
        with torch.no_grad():
            embedded = llm.get_input_embeddings()(torch.tensor(ids))
            unembedded = llm.get_output_embeddings()(torch.eye(embedded.shape[-1])).T[ids]
        return embedded, unembedded

    for before, after in zip(rows(base, old_ids), rows(trained_model, old_ids)):
        assert torch.equal(before, after)
    assert not torch.equal(rows(base, new_ids)[1], rows(trained_model, new_ids)[1])


def test_the_demo_edits_scores_and_saves(trained, tmp_path, capsys):
    from types import SimpleNamespace

    from mmbridge.commands.demo import EDIT_PAIRS, _edit

    pipe = MMBridgePipeline(trained["model"], trained["processor"])
    _edit(pipe, SimpleNamespace(out=str(tmp_path), max_new_tokens=QUERIES + 4))
    printed = capsys.readouterr().out
    assert f"of {len(EDIT_PAIRS)} edits right (read back by the world reader)." in printed
    assert printed.count("  you:   ") == len(EDIT_PAIRS) + 1
    chat = (tmp_path / "edit" / "chat.md").read_text()
    assert chat.count("**you:**") == len(EDIT_PAIRS) + 1 and list((tmp_path / "edit").glob("turn*.png"))
