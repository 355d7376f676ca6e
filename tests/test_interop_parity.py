"""Parity: imported checkpoints compute exactly what the reference implementations compute.

Tiny random HF BLIP-2 models (Llama and OPT LMs) and a synthetic MiniGPT-4 checkpoint are built
offline, imported, and compared with HF on identical inputs: fp32 logits within 1e-5, greedy
generations identical token for token.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmbridge.interop.blip2 import import_blip2
from mmbridge.interop.minigpt4 import import_minigpt4
from mmbridge.interop.tiny import build_tiny_blip2, build_tiny_llama, save_minigpt4_projection
from mmbridge.modeling import MMBridgeModel
from mmbridge.processing import MMBridgeProcessor

TOLERANCE = 1e-5
MAX_NEW_TOKENS = 12


def _images(n=2, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(n)]


def _conversations(questions):
    return [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}] for q in questions]


@pytest.fixture(scope="module", params=["llama", "opt"])
def blip2_pair(request, tmp_path_factory):
    from transformers import Blip2ForConditionalGeneration

    root = tmp_path_factory.mktemp(f"blip2_{request.param}")
    build_tiny_blip2(root / "hf", llm=request.param)
    summary = import_blip2(root / "hf", root / "mm")
    hf = Blip2ForConditionalGeneration.from_pretrained(root / "hf", dtype=torch.float32).eval()
    mm = MMBridgeModel.from_pretrained(root / "mm", dtype=torch.float32).eval()
    return request.param, hf, mm, MMBridgeProcessor.from_pretrained(root / "mm"), summary


def test_blip2_config_mapping(blip2_pair):
    llm, hf, mm, processor, summary = blip2_pair
    assert mm.config.image_token_index == hf.config.image_token_index == processor.image_token_id
    assert mm.config.vision_feature_layer is None and not mm.config.drop_cls_token
    assert mm.config.num_query_tokens == hf.config.num_query_tokens
    torch.testing.assert_close(mm.qformer.query_tokens, hf.query_tokens, rtol=0, atol=0)
    torch.testing.assert_close(mm.qformer.model.layernorm.weight, hf.qformer.layernorm.weight, rtol=0, atol=0)
    if llm == "opt":  # tied lm_head: not stored, re-tied on load
        assert summary["tied_aliases"] == ["llm.model.lm_head.weight"]
        assert mm.llm.model.lm_head.weight.data_ptr() == mm.llm.model.get_input_embeddings().weight.data_ptr()


def test_blip2_logits_and_greedy_parity(blip2_pair):
    llm, hf, mm, processor, _ = blip2_pair
    batch = processor(_conversations(["Question: What color is the circle? Answer:", "Question: How many? Answer:"]),
                      images=_images(2), add_generation_prompt=True)
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  pixel_values=batch["pixel_values"])
    with torch.no_grad():
        ref = hf(**inputs).logits
        ours = mm(**inputs).logits
        other_image = mm(**{**inputs, "pixel_values": torch.flip(inputs["pixel_values"], dims=[0])}).logits
    diff = (ref - ours).abs().max().item()
    print(f"blip2-{llm}: max |logit diff| = {diff:.3g}")
    assert diff <= TOLERANCE
    assert (other_image - ours).abs().max() > 1e-2, "logits must depend on the image for the test to mean anything"

    settings = dict(max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    ref_tokens = hf.generate(**inputs, **settings)[:, inputs["input_ids"].shape[1]:]  # HF returns prompt + new
    our_tokens = mm.generate(**inputs, **settings)
    assert our_tokens.tolist() == ref_tokens.tolist()


@pytest.fixture(scope="module")
def minigpt4_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("minigpt4")
    build_tiny_blip2(root / "blip2", llm="opt", seed=3)  # its LM is ignored by the importer
    build_tiny_llama(root / "vicuna", seed=4, hidden=40)
    proj = save_minigpt4_projection(root / "pretrained_minigpt4.pth", in_features=32, out_features=40)
    return root, proj


@pytest.mark.parametrize("link_llm", [False, True])
def test_minigpt4_parity_with_hand_composed_reference(minigpt4_dirs, link_llm):
    """Reference = MiniGPT-4's own recipe written with HF modules: Blip2 vision -> Q-Former (queries)
    -> llama_proj -> Llama over [embed(prompt before <ImageHere>), image, embed(prompt after)]."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Blip2ForConditionalGeneration

    root, proj = minigpt4_dirs
    out = root / f"mm_{link_llm}"
    import_minigpt4(root / "blip2", root / "pretrained_minigpt4.pth", root / "vicuna", out, link_llm=link_llm)
    mm = MMBridgeModel.from_pretrained(out, dtype=torch.float32).eval()
    processor = MMBridgeProcessor.from_pretrained(out)
    assert processor.stop_strings == ["###"]
    assert mm.config.trainable["projection"] and not mm.config.trainable["qformer"]
    assert ("llm" in mm.config.component_paths) == link_llm

    question = "What color is the circle?"
    conversation = _conversations([question])[0]
    batch = processor(conversation, images=_images(1, seed=5), add_generation_prompt=True)
    rendered = processor.render(conversation, add_generation_prompt=True)
    assert rendered == f"<s>###Human: <Img><ImageHere></Img> {question} ###Assistant: "

    blip2 = Blip2ForConditionalGeneration.from_pretrained(root / "blip2").eval()
    llama = AutoModelForCausalLM.from_pretrained(root / "vicuna").eval()
    tokenizer = AutoTokenizer.from_pretrained(root / "vicuna")
    with torch.no_grad():
        image_embeds = blip2.vision_model(pixel_values=batch["pixel_values"]).last_hidden_state
        query = blip2.qformer(query_embeds=blip2.query_tokens.expand(1, -1, -1), encoder_hidden_states=image_embeds,
                              encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long))
        img = F.linear(query.last_hidden_state, proj["llama_proj.weight"], proj["llama_proj.bias"])
        before, after = rendered.split("<ImageHere>")
        segs = [tokenizer(s, return_tensors="pt", add_special_tokens=False).input_ids for s in (before, after)]
        embed = llama.get_input_embeddings()
        ref_embeds = torch.cat([embed(segs[0]), img, embed(segs[1])], dim=1)
        ref = llama(inputs_embeds=ref_embeds).logits
        ours = mm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  pixel_values=batch["pixel_values"]).logits
    assert ref.shape == ours.shape
    diff = (ref - ours).abs().max().item()
    print(f"minigpt4 (link_llm={link_llm}): max |logit diff| = {diff:.3g}")
    assert diff <= TOLERANCE

    settings = dict(max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    ref_mask = torch.ones(ref_embeds.shape[:2], dtype=torch.long)
    ref_tokens = llama.generate(inputs_embeds=ref_embeds, attention_mask=ref_mask, **settings)
    our_tokens = mm.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             pixel_values=batch["pixel_values"], **settings)
    assert our_tokens.tolist() == ref_tokens.tolist()
