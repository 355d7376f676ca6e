"""The draw head on a tiny random Stable-Diffusion-layout generator: loads from a standard diffusers
dir, trains its mapper (named losses draw_ldm / draw_caption, frozen generator untouched), draws
through the pipeline with classifier-free guidance, saves and loads with the generator referenced."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from PIL import Image

from mmbridge.generation import ImagePart, MMBridgePipeline, part_to_dict
from mmbridge.heads_config import DrawConfig
from mmbridge.testing import build_tiny, build_tiny_sd


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-sd")
    build_tiny_sd(directory)
    return directory


def draw_config(sd_dir, **kw):
    return DrawConfig(pipeline_path=str(sd_dir), mapper_hidden_size=32, mapper_layers=(1, 1), mapper_heads=2,
                      num_inference_steps=3, **kw)


def with_draw_head(sd_dir, seed=0, **kw):
    model, processor = build_tiny(seed=seed)
    config = draw_config(sd_dir, **kw)
    torch.manual_seed(seed)  # the head's weights, whatever ran before
    model.add_head(config, processor.tokenizer)
    processor.register_head(config)
    return model, processor


def drawing(color=(220, 40, 40), caption="a red square", text="Here it is: "):
    return {"role": "assistant", "content": [*([{"type": "text", "text": text}] if text else []),
                                             {"type": "head", "head": "draw",
                                              "target": {"image": Image.new("RGB", (16, 16), color),
                                                         "caption": caption}}]}


def fit(model, batch, steps=30):
    """A few AdamW steps on the trainable parameters; the caption loss at each, the model left in eval mode."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    torch.manual_seed(0)
    caption_losses = []
    for _ in range(steps):
        out = model(**batch, loss_names=["lm", "draw_caption", "draw_ldm"])
        caption_losses.append(out.losses["draw_caption"].item())
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    model.eval()
    return caption_losses


def test_real_sd_layout_loads_and_samples_in_diffusers(sd_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd_dir)
    image = pipe("a red square", num_inference_steps=2, height=16, width=16, output_type="pil").images[0]
    assert image.size == (16, 16)


def test_draw_head_components_vokens_and_losses(sd_dir, images):
    model, processor = with_draw_head(sd_dir)
    config = model.config
    assert config.head_configs["draw"].tokens == ["[IMG0]", *(f"[IMG{i}]" for i in range(1, 8))]
    assert {"draw.mapper", "draw.generator"} <= set(config.components)
    assert config.trainable["draw.mapper"] and not config.trainable["draw.generator"]
    assert config.component_paths["draw.generator"] == str(sd_dir)
    assert not any(p.requires_grad for p in model.draw.generator.parameters())

    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Draw a red square."}]}
    batch = processor([[user, drawing()]], images=images[:1], return_labels=True)
    model.train()
    out = model(**batch)
    assert set(out.losses) == {"lm", "draw_ldm", "draw_caption"}
    out.loss.backward()
    assert model.draw.mapper.out.weight.grad is not None
    assert all(p.grad is None for p in model.draw.generator.parameters())


def test_mapper_learns_and_the_pipeline_draws_an_image_part(sd_dir, tmp_path):
    model, processor = with_draw_head(sd_dir, condition_dropout=0.0)
    user = {"role": "user", "content": "Draw a red square."}
    batch = processor([[user, drawing(text="")]], return_labels=True)  # the frozen LM can only learn [IMG0]
    caption_losses = fit(model, batch)
    assert caption_losses[-1] < caption_losses[0] / 2  # the mapper learns the text encoder's space

    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert not any(f.name == "model.safetensors" for f in tmp_path.iterdir())  # generator referenced, not copied
    pipe = MMBridgePipeline.from_pretrained(tmp_path)
    [result] = pipe.generate([user], max_new_tokens=12)
    images = [p for p in result.parts if isinstance(p, ImagePart)]
    assert images, f"the trained model should draw: {result.raw_text!r}"
    assert images[0].image.size == (16, 16)
    assert part_to_dict(images[0])["url"].startswith("data:image/png;base64,")
    # the vokens after [IMG0] were forced, in order
    ids = result.token_ids
    start = ids.index(model.config.added_tokens["[IMG0]"])
    assert ids[start:start + 8] == [model.config.added_tokens[f"[IMG{i}]"] for i in range(8)]
    # same prompt, same image (seeded noise), and identical through a chat session
    again = pipe.chat().ask("Draw a red square.", max_new_tokens=12)
    assert [p for p in again.parts if isinstance(p, ImagePart)][0].image.tobytes() == images[0].image.tobytes()


def test_a_mapper_that_reads_the_request_words_too(sd_dir, tmp_path):
    """`mapper_reads_request`: a trained draw head gains it through `extend_head` (its weights kept, the
    request reader new), learns through it, and draws with it after save / load; padding is never read."""
    model, processor = with_draw_head(sd_dir, condition_dropout=0.0)
    before = {k: v.clone() for k, v in model.draw.mapper.state_dict().items()}
    torch.manual_seed(1)
    model.extend_head("draw", processor.tokenizer, mapper_reads_request=True)
    mapper = model.draw.mapper
    assert mapper.request_window and model.config.head_configs["draw"].mapper_reads_request
    assert all(torch.equal(mapper.state_dict()[k], v) for k, v in before.items())

    words = torch.randn(2, 5, model.config.text_config.hidden_size)
    mask = torch.tensor([[False, False, True, True, True], [True] * 5])
    vokens = torch.randn(2, 8, words.shape[-1])
    changed = words.clone()
    changed[0, :2] = 100.0  # only padding differs
    assert torch.allclose(mapper(vokens, words, mask)[0], mapper(vokens, changed, mask)[0], atol=1e-5)
    with pytest.raises(ValueError, match="request_states"):
        mapper(vokens)

    user = {"role": "user", "content": "Draw a red square."}
    batch = processor([[user, drawing(text="")]], return_labels=True)
    reader = {k: v.clone() for k, v in mapper.state_dict().items() if k.startswith("request_")}
    caption_losses = fit(model, batch)
    assert caption_losses[-1] < caption_losses[0] / 2
    assert all(not torch.equal(mapper.state_dict()[k], v) for k, v in reader.items())  # the words' reader learned
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    [result] = MMBridgePipeline.from_pretrained(tmp_path).generate([user], max_new_tokens=12)
    assert [p for p in result.parts if isinstance(p, ImagePart)], result.raw_text


def test_draw_head_needs_its_generator():
    model, processor = build_tiny()
    with pytest.raises(ValueError, match="StableDiffusionPipeline directory"):
        model.add_head(DrawConfig(mapper_hidden_size=32, mapper_heads=2), processor.tokenizer)


def test_cfg_runs_cond_and_uncond_in_one_batched_unet_call(sd_dir):
    from mmbridge.modeling.draw.diffusion import DiffusionGenerator

    generator = DiffusionGenerator.from_pretrained(sd_dir)
    calls = []
    generator.unet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    condition = torch.randn(2, 8, 16)
    images = generator.sample(condition, guidance_scale=7.5, num_inference_steps=3,
                              generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 16, 16) and calls == [4, 4, 4]
    calls.clear()
    generator.sample(condition, guidance_scale=1.0, num_inference_steps=3)
    assert calls == [2, 2, 2]  # no guidance: no unconditional branch


def test_assistant_images_are_drawing_targets(sd_dir, images):
    """Users write natural conversations: an image in the assistant's answer is what the model draws."""
    model, processor = with_draw_head(sd_dir)
    processor.image_head = "draw"
    red = Image.new("RGB", (16, 16), (220, 40, 40))
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Draw it in red."}]},
                    {"role": "assistant", "content": [{"type": "text", "text": "Here: "},
                                                      {"type": "image", "image": red}]}]
    batch = processor([conversation], images=images[:1], return_labels=True)
    assert batch["pixel_values"].shape[0] == 1  # only the user's image is an input
    [target] = batch["head_targets"]["[IMG0]"]
    assert target["image"] is red and target["caption"] == "Draw it in red."
    assert set(model(**batch).losses) == {"lm", "draw_ldm", "draw_caption"}

    processor.image_head = None
    with pytest.raises(ValueError, match="no drawing head"):
        processor([conversation], images=images[:1], return_labels=True)


def test_llava_answers_with_images_become_drawing_targets(sd_dir):
    from mmbridge.train.data import llava_to_messages

    turns = [{"from": "human", "value": "Draw a red square."}, {"from": "gpt", "value": "Here: <image>"}]
    messages = llava_to_messages(turns, ["red.png"])
    assert messages[1]["content"] == [{"type": "text", "text": "Here:"}, {"type": "image", "image": "red.png"}]


def test_cli_output_writer_saves_images_beside_a_markdown_page(tmp_path):
    from mmbridge.commands.outputs import OutputWriter
    from mmbridge.generation import GenerationResult, TextPart

    result = GenerationResult([TextPart("Here:"), ImagePart(Image.new("RGB", (16, 16), (1, 2, 3)))], "stop", 3, 9)
    [path] = OutputWriter(tmp_path / "out").write("Draw a square.", result)
    assert Image.open(path).getpixel((0, 0)) == (1, 2, 3)
    page = (tmp_path / "out" / "chat.md").read_text()
    assert "Draw a square." in page and f"]({path.name})" in page
