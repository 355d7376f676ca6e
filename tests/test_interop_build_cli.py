"""`mmbridge build` (referenced and copied components) and the `build` / `import` command lines."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from mmbridge.cli import main
from mmbridge.interop.build import build_model
from mmbridge.interop.loading import ShapeMismatchError
from mmbridge.interop.tiny import build_tiny_blip2, build_tiny_llama, save_minigpt4_projection
from mmbridge.modeling import MMBridgeModel
from mmbridge.processing import MMBridgeProcessor

SMALL_QFORMER = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from transformers import ViTConfig, ViTModel

    root = tmp_path_factory.mktemp("components")
    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       image_size=32, patch_size=8)).save_pretrained(root / "vit")
    build_tiny_llama(root / "llama")
    build_tiny_blip2(root / "blip2", llm="opt")
    save_minigpt4_projection(root / "proj.pth", in_features=32, out_features=32)
    return root


def _logits(directory):
    model = MMBridgeModel.from_pretrained(directory).eval()
    processor = MMBridgeProcessor.from_pretrained(directory)
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    batch = processor([{"role": "user", "content": [{"type": "image", "image": image},
                                                     {"type": "text", "text": "What color is the circle?"}]}],
                      add_generation_prompt=True)
    with torch.no_grad():
        return model, model(**batch).logits


def test_build_references_frozen_parts_and_copy_is_equivalent(dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    summary = build_model(dirs / "vit", dirs / "llama", tmp_path / "ref", num_query_tokens=4,
                          qformer_overrides=SMALL_QFORMER)
    assert set(summary["referenced"]) == {"vision", "llm"}
    assert not list((tmp_path / "ref").glob("model*.safetensors"))  # only the bridge is stored
    model, ref_logits = _logits(tmp_path / "ref")
    llama = AutoModelForCausalLM.from_pretrained(dirs / "llama")
    torch.testing.assert_close(model.llm.model.lm_head.weight, llama.lm_head.weight, rtol=0, atol=0)
    assert model.qformer.query_tokens.abs().sum() > 0  # fresh bridge, initialised

    build_model(dirs / "vit", dirs / "llama", tmp_path / "copy", num_query_tokens=4, copy=True,
                qformer_overrides=SMALL_QFORMER)
    assert (tmp_path / "copy" / "model.safetensors").is_file()
    assert not MMBridgeModel.from_pretrained(tmp_path / "copy").config.component_paths
    _, copy_logits = _logits(tmp_path / "copy")
    torch.testing.assert_close(copy_logits, ref_logits, rtol=0, atol=1e-6)


def test_build_with_blip2_vision_and_qformer(dirs, tmp_path):
    summary = build_model(dirs / "blip2", dirs / "llama", tmp_path / "out", qformer=dirs / "blip2")
    assert summary["referenced"] == {"llm": str((dirs / "llama").resolve())}  # composite vision: copied
    model, _ = _logits(tmp_path / "out")
    assert model.config.num_query_tokens == 4 and model.config.vision_config.model_type == "blip_2_vision_model"


def test_build_qformer_width_mismatch_names_both_shapes(dirs, tmp_path):
    # the BLIP-2 Q-Former cross-attends to a 48-wide tower; this ViT is 32 wide
    with pytest.raises(ShapeMismatchError, match=r"\(32, 48\).*\(32, 32\)"):
        build_model(dirs / "vit", dirs / "llama", tmp_path / "out", qformer=dirs / "blip2")


def test_cli_build_and_imports(dirs, tmp_path, capsys):
    assert main(["build", "--vision", str(dirs / "vit"), "--llm", str(dirs / "llama"), "--out", str(tmp_path / "b"),
                 "--num-query-tokens", "2", "--qformer-layers", "1", "--qformer-hidden", "48"]) == 0
    assert MMBridgeModel.from_pretrained(tmp_path / "b").config.qformer_config.num_hidden_layers == 1
    assert main(["import", "blip2", str(dirs / "blip2"), "--out", str(tmp_path / "i"), "--dtype", "bfloat16"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["import", "minigpt4", "--blip2", str(dirs / "blip2"), "--proj", str(dirs / "proj.pth"),
                 "--llm", str(dirs / "llama"), "--out", str(tmp_path / "m"), "--link-llm"]) == 0
    assert MMBridgeProcessor.from_pretrained(tmp_path / "m").stop_strings == ["###"]

    # user errors: one line on stderr, exit code 2
    assert main(["import", "blip2", str(dirs / "blip2"), "--out", str(tmp_path / "i")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["import", "blip2", str(dirs / "llama"), "--out", str(tmp_path / "x")]) == 2
    assert "not BLIP-2" in capsys.readouterr().err
    assert main(["import", "minigpt4", "--blip2", str(dirs / "blip2"), "--proj", str(dirs / "missing.pth"),
                 "--llm", str(dirs / "llama"), "--out", str(tmp_path / "y")]) == 2
    assert "missing.pth" in capsys.readouterr().err
