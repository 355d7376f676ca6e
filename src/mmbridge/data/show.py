"""Contact sheets: a grid of samples with their boxes, keypoints and captions drawn on, so a person
can look at a dataset (``mmbridge data show``).  Reads any of our formats — also users' own shards,
COCO files, LLaVA files and eval files — from a directory or a single file."""

from __future__ import annotations

import glob
import os
import textwrap
from collections.abc import Iterator
from itertools import islice

from PIL import Image, ImageDraw, ImageFont

from .formats.coco import read_coco
from .formats.common import ReadStats
from .formats.evaljsonl import read_eval_jsonl
from .formats.llava import read_llava
from .formats.webdataset import expand_urls, iter_shards

BOX_COLORS = [(255, 0, 255), (0, 255, 0), (255, 255, 0), (0, 200, 255), (255, 128, 0)]


def _open_rgb(path: str) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


def _from_shards(urls, stats) -> Iterator[dict]:
    for s in iter_shards(urls, stats):
        objs = (s["json"] or {}).get("scene", {}).get("objects", []) if isinstance(s["json"], dict) else []
        yield {"image": s["image"], "text": s["text"] or "", "boxes": [o["box"] for o in objs if "box" in o]}


def _from_coco(path, stats) -> Iterator[dict]:
    for rec in read_coco(path, stats=stats, check_images=True):
        anns = rec["annotations"]
        text = ", ".join(" ".join(str(a[k]) for k in ("size", "color") if k in a) + " " + a["category"]
                         for a in anns).replace("  ", " ").strip()
        text = rec["extra"].get("caption") or text
        yield {"image": _open_rgb(rec["path"]), "text": text, "boxes": [a["bbox_xyxy"] for a in anns],
               "keypoints": [a["keypoints"] for a in anns if a.get("keypoints")]}


def _from_llava(path, stats) -> Iterator[dict]:
    for rec in read_llava(path, stats=stats, check_images=True):
        if rec["image"]:
            turns = rec["conversations"]
            text = " / ".join(t["value"].replace("<image>", "").strip() for t in turns[:2])
            yield {"image": _open_rgb(rec["image"]), "text": text, "boxes": []}


def _from_eval(path, stats) -> Iterator[dict]:
    for rec in read_eval_jsonl(path, stats=stats, check_images=True):
        text = (f"{rec['question']} -> {rec['answer']}" if rec["kind"] == "vqa" else
                ", ".join(f"{o['size']} {o['color']} {o['shape']}" for o in rec["objects"]))
        yield {"image": _open_rgb(rec["image_path"]), "text": text, "boxes": []}


def find_samples(path: str, stats: ReadStats | None = None) -> Iterator[dict]:
    """Samples from ``path``: a shard / COCO / LLaVA / eval file, or a directory holding any of
    them (shards preferred, since they carry boxes and captions)."""
    stats = stats if stats is not None else ReadStats()
    if os.path.isdir(path):
        for pattern in ("shards/*.tar", "*.tar", "coco_*.json", "pose/coco_*.json", "llava_*.json",
                        "caption_*.jsonl", "vqa_*.jsonl"):
            hits = sorted(glob.glob(os.path.join(path, pattern)))
            if hits and hits[0].endswith(".tar"):
                return _from_shards(hits, stats)
            if hits:
                return find_samples(hits[0], stats)
        return iter(())
    if path.endswith((".tar", ".tar.gz")) or "{" in path:
        return _from_shards(expand_urls(path), stats)
    if path.endswith(".jsonl"):
        return _from_eval(path, stats)
    if path.endswith(".json"):
        with open(path) as f:
            head = f.read(4096)
        return _from_coco(path, stats) if '"images"' in head or '"info"' in head else _from_llava(path, stats)
    raise ValueError(f"don't know how to read {path!r}")


def draw_tile(sample: dict, scale: int = 3, text_lines: int = 4) -> Image.Image:
    img = sample["image"]
    w, h = img.width * scale, img.height * scale
    font = ImageFont.load_default()
    line_h = 11
    tile = Image.new("RGB", (w, h + text_lines * line_h + 4), (255, 255, 255))
    tile.paste(img.resize((w, h), Image.NEAREST), (0, 0))
    draw = ImageDraw.Draw(tile)
    for k, (x0, y0, x1, y1) in enumerate(sample.get("boxes", [])):
        # one pixel outside the box: a square fills its whole box and would hide an outline drawn on it
        draw.rectangle([x0 * scale - 1, y0 * scale - 1, x1 * scale, y1 * scale], outline=BOX_COLORS[k % 5])
    for kps in sample.get("keypoints", []):
        for x, y, v in zip(kps[0::3], kps[1::3], kps[2::3]):
            if v > 0:
                draw.ellipse([x * scale - 2, y * scale - 2, x * scale + 2, y * scale + 2], fill=(255, 0, 0))
    chars = max(8, w // 6)
    for i, line in enumerate(textwrap.wrap(sample.get("text", ""), chars)[:text_lines]):
        draw.text((2, h + 2 + i * line_h), line, fill=(0, 0, 0), font=font)
    return tile


def contact_sheet(path: str, num: int = 16, cols: int = 4, scale: int = 3,
                  stats: ReadStats | None = None) -> Image.Image | None:
    """A grid of the first ``num`` readable samples of ``path`` (None if there are none)."""
    tiles = [draw_tile(s, scale) for s in islice(find_samples(path, stats), num)]
    if not tiles:
        return None
    tw, th = max(t.width for t in tiles), max(t.height for t in tiles)
    rows = (len(tiles) + cols - 1) // cols
    sheet = Image.new("RGB", (min(cols, len(tiles)) * (tw + 4) + 4, rows * (th + 4) + 4), (200, 200, 200))
    for k, t in enumerate(tiles):
        sheet.paste(t, (4 + (k % cols) * (tw + 4), 4 + (k // cols) * (th + 4)))
    return sheet
