"""COCO JSON: boxes, RLE instance masks and keypoints, loadable by ``pycocotools.coco.COCO`` and
scorable with ``COCOeval``.  ``file_name`` is relative to an image root the user names (COCO's
convention); our writer makes it relative to the JSON file's directory, the reader's default root.
Extra per-annotation attributes (ShapesWorld's ``color``, ``size``) ride along as plain keys, which
pycocotools keeps and ignores.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from collections.abc import Iterator

import numpy as np
from pycocotools import mask as mask_utils

from .common import ReadStats


def encode_mask(mask: np.ndarray) -> dict:
    """Binary HxW mask → COCO RLE with ``counts`` as str (JSON-safe)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def decode_mask(segmentation, height: int, width: int) -> np.ndarray:
    """Any COCO segmentation (RLE, uncompressed RLE or polygons) → HxW bool mask."""
    if isinstance(segmentation, list):  # polygons
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = dict(segmentation, counts=segmentation["counts"].encode() if isinstance(segmentation["counts"], str)
                   else segmentation["counts"])
    with warnings.catch_warnings():  # pycocotools' numpy-2 DeprecationWarning about __array__(copy=)
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle).astype(bool)


class CocoBuilder:
    """Accumulates images, annotations and categories; ``save`` writes the JSON."""

    def __init__(self, categories: list[dict], info: dict | None = None):
        self.categories = categories
        self._cat_id = {c["name"]: c["id"] for c in categories}
        self.images: list[dict] = []
        self.annotations: list[dict] = []
        self.info = info or {}

    def add_image(self, file_name: str, width: int, height: int, **extra) -> int:
        image_id = len(self.images) + 1  # COCO ids start at 1
        self.images.append({"id": image_id, "file_name": file_name, "width": width, "height": height, **extra})
        return image_id

    def add_annotation(self, image_id: int, category: str, bbox_xyxy, mask: np.ndarray | None = None,
                       rle: dict | None = None, keypoints: list[float] | None = None, **extra) -> int:
        x0, y0, x1, y1 = (float(v) for v in bbox_xyxy)
        ann = {"id": len(self.annotations) + 1, "image_id": image_id, "category_id": self._cat_id[category],
               "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0}
        if mask is not None and rle is None:
            rle = encode_mask(mask)
        if rle is not None:
            ann["segmentation"] = rle
            ann["area"] = float(mask_utils.area(dict(rle, counts=rle["counts"].encode())))
        else:
            ann["area"] = (x1 - x0) * (y1 - y0)
        if keypoints is not None:
            ann["keypoints"] = keypoints
            ann["num_keypoints"] = sum(1 for v in keypoints[2::3] if v > 0)
        ann.update(extra)
        self.annotations.append(ann)
        return ann["id"]

    def to_dict(self) -> dict:
        return {"info": self.info, "images": self.images, "annotations": self.annotations,
                "categories": self.categories}

    def save(self, path: str) -> str:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(self.to_dict(), f, separators=(",", ":"))
        os.replace(path + ".tmp", path)
        return path


def load_coco(path_or_dict):
    """``pycocotools.coco.COCO`` from a path or a dict, without its progress prints."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        if isinstance(path_or_dict, dict):
            coco = COCO()
            coco.dataset = path_or_dict
            coco.createIndex()
            return coco
        return COCO(path_or_dict)


def read_coco(path: str, image_root: str | None = None, stats: ReadStats | None = None,
              check_images: bool = False, decode_masks: bool = False) -> Iterator[dict]:
    """Yield one record per image: ``{"id", "file_name", "path", "width", "height",
    "annotations": [{…the COCO annotation…, "category": name, "bbox_xyxy", "mask"?}]}``.
    Annotations with an unknown category or a broken box/segmentation are skipped and counted; with
    ``check_images`` so are images that are missing or fail to decode."""
    from PIL import Image

    stats = stats if stats is not None else ReadStats()
    coco = load_coco(path)
    root = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
    names = {c["id"]: c["name"] for c in coco.dataset.get("categories", [])}
    for image_id in sorted(coco.imgs):
        img = coco.imgs[image_id]
        full = os.path.join(root, img["file_name"])
        if check_images:
            try:
                with Image.open(full) as im:
                    im.load()
            except Exception as err:  # noqa: BLE001 — missing or corrupt image file
                stats.skip("bad image", f"{full}: {err}")
                continue
        anns = []
        for ann in coco.imgToAnns.get(image_id, []):
            try:
                x, y, w, h = (float(v) for v in ann["bbox"])
                rec = dict(ann, category=names[ann["category_id"]], bbox_xyxy=[x, y, x + w, y + h])
                if decode_masks and "segmentation" in ann:
                    rec["mask"] = decode_mask(ann["segmentation"], img["height"], img["width"])
            except Exception as err:  # noqa: BLE001 — one broken annotation must not stop the rest
                stats.skip("bad annotation", f"ann {ann.get('id')}: {err}")
                continue
            anns.append(rec)
        stats.read += 1
        extra = {k: v for k, v in img.items() if k not in ("id", "file_name", "width", "height")}
        yield {"id": image_id, "file_name": img["file_name"], "path": full, "width": img["width"],
               "height": img["height"], "annotations": anns, "extra": extra}


def evaluate(gt, detections: list[dict], iou_type: str = "bbox", kpt_sigmas=None) -> np.ndarray:
    """COCOeval summary stats (12 numbers for bbox/segm, 10 for keypoints; ``[0]`` is AP@[.5:.95]).
    ``detections``: COCO result dicts (``image_id``, ``category_id``, ``bbox``/``segmentation``/
    ``keypoints``, ``score``); left as they were (pycocotools rewrites the dicts it is given — ids, areas,
    RLE counts as bytes — which made the callers' predictions unwritable as JSON)."""
    import copy

    from pycocotools.cocoeval import COCOeval

    gt = gt if not isinstance(gt, (str, dict)) else load_coco(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(copy.deepcopy(detections))
        ev = COCOeval(gt, dt, iou_type)
        if kpt_sigmas is not None:
            ev.params.kpt_oks_sigmas = np.asarray(kpt_sigmas)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def gt_as_detections(coco, iou_type: str = "bbox") -> list[dict]:
    """The ground truth as detections with score 1 (a sanity check: they must score AP = 1)."""
    field = {"bbox": "bbox", "segm": "segmentation", "keypoints": "keypoints"}[iou_type]
    out = []
    for ann in coco.dataset["annotations"]:
        det = {"image_id": ann["image_id"], "category_id": ann["category_id"], "score": 1.0, field: ann[field]}
        if iou_type == "keypoints":
            det["bbox"] = ann["bbox"]
        out.append(det)
    return out
