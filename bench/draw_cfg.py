"""Classifier-free guidance cost: one batched cond + uncond UNet call against two passes (issue 14).

    python bench/draw_cfg.py --generator runs/gen1/generator     # a trained StableDiffusionPipeline dir
    python bench/draw_cfg.py                                     # the ShapesWorld generator's shape, random
    python bench/draw_cfg.py --batch 4 --threads 1 --repeats 50

The draw head samples with both conditions in one UNet call (`modeling/draw/diffusion.py`); this measures
what that saves on this machine, in the same run: the median time of one denoising step both ways, and
their ratio. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def unet_and_shapes(generator: str | None):
    if generator:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextConfig

        unet = UNet2DConditionModel.from_pretrained(generator, subfolder="unet")
        text = CLIPTextConfig.from_pretrained(generator, subfolder="text_encoder")
        length = json.load(open(f"{generator}/tokenizer/tokenizer_config.json")).get("model_max_length", 77)
        return unet, min(length, text.max_position_embeddings), text.hidden_size
    from mmbridge.pretrain.diffusion import GeneratorConfig, build_unet

    cfg = GeneratorConfig()
    return build_unet(cfg, 128), cfg.max_caption_tokens, 128


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generator", default=None, help="a StableDiffusionPipeline dir (default: random weights)")
    parser.add_argument("--batch", type=int, default=1, help="images drawn at once")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    unet, length, width = unet_and_shapes(args.generator)
    unet.eval()
    size = unet.config.sample_size
    latents = torch.randn(args.batch, unet.config.in_channels, size, size)
    cond, uncond = torch.randn(args.batch, length, width), torch.zeros(args.batch, length, width)
    t = torch.tensor(500)

    @torch.no_grad()
    def batched():
        return unet(torch.cat([latents, latents]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)

    @torch.no_grad()
    def two_passes():
        first = unet(latents, t, encoder_hidden_states=uncond).sample
        return first, unet(latents, t, encoder_hidden_states=cond).sample

    one = median_seconds(batched, args.repeats)
    two = median_seconds(two_passes, args.repeats)
    print(json.dumps({"generator": args.generator or "random (GeneratorConfig)", "batch": args.batch,
                      "threads": args.threads, "repeats": args.repeats, "batched_step_s": round(one, 5),
                      "two_passes_step_s": round(two, 5), "speedup": round(two / one, 3)}))


if __name__ == "__main__":
    main()
