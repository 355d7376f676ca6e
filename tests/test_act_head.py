"""The act head's perception routes on ShapesWorld: routing tokens with per-task super-link queries, a
DETR decoder conditioned on them and on the frozen ViT, Hungarian matching with focal / L1 / GIoU /
dice losses; trained a few dozen steps on a fixed batch it finds the boxes, and the pipeline returns
them (and RLE masks for [SEG]) as typed parts."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json

import numpy as np
import pytest
import torch

from mmbridge.data.shapes.world import IMAGE_SIZE, coverage_map, make_scene, render
from mmbridge.generation import DetectionsPart, MMBridgePipeline, part_to_dict
from mmbridge.heads_config import ActConfig
from mmbridge.testing import build_tiny, overfit


def act_config(**kw):
    kw.setdefault("region_patch_features", True)  # every visual-prompt path, with the ViT's patches pooled
    kw.setdefault("mask_pixel_decoder", True)  # and every decoding path with the pixel decoder's masks
    kw.setdefault("box_refinement", True)  # and its features refining the boxes
    return ActConfig(tasks=["det", "seg", "grd"], decoder_hidden_size=32, decoder_layers=2, decoder_heads=4,
                     num_object_queries=6, mask_size=16, **kw)


def with_act_head(seed=0, **kw):
    model, processor = build_tiny(seed=seed)
    config = act_config(**kw)
    torch.manual_seed(seed)  # the head's weights, whatever ran before
    model.add_head(config, processor.tokenizer)
    processor.register_head(config)
    return model, processor


def request(scene, route, text):
    boxes = [[v / IMAGE_SIZE for v in o.box] for o in scene.objects]
    target = {"boxes": boxes, "masks": [coverage_map(o) > 0.5 for o in scene.objects]}
    if route == "[GRD]":
        target = {"boxes": boxes[:1], "masks": [coverage_map(scene.objects[0]) > 0.5]}
    return [{"role": "user", "content": [{"type": "image", "image": render(scene)}, {"type": "text", "text": text}]},
            {"role": "assistant", "content": [{"type": "head", "head": route, "target": target}]}]


def test_routes_tokens_and_components():
    model, processor = with_act_head()
    config = model.config.head_configs["act"]
    assert list(config.routes) == ["[DET]", "[SEG]", "[GRD]"]
    assert "act.decoders" in model.config.components and model.config.trainable["act.decoders"]
    assert {"[DET]", "[DET_Q3]", "[SEG_Q0]", "[GRD_Q2]"} <= set(model.config.added_tokens)
    with pytest.raises(ValueError, match="add the draw head first"):  # [GEN] draws with the draw head's generator
        build_tiny()[0].add_head(ActConfig(tasks=["gen"]), build_tiny()[1].tokenizer)


def test_losses_per_route_add_up_by_name():
    model, processor = with_act_head()
    scenes = [make_scene("train", i) for i in range(3)]
    batch = processor([request(scenes[0], "[DET]", "Find every shape."),
                       request(scenes[1], "[SEG]", "Segment every shape."),
                       request(scenes[2], "[GRD]", "Find the first one.")], return_labels=True)
    assert set(batch["head_targets"]) == {"[DET]", "[SEG]", "[GRD]"}
    out = model(**batch)
    assert {"lm", "act_cls", "act_l1", "act_giou", "act_mask", "act_dice"} <= set(out.losses)
    assert all(torch.isfinite(v) for v in out.losses.values())
    out.loss.backward()
    assert model.act.decoders.box_head[0].weight.grad is not None
    assert all(p.grad is None for p in model.vision.parameters())  # the ViT stays frozen


def test_attribute_selection_learns_from_the_scenes_objects(tmp_path):
    """With `selection_attributes`, the decoder also classifies each patch's object (the targets' `objects`: every
    object of the scene, from the act data) and the selection reads the request's token ids; the head records
    its vocabulary so that the saved model loads with the same rows."""
    import random

    from mmbridge.data.shapes.act import ATTRIBUTES, make_request
    from mmbridge.modeling import MMBridgeModel

    model, processor = with_act_head(selection_attributes={k: list(v) for k, v in ATTRIBUTES.items()})
    config = model.config.head_configs["act"]
    assert config.selection_vocab_size == model.act.decoders.attribute_selection.words.num_embeddings
    rng = random.Random(0)
    conversations = []
    for i, task in enumerate(("det", "seg", "grd")):
        scene = make_scene("train", i)
        made = make_request(scene, task, rng)
        assert made["target"]["objects"]["color"] == [o.color for o in scene.objects]
        conversations.append([{"role": "user", "content": [{"type": "image", "image": render(scene)},
                                                           {"type": "text", "text": made["request"]}]},
                              {"role": "assistant", "content": [{"type": "head", "head": made["route"],
                                                                 "target": made["target"]}]}])
    out = model(**processor(conversations, return_labels=True))
    assert out.losses["act_attributes"] > 0 and torch.isfinite(out.losses["act_attributes"])
    out.loss.backward()
    selection = model.act.decoders.attribute_selection
    assert selection.attributes.weight.grad.abs().sum() > 0 and selection.words.weight.grad.abs().sum() > 0
    model.save_pretrained(tmp_path)
    loaded = MMBridgeModel.from_pretrained(tmp_path)
    assert loaded.config.head_configs["act"].selection_attributes["size"] == ["small", "large"]
    torch.testing.assert_close(loaded.act.decoders.attribute_selection.words.weight, selection.words.weight)


@pytest.fixture(scope="module")
def trained():
    """A tiny act model trained 300 steps on four scenes, each asked both ways ([DET] and [SEG]): the route
    must follow the words, not the image (with one request per image it learnt image -> route, and whether
    "Segment every shape." on a [DET] image segmented depended on the thread count)."""
    model, processor = with_act_head(seed=1)
    unique = [make_scene("train", i) for i in range(4)]
    scenes = [s for s in unique for _ in range(2)]
    routes = ["[DET]", "[SEG]"] * 4
    conversations = [request(s, r, "Find every shape." if r == "[DET]" else "Segment every shape.")
                     for s, r in zip(scenes, routes)]
    batch = processor(conversations, return_labels=True)
    return model, processor, scenes, routes, conversations, overfit(model, batch, steps=300, lr=3e-3)


def test_a_few_dozen_steps_find_the_boxes_and_the_pipeline_returns_them(trained):
    model, processor, scenes, routes, conversations, history = trained
    assert history[-1]["act_giou"] < history[0]["act_giou"] / 2
    assert history[-1]["act_l1"] < history[0]["act_l1"] / 2

    pipe = MMBridgePipeline(model, processor)
    results = pipe.generate([c[:1] for c in conversations], max_new_tokens=8)
    found = [[p for p in r.parts if isinstance(p, DetectionsPart)] for r in results]
    assert all(found), [r.raw_text for r in results]
    from transformers.loss.loss_for_object_detection import box_iou

    hits = []
    for scene, route, parts in zip(scenes, routes, found):
        part = parts[0]
        assert part.route == route and (part.masks is None) == (route == "[DET]")
        truth = torch.tensor([[v / IMAGE_SIZE for v in o.box] for o in scene.objects])
        iou, _ = box_iou(torch.tensor(part.boxes).reshape(-1, 4), truth)
        hits += (iou.max(dim=0).values > 0.5).tolist() if len(part.boxes) else [False] * len(truth)
    assert sum(hits) / len(hits) >= 0.6, hits  # recall at IoU 0.5 on the training batch (measured 5/6 to 7/8)
    seg = found[3][0]
    assert seg.masks and seg.mask_size == 16
    from pycocotools import mask as mask_utils

    decoded = mask_utils.decode({**seg.masks[0], "counts": seg.masks[0]["counts"].encode()})
    assert decoded.shape == (16, 16) and decoded.dtype == np.uint8
    json.dumps(part_to_dict(seg))  # the API's serializer handles RLE masks


def test_masks_in_boxes_cut_the_spill_and_tighten_the_box(trained):
    """`masks_in_boxes`: a mask that spills onto the next object is cut to its box (plus the margin), and the
    box becomes the cut mask's tight box (pixel edges, as fractions); an empty mask keeps its box."""
    from mmbridge.modeling.act.head import crop_to_boxes, mask_boxes

    masks = torch.zeros(1, 2, 16, 16, dtype=torch.bool)
    masks[0, 0, 4:8, 2:6] = True  # the object: rows 4-7, columns 2-5
    masks[0, 0, 4:8, 9:14] = True  # its neighbour, 3 px to the right
    boxes = torch.tensor([[[2.5 / 16, 4 / 16, 6 / 16, 8.5 / 16], [0.1, 0.1, 0.3, 0.3]]])  # off by half a pixel
    cut, tight = crop_to_boxes(masks, boxes, margin=0.1)
    assert not cut[0, 0, :, 9:].any() and cut[0, 0].sum() == 16
    torch.testing.assert_close(tight[0, 0], torch.tensor([2 / 16, 4 / 16, 6 / 16, 8 / 16]))
    torch.testing.assert_close(tight[0, 1], boxes[0, 1])  # nothing to tighten to
    assert mask_boxes(masks)[1].tolist() == [[True, False]]

    model, processor, scenes, routes, conversations, _ = trained
    pipe = MMBridgePipeline(model, processor)
    model.act.config.masks_in_boxes = True
    try:
        [result] = pipe.generate([conversations[3][:1]], max_new_tokens=8)
    finally:
        model.act.config.masks_in_boxes = False
    [part] = [p for p in result.parts if isinstance(p, DetectionsPart)]
    assert part.route == "[SEG]" and part.boxes
    from pycocotools import mask as mask_utils

    for box, rle in zip(part.boxes, part.masks):
        mask = torch.from_numpy(mask_utils.decode({**rle, "counts": rle["counts"].encode()})).bool()
        if mask.any():
            torch.testing.assert_close(torch.tensor(box), mask_boxes(mask)[0], atol=1e-4, rtol=0)


def test_duplicates_drop_a_second_box_on_a_found_object_only():
    from mmbridge.modeling.act.head import duplicates

    boxes = torch.tensor([[[0.1, 0.1, 0.3, 0.3], [0.11, 0.1, 0.3, 0.31], [0.5, 0.5, 0.7, 0.7], [0.1, 0.1, 0.3, 0.3]]])
    scores = torch.tensor([[0.6, 0.9, 0.5, 0.2]])
    # the best box of the first object stays; its two lower-scored copies go; the other object stays
    assert duplicates(boxes, scores, iou=0.5).tolist() == [[True, False, False, True]]
    assert duplicates(boxes, scores, iou=0.999).tolist() == [[False, False, False, True]]  # only the exact copy


def test_eval_detect_scores_with_cocoeval(trained, tmp_path):
    """The eval's mechanics (requests, boxes and RLE masks back to pixels, COCOeval), on the scenes the
    tiny model was trained on — a check of the plumbing, not of generalisation."""
    from mmbridge.data.formats.coco import CocoBuilder
    from mmbridge.evaluate import evaluate_detection

    model, processor, scenes, *_ = trained
    scenes = scenes[::2]  # each scene once
    coco = CocoBuilder([{"id": i + 1, "name": n} for i, n in enumerate(["circle", "square", "triangle", "diamond",
                                                                          "cross"])])
    for k, scene in enumerate(scenes):
        render(scene).save(tmp_path / f"{k}.png")
        image_id = coco.add_image(f"{k}.png", IMAGE_SIZE, IMAGE_SIZE)
        for obj in scene.objects:
            coco.add_annotation(image_id, obj.shape, obj.box, mask=coverage_map(obj) > 0.5)
    coco.save(str(tmp_path / "coco.json"))
    pipe = MMBridgePipeline(model, processor)
    summary, detections = evaluate_detection(pipe, str(tmp_path / "coco.json"), "Segment every shape.",
                                             batch_size=4, progress=False)
    assert summary["class_agnostic"] and summary["images"] == 4 and summary["requests_without_detections"] == 0
    assert summary["bbox_ap50"] > 0.1 and 0 <= summary["segm_ap"] <= 1  # chance is ~0
    assert all(len(d["bbox"]) == 4 and "segmentation" in d for d in detections)

    # The conversion (fractions -> pixels, RLE at mask_size -> image size) is exact: answers made from
    # the ground truth score AP 1.0 through the same path.
    from pycocotools import mask as mask_utils

    from mmbridge.generation import DetectionsPart, GenerationResult

    class GroundTruthPipeline:
        def __init__(self):
            self.model, self.scenes = model, iter(scenes)

        def generate(self, conversations, images, **kwargs):
            out = []
            for _ in conversations:
                scene = next(self.scenes)
                masks = [np.asfortranarray((coverage_map(o) > 0.5).astype(np.uint8)) for o in scene.objects]
                rles = [{**r, "counts": r["counts"].decode()} for r in (mask_utils.encode(m) for m in masks)]
                part = DetectionsPart("[SEG]", [[v / IMAGE_SIZE for v in o.box] for o in scene.objects],
                                      [1.0] * len(scene.objects), rles, IMAGE_SIZE)
                out.append(GenerationResult([part], "stop", 1, 1))
            return out

    perfect, _ = evaluate_detection(GroundTruthPipeline(), str(tmp_path / "coco.json"), "Segment every shape.",
                                    batch_size=4, progress=False)
    assert perfect["bbox_ap"] == pytest.approx(1.0) and perfect["segm_ap"] == pytest.approx(1.0)

    see_only = MMBridgePipeline(*build_tiny())
    with pytest.raises(ValueError, match="no act head"):
        evaluate_detection(see_only, str(tmp_path / "coco.json"), progress=False)


def test_visual_prompts_fill_region_slots_in_every_path(images):
    """A box, a point, a scribble and a mask on an input image each become one `<region>` embedding from
    the act head's region encoder; training reaches the encoder; batched generation and a chat session
    read the same region identically."""
    from mmbridge.processing import region_mask

    model, processor = with_act_head()
    assert processor.region_token == "<region>" and "act.region_encoder" in model.config.components
    box = region_mask({"box": [0.25, 0.25, 0.75, 0.5]}, 32, 32)
    assert box.sum() == 16 * 8 and box[8:16, 8:24].all()
    assert region_mask({"point": [0.5, 0.5]}, 32, 32).sum() > 0
    assert region_mask({"scribble": [[0.1, 0.1], [0.9, 0.1]]}, 32, 32)[3, 5:27].all()

    def ask(region, answer=True):
        user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Find all like "},
                                            {"type": "region", **region}, {"type": "text", "text": "."}]}
        if not answer:
            return [user]
        target = {"boxes": [[0.1, 0.1, 0.3, 0.3]]}
        return [user, {"role": "assistant", "content": [{"type": "head", "head": "[DET]", "target": target}]}]

    regions = [{"box": [0.1, 0.1, 0.3, 0.3]}, {"point": [0.5, 0.5]}, {"scribble": [[0.1, 0.8], [0.6, 0.8]]},
               {"mask": np.eye(8, dtype=bool)}]
    batch = processor([ask(r) for r in regions], images=[*images[:3], images[0]], return_labels=True)
    assert batch["region_masks"].shape == (4, 32, 32) and batch["region_image_index"].tolist() == [0, 1, 2, 3]
    out = model(**batch)
    out.loss.backward()
    assert model.act.region_encoder.project.weight.grad is not None

    with pytest.raises(ValueError, match="exactly one of"):
        processor(ask({"box": [0.1, 0.1, 0.3, 0.3], "point": [0.5, 0.5]}), images=images[:1])
    with pytest.raises(ValueError, match="fractions"):
        processor(ask({"box": [0.1, 0.1, 3, 0.3]}), images=images[:1])
    with pytest.raises(ValueError, match="reads none"):
        build_tiny()[1](ask(regions[0], answer=False), images=images[:1])

    model.eval()
    pipe = MMBridgePipeline(model, processor)
    batched = pipe.generate([ask(r, answer=False) for r in regions[:2]], images=images[:2], max_new_tokens=6)
    single = pipe.generate(ask(regions[1], answer=False), images=images[1:2], max_new_tokens=6)[0]
    assert single.token_ids == batched[1].token_ids
    session = pipe.chat()
    content = [{"type": "image"}, {"type": "text", "text": "Find all like "}, {"type": "region", **regions[1]},
               {"type": "text", "text": "."}]
    assert session.ask(content, images=images[1:2], max_new_tokens=6).token_ids == single.token_ids


def test_decoder_queries_start_from_the_best_patch_proposals():
    """Two-stage queries: every patch proposes (score, box around the patch); the top-scoring proposals'
    boxes are the references the queries refine; a grid smaller than the query count uses every patch."""
    from mmbridge.modeling.act.decoder import LinkConditionedDecoder

    torch.manual_seed(0)
    decoder = LinkConditionedDecoder(8, 12, 16, 1, 2, num_queries=3, mask_size=8).eval()
    with torch.no_grad():
        decoder.box_head[2].weight.zero_()
        decoder.box_head[2].bias.zero_()  # no refinement: each query's box is its proposal's
        out = decoder(torch.randn(2, 5, 8), torch.randn(2, 1 + 16, 12))  # a CLS token and a 4 x 4 grid
    assert out["proposal_logits"].shape == (2, 16) and out["proposal_boxes"].shape == (2, 16, 4)
    top = out["proposal_logits"].topk(3, dim=1).indices
    assert torch.allclose(out["boxes"], out["proposal_boxes"].gather(1, top[..., None].expand(-1, -1, 4)), atol=1e-5)
    assert out["boxes"].shape == (2, 3, 4) and out["masks"].shape == (2, 3, 8, 8)
    small = LinkConditionedDecoder(8, 12, 16, 1, 2, num_queries=6, mask_size=None)(torch.randn(1, 5, 8),
                                                                                     torch.randn(1, 4, 12))
    assert small["boxes"].shape == (1, 4, 4) and small["masks"] is None  # 2 x 2 patches: 4 queries
    # the proposals' anchors sit on the patch centres: with a zero box MLP a proposal is its patch
    with torch.no_grad():
        for layer in (decoder.proposal_box[2],):
            layer.weight.zero_()
            layer.bias.zero_()
        boxes = decoder(torch.randn(1, 5, 8), torch.randn(1, 16, 12))["proposal_boxes"][0]
    assert torch.allclose(boxes[5], torch.tensor([0.375, 0.375, 0.5, 0.5]), atol=1e-4)  # row 1, col 1 of 4


def test_heads_read_the_request_words_before_the_trigger():
    """`head_context` hands the act decoder the LLM states of the tokens right before each trigger (no
    padding, no image queries), and the decoder's scores depend on them: the words say what to find."""
    from mmbridge.modeling.heads import REQUEST_WINDOW

    model, processor = with_act_head(seed=2)
    scenes = [make_scene("train", i) for i in range(2)]
    batch = processor([request(scenes[0], "[DET]", "Find every shape."),
                       request(scenes[1], "[DET]", "Find every large red triangle in this picture, please.")],
                      return_labels=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    (name, trigger, rows, positions), = [o for o in model.head_occurrences(ids) if o[1] == "[DET]"]
    hidden = torch.randn(*ids.shape, model.config.text_config.hidden_size)
    context = model.head_context(ids, rows, positions, None, hidden=hidden, attention_mask=mask)
    states, valid = context["request_states"], context["request_mask"]
    assert states.shape == (2, REQUEST_WINDOW, hidden.shape[-1]) and valid.shape == (2, REQUEST_WINDOW)
    for k in range(2):
        start = int(positions[k, 0]) - REQUEST_WINDOW
        window = torch.arange(start, start + REQUEST_WINDOW)
        inside = window >= 0
        assert torch.equal(states[k][inside], hidden[int(rows[k, 0]), window[inside]])
        row, at = int(rows[k, 0]), window.clamp(min=0)
        expected = inside & mask[row, at].bool() & (ids[row, at] != model.config.image_token_index)
        assert torch.equal(valid[k], expected)
    assert valid[1].sum() > valid[0].sum()  # the longer request fills more of the window
    # the decoder's scores follow the words
    decoder = model.act.decoders.eval()
    link, patches = torch.randn(1, 5, hidden.shape[-1]), torch.randn(1, 16, model.config.vision_config.hidden_size)
    words, image = torch.randn(1, REQUEST_WINDOW, hidden.shape[-1]), torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        a = decoder(link, patches, words, torch.ones(1, REQUEST_WINDOW, dtype=torch.bool),
                    images=image)["proposal_logits"]
        b = decoder(link, patches, -words, torch.ones(1, REQUEST_WINDOW, dtype=torch.bool),
                    images=image)["proposal_logits"]
        hidden_words = torch.zeros(1, REQUEST_WINDOW, dtype=torch.bool)
        c = decoder(link, patches, words, hidden_words, images=image)["logits"]
        d = decoder(link, patches, -words, hidden_words, images=image)["logits"]
    assert not torch.allclose(a, b)
    assert torch.allclose(c, d)  # masked-out words are not read


def tiny_text_tower(vocab_size: int, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64,
                                        bos_token_id=1, eos_token_id=2, pad_token_id=3)).eval()


def test_a_frozen_text_tower_reads_the_request_words_in_front_without_added_tokens():
    """`ActConfig.text_encoder`: the foundation's CLIP text tower reads the request's real words, moved to
    the front as it saw captions; tokens added later (routes, queries) and image / padding tokens are not
    given to it; it stays frozen and its weights travel with the model."""
    model, processor = build_tiny()
    tower = tiny_text_tower(len(processor.tokenizer))
    settings = {k: v for k, v in tower.config.to_dict().items() if k not in ("transformers_version", "architectures")}
    config = act_config(text_encoder=settings)
    model.add_head(config, processor.tokenizer)
    processor.register_head(config)
    model.act.text_encoder.load_state_dict(tower.state_dict())
    assert model.config.trainable["act.text_encoder"] is False
    assert not any(p.requires_grad for p in model.act.text_encoder.parameters())

    vocab = tower.config.vocab_size
    ids = torch.tensor([[5, 6, 3, 7, vocab + 1, 8], [9, 10, 11, 12, 13, 14]])
    mask = torch.tensor([[False, True, False, True, True, True], [True] * 6])
    states, keep = model.act._request_text({"request_ids": ids, "request_mask": mask})
    assert keep.tolist() == [[True, True, True, False, False, False], [True] * 6]
    expected = tower(input_ids=torch.tensor([[6, 7, 8]])).last_hidden_state  # the added token (vocab + 1) dropped
    assert torch.allclose(states[0, :3], expected[0], atol=1e-5)

    scenes = [make_scene("train", i) for i in range(2)]
    batch = processor([request(scenes[0], "[DET]", "Find every shape."),
                       request(scenes[1], "[SEG]", "Segment every shape.")], return_labels=True)
    out = model(**batch)
    assert "act_relevance" in out.losses and torch.isfinite(out.losses["act_relevance"])
    out.loss.backward()
    assert model.act.decoders.text_proj.weight.grad is not None
    assert all(p.grad is None for p in model.act.text_encoder.parameters())


def test_relevance_targets_are_the_patches_inside_the_asked_boxes():
    from mmbridge.modeling.act.head import _relevance_loss

    side = 4
    boxes = [torch.tensor([[0.0, 0.0, 0.5, 0.5]]), torch.zeros(0, 4)]  # the top-left quarter; nothing asked
    right = torch.full((2, side * side), -8.0)
    right[0].view(side, side)[:2, :2] = 8.0
    wrong = -right
    assert _relevance_loss(right, boxes) < 1e-3 < _relevance_loss(wrong, boxes)
    # a request naming nothing in the image: every patch is a negative
    assert _relevance_loss(torch.full((1, 16), -8.0), boxes[1:]) < 1e-3 < _relevance_loss(torch.zeros(1, 16), boxes[1:])


def test_the_region_encoder_pools_the_vit_patches_under_the_region_only():
    """With `region_patch_features` the `<region>` embedding also reads the frozen ViT's patch features at
    the region's points: patches under the region change it, patches elsewhere do not."""
    from mmbridge.modeling.act.region import RegionEncoder

    torch.manual_seed(0)
    encoder = RegionEncoder(8, num_points=4, channels=16, vision_hidden_size=12).eval()
    images, masks = torch.rand(1, 3, 32, 32), torch.zeros(1, 32, 32)
    masks[0, :16, :16] = 1  # the top-left quarter: patches 0, 1, 4, 5 of a 4 x 4 grid
    patches = torch.randn(1, 16, 12)
    with torch.no_grad():
        base = encoder(images, masks, patches)
        elsewhere, under = patches.clone(), patches.clone()
        elsewhere[0, [2, 3, 10, 15]] += torch.randn(4, 12)
        under[0, 5] += torch.randn(12)
        assert torch.allclose(encoder(images, masks, elsewhere), base, atol=1e-6)
        assert not torch.allclose(encoder(images, masks, under), base, atol=1e-3)
    with pytest.raises(ValueError, match="patch features"):
        encoder(images, masks)


def test_the_pixel_decoder_reads_normalised_and_plain_pixels_alike_and_masks_at_half_resolution():
    """`mask_pixel_decoder`: masks at half the image's resolution from a conv stem fused with the patches; the
    processor's normalised `pixel_values` (training) and [0, 1] images (decoding) give the same masks."""
    from mmbridge.modeling.act.decoder import LinkConditionedDecoder

    torch.manual_seed(0)
    decoder = LinkConditionedDecoder(8, 12, 16, 1, 2, num_queries=3, mask_size=16, pixel_decoder=True).eval()
    images = torch.rand(2, 3, 32, 32)
    mean, std = torch.tensor([0.48, 0.46, 0.41])[:, None, None], torch.tensor([0.27, 0.26, 0.28])[:, None, None]
    link, patches = torch.randn(2, 5, 8), torch.randn(2, 16, 12)
    with torch.no_grad():
        plain = decoder(link, patches, images=images)["masks"]
        normalised = decoder(link, patches, images=(images - mean) / std)["masks"]
        other = decoder(link, patches, images=images.flip(-1))["masks"]
    assert plain.shape == (2, 3, 16, 16)
    assert torch.allclose(plain, normalised, atol=1e-4)
    assert not torch.allclose(plain, other, atol=1e-3)  # the pixels shape the masks
    with pytest.raises(ValueError, match="pass `images`"):
        decoder(link, patches)


def test_full_resolution_masks_and_a_box_refinement_that_starts_as_the_plain_box():
    """`mask_pixel_stride=1`: the pixel decoder keeps the image's resolution (masks pixel for pixel);
    `box_refinement`: one more layer over those features moves each box, by nothing at first (the refined
    decoder starts where the plain one is), and the box losses train it."""
    from mmbridge.modeling.act.decoder import LinkConditionedDecoder

    settings = dict(num_queries=3, mask_size=32, pixel_decoder=True, pixel_stride=1)
    torch.manual_seed(0)
    plain = LinkConditionedDecoder(8, 12, 16, 1, 2, **settings).eval()
    refined = LinkConditionedDecoder(8, 12, 16, 1, 2, **settings, box_refinement=True).eval()
    missing, unexpected = refined.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("refine") for k in missing)
    images, link, patches = torch.rand(2, 3, 32, 32), torch.randn(2, 5, 8), torch.randn(2, 16, 12)
    assert plain.pixel_decoder(images, torch.randn(2, 16, 4, 4)).shape == (2, 16, 32, 32)
    with torch.no_grad():
        before = plain(link, patches, images=images)
    after = refined(link, patches, images=images)
    assert torch.allclose(before["boxes"], after["boxes"], atol=1e-6)
    assert torch.allclose(before["logits"], after["logits"], atol=1e-6)  # scores do not read the refinement
    after["boxes"].sum().backward()
    assert refined.refine_box[-1].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="pixel decoder"):
        LinkConditionedDecoder(8, 12, 16, 1, 2, num_queries=3, mask_size=16, box_refinement=True)


def test_a_perception_route_without_an_image_answers_in_words():
    """"Find every circle." with no picture: whatever route the model writes, the part says it needs an image
    (boxes decoded from an all-zero image would be noise); with the image, the detections."""
    from PIL import Image

    from mmbridge.generation import KeypointsPart, TextPart
    from mmbridge.generation.parts import NO_IMAGE_TO_LOOK_AT, build_part

    model, processor = build_tiny(seed=0)
    config = ActConfig(tasks=["det", "pose"], decoder_hidden_size=16, decoder_layers=1, decoder_heads=2,
                       num_object_queries=4, visual_prompts=False)
    model.add_head(config, processor.tokenizer)
    processor.register_head(config)
    image = Image.new("RGB", (32, 32), (200, 40, 40))
    for route in ("[DET]", "[POSE]"):
        answer = {"role": "assistant", "content": [{"type": "head", "head": route, "target": None}]}
        plain = processor([[{"role": "user", "content": "Find every circle."}, answer]])
        [(_, _, name, found, tensors)] = model.decode_heads(plain["input_ids"])
        assert found == route and not bool(tensors["has_image"])
        part = build_part("act", name, found, tensors)
        assert isinstance(part, TextPart) and part.text == NO_IMAGE_TO_LOOK_AT
        seen = processor([[{"role": "user", "content": [{"type": "image", "image": image},
                                                        {"type": "text", "text": "Find every circle."}]}, answer]])
        vision = model.vision(seen["pixel_values"])
        [(_, _, name, found, tensors)] = model.decode_heads(
            seen["input_ids"], image_features=model.get_image_features(None, vision_features=vision),
            vision_features=vision)
        assert bool(tensors["has_image"])
        expected = DetectionsPart if route == "[DET]" else KeypointsPart
        assert isinstance(build_part("act", name, found, tensors), expected)


def test_a_region_names_the_query_whose_box_holds_it():
    """`query_under_region`: the largest share of the region inside a confident query's box; of two boxes that
    both hold it, the tighter; a query that is no object is not picked, however well its box fits."""
    from mmbridge.modeling.act.region import query_under_region

    boxes = torch.tensor([[[0.25, 0.25, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.75, 0.75, 0.5, 0.5],
                           [0.25, 0.75, 0.5, 0.5]]]).expand(3, -1, -1)  # (cx, cy, w, h)
    objectness = torch.tensor([[4.0, 4.0, 4.0, -8.0]]).expand(3, -1)
    masks = torch.zeros(3, 16, 16)
    masks[0, 2:5, 2:5] = 1  # top-left: inside query 0's box and the whole-image box 1 -> the tighter, 0
    masks[1, 10:16, 0:3] = 1  # bottom-left: only boxes 1 (an object) and 3 (not one) -> 1
    masks[2, 0:3, 4:14] = 1  # a stroke mostly in box 0's columns... and all in box 1 -> 1 holds more of it
    assert query_under_region(boxes, objectness, masks).tolist() == [0, 1, 1]


def test_regions_read_from_the_qformer_queries():
    """`region_from_queries`: a `<region>` is the soft-prompt token of the query whose object box holds it, through
    a linear reader that starts as the identity; training reaches the reader; batched generation and a chat
    session read it alike; a Q-Former without object heads cannot."""
    from mmbridge.processing import region_mask

    model, processor = build_tiny(qformer_object_attributes={"shape": ["circle", "square"]})
    config = act_config(region_from_queries=True)
    torch.manual_seed(0)
    model.add_head(config, processor.tokenizer)
    processor.register_head(config)
    image = np.asarray(render(make_scene("train", 0)).resize((32, 32)))
    region = {"box": [0.1, 0.1, 0.5, 0.5]}
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is "},
                                        {"type": "region", **region}, {"type": "text", "text": "?"}]}
    batch = processor([[user, {"role": "assistant", "content": "red"}]], images=[image], return_labels=True)
    with torch.no_grad():
        got = model.region_features(batch["pixel_values"], batch["region_image_index"], batch["region_masks"])
        queries = model.get_query_states(batch["pixel_values"])
        found = model.qformer.objects(queries)
        mask = torch.as_tensor(region_mask(region, 32, 32))[None].float()
        from mmbridge.modeling.act.region import query_under_region
        picked = query_under_region(found["boxes"], found["objectness"], mask)
        assert torch.allclose(got, model.projection(queries)[0, picked], atol=1e-6)
        # One Q-Former pass feeds the soft prompts and the regions alike (it ran twice before).
        runs = []
        hook = model.qformer.register_forward_hook(lambda *_: runs.append(1))
        embeds = model.embed_inputs(batch["input_ids"], batch["pixel_values"],
                                    region_image_index=batch["region_image_index"], region_masks=batch["region_masks"])
        hook.remove()
        assert len(runs) == 1
        apart = model.embed_inputs(batch["input_ids"], batch["pixel_values"], region_features=got)
        assert torch.allclose(embeds, apart, atol=1e-6)
    model.train()
    model(**batch).loss.backward()
    assert model.act.region_encoder.read.weight.grad is not None
    model.eval()
    pipe = MMBridgePipeline(model, processor)
    single = pipe.generate([user], images=[image], max_new_tokens=5)[0]
    assert pipe.chat().ask(user["content"], images=[image], max_new_tokens=5).token_ids == single.token_ids

    with pytest.raises(ValueError, match="no object heads"):
        with_act_head(region_from_queries=True)
