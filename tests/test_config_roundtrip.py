import json

import pytest
import torch
from safetensors.torch import load_file

from mmbridge.config import MMBridgeConfig
from mmbridge.generation import MMBridgePipeline
from mmbridge.modeling import MMBridgeModel
from mmbridge.processing import MMBridgeProcessor
from mmbridge.testing import build_tiny


def _comparable(config: dict) -> dict:
    """Config as a dict minus what loading legitimately fills in (source path, resolved dtype)."""
    return {k: _comparable(v) if isinstance(v, dict) else v for k, v in config.items()
            if k not in ("_name_or_path", "dtype")}


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_model_dir_round_trip_is_exact(tmp_path, images):
    model, processor = build_tiny(seed=1, init_std=0.5)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json",
            "preprocessor_config.json", "chat_template.jinja"} <= names

    loaded = MMBridgeModel.from_pretrained(tmp_path)
    assert _comparable(loaded.config.to_dict()) == _comparable(model.config.to_dict())
    _same_state(model, loaded)

    loaded_processor = MMBridgeProcessor.from_pretrained(tmp_path)
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is it?"}]}]
    a, b = processor(conv, images=images[:1]), loaded_processor(conv, images=images[:1])
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert torch.equal(a["pixel_values"], b["pixel_values"])
    with torch.no_grad():
        assert torch.equal(model(**a).logits, loaded(**b).logits)


def test_nested_config_types_survive_json(tmp_path):
    model, _ = build_tiny()
    model.config.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["model_type"] == "mmbridge"
    assert raw["vision_config"]["model_type"] == "vit"
    assert raw["text_config"]["model_type"] == "llama"
    config = MMBridgeConfig.from_pretrained(tmp_path)
    assert type(config.qformer_config).__name__ == "Blip2QFormerConfig"
    assert config.qformer_config.encoder_hidden_size == config.vision_config.hidden_size
    assert config.trainable == {"vision": False, "qformer": True, "projection": True, "llm": False}


def test_unknown_component_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown component"):
        MMBridgeConfig(trainable={"visoin": True})


def test_trainable_only_artifact_on_top_of_frozen_components(tmp_path, images):
    model, processor = build_tiny(seed=2, init_std=0.5)
    vision_dir, llm_dir, small_dir = tmp_path / "vision", tmp_path / "llm", tmp_path / "small"
    model.vision.model.save_pretrained(vision_dir)
    model.llm.model.save_pretrained(llm_dir)
    model.config.component_paths = {"vision": str(vision_dir), "llm": str(llm_dir)}
    model.save_pretrained(small_dir, trainable_only=True)
    processor.save_pretrained(small_dir)

    stored = load_file(small_dir / "trainable.safetensors")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(stored) == trainable
    assert all(k.startswith(("qformer.", "projection.")) for k in stored)

    loaded = MMBridgeModel.from_pretrained(small_dir)
    _same_state(model, loaded)
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    inputs = processor(conv, images=images[:1])
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)


def test_trainable_only_without_paths_refuses_to_lose_weights(tmp_path):
    model, _ = build_tiny()
    with pytest.raises(ValueError, match="component_paths"):
        model.save_pretrained(tmp_path, trainable_only=True)


def test_freeze_policy_from_config():
    model, _ = build_tiny(trainable={"qformer": False, "llm": True})
    by_component = {name: {p.requires_grad for p in getattr(model, name).parameters()}
                    for name in ("vision", "qformer", "projection", "llm")}
    assert by_component == {"vision": {False}, "qformer": {False}, "projection": {True}, "llm": {True}}
    model.train()
    assert not model.vision.training and not model.qformer.training and model.llm.training


def test_missing_model_dir_names_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="local director"):
        MMBridgePipeline.from_pretrained(tmp_path / "nope")
