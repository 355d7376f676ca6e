"""Stage 0 of draw: the ShapesWorld generator (VAE + text-conditioned UNet) trains, resumes exactly after
an interruption, and is saved as a StableDiffusionPipeline dir that diffusers and the draw head load."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from mmbridge.pretrain.diffusion import (
    GeneratorConfig,
    caption_embeds,
    save_generator,
    shapes_batches,
    train_unet,
    train_vae,
)
from mmbridge.tokenization import with_final_word_token


def tiny_cfg(**kw):
    return GeneratorConfig(image_size=32, vae_channels=[8, 16], vae_steps=6, vae_batch_size=4, unet_channels=[16, 32],
                           unet_attention_head_dim=4, unet_steps=6, unet_batch_size=4, max_caption_tokens=16,
                           warmup_steps=1, save_every=3, num_train_timesteps=100, **kw)


@pytest.fixture(scope="module")
def text_tower():
    from transformers import CLIPTextConfig, CLIPTextModel

    from mmbridge.testing import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                                           pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                           eos_token_id=tokenizer.eos_token_id))
    return encoder.eval(), tokenizer


def test_batches_are_a_function_of_the_step():
    batches = shapes_batches(tiny_cfg())
    a, b = batches(3, 2), batches(3, 2)
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert a[0].shape == (2, 3, 32, 32) and a[0].min() >= -1 and a[0].max() <= 1
    assert not torch.equal(batches(-1, 2)[0], batches(1, 2)[0])  # held-out stream


def test_generator_captions_are_what_draw_requests_say():
    """Half draw requests (the eval prompts' shape: a relation that holds for 2 objects), half short captions;
    every one parses back to the scene's objects, and a named relation is true in the scene."""
    from mmbridge.data.shapes.faithfulness import parse_request, relation_holds
    from mmbridge.data.shapes.world import make_scene, rng_for
    from mmbridge.pretrain.diffusion import generator_caption

    rng = rng_for(0, stream=15)
    kinds = {"request": 0, "short": 0, "relation": 0}
    for i in range(200):
        scene = make_scene("train", i)
        text = generator_caption(scene, rng)
        request = parse_request(text)
        assert request.objects == [(o.size, o.color, o.shape) for o in scene.objects], text
        kinds["short" if "background" in text else "request"] += 1
        if request.relation:
            kinds["relation"] += 1
            a, b = scene.objects[request.relation.a], scene.objects[request.relation.b]
            assert relation_holds(a, b, request.relation.rel), text
    assert 60 < kinds["request"] < 140 and kinds["relation"] > 10
    # `request_rate` / `relation_rate` (GeneratorConfig's, through the batches): every caption a request, every
    # 2-object one with its relation
    captions = shapes_batches(tiny_cfg(request_rate=1.0, relation_rate=1.0))(0, 24)[1]
    scenes = [make_scene("train", i) for i in range(24)]
    assert not any("background" in text for text in captions)
    assert all(parse_request(text).relation for text, scene in zip(captions, scenes) if len(scene.objects) == 2)
    with pytest.raises(ValueError, match="generator caption"):
        shapes_batches(tiny_cfg(caption="poem"))


def test_vae_resumes_exactly_after_an_interruption(tmp_path):
    cfg = tiny_cfg()
    images = lambda step, n: shapes_batches(cfg)(step, n)[0]  # noqa: E731
    straight = train_vae(cfg, images, tmp_path / "a", log=lambda d: None)

    def interrupted(step, n):
        if step == 4:
            raise KeyboardInterrupt
        return images(step, n)

    with pytest.raises(KeyboardInterrupt):
        train_vae(cfg, interrupted, tmp_path / "b", log=lambda d: None)
    assert (tmp_path / "b" / "vae" / "state.pt").is_file()  # the step-3 checkpoint
    resumed = train_vae(cfg, images, tmp_path / "b", log=lambda d: None)
    for (name, x), y in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(x, y), name
    assert straight.config.scaling_factor == resumed.config.scaling_factor > 0


def test_generator_dir_loads_in_diffusers_and_in_the_draw_head(tmp_path, text_tower):
    from diffusers import StableDiffusionPipeline

    from mmbridge.modeling.draw.diffusion import DiffusionGenerator

    encoder, tokenizer = text_tower
    cfg = tiny_cfg()
    batches = shapes_batches(cfg)
    vae = train_vae(cfg, lambda step, n: batches(step, n)[0], tmp_path / "work", log=lambda d: None)
    frozen = {k: v.clone() for k, v in encoder.state_dict().items()}
    logs = []
    unet = train_unet(cfg, vae, encoder, tokenizer, batches, tmp_path / "work", log=logs.append)
    assert logs and "ldm" in logs[-1]
    assert all(torch.equal(frozen[k], v) for k, v in encoder.state_dict().items())
    out = save_generator(tmp_path / "generator", vae, unet, encoder, tokenizer, cfg)

    pipe = StableDiffusionPipeline.from_pretrained(out)
    # diffusers conditions the UNet exactly as it was trained: padding masked (`caption_embeds`)
    prompt_embeds, _ = pipe.encode_prompt("a large red circle", "cpu", 1, False)
    trained = caption_embeds(encoder, with_final_word_token(tokenizer), ["a large red circle"], cfg.max_caption_tokens)
    assert torch.equal(prompt_embeds, trained)
    image = pipe("a large red circle", num_inference_steps=2, height=32, width=32).images[0]
    assert image.size == (32, 32)
    generator = DiffusionGenerator.from_pretrained(out)
    assert generator.image_size == 32 and generator.condition_length == 16
    assert torch.equal(load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))["conv_in.weight"],
                       unet.conv_in.weight)


def test_dropped_captions_teach_both_unconditional_inputs(tmp_path, text_tower, monkeypatch):
    """CFG's unconditional input must be one the UNet was trained on: the empty caption's embedding (what
    diffusers' pipeline feeds) and an all-zero condition (what the draw head feeds) both occur."""
    from diffusers import UNet2DConditionModel

    encoder, tokenizer = text_tower
    cfg = tiny_cfg(caption_dropout=1.0)
    batches = shapes_batches(cfg)
    vae = train_vae(cfg, lambda step, n: batches(step, n)[0], tmp_path / "work", log=lambda d: None)
    seen = []
    forward = UNet2DConditionModel.forward

    def spy(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
        seen.append(encoder_hidden_states.detach().clone())
        return forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", spy)
    train_unet(cfg, vae, encoder, tokenizer, batches, tmp_path / "work", log=lambda d: None)
    rows = torch.cat(seen)
    zero = rows.flatten(1).abs().sum(dim=1) == 0
    empty = caption_embeds(encoder, tokenizer, [""], cfg.max_caption_tokens)[0]
    assert zero.any() and (~zero).any()
    assert all(torch.allclose(row, empty) for row in rows[~zero])  # every other caption was dropped to ""


def test_the_unet_reads_the_prompts_last_word_as_that_words_token(tmp_path, text_tower, monkeypatch):
    """A prompt's last word ("a small red circle": the shape) is tokenized as the same word mid-sentence or
    before a period. The plain tokenizer split it into pieces the text tower never saw in training, and the
    shipped generator drew the asked shape ~25 % of the time (chance: 20 %)."""
    from diffusers import UNet2DConditionModel

    encoder, tokenizer = text_tower
    final = with_final_word_token(tokenizer)
    assert final.tokenize("a large red circle") == final.tokenize("a large red circle.")[:-1]
    assert tokenizer.tokenize("a large red circle") != final.tokenize("a large red circle")
    cfg = tiny_cfg(caption_dropout=0.0)
    batches = shapes_batches(cfg)
    vae = train_vae(cfg, lambda step, n: batches(step, n)[0], tmp_path / "work", log=lambda d: None)
    seen = []
    forward = UNet2DConditionModel.forward

    def spy(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
        seen.append(encoder_hidden_states.detach().clone())
        return forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", spy)
    train_unet(cfg, vae, encoder, tokenizer, batches, tmp_path / "work", log=lambda d: None)
    captions = batches(0, cfg.unet_batch_size)[1]
    assert torch.equal(seen[0], caption_embeds(encoder, final, captions, cfg.max_caption_tokens))


def test_a_snapshot_of_a_run_is_the_generator_it_would_save(tmp_path, text_tower):
    """`snapshot_generator(run, out)` assembles the checkpoints of a (still running) generator stage into a
    pipeline dir: after the last step it equals what the stage itself saves."""
    from mmbridge.pretrain.diffusion import snapshot_generator

    encoder, tokenizer = text_tower
    encoder.save_pretrained(tmp_path / "text_encoder")
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    cfg = tiny_cfg()
    with pytest.raises(FileNotFoundError, match="no vae checkpoint"):
        snapshot_generator(tmp_path, tmp_path / "early", cfg)
    batches = shapes_batches(cfg)
    vae = train_vae(cfg, lambda step, n: batches(step, n)[0], tmp_path / "generator-work", log=lambda d: None)
    unet = train_unet(cfg, vae, encoder, tokenizer, batches, tmp_path / "generator-work", log=lambda d: None)
    snap = snapshot_generator(tmp_path, tmp_path / "snap", cfg)
    saved = save_generator(tmp_path / "saved", vae, unet, encoder, tokenizer, cfg)
    for part in ("unet", "vae"):
        a = load_file(str(snap / part / "diffusion_pytorch_model.safetensors"))
        b = load_file(str(saved / part / "diffusion_pytorch_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    scale = json.loads((snap / "vae" / "config.json").read_text())["scaling_factor"]
    assert scale == vae.config.scaling_factor
    assert json.loads((snap / "mmbridge_generator.json").read_text())["snapshot_steps"] == {"vae": 6, "unet": 6}


def test_bf16_autocast_trains_fp32_weights_on_fp32_targets(tmp_path, text_tower, monkeypatch):
    """`mixed_precision="bf16"` runs the forward passes under autocast, but the weights the optimizer updates,
    the noise target and the loss stay fp32; an unknown mode is refused by name."""
    from diffusers import UNet2DConditionModel

    encoder, tokenizer = text_tower
    cfg = tiny_cfg(mixed_precision="bf16")
    batches = shapes_batches(cfg)
    vae = train_vae(cfg, lambda step, n: batches(step, n)[0], tmp_path / "work", log=lambda d: None)
    dtypes = []
    forward = UNet2DConditionModel.forward

    def spy(self, sample, *args, **kwargs):
        out = forward(self, sample, *args, **kwargs)
        dtypes.append((sample.dtype, out.sample.dtype))
        return out

    monkeypatch.setattr(UNet2DConditionModel, "forward", spy)
    logs = []
    unet = train_unet(cfg, vae, encoder, tokenizer, batches, tmp_path / "work", log=logs.append)
    assert dtypes and all(noisy == torch.float32 and out == torch.bfloat16 for noisy, out in dtypes)
    assert all(p.dtype == torch.float32 for p in [*unet.parameters(), *vae.parameters()])
    assert torch.isfinite(torch.tensor(logs[-1]["ldm"]))
    with pytest.raises(ValueError, match="mixed_precision 'fp8'"):
        train_vae(tiny_cfg(mixed_precision="fp8"), lambda step, n: batches(step, n)[0], tmp_path / "x",
                  log=lambda d: None)


def test_a_stored_generator_is_half_the_bytes_and_loads_back_in_fp32(tmp_path, text_tower):
    """`store_generator` (how the package ships one): UNet and VAE in fp16, the text encoder untouched; the
    draw head and diffusers load fp32 weights equal to the fp16-rounded originals and sample."""
    from diffusers import StableDiffusionPipeline

    from mmbridge.modeling.draw.diffusion import DiffusionGenerator
    from mmbridge.pretrain.diffusion import store_generator

    encoder, tokenizer = text_tower
    cfg = tiny_cfg()
    batches = shapes_batches(cfg)
    vae = train_vae(cfg, lambda step, n: batches(step, n)[0], tmp_path / "work", log=lambda d: None)
    unet = train_unet(cfg, vae, encoder, tokenizer, batches, tmp_path / "work", log=lambda d: None)
    full = save_generator(tmp_path / "full", vae, unet, encoder, tokenizer, cfg)
    stored = store_generator(full, tmp_path / "stored")

    def size(part):
        return (stored / part / "diffusion_pytorch_model.safetensors").stat().st_size

    assert size("unet") < 0.6 * (full / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert load_file(str(stored / "unet" / "diffusion_pytorch_model.safetensors"))["conv_in.weight"].dtype \
        == torch.float16
    assert (stored / "text_encoder" / "model.safetensors").read_bytes() == \
        (full / "text_encoder" / "model.safetensors").read_bytes()
    assert (stored / "mmbridge_generator.json").is_file()
    generator = DiffusionGenerator.from_pretrained(stored)
    assert generator.unet.dtype == torch.float32
    assert torch.equal(generator.unet.conv_in.weight, unet.conv_in.weight.half().float())
    image = StableDiffusionPipeline.from_pretrained(stored)("a small red circle", num_inference_steps=2,
                                                            height=32, width=32).images[0]
    assert image.size == (32, 32)


def test_a_unet_on_posterior_means_with_a_reused_vae(tmp_path, text_tower):
    """`latents="mean"` trains the UNet on the VAE posterior's means (the shipped VAE's posterior is wide and
    its decoder ignores it: samples made most of the UNet's target noise); `vae_from` reuses a generator's
    VAE bit for bit and trains only the UNet. The saved dir records both, the draw head's LDM loss then noises
    the same means (deterministic in the image), and snapshots of such a run work."""
    from mmbridge.modeling.draw.diffusion import DiffusionGenerator, encode_latents
    from mmbridge.pretrain.diffusion import snapshot_generator, train_generator

    encoder, tokenizer = text_tower
    for part, obj in (("text_encoder", encoder), ("tokenizer", tokenizer)):
        obj.save_pretrained(tmp_path / "first" / part)
        obj.save_pretrained(tmp_path / "second" / part)
    train_generator(tmp_path / "first", encoder, tokenizer, tiny_cfg(), log=lambda d: None)
    cfg = tiny_cfg(latents="mean", vae_from=str(tmp_path / "first" / "generator"))
    report = train_generator(tmp_path / "second", encoder, tokenizer, cfg, log=lambda d: None)
    assert not (tmp_path / "second" / "generator-work" / "vae").exists()  # the VAE did not train
    first, second = (load_file(str(tmp_path / d / "generator" / "vae" / "diffusion_pytorch_model.safetensors"))
                     for d in ("first", "second"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert json.loads((tmp_path / "second" / "generator" / "mmbridge_generator.json").read_text())["latents"] == "mean"

    generator = DiffusionGenerator.from_pretrained(report["generator_dir"])
    assert generator.latents == "mean"
    assert DiffusionGenerator.from_pretrained(tmp_path / "first" / "generator").latents == "sample"
    images = shapes_batches(cfg)(0, 2)[0]
    with torch.no_grad():
        assert torch.equal(encode_latents(generator.vae, images, "mean"), encode_latents(generator.vae, images, "mean"))
        assert not torch.equal(encode_latents(generator.vae, images), encode_latents(generator.vae, images))
    with pytest.raises(ValueError, match="latents 'mode'"):
        encode_latents(generator.vae, images, "mode")

    # `unet_from` continues that UNet in a new directory (here for 0 steps: it starts exactly there), on scenes
    # past those it saw (`scene_offset`)
    for part, obj in (("text_encoder", encoder), ("tokenizer", tokenizer)):
        obj.save_pretrained(tmp_path / "third" / part)
    more = dataclasses.replace(cfg, unet_from=str(tmp_path / "second" / "generator"), unet_steps=0,
                               scene_offset=cfg.unet_steps * cfg.unet_batch_size)
    train_generator(tmp_path / "third", encoder, tokenizer, more, log=lambda d: None)
    third = load_file(str(tmp_path / "third" / "generator" / "unet" / "diffusion_pytorch_model.safetensors"))
    second = load_file(str(tmp_path / "second" / "generator" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(third[k], second[k]) for k in second)
    assert torch.equal(shapes_batches(more)(0, 1)[0], shapes_batches(cfg)(more.scene_offset, 1)[0])

    snap = snapshot_generator(tmp_path / "second", tmp_path / "snap", cfg)
    assert json.loads((snap / "mmbridge_generator.json").read_text())["snapshot_steps"] == {"unet": 6}
    unet = load_file(str(snap / "unet" / "diffusion_pytorch_model.safetensors"))
    saved = load_file(str(tmp_path / "second" / "generator" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(unet[k], saved[k]) for k in saved)


def test_the_generators_own_text_tower_trains_with_the_unet(tmp_path, text_tower):
    """`train_text_encoder=True` trains the generator's copy of the text tower with the UNet (the LDM loss
    reaches it): the generator dir holds the trained copy, the foundation's tower on disk stays as it was,
    snapshots read both parts from the one checkpoint, and a continuation (`unet_from`) starts from the
    trained copy. Without the flag the tower is not touched."""
    import copy

    from transformers import CLIPTextModel

    from mmbridge.pretrain.diffusion import snapshot_generator, train_generator

    encoder, tokenizer = text_tower
    original = {k: v.clone() for k, v in encoder.state_dict().items()}

    def tower(path):
        return CLIPTextModel.from_pretrained(path).state_dict()

    def same(a, b):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    for run in ("frozen", "joint", "more"):
        encoder.save_pretrained(tmp_path / run / "text_encoder")
        tokenizer.save_pretrained(tmp_path / run / "tokenizer")
    train_generator(tmp_path / "frozen", encoder, tokenizer, tiny_cfg(), log=lambda d: None)
    assert same(encoder.state_dict(), original)
    assert same(tower(tmp_path / "frozen" / "generator" / "text_encoder"), original)

    cfg = tiny_cfg(train_text_encoder=True)
    trained = copy.deepcopy(encoder)
    train_generator(tmp_path / "joint", trained, tokenizer, cfg, log=lambda d: None)
    saved = tower(tmp_path / "joint" / "generator" / "text_encoder")
    assert not same(saved, original) and same(saved, trained.state_dict())
    assert same(tower(tmp_path / "joint" / "text_encoder"), original)  # the foundation's copy: untouched
    assert not any(p.requires_grad for p in trained.parameters())  # handed back frozen

    snap = snapshot_generator(tmp_path / "joint", tmp_path / "snap", cfg)
    assert same(tower(snap / "text_encoder"), saved)
    unet = load_file(str(snap / "unet" / "diffusion_pytorch_model.safetensors"))
    assert same(unet, load_file(str(tmp_path / "joint" / "generator" / "unet" / "diffusion_pytorch_model.safetensors")))

    more = dataclasses.replace(cfg, unet_from=str(tmp_path / "joint" / "generator"), unet_steps=0)
    train_generator(tmp_path / "more", copy.deepcopy(encoder), tokenizer, more, log=lambda d: None)
    assert same(tower(tmp_path / "more" / "generator" / "text_encoder"), saved)


def test_unet_shape_settings_reach_the_diffusers_unet():
    """`unet_channels` sets the levels (all but the last cross-attend to the caption), `unet_layers_per_block`
    the resnets per level — as run o1's larger UNet was configured (docs/recipe.md)."""
    from mmbridge.pretrain.diffusion import build_unet

    cfg = dataclasses.replace(tiny_cfg(unet_layers_per_block=2), unet_channels=[16, 32, 32])
    unet = build_unet(cfg, condition_dim=16)
    assert [type(b).__name__ for b in unet.down_blocks] == ["CrossAttnDownBlock2D"] * 2 + ["DownBlock2D"]
    assert all(len(block.resnets) == 2 for block in unet.down_blocks)
    assert unet.config.layers_per_block == 2 and unet.config.cross_attention_dim == 16


def test_a_zero_terminal_snr_generator_trains_on_velocity_and_samples_from_pure_noise(tmp_path, text_tower,
                                                                                      monkeypatch):
    """`zero_terminal_snr` + `v_prediction`: the schedule ends with no signal left (so no layout can leak
    through the noised latent), the UNet's target is the velocity with the high-noise steps fully weighted,
    and the saved scheduler config carries all of it, so diffusers' pipeline and the draw head sample as
    trained ("trailing" timesteps start at the last, signal-free step)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from mmbridge.modeling.draw.diffusion import DiffusionGenerator
    from mmbridge.pretrain.diffusion import noise_scheduler

    with pytest.raises(ValueError, match="needs prediction_type: v_prediction"):
        tiny_cfg(zero_terminal_snr=True)
    with pytest.raises(ValueError, match="prediction_type 'x0'"):
        tiny_cfg(prediction_type="x0")
    cfg = tiny_cfg(zero_terminal_snr=True, prediction_type="v_prediction")
    scheduler = noise_scheduler(cfg)
    assert scheduler.alphas_cumprod[-1] < 1e-6 < noise_scheduler(tiny_cfg()).alphas_cumprod[-1]
    encoder, tokenizer = text_tower
    batches = shapes_batches(cfg)
    vae = train_vae(cfg, lambda step, n: batches(step, n)[0], tmp_path / "work", log=lambda d: None)
    targets = []
    velocity = DDPMScheduler.get_velocity

    def spy(self, sample, noise, timesteps):
        targets.append(timesteps)
        return velocity(self, sample, noise, timesteps)

    monkeypatch.setattr(DDPMScheduler, "get_velocity", spy)
    logs = []
    unet = train_unet(cfg, vae, encoder, tokenizer, batches, tmp_path / "work", log=logs.append)
    assert len(targets) == cfg.unet_steps and torch.isfinite(torch.tensor([log["ldm"] for log in logs])).all()
    assert isinstance(unet, UNet2DConditionModel)
    out = save_generator(tmp_path / "generator", vae, unet, encoder, tokenizer, cfg)
    pipe = StableDiffusionPipeline.from_pretrained(out)
    config = pipe.scheduler.config
    assert (config.prediction_type, config.rescale_betas_zero_snr, config.timestep_spacing) == \
        ("v_prediction", True, "trailing")
    pipe.scheduler.set_timesteps(4)
    assert int(pipe.scheduler.timesteps[0]) == cfg.num_train_timesteps - 1  # sampling starts at zero signal
    image = pipe("a large red circle", num_inference_steps=2, height=32, width=32).images[0]
    assert image.size == (32, 32)
    generator = DiffusionGenerator.from_pretrained(out)
    assert generator.train_scheduler.config.prediction_type == "v_prediction"
    assert generator.sample(torch.zeros(1, 16, 16), num_inference_steps=2).isfinite().all()
