"""LLaVA instruction data: ``[{"id", "image", "conversations": [{"from": "human", "value":
"<image>\\n…"}, {"from": "gpt", "value": "…"}, …]}, …]`` (a JSON array; JSON lines also read).

``image`` is relative to an image folder the user names (LLaVA's ``--image_folder``); our writer
makes it relative to the JSON file's directory, the default folder of the reader.  Records without
``image`` are text-only turns, as in LLaVA's mixes.  mmbridge's extensions: ``"regions"`` (visual
prompts filling ``<region>`` tags, see `to_messages`), ``"captions"`` (one text per ``<image>`` in the
answers — an image the model draws — saying what it shows: the draw head's caption target) and
``"targets"`` (what an output head must return for each routing token an answer writes;
docs/architecture.md, "How to add an output head").
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator

from .common import ReadStats

IMAGE_TOKEN = "<image>"
REGION_TOKEN = "<region>"  # a visual prompt in a human turn: the record's next entry of "regions"
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def to_llava(record_id: str, image: str | None, messages: list[dict]) -> dict:
    """A LLaVA record from chat messages (``{"role", "content"}``, content as text); ``<image>`` goes
    in front of the first user turn when there is an image."""
    conv = []
    for i, m in enumerate(messages):
        text = m["content"]
        if i == 0 and image is not None and IMAGE_TOKEN not in text:
            text = f"{IMAGE_TOKEN}\n{text}"
        conv.append({"from": "human" if m["role"] == "user" else "gpt", "value": text})
    rec = {"id": record_id}
    if image is not None:
        rec["image"] = image
    rec["conversations"] = conv
    return rec


def write_llava(records: Iterable[dict], path: str) -> int:
    records = list(records)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(records, f, separators=(",", ":"))
    os.replace(path + ".tmp", path)
    return len(records)


def to_messages(conversations: list[dict], regions: list[dict] | None = None) -> list[dict]:
    """LLaVA turns → chat messages with content parts (``{"type": "image"}`` where ``<image>`` was,
    ``{"type": "text", "text": …}``), the transformers processor convention.

    ``regions`` (a record's optional ``"regions"``: visual prompts, each ``{"box" | "point" | "scribble" |
    "mask": …}`` in fractions of the image) fill the ``<region>`` tags of human turns in order, as
    ``{"type": "region", …}`` parts; a tag without a region left is an error."""
    out = []
    pending = list(regions or [])
    for turn in conversations:
        role = _ROLES[turn["from"]]
        text = turn["value"]
        parts: list[dict] = []
        pieces = text.split(IMAGE_TOKEN)
        for k, piece in enumerate(pieces):
            if k:
                parts.append({"type": "image"})
            piece = piece.strip("\n") if len(pieces) > 1 else piece
            if regions is not None and role == "user" and REGION_TOKEN in piece:
                for n, chunk in enumerate(piece.split(REGION_TOKEN)):
                    if n:
                        if not pending:
                            raise ValueError(f"more {REGION_TOKEN} tags than regions in the record")
                        parts.append({"type": "region", **pending.pop(0)})
                    if chunk:
                        parts.append({"type": "text", "text": chunk})
            elif piece:
                parts.append({"type": "text", "text": piece})
        out.append({"role": role, "content": parts})
    if pending:
        raise ValueError(f"{len(pending)} region(s) in the record but no {REGION_TOKEN} tag left for them")
    return out


def load_records(path: str) -> tuple[list, ReadStats]:
    """The records of a LLaVA file (a JSON array, or JSON lines where one bad line costs one record)."""
    stats = ReadStats()
    with open(path, encoding="utf-8") as f:
        head = f.read(1)
        while head.isspace():
            head = f.read(1)
        f.seek(0)
        if head == "[":
            return json.load(f), stats
        rows = []
        for n, line in enumerate(f, 1):  # JSON lines: one bad line costs one record
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    stats.skip("bad json", f"line {n}: {err}")
        return rows, stats


def record_problem(rec) -> str | None:
    """Why a record cannot be used (None when it can)."""
    if not isinstance(rec, dict) or not isinstance(rec.get("conversations"), list) or not rec["conversations"]:
        return "no conversations"
    for turn in rec["conversations"]:
        if not isinstance(turn, dict) or turn.get("from") not in _ROLES or not isinstance(turn.get("value"), str):
            return "bad turn"
    if "image" in rec and not isinstance(rec["image"], str):
        return "bad image field"
    return None


def read_llava(path: str, image_folder: str | None = None, stats: ReadStats | None = None,
               check_images: bool = False) -> Iterator[dict]:
    """Yield ``{"id", "image" (absolute path or None), "conversations" (as in the file),
    "messages" (content parts)}``; malformed records — and, with ``check_images``, records whose
    image is missing or undecodable — are skipped and counted in ``stats``."""
    from PIL import Image

    stats = stats if stats is not None else ReadStats()
    rows, load_stats = load_records(path)
    stats.skipped += load_stats.skipped
    stats.reasons.update(load_stats.reasons)
    folder = image_folder if image_folder is not None else os.path.dirname(os.path.abspath(path))
    for n, rec in enumerate(rows):
        problem = record_problem(rec)
        if problem:
            stats.skip(problem, f"record {n}")
            continue
        image = os.path.join(folder, rec["image"]) if rec.get("image") else None
        if image and check_images:
            try:
                with Image.open(image) as img:
                    img.load()
            except Exception as err:  # noqa: BLE001 — missing or corrupt file: skip the record
                stats.skip("bad image", f"{image}: {err}")
                continue
        stats.read += 1
        yield {"id": rec.get("id", str(n)), "image": image, "conversations": rec["conversations"],
               "messages": to_messages(rec["conversations"])}
