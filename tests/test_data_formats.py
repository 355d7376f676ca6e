"""Writers and readers: webdataset shards, COCO, LLaVA and eval JSON lines — including corrupt input."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from mmbridge.data.build import generate
from mmbridge.data.formats import (
    ReadStats,
    decode_mask,
    iter_shards,
    load_coco,
    read_coco,
    read_eval_jsonl,
    read_llava,
    to_messages,
    webdataset_pipeline,
    write_shards,
)
from mmbridge.data.formats.coco import encode_mask, evaluate, gt_as_detections
from mmbridge.data.shapes.world import Scene, make_scene, png_bytes, render

N = 24


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    manifest = generate(str(out), N, seed=1, split="val", formats=["all"], workers=1, shard_size=10,
                        wave2_num=6, progress=False)
    return out, manifest


def test_generate_writes_every_format(data):
    out, m = data
    assert m["counts"]["scenes"] == N and len(m["files"]["wds"]) == 3  # 10 + 10 + 4
    for key in ("llava", "coco", "annotations", "pose", "edits", "stories"):
        assert os.path.isfile(out / m["files"][key])
    assert len(os.listdir(out / "images")) == N
    assert not [p for p in os.listdir(out / "shards") if p.endswith(".tmp")]


def test_generation_is_deterministic_and_worker_independent(data, tmp_path):
    out, _ = data
    generate(str(tmp_path), 4, seed=1, split="val", formats=["wds", "eval"], workers=2, shard_size=10, progress=False)
    a = (out / "shards" / "shapes-val-000000.tar").read_bytes()
    with tarfile.open(tmp_path / "shards" / "shapes-val-000000.tar") as t:
        names = t.getnames()
    assert names[:3] == ["val-000000.png", "val-000000.txt", "val-000000.json"]
    b = (tmp_path / "images" / "val-000003.png").read_bytes()
    assert b == (out / "images" / "val-000003.png").read_bytes()
    with tarfile.open(out / "shards" / "shapes-val-000000.tar") as t:
        assert t.extractfile("val-000003.png").read() == b
    assert a  # the shard exists and is non-empty


def test_shards_stream_through_our_reader(data):
    out, _ = data
    stats = ReadStats()
    samples = list(iter_shards(str(out / "shards"), stats))
    assert stats.read == N and stats.skipped == 0
    s = samples[5]
    assert s["__key__"] == "val-000005" and s["image"].size == (64, 64)
    assert s["text"] == s["json"]["caption"]
    scene = Scene.from_dict(s["json"]["scene"])
    assert np.array_equal(np.asarray(s["image"]), np.asarray(render(scene)))
    assert scene.to_dict() == make_scene("val", 5, 1).to_dict()
    # brace notation and globs, as webdataset users write them
    assert len(list(iter_shards(str(out / "shards" / "shapes-val-{000000..000002}.tar")))) == N
    assert len(list(iter_shards(str(out / "shards" / "*.tar")))) == N


def test_shards_stream_through_webdataset(data):
    out, _ = data
    stats = ReadStats()
    rows = list(webdataset_pipeline(str(out / "shards"), stats))
    assert len(rows) == N and stats.skipped == 0
    image, text, meta = rows[0]
    assert isinstance(image, Image.Image) and image.size == (64, 64)
    assert text == meta["caption"] and meta["scene"]["objects"]


def _corrupt_shard(path):
    good = png_bytes(render(make_scene("train", 0)))
    samples = [
        {"__key__": "a", "png": good, "txt": "ok", "json": {"x": 1}},
        {"__key__": "b", "png": good[: len(good) // 2], "txt": "truncated png", "json": {"x": 2}},
        {"__key__": "c", "png": good, "txt": "bad json", "json": b"{not json"},
        {"__key__": "d", "png": good, "txt": "ok", "json": {"x": 4}},
        {"__key__": "e", "txt": "no image"},
    ]
    return write_shards(samples, str(path / "bad-%06d.tar"))


def test_corrupt_members_are_skipped_and_counted_by_our_reader(tmp_path):
    shards = _corrupt_shard(tmp_path)
    stats = ReadStats()
    keys = [s["__key__"] for s in iter_shards(shards, stats)]
    assert keys == ["a", "d"]
    assert stats.read == 2 and stats.skipped == 3
    assert stats.reasons == {"bad png": 1, "bad json": 1, "missing image": 1}


def test_corrupt_members_are_skipped_and_counted_through_webdataset(tmp_path):
    shards = _corrupt_shard(tmp_path)
    stats = ReadStats()
    rows = list(webdataset_pipeline(shards, stats))
    assert [r[2]["x"] for r in rows] == [1, 4]
    assert stats.skipped == 3


def test_truncated_and_missing_shards_are_counted(data, tmp_path):
    out, _ = data
    src = (out / "shards" / "shapes-val-000000.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(src[: len(src) // 2])
    stats = ReadStats()
    got = list(iter_shards([str(tmp_path / "cut.tar"), str(tmp_path / "nope.tar"),
                            str(out / "shards" / "shapes-val-000002.tar")], stats))
    assert 0 < stats.read < 10 + 4 and len(got) == stats.read
    assert stats.reasons == {"truncated shard": 1, "unreadable shard": 1}
    assert all(g["json"] is not None for g in got)  # no half sample from the cut slipped through
    # cut exactly at a member boundary: tarfile alone would call that a complete archive
    boundary = 512 * (1 + len(src[:512 * 30]) // 512)
    for cut in range(512, len(src) - 1024, 512):
        if src[cut:cut + 1] != b"\0" and src[cut + 257:cut + 262] == b"ustar":  # a header starts here
            boundary = cut
    (tmp_path / "cut2.tar").write_bytes(src[:boundary])
    stats = ReadStats()
    got = list(iter_shards(str(tmp_path / "cut2.tar"), stats))
    assert stats.reasons == {"truncated shard": 1} and len(got) < 10


def test_users_jpg_shards_without_json(tmp_path):
    img = render(make_scene("train", 1))
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    shards = write_shards([{"__key__": f"laion{i}", "jpg": buf.getvalue(), "txt": f"caption {i}"} for i in range(3)],
                          str(tmp_path / "user-%06d.tar"))
    got = list(iter_shards(shards))
    assert [g["text"] for g in got] == ["caption 0", "caption 1", "caption 2"] and got[0]["json"] is None


def test_coco_loads_and_scores_ap_1(data):
    out, m = data
    coco = load_coco(str(out / m["files"]["coco"]))
    assert len(coco.imgs) == N and {c["name"] for c in coco.cats.values()} == {
        "circle", "square", "triangle", "diamond", "cross"}
    ann = coco.dataset["annotations"][0]
    assert {"color", "size", "segmentation", "bbox", "area"} <= ann.keys()
    for iou_type in ("bbox", "segm"):
        stats = evaluate(coco, gt_as_detections(coco, iou_type), iou_type)
        assert stats[0] == pytest.approx(1.0) and stats[1] == pytest.approx(1.0)
    # the detections are left as they were: still JSON (pycocotools turns RLE counts into bytes in place)
    recs = list(read_coco(str(out / m["files"]["coco"]), decode_masks=True, check_images=True))
    detections = [{"image_id": recs[0]["id"], "category_id": 1, "score": 0.5, "bbox": [1.0, 1.0, 8.0, 8.0],
                   "segmentation": encode_mask(recs[0]["annotations"][0]["mask"])}]
    before = json.dumps(detections)
    evaluate(coco, detections, "segm")
    assert json.dumps(detections) == before
    # masks decode to the rendered coverage
    scene = make_scene("val", 0, 1)
    for a, mask in zip(recs[0]["annotations"], scene.masks()):
        assert np.array_equal(a["mask"], mask) and a["bbox_xyxy"] == list(map(float, a["bbox_xyxy"]))


def test_pose_coco_keypoints_score_ap_1(data):
    out, m = data
    coco = load_coco(str(out / m["files"]["pose"]))
    cat = coco.loadCats(1)[0]
    assert cat["name"] == "person" and len(cat["keypoints"]) == 17
    stats = evaluate(coco, gt_as_detections(coco, "keypoints"), "keypoints")
    assert stats[0] == pytest.approx(1.0)


def test_read_coco_skips_broken_annotations(tmp_path):
    d = {"images": [{"id": 1, "file_name": "x.png", "width": 4, "height": 4}],
         "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2], "area": 4, "iscrowd": 0},
                         {"id": 2, "image_id": 1, "category_id": 9, "bbox": [0, 0, 2, 2], "area": 4, "iscrowd": 0},
                         {"id": 3, "image_id": 1, "category_id": 1, "bbox": "oops", "area": 4, "iscrowd": 0}],
         "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "c.json").write_text(json.dumps(d))
    stats = ReadStats()
    (rec,) = read_coco(str(tmp_path / "c.json"), stats=stats)
    assert [a["id"] for a in rec["annotations"]] == [1] and stats.skipped == 2
    stats = ReadStats()
    assert list(read_coco(str(tmp_path / "c.json"), stats=stats, check_images=True)) == []
    assert stats.reasons == {"bad image": 1}
    poly = decode_mask([[0, 0, 3, 0, 3, 3, 0, 3]], 4, 4)
    assert poly.shape == (4, 4) and poly.sum() > 0


def test_llava_roundtrip_and_bad_records(data, tmp_path):
    out, m = data
    recs = list(read_llava(str(out / m["files"]["llava"]), check_images=True))
    assert len(recs) == N and os.path.isfile(recs[0]["image"])
    first = recs[0]["messages"][0]
    assert first["role"] == "user" and first["content"][0] == {"type": "image"}
    assert recs[0]["messages"][1]["role"] == "assistant"
    rows = [{"id": "ok", "image": "images/val-000000.png",
             "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "yo"}]},
            {"id": "text-only", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "yo"}]},
            {"id": "bad-role", "conversations": [{"from": "robot", "value": "x"}]},
            {"id": "no-conv"},
            {"id": "missing-image", "image": "images/none.png", "conversations": [{"from": "human", "value": "x"}]}]
    path = tmp_path / "mix.jsonl"  # JSON lines variant, with one undecodable line
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    stats = ReadStats()
    got = list(read_llava(str(path), image_folder=str(out), stats=stats, check_images=True))
    assert [g["id"] for g in got] == ["ok", "text-only"] and got[1]["image"] is None
    assert stats.skipped == 4
    assert to_messages([{"from": "human", "value": "Compare <image> and <image>."}])[0]["content"] == [
        {"type": "text", "text": "Compare "}, {"type": "image"}, {"type": "text", "text": " and "},
        {"type": "image"}, {"type": "text", "text": "."}]


def test_eval_jsonl(data, tmp_path):
    out, m = data
    vqa_path, cap_path = (str(out / p) for p in m["files"]["eval"])
    vqa = list(read_eval_jsonl(vqa_path, check_images=True))
    caps = list(read_eval_jsonl(cap_path, kind="caption"))
    assert len(caps) == N and all(r["kind"] == "vqa" for r in vqa) and len(vqa) > 3 * N
    assert os.path.isfile(vqa[0]["image_path"]) and vqa[0]["image"] == "images/val-000000.png"
    assert {r["type"] for r in vqa} == {"count", "color", "shape", "exists", "size", "relation"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.png", "question": "q", "answer": "a"}\nnot json\n{"image": "a.png"}\n'
                   '{"image": "a.png", "objects": [{"shape": "circle"}]}\n\n')
    stats = ReadStats()
    assert len(list(read_eval_jsonl(str(bad), stats=stats))) == 1 and stats.skipped == 3


def test_torch_adapters(data):
    torch = pytest.importorskip("torch")
    from mmbridge.data.shapes import ShapesWorldDataset
    from mmbridge.data.torch_adapters import ShardIterableDataset

    out, _ = data
    ds = ShardIterableDataset(str(out / "shards"), transform=lambda s: s["__key__"])
    keys = list(torch.utils.data.DataLoader(ds, batch_size=None))
    assert sorted(keys) == [f"val-{i:06d}" for i in range(N)] and ds.stats.read == N
    maps = ShapesWorldDataset("val", 5, seed=1, transform=lambda item: item["caption"])
    caps = list(torch.utils.data.DataLoader(maps, batch_size=None))
    assert len(caps) == 5 and caps[0].endswith("background.")
