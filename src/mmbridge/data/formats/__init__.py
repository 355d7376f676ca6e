"""Writers and readers for the ecosystem's data formats: webdataset shards, LLaVA conversation
JSON, COCO JSON and the eval JSON lines of docs/world.md.  Readers skip and count bad samples."""

from .coco import CocoBuilder, decode_mask, encode_mask, load_coco, read_coco
from .common import ReadStats
from .evaljsonl import read_eval_jsonl, write_jsonl
from .llava import read_llava, to_llava, to_messages, write_llava
from .webdataset import ShardWriter, expand_urls, iter_shards, webdataset_pipeline, write_shards

__all__ = ["CocoBuilder", "ReadStats", "ShardWriter", "decode_mask", "encode_mask", "expand_urls",
           "iter_shards", "load_coco", "read_coco", "read_eval_jsonl", "read_llava", "to_llava",
           "to_messages", "webdataset_pipeline", "write_jsonl", "write_llava", "write_shards"]
