"""The act head's `[EDIT]` route: instruction image editing as InstructPix2Pix does it.

The editing UNet is the draw head's UNet with its first convolution widened: its input is the noisy
latent *and* the source image's latent (extra input channels), so it learns to change what the
instruction names and copy the rest. It starts as the draw UNet exactly (the extra channels' weights
are zero, as in InstructPix2Pix), trains (the component `act.editor`), and is conditioned on the edit
super-link states through its own feature mapper (MiniGPT-5's mapper, as the draw head's). The VAE and
the schedulers are the draw head's frozen generator's.

Training: ε-prediction MSE (the scheduler's prediction type; diffusers' `DDPMScheduler`) on (source,
instruction, edited) triples, and — where a target gives a `caption` — MiniGPT-5's caption loss on the
mapper (`caption_loss`: its output pulled towards the generator's text encoder embedding of that text, what
the UNet already reads; without it the new mapper's output never moved the UNet, run h2). The ShapesWorld
data gives the instruction itself, as InstructPix2Pix's UNet reads it (run k2: 13 % of test edits right,
against 2-5 % with the edited scene's caption, which does not say what changed).
The instruction and the image condition are dropped (5 % each, 5 % both) so that inference can guide on
each. Inference: DDIM with InstructPix2Pix's classifier-free guidance
over both conditions — (instruction, image), (none, image), (none, none) in **one** batched UNet call:
ε = ε(∅, ∅) + s_T · (ε(T, I) − ε(∅, I)) + s_I · (ε(∅, I) − ε(∅, ∅)).

The source latent is the VAE posterior's mode, unscaled (as diffusers' InstructPix2Pix pipeline and
training script use it); the noisy latent is scaled by the VAE's `scaling_factor`.

**Source-residual parameterisation** (`ActConfig.edit_source_residual`, mmbridge's own; no library has it):
the UNet's output is read as a correction to the source, x̂0 = source latent (scaled) + UNet(z_t, source, c),
trained with an x0-MSE, and turned into the ε the scheduler steps with, ε = (z_t − √ᾱ_t x̂0) / √(1 − ᾱ_t).
Its `conv_out` starts at zero, so the new editor copies the source exactly and learns only what an
instruction changes. Why: with ε-prediction the draw-sized UNet never learned the copy itself (run i2: 27 %
of untouched objects kept after 2,000 steps; ε from z_t and the source is a timestep-dependent
amplification it has to learn). The image condition is never dropped there (an edit without its source
has no anchor), so only the instruction is guided: ε = ε(∅, I) + s_T · (ε(T, I) − ε(∅, I)).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mmbridge.modeling.components import load_component
from mmbridge.modeling.draw.mapper import FeatureMapper


def widen_conv_in(unet, extra_channels: int):
    """InstructPix2Pix's UNet surgery: `conv_in` takes `extra_channels` more inputs, their weights zero,
    so the widened UNet computes exactly what the original did until training moves them."""
    old = unet.conv_in
    new = nn.Conv2d(old.in_channels + extra_channels, old.out_channels, old.kernel_size, old.stride, old.padding)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :old.in_channels].copy_(old.weight)
        new.bias.copy_(old.bias)
    unet.conv_in = new.to(old.weight.device, old.weight.dtype)
    unet.register_to_config(in_channels=new.in_channels)
    return unet


class InstructionEditor(nn.Module):
    def __init__(self, unet, mapper: FeatureMapper, source_residual: bool = False):
        super().__init__()
        self.unet, self.mapper = unet, mapper
        self.source_residual = source_residual

    @classmethod
    def from_generator_dir(cls, directory: str | Path, llm_hidden_size: int, mapper_hidden_size: int,
                           mapper_layers: tuple[int, int], mapper_heads: int,
                           num_condition_queries: int | None, source_residual: bool = False) -> InstructionEditor:
        """The draw generator's UNet (a diffusers `StableDiffusionPipeline` directory), widened for the
        source latent, and a new mapper to its cross-attention width. `source_residual`: the UNet's
        `conv_out` zeroed, so that the editor starts by copying the source (stored weights replace it)."""
        from transformers import AutoTokenizer

        directory = Path(directory)
        unet = load_component("unet", directory, subfolder="unet")
        latent_channels = unet.config.in_channels
        widen_conv_in(unet, latent_channels)
        if source_residual:
            with torch.no_grad():
                unet.conv_out.weight.zero_()
                unet.conv_out.bias.zero_()
        length = num_condition_queries or AutoTokenizer.from_pretrained(directory / "tokenizer").model_max_length
        mapper = FeatureMapper(llm_hidden_size, mapper_hidden_size, unet.config.cross_attention_dim, length,
                               mapper_layers[0], mapper_layers[1], mapper_heads)
        return cls(unet, mapper, source_residual)

    @torch.no_grad()
    def source_latents(self, vae, images: torch.Tensor) -> torch.Tensor:
        """(n, 3, H, W) in [-1, 1] -> the image condition: the VAE posterior's mode, unscaled."""
        return vae.encode(images.to(vae.dtype)).latent_dist.mode()

    def loss(self, generator, link_hidden: torch.Tensor, sources: torch.Tensor, targets: torch.Tensor,
             condition_dropout: float = 0.0) -> torch.Tensor:
        """Denoising loss of the edited `targets` given the `sources` (both (n, 3, H, W) in [-1, 1]) and
        the edit link states (n, 1 + slots, llm_hidden)."""
        vae, scheduler = generator.vae, generator.train_scheduler
        with torch.no_grad():
            posterior = vae.encode(targets.to(vae.dtype)).latent_dist
            # the residual editor's target is the posterior's mode, as its anchor (the source's) is: a sample
            # adds the posterior's noise, which the world's VAE decoder ignores but which is 4x the edit's
            # own signal in the x0 loss (posterior variance 1.52 vs 0.39 between source and edited modes)
            latents = (posterior.mode() if self.source_residual else posterior.sample()) * vae.config.scaling_factor
        image_condition = self.source_latents(vae, sources)
        condition = self.mapper(link_hidden)
        n = latents.shape[0]
        if self.training and condition_dropout:  # InstructPix2Pix: p < 2r drops the text, r <= p < 3r the image
            p = torch.rand(n, device=latents.device)
            condition = condition * (p >= 2 * condition_dropout).to(condition.dtype)[:, None, None]
            if not self.source_residual:  # the residual editor always has its source (its anchor)
                keep_image = ~((p >= condition_dropout) & (p < 3 * condition_dropout))
                image_condition = image_condition * keep_image.to(image_condition.dtype)[:, None, None, None]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (n,), device=latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        if self.source_residual:
            correction = self.unet(torch.cat([noisy, image_condition.to(noisy.dtype)], dim=1).to(self.unet.dtype),
                                   timesteps, encoder_hidden_states=condition.to(self.unet.dtype)).sample
            anchor = image_condition * vae.config.scaling_factor
            return F.mse_loss(correction.float(), (latents - anchor).float())
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        model_in = torch.cat([noisy, image_condition.to(noisy.dtype)], dim=1)
        prediction = self.unet(model_in.to(self.unet.dtype), timesteps,
                               encoder_hidden_states=condition.to(self.unet.dtype)).sample
        return F.mse_loss(prediction.float(), target.float())

    def caption_loss(self, generator, link_hidden: torch.Tensor, captions: list[str]) -> torch.Tensor | None:
        """MSE between the mapped edit condition and the generator's text encoder embedding of each target's
        caption (the instruction, in the ShapesWorld data; as the draw head's `draw_caption`); None where the
        mapper's length is not the text encoder's (`num_condition_queries` set)."""
        mapped = self.mapper(link_hidden)
        if mapped.shape[1] != generator.condition_length:
            return None
        return F.mse_loss(mapped.float(), generator.caption_embeds(captions).to(mapped.device).float())

    @torch.no_grad()
    def sample(self, generator, link_hidden: torch.Tensor, sources: torch.Tensor, guidance_scale: float = 7.5,
               image_guidance_scale: float = 1.5, num_inference_steps: int = 25,
               rng: torch.Generator | None = None) -> torch.Tensor:
        """Edit `sources` ((n, 3, H, W) in [-1, 1]) per the link states -> images (n, 3, H, W) in [0, 1]."""
        vae, scheduler = generator.vae, generator.sample_scheduler
        device = link_hidden.device
        scheduler.set_timesteps(num_inference_steps, device=device)
        condition = self.mapper(link_hidden).to(self.unet.dtype)
        image_condition = self.source_latents(vae, sources.to(device)).to(self.unet.dtype)
        n, channels = image_condition.shape[:2]
        shape = (n, channels, *image_condition.shape[2:])
        latents = torch.randn(shape, generator=rng, device="cpu").to(device, self.unet.dtype)
        latents = latents * scheduler.init_noise_sigma
        if self.source_residual:
            latents = self._sample_residual(scheduler, latents, condition, image_condition,
                                            vae.config.scaling_factor, guidance_scale)
        else:
            latents = self._sample_epsilon(scheduler, latents, condition, image_condition, guidance_scale,
                                           image_guidance_scale)
        images = vae.decode(latents / vae.config.scaling_factor).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def _sample_epsilon(self, scheduler, latents, condition, image_condition, guidance_scale, image_guidance_scale):
        guided = guidance_scale != 1.0 or image_guidance_scale != 1.0
        if guided:  # (instruction, image), (none, image), (none, none): one batched UNet call per step
            none = torch.zeros_like(condition)
            condition = torch.cat([condition, none, none])
            image_condition = torch.cat([image_condition, image_condition, torch.zeros_like(image_condition)])
        for t in scheduler.timesteps:
            model_in = scheduler.scale_model_input(torch.cat([latents] * 3) if guided else latents, t)
            out = self.unet(torch.cat([model_in, image_condition], dim=1), t, encoder_hidden_states=condition).sample
            if guided:
                full, image_only, uncond = out.chunk(3)
                out = (uncond + guidance_scale * (full - image_only)
                       + image_guidance_scale * (image_only - uncond))
            latents = scheduler.step(out, t, latents).prev_sample
        return latents

    def _sample_residual(self, scheduler, latents, condition, image_condition, scaling_factor, guidance_scale):
        anchor = image_condition * scaling_factor
        guided = guidance_scale != 1.0
        if guided:  # (instruction, image), (none, image): one batched UNet call per step
            condition = torch.cat([condition, torch.zeros_like(condition)])
            image_condition = torch.cat([image_condition, image_condition])
        alphas = scheduler.alphas_cumprod.to(latents.device)
        for t in scheduler.timesteps:
            model_in = scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)
            correction = self.unet(torch.cat([model_in, image_condition], dim=1), t,
                                   encoder_hidden_states=condition).sample
            if guided:
                full, image_only = correction.chunk(2)
                correction = image_only + guidance_scale * (full - image_only)
            predicted = anchor + correction  # x̂0, then the ε it implies at this step's noise level
            alpha = alphas[t].to(latents.dtype)
            epsilon = (latents - alpha.sqrt() * predicted) / (1 - alpha).sqrt()
            latents = scheduler.step(epsilon, t, latents).prev_sample
        return latents
