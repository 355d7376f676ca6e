"""Tiny, randomly initialised models built offline — for tests, benchmarks and the CLI's `--tiny`.

Everything here is built from configs and a tokenizer trained on a few sentences, so it needs no
download. The shapes are small enough that a forward pass takes milliseconds on a CPU.
"""

from __future__ import annotations

import torch
from transformers import BlipImageProcessorPil, PreTrainedTokenizerFast

from mmbridge.config import MMBridgeConfig
from mmbridge.modeling import MMBridgeModel
from mmbridge.processing import PRESET_STOP_STRINGS, MMBridgeProcessor, chat_template_preset
from mmbridge.tokenization import train_tokenizer

_CORPUS = [
    "###Human: <Img><ImageHere></Img> What color is the circle? ###Assistant: red###",
    "There are 3 shapes: a small red circle, a large blue square and a small green triangle.",
    "How many shapes are there? What shape is the yellow object? Is there a purple diamond? yes no",
    "USER: ASSISTANT: [INST] [/INST] <<SYS>> <</SYS>> left right above below cross white cyan orange",
    "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 . , ? ! : ; ' \" ( ) #",
]


def build_tiny_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    return train_tokenizer(_CORPUS * 4, vocab_size=vocab_size)


def tiny_config(vocab_size: int, image_token_index: int, *, num_query_tokens: int = 4, llm: str = "llama",
                init_std: float = 0.02, **overrides) -> MMBridgeConfig:
    """`init_std` well above 0.02 makes a random model's answers depend on its input — which the
    equivalence tests need to mean anything."""
    text = {"model_type": llm, "vocab_size": vocab_size, "hidden_size": 32, "num_hidden_layers": 2,
            "initializer_range": init_std,
            "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 512,
            "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}
    if llm == "llama":
        text["num_key_value_heads"] = 2
    elif llm == "opt":
        text.update(ffn_dim=64, word_embed_proj_dim=32)
        text.pop("intermediate_size")
    vision = {"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 64, "image_size": 32, "patch_size": 8, "initializer_range": init_std}
    qformer = {"initializer_range": init_std, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
               "intermediate_size": 64, "cross_attention_frequency": 1, "vocab_size": vocab_size, "pad_token_id": 3}
    return MMBridgeConfig(vision_config=vision, qformer_config=qformer, text_config=text,
                          num_query_tokens=num_query_tokens, image_token_index=image_token_index,
                          initializer_range=init_std, **overrides)


def build_tiny(seed: int = 0, template: str = "minigpt4", num_query_tokens: int = 4,
               **config_overrides) -> tuple[MMBridgeModel, MMBridgeProcessor]:
    """A tiny random model and its processor, deterministic for a given seed."""
    tokenizer = build_tiny_tokenizer()
    image_processor = BlipImageProcessorPil(size={"height": 32, "width": 32})
    processor = MMBridgeProcessor(image_processor, tokenizer, chat_template=chat_template_preset(template),
                                  num_query_tokens=num_query_tokens, stop_strings=PRESET_STOP_STRINGS[template])
    config = tiny_config(len(tokenizer), processor.image_token_id, num_query_tokens=num_query_tokens,
                         **config_overrides)
    torch.manual_seed(seed)
    model = MMBridgeModel(config).eval()
    return model, processor


def build_tiny_sd(directory, image_size: int = 16, condition_dim: int = 16, max_length: int = 8, seed: int = 0):
    """A tiny random Stable-Diffusion-layout directory (`StableDiffusionPipeline.save_pretrained`:
    unet/, vae/, text_encoder/, tokenizer/, scheduler/, model_index.json) — the draw head's frozen
    generator in tests. Needs diffusers."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer()
    tokenizer.model_max_length = max_length
    vae = AutoencoderKL(block_out_channels=(8, 16), norm_num_groups=4, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        sample_size=image_size)
    unet = UNet2DConditionModel(sample_size=image_size // 2, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), norm_num_groups=4, cross_attention_dim=condition_dim,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=condition_dim, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=max_length, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    scheduler = DDPMScheduler(num_train_timesteps=100, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, steps_offset=1)
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(directory)
    return pipeline


def overfit(model: MMBridgeModel, batch: dict, steps: int, lr: float) -> list[dict[str, float]]:
    """Train the trainable parameters on one batch for `steps` AdamW steps (seeded), the heads' tests'
    "can it learn at all" loop; returns the named losses of every step and leaves the model in eval mode."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    torch.manual_seed(0)
    history = []
    for _ in range(steps):
        out = model(**batch)
        history.append({k: v.item() for k, v in out.losses.items()})
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    model.eval()
    return history
