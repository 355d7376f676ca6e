"""Stage 0 of the draw head: a ShapesWorld latent-diffusion generator trained from nothing, then frozen.

The seeds freeze Stable Diffusion; ShapesWorld trains its own in miniature with the same parts and the
same layout, so the draw head loads it exactly as it would load SD 1.5 / 2.1:

1. a VAE (`AutoencoderKL`), 64x64x3 <-> a small latent, reconstruction + a tiny KL term; its latent
   scale (`scaling_factor`) is measured on the data, as SD's 0.18215 was;
2. a text-conditioned UNet (`UNet2DConditionModel`) on caption -> image, conditioned on the stage-0 CLIP
   text tower's last hidden state — exactly how SD is conditioned by CLIP — with DDPM training
   (Min-SNR-γ weighting) and 10 % of captions dropped for classifier-free guidance (half to the empty
   caption, diffusers' unconditional input; half to an all-zero condition, the draw head's);
3. saved as a `StableDiffusionPipeline` directory (vae/, unet/, text_encoder/, tokenizer/, scheduler/ with
   DDIM), which `diffusers.StableDiffusionPipeline.from_pretrained` samples from as is.

Each part trains in its own resumable loop (checkpoints every `save_every` steps: weights in
safetensors, optimizer and step restored with `torch.load(weights_only=True)`), so the foundation can
run for hours across sessions.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mmbridge.modeling.draw.diffusion import encode_latents
from mmbridge.pretrain import LoopCheckpoint, resumable_loop


@dataclass
class GeneratorConfig:
    image_size: int = 64
    latent_channels: int = 4
    vae_channels: list[int] = field(default_factory=lambda: [16, 32, 64])  # 3 levels: 64 -> 16x16 latents
    vae_steps: int = 2000
    vae_batch_size: int = 16
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    #: one entry per UNet level, each level halves the latent: every level but the last cross-attends to
    #: the caption (with [64, 128] only the 16 x 16 level does, plus the mid block at 8 x 8)
    unet_channels: list[int] = field(default_factory=lambda: [64, 128])
    unet_layers_per_block: int = 1
    unet_attention_head_dim: int = 8
    unet_steps: int = 10000
    unet_batch_size: int = 32
    unet_lr: float = 5e-4
    caption_dropout: float = 0.1  # empty caption or zero condition -> classifier-free guidance
    snr_gamma: float = 5.0
    num_train_timesteps: int = 1000
    max_caption_tokens: int = 64  # the text encoder's sequence = the UNet's cross-attention length
    warmup_steps: int = 100
    save_every: int = 500
    seed: int = 0
    #: "bf16": forward passes under CPU autocast (weights, optimizer and losses stay fp32); 25-30 % faster
    #: steps on a CPU with bf16 units (measured: a UNet step 0.95 -> 0.7 s, a VAE encode 0.16 -> 0.05 s)
    mixed_precision: str = "no"
    #: training captions: "draw" (half draw requests with a relation for 2 objects, half short captions),
    #: "short" (short captions) or "description" (the long scene description)
    caption: str = "draw"
    #: what the UNet denoises: "sample" (a draw from the VAE's posterior, SD's convention) or "mean" (the
    #: posterior's mean). A VAE with a small KL weight has a wide posterior its decoder ignores (the shipped
    #: one: posterior std 0.6-1.5 against the means' 0.2-1.5 per channel, scaled units), so on samples most
    #: of the UNet's target is noise nothing reads back. Saved in `mmbridge_generator.json`, where the draw
    #: head's LDM loss reads it (`DiffusionGenerator.latents`).
    latents: str = "sample"
    #: reuse the VAE of this generator dir (frozen, its training skipped) and train only the UNet
    vae_from: str | None = None
    #: start the UNet from this generator dir's UNet (same shape) and train it `unet_steps` more on a fresh
    #: schedule: a longer run continued in a new directory, the old one kept (run n2, docs/recipe.md)
    unet_from: str | None = None
    #: the first training scene's index: a continuation (`unet_from`) sets it past the scenes already seen
    #: (a run sees unet_steps x unet_batch_size of them)
    scene_offset: int = 0
    #: train the generator's own copy of the CLIP text tower with the UNet (the LDM loss reaches it; one
    #: optimizer, one learning rate), as diffusers' DreamBooth `--train_text_encoder` does. The foundation's tower
    #: is causal and trained contrastively on whole captions, so the state at a 2-object caption's second shape
    #: word tells the first object's colour better than its own (`scripts/text_tower_binding_probe.py`), and
    #: drawings give the second object the first one's attributes; the LDM loss asks for each object's own
    #: (run p1, docs/recipe.md: wrong attributes on the second object 84 -> 6 in ~110 two-object drawings,
    #: faithful 50.7 -> 66.0 % in 3,000 steps, where 4,000 steps with the tower frozen had gained 1.4 points).
    #: The copy is saved in the generator dir (`text_encoder/`), so the draw head's caption targets follow it;
    #: the foundation's tower (the act head's, the see side's) stays as it is. With `unet_from`, training
    #: starts from that generator's tower.
    train_text_encoder: bool = False
    #: with `caption="draw"`: the share of draw requests among the captions (the rest: short captions), and
    #: the share of 2-object requests that state a relation
    request_rate: float = 0.5
    relation_rate: float = 0.8
    #: the noise schedule ends at zero signal (diffusers' `rescale_betas_zero_snr`, sampled with "trailing"
    #: timesteps; Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed"), which needs
    #: `prediction_type="v_prediction"` (an ε-prediction is undefined where no signal is left). SD's default
    #: schedule keeps √ᾱ = 0.068 of the image at its last step: on ShapesWorld's flat backgrounds that is
    #: enough for the UNet to read where the objects are from the noised latent itself (its x̂0 is nearer the
    #: true image's latent than the mirrored image's in 73 % of val scenes at t = 999, 84 % at t = 950;
    #: `scripts/layout_leak_probe.py`),
    #: so in training it never has to take positions from the caption, and relation words went unused
    #: (ε-loss with the true vs the flipped relation equal at every t; drawn relations at chance). Sampling
    #: starts from pure noise, where the caption is all there is. Run q1 (docs/recipe.md): the leak is gone, but
    #: in 3,000 steps relations stayed at chance (the loss hardly depends on them) and faithfulness fell 66 -> 61 %,
    #: so it is off by default and the shipped generator keeps SD's schedule.
    zero_terminal_snr: bool = False
    #: "epsilon" (SD 1.x) or "v_prediction" (SD 2.x); saved in the scheduler config the pipeline reads
    prediction_type: str = "epsilon"

    def __post_init__(self):
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"generator.prediction_type {self.prediction_type!r}: "
                             "expected 'epsilon' or 'v_prediction'")
        if self.zero_terminal_snr and self.prediction_type != "v_prediction":
            raise ValueError("generator.zero_terminal_snr needs prediction_type: v_prediction (at zero signal "
                             "the noise is the whole input and an ε-prediction tells nothing about the image)")


def build_vae(cfg: GeneratorConfig):
    from diffusers import AutoencoderKL

    levels = len(cfg.vae_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=cfg.latent_channels,
                         block_out_channels=tuple(cfg.vae_channels), layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels,
                         norm_num_groups=min(32, cfg.vae_channels[0]), sample_size=cfg.image_size)


def build_unet(cfg: GeneratorConfig, condition_dim: int):
    from diffusers import UNet2DConditionModel

    levels = len(cfg.unet_channels)
    latent_size = cfg.image_size // 2 ** (len(cfg.vae_channels) - 1)
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
        layers_per_block=cfg.unet_layers_per_block, block_out_channels=tuple(cfg.unet_channels),
        cross_attention_dim=condition_dim,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        attention_head_dim=cfg.unet_attention_head_dim, norm_num_groups=min(32, cfg.unet_channels[0]))


def noise_scheduler(cfg: GeneratorConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule="scaled_linear",
                         beta_start=0.00085, beta_end=0.012, clip_sample=False, steps_offset=1,
                         prediction_type=cfg.prediction_type, rescale_betas_zero_snr=cfg.zero_terminal_snr,
                         timestep_spacing="trailing" if cfg.zero_terminal_snr else "leading")


# -- resumable loops ---------------------------------------------------------------------------------
def _autocast(cfg: GeneratorConfig):
    if cfg.mixed_precision not in ("no", "bf16"):
        raise ValueError(f"generator.mixed_precision {cfg.mixed_precision!r}: expected 'no' or 'bf16'")
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16")


def train_vae(cfg: GeneratorConfig, images: Callable[[int, int], torch.Tensor], work_dir: Path,
              log: Callable[[dict], None] = print):
    """`images(step, n)` -> (n, 3, H, W) in [-1, 1]. Returns the trained VAE with its latent scale set."""
    torch.manual_seed(cfg.seed)
    vae = build_vae(cfg)

    def step_loss(step: int) -> dict[str, torch.Tensor]:
        batch = images(step, cfg.vae_batch_size)
        with _autocast(cfg):
            posterior = vae.encode(batch).latent_dist
            recon = vae.decode(posterior.sample()).sample
        return {"recon": F.mse_loss(recon.float(), batch), "kl": cfg.kl_weight * posterior.kl().float().mean()}

    resumable_loop(vae, cfg.vae_steps, cfg.vae_lr, cfg.warmup_steps, LoopCheckpoint(work_dir / "vae"),
                   cfg.save_every, step_loss, log)
    set_latent_scale(vae, images, cfg)
    return vae


def reused_vae(cfg: GeneratorConfig):
    """The frozen VAE of generator dir `cfg.vae_from` (its latent scale included), in fp32 for training."""
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(Path(cfg.vae_from) / "vae", torch_dtype=torch.float32).eval()


def set_latent_scale(vae, images: Callable[[int, int], torch.Tensor], cfg: GeneratorConfig) -> None:
    """SD's 0.18215, measured here on held-out images: latents of unit variance for the UNet."""
    with torch.no_grad():
        latents = torch.cat([vae.encode(images(-1 - i, cfg.vae_batch_size)).latent_dist.mean for i in range(4)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))


def caption_embeds(text_encoder, tokenizer, captions: list[str], max_length: int, grad: bool = False
                   ) -> torch.Tensor:
    tokens = tokenizer(captions, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    with torch.set_grad_enabled(grad):
        return text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0]


def train_unet(cfg: GeneratorConfig, vae, text_encoder, tokenizer,
               batches: Callable[[int, int], tuple[torch.Tensor, list[str]]], work_dir: Path,
               log: Callable[[dict], None] = print):
    """`batches(step, n)` -> (images in [-1, 1], captions). The VAE stays frozen, and so does the text encoder
    unless `cfg.train_text_encoder` (then it is trained in place, with the UNet)."""
    from diffusers.training_utils import compute_snr

    from mmbridge.tokenization import with_final_word_token

    tokenizer = with_final_word_token(tokenizer)  # the prompt's last word (often its shape) as a word token
    torch.manual_seed(cfg.seed + 1)
    unet = build_unet(cfg, text_encoder.config.hidden_size)
    if cfg.unet_from:  # a resumed run's checkpoint (restored by the loop) still takes precedence
        from diffusers import UNet2DConditionModel

        source = UNet2DConditionModel.from_pretrained(Path(cfg.unet_from) / "unet", torch_dtype=torch.float32)
        unet.load_state_dict(source.state_dict())
    if cfg.unet_from and cfg.train_text_encoder:
        from transformers import CLIPTextModel

        source = CLIPTextModel.from_pretrained(Path(cfg.unet_from) / "text_encoder", torch_dtype=torch.float32)
        text_encoder.load_state_dict(source.state_dict())
    scheduler = noise_scheduler(cfg)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(cfg.train_text_encoder)
    trained = nn.ModuleDict({"unet": unet, "text_encoder": text_encoder}) if cfg.train_text_encoder else unet
    generator = torch.Generator().manual_seed(cfg.seed + 2)

    def step_loss(step: int) -> dict[str, torch.Tensor]:
        images, captions = batches(step, cfg.unet_batch_size)
        # Classifier-free guidance needs an unconditional input the UNet knows. Half the dropped captions
        # become the empty caption (diffusers' negative prompt: the generator alone), half an all-zero
        # condition (the draw head's: MiniGPT-5 drops mapped voken features to zeros).
        draw = torch.rand(len(captions), generator=generator)
        empty, zero = draw < cfg.caption_dropout / 2, (draw >= cfg.caption_dropout / 2) & (draw < cfg.caption_dropout)
        captions = ["" if e else c for c, e in zip(captions, empty.tolist())]
        with torch.no_grad(), _autocast(cfg):
            latents = encode_latents(vae, images, cfg.latents).float()
        condition = caption_embeds(text_encoder, tokenizer, captions, cfg.max_caption_tokens,
                                   grad=cfg.train_text_encoder)
        condition = condition.masked_fill(zero[:, None, None], 0.0)
        noise = torch.randn_like(latents)  # fp32: the target and the noising stay exact under autocast
        timesteps = torch.randint(0, cfg.num_train_timesteps, (latents.shape[0],))
        noisy = scheduler.add_noise(latents, noise, timesteps)
        with _autocast(cfg):
            prediction = unet(noisy, timesteps, encoder_hidden_states=condition).sample.float()
        snr = compute_snr(scheduler, timesteps)
        if cfg.prediction_type == "v_prediction":
            # Min-SNR-γ on the x̂0 error, floored at 1: weight(x̂0) = min(SNR + 1, γ), i.e. plain v-MSE where the
            # noise dominates and Min-SNR's cap where little is left to denoise. (diffusers' min(SNR, γ) / (SNR + 1)
            # would weight the steps that decide the layout, SNR -> 0, by ~0: exactly what the caption must teach.)
            target = scheduler.get_velocity(latents, noise, timesteps)
            weight = torch.clamp(snr + 1, max=cfg.snr_gamma) / (snr + 1)
        else:
            target, weight = noise, torch.clamp(snr, max=cfg.snr_gamma) / snr
        per_sample = F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3))
        return {"ldm": (per_sample * weight).mean()}

    resumable_loop(trained, cfg.unet_steps, cfg.unet_lr, cfg.warmup_steps, LoopCheckpoint(work_dir / "unet"),
                   cfg.save_every, step_loss, log)
    text_encoder.requires_grad_(False)
    text_encoder.eval()
    return unet


def save_generator(out: str | Path, vae, unet, text_encoder, tokenizer, cfg: GeneratorConfig) -> Path:
    """The frozen generator as a standard `StableDiffusionPipeline` directory (DDIM for sampling)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from mmbridge.tokenization import with_final_word_token

    out = Path(out)
    tokenizer = with_final_word_token(tokenizer)  # as the UNet was trained (`train_unet`)
    tokenizer.model_max_length = cfg.max_caption_tokens
    # The UNet was trained on captions encoded with their padding masked (`caption_embeds`); diffusers'
    # pipeline passes the mask only when the text encoder's config says so. Without it the ~50 padding
    # states differ from training and the UNet ignores the request (measured: count right 0 % vs 81 %).
    text_encoder.config.use_attention_mask = True
    scheduler = DDIMScheduler.from_config(noise_scheduler(cfg).config)
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(out)
    (out / "mmbridge_generator.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    return out


def store_generator(src: str | Path, out: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """A generator dir with its UNet and VAE stored in `dtype` — half the bytes for the package — and its text
    encoder (the foundation's tower, or the generator's own trained copy: `train_text_encoder`), tokenizer and
    scheduler as they are. diffusers loads the weights back in fp32 unless told otherwise."""
    from diffusers import StableDiffusionPipeline

    src, out = Path(src), Path(out)
    pipeline = StableDiffusionPipeline.from_pretrained(src)
    pipeline.unet.to(dtype)
    pipeline.vae.to(dtype)
    pipeline.save_pretrained(out)
    if (src / "mmbridge_generator.json").is_file():
        shutil.copy2(src / "mmbridge_generator.json", out / "mmbridge_generator.json")
    return out


def generator_caption(scene, rng, request_rate: float = 0.5, relation_rate: float = 0.8) -> str:
    """What the generator is conditioned on in training: a draw request as users write it ("a large red
    circle above a small blue square": the eval prompts' shape, with a relation for `relation_rate` of the
    2-object scenes) `request_rate` of the time, else the short caption, which also names the background."""
    from mmbridge.data.shapes.annotations import short_caption
    from mmbridge.data.shapes.faithfulness import request_for

    if rng.random() < 1 - request_rate:  # written so that the default draws the captions it drew before the knob
        return short_caption(scene)
    return request_for(scene, rng, relation_rate=relation_rate).text


def snapshot_generator(run_dir: str | Path, out: str | Path, cfg: GeneratorConfig | None = None) -> Path:
    """A pipeline dir from a generator run's *current* checkpoints (`run_dir/generator-work/{vae,unet}`, the
    foundation's `text_encoder/` and `tokenizer/`), to score a UNet mid-training with `mmbridge eval draw
    --generator OUT`. `cfg` must be the run's (default: `GeneratorConfig()`)."""
    from safetensors.torch import load_file
    from transformers import CLIPTextModel, PreTrainedTokenizerFast

    run_dir, cfg = Path(run_dir), cfg or GeneratorConfig()
    text_encoder = CLIPTextModel.from_pretrained(run_dir / "text_encoder").eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(run_dir / "tokenizer")
    vae, unet = build_vae(cfg), build_unet(cfg, text_encoder.config.hidden_size)
    trained = (("unet", unet),) if cfg.vae_from else (("vae", vae), ("unet", unet))
    for part, model in trained:
        weights = run_dir / "generator-work" / part / "weights.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"{weights}: this run has no {part} checkpoint yet")
        state = load_file(str(weights))
        if part == "unet" and cfg.train_text_encoder:  # one checkpoint holds the UNet and the trained tower
            text_encoder.load_state_dict(_prefixed(state, "text_encoder."))
            state = _prefixed(state, "unet.")
        model.load_state_dict(state)
        model.eval()
    if cfg.vae_from:  # reused as it is, latent scale included
        vae = reused_vae(cfg)
    else:
        set_latent_scale(vae, lambda step, n: shapes_batches(cfg)(step, n)[0], cfg)
    out = save_generator(out, vae, unet, text_encoder, tokenizer, cfg)
    # the steps the checkpoints hold: a snapshot taken (or a run stopped) before `unet_steps` says so
    record = json.loads((out / "mmbridge_generator.json").read_text())
    work = run_dir / "generator-work"
    record["snapshot_steps"] = {part: torch.load(work / part / "state.pt", weights_only=True)["step"]
                                for part, _ in trained}
    (out / "mmbridge_generator.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


def _prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def shapes_batches(cfg: GeneratorConfig, split: str = "train"
                   ) -> Callable[[int, int], tuple[torch.Tensor, list[str]]]:
    """ShapesWorld (image, caption) batches, a pure function of the step (so a resumed run sees the
    same data); negative steps draw from a held-out stream (the VAE's latent-scale measurement)."""
    import numpy as np
    from PIL import Image

    from mmbridge.data.shapes.annotations import description, short_caption
    from mmbridge.data.shapes.world import make_scene, render, rng_for

    captions = {"description": lambda scene, rng: description(scene), "short": lambda scene, rng: short_caption(scene),
                "draw": lambda scene, rng: generator_caption(scene, rng, cfg.request_rate, cfg.relation_rate)}
    if cfg.caption not in captions:
        raise ValueError(f"generator caption {cfg.caption!r}: expected one of {sorted(captions)}")
    text_of = captions[cfg.caption]

    def batch(step: int, n: int) -> tuple[torch.Tensor, list[str]]:
        first = abs(step) * n + (cfg.scene_offset if step >= 0 else 0)
        scenes = [make_scene(split if step >= 0 else "val", (first + i) % 1_000_000) for i in range(n)]
        rendered = [render(s) for s in scenes]  # the world is 64x64; smaller generators (tests) see it resized
        if cfg.image_size != rendered[0].width:
            rendered = [r.resize((cfg.image_size, cfg.image_size), Image.BILINEAR) for r in rendered]
        arrays = np.stack([np.asarray(r, dtype=np.float32) for r in rendered]) / 127.5 - 1
        rng = rng_for(cfg.seed + abs(step), stream=15)  # captions are a pure function of the step too
        return torch.from_numpy(arrays).permute(0, 3, 1, 2), [text_of(s, rng) for s in scenes]

    return batch


def reconstruction_faithfulness(vae, cfg: GeneratorConfig, num_scenes: int = 300) -> float:
    """The fraction of val scenes whose VAE reconstruction (mean latent, decoded) the world reader reads back
    as the same objects: what the decoder alone lets a drawing reach."""
    import numpy as np
    from PIL import Image

    from mmbridge.data.shapes.faithfulness import faithfulness
    from mmbridge.data.shapes.reader import read_image
    from mmbridge.data.shapes.world import make_scene, render

    faithful = 0
    for start in range(0, num_scenes, 25):
        scenes = [make_scene("val", i) for i in range(start, min(num_scenes, start + 25))]
        rendered = [render(s).resize((cfg.image_size, cfg.image_size), Image.BILINEAR) for s in scenes]
        batch = torch.from_numpy(np.stack([np.asarray(r, dtype=np.float32) for r in rendered]) / 127.5 - 1)
        with torch.no_grad():
            decoded = vae.decode(vae.encode(batch.permute(0, 3, 1, 2)).latent_dist.mean).sample.clamp(-1, 1)
        pixels = ((decoded.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().astype(np.uint8)
        faithful += sum(bool(faithfulness(read_image(Image.fromarray(p)), s)["faithful"])
                        for p, s in zip(pixels, scenes))
    return round(faithful / num_scenes, 4)


def train_generator(out: str | Path, text_encoder, tokenizer, cfg: GeneratorConfig,
                    log: Callable[[dict], None] = print) -> dict:
    """VAE, then UNet, then the pipeline dir at `out/generator`; resumes where a previous run stopped."""
    out = Path(out)
    work = out / "generator-work"
    batches = shapes_batches(cfg)
    if cfg.vae_from:
        vae = reused_vae(cfg)
        log({"vae": f"reused from {cfg.vae_from} (frozen, not trained)"})
    else:
        vae = train_vae(cfg, lambda step, n: batches(step, n)[0], work, log=lambda d: log({"vae": d}))
    vae_faithful = reconstruction_faithfulness(vae, cfg)
    log({"vae_reconstructions_read_back_faithful_val300": vae_faithful})
    unet = train_unet(cfg, vae, text_encoder, tokenizer, batches, work, log=lambda d: log({"unet": d}))
    path = save_generator(out / "generator", vae, unet, text_encoder, tokenizer, cfg)
    return {"generator_dir": str(path), "vae_scaling_factor": vae.config.scaling_factor,
            "vae_reconstructions_read_back_faithful_val300": vae_faithful}

