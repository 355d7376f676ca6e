"""Does a generator take object positions from the caption, or from the noised latent? Two measurements on
2-object val scenes (different colours, a relation that holds):

1. Denoising loss with the true relation vs the flipped one ("above" <-> "below", "left" <-> "right"), and,
   as a control, with the two objects' colours swapped; same images, noise and timesteps. A UNet that reads
   relation words has a lower loss with the true one.
2. The clean latent it predicts from x_t at high noise: nearer the true image's latent than the latent of
   the left-right mirrored image? With SD's default schedule √ᾱ = 0.068 of the image is left at t = 999, and on flat
   backgrounds that tells where the objects are: then training never needs the caption's positions, and
   sampling (which starts from pure noise) places objects at random.

Run q1's finding (docs/recipe.md, Draw): the ε-UNet p1 had equal losses for true and flipped relations at every
t, and its x̂0 was nearer the true image than the mirrored one in 73 % of scenes at t = 999 (84 % at 950);
after 500 steps on a zero-terminal-SNR schedule (`GeneratorConfig.zero_terminal_snr`) 48 % (56 %): no leak at
the first sampling steps.

    python scripts/layout_leak_probe.py [GENERATOR_DIR] [N_SCENES]   # default: the shipped foundation's, 128

Not a library module.
"""

import sys

import numpy as np
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline

from mmbridge.data.shapes.faithfulness import RELATIONS, Relation, Request, relation_holds
from mmbridge.data.shapes.world import make_scene, render

FLIP = {"left": "right", "right": "left", "above": "below", "below": "above"}


def scenes_and_captions(n: int):
    rng = np.random.default_rng(0)
    scenes, captions = [], {"true": [], "flipped": [], "colours swapped": []}
    index = 0
    while len(scenes) < n:
        scene = make_scene("val", index)
        index += 1
        if len(scene.objects) != 2 or scene.objects[0].color == scene.objects[1].color:
            continue
        held = [r for r in RELATIONS if relation_holds(scene.objects[0], scene.objects[1], r)]
        if not held:
            continue
        rel = held[int(rng.integers(len(held)))]
        (s0, c0, h0), (s1, c1, h1) = [(o.size, o.color, o.shape) for o in scene.objects]
        scenes.append(scene)
        captions["true"].append(Request([(s0, c0, h0), (s1, c1, h1)], Relation(0, rel, 1)).text)
        captions["flipped"].append(Request([(s0, c0, h0), (s1, c1, h1)], Relation(0, FLIP[rel], 1)).text)
        captions["colours swapped"].append(Request([(s0, c1, h0), (s1, c0, h1)], Relation(0, rel, 1)).text)
    return scenes, captions


@torch.no_grad()
def main(generator_dir: str, n: int) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(generator_dir, torch_dtype=torch.float32)
    unet, vae, encoder, tokenizer = pipe.unet.eval(), pipe.vae.eval(), pipe.text_encoder.eval(), pipe.tokenizer
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    v_prediction = scheduler.config.prediction_type == "v_prediction"
    scenes, captions = scenes_and_captions(n)
    images = np.stack([np.asarray(render(s), dtype=np.float32) for s in scenes]) / 127.5 - 1
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2)
    latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
    # the control is the latent of the mirrored *image* (a mirrored latent is no image's latent: any natural
    # prediction would be nearer the true one)
    mirrored = vae.encode(pixels.flip(-1)).latent_dist.mean * vae.config.scaling_factor
    tokens = {k: tokenizer(v, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                           return_tensors="pt") for k, v in captions.items()}
    conditions = {k: encoder(t.input_ids, attention_mask=t.attention_mask)[0] for k, t in tokens.items()}
    generator = torch.Generator().manual_seed(0)
    print(f"{generator_dir}: {n} scenes, {scheduler.config.prediction_type}, "
          f"zero terminal SNR: {scheduler.config.get('rescale_betas_zero_snr', False)}")
    print("| t | SNR | loss true | loss flipped relation (true lower in) | loss colours swapped (true lower in) "
          "| x̂0 nearer the true image's latent than the mirrored image's |")
    print("|---|---|---|---|---|---|")
    for t in (999, 950, 850, 700, 500, 200):
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.full((n,), t)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = scheduler.get_velocity(latents, noise, timesteps) if v_prediction else noise
        out = {k: unet(noisy, timesteps, encoder_hidden_states=c).sample for k, c in conditions.items()}
        loss = {k: ((o - target) ** 2).mean((1, 2, 3)) for k, o in out.items()}
        alpha_bar = scheduler.alphas_cumprod[t]
        a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        x0 = a * noisy - s * out["true"] if v_prediction else (noisy - s * out["true"]) / a
        nearer = (((x0 - latents) ** 2).mean((1, 2, 3)) < ((x0 - mirrored) ** 2).mean((1, 2, 3)))
        print(f"| {t} | {alpha_bar / (1 - alpha_bar):.4f} | {loss['true'].mean():.4f} | "
              f"{loss['flipped'].mean():.4f} ({(loss['true'] < loss['flipped']).float().mean():.0%}) | "
              f"{loss['colours swapped'].mean():.4f} ({(loss['true'] < loss['colours swapped']).float().mean():.0%}) "
              f"| {nearer.float().mean():.0%} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "src/mmbridge/assets/foundation/shapes/generator",
         int(sys.argv[2]) if len(sys.argv) > 2 else 128)
