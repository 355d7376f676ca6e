"""Every load path keeps the config's trainable policy: frozen parts have requires_grad=False, stay in
eval mode after `model.train()`, and do not change through a plain PyTorch optimizer step."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from mmbridge.interop.blip2 import import_blip2
from mmbridge.interop.tiny import build_tiny_blip2
from mmbridge.modeling import MMBridgeModel
from mmbridge.models import resolve_model_path
from mmbridge.testing import build_tiny


def _count_trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _expected_trainable(model) -> int:
    """What the policy says: trainable components in full, plus peft adapters inside frozen ones."""
    total = 0
    for name, param in model.named_parameters():
        # a head's components are named "act.decoders", "act.text_encoder", ...: the longest that holds the name
        component = max((c for c in model.config.trainable if name.startswith(c + ".")), key=len)
        if model.config.trainable[component] or "trainable_tokens_delta" in name or ".lora_" in name:
            total += param.numel()
    return total


def _inputs(processor, images):
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]},
                    {"role": "assistant", "content": "red"}]
    return processor(conversation, images=images[:1], return_labels=True)


def _assert_policy_holds(model, processor_inputs) -> None:
    assert _count_trainable(model) == _expected_trainable(model)
    frozen = [c for c, t in model.config.trainable.items() if not t]
    assert frozen, "the test needs a model with frozen parts"
    model.train()
    for name in frozen:
        assert not getattr(model, name).training, f"{name} left eval mode"
    # One optimizer step of a plain loop over model.parameters(): frozen parts must stay bit-identical.
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = model(**processor_inputs).loss
    loss.backward()
    optimizer.step()
    changed = [n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert not changed, f"frozen parameters changed: {changed[:3]}"
    assert any(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_from_pretrained_full_dir_keeps_the_policy(tmp_path, images):
    model, processor = build_tiny(seed=0)
    expected = _count_trainable(model)
    model.save_pretrained(tmp_path)
    loaded = MMBridgeModel.from_pretrained(tmp_path)
    assert _count_trainable(loaded) == expected
    assert not loaded.training  # eval after loading, as transformers does
    _assert_policy_holds(loaded, _inputs(processor, images))


def test_from_pretrained_small_artifact_and_from_components_keep_the_policy(tmp_path, images):
    model, processor = build_tiny(seed=0)
    model.llm.model.save_pretrained(tmp_path / "llm")
    model.vision.model.save_pretrained(tmp_path / "vision")
    model.config.component_paths = {"llm": str(tmp_path / "llm"), "vision": str(tmp_path / "vision")}
    expected = _count_trainable(model)
    model.save_pretrained(tmp_path / "small", trainable_only=True)
    loaded = MMBridgeModel.from_pretrained(tmp_path / "small")
    assert _count_trainable(loaded) == expected
    _assert_policy_holds(loaded, _inputs(processor, images))
    built = MMBridgeModel.from_components(loaded.config)
    assert _count_trainable(built) == expected


def test_imported_blip2_keeps_the_policy(tmp_path, images):
    from mmbridge.processing import MMBridgeProcessor

    build_tiny_blip2(tmp_path / "hf")
    import_blip2(tmp_path / "hf", tmp_path / "mm")
    loaded = MMBridgeModel.from_pretrained(tmp_path / "mm")
    assert loaded.config.trainable == {"vision": False, "qformer": True, "projection": True, "llm": False}
    n_bridge = sum(p.numel() for c in ("qformer", "projection") for p in getattr(loaded, c).parameters())
    assert _count_trainable(loaded) == n_bridge
    _assert_policy_holds(loaded, _inputs(MMBridgeProcessor.from_pretrained(tmp_path / "mm"), images))


def test_shipped_model_keeps_the_policy():
    from mmbridge.generation import MMBridgePipeline

    pipe = MMBridgePipeline.from_pretrained(resolve_model_path("shapes"))
    model = pipe.model
    assert _count_trainable(model) == _expected_trainable(model)
    assert not model.llm.model.get_input_embeddings().weight.requires_grad


def test_labels_without_answer_tokens_raise_naming_the_sample(images):
    model, processor = build_tiny(seed=0)
    answered = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "red"}]
    unanswered = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match=r"conversation\(s\) \[1\] have no answer tokens"):
        processor([answered, unanswered], return_labels=True)
    ids = torch.randint(4, 50, (1, 6))
    with pytest.raises(ValueError, match="every label is -100"):
        model(input_ids=ids, labels=torch.full_like(ids, -100))
