"""The output-head core, end to end, with a toy head — the template the draw and act heads copy.

The toy head counts the shapes in the image: the LLM writes `[CNT]`, the slot `[CNT_0]` is forced after
it, and a linear layer reads the two hidden states into a count. It is trained through the `Trainer`
(its loss named `count` next to `lm`), decoded by the pipeline (batched, streamed, in a chat session)
and returned by the API as a typed part.
"""

import json
import os
from dataclasses import dataclass
from typing import ClassVar, Literal

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmbridge.config import MMBridgeConfig
from mmbridge.generation import MMBridgePipeline, part_to_dict, register_part
from mmbridge.heads_config import HeadConfig, register_head_config
from mmbridge.modeling import MMBridgeModel
from mmbridge.modeling.heads import OutputHead, register_head
from mmbridge.processing import MMBridgeProcessor
from mmbridge.testing import build_tiny

MAX_COUNT = 4


# -- the toy head: config (plain data), module (tensors), part (what users see) ---------------------
@register_head_config
@dataclass
class CountConfig(HeadConfig):
    kind: ClassVar[str] = "count"
    loss_names: ClassVar[tuple[str, ...]] = ("count",)
    name: str = "count"
    trigger: str = "[CNT]"
    num_slots: int = 1


@register_head
class CountHead(OutputHead):
    kind = "count"

    def __init__(self, config, model_config):
        super().__init__(config, model_config)
        self.classifier = nn.Linear(self.llm_hidden_size * (1 + config.num_slots), MAX_COUNT + 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(hidden.flatten(1).to(self.classifier.weight.dtype))

    def loss(self, hidden, targets, route, context):
        target = torch.tensor(targets, device=hidden.device)
        return {"count": F.cross_entropy(self(hidden), target)}

    def decode(self, hidden, route, context):
        return {"count": self(hidden).argmax(-1)}


@dataclass
class CountPart:
    count: int
    type: Literal["count"] = "count"


register_part("count", lambda head, route, tensors: CountPart(int(tensors["count"])))


# -- helpers -----------------------------------------------------------------------------------------
def conversation(n: int | None = None, question: str = "How many shapes?"):
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    if n is None:
        return [user]
    answer = [{"type": "text", "text": "There are "}, {"type": "head", "head": "count", "target": n},
              {"type": "text", "text": " shapes."}]
    return [user, {"role": "assistant", "content": answer}]


def with_count_head(seed: int = 0):
    model, processor = build_tiny(seed=seed, init_std=0.5)
    torch.manual_seed(seed)  # the head's weights, whatever ran before
    model.add_head(CountConfig(), processor.tokenizer)
    processor.register_head(CountConfig())
    return model, processor


# -- config, components, tokens ---------------------------------------------------------------------
def test_a_head_adds_its_component_tokens_and_loss_names(tmp_path):
    model, processor = with_count_head()
    config = model.config
    assert config.components == ("vision", "qformer", "projection", "llm", "count")
    assert config.trainable["count"] is True and "count" in config.loss_names
    assert set(config.added_tokens) == {"[CNT]", "[CNT_0]"}
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"qformer", "projection", "count", "llm"}  # llm: only the added rows
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["heads"] == {"count": {"kind": "count", "name": "count", "trigger": "[CNT]", "num_slots": 1,
                                      "trainable": True}}
    loaded = MMBridgeModel.from_pretrained(tmp_path)
    assert loaded.head_names == ["count"]
    assert MMBridgePipeline(loaded, MMBridgeProcessor.from_pretrained(tmp_path)).trigger_ids


def test_head_configs_are_validated():
    with pytest.raises(ValueError, match="unknown kind 'counter'"):
        MMBridgeConfig(heads={"x": {"kind": "counter"}})
    with pytest.raises(ValueError, match="unknown setting"):
        MMBridgeConfig(heads={"count": {"kind": "count", "slots": 2}})
    with pytest.raises(ValueError, match="unknown task"):
        MMBridgeConfig(act_config={"tasks": ["det", "dance"]})
    with pytest.raises(ValueError, match="condition_dropout"):
        MMBridgeConfig(draw_config={"condition_dropout": 1.5})
    act = MMBridgeConfig(act_config={"tasks": ["det", "gen"]}).head_configs["act"]
    assert act.routes == {"[DET]": [f"[DET_Q{i}]" for i in range(4)], "[GEN]": [f"[GEN_Q{i}]" for i in range(64)]}
    shared = MMBridgeConfig(act_config={"tasks": ["det", "seg"], "shared_queries": True}).head_configs["act"]
    assert shared.routes["[DET]"] == shared.routes["[SEG]"] == [f"[ACT_Q{i}]" for i in range(4)]
    assert shared.tokens == ["[DET]", *shared.routes["[DET]"], "[SEG]", "<region>"]  # each token once
    config = MMBridgeConfig(draw_config={}, act_config={})
    assert "draw.mapper" in config.components and config.trainable["draw.generator"] is False
    assert {"draw_ldm", "act_giou"} <= set(config.loss_names)


def test_tokens_added_in_a_later_stage_extend_the_earlier_ones(tmp_path):
    """Vokens in one stage, routing tokens in the next: earlier rows keep their trained values and
    both sets train, save and load."""
    model, processor = build_tiny(seed=0)
    first = model.llm.add_special_tokens(["[IMG0]", "[IMG1]"], processor.tokenizer, model.config)
    embed = model.llm.model.get_input_embeddings()
    with torch.no_grad():
        embed.trainable_tokens_delta["added_tokens"].add_(1.0)  # "trained" in stage A
    trained_rows = embed(torch.tensor(list(first.values()))).detach().clone()
    frozen_before = embed.get_base_layer().weight[:min(first.values())].clone()

    ids = model.llm.add_special_tokens(["[DET]", "[IMG0]"], processor.tokenizer, model.config)
    assert list(ids) == ["[IMG0]", "[IMG1]", "[DET]"] and ids["[IMG0]"] == first["[IMG0]"]
    embed = model.llm.model.get_input_embeddings()
    assert torch.equal(embed(torch.tensor(list(first.values()))), trained_rows)
    assert torch.equal(embed.get_base_layer().weight[:min(first.values())], frozen_before)
    model.apply_trainable_policy()
    delta = embed.trainable_tokens_delta["added_tokens"]
    assert delta.requires_grad and delta.shape[0] == 3

    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = MMBridgeModel.from_pretrained(tmp_path)
    all_ids = torch.tensor(list(ids.values()))
    assert torch.equal(loaded.llm.model.get_input_embeddings()(all_ids), embed(all_ids))
    assert loaded.config.added_tokens == ids


# -- processor ---------------------------------------------------------------------------------------
def test_processor_writes_head_tokens_masks_slots_and_returns_targets(images):
    model, processor = with_count_head()
    batch = processor([conversation(3), conversation(1)], images=images[:2], return_labels=True)
    assert batch["head_targets"] == {"[CNT]": [3, 1]}
    trigger, slot = (model.config.added_tokens[t] for t in ("[CNT]", "[CNT_0]"))
    rows, cols = (batch["input_ids"] == trigger).nonzero(as_tuple=True)
    assert rows.tolist() == [0, 1]
    assert (batch["input_ids"][rows, cols + 1] == slot).all()
    assert (batch["labels"][rows, cols] == trigger).all()  # the LLM learns to call the head
    assert (batch["labels"][rows, cols + 1] == -100).all()  # slots are forced, never a target
    out = model(**batch)
    assert set(out.losses) == {"lm", "count"} and torch.isfinite(out.loss)
    found = out.head_outputs["[CNT]"]
    assert found["hidden_states"].shape == (2, 2, model.config.text_config.hidden_size)
    assert found["rows"].tolist() == [0, 1] and torch.equal(found["positions"], cols)


# -- trainer -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model with the count head, trained through the Trainer on LLaVA JSON whose answers
    write `[CNT]` and whose records carry the counts (`"targets": {"[CNT]": [n]}`)."""
    from accelerate.state import AcceleratorState, PartialState
    from PIL import Image

    from mmbridge.train.config import stage_config_from_dict
    from mmbridge.train.trainer import Trainer

    root = tmp_path_factory.mktemp("heads")
    model, processor = with_count_head(seed=1)
    model.save_pretrained(root / "base")
    processor.save_pretrained(root / "base")
    records, colors = [], [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (200, 30, 200)]
    (root / "img").mkdir()
    for i in range(20):
        n = i % (MAX_COUNT + 1)
        Image.new("RGB", (32, 32), colors[n]).save(root / "img" / f"{i}.png")
        records.append({"id": str(i), "image": f"img/{i}.png", "targets": {"[CNT]": [n]}, "conversations": [
            {"from": "human", "value": "<image>\nHow many shapes?"}, {"from": "gpt", "value": "[CNT]"}]})
    (root / "data.json").write_text(json.dumps(records))
    stage = stage_config_from_dict({
        "stage": "count-head", "model": str(root / "base"), "train": ["qformer", "projection", "count"],
        "losses": {"lm": 1.0, "count": 1.0},
        "data": {"batch_size": 5, "datasets": [{"name": "counts", "type": "llava_json",
                                               "path": str(root / "data.json")}]},
        "schedule": {"total_steps": 150, "warmup_steps": 5, "init_lr": 1e-2, "min_lr": 1e-3},
        "run": {"save_every": 75, "progress_bar": False}})
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    result = Trainer(stage, root / "run").fit()
    return root, result


def test_trainer_trains_the_head_with_named_losses(trained):
    root, result = trained
    assert set(result["losses"]) == {"lm", "count"}
    rows = (root / "run" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    first, last = (dict(zip(header, r.split(","))) for r in (rows[1], rows[-1]))
    assert float(last["loss_count"]) < float(first["loss_count"]) / 2
    assert float(last["loss_lm"]) < float(first["loss_lm"])


# -- generation: the head hook in every decoding path ------------------------------------------------
def _colored(n):
    from PIL import Image

    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (200, 30, 200)]
    return Image.new("RGB", (32, 32), colors[n])


def test_pipeline_decodes_the_head_into_a_typed_part_batched_streamed_and_in_chat(trained):
    root, _ = trained
    pipe = MMBridgePipeline.from_pretrained(root / "run" / "model")
    images = [_colored(n) for n in range(MAX_COUNT + 1)]
    batched = pipe.generate([conversation() for _ in images], images=images, max_new_tokens=4)
    counts = [[p.count for p in r.parts if p.type == "count"] for r in batched]
    assert all(c for c in counts), f"the trained model should call its head: {[r.raw_text for r in batched]}"
    assert sum(c[0] == n for c, n in zip(counts, range(MAX_COUNT + 1))) >= 4  # learned from the image
    # the slot was forced right after the trigger, and only there
    trigger, slot = (pipe.model.config.added_tokens[t] for t in ("[CNT]", "[CNT_0]"))
    for r in batched:
        ids = r.token_ids
        assert all(ids[i + 1] == slot for i, t in enumerate(ids[:-1]) if t == trigger)
        assert all(ids[i - 1] == trigger for i, t in enumerate(ids) if t == slot)
    # batched rows == one by one == streamed == chat session (KV reuse)
    for n, image in enumerate(images):
        single = pipe.generate(conversation(), images=[image], max_new_tokens=4)[0]
        assert single.parts == batched[n].parts
        stream = pipe.stream(conversation(), images=[image], max_new_tokens=4)
        pieces = []
        while True:
            try:
                pieces.append(next(stream))
            except StopIteration as done:
                streamed = done.value
                break
        assert "".join(pieces) == single.text and streamed.parts == single.parts
        session = pipe.chat()
        assert session.ask("How many shapes?", images=[image], max_new_tokens=4).parts == single.parts


def test_api_returns_the_head_output_as_a_typed_part(trained):
    from openai import OpenAI

    from mmbridge.serve.app import ServeSettings, create_app
    from mmbridge.serve.testing import png_data_url, running_server

    root, _ = trained
    pipe = MMBridgePipeline.from_pretrained(root / "run" / "model")
    expected = pipe.generate(conversation(), images=[_colored(2)], max_new_tokens=4)[0]
    with running_server(create_app(pipe, ServeSettings(model_name="toy"))) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="none")
        reply = client.chat.completions.create(
            model="toy", max_tokens=4, extra_body={"output_parts": True},
            messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": png_data_url((30, 30, 200), size=(32, 32))}},
                {"type": "text", "text": "How many shapes?"}]}])
    parts = reply.choices[0].message.model_extra["parts"]
    assert parts == [part_to_dict(p) for p in expected.parts]
    assert any(p["type"] == "count" and p["count"] == 2 for p in parts)


def test_heads_read_the_image_their_request_is_about(images):
    """`context["vision_features"]` of an occurrence is the frozen encoder's output for the last image
    before its trigger in that row (zeros, `has_image` False, for a row without one)."""
    model, processor = with_count_head()
    seen = {}

    def spy(hidden, targets, route, context):
        seen.update(context)
        return {"count": hidden.sum() * 0}

    model.count.loss = spy
    text_only = [{"role": "user", "content": "How many?"}, conversation(2)[1]]
    two_images = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "?"}]},
                  conversation(1)[1]]
    batch = processor([conversation(3), text_only, two_images], images=images[:3], return_labels=True)
    model(**batch)
    with torch.no_grad():
        expected = model.vision(batch["pixel_values"])
    assert seen["has_image"].tolist() == [True, False, True]
    assert torch.equal(seen["vision_features"][0], expected[0])
    assert not seen["vision_features"][1].any()
    assert torch.equal(seen["vision_features"][2], expected[2])  # the row's last image
