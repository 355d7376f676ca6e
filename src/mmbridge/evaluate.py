"""Evaluation on the eval JSON-lines format of docs/world.md: VQA accuracy, caption triple F1, ITC retrieval.

VQA is exact match after the official VQA answer normalisation (`data.shapes.metrics`); captions are
scored by the F1 of the (size, color, shape) triples they name; retrieval ranks every caption of the
file against every image with the Q-Former's ITC similarity (image->text and text->image R@1).
All three batch their work and report per question type where the file has types.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from mmbridge.data.shapes.metrics import caption_triple_scores, vqa_match
from mmbridge.processing import load_image
from mmbridge.tokenization import tokenize_qformer_text

CAPTION_PROMPT = "Describe the image."


def _ask(pipeline, records: Sequence[dict], prompts: Sequence[str], batch_size: int, max_new_tokens: int,
         progress: bool, desc: str) -> list[str]:
    answers = []
    for i in tqdm(range(0, len(records), batch_size), desc=desc, disable=not progress, unit="batch"):
        chunk = records[i:i + batch_size]
        conversations = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}]
                         for p in prompts[i:i + batch_size]]
        images = [load_image(r["image_path"]) for r in chunk]  # one per conversation, in order
        results = pipeline.generate(conversations, images=images, max_new_tokens=max_new_tokens, do_sample=False)
        answers += [r.text for r in results]
    return answers


def evaluate_vqa(pipeline, records: Iterable[dict], batch_size: int = 32, max_new_tokens: int = 8,
                 progress: bool = True) -> tuple[dict, list[dict]]:
    records = list(records)
    answers = _ask(pipeline, records, [r["question"] for r in records], batch_size, max_new_tokens, progress, "vqa")
    by_type: dict[str, list[bool]] = defaultdict(list)
    predictions = []
    for rec, answer in zip(records, answers):
        correct = vqa_match(answer, rec["answer"])
        by_type[rec.get("type", "all")].append(correct)
        predictions.append({"id": rec.get("id"), "question": rec["question"], "answer": rec["answer"],
                            "prediction": answer, "correct": correct})
    correct = [p["correct"] for p in predictions]
    summary = {"metric": "vqa_accuracy", "accuracy": _mean(correct), "n": len(correct),
               "per_type": {t: {"accuracy": _mean(v), "n": len(v)} for t, v in sorted(by_type.items())}}
    return summary, predictions


def evaluate_caption(pipeline, records: Iterable[dict], batch_size: int = 32, max_new_tokens: int = 48,
                     progress: bool = True) -> tuple[dict, list[dict]]:
    records = list(records)
    captions = _ask(pipeline, records, [CAPTION_PROMPT] * len(records), batch_size, max_new_tokens, progress,
                    "caption")
    predictions = []
    for rec, caption in zip(records, captions):
        scores = caption_triple_scores(caption, rec["objects"])
        predictions.append({"id": rec.get("id"), "prediction": caption, **scores})
    summary = {"metric": "caption_triple_f1", "f1": _mean([p["f1"] for p in predictions]),
               "precision": _mean([p["precision"] for p in predictions]),
               "recall": _mean([p["recall"] for p in predictions]), "n": len(predictions)}
    return summary, predictions


@torch.no_grad()
def evaluate_retrieval(model, processor, records: Iterable[dict], batch_size: int = 128,
                       progress: bool = True) -> tuple[dict, list[dict]]:
    """Records need `image_path` and `caption` (caption eval files written by `mmbridge data` have both)."""
    records = list(records)
    missing = [r.get("id", i) for i, r in enumerate(records) if not isinstance(r.get("caption"), str)]
    if missing:
        raise ValueError(f"retrieval needs a 'caption' string in every record; missing in {len(missing)} "
                         f"(first: {missing[0]!r})")
    if model.qformer.text is None:
        raise ValueError("this model's Q-Former has no text side (image_text_hidden_size is unset), "
                         "so it cannot do ITC retrieval")
    cls = model.config.qformer_cls_token_id
    image_embeds, text_embeds = [], []
    for i in tqdm(range(0, len(records), batch_size), desc="retrieval", disable=not progress, unit="batch"):
        chunk = records[i:i + batch_size]
        pixels = processor.image_processor([load_image(r["image_path"]) for r in chunk],
                                           return_tensors="pt")["pixel_values"].to(model.dtype)
        image_embeds.append(model.qformer.image_embeds(model.vision(pixels)))
        ids, mask = tokenize_qformer_text(processor.tokenizer, [r["caption"] for r in chunk], cls)
        text_embeds.append(model.qformer.text_embeds(ids, mask))
    texts = [r["caption"] for r in records]
    i2t, t2i, best_text = recall_at_1(model.qformer.similarity(torch.cat(image_embeds), torch.cat(text_embeds)), texts)
    predictions = [{"id": r.get("id"), "retrieved_text": texts[int(best_text[k])], "i2t_correct": bool(i2t[k]),
                    "t2i_correct": bool(t2i[k])} for k, r in enumerate(records)]
    summary = {"metric": "itc_retrieval_r1", "image_to_text_r1": i2t.float().mean().item(),
               "text_to_image_r1": t2i.float().mean().item(), "n": len(records)}
    return summary, predictions


def recall_at_1(sim: torch.Tensor, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-item R@1 hits from an (images, texts) similarity of aligned pairs: (image->text hits,
    text->image hits, best text per image). Identical texts are equally right answers."""
    same_text = torch.tensor([[a == b for b in texts] for a in texts])
    rows = torch.arange(len(texts))
    best_text = sim.argmax(dim=1)
    return same_text[rows, best_text], same_text[sim.argmax(dim=0), rows], best_text


def _mean(values: Sequence) -> float:
    return round(sum(values) / len(values), 4) if values else 0.0


DETECTION_PROMPT = "Find every {category}."


def evaluate_detection(pipeline, coco_path: str, prompt: str = DETECTION_PROMPT, batch_size: int = 16,
                       limit: int | None = None, progress: bool = True) -> tuple[dict, list[dict]]:
    """COCOeval AP of a model with an act head on a COCO file (boxes, and RLE masks where the answer
    has them). Open vocabulary, as the seed: the category is named in the request — one request per
    (image, category) when `prompt` holds `{category}`; otherwise one per image, scored class-agnostic
    (every object and every detection of one category)."""
    import copy

    import numpy as np
    from PIL import Image

    from mmbridge.data.formats.coco import encode_mask, load_coco, read_coco
    from mmbridge.data.formats.coco import evaluate as coco_evaluate
    from mmbridge.generation import DetectionsPart

    routes = [t for h in pipeline.model.config.head_configs.values() for t in h.routes if t in ("[DET]", "[SEG]")]
    if not routes:
        raise ValueError("this model has no act head with a [DET] or [SEG] route: it cannot detect")
    slots = max(len(h.routes[t]) for h in pipeline.model.config.head_configs.values() for t in h.routes)
    dataset = copy.deepcopy(load_coco(coco_path).dataset)
    per_category = "{category}" in prompt
    if not per_category:  # class-agnostic: one category for every object
        dataset["categories"] = [{"id": 1, "name": "object"}]
        for ann in dataset["annotations"]:
            ann["category_id"] = 1
    categories = [(c["id"], c["name"]) for c in dataset["categories"]]
    records = list(read_coco(coco_path, check_images=True))[:limit]
    jobs = [(rec, cat_id, prompt.format(category=name) if per_category else prompt)
            for rec in records for cat_id, name in (categories if per_category else [(1, None)])]
    detections, empty = [], 0
    for i in tqdm(range(0, len(jobs), batch_size), desc="detect", disable=not progress, unit="batch"):
        chunk = jobs[i:i + batch_size]
        conversations = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
                         for _, _, text in chunk]
        results = pipeline.generate(conversations, images=[load_image(rec["path"]) for rec, _, _ in chunk],
                                    max_new_tokens=slots + 4, do_sample=False)
        for (rec, cat_id, _), result in zip(chunk, results):
            parts = [p for p in result.parts if isinstance(p, DetectionsPart)]
            if not parts:
                empty += 1
                continue
            part, (w, h) = parts[0], (rec["width"], rec["height"])
            for k, ((x0, y0, x1, y1), score) in enumerate(zip(part.boxes, part.scores)):
                det = {"image_id": rec["id"], "category_id": cat_id, "score": score,
                       "bbox": [x0 * w, y0 * h, (x1 - x0) * w, (y1 - y0) * h]}
                if part.masks:
                    from pycocotools import mask as mask_utils

                    small = mask_utils.decode({**part.masks[k], "counts": part.masks[k]["counts"].encode()})
                    full = Image.fromarray(small * 255).resize((w, h), Image.NEAREST)
                    det["segmentation"] = encode_mask(np.asarray(full) > 127)
                detections.append(det)
    summary = {"requests": len(jobs), "images": len(records), "requests_without_detections": empty,
               "detections": len(detections), "class_agnostic": not per_category}
    for iou_type in ("bbox", "segm"):
        usable = [d for d in detections if iou_type == "bbox" or "segmentation" in d]
        if usable:
            stats = coco_evaluate(dataset, usable, iou_type)
            summary[f"{iou_type}_ap"], summary[f"{iou_type}_ap50"] = float(stats[0]), float(stats[1])
        else:
            summary[f"{iou_type}_ap"] = summary[f"{iou_type}_ap50"] = 0.0
    return summary, detections


POSE_PROMPT = "Find the pose of every figure."


def pose_results(part, image_id: int, width: int, height: int, category_id: int = 1) -> list[dict]:
    """A `KeypointsPart` (fractions of the image) -> COCO keypoint results in pixels, one per person
    (`keypoints` flat [x, y, score] × K, `score` the person's, `bbox` x y w h)."""
    results = []
    for person, score, box in zip(part.keypoints, part.scores, part.boxes):
        keypoints = [v for x, y, s in person for v in (x * width, y * height, s)]
        x0, y0, x1, y1 = box
        results.append({"image_id": image_id, "category_id": category_id, "score": score, "keypoints": keypoints,
                        "bbox": [x0 * width, y0 * height, (x1 - x0) * width, (y1 - y0) * height]})
    return results


def score_keypoints(coco, results: list[dict], image_ids: Sequence[int] | None = None) -> dict:
    """COCOeval keypoints AP (COCO's per-keypoint sigmas, as the act head's OKS matching) of `results` on a
    COCO file / dict, over `image_ids` (default: every image)."""
    import copy

    from mmbridge.data.formats.coco import evaluate as coco_evaluate
    from mmbridge.data.formats.coco import load_coco
    from mmbridge.modeling.act.keypoints import keypoint_sigmas

    dataset = copy.deepcopy(load_coco(coco).dataset)
    if image_ids is not None:
        wanted = set(image_ids)
        dataset["images"] = [im for im in dataset["images"] if im["id"] in wanted]
        dataset["annotations"] = [a for a in dataset["annotations"] if a["image_id"] in wanted]
    num_keypoints = max((len(a.get("keypoints", [])) // 3 for a in dataset["annotations"]), default=0)
    if not num_keypoints:
        raise ValueError("the COCO file has no keypoint annotations")
    if not results:
        return {"keypoints_ap": 0.0, "keypoints_ap50": 0.0, "keypoints_ap75": 0.0}
    stats = coco_evaluate(dataset, results, "keypoints", kpt_sigmas=keypoint_sigmas(num_keypoints).numpy())
    return {"keypoints_ap": round(float(stats[0]), 4), "keypoints_ap50": round(float(stats[1]), 4),
            "keypoints_ap75": round(float(stats[2]), 4)}


def evaluate_pose(pipeline, coco_path: str, prompt: str = POSE_PROMPT, batch_size: int = 16,
                  limit: int | None = None, progress: bool = True) -> tuple[dict, list[dict]]:
    """COCOeval keypoints AP of a model with an act head's `[POSE]` route on a COCO keypoints file
    (`mmbridge data shapes --format wave2` writes pose/coco_pose_SPLIT.json): one request per image, every
    person of the answer's `KeypointsPart` a result. With `limit`, scored on the first `limit` images."""
    from mmbridge.data.formats.coco import read_coco
    from mmbridge.generation.parts import KeypointsPart

    configs = pipeline.model.config.head_configs.values()
    if not any("[POSE]" in h.routes for h in configs):
        raise ValueError("this model has no act head with a [POSE] route: it cannot find poses")
    slots = max(len(h.routes["[POSE]"]) for h in configs if "[POSE]" in h.routes)
    records = list(read_coco(coco_path, check_images=True))[:limit]
    results, empty = [], 0
    for i in tqdm(range(0, len(records), batch_size), desc="pose", disable=not progress, unit="batch"):
        chunk = records[i:i + batch_size]
        conversations = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
                         for _ in chunk]
        answers = pipeline.generate(conversations, images=[load_image(rec["path"]) for rec in chunk],
                                    max_new_tokens=slots + 4, do_sample=False)
        for rec, answer in zip(chunk, answers):
            parts = [p for p in answer.parts if isinstance(p, KeypointsPart)]
            if not parts or not parts[0].keypoints:
                empty += 1
                continue
            results += pose_results(parts[0], rec["id"], rec["width"], rec["height"])
    summary = {"images": len(records), "requests_without_keypoints": empty, "people": len(results),
               **score_keypoints(coco_path, results, [rec["id"] for rec in records])}
    return summary, results
