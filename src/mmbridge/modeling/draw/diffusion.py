"""The frozen image generator: a latent-diffusion stack loaded from a standard diffusers directory
(the layout `StableDiffusionPipeline.save_pretrained` writes: unet/, vae/, text_encoder/, tokenizer/,
scheduler/), so real Stable Diffusion 1.5 / 2.1 directories load as they are.

Training uses the LDM objective (ε- or v-prediction, per the scheduler) with Min-SNR-γ weighting
(diffusers' `compute_snr`); sampling uses DDIM with classifier-free guidance, the conditional and the
unconditional branch in one batched UNet call.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mmbridge.modeling.components import load_component


def encode_latents(vae, images: torch.Tensor, mode: str = "sample") -> torch.Tensor:
    """Scaled latents of `images` ((n, 3, H, W) in [-1, 1]): a posterior sample or its mean (what the UNet
    was trained on: `pretrain.diffusion.GeneratorConfig.latents`)."""
    if mode not in ("sample", "mean"):
        raise ValueError(f"generator latents {mode!r}: expected 'sample' or 'mean'")
    posterior = vae.encode(images.to(vae.dtype)).latent_dist
    return (posterior.sample() if mode == "sample" else posterior.mean) * vae.config.scaling_factor


class DiffusionGenerator(nn.Module):
    def __init__(self, unet, vae, text_encoder, tokenizer, train_scheduler, sample_scheduler, latents: str = "sample"):
        super().__init__()
        if latents not in ("sample", "mean"):
            raise ValueError(f"generator latents {latents!r}: expected 'sample' or 'mean'")
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.tokenizer = tokenizer  # not a module: never trained, saved with the generator dir
        self.train_scheduler, self.sample_scheduler = train_scheduler, sample_scheduler
        #: what the UNet learned to denoise: VAE posterior samples (SD) or their means (mmbridge generators
        #: trained with `GeneratorConfig.latents="mean"`); the LDM loss must noise the same thing
        self.latents = latents

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> DiffusionGenerator:
        from diffusers import DDIMScheduler, DDPMScheduler
        from transformers import AutoTokenizer

        directory = Path(directory)
        scheduler_config = load_component("scheduler", directory, subfolder="scheduler").config
        # a generator trained by mmbridge records how (pretrain.diffusion.GeneratorConfig); SD dirs do not
        record = directory / "mmbridge_generator.json"
        latents = json.loads(record.read_text()).get("latents", "sample") if record.is_file() else "sample"
        return cls(load_component("unet", directory, subfolder="unet"),
                   load_component("vae", directory, subfolder="vae"),
                   load_component("text_encoder", directory, subfolder="text_encoder"),
                   AutoTokenizer.from_pretrained(directory / "tokenizer"),
                   DDPMScheduler.from_config(scheduler_config), DDIMScheduler.from_config(scheduler_config),
                   latents=latents)

    @property
    def condition_dim(self) -> int:
        return self.unet.config.cross_attention_dim

    @property
    def condition_length(self) -> int:
        return self.tokenizer.model_max_length

    @property
    def image_size(self) -> int:
        return self.unet.config.sample_size * 2 ** (len(self.vae.config.block_out_channels) - 1)

    # -- conditioning ----------------------------------------------------------------------------
    @torch.no_grad()
    def caption_embeds(self, captions: list[str]) -> torch.Tensor:
        """What the UNet was trained to read: the text encoder's last hidden state of each caption."""
        tokens = self.tokenizer(captions, padding="max_length", max_length=self.condition_length, truncation=True,
                                return_tensors="pt").to(self.text_encoder.device)
        return self.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0]

    # -- training --------------------------------------------------------------------------------
    def ldm_loss(self, images: torch.Tensor, condition: torch.Tensor, snr_gamma: float | None = 5.0) -> torch.Tensor:
        """Denoising loss of `images` ((n, 3, H, W) in [-1, 1]) under `condition` through the frozen UNet."""
        from diffusers.training_utils import compute_snr

        with torch.no_grad():
            latents = encode_latents(self.vae, images, self.latents)
        noise = torch.randn_like(latents)
        scheduler = self.train_scheduler
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        prediction = self.unet(noisy, timesteps, encoder_hidden_states=condition.to(self.unet.dtype)).sample
        if snr_gamma is None:
            return F.mse_loss(prediction.float(), target.float())
        snr = compute_snr(scheduler, timesteps)
        v_prediction = scheduler.config.prediction_type == "v_prediction"
        weight = torch.clamp(snr, max=snr_gamma) / (snr + 1 if v_prediction else snr)
        per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        return (per_sample * weight).mean()

    # -- sampling --------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, condition: torch.Tensor, guidance_scale: float = 7.5, num_inference_steps: int = 25,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """DDIM with classifier-free guidance (the unconditional condition is zeros, as trained):
        (n, L, d) -> images (n, 3, H, W) in [0, 1]."""
        scheduler = self.sample_scheduler
        scheduler.set_timesteps(num_inference_steps, device=condition.device)
        n = condition.shape[0]
        shape = (n, self.unet.config.in_channels, self.unet.config.sample_size, self.unet.config.sample_size)
        latents = torch.randn(shape, generator=generator, device="cpu").to(condition.device, self.unet.dtype)
        latents = latents * scheduler.init_noise_sigma
        guided = guidance_scale != 1.0
        both = torch.cat([condition, torch.zeros_like(condition)]) if guided else condition
        for t in scheduler.timesteps:
            model_in = scheduler.scale_model_input(torch.cat([latents, latents]) if guided else latents, t)
            out = self.unet(model_in, t, encoder_hidden_states=both.to(self.unet.dtype)).sample
            if guided:
                cond_out, uncond_out = out.chunk(2)
                out = uncond_out + guidance_scale * (cond_out - uncond_out)
            latents = scheduler.step(out, t, latents).prev_sample
        images = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)
