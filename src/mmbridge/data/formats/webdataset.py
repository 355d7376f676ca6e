"""webdataset tar shards: ``key.png`` (or .jpg/.webp) + ``key.txt`` + ``key.json`` per sample — the
layout MiniGPT-4's stage 1 reads LAION/CC from, so users' real shards work here too.

Writing uses the stdlib ``tarfile`` (importing ``webdataset`` pulls in torch; the data package must
not need it) with the member naming ``webdataset.TarWriter`` uses.  Reading comes in
two flavours: :func:`iter_shards` (stdlib only, skips and counts corrupt samples) and
:func:`webdataset_pipeline` (the ``webdataset`` library, with the same counting handler).
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import tarfile
from collections.abc import Iterable, Iterator

from PIL import Image

from .common import ReadStats

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm")
TEXT_EXTS = ("txt", "text", "caption")
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's rule: the key ends at the first dot


# ----------------------------------------------------------------------------------------------
# writing


class ShardWriter:
    """Write samples (``{"__key__": str, "png": bytes, "txt": str, "json": dict, …}``) into shards
    named ``pattern % shard_index`` with at most ``maxcount`` samples each.  A shard is written to a
    temporary name and renamed when complete, so an interrupted run never leaves a truncated shard
    that looks finished."""

    def __init__(self, pattern: str, maxcount: int = 1000):
        self.pattern, self.maxcount = pattern, maxcount
        self.shards: list[str] = []
        self._tar: tarfile.TarFile | None = None
        self._count = 0

    def _open(self) -> None:
        path = self.pattern % len(self.shards)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.shards.append(path)
        self._tar = tarfile.open(path + ".tmp", "w", format=tarfile.USTAR_FORMAT)
        self._count = 0

    def _close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            os.replace(self.shards[-1] + ".tmp", self.shards[-1])
            self._tar = None

    def write(self, sample: dict) -> None:
        key = sample["__key__"]
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        if self._tar is None or self._count >= self.maxcount:
            self._close()
            self._open()
        for ext, value in sample.items():
            if ext.startswith("__"):
                continue
            data = _encode(ext, value)
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444  # fixed metadata: reproducible shards
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1

    def close(self) -> list[str]:
        self._close()
        return self.shards

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _encode(ext: str, value) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, Image.Image):
        buf = io.BytesIO()
        value.save(buf, format="JPEG" if ext in ("jpg", "jpeg") else ext.upper())
        return buf.getvalue()
    if ext == "json":
        return json.dumps(value, separators=(",", ":")).encode()
    return str(value).encode()


def write_shards(samples: Iterable[dict], pattern: str, maxcount: int = 1000) -> list[str]:
    with ShardWriter(pattern, maxcount) as writer:
        for sample in samples:
            writer.write(sample)
    return writer.shards


# ----------------------------------------------------------------------------------------------
# reading


def expand_urls(urls: str | os.PathLike | Iterable) -> list[str]:
    """Shard paths from a list, a directory (its ``*.tar``), a glob, or a brace pattern
    (``shards-{000000..000009}.tar``, the webdataset notation)."""
    if not isinstance(urls, (str, os.PathLike)):
        return [p for u in urls for p in expand_urls(u)]
    url = os.fspath(urls)
    if os.path.isdir(url):
        return sorted(glob.glob(os.path.join(url, "*.tar")) + glob.glob(os.path.join(url, "*.tar.gz")))
    if "{" in url:
        import braceexpand  # a dependency of webdataset, tiny and torch-free

        return list(braceexpand.braceexpand(url))
    if any(c in url for c in "*?["):
        return sorted(glob.glob(url))
    return [url]


def decode_member(ext: str, data: bytes):
    """Decode one member by extension; raises on corrupt data (the caller skips the sample)."""
    ext = ext.lower().rsplit(".", 1)[-1]
    if ext in IMAGE_EXTS:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # forces the full decode: a truncated file fails here, not later in training
            return img.convert("RGB")
    if ext == "json":
        return json.loads(data.decode("utf-8"))
    if ext in TEXT_EXTS:
        return data.decode("utf-8")
    if ext == "cls":
        return int(data.decode().strip())
    return data


class _CheckedTarInfo(tarfile.TarInfo):
    """Marks the archive when it ends without the end-of-archive blocks: tarfile silently treats a
    file cut at a header boundary as finished, which would let a truncated shard pass as whole."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError):
            tar.truncated = True
            raise


def _group(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Consecutive members with the same key form a sample (the webdataset convention)."""
    key, members = None, {}
    for info in tar:
        if not info.isfile():
            continue
        m = _KEY.match(info.name)
        if not m:
            continue
        k, ext = m[1], m[2].lower()
        if k != key and members:
            yield key, members
            members = {}
        key = k
        members[ext] = tar.extractfile(info).read()
    if members:
        yield key, members


def _samples(url: str, stats: ReadStats) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Raw samples of one shard.  A shard that breaks off mid-way yields what came before; the
    sample at the break (possibly missing members) is dropped and the truncation counted."""
    pending = None
    try:
        with tarfile.open(url, "r|*", tarinfo=_CheckedTarInfo) as tar:
            for sample in _group(tar):
                if pending is not None:
                    yield pending
                pending = sample
            if getattr(tar, "truncated", False):
                stats.skip("truncated shard", url)
            elif pending is not None:
                yield pending
    except (OSError, EOFError, tarfile.TarError) as err:
        stats.skip("truncated shard" if pending is not None else "unreadable shard", f"{url}: {err}")


def iter_shards(urls, stats: ReadStats | None = None, decode: bool = True,
                require: tuple[str, ...] = ("image",)) -> Iterator[dict]:
    """Stream samples from shards as ``{"__key__", "__url__", "image", "text", "json", <ext>: …}``
    (``image``/``text`` are the first image/text member whatever its extension).  A sample with a
    member that fails to decode (truncated image, bad JSON, bad UTF-8) or without the ``require``d
    fields is skipped and counted in ``stats``; so is the sample at which a truncated shard breaks
    off, and an unreadable shard is counted and the next one read."""
    stats = stats if stats is not None else ReadStats()
    for url in expand_urls(urls):
        for key, members in _samples(url, stats):
            sample = {"__key__": key, "__url__": url}
            try:
                for ext, data in members.items():
                    sample[ext] = decode_member(ext, data) if decode else data
            except Exception as err:  # noqa: BLE001 — any decoder failure means a corrupt sample
                stats.skip(f"bad {ext}", f"{url}:{key}: {err}")
                continue
            for ext in members:
                base = ext.rsplit(".", 1)[-1]
                if base in IMAGE_EXTS:
                    sample.setdefault("image", sample[ext])
                elif base in TEXT_EXTS:
                    sample.setdefault("text", sample[ext])
            sample.setdefault("text", None)
            sample.setdefault("json", None)
            missing = [r for r in require if sample.get(r) is None]
            if missing:
                stats.skip(f"missing {missing[0]}", f"{url}:{key}")
                continue
            stats.read += 1
            yield sample


def webdataset_pipeline(urls, stats: ReadStats | None = None, shuffle: int = 0,
                        fields: tuple[str, ...] = ("png;jpg;jpeg;webp", "txt;text;caption", "json")):
    """The same shards through the ``webdataset`` library: yields tuples of ``fields`` (default
    image, text, json); corrupt samples go to ``stats.handler`` (counted, skipped).  Imports torch
    (webdataset does)."""
    import webdataset as wds

    stats = stats if stats is not None else ReadStats()
    ds = wds.WebDataset(expand_urls(urls), handler=stats.handler, shardshuffle=False, empty_check=False)
    if shuffle:
        ds = ds.shuffle(shuffle)
    return ds.decode("pil", handler=stats.handler).to_tuple(*fields, handler=stats.handler)
