"""The act head's `[POSE]` route on ShapesWorld's stick figures: OKS matching (with COCO's sigmas), keypoint
/ OKS / visibility / box losses, the pipeline's `KeypointsPart`, and `mmbridge eval pose` (COCOeval
keypoints AP) whose conversion path scores the ground truth at AP 1.0."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import math

import pytest
import torch

from mmbridge.data.shapes.pose import KEYPOINTS, SKELETON, sample_pose
from mmbridge.data.shapes.world import IMAGE_SIZE
from mmbridge.generation import MMBridgePipeline, part_to_dict, part_to_text
from mmbridge.generation.parts import KeypointsPart
from mmbridge.heads_config import ActConfig
from mmbridge.modeling.act.keypoints import COCO_KEYPOINT_SIGMAS, keypoint_sigmas, match_people, oks
from mmbridge.testing import build_tiny, overfit

PROMPT = "Find the pose of the figure."
K = len(KEYPOINTS)


def pose_config(**kw):
    return ActConfig(tasks=["det", "pose"], decoder_hidden_size=32, decoder_layers=2, decoder_heads=4,
                     num_object_queries=4, **kw)


def with_pose_head(seed=0, **kw):
    model, processor = build_tiny(seed=seed)
    config = pose_config(**kw)
    model.add_head(config, processor.tokenizer)
    processor.register_head(config)
    return model, processor


def pose_target(figure):
    keypoints = [[x / IMAGE_SIZE, y / IMAGE_SIZE, 2] for x, y in (figure.keypoints[n] for n in KEYPOINTS)]
    return {"keypoints": [keypoints], "boxes": [[v / IMAGE_SIZE for v in figure.box]]}


def pose_chat(figure, answer=True):
    user = {"role": "user", "content": [{"type": "image", "image": figure.render()}, {"type": "text", "text": PROMPT}]}
    if not answer:
        return [user]
    return [user, {"role": "assistant", "content": [{"type": "head", "head": "[POSE]", "target": pose_target(figure)}]}]


def test_oks_and_matching_on_a_hand_made_case():
    sigmas = keypoint_sigmas(K)
    assert sigmas.tolist() == pytest.approx(COCO_KEYPOINT_SIGMAS)
    torch.manual_seed(0)
    people = torch.rand(2, K, 2) * 0.5 + torch.tensor([[[0.0, 0.0]], [[0.5, 0.5]]])  # two people, apart
    visible = torch.ones(2, K)
    area = torch.tensor([0.1, 0.1])
    assert torch.allclose(torch.diagonal(oks(people, people, visible, area, sigmas)), torch.ones(2))
    # pycocotools' formula: one keypoint off by d, the rest exact
    moved = people[:1].clone()
    moved[0, 0, 0] += 0.01
    expected = (K - 1 + math.exp(-0.01 ** 2 / (2 * COCO_KEYPOINT_SIGMAS[0]) ** 2 / 0.1 / 2)) / K
    assert oks(moved, people[:1], visible[:1], area[:1], sigmas)[0, 0] == pytest.approx(expected, rel=1e-5)
    # invisible keypoints do not count
    half = visible[:1].clone()
    half[0, 0] = 0
    assert oks(moved, people[:1], half, area[:1], sigmas)[0, 0] == pytest.approx(1.0)

    # four queries: q2 is person 1 exactly, q0 is person 0 slightly off, q1 / q3 are elsewhere (but score higher)
    queries = torch.stack([people[0] + 0.003, torch.full((K, 2), 0.9), people[1], torch.full((K, 2), 0.1)])
    logits = torch.tensor([0.0, 3.0, 0.0, 3.0])
    rows, cols = match_people(queries, logits, people, visible, area, sigmas)
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 0, 2: 1}
    rows, cols = match_people(queries, logits, people[:0], visible[:0], area[:0], sigmas)
    assert len(rows) == len(cols) == 0


def test_oks_nms_drops_a_second_copy_of_a_person_only():
    """`pose_duplicates` (decoding `[POSE]` with `duplicate_oks`): of two queries on one figure the lower-scored is
    dropped; a person elsewhere, whatever its score, and a lone query are kept."""
    from mmbridge.modeling.act.head import pose_duplicates

    torch.manual_seed(0)
    person = torch.rand(K, 2) * 0.3 + 0.1
    keypoints = torch.stack([person + 0.002, torch.rand(K, 2) * 0.3 + 0.6, person])[None]  # q0 ~ q2; q1 elsewhere
    boxes = torch.tensor([[[0.1, 0.1, 0.4, 0.4], [0.6, 0.6, 0.9, 0.9], [0.1, 0.1, 0.4, 0.4]]])
    scores = torch.tensor([[0.3, 0.2, 0.8]])
    assert pose_duplicates(keypoints, boxes, scores, 0.9, keypoint_sigmas(K)).tolist() == [[True, False, False]]
    assert pose_duplicates(keypoints[:, :1], boxes[:, :1], scores[:, :1], 0.9, keypoint_sigmas(K)).tolist() == [[False]]
    assert pose_duplicates(keypoints[:0], boxes[:0], scores[:0], 0.9, keypoint_sigmas(K)).shape == (0, 3)


def test_pose_route_components_and_losses():
    model, processor = with_pose_head()
    config = model.config.head_configs["act"]
    assert list(config.routes) == ["[DET]", "[POSE]"] and "[POSE_Q3]" in model.config.added_tokens
    assert {"act.decoders", "act.pose_decoder"} <= set(model.config.components)
    assert "act.pose_decoder" not in ActConfig(tasks=["det"]).components
    assert "act.decoders" not in ActConfig(tasks=["pose"]).components
    figures = [sample_pose(i) for i in range(2)]
    batch = processor([pose_chat(f) for f in figures], return_labels=True)
    assert set(batch["head_targets"]) == {"[POSE]"}
    out = model(**batch)
    assert {"lm", "act_cls", "act_keypoints", "act_oks", "act_visibility", "act_l1", "act_giou"} <= set(out.losses)
    assert all(torch.isfinite(v) for v in out.losses.values())
    out.loss.backward()
    assert model.act.pose_decoder.keypoint_head[0].weight.grad is not None

    head = model.act
    hidden = torch.zeros(1, 5, 32)
    nested = {"keypoints": [[[0.5, 0.5, 2]] * K]}  # nested triples, no boxes: the keypoints' extent
    assert torch.isfinite(head.loss(hidden, [nested], "[POSE]", {})["act_oks"])
    with pytest.raises(ValueError, match="fractions"):
        head.loss(hidden, [{"keypoints": [[30.0, 40.0, 2] * K]}], "[POSE]", {})
    with pytest.raises(ValueError, match="triples"):
        head.loss(hidden, [{"keypoints": [[0.5, 0.5, 2] * 3]}], "[POSE]", {})


def test_heatmap_keypoints_are_the_soft_argmax_of_the_pixel_features():
    """`pose_heatmaps`: a keypoint is the expected cell centre under softmax(keypoint embedding · pixel feature):
    a feature that only one cell has, asked for strongly, puts the keypoint at that cell's centre — finer than
    the patches, and by a differentiable path."""
    from mmbridge.modeling.act.keypoints import PoseDecoder

    decoder = PoseDecoder(24, 32, 16, 1, 2, 4, K, heatmaps=True, pixel_channels=8)
    pixels = torch.zeros(1, 16, 8, 8)
    pixels[0, 0, 3, 5] = 100.0  # one cell (row 3, column 5) has feature 0
    with torch.no_grad():
        decoder.keypoint_embed.weight.zero_()
        decoder.keypoint_embed.bias.zero_()
        decoder.keypoint_embed.bias[0::16] = 1.0  # every keypoint's embedding asks for feature 0
    keypoints = decoder._soft_argmax(torch.zeros(1, 4, 16), pixels)
    assert keypoints.shape == (1, 4, K, 2)
    assert torch.allclose(keypoints, torch.tensor([5.5 / 8, 3.5 / 8]).expand(1, 4, K, 2), atol=1e-4)

    out = decoder(torch.randn(2, 5, 24), torch.randn(2, 64, 32), images=torch.rand(2, 3, 64, 64))
    assert out["keypoints"].shape == (2, 4, K, 2) and 0 <= out["keypoints"].min() <= out["keypoints"].max() <= 1
    with pytest.raises(ValueError, match="pass `images`"):
        decoder(torch.randn(2, 5, 24), torch.randn(2, 64, 32))


@pytest.fixture(scope="module", params=[False, True], ids=["regressed", "heatmaps"])
def trained(request):
    """A tiny pose model trained 150 steps on four stick figures (keypoints regressed, or heatmaps)."""
    heatmaps = {"pose_heatmaps": True, "mask_pixel_channels": 8} if request.param else {}
    model, processor = with_pose_head(seed=1, **heatmaps)
    figures = [sample_pose(i) for i in range(4)]
    batch = processor([pose_chat(f) for f in figures], return_labels=True)
    return model, processor, figures, overfit(model, batch, steps=150, lr=3e-3)


def test_training_lowers_the_losses_and_the_pipeline_returns_keypoints(trained):
    model, processor, figures, history = trained
    for name in ("act_keypoints", "act_oks", "act_l1"):
        assert history[-1][name] < history[0][name] / 2, (name, history[0][name], history[-1][name])

    pipe = MMBridgePipeline(model, processor)
    results = pipe.generate([pose_chat(f, answer=False) for f in figures], max_new_tokens=8)
    parts = [[p for p in r.parts if isinstance(p, KeypointsPart)] for r in results]
    assert all(parts), [r.raw_text for r in results]
    sigmas = keypoint_sigmas(K)
    for figure, found in zip(figures, parts):
        part = found[0]
        assert part.route == "[POSE]" and part.skeleton == [[a - 1, b - 1] for a, b in SKELETON]
        assert len(part.keypoints) >= 1 and all(len(person) == K for person in part.keypoints)
        target = pose_target(figure)
        truth = torch.tensor(target["keypoints"])[..., :2]
        box = target["boxes"][0]
        area = torch.tensor([(box[2] - box[0]) * (box[3] - box[1])])
        best = torch.tensor([[p[:2] for p in person] for person in part.keypoints])
        assert oks(best[:1], truth, torch.ones(1, K), area, sigmas).item() > 0.5
    data = part_to_dict(parts[0][0])
    assert data["type"] == "keypoints" and len(data["keypoints"][0][0]) == 3
    json.dumps(data)
    assert part_to_text(parts[0][0]).startswith("[[POSE] ")


def _pose_coco(figures, directory):
    from mmbridge.data.build import PERSON_CATEGORY
    from mmbridge.data.formats.coco import CocoBuilder

    coco = CocoBuilder(PERSON_CATEGORY)
    for k, figure in enumerate(figures):
        figure.render().save(directory / f"{k}.png")
        image_id = coco.add_image(f"{k}.png", IMAGE_SIZE, IMAGE_SIZE)
        coco.add_annotation(image_id, "person", figure.box, keypoints=figure.coco_keypoints())
    return coco.save(str(directory / "coco_pose.json"))


def test_eval_pose_conversion_scores_the_ground_truth_at_ap_1(tmp_path):
    from mmbridge.evaluate import pose_results, score_keypoints

    figures = [sample_pose(i) for i in range(5)]
    path = _pose_coco(figures, tmp_path)
    results = []
    for image_id, figure in enumerate(figures, start=1):
        target = pose_target(figure)
        part = KeypointsPart("[POSE]", [[[x, y, 1.0] for x, y, _ in target["keypoints"][0]]], [1.0],
                             target["boxes"], [])
        results += pose_results(part, image_id, IMAGE_SIZE, IMAGE_SIZE)
    assert len(results) == 5 and len(results[0]["keypoints"]) == 3 * K
    scores = score_keypoints(path, results)
    assert scores["keypoints_ap"] == pytest.approx(1.0), scores
    shifted = [{**r, "keypoints": [v + 3 if i % 3 < 2 else v for i, v in enumerate(r["keypoints"])]} for r in results]
    assert score_keypoints(path, shifted)["keypoints_ap"] < 0.5  # 3 px off everywhere is far on a 64 px figure


def test_eval_pose_runs_the_model(trained, tmp_path):
    """The eval's mechanics on the figures the tiny model was trained on (plumbing, not generalisation)."""
    from mmbridge.evaluate import evaluate_pose

    model, processor, figures, _ = trained
    path = _pose_coco(figures, tmp_path)
    summary, results = evaluate_pose(MMBridgePipeline(model, processor), path, PROMPT, batch_size=4, progress=False)
    assert summary["images"] == 4 and summary["requests_without_keypoints"] == 0
    assert 0 < summary["keypoints_ap50"] <= 1 and 0 <= summary["keypoints_ap"] <= summary["keypoints_ap50"]
    assert all(len(r["keypoints"]) == 3 * K for r in results)
    summary, _ = evaluate_pose(MMBridgePipeline(model, processor), path, PROMPT, limit=2, progress=False)
    assert summary["images"] == 2

    with pytest.raises(ValueError, match=r"no act head with a \[POSE\] route"):
        evaluate_pose(MMBridgePipeline(*build_tiny()), path, progress=False)


def test_cli_eval_pose_without_a_pose_route_is_a_one_line_error(tmp_path, capsys):
    from mmbridge.cli import main

    model, processor = build_tiny()
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    path = _pose_coco([sample_pose(0)], tmp_path)
    capsys.readouterr()
    code = main(["eval", "pose", "--model", str(tmp_path / "m"), "--coco", path, "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "[POSE]" in err and len(err.splitlines()) == 1, err


def test_a_loaded_model_has_the_coco_sigmas(tmp_path):
    """Bug: the sigmas were a non-persistent buffer, which `from_pretrained` (meta-device init, saved tensors
    restored) left as uninitialised memory — zeros at times, so OKS divided by zero and act stage 1 stopped on NaN
    gradients at step 1. Now they are computed, so a loaded model trains: finite gradients."""
    from mmbridge.modeling import MMBridgeModel
    from mmbridge.modeling.act.keypoints import COCO_KEYPOINT_SIGMAS

    model, processor = with_pose_head()
    model.save_pretrained(tmp_path / "m")
    for _ in range(3):  # uninitialised memory differs from load to load
        loaded = MMBridgeModel.from_pretrained(tmp_path / "m")
        assert torch.allclose(loaded.act.keypoint_sigmas, torch.tensor(COCO_KEYPOINT_SIGMAS))
    assert not any("sigma" in k for k in loaded.state_dict())
    loaded.train()
    loaded(**processor([pose_chat(sample_pose(0))], return_labels=True)).loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in loaded.act.pose_decoder.parameters() if p.grad is not None)
