"""Tiny offline training fixtures for tests and benchmarks: a base model directory laid out like a
real one (frozen vision encoder and LLM referenced by path), webdataset shards and LLaVA JSON."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (50, 180, 70), "blue": (50, 90, 230), "yellow": (235, 215, 50)}
SHAPES = ("circle", "square")


def make_base_model(out: str | Path, seed: int = 0, dropout: float | None = None, init_std: float = 0.2,
                    qformer_text: bool = False, object_attributes: dict | None = None) -> Path:
    """Save a tiny random `MMBridgeModel` whose frozen parts live in their own HF dirs
    (`out/vision`, `out/llm`) and are referenced through `config.component_paths` — the layout the
    small trainable-only artifact sits on. `dropout` overrides the Q-Former's dropout; `qformer_text`
    gives the Q-Former BLIP-2's text side (stage 1: ITC / ITM / ITG); `object_attributes` its object heads."""
    from torch import nn

    from mmbridge.testing import build_tiny

    out = Path(out)
    extra = {"image_text_hidden_size": 16} if qformer_text else {}
    if object_attributes:
        extra["qformer_object_attributes"] = object_attributes
    model, processor = build_tiny(seed=seed, init_std=init_std, **extra)
    if qformer_text:
        model.config.qformer_cls_token_id = processor.tokenizer.bos_token_id
        model.config.qformer_dec_token_id = processor.tokenizer.convert_tokens_to_ids("[DEC]")
    if dropout is not None:
        model.config.qformer_config.hidden_dropout_prob = dropout
        model.config.qformer_config.attention_probs_dropout_prob = dropout
        for module in model.qformer.modules():
            if isinstance(module, nn.Dropout):
                module.p = dropout
    model.vision.model.save_pretrained(out / "vision")
    model.llm.model.save_pretrained(out / "llm")
    model.config.component_paths = {"vision": str((out / "vision").resolve()), "llm": str((out / "llm").resolve())}
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def scene(rng: random.Random) -> tuple[Image.Image, str]:
    color, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
    image = Image.new("RGB", (32, 32), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    x, y = rng.randint(2, 14), rng.randint(2, 14)
    box = (x, y, x + 14, y + 14)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLORS[color])
    return image, f"a {color} {shape}"


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(out: str | Path, num_shards: int = 2, per_shard: int = 16, seed: int = 0,
                 corrupt: dict[int, str] | None = None, prefix: str = "shard") -> list[Path]:
    """webdataset shards `key.png + key.txt + key.json`. `corrupt` maps a global sample index to a
    kind of damage: "png" (garbage image bytes), "txt" (no caption)."""
    import webdataset as wds

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    corrupt = corrupt or {}
    paths, index = [], 0
    for s in range(num_shards):
        path = out / f"{prefix}-{s:04d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for _ in range(per_shard):
                image, caption = scene(rng)
                sample = {"__key__": f"{prefix}{s:04d}_{index:06d}", "png": png_bytes(image), "txt": caption,
                          "json": {"index": index}}
                damage = corrupt.get(index)
                if damage == "png":
                    sample["png"] = b"\x89PNG this is not an image"
                elif damage == "txt":
                    del sample["txt"]
                sink.write(sample)
                index += 1
        paths.append(path)
    return paths


def write_llava(out: str | Path, n: int = 32, seed: int = 0) -> Path:
    """LLaVA-style instruction JSON with images in `out/images/`."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = []
    for i in range(n):
        image, caption = scene(rng)
        image.save(out / "images" / f"{i:05d}.png")
        color, shape = caption.split()[1:]
        records.append({"id": f"q{i:05d}", "image": f"images/{i:05d}.png", "conversations": [
            {"from": "human", "value": f"<image>\nWhat color is the {shape}?"},
            {"from": "gpt", "value": color}]})
    path = out / "llava.json"
    path.write_text(json.dumps(records))
    return path
