"""Evaluation of the act head beyond COCO AP (`evaluate.evaluate_detection` scores detect / segment):

* grounding — accuracy at IoU >= 0.5 of the one box a `[GRD]` answer returns for a referring expression;
* region VQA — exact-match accuracy (VQA normalisation) of answers about a marked region ("What color is
  <region>?");
* routing — whether the answer starts the right route (`[DET]`, `[SEG]`, `[GRD]`, or none: a text answer)
  for requests in phrasings the training never used.

Each reads a JSON-lines file (`data.shapes.act_eval.write_act_eval` writes them; formats in docs/recipe.md, "Act")
with images relative to the file, and returns `(summary, predictions)`.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from collections.abc import Sequence

from tqdm.auto import tqdm

from mmbridge.data.shapes.metrics import vqa_match
from mmbridge.processing import check_region, load_image

REGION_TAG = "<region>"
GROUND_PROMPT = "Find {expression}."
ACT_TRIGGERS = ("[DET]", "[SEG]", "[GRD]", "[POSE]", "[GEN]", "[EDIT]")


def read_act_jsonl(path: str, required: Sequence[str]) -> tuple[list[dict], dict]:
    """Records with every key in `required` and an existing image (`image_path` added, absolute); the others
    are skipped and counted by reason."""
    root = os.path.dirname(os.path.abspath(path))
    records, skipped = [], Counter()
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                skipped["bad json"] += 1
                continue
            if not isinstance(rec, dict) or any(key not in rec for key in required):
                skipped["missing keys"] += 1
                continue
            image_path = os.path.join(root, rec["image"])
            if not os.path.isfile(image_path):
                skipped["missing image"] += 1
                continue
            records.append({**rec, "image_path": image_path})
    return records, dict(skipped)


def request_content(text: str, region: dict | None = None) -> list[dict]:
    """A user turn about one image: the image, then the text with the region part where `<region>` stands."""
    content: list[dict] = [{"type": "image"}]
    pieces = text.split(REGION_TAG)
    if len(pieces) - 1 != (region is not None):
        raise ValueError(f"{text!r}: one {REGION_TAG} per request, and a region for it")
    for k, piece in enumerate(pieces):
        if k:
            content.append({"type": "region", **region})
        if piece:
            content.append({"type": "text", "text": piece})
    return content


def _answers(pipeline, records: Sequence[dict], texts: Sequence[str], regions: Sequence[dict | None],
             batch_size: int, max_new_tokens: int, progress: bool, desc: str) -> list:
    results = []
    for i in tqdm(range(0, len(records), batch_size), desc=desc, disable=not progress, unit="batch"):
        chunk = range(i, min(i + batch_size, len(records)))
        conversations = [[{"role": "user", "content": request_content(texts[k], regions[k])}] for k in chunk]
        images = [load_image(records[k]["image_path"]) for k in chunk]
        results += pipeline.generate(conversations, images=images, max_new_tokens=max_new_tokens, do_sample=False)
    return results


def _routes(pipeline, wanted: Sequence[str]) -> dict[str, int]:
    """The model's routes among `wanted`: trigger -> number of its slot tokens."""
    return {t: len(s) for h in pipeline.model.config.head_configs.values() for t, s in h.routes.items()
            if t in wanted}


def _mean(values) -> float:
    values = list(values)
    return round(sum(values) / len(values), 4) if values else 0.0


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two (x0, y0, x1, y1) boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def evaluate_grounding(pipeline, records: Sequence[dict], prompt: str = GROUND_PROMPT, batch_size: int = 16,
                       progress: bool = True) -> tuple[dict, list[dict]]:
    """Accuracy at IoU >= 0.5: per record (`image_path`, `expression`, `box` in pixels, `width`, `height`) the
    request `prompt` with the expression; the answer's first `[GRD]` detection (its best box) is compared
    with `box`. An answer without one counts as a miss (`no_box`)."""
    from mmbridge.generation import DetectionsPart

    routes = _routes(pipeline, ("[GRD]",))
    if not routes:
        raise ValueError("this model has no act head with a [GRD] route: it cannot ground expressions")
    texts = [prompt.format(expression=r["expression"]) for r in records]
    results = _answers(pipeline, records, texts, [None] * len(records), batch_size, routes["[GRD]"] + 4,
                       progress, "ground")
    predictions, by_kind = [], defaultdict(list)
    for rec, text, result in zip(records, texts, results):
        parts = [p for p in result.parts if isinstance(p, DetectionsPart) and p.route == "[GRD]" and p.boxes]
        w, h = rec.get("width"), rec.get("height")
        if w is None or h is None:
            w, h = load_image(rec["image_path"]).size
        truth = [rec["box"][0] / w, rec["box"][1] / h, rec["box"][2] / w, rec["box"][3] / h]
        iou = box_iou(parts[0].boxes[0], truth) if parts else 0.0
        hit = iou >= 0.5
        by_kind["relational" if rec.get("relational") else "plain"].append(hit)
        predictions.append({"id": rec.get("id"), "request": text, "box": rec["box"],
                            "predicted": [round(v * s, 2) for v, s in zip(parts[0].boxes[0], (w, h, w, h))]
                            if parts else None, "iou": round(iou, 4), "correct": hit})
    summary = {"metric": "grounding_acc@0.5", "accuracy": _mean(p["correct"] for p in predictions),
               "mean_iou": _mean(p["iou"] for p in predictions), "n": len(predictions),
               "no_box": sum(p["predicted"] is None for p in predictions),
               "per_kind": {k: {"accuracy": _mean(v), "n": len(v)} for k, v in sorted(by_kind.items())}}
    return summary, predictions


def evaluate_region(pipeline, records: Sequence[dict], batch_size: int = 16, max_new_tokens: int = 8,
                    progress: bool = True) -> tuple[dict, list[dict]]:
    """Region VQA accuracy: per record (`image_path`, `question` with `<region>`, `region` — a box / point /
    scribble / mask in fractions of the image — and `answer`) the model's answer, matched as VQA answers are."""
    if not pipeline.processor.region_token:
        raise ValueError("this model reads no visual prompts (no act head with a region encoder)")
    for rec in records:
        check_region(rec["region"], f"record {rec.get('id')}")
    results = _answers(pipeline, records, [r["question"] for r in records], [r["region"] for r in records],
                       batch_size, max_new_tokens, progress, "region")
    predictions, by_type = [], defaultdict(list)
    for rec, result in zip(records, results):
        correct = vqa_match(result.text, rec["answer"])
        by_type[rec.get("type", "all")].append(correct)
        predictions.append({"id": rec.get("id"), "question": rec["question"], "answer": rec["answer"],
                            "prediction": result.text, "correct": correct})
    summary = {"metric": "region_vqa_accuracy", "accuracy": _mean(p["correct"] for p in predictions),
               "n": len(predictions),
               "per_type": {t: {"accuracy": _mean(v), "n": len(v)} for t, v in sorted(by_type.items())}}
    return summary, predictions


def answer_route(result, triggers: dict[int, str]) -> str | None:
    """The first routing token an answer wrote (None: a text answer)."""
    for token in result.token_ids:
        if token in triggers:
            return triggers[token]
    return None


def evaluate_routing(pipeline, records: Sequence[dict], batch_size: int = 16,
                     progress: bool = True) -> tuple[dict, list[dict]]:
    """Routing accuracy: per record (`image_path`, `request`, `route`: the expected routing token or null for
    a text answer, `task`, `region`?) whether the answer's first routing token is `route`."""
    tokenizer = pipeline.processor.tokenizer
    routes = _routes(pipeline, ACT_TRIGGERS)
    if not routes:
        raise ValueError("this model has no act head: it has no routes to choose")
    triggers = {tokenizer.convert_tokens_to_ids(t): t for t in routes}
    # room for a routing token and its forced queries (a route cut short of them still counts as chosen)
    results = _answers(pipeline, records, [r["request"] for r in records], [r.get("region") for r in records],
                       batch_size, max(routes.values()) + 3, progress, "route")
    predictions, by_task, confusion = [], defaultdict(list), defaultdict(Counter)
    for rec, result in zip(records, results):
        got = answer_route(result, triggers)
        correct = got == rec["route"]
        by_task[rec.get("task", "all")].append(correct)
        confusion[str(rec["route"])][str(got)] += 1
        predictions.append({"id": rec.get("id"), "request": rec["request"], "route": rec["route"], "predicted": got,
                            "answer": result.raw_text, "correct": correct})
    summary = {"metric": "routing_accuracy", "accuracy": _mean(p["correct"] for p in predictions),
               "n": len(predictions),
               "per_task": {t: {"accuracy": _mean(v), "n": len(v)} for t, v in sorted(by_task.items())},
               "confusion": {k: dict(v) for k, v in sorted(confusion.items())}}
    return summary, predictions
