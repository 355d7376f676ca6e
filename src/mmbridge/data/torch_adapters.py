"""Optional torch adapters — the only place in ``mmbridge.data`` that imports torch.

``ShapesWorldDataset`` (map-style) needs no adapter: a ``DataLoader`` takes any object with
``__len__``/``__getitem__``.  Shards need one, because a ``DataLoader`` only treats subclasses of
``IterableDataset`` as streams, and each worker must read its own shards.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.utils.data as tud

from .formats.common import ReadStats
from .formats.webdataset import expand_urls, iter_shards


class ShardIterableDataset(tud.IterableDataset):
    """Samples of webdataset shards (see ``iter_shards``), ``transform`` applied to each.  With
    ``num_workers > 0`` every worker reads a disjoint slice of the shards; corrupt samples are
    skipped and counted in ``self.stats`` (per process)."""

    def __init__(self, urls, transform: Callable | None = None, require: tuple[str, ...] = ("image",)):
        self.urls = expand_urls(urls)
        self.transform, self.require = transform, require
        self.stats = ReadStats()

    def __iter__(self):
        urls = self.urls
        info = tud.get_worker_info()
        if info is not None:
            urls = urls[info.id::info.num_workers]
        for sample in iter_shards(urls, self.stats, require=self.require):
            yield self.transform(sample) if self.transform else sample
