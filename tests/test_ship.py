"""Packaging a trained model for the package (`pretrain.ship.ship_model`): half-precision weights that load
back exactly, and a draw head's generator referenced by a path relative to the model instead of copied."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("diffusers")

from mmbridge.modeling import MMBridgeModel  # noqa: E402
from mmbridge.pretrain.ship import ship_model  # noqa: E402
from mmbridge.serve.testing import DRAW_PROMPT, tiny_draw_model_dir  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model that draws, with LoRA adapters on its frozen LLM (as the shipped model has)."""
    from mmbridge.processing import MMBridgeProcessor

    directory = tmp_path_factory.mktemp("draw")
    drawn = tiny_draw_model_dir(directory)
    model = MMBridgeModel.from_pretrained(drawn)
    model.add_llm_lora({"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]})
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B" in name:
                param.normal_(std=0.01)
    model.save_pretrained(directory / "model-lora")
    MMBridgeProcessor.from_pretrained(drawn).save_pretrained(directory / "model-lora")
    return directory / "model-lora"


def test_shipped_copy_is_fp16_references_the_generator_and_draws_like_the_original(trained, tmp_path):
    from mmbridge.generation import MMBridgePipeline

    out = tmp_path / "assets" / "models" / "tiny"
    generator = os.path.relpath(trained.parent / "sd", out)
    summary = ship_model(trained, out, generator=generator)

    assert not (out / "generator").exists() and summary["generator"] == generator
    config = json.loads((out / "config.json").read_text())
    assert config["component_paths"] == {"draw.generator": generator} == {"draw.generator": config["heads"]["draw"]
                                                                          ["pipeline_path"]}
    stored = load_file(str(out / "trainable.safetensors"))
    # trained parts (Q-Former, projection, mapper, LoRA, new token rows) in fp16; the frozen parts as they were
    frozen = [k for k in stored
              if k.startswith(("vision.", "llm.")) and ".lora_" not in k and "trainable_tokens" not in k]
    assert frozen and all(stored[k].dtype == torch.float32 for k in frozen)
    assert {stored[k].dtype for k in stored if k not in frozen and stored[k].is_floating_point()} == {torch.float16}
    assert any(".lora_" in k for k in stored) and 0 < summary["max_rounding_error"] < 1e-2

    original, shipped = MMBridgeModel.from_pretrained(trained), MMBridgeModel.from_pretrained(out)
    assert shipped.heads["draw"].generator is not None  # found through the relative path
    for key, value in original.state_dict().items():  # the same model: frozen parts exactly, the rest up to fp16
        if key in frozen:
            assert torch.equal(shipped.state_dict()[key], value), key
        assert torch.allclose(shipped.state_dict()[key], value, atol=1e-2, rtol=1e-3), key

    conversation = [[{"role": "user", "content": [{"type": "text", "text": DRAW_PROMPT}]}]]
    images = [[p for p in MMBridgePipeline.from_pretrained(d).generate(conversation, max_new_tokens=12)[0].parts
               if p.type == "image"] for d in (trained, out)]
    assert len(images[0]) == len(images[1]) == 1


def test_a_generator_that_differs_is_refused(trained, tmp_path):
    other = tmp_path / "other-sd"
    shutil.copytree(trained.parent / "sd", other)
    (other / "scheduler" / "scheduler_config.json").write_text("{}")
    out = tmp_path / "shipped"
    with pytest.raises(ValueError, match="differs"):
        ship_model(trained, out, generator=os.path.relpath(other, out))
