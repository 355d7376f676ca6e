"""Object-centric queries (issue 13): the DETR-style set loss on the Q-Former's queries, its labels in shard
JSON, and the model / trainer plumbing that carries them."""

import io
import json

import pytest
import torch
from PIL import Image

from mmbridge.modeling.objects import QueryObjectHeads

ATTRIBUTES = {"color": ["red", "blue", "green"], "shape": ["circle", "square"]}
OBJECTS = [[{"box": [0.25, 0.25, 0.2, 0.2], "color": "red", "shape": "square"},
            {"box": [0.75, 0.6, 0.3, 0.3], "color": "blue", "shape": "circle"}],
           [{"box": [0.5, 0.5, 0.4, 0.4], "color": "green", "shape": "circle"}]]


def test_matching_pairs_each_object_with_the_query_that_predicts_it():
    heads = QueryObjectHeads(4, ATTRIBUTES)
    big = 20.0
    predictions = {"objectness": torch.tensor([-big, big, big]),
                   "boxes": torch.tensor([[0.5, 0.5, 0.1, 0.1], [0.75, 0.6, 0.3, 0.3], [0.25, 0.25, 0.2, 0.2]]),
                   "color": torch.tensor([[0, 0, big], [0, big, 0], [big, 0, 0.0]]),
                   "shape": torch.tensor([[0, big], [big, 0], [0, big]])}
    queries, objects = heads.match(predictions, heads.encode_targets(OBJECTS[0]))
    assert dict(zip(objects.tolist(), queries.tolist())) == {0: 2, 1: 1}


def test_the_set_loss_trains_queries_to_hold_each_object_whole():
    """Free query vectors trained on the loss alone end up naming every object's attributes together."""
    torch.manual_seed(0)
    heads = QueryObjectHeads(16, ATTRIBUTES)
    queries = torch.nn.Parameter(torch.randn(2, 4, 16))
    optimizer = torch.optim.Adam([queries, *heads.parameters()], lr=0.05)
    first = heads.loss(queries, OBJECTS).item()
    for _ in range(150):
        optimizer.zero_grad()
        loss = heads.loss(queries, OBJECTS)
        loss.backward()
        optimizer.step()
    assert loss.item() < first / 10
    accuracy = heads.accuracy(queries.detach(), OBJECTS)
    assert accuracy == {"bound": 1.0, "color": 1.0, "shape": 1.0, "count": 1.0, "objects": 3}


def test_unlabelled_images_are_skipped_and_bad_labels_are_named():
    heads = QueryObjectHeads(8, ATTRIBUTES)
    queries = torch.randn(3, 4, 8)
    assert torch.isfinite(heads.loss(queries, [OBJECTS[0], None, OBJECTS[1]]))
    with pytest.raises(ValueError, match="no image in this batch has object labels"):
        heads.loss(queries, [None, None, None])
    with pytest.raises(ValueError, match="'color'.*one of"):
        heads.loss(queries[:1], [[{"box": [0.5, 0.5, 0.1, 0.1], "color": "pink", "shape": "circle"}]])
    with pytest.raises(ValueError, match="5 objects but only 4 queries"):
        heads.loss(queries[:1], [OBJECTS[1] * 5])


def test_the_model_reports_the_objects_loss_without_running_the_llm():
    from mmbridge.testing import build_tiny

    model, _ = build_tiny(seed=0, qformer_object_attributes=ATTRIBUTES)
    assert "objects" in model.config.loss_names
    pixels = torch.randn(2, 3, 32, 32)
    out = model(pixel_values=pixels, object_targets=OBJECTS, loss_names=["objects"])
    assert set(out.losses) == {"objects"} and out.logits is None
    out.loss.backward()
    assert model.qformer.query_tokens.grad is not None and model.qformer.objects.box[0].weight.grad is not None
    with pytest.raises(ValueError, match="object_targets has 1 entries for 2 images"):
        model(pixel_values=pixels, object_targets=OBJECTS[:1], loss_names=["objects"])
    with pytest.raises(ValueError, match="qformer_object_attributes\\['color'\\]"):
        build_tiny(seed=0, qformer_object_attributes={"color": ["red"]})


def test_object_labels_travel_from_shard_json_to_the_batch(tmp_path):
    """A webdataset sample's JSON `objects` (pixel boxes) reach the model as (cx, cy, w, h) in [0, 1], one
    entry per image of the batch, `None` for samples without labels; a broken box skips the sample."""
    import webdataset as wds

    from mmbridge.testing import build_tiny
    from mmbridge.train.config import DataConfig, DatasetConfig
    from mmbridge.train.data import TrainStream

    image = io.BytesIO()
    Image.new("RGB", (40, 20), (0, 0, 0)).save(image, format="PNG")
    with wds.TarWriter(str(tmp_path / "shard-0000.tar")) as sink:
        sink.write({"__key__": "a", "png": image.getvalue(), "txt": "a red square",
                    "json": json.dumps({"objects": [{"box": [0, 0, 20, 10], "color": "red", "shape": "square"}]})})
        sink.write({"__key__": "b", "png": image.getvalue(), "txt": "nothing labelled", "json": "{}"})
        sink.write({"__key__": "c", "png": image.getvalue(), "txt": "a broken box",
                    "json": json.dumps({"objects": [{"box": [5, 5, 5, 9], "color": "red"}]})})
    _, processor = build_tiny(seed=0)
    cfg = DataConfig(batch_size=2, datasets=[DatasetConfig(name="s", type="webdataset", split="samples",
                                                           shards=[str(tmp_path / "shard-0000.tar")],
                                                           shuffle_buffer=1)])
    batch = next(iter(TrainStream(cfg, processor, seed=0)))
    assert batch["keys"] == ["s/a", "s/b"] and batch["_skipped"] == {}
    assert batch["object_targets"] == [[{"box": [0.25, 0.25, 0.5, 0.5], "color": "red", "shape": "square"}], None]
    second = next(x for i, x in zip(range(2), iter(TrainStream(cfg, processor, seed=0))) if i == 1)
    assert "s/c" not in second["keys"] and sum(second["_skipped"].values()) == 1


def test_objects_that_are_not_a_list_are_a_sample_error():
    from mmbridge.train.data import SampleError, image_objects

    with pytest.raises(SampleError, match="'objects' must be a list"):
        image_objects({"objects": {"box": [0, 0, 1, 1]}}, Image.new("RGB", (4, 4)))
    assert image_objects({}, Image.new("RGB", (4, 4))) is None
