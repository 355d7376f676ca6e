"""Training data: shard/worker splitting, mixing ratios, map-style LLaVA, corrupt-sample skip, exact resume."""

import itertools
from collections import Counter

import pytest

from mmbridge.train.config import DataConfig, DatasetConfig
from mmbridge.train.data import LlavaJsonSource, SkipStats, Slot, TrainStream, WebDatasetSource, build_dataloader
from mmbridge.train.fixtures import write_llava, write_shards


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-data")
    write_shards(root / "clean", num_shards=4, per_shard=6, seed=1)
    write_shards(root / "dirty", num_shards=1, per_shard=12, seed=2, corrupt={3: "png", 7: "txt"})
    write_llava(root / "llava", n=20)
    return root


@pytest.fixture(scope="module")
def processor():
    from mmbridge.testing import build_tiny

    return build_tiny()[1]


def wds(root, name="clean", **kw):
    return DatasetConfig(name=name, type="webdataset", shards=[str(root / name / "shard-{0000..0003}.tar")], **kw)


def take_keys(stream, n):
    return [item["__key__"] for item in itertools.islice(stream, n)]


@pytest.mark.parametrize("split", ["shards", "samples"])
def test_webdataset_split_across_processes_and_workers(data, split):
    source = WebDatasetSource(wds(data, shuffle_buffer=1, split=split), seed=0)
    per_slot = [take_keys(source.raw_stream(Slot(rank, 2, worker, 2, 4), SkipStats()), 6)
                for rank in range(2) for worker in range(2)]
    flat = [k for keys in per_slot for k in keys]
    assert len(set(flat)) == 24  # one epoch: every sample exactly once across the 4 readers


def test_mixing_follows_the_ratios(data, processor):
    cfg = DataConfig(batch_size=4, datasets=[wds(data, name="clean", weight=3.0),
                                             DatasetConfig(name="vqa", type="llava_json",
                                                           path=str(data / "llava" / "llava.json"), weight=1.0)])
    stream = TrainStream(cfg, processor, seed=0)
    picks = Counter(k for k, _, _ in itertools.islice(stream._raw(Slot(0, 1, 0, 1, 4), SkipStats()), 800))
    assert picks[0] / 800 == pytest.approx(0.75, abs=0.05)


def test_llava_map_style_same_global_batches_for_any_process_count(data):
    cfg = DatasetConfig(name="vqa", type="llava_json", path=str(data / "llava" / "llava.json"))
    source = LlavaJsonSource(cfg, seed=3)
    one = take_keys(source.raw_stream(Slot(0, 1, 0, 1, 8), SkipStats()), 8 * 5)
    r0 = take_keys(source.raw_stream(Slot(0, 2, 0, 1, 4), SkipStats()), 4 * 5)
    r1 = take_keys(source.raw_stream(Slot(1, 2, 0, 1, 4), SkipStats()), 4 * 5)
    for step in range(5):  # crosses an epoch boundary (20 records, 8 per step)
        assert one[step * 8:(step + 1) * 8] == r0[step * 4:(step + 1) * 4] + r1[step * 4:(step + 1) * 4]


def test_corrupt_samples_are_skipped_and_counted(data, processor):
    cfg = DataConfig(batch_size=5, datasets=[DatasetConfig(
        name="dirty", type="webdataset", shards=[str(data / "dirty" / "shard-0000.tar")], shuffle_buffer=1)])
    batches = list(itertools.islice(iter(TrainStream(cfg, processor, seed=0)), 2))
    keys = [k for b in batches for k in b["keys"]]
    assert len(keys) == 10 and not any(k.endswith(("000003", "000007")) for k in keys)
    assert batches[-1]["_skipped"] == {"ImageLoadError": 1, "SampleError": 1}
    assert batches[-1]["_position"] == 12  # 10 good + 2 skipped raw samples consumed
    assert batches[0]["pixel_values"].shape[0] == 5 and (batches[0]["labels"] != -100).any()


def test_resume_position_with_workers_gives_the_same_batches(data, processor):
    cfg = DataConfig(batch_size=3, num_workers=2, datasets=[
        wds(data, shuffle_buffer=5), DatasetConfig(name="vqa", type="llava_json",
                                                     path=str(data / "llava" / "llava.json"))])
    full = [b["keys"] for b in itertools.islice(iter(build_dataloader(cfg, processor, seed=7)), 7)]
    first = list(itertools.islice(iter(build_dataloader(cfg, processor, seed=7)), 3))
    state = {"batches": 3, "positions": {b["_worker"]: b["_position"] for b in first},
             "skipped": {b["_worker"]: b["_skipped"] for b in first}}
    rest = [b["keys"] for b in itertools.islice(iter(build_dataloader(cfg, processor, seed=7, state=state)), 4)]
    assert [b["keys"] for b in first] + rest == full


def test_llava_json_lines_train_through_the_same_reader(data, processor, tmp_path):
    """The trainer reads LLaVA data with the `data.formats` reader: JSON lines work, a broken line
    costs one record, and `targets` turn head triggers in answers into head parts."""
    import json

    from mmbridge.train.data import llava_to_messages

    records = json.loads((data / "llava" / "llava.json").read_text())
    lines = [json.dumps(r) for r in records[:4]]
    lines.insert(2, "{not json")
    (tmp_path / "chats.jsonl").write_text("\n".join(lines) + "\n")
    cfg = DataConfig(datasets=[DatasetConfig(name="jl", type="llava_json", path=str(tmp_path / "chats.jsonl"),
                                             image_root=str(data / "llava"))], batch_size=2)
    batch = next(iter(TrainStream(cfg, processor)))
    assert batch["input_ids"].shape[0] == 2 and (batch["labels"] != -100).any()
    source = LlavaJsonSource(cfg.datasets[0], seed=0)
    assert len(source.dataset) == 4

    turns = [{"from": "human", "value": "<image>\nHow many?"}, {"from": "gpt", "value": "There are [CNT] shapes."}]
    messages = llava_to_messages(turns, ["img"], targets={"[CNT]": [3]})
    assert messages[1]["content"] == [{"type": "text", "text": "There are "},
                                      {"type": "head", "head": "[CNT]", "target": 3},
                                      {"type": "text", "text": " shapes."}]
