"""One model that sees, draws and acts, in one chat: the user's words alone pick the capability, turn by turn.

A tiny model with the draw head (MiniGPT-5's vokens) and the act head (`[DET]`, `[SEG]`, `[GRD]`, `[POSE]`,
`[EDIT]`) is trained a few dozen steps on one scripted conversation, then a `ChatSession` — the KV cache kept
across turns, as `mmbridge chat` and the server use it — replays the user's side: each turn must answer with
the right kind of part (text, a drawing, boxes, one grounded box, keypoints, an edited image), from the image
of its own turn or, when the turn sends none, the last one sent."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from PIL import Image

from mmbridge.data.shapes.edits import edit_pair
from mmbridge.data.shapes.pose import KEYPOINTS, sample_pose
from mmbridge.data.shapes.world import IMAGE_SIZE, coverage_map, make_scene
from mmbridge.generation import MMBridgePipeline
from mmbridge.heads_config import ActConfig, DrawConfig
from mmbridge.testing import build_tiny, build_tiny_sd, overfit

QUERIES = 4  # super-link queries of [EDIT] (64 by default)


def fractions(box):
    return [v / IMAGE_SIZE for v in box]


def script():
    """(user text, image or None, assistant content) per turn: see, draw, detect, ground, pose, edit."""
    scene = make_scene("train", 3)
    figure = sample_pose(0)
    edit = edit_pair("train", 0)
    first = scene.objects[0]
    keypoints = [[x / IMAGE_SIZE, y / IMAGE_SIZE, 2] for x, y in (figure.keypoints[n] for n in KEYPOINTS)]
    return [
        ("What color is the first shape?", scene.render(), first.color),
        ("Draw a red square.", None, [{"type": "head", "head": "draw", "target": {
            "image": Image.new("RGB", (16, 16), (220, 40, 40)), "caption": "a red square"}}]),
        ("Find every shape.", None, [{"type": "head", "head": "[DET]", "target": {
            "boxes": [fractions(o.box) for o in scene.objects]}}]),
        (f"Find the {first.color} {first.shape}.", None, [{"type": "head", "head": "[GRD]", "target": {
            "boxes": [fractions(first.box)], "masks": [coverage_map(first) > 0.5]}}]),
        ("Find the pose of the figure.", figure.render(), [{"type": "head", "head": "[POSE]", "target": {
            "keypoints": [keypoints], "boxes": [fractions(figure.box)]}}]),
        (edit["instruction"], edit["before"].render(), [{"type": "head", "head": "[EDIT]", "target": {
            "image": edit["after"].render(), "source": edit["before"].render()}}]),
    ]


def conversation():
    messages = []
    for text, image, answer in script():
        content = [{"type": "text", "text": text}] if image is None else [{"type": "image", "image": image},
                                                                          {"type": "text", "text": text}]
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
    return messages


def trained_pipeline(tmp_path_factory):
    sd_dir = tmp_path_factory.mktemp("tiny-sd")
    build_tiny_sd(sd_dir)
    model, processor = build_tiny(seed=2, init_std=0.5)  # an LM whose LoRA can learn a word in a few steps
    torch.manual_seed(2)
    draw = DrawConfig(pipeline_path=str(sd_dir), mapper_hidden_size=32, mapper_layers=(1, 1), mapper_heads=2,
                      num_inference_steps=2)
    act = ActConfig(tasks=["det", "seg", "grd", "pose", "edit"], decoder_hidden_size=32, decoder_layers=1,
                    decoder_heads=2, num_object_queries=4, mask_size=8, visual_prompts=False,
                    queries_per_generation_task=QUERIES, edit_num_inference_steps=2, edit_condition_dropout=0.0)
    for config in (draw, act):
        model.add_head(config, processor.tokenizer)
        processor.register_head(config)
    model.add_llm_lora({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "down_proj"]})
    batch = processor([conversation()], return_labels=True)
    losses = overfit(model, batch, steps=60, lr=1e-2)
    assert losses[-1]["lm"] < 0.2 and losses[-1]["act_cls"] < 0.5 * losses[0]["act_cls"], (losses[0], losses[-1])
    path = tmp_path_factory.mktemp("one-model")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return MMBridgePipeline.from_pretrained(path)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return trained_pipeline(tmp_path_factory)


def test_one_chat_sees_draws_detects_grounds_finds_poses_and_edits(pipe):
    chat = pipe.chat()
    kinds = []
    for text, image, answer in script():
        result = chat.ask(text, images=None if image is None else [image], max_new_tokens=16)
        kinds.append([(type(p).__name__, getattr(p, "route", None)) for p in result.parts])
        if isinstance(answer, str):  # the see turn: the colour, read from the image
            assert result.text.strip() == answer, result.raw_text
    assert kinds == [
        [("TextPart", None)],
        [("ImagePart", None)],  # the draw head's vokens (route: act's [GEN] / [EDIT] only)
        [("DetectionsPart", "[DET]")],
        [("DetectionsPart", "[GRD]")],
        [("KeypointsPart", "[POSE]")],
        [("ImagePart", "[EDIT]")],
    ], kinds
    # the history holds what the model wrote, routes and slots included: the conversation re-encodes to the
    # one it was trained on (with the answers' plain text, the next turn would read "[DET]…" as nothing)
    trained = pipe.processor([conversation()])["input_ids"][0].tolist()
    assert pipe.processor.encode(chat.messages).input_ids == trained
