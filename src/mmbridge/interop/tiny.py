"""Tiny random reference checkpoints in the published layouts, built offline (tests, docs, benchmarks).

- `build_tiny_blip2`: an HF `Blip2ForConditionalGeneration` dir (Llama or OPT LM) with tokenizer and
  image processor, like `Salesforce/blip2-opt-2.7b` at toy size, with an `<image>` token in the vocab.
- `build_tiny_minigpt4`: MiniGPT-4's three inputs — a BLIP-2 dir (vision + Q-Former), a Llama dir and
  a `.pth` holding `{"model": {"llama_proj.weight", "llama_proj.bias"}}`.
Weights are drawn with a large std so that outputs depend on the image (parity then means something).
"""

from __future__ import annotations

from pathlib import Path

import torch

IMAGE_SIZE = 32


def _randomize(model: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * std
            # LayerNorm/RMSNorm scales stay near 1 so activations keep a sane range.
            param.copy_(1.0 + noise / 2 if "norm" in name and name.endswith("weight") else noise)


def _text_config(llm: str, vocab_size: int, hidden: int = 32) -> dict:
    common = {"vocab_size": vocab_size, "hidden_size": hidden, "num_hidden_layers": 2, "num_attention_heads": 4,
              "max_position_embeddings": 256, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}
    if llm == "llama":
        return {"model_type": "llama", **common, "intermediate_size": 64, "num_key_value_heads": 2,
                "tie_word_embeddings": False}
    if llm == "opt":  # OPT ties lm_head to the embeddings: the checkpoint stores one of them
        return {"model_type": "opt", **common, "ffn_dim": 64, "word_embed_proj_dim": hidden,
                "tie_word_embeddings": True}
    raise ValueError(f"unknown tiny LM {llm!r}")


def tiny_tokenizer_with_image_token():
    from mmbridge.testing import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]}, replace_extra_special_tokens=False)
    return tokenizer


def build_tiny_blip2(directory: str | Path, llm: str = "llama", seed: int = 0, num_query_tokens: int = 4,
                     text_hidden: int = 32):
    """Save a random tiny `Blip2ForConditionalGeneration` (+ tokenizer, image processor); returns it."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, BlipImageProcessorPil
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    tokenizer = tiny_tokenizer_with_image_token()
    config = Blip2Config(
        vision_config={"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
                       "image_size": IMAGE_SIZE, "patch_size": 8},
        qformer_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "intermediate_size": 64, "cross_attention_frequency": 2, "encoder_hidden_size": 48},
        text_config=_text_config(llm, len(tokenizer), text_hidden),
        num_query_tokens=num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    _randomize(model, seed)
    model.language_model.tie_weights()
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=OPENAI_CLIP_MEAN,
                          image_std=OPENAI_CLIP_STD).save_pretrained(directory)
    return model


def build_tiny_llama(directory: str | Path, seed: int = 1, hidden: int = 32):
    """A random tiny Llama dir with the tiny tokenizer (MiniGPT-4's Vicuna stand-in); returns the model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from mmbridge.testing import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    text = _text_config("llama", len(tokenizer), hidden)
    config = AutoConfig.for_model(text.pop("model_type"), **text)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    _randomize(model, seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model


def save_minigpt4_projection(path: str | Path, in_features: int, out_features: int, seed: int = 2) -> dict:
    """MiniGPT-4's checkpoint layout: `{"model": {"llama_proj.weight", "llama_proj.bias"}}` (+ training state)."""
    generator = torch.Generator().manual_seed(seed)
    state = {"llama_proj.weight": torch.randn(out_features, in_features, generator=generator) * 0.2,
             "llama_proj.bias": torch.randn(out_features, generator=generator) * 0.2}
    torch.save({"model": state, "epoch": 4, "iters": 1000}, path)
    return state
