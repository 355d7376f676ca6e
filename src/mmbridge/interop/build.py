"""`mmbridge build`: assemble a model from local HF dirs — frozen vision tower + causal LM (+ an optional
pretrained Q-Former) — with a freshly initialised bridge, ready for stage-1 training.

Storage decision: by default the frozen parts are *referenced* (`config.component_paths`, absolute
paths), as MiniGPT-4 does: the output dir holds only the config, processor and the bridge weights
(`trainable.safetensors`, a few MB), and loading reads the LM/vision weights from their own dirs
through transformers (meta-device init, no extra copy). `--copy` writes a self-contained dir instead
(every tensor streamed into `model*.safetensors`), for moving a model to another machine.
A vision tower inside a composite dir (CLIP, SigLIP, BLIP-2) cannot be referenced — `AutoModel` would
load the whole dual model — so its `vision_model.*` tensors are always copied.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mmbridge.interop.loading import hf_component_tensors, iter_tensors


def _image_processor(vision_dir: Path, image_size: int):
    """Resize to the tower's input size with its own mean/std when it ships a preprocessor config."""
    import json

    from transformers import BlipImageProcessorPil
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    settings = {}
    if (vision_dir / "preprocessor_config.json").is_file():
        settings = json.loads((vision_dir / "preprocessor_config.json").read_text())
    return BlipImageProcessorPil(size={"height": image_size, "width": image_size},
                                 image_mean=settings.get("image_mean", OPENAI_CLIP_MEAN),
                                 image_std=settings.get("image_std", OPENAI_CLIP_STD))


def fresh_bridge(config, seed: int = 0) -> dict[str, torch.Tensor]:
    """Q-Former (+ queries) and projection initialised by `MMBridgeModel` itself; the frozen parts are
    built on the meta device, so this costs no memory for them."""
    from transformers import AutoModel, AutoModelForCausalLM

    from mmbridge.modeling import MMBridgeModel

    with torch.device("meta"):
        vision_model = AutoModel.from_config(config.vision_config)
        language_model = AutoModelForCausalLM.from_config(config.text_config)
    torch.manual_seed(seed)
    model = MMBridgeModel(config, vision_model=vision_model, language_model=language_model)
    return {k: v for k, v in model.state_dict().items() if k.startswith(("qformer.", "projection."))}


def build_model(vision: str | Path, llm: str | Path, out: str | Path, qformer: str | Path | None = None,
                copy: bool = False, dtype: torch.dtype | None = None, num_query_tokens: int = 32,
                template: str = "minigpt4", vision_feature_layer: int | None = None, drop_cls_token: bool = False,
                seed: int = 0, qformer_overrides: dict | None = None) -> dict:
    """Write a model dir combining `vision` and `llm` with a new (or `qformer`-initialised) bridge.

    `qformer_overrides` (e.g. `{"num_hidden_layers": 2}`) resizes a fresh Q-Former; it cannot be
    combined with `qformer`, whose weights fix the shape.
    """
    from transformers import AutoConfig, AutoTokenizer, Blip2QFormerConfig

    from mmbridge.config import MMBridgeConfig
    from mmbridge.interop.blip2 import load_blip2_config, map_key
    from mmbridge.interop.convert import remap, target_layout, write_model_dir
    from mmbridge.processing import PRESET_STOP_STRINGS, MMBridgeProcessor, chat_template_preset

    vision_dir, llm_dir = Path(vision).resolve(), Path(llm).resolve()
    for name, path in (("--vision", vision_dir), ("--llm", llm_dir)):
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{name} {path} is not an HF model dir (no config.json)")
    vision_source = AutoConfig.from_pretrained(vision_dir)
    composite = getattr(vision_source, "vision_config", None) is not None
    vision_config = vision_source.vision_config if composite else vision_source
    text_config = AutoConfig.from_pretrained(llm_dir)

    qformer_dir = Path(qformer).resolve() if qformer else None
    if qformer_dir is not None:
        blip2_config = load_blip2_config(qformer_dir)
        qformer_config, num_query_tokens = blip2_config.qformer_config.to_dict(), blip2_config.num_query_tokens
    else:
        qformer_config = Blip2QFormerConfig().to_dict()  # BLIP-2's Q-Former: BERT-base width, 12 layers
        qformer_config.update(qformer_overrides or {})
    if qformer_dir is not None and qformer_overrides:
        raise ValueError("Q-Former size options cannot be combined with a pretrained --qformer")

    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    processor = MMBridgeProcessor(_image_processor(vision_dir, vision_config.image_size), tokenizer,
                                  chat_template=chat_template_preset(template), num_query_tokens=num_query_tokens,
                                  stop_strings=PRESET_STOP_STRINGS[template])
    component_paths = {}
    if not copy:
        component_paths["llm"] = str(llm_dir)
        if not composite:
            component_paths["vision"] = str(vision_dir)
    config = MMBridgeConfig(
        vision_config=vision_config.to_dict(), qformer_config=qformer_config, text_config=text_config.to_dict(),
        num_query_tokens=num_query_tokens, vision_feature_layer=vision_feature_layer, drop_cls_token=drop_cls_token,
        image_token_index=processor.image_token_id, component_paths=component_paths)
    expected, _ = target_layout(config)
    bridge = fresh_bridge(config, seed)
    skipped: list[str] = []

    def tensors():
        if qformer_dir is not None:  # pretrained Q-Former + queries; the projection stays fresh
            for key, tensor in iter_tensors(qformer_dir, wanted=lambda k: k.startswith(("qformer.", "query_tokens"))):
                yield map_key(key), tensor, f"{qformer_dir.name}/{key}"
            yield "projection.weight", bridge["projection.weight"], "fresh projection"
            if "projection.bias" in bridge:
                yield "projection.bias", bridge["projection.bias"], "fresh projection"
        else:
            for key, tensor in bridge.items():
                yield key, tensor, "fresh bridge"
        if "vision" not in component_paths:
            if vision_source.model_type == "blip-2":  # read only the tower's tensors, not BLIP-2's LM
                source = iter_tensors(vision_dir, wanted=lambda k: k.startswith("vision_model."))
            else:
                source = hf_component_tensors(vision_dir, "model", dtype)
            for key, tensor in source:
                if composite and not key.startswith("vision_model."):
                    continue  # the text tower / heads of a CLIP-style dual model
                target = remap(key, "vision.model.", expected)
                if target is None:
                    skipped.append(key)  # e.g. a classifier head, not part of the tower
                    continue
                yield target, tensor, f"{vision_dir.name}/{key}"
        if "llm" not in component_paths:
            for key, tensor in hf_component_tensors(llm_dir, "causal_lm", dtype):
                yield f"llm.model.{key}", tensor, f"{llm_dir.name}/{key}"

    summary = write_model_dir(out, config, processor, tensors(), dtype=dtype)
    return {**summary, "referenced": dict(component_paths), "skipped": skipped}
