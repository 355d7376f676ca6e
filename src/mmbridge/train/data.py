"""Training data: streaming webdataset shards and map-style LLaVA JSON, mixed by ratio, split across
processes and dataloader workers, resumable at an exact position, with corrupt samples skipped and counted.

How a stream is laid out (and why it can resume exactly):

* Every (process, worker) pair is a *reader slot*. Each slot reads its own deterministic stream of
  *raw* items (undecoded tar members, or record indices), which is a pure function of the seed and
  the slot: shards are dealt out per epoch in a seeded order, shuffling uses a seeded buffer, the mix
  of datasets is drawn from a seeded RNG. Streams are infinite (epochs follow each other), so the
  trainer counts steps, not epochs — like LAVIS' `iters_per_inner_epoch`.
* Decoding (image bytes -> PIL, caption -> conversation) happens *after* the raw stream, so a corrupt
  sample costs one count and never shifts anything else.
* The data position is "raw items consumed" per slot. Resuming replays the raw stream without
  decoding it (cheap: only tar headers are read), which lands on exactly the next sample.
* A DataLoader with W workers takes batch t from worker t % W. After resuming at rank-local batch
  t0 the physical worker i plays logical slot (i + t0) % W, so batches come back in the same order.
* Map-style data is dealt block-cyclically by global batch (process r takes the r-th block of
  `batch_size` of each global batch), so 1 process with batch 8 and 2 processes with batch 4 see
  the same samples at every step.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from mmbridge.data.formats.llava import load_records, record_problem, to_messages
from mmbridge.processing import (
    IGNORE_INDEX,
    ImageLoadError,
    MMBridgeProcessor,
    images_in,
    load_image,
    normalize_messages,
)
from mmbridge.train.config import DataConfig, DatasetConfig, expand_shards

logger = logging.getLogger("mmbridge.train")

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp")
MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "labels")
#: Present only where they apply: instruction-aware Q-Formers (InstructBLIP), BLIP-2 stage-1 text,
#: head targets (not tensors: each head reads its own).
OPTIONAL_MODEL_INPUTS = ("qformer_input_ids", "qformer_attention_mask", "qformer_text_ids", "qformer_text_mask",
                         "qformer_text_rows", "region_image_index", "region_masks", "head_targets",
                         "object_targets")
#: A reader that skips this many samples in a row without one good sample stops with an error
#: instead of spinning forever on a dataset that is corrupt through and through.
MAX_CONSECUTIVE_SKIPS = 10_000
#: keys of a head target that name an image file in a LLaVA record: a drawing ("image"), an edit's source
TARGET_IMAGE_KEYS = ("image", "source")


class SampleError(ValueError):
    """One sample cannot be used (missing caption, broken JSON, no image, ...)."""


@dataclass(frozen=True)
class Slot:
    rank: int
    world: int
    worker: int  # logical worker id
    num_workers: int
    batch_size: int

    @property
    def index(self) -> int:
        return self.rank * self.num_workers + self.worker

    @property
    def count(self) -> int:
        return self.world * self.num_workers


class SkipStats:
    """Per-reader counts of skipped samples by reason; logs the first few with their keys."""

    def __init__(self, counts: dict | None = None, log_first: int = 5):
        self.counts = Counter(counts or {})
        self.active = True  # off while replaying to a resume position (those were counted before)
        self.log_first = log_first

    def skip(self, reason: str, key: str, detail: Any = "") -> None:
        if not self.active:
            return
        self.counts[reason] += 1
        if sum(self.counts.values()) <= self.log_first:
            logger.warning("skipping sample %s (%s): %s", key, reason, str(detail)[:200])

    def handler(self, exn: Exception) -> bool:
        """webdataset `handler=`: a broken tar member or shard is counted and reading goes on."""
        self.skip(f"tar:{type(exn).__name__}", "?", exn)
        return True


# -- sources ------------------------------------------------------------------------------------

def _caption_conversation(image, caption: str, prompt: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]},
            {"role": "assistant", "content": [{"type": "text", "text": caption}]}]


def _head_parts(text: str, targets: dict[str, list]) -> list[dict]:
    """Split assistant text at head triggers; each occurrence becomes a head part with its next target."""
    import re

    pattern = "(" + "|".join(re.escape(t) for t in sorted(targets, key=len, reverse=True)) + ")"
    parts, used = [], {t: 0 for t in targets}
    for piece in re.split(pattern, text):
        if piece in targets:
            if used[piece] >= len(targets[piece]):
                raise SampleError(f"more {piece} in the answers than targets given for it")
            parts.append({"type": "head", "head": piece, "target": targets[piece][used[piece]]})
            used[piece] += 1
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


def llava_to_messages(turns: list[dict], images: list, targets: dict | None = None,
                      regions: list | None = None, captions: list | None = None) -> list[dict]:
    """LLaVA `conversations` -> messages; each `<image>` in a human turn becomes the next image part.
    Images not referenced by a `<image>` tag go in front of the first user turn (LLaVA's convention);
    `<image>` in an answer is an image the model draws.
    `targets` (a record's optional `"targets"`: head trigger -> one target per occurrence, in order)
    turn each trigger written in an answer ("There are [CNT] shapes") into a head part; `regions` (a record's
    optional `"regions"`: visual prompts) fill the `<region>` tags of its human turns; `captions` (a record's
    optional `"captions"`: one text per `<image>` in its answers, in order) describe the images the model draws
    (the draw head's caption-alignment target; without them, the user's last words are)."""
    problem = record_problem({"conversations": turns})
    if problem:
        raise SampleError(f"{problem}: {str(turns)[:80]}")
    pending = list(images)
    if regions is not None and not (isinstance(regions, list) and all(isinstance(r, dict) for r in regions)):
        raise SampleError("'regions' must be a list of visual prompts ({'box': [x0, y0, x1, y1]}, ...)")
    if captions is not None and not (isinstance(captions, list) and all(isinstance(c, str) for c in captions)):
        raise SampleError("'captions' must be a list of texts, one per <image> in the answers")
    drawn_captions = list(captions or [])
    try:
        messages = to_messages(turns, regions)  # the one LLaVA reader's conversion (data/formats)
    except ValueError as err:
        raise SampleError(str(err)) from None
    for message in messages:
        parts = []
        # text around a marked region keeps its spaces ("What color is " <region> "?"), as at inference
        marked = any(part["type"] == "region" for part in message["content"])
        for part in message["content"]:
            if part["type"] == "image":  # in an answer: an image the model draws (a drawing target)
                if message["role"] == "system" or not pending:
                    raise SampleError("an <image> tag without an image")
                parts.append({"type": "image", "image": pending.pop(0)})
                if message["role"] == "assistant" and captions is not None:
                    if not drawn_captions:
                        raise SampleError("more <image> tags in the answers than 'captions'")
                    parts[-1]["caption"] = drawn_captions.pop(0)
            elif part["type"] == "region":
                parts.append(part)
            elif part["text"].strip():
                text = part["text"] if marked else part["text"].strip()
                heads = message["role"] == "assistant" and targets
                parts += _head_parts(text, targets) if heads else [{"type": "text", "text": text}]
        message["content"] = parts or [{"type": "text", "text": ""}]
    if drawn_captions:
        raise SampleError(f"{len(drawn_captions)} 'captions' left over: more than the answers' <image> tags")
    if pending:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise SampleError("images but no user turn")
        first_user["content"] = [{"type": "image", "image": img} for img in pending] + first_user["content"]
    return messages


def image_objects(meta: dict, image) -> list[dict] | None:
    """A sample's optional `"objects"` (`[{"box": [x0, y0, x1, y1] in pixels, <attribute>: <class>, ...}]`)
    with each box as (cx, cy, w, h) in [0, 1] of the image, as the Q-Former's object loss reads it."""
    objects = meta.get("objects") if isinstance(meta, dict) else None
    if objects is None:
        return None
    if not isinstance(objects, list):
        raise SampleError(f"'objects' must be a list of objects, got {type(objects).__name__}")
    width, height = image.size
    out = []
    for obj in objects:
        box = obj.get("box") if isinstance(obj, dict) else None
        if not (isinstance(box, list) and len(box) == 4 and box[0] < box[2] and box[1] < box[3]):
            raise SampleError(f"object {obj!r}: 'box' must be [x0, y0, x1, y1] with x0 < x1 and y0 < y1")
        x0, y0, x1, y1 = box
        out.append({**obj, "box": [(x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width,
                                   (y1 - y0) / height]})
    return out


class WebDatasetSource:
    """Tar shards with `key.png` (or jpg/webp) + `key.txt` (caption) + `key.json` (metadata).

    A sample whose JSON holds LLaVA-style `conversations` trains on those; otherwise the caption is
    the answer to one of the dataset's `prompts` (MiniGPT-4 stage 1). A JSON `"objects"` list (pixel
    boxes and attribute labels, `image_objects`) feeds the Q-Former's object loss where a stage asks for it."""

    def __init__(self, cfg: DatasetConfig, seed: int):
        self.cfg = cfg
        self.name = cfg.name
        self.shards = expand_shards(cfg.shards)
        self.seed = seed

    def raw_stream(self, slot: Slot, stats: SkipStats) -> Iterator[dict]:
        import webdataset as wds

        split = self.cfg.split
        if split == "auto":
            split = "shards" if len(self.shards) >= slot.count else "samples"
        if split == "shards" and len(self.shards) < slot.count:
            raise ValueError(
                f"dataset {self.name}: {len(self.shards)} shard(s) for {slot.count} readers "
                f"({slot.world} process(es) x {slot.num_workers} worker(s)); use split: samples or more shards")
        rng = random.Random(f"{self.seed}/{self.name}/shuffle/{slot.index}")
        return _shuffled(self._epochs(split, slot, stats, wds), self.cfg.shuffle_buffer, rng)

    def _epochs(self, split: str, slot: Slot, stats: SkipStats, wds) -> Iterator[dict]:
        for epoch in itertools.count():
            order = list(self.shards)
            random.Random(f"{self.seed}/{self.name}/epoch/{epoch}").shuffle(order)
            mine = order[slot.index::slot.count] if split == "shards" else order
            reader = wds.tarfile_to_samples(handler=stats.handler)(iter([{"url": u} for u in mine]))
            produced = 0
            for i, sample in enumerate(reader):
                if split == "samples" and i % slot.count != slot.index:
                    continue
                produced += 1
                yield sample
            if produced == 0:
                raise RuntimeError(f"dataset {self.name}: reader {slot.index} found no samples in {mine[:3]}")

    def decode(self, raw: dict, prompt_index: int) -> list[dict]:
        key = raw.get("__key__", "?")
        image_bytes = next((raw[e] for e in IMAGE_EXTS if e in raw), None)
        if image_bytes is None:
            raise SampleError(f"no image member (have {sorted(k for k in raw if not k.startswith('__'))})")
        image = load_image(bytes(image_bytes))
        meta = {}
        if "json" in raw:
            try:
                meta = json.loads(raw["json"])
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise SampleError(f"broken json: {err}") from err
        if isinstance(meta, dict) and meta.get("conversations"):
            messages = llava_to_messages(meta["conversations"], [image])
        else:
            caption = raw.get("txt")
            caption = caption.decode("utf-8", errors="strict").strip() if isinstance(caption, bytes) else caption
            if not caption:
                raise SampleError(f"sample {key} has no caption (.txt)")
            messages = _caption_conversation(image, caption, self.cfg.prompts[prompt_index % len(self.cfg.prompts)])
        objects = image_objects(meta, image)
        if objects is not None:  # the sample's one image carries its object labels
            next(p for m in messages for p in m["content"] if p["type"] == "image")["objects"] = objects
        return messages


class LlavaJsonDataset(Dataset):
    """Map-style LLaVA instruction data: a JSON list of `{"image": "rel/path.png", "conversations":
    [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}]}`."""

    def __init__(self, path: str, image_root: str | None = None):
        self.path = Path(path)
        self.image_root = Path(image_root) if image_root else self.path.parent
        try:
            records, stats = load_records(str(self.path))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of records (or JSON lines)")
        if stats.skipped:
            logger.warning("%s: %d unreadable JSON line(s) skipped", path, stats.skipped)
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def key(self, index: int) -> str:
        record = self.records[index]
        return str(record.get("id", index)) if isinstance(record, dict) else str(index)

    def __getitem__(self, index: int) -> list[dict]:
        record = self.records[index]
        if not isinstance(record, dict):
            raise SampleError("record is not an object")
        names = record.get("image") or []
        names = [names] if isinstance(names, str) else names
        images = [load_image(self.image_root / name) for name in names]
        targets = record.get("targets")
        well_formed = isinstance(targets, dict) and all(isinstance(v, list) for v in targets.values())
        if targets is not None and not well_formed:
            raise SampleError("'targets' must map a head's trigger token to a list of targets")
        if targets:  # image files a target names (a drawing, an edit's result and source) are loaded like "image"
            targets = {trigger: [self._load_target_images(t) for t in items] for trigger, items in targets.items()}
        return llava_to_messages(record.get("conversations"), images, targets, record.get("regions"),
                                 record.get("captions"))

    def _load_target_images(self, target):
        if not isinstance(target, dict):
            return target
        return {**target, **{key: load_image(self.image_root / target[key]) for key in TARGET_IMAGE_KEYS
                             if isinstance(target.get(key), str)}}


class LlavaJsonSource:
    def __init__(self, cfg: DatasetConfig, seed: int):
        self.cfg = cfg
        self.name = cfg.name
        self.dataset = LlavaJsonDataset(cfg.path, cfg.image_root)
        self.seed = seed
        if len(self.dataset) == 0:
            raise ValueError(f"dataset {self.name}: {cfg.path} has no records")

    def raw_stream(self, slot: Slot, stats: SkipStats) -> Iterator[dict]:
        """Global order = one seeded permutation per epoch, laid end to end; global batch g is
        positions [g*B, (g+1)*B) with B = batch_size * world; process r takes its r-th block and
        rank-local batch g belongs to logical worker g % num_workers."""
        n, b = len(self.dataset), slot.batch_size
        global_batch = b * slot.world
        perms: dict[int, list[int]] = {}

        def index(position: int) -> int:
            epoch, offset = divmod(position, n)
            if epoch not in perms:
                perms.clear()
                perms[epoch] = random.Random(f"{self.seed}/{self.name}/epoch/{epoch}").sample(range(n), n)
            return perms[epoch][offset]

        for g in itertools.count(slot.worker, slot.num_workers):
            start = g * global_batch + slot.rank * b
            for position in range(start, start + b):
                i = index(position)
                yield {"__key__": self.dataset.key(i), "index": i}

    def decode(self, raw: dict, prompt_index: int) -> list[dict]:
        return self.dataset[raw["index"]]


def build_source(cfg: DatasetConfig, seed: int):
    return WebDatasetSource(cfg, seed) if cfg.type == "webdataset" else LlavaJsonSource(cfg, seed)


def _shuffled(items: Iterator, bufsize: int, rng: random.Random) -> Iterator:
    """webdataset-style buffer shuffle, with our own seeded RNG (so it replays on resume)."""
    if bufsize <= 1:
        yield from items
        return
    buffer = []
    for item in items:
        if len(buffer) < bufsize:
            buffer.append(item)
            continue
        i = rng.randrange(bufsize)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


# -- the per-process stream of batches ------------------------------------------------------------

class TrainStream(IterableDataset):
    """Infinite stream of processed batches for one process; see the module docstring.

    `state` is what `Trainer` saved for this process: `{"batches": rank-local batches consumed,
    "positions": {logical_worker: raw items consumed}, "skipped": {logical_worker: {reason: n}}}`.
    """

    def __init__(self, cfg: DataConfig, processor: MMBridgeProcessor, *, rank: int = 0, world: int = 1,
                 seed: int = 0, state: dict | None = None, qformer_text: bool = False):
        self.cfg = cfg
        self.qformer_text = qformer_text  # BLIP-2 stage 1: the answer is the image's text for ITC/ITM/ITG
        self.processor = processor
        if cfg.max_length:
            processor.max_length = cfg.max_length
        self.rank, self.world, self.seed = rank, world, seed
        self.sources = [build_source(d, seed) for d in cfg.datasets]
        self.weights = [d.weight for d in cfg.datasets]
        state = state or {}
        self.start_batches = int(state.get("batches", 0))
        self.positions = {int(k): int(v) for k, v in state.get("positions", {}).items()}
        self.skipped = {int(k): dict(v) for k, v in state.get("skipped", {}).items()}

    def _raw(self, slot: Slot, stats: SkipStats) -> Iterator[tuple[int, int, dict]]:
        """(source index, prompt index, raw item), mixing the sources by weight."""
        streams = [s.raw_stream(slot, stats) for s in self.sources]
        rng = random.Random(f"{self.seed}/mix/{slot.index}")
        while True:
            k = rng.choices(range(len(streams)), weights=self.weights)[0] if len(streams) > 1 else 0
            prompt = rng.randrange(1 << 30)
            yield k, prompt, next(streams[k])

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        num_workers, physical = (info.num_workers, info.id) if info else (1, 0)
        logical = (physical + self.start_batches) % num_workers
        slot = Slot(self.rank, self.world, logical, num_workers, self.cfg.batch_size)
        stats = SkipStats(self.skipped.get(logical))
        raw = self._raw(slot, stats)
        position = self.positions.get(logical, 0)
        stats.active = False
        for _ in range(position):  # replay to the saved position without decoding
            next(raw)
        stats.active = True
        while True:
            conversations, keys, paired = [], [], []
            in_a_row = 0
            while len(conversations) < self.cfg.batch_size:
                k, prompt, item = next(raw)
                position += 1
                key = f"{self.sources[k].name}/{item.get('__key__', '?')}"
                try:
                    messages = self.sources[k].decode(item, prompt)
                    self._check(messages)
                except (SampleError, ImageLoadError, ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
                    stats.skip(type(err).__name__, key, err)
                    in_a_row += 1
                    if in_a_row >= MAX_CONSECUTIVE_SKIPS:
                        raise RuntimeError(f"{in_a_row} unusable samples in a row (last: {key}: {err})") from err
                    continue
                in_a_row = 0
                conversations.append(messages)
                keys.append(key)
                paired.append(self.qformer_text and self.sources[k].cfg.qformer_text)
            every = all(paired)
            batch = self.processor(conversations, return_labels=True, padding_side="right", truncation=True,
                                   return_qformer_text=self.qformer_text and every)
            out = {name: batch[name] for name in (*MODEL_INPUTS, *OPTIONAL_MODEL_INPUTS) if name in batch}
            if any(paired) and not every:
                out.update(self._paired_text(conversations, paired, len(batch["pixel_values"])))
            objects = [p.get("objects") for c in conversations for m in normalize_messages(c) for p in m["content"]
                       if p["type"] == "image"]
            if any(o is not None for o in objects) and len(objects) == len(batch["pixel_values"]):
                out["object_targets"] = objects  # else truncation cut an image and the rows would not line up
            out.update(keys=keys, _worker=logical, _position=position, _skipped=dict(stats.counts))
            yield out

    def _paired_text(self, conversations: list, paired: list[bool], num_images: int) -> dict:
        """Q-Former text of the paired samples only, and `qformer_text_rows`: the index of each one's image
        among the batch's images (the model computes the Q-Former losses on those rows)."""
        counts = [len(images_in(normalize_messages(c))) for c in conversations]
        if sum(counts) != num_images:  # truncation cut an image: the rows would not line up, so skip
            return {}
        starts = [sum(counts[:i]) for i in range(len(counts))]
        chosen = [i for i, p in enumerate(paired) if p]
        out = dict(self.processor.qformer_text_inputs([conversations[i] for i in chosen]))
        out["qformer_text_rows"] = torch.tensor([starts[i] for i in chosen], dtype=torch.long)
        return out

    def _check(self, messages: list[dict]) -> None:
        """Reject a sample that would break a batch or train on nothing (all labels masked)."""
        normalize_messages(messages)
        encoded = self.processor.encode(messages)
        labels = encoded.labels[: self.processor.max_length] if self.processor.max_length else encoded.labels
        if all(t == IGNORE_INDEX for t in labels):
            raise SampleError("no answer tokens left to train on (empty answer or cut by max_length)")


def build_dataloader(cfg: DataConfig, processor: MMBridgeProcessor, *, rank: int = 0, world: int = 1,
                     seed: int = 0, state: dict | None = None, qformer_text: bool = False) -> DataLoader:
    stream = TrainStream(cfg, processor, rank=rank, world=world, seed=seed, state=state, qformer_text=qformer_text)
    return DataLoader(
        stream, batch_size=None, num_workers=cfg.num_workers,
        # Our own generator: creating the iterator must not draw from the global torch RNG, or a
        # resumed run's dropout masks would drift from an uninterrupted one.
        generator=torch.Generator().manual_seed(seed),
        prefetch_factor=4 if cfg.num_workers else None,
        persistent_workers=False,
    )
