"""What the act head found, drawn on the image (`generation.overlay`), saved by `mmbridge chat` and scored by
`mmbridge demo` against the bundled samples' true boxes."""

import json
import types

import numpy as np
import pytest
from PIL import Image

from mmbridge.cli import main
from mmbridge.commands import demo
from mmbridge.generation import DetectionsPart, GenerationResult, KeypointsPart, TextPart
from mmbridge.generation.overlay import COLORS, draw_overlay
from mmbridge.heads_config import ActConfig
from mmbridge.testing import build_tiny


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {**rle, "counts": rle["counts"].decode()}


def test_overlay_outlines_boxes_and_tints_masks():
    image = Image.new("RGB", (64, 64), (0, 0, 0))
    mask = np.zeros((32, 32), np.uint8)
    mask[8:16, 8:16] = 1  # image pixels 16..31
    part = DetectionsPart("[SEG]", [[0.25, 0.25, 0.5, 0.5], [0.75, 0.0, 1.0, 0.25]], [0.9, 0.6],
                          masks=[_rle(mask), _rle(np.zeros((32, 32), np.uint8))], mask_size=32)
    overlay = np.asarray(draw_overlay(image, part, scale=4))
    assert overlay.shape == (256, 256, 3)
    assert tuple(overlay[100, 100]) == tuple(round(c / 2) for c in COLORS[0])  # inside the mask: tinted half-way
    assert tuple(overlay[200, 200]) == (0, 0, 0)  # outside everything: the image
    assert tuple(overlay[64 + 20, 63]) == COLORS[0]  # the first box's left edge (x0 = 64, one pixel out)
    assert tuple(overlay[30, 192]) == COLORS[1]  # the second box's left edge


def test_overlay_draws_visible_keypoints_and_the_skeleton():
    image = Image.new("RGB", (64, 64), (0, 0, 0))
    part = KeypointsPart("[POSE]", [[[0.25, 0.25, 0.9], [0.75, 0.25, 0.9], [0.5, 0.9, 0.1]]], [0.8],
                         [[0.2, 0.2, 0.8, 0.8]], skeleton=[[0, 1], [1, 2]])
    overlay = np.asarray(draw_overlay(image, part, scale=4))
    assert tuple(overlay[64, 64]) == COLORS[0] and tuple(overlay[64, 192]) == COLORS[0]  # the two visible points
    assert tuple(overlay[64, 128]) == COLORS[0]  # the bone between them
    assert tuple(overlay[230, 128]) == (0, 0, 0)  # the invisible point, and no bone to it


class TruthPipeline:
    """Answers the demo's act requests from the bundled samples' truth (`drop`: the [DET] answer misses its
    last object), through the parts a model returns."""

    def __init__(self, model, drop: bool = False):
        self.model, self.drop = model, drop
        self.truth = {}
        for path, scene in demo._samples():
            self.truth[np.asarray(Image.open(path).convert("RGB")).tobytes()] = scene

    def generate(self, conversations, images, **kwargs):
        results = []
        for conversation, image in zip(conversations, images):
            scene = self.truth[np.asarray(image).tobytes()]
            text = conversation[0]["content"][1]["text"]
            boxes = [[v / 64 for v in o["box"]] for o in scene["objects"]]
            if text.startswith("Find the"):
                part = DetectionsPart("[GRD]", [boxes[scene["grounding"]["object"]]], [1.0])
            else:
                route = "[SEG]" if text.startswith("Segment") else "[DET]"
                kept = boxes[:-1] if self.drop and route == "[DET]" else boxes
                part = DetectionsPart(route, kept, [1.0] * len(kept))
            results.append(GenerationResult([TextPart(""), part], "stop", 1, 1))
        return results


@pytest.fixture(scope="module")
def act_model():
    model, processor = build_tiny(seed=0)
    config = ActConfig(decoder_hidden_size=16, decoder_layers=1, decoder_heads=2, num_object_queries=4, mask_size=8)
    model.add_head(config, processor.tokenizer)
    processor.register_head(config)
    return model, processor


def test_demo_scores_act_answers_against_the_samples_truth(act_model, tmp_path, capsys):
    args = types.SimpleNamespace(out=str(tmp_path / "demo"), max_new_tokens=8)
    demo._act(TruthPipeline(act_model[0]), args, demo._samples())
    printed = capsys.readouterr().out
    samples = [s for _, s in demo._samples() if s and s.get("objects")]
    assert len(samples) == 4
    assert f"{3 * len(samples)} of {3 * len(samples)} act answers right" in printed
    overlays = [line.rsplit(" ", 1)[1] for line in printed.splitlines() if line.startswith("  model:")]
    assert len(overlays) == 3 * len(samples) and all(p.endswith("-overlay.png") for p in overlays)
    assert all(Image.open(p).size == (256, 256) for p in overlays)
    page = (tmp_path / "demo" / "act" / "chat.md").read_text()
    assert "Find every shape." in page and "-overlay.png" in page
    # a missed object is marked wrong, with what was missed
    demo._act(TruthPipeline(act_model[0], drop=True), args, demo._samples())
    printed = capsys.readouterr().out
    assert f"{2 * len(samples)} of {3 * len(samples)} act answers right" in printed
    assert "[wrong: 3 of 4 objects found, 0 extra]" in printed


def test_demo_runs_the_act_requests_on_a_model_with_an_act_head(act_model, tmp_path, capsys):
    model, processor = act_model
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    assert main(["demo", "--model", str(tmp_path / "m"), "--max-new-tokens", "6", "--out", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    assert f"== finding (overlays and chat.md under {tmp_path / 'o' / 'act'})" in printed
    assert printed.count("  you:   Find every shape.") == 4 and "act answers right (boxes at IoU >= 0.5)" in printed


def test_chat_saves_an_overlay_of_what_was_found(tmp_path):
    from mmbridge.commands.outputs import OutputWriter

    image = Image.new("RGB", (64, 64), (0, 0, 0))
    result = GenerationResult([TextPart(""), DetectionsPart("[DET]", [[0.1, 0.1, 0.4, 0.4]], [0.8])], "stop", 1, 1)
    saved = OutputWriter(tmp_path).write("Find every shape.", result, image)
    assert [p.name for p in saved] == ["turn001-1.json", "turn001-1-overlay.png"]
    assert json.loads(saved[0].read_text())["route"] == "[DET]"
    assert "![turn001-1-overlay.png](turn001-1-overlay.png)" in (tmp_path / "chat.md").read_text()
    assert OutputWriter(tmp_path / "no-image").write("Find every shape.", result)[0].suffix == ".json"


class PosePipeline:
    """Answers the demo's pose request with each bundled figure's true keypoints, moved by `shift` pixels."""

    def __init__(self, model, shift: float = 0.0):
        from mmbridge.models import sample_images_dir

        self.model, self.shift, self.truth = model, shift, {}
        for figure in json.loads((sample_images_dir() / "poses.json").read_text()):
            image = Image.open(sample_images_dir() / figure["image"]).convert("RGB")
            self.truth[np.asarray(image).tobytes()] = figure

    def generate(self, conversations, images, **kwargs):
        results = []
        for image in images:
            figure = self.truth[np.asarray(image).tobytes()]
            flat = figure["keypoints"]
            person = [[(flat[i] + self.shift) / 64, (flat[i + 1] + self.shift) / 64, 1.0]
                      for i in range(0, len(flat), 3)]
            part = KeypointsPart("[POSE]", [person], [0.9], [[v / 64 for v in figure["box"]]],
                                 skeleton=[[0, 1]])
            results.append(GenerationResult([TextPart(""), part], "stop", 1, 1))
        return results


def test_demo_scores_poses_against_the_bundled_figures_by_oks(tmp_path, capsys):
    model, processor = build_tiny(seed=0)
    config = ActConfig(tasks=["pose"], decoder_hidden_size=16, decoder_layers=1, decoder_heads=2,
                       num_object_queries=4, visual_prompts=False)
    model.add_head(config, processor.tokenizer)
    args = types.SimpleNamespace(out=str(tmp_path / "demo"), max_new_tokens=8)
    demo._pose(PosePipeline(model), args)
    printed = capsys.readouterr().out
    assert "2 of 2 poses right (OKS >= 0.5)." in printed and printed.count("[right: OKS 1.00]") == 2
    assert len(list((tmp_path / "demo" / "pose").glob("*-overlay.png"))) == 2
    demo._pose(PosePipeline(model, shift=6.0), args)  # every joint 8.5 px off: far for COCO's sigmas
    assert "0 of 2 poses right" in capsys.readouterr().out
    # a model without the route: no pose section
    demo._pose(PosePipeline(build_tiny(seed=0)[0]), args)
    assert capsys.readouterr().out == ""


def test_demo_asks_for_a_class_the_world_lacks(act_model, capsys):
    # a routed answer with boxes is wrong (the scene has no hexagons); words or nothing found are right
    args = types.SimpleNamespace(out="unused", max_new_tokens=8)
    demo._missing_class(TruthPipeline(act_model[0]), args, demo._samples())
    printed = capsys.readouterr().out
    assert "  you:   Find the hexagons." in printed and "[wrong: " in printed
    assert f"0 of {len(demo.MISSING_CLASS_REQUESTS)} requests for a missing class answered without boxes." in printed

    class Refuses(TruthPipeline):
        def generate(self, conversations, images, **kwargs):
            return [GenerationResult([TextPart("There is no shape.")], "stop", 1, 1) for _ in conversations]

    demo._missing_class(Refuses(act_model[0]), args, demo._samples())
    printed = capsys.readouterr().out
    assert "  model: There is no shape.   [right: no boxes]" in printed
    assert "2 of 2 requests for a missing class answered without boxes." in printed
