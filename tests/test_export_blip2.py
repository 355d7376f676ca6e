"""`mmbridge export blip2`: an mmbridge see-model as a transformers BLIP-2 / InstructBLIP dir.

Round trips (import -> export -> import) are bit-identical; the exported dir, loaded by transformers'
`from_pretrained`, gives mmbridge's fp32 logits within 1e-5 on the same inputs (tiny random BLIP-2 with
Llama and OPT LMs, a tiny MiniGPT-4 import, an instruction-aware Q-Former, merged LoRA). The shipped
`shapes` model is refused with the reasons (CLIP vision tower, unmerged LoRA); heads are left out and named.
"""

import json
import os
from dataclasses import dataclass
from typing import ClassVar

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from mmbridge.heads_config import HeadConfig, register_head_config
from mmbridge.interop.blip2 import import_blip2
from mmbridge.interop.export import ExportError, _rename_token, export_blip2
from mmbridge.interop.minigpt4 import import_minigpt4
from mmbridge.interop.tiny import build_tiny_blip2, build_tiny_llama, save_minigpt4_projection
from mmbridge.modeling import MMBridgeModel
from mmbridge.modeling.heads import OutputHead, register_head
from mmbridge.processing import MMBridgeProcessor

TOLERANCE = 1e-5


def _images(n=2, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(n)]


def _conversations(questions):
    return [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}] for q in questions]


QUESTIONS = ["Question: What color is the circle? Answer:", "Question: How many? Answer:"]


def _batch(model_dir, questions=QUESTIONS):
    processor = MMBridgeProcessor.from_pretrained(model_dir)
    return processor(_conversations(questions), images=_images(len(questions)), add_generation_prompt=True)


def _unpadded(batch):
    return [row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"])]


def _state(model_dir):
    return MMBridgeModel.from_pretrained(model_dir, dtype=torch.float32).state_dict()


def _compare_logits(model_dir, out, hf_class, batch, vocab=None):
    """max |mmbridge - transformers| over the logits of the same batch (first `vocab` columns)."""
    mm = MMBridgeModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf = hf_class.from_pretrained(out, dtype=torch.float32).eval()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    extra = {k: batch[k] for k in ("qformer_input_ids", "qformer_attention_mask") if k in batch}
    with torch.no_grad():
        ours = mm(**inputs, **extra).logits
        ref = hf(**inputs, **extra).logits
        flipped = mm(**{**inputs, "pixel_values": torch.flip(inputs["pixel_values"], dims=[0])}, **extra).logits
    vocab = vocab or ours.shape[-1]
    assert (flipped - ours).abs().max() > 1e-2, "logits must depend on the image for the test to mean anything"
    return (ref[..., :vocab] - ours[..., :vocab]).abs().max().item()


@pytest.fixture(scope="module", params=["llama", "opt"])
def blip2_dirs(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"export_{request.param}")
    build_tiny_blip2(root / "hf", llm=request.param)
    import_blip2(root / "hf", root / "mm")
    summary = export_blip2(root / "mm", root / "out")
    return request.param, root, summary


def test_blip2_round_trip_is_bit_identical(blip2_dirs):
    llm, root, summary = blip2_dirs
    assert summary["class"] == "Blip2ForConditionalGeneration" and summary["left_out"] == []
    import_blip2(root / "out", root / "mm2")
    first, second = _state(root / "mm"), _state(root / "mm2")
    assert set(first) == set(second)
    assert all(torch.equal(first[k], second[k]) for k in first)
    # ... and the exported file holds the original checkpoint's tensors, bit for bit
    original = load_file(str(root / "hf" / "model.safetensors"))
    exported = load_file(str(root / "out" / "model.safetensors"))
    assert set(exported) <= set(original)
    assert all(torch.equal(original[k], exported[k]) for k in exported)
    assert set(original) - set(exported) <= {"language_model.lm_head.weight"}  # tied (OPT): stored once


def test_exported_blip2_logits_and_processor_match_mmbridge(blip2_dirs):
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    llm, root, _ = blip2_dirs
    batch = _batch(root / "mm")
    diff = _compare_logits(root / "mm", root / "out", Blip2ForConditionalGeneration, batch)
    print(f"export blip2-{llm}: max |logit diff| = {diff:.3g}")
    assert diff <= TOLERANCE
    # BLIP-2's own processor, read from the exported dir, gives the same token ids
    hf_processor = Blip2Processor.from_pretrained(root / "out")
    hf_batch = hf_processor(images=_images(2), text=QUESTIONS, return_tensors="pt", padding=True)
    assert _unpadded(hf_batch) == _unpadded(batch)
    torch.testing.assert_close(hf_batch["pixel_values"], batch["pixel_values"], rtol=0, atol=0)


@pytest.fixture(scope="module")
def minigpt4_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_minigpt4")
    build_tiny_blip2(root / "blip2", llm="llama", seed=3)
    build_tiny_llama(root / "vicuna", seed=4, hidden=48)
    # Vicuna's vocabulary has no MiniGPT-4 placeholder: the import appends <ImageHere> after the LM's rows
    _rename_token(root / "vicuna", "<ImageHere>", "<unused4>", 4)
    save_minigpt4_projection(root / "minigpt4.pth", 32, 48, seed=5)
    import_minigpt4(root / "blip2", root / "minigpt4.pth", root / "vicuna", root / "mm")
    summary = export_blip2(root / "mm", root / "out")
    return root, summary


def test_minigpt4_export_logits_match(minigpt4_dirs):
    from transformers import Blip2ForConditionalGeneration

    root, summary = minigpt4_dirs
    assert any("vocabulary grew" in note for note in summary["notes"])
    assert any("'###'" in note for note in summary["notes"])  # the stop string is handed to the user
    vocab = MMBridgeModel.from_pretrained(root / "mm").llm.vocab_size
    batch = _batch(root / "mm", ["What color is the circle?", "How many shapes?"])
    diff = _compare_logits(root / "mm", root / "out", Blip2ForConditionalGeneration, batch, vocab=vocab)
    print(f"export minigpt4: max |logit diff| = {diff:.3g}")
    assert diff <= TOLERANCE
    generation = json.loads((root / "out" / "generation_config.json").read_text())
    assert generation["suppress_tokens"] == [vocab]  # the image placeholder's new row is never generated


def test_minigpt4_round_trip_is_bit_identical(minigpt4_dirs):
    root, _ = minigpt4_dirs
    import_blip2(root / "out", root / "mm2")
    first, second = _state(root / "mm"), _state(root / "mm2")
    assert set(first) == set(second)
    for key in first:
        if first[key].shape == second[key].shape:
            assert torch.equal(first[key], second[key]), key
        else:  # the embedding rows added for the image placeholder (zeros), nothing else
            rows = first[key].shape[0]
            assert key.startswith("llm.model.") and torch.equal(first[key], second[key][:rows])
            assert not second[key][rows:].any()
    export_blip2(root / "mm2", root / "out2")  # and exporting again is a fixpoint
    a, b = load_file(str(root / "out" / "model.safetensors")), load_file(str(root / "out2" / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _instruction_model(root):
    """A tiny model with BLIP-2's ViT and an instruction-aware Q-Former (InstructBLIP's layout)."""
    from mmbridge.testing import build_tiny

    model, processor = build_tiny(seed=0, init_std=0.5, image_text_hidden_size=16, qformer_instruction=True)
    config = model.config
    config.vision_config = {"model_type": "blip_2_vision_model", "hidden_size": 32, "num_hidden_layers": 2,
                            "num_attention_heads": 4, "intermediate_size": 64, "image_size": 32, "patch_size": 8,
                            "initializer_range": 0.5}
    config.qformer_cls_token_id = processor.tokenizer.bos_token_id
    config = type(config).from_dict(config.to_dict())
    torch.manual_seed(0)
    model = MMBridgeModel(config).eval()
    with torch.no_grad():  # BLIP-2's ViT initialises its LayerNorms to 1/0: make every weight matter
        for param in model.vision.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    processor.qformer_cls_token_id = config.qformer_cls_token_id
    model.save_pretrained(root)
    processor.save_pretrained(root)


def test_instruction_aware_qformer_exports_as_instructblip(tmp_path):
    from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

    _instruction_model(tmp_path / "mm")
    summary = export_blip2(tmp_path / "mm", tmp_path / "out")
    assert summary["class"] == "InstructBlipForConditionalGeneration"
    assert any("stage-1 heads" in item for item in summary["left_out"])
    questions = ["What color is the circle?", "How many shapes are there in the picture?"]
    batch = _batch(tmp_path / "mm", questions)
    diff = _compare_logits(tmp_path / "mm", tmp_path / "out", InstructBlipForConditionalGeneration, batch)
    print(f"export instructblip: max |logit diff| = {diff:.3g}")
    assert diff <= TOLERANCE
    # InstructBLIP's processor gives the Q-Former the same instruction ids mmbridge's processor gives it
    hf_processor = InstructBlipProcessor.from_pretrained(tmp_path / "out")
    hf_batch = hf_processor(images=_images(2), text=questions, return_tensors="pt", padding=True)
    assert hf_batch["qformer_input_ids"].tolist() == batch["qformer_input_ids"].tolist()
    assert hf_batch["qformer_attention_mask"].tolist() == batch["qformer_attention_mask"].tolist()


def test_lora_is_refused_unless_merged(tmp_path):
    from transformers import Blip2ForConditionalGeneration

    build_tiny_blip2(tmp_path / "hf")
    import_blip2(tmp_path / "hf", tmp_path / "base")
    model = MMBridgeModel.from_pretrained(tmp_path / "base")
    model.add_llm_lora({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]})
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.normal_(std=0.3)
    model.save_pretrained(tmp_path / "mm")
    MMBridgeProcessor.from_pretrained(tmp_path / "base").save_pretrained(tmp_path / "mm")

    with pytest.raises(ExportError, match=r"LoRA adapters \(r=4\).*--merge-lora"):
        export_blip2(tmp_path / "mm", tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    summary = export_blip2(tmp_path / "mm", tmp_path / "out", merge_lora=True)
    assert any("merged" in note for note in summary["notes"])
    diff = _compare_logits(tmp_path / "mm", tmp_path / "out", Blip2ForConditionalGeneration, _batch(tmp_path / "mm"))
    print(f"export blip2 + merged LoRA: max |logit diff| = {diff:.3g}")
    assert diff <= TOLERANCE


@register_head_config
@dataclass
class ExportToyConfig(HeadConfig):
    kind: ClassVar[str] = "export_toy"
    loss_names: ClassVar[tuple[str, ...]] = ("export_toy",)
    name: str = "toy"
    trigger: str = "[TOY]"
    num_slots: int = 1


@register_head
class ExportToyHead(OutputHead):
    kind = "export_toy"

    def __init__(self, config, model_config):
        super().__init__(config, model_config)
        self.classifier = nn.Linear(self.llm_hidden_size, 3)


def test_heads_are_left_out_and_named(tmp_path):
    from transformers import Blip2ForConditionalGeneration

    build_tiny_blip2(tmp_path / "hf")
    import_blip2(tmp_path / "hf", tmp_path / "base")
    model = MMBridgeModel.from_pretrained(tmp_path / "base")
    processor = MMBridgeProcessor.from_pretrained(tmp_path / "base")
    model.add_head(ExportToyConfig(), processor.tokenizer)
    model.save_pretrained(tmp_path / "mm")
    processor.save_pretrained(tmp_path / "mm")

    summary = export_blip2(tmp_path / "mm", tmp_path / "out")
    [note] = summary["left_out"]
    assert "output head 'toy'" in note and "['[TOY]', '[TOY_0]']" in note
    assert summary["dropped_keys"] == 2  # the head's classifier weight and bias
    assert json.loads((tmp_path / "out" / "mmbridge_export.json").read_text())["left_out"] == [note]
    diff = _compare_logits(tmp_path / "mm", tmp_path / "out", Blip2ForConditionalGeneration, _batch(tmp_path / "mm"))
    assert diff <= TOLERANCE  # the see-part is exported whole (head tokens' rows folded into the LLM)


def test_shipped_shapes_model_is_refused_with_the_reasons(tmp_path):
    from mmbridge.models import resolve_model_path

    shapes = resolve_model_path("shapes")
    with pytest.raises(ExportError) as caught:
        export_blip2(shapes, tmp_path / "out")
    message = str(caught.value)
    assert "cannot be exported as InstructBlipForConditionalGeneration" in message
    assert "'clip_vision_model'" in message and "pre_layrnorm" in message and "post_layernorm" in message
    assert "--merge-lora" in message and "\n" not in message
    with pytest.raises(ExportError, match="clip_vision_model") as caught:  # merging LoRA does not fix the tower
        export_blip2(shapes, tmp_path / "out", merge_lora=True)
    assert "--merge-lora" not in str(caught.value)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_cli")
    build_tiny_blip2(root / "hf")
    import_blip2(root / "hf", root / "mm")
    return root / "mm"


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage", ["truncated_weights", "garbled_config", "garbled_tokenizer"])
def test_corrupt_model_dir_is_one_line_naming_the_file(small_model, tmp_path, damage):
    bad = _copy(small_model, tmp_path / "bad")
    file = {"truncated_weights": "model.safetensors", "garbled_config": "config.json",
            "garbled_tokenizer": "tokenizer.json"}[damage]
    data = (bad / file).read_bytes()
    (bad / file).write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportError) as caught:
        export_blip2(bad, tmp_path / "out")
    assert str(bad / file) in str(caught.value) and "\n" not in str(caught.value)


def _cli(capsys, *args):
    from mmbridge.cli import main

    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_exports_and_refuses(small_model, tmp_path, capsys):
    code, out, err = _cli(capsys, "export", "blip2", "--model", str(small_model), "--out", str(tmp_path / "out"))
    assert code == 0, err
    assert "Blip2ForConditionalGeneration" in out
    code, out, err = _cli(capsys, "export", "blip2", "--model", str(small_model), "--out", str(tmp_path / "out"))
    assert code == 2 and "not empty" in err

    code, out, err = _cli(capsys, "export", "blip2", "--model", "shapes", "--out", str(tmp_path / "shapes"))
    [line] = err.strip().splitlines()
    assert code == 2 and line.startswith("mmbridge export: error:") and "clip_vision_model" in line

    bad = _copy(small_model, tmp_path / "bad")
    (bad / "model.safetensors").write_bytes(b"\x00garbage")
    code, out, err = _cli(capsys, "export", "blip2", "--model", str(bad), "--out", str(tmp_path / "o3"))
    [line] = err.strip().splitlines()
    assert code == 2 and str(bad / "model.safetensors") in line


def test_model_with_a_referenced_llm_exports_and_a_corrupt_component_is_named(tmp_path):
    """The layout `mmbridge build` writes (LLM referenced by path, bridge in trainable.safetensors)."""
    from transformers import Blip2ForConditionalGeneration

    from mmbridge.interop.build import build_model

    build_tiny_blip2(tmp_path / "blip2", seed=6)
    build_tiny_llama(tmp_path / "llm", seed=7, hidden=48)
    build_model(tmp_path / "blip2", tmp_path / "llm", tmp_path / "built", qformer=tmp_path / "blip2",
                num_query_tokens=4, template="plain")
    model = MMBridgeModel.from_pretrained(tmp_path / "built")
    torch.manual_seed(0)
    with torch.no_grad():  # a "trained" projection, so that the image matters
        model.projection.weight.normal_(std=0.5)
    assert model.config.component_paths == {"llm": str((tmp_path / "llm").resolve())}
    model.save_pretrained(tmp_path / "mm")
    MMBridgeProcessor.from_pretrained(tmp_path / "built").save_pretrained(tmp_path / "mm")

    summary = export_blip2(tmp_path / "mm", tmp_path / "out")
    assert summary["class"] == "Blip2ForConditionalGeneration"
    diff = _compare_logits(tmp_path / "mm", tmp_path / "out", Blip2ForConditionalGeneration,
                           _batch(tmp_path / "mm", ["What is it?", "How many?"]))
    print(f"export of a model with a referenced LLM: max |logit diff| = {diff:.3g}")
    assert diff <= TOLERANCE

    weights = tmp_path / "llm" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ExportError) as caught:
        export_blip2(tmp_path / "mm", tmp_path / "out2")
    assert str(weights) in str(caught.value) and "\n" not in str(caught.value)


def test_act_head_is_left_out_and_the_see_part_exported(tmp_path):
    """A model with the act head (VisionLLM v2 routes): the see-part exports, the head is named."""
    from transformers import Blip2ForConditionalGeneration

    from mmbridge.heads_config import ActConfig

    build_tiny_blip2(tmp_path / "hf")
    import_blip2(tmp_path / "hf", tmp_path / "base")
    model = MMBridgeModel.from_pretrained(tmp_path / "base")
    processor = MMBridgeProcessor.from_pretrained(tmp_path / "base")
    config = ActConfig(tasks=["det", "seg"], decoder_hidden_size=32, decoder_layers=1, decoder_heads=4,
                       num_object_queries=4, mask_size=8)
    model.add_head(config, processor.tokenizer)
    processor.register_head(config)
    model.save_pretrained(tmp_path / "mm")
    processor.save_pretrained(tmp_path / "mm")

    summary = export_blip2(tmp_path / "mm", tmp_path / "out")
    [note] = summary["left_out"]
    assert note.startswith("output head 'act' (kind 'act'") and "serve the head with mmbridge" in note
    diff = _compare_logits(tmp_path / "mm", tmp_path / "out", Blip2ForConditionalGeneration, _batch(tmp_path / "mm"))
    assert diff <= TOLERANCE


def test_draw_head_is_left_out_and_its_diffusers_generator_named(tmp_path):
    """A model with the draw head (MiniGPT-5 vokens + a frozen diffusers generator referenced by path)."""
    pytest.importorskip("diffusers")
    from transformers import Blip2ForConditionalGeneration

    from mmbridge.heads_config import DrawConfig
    from mmbridge.testing import build_tiny_sd

    build_tiny_sd(tmp_path / "sd")
    build_tiny_blip2(tmp_path / "hf")
    import_blip2(tmp_path / "hf", tmp_path / "base")
    model = MMBridgeModel.from_pretrained(tmp_path / "base")
    processor = MMBridgeProcessor.from_pretrained(tmp_path / "base")
    config = DrawConfig(pipeline_path=str(tmp_path / "sd"), mapper_hidden_size=32, mapper_layers=(1, 1),
                        mapper_heads=2, num_inference_steps=3)
    model.add_head(config, processor.tokenizer)
    processor.register_head(config)
    model.save_pretrained(tmp_path / "mm")
    processor.save_pretrained(tmp_path / "mm")

    summary = export_blip2(tmp_path / "mm", tmp_path / "out")
    [note] = summary["left_out"]
    assert note.startswith("output head 'draw' (kind 'draw'") and f"draw.generator stays at {tmp_path / 'sd'}" in note
    diff = _compare_logits(tmp_path / "mm", tmp_path / "out", Blip2ForConditionalGeneration, _batch(tmp_path / "mm"))
    assert diff <= TOLERANCE
