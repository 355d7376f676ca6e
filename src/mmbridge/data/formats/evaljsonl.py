"""The eval JSON-lines format of docs/world.md (what ``mmbridge eval vqa|caption`` reads).

VQA:     ``{"image": "images/0001.png", "question": "…", "answer": "red"}``
caption: ``{"image": "…", "objects": [{"shape": "circle", "color": "red", "size": "small"}, …]}``
Image paths are relative to the JSONL file.  Extra keys (``id``, ``type``) are allowed and kept.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator

from .common import ReadStats

REQUIRED = {"vqa": ("image", "question", "answer"), "caption": ("image", "objects")}


def write_jsonl(records: Iterable[dict], path: str) -> int:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    n = 0
    with open(path + ".tmp", "w") as f:
        for rec in records:
            f.write(json.dumps(rec, separators=(",", ":")) + "\n")
            n += 1
    os.replace(path + ".tmp", path)
    return n


def _kind(rec: dict) -> str | None:
    for kind, keys in REQUIRED.items():
        if all(k in rec for k in keys):
            return kind
    return None


def read_eval_jsonl(path: str, kind: str | None = None, stats: ReadStats | None = None,
                    check_images: bool = False) -> Iterator[dict]:
    """Yield the records of an eval file with ``image_path`` (absolute) added and ``kind``
    ("vqa" / "caption") detected unless given.  Lines that are not JSON objects, lack the required
    keys or have malformed objects are skipped and counted (as are missing images with
    ``check_images``)."""
    stats = stats if stats is not None else ReadStats()
    root = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                stats.skip("bad json", f"line {n}: {err}")
                continue
            found = _kind(rec) if isinstance(rec, dict) else None
            if found is None or (kind is not None and found != kind):
                stats.skip("missing keys", f"line {n}")
                continue
            if found == "caption" and not all(
                    isinstance(o, dict) and {"shape", "color", "size"} <= o.keys() for o in rec["objects"]):
                stats.skip("bad objects", f"line {n}")
                continue
            image_path = os.path.join(root, rec["image"])
            if check_images and not os.path.isfile(image_path):
                stats.skip("missing image", image_path)
                continue
            stats.read += 1
            yield dict(rec, kind=found, image_path=image_path)
