"""LoRA adapters on the frozen LLM: only the adapters train, the LLM's weights stay bit-identical,
and adapters survive saving (full and small artifact), loading and a later stage that freezes them."""

import pytest
import torch

from mmbridge.modeling import MMBridgeModel
from mmbridge.pretrain.shapes import frozen_parts_identical
from mmbridge.testing import build_tiny
from mmbridge.train.config import stage_config_from_dict
from mmbridge.train.fixtures import make_base_model, write_llava
from mmbridge.train.trainer import Trainer

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}


def logits(model, seed=0):
    torch.manual_seed(seed)
    ids = torch.randint(10, 200, (2, 12))
    with torch.no_grad():
        return model(input_ids=ids).logits


def lora_params(model):
    return {n: p for n, p in model.named_parameters() if ".lora_" in n}


def test_added_lora_starts_as_identity_trains_alone_and_round_trips(tmp_path):
    model, _ = build_tiny(seed=0, init_std=0.5)
    before = logits(model)
    model.add_llm_lora(LORA)
    assert torch.equal(logits(model), before)  # lora_B starts at zero
    adapters = lora_params(model)
    assert len(adapters) == 2 * 3 * model.config.text_config.num_hidden_layers
    trainable_llm = {n for n, p in model.llm.named_parameters() if p.requires_grad}
    assert trainable_llm == {n.removeprefix("llm.") for n in adapters}
    with pytest.raises(ValueError, match="already has LoRA"):
        model.add_llm_lora(LORA)

    with torch.no_grad():
        for p in adapters.values():
            p.normal_(std=0.3)
    changed = logits(model)
    assert not torch.equal(changed, before)
    model.save_pretrained(tmp_path / "m")
    loaded = MMBridgeModel.from_pretrained(tmp_path / "m")
    assert loaded.config.llm_lora["r"] == 4
    assert torch.equal(logits(loaded), changed)


def test_invalid_lora_settings_are_a_clear_error():
    model, _ = build_tiny(seed=0)
    with pytest.raises(ValueError, match="invalid LoRA settings"):
        model.add_llm_lora({"rank": 4})


@pytest.mark.usefixtures("fresh_accelerate")
def test_trainer_stage_with_lora_then_a_stage_that_freezes_it(tmp_path):
    make_base_model(tmp_path / "base")
    write_llava(tmp_path / "llava", n=12)

    def stage(model_dir, **extra):
        return stage_config_from_dict({
            "stage": "lora", "model": str(model_dir), "train": ["projection"],
            "data": {"batch_size": 3, "datasets": [
                {"name": "vqa", "type": "llava_json", "path": str(tmp_path / "llava" / "llava.json")}]},
            "schedule": {"total_steps": 3, "init_lr": 1e-2, "min_lr": 1e-3},
            "run": {"save_every": 3, "progress_bar": False}, **extra})

    base = MMBridgeModel.from_pretrained(tmp_path / "base")
    first = Trainer(stage(tmp_path / "base", llm_lora=LORA), tmp_path / "run1")
    first.fit()
    trained = first.accelerator.unwrap_model(first.model)
    assert all(p.abs().sum() > 0 for n, p in lora_params(trained).items() if "lora_B" in n)  # they learned
    assert frozen_parts_identical(base, trained)

    exported = MMBridgeModel.from_pretrained(tmp_path / "run1" / "model")  # small artifact on component paths
    assert torch.equal(logits(exported), logits(trained.eval()))

    second = Trainer(stage(tmp_path / "run1" / "model"), tmp_path / "run2")  # no llm_lora: adapters frozen
    second.fit()
    model = second.accelerator.unwrap_model(second.model)
    assert not any(p.requires_grad for p in lora_params(model).values())
    final = MMBridgeModel.from_pretrained(tmp_path / "run2" / "model")
    for name, p in lora_params(exported).items():
        assert torch.equal(lora_params(final)[name], p), f"{name} lost or changed"


def test_lora_and_added_token_rows_load_together_without_peft_warnings(tmp_path):
    """Both adapters are there on purpose; peft's 'multiple adapters' warning filled the training logs."""
    import warnings

    model, processor = build_tiny(seed=0)
    model.add_llm_lora(LORA)
    model.llm.add_special_tokens(["[TOOL]"], processor.tokenizer, model.config)
    model.save_pretrained(tmp_path / "m")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = MMBridgeModel.from_pretrained(tmp_path / "m")
    assert not [w for w in caught if "peft_config" in str(w.message)]
    assert set(loaded.llm.model.peft_config) == {"lora", "added_tokens"}
