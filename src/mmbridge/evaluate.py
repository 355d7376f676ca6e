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
         progress: bool, desc: str, blind: bool = False) -> list[str]:
    """Greedy answers to one prompt per record about its image (`image_path`, or `image`: e.g. a PIL image);
    `blind` leaves the image out of the prompt (the question-only baseline)."""
    answers = []
    image_part = [] if blind else [{"type": "image"}]
    for i in tqdm(range(0, len(records), batch_size), desc=desc, disable=not progress, unit="batch"):
        chunk = records[i:i + batch_size]
        conversations = [[{"role": "user", "content": [*image_part, {"type": "text", "text": p}]}]
                         for p in prompts[i:i + batch_size]]
        # one per conversation, in order
        images = None if blind else [load_image(r["image_path"] if "image_path" in r else r["image"]) for r in chunk]
        results = pipeline.generate(conversations, images=images, max_new_tokens=max_new_tokens, do_sample=False)
        answers += [r.text for r in results]
    return answers


def evaluate_vqa(pipeline, records: Iterable[dict], batch_size: int = 32, max_new_tokens: int = 8,
                 progress: bool = True, blind: bool = False) -> tuple[dict, list[dict]]:
    """VQA accuracy overall and per type. `blind`: the question alone, no image in the prompt — how much a
    model answers from the question (answer priors), the baseline that shows what the image adds."""
    records = list(records)
    answers = _ask(pipeline, records, [r["question"] for r in records], batch_size, max_new_tokens, progress, "vqa",
                   blind=blind)
    by_type: dict[str, list[bool]] = defaultdict(list)
    predictions = []
    for rec, answer in zip(records, answers):
        correct = vqa_match(answer, rec["answer"])
        by_type[rec.get("type", "all")].append(correct)
        predictions.append({"id": rec.get("id"), "question": rec["question"], "answer": rec["answer"],
                            "prediction": answer, "correct": correct})
    correct = [p["correct"] for p in predictions]
    summary = {"metric": "vqa_accuracy", **({"blind": True} if blind else {}), "accuracy": _mean(correct),
               "n": len(correct),
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
    (every object and every detection of one category). With `limit`, scored on the first `limit` images."""
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
    if limit is not None:  # scored against the images asked about: the rest would count as missed objects
        asked = {rec["id"] for rec in records}
        dataset["images"] = [image for image in dataset["images"] if image["id"] in asked]
        dataset["annotations"] = [a for a in dataset["annotations"] if a["image_id"] in asked]
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
    summary["f1_by_threshold"] = f1_by_threshold(dataset, detections)
    summary["best_f1_threshold"] = max(summary["f1_by_threshold"], key=summary["f1_by_threshold"].get)
    for iou_type in ("bbox", "segm"):
        usable = [d for d in detections if iou_type == "bbox" or "segmentation" in d]
        if usable:
            stats = coco_evaluate(dataset, usable, iou_type)
            summary[f"{iou_type}_ap"], summary[f"{iou_type}_ap50"] = float(stats[0]), float(stats[1])
        else:
            summary[f"{iou_type}_ap"] = summary[f"{iou_type}_ap50"] = 0.0
    return summary, detections


#: Score thresholds `f1_by_threshold` tries (a head's serving `score_threshold` is chosen among them).
F1_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 19))


def f1_by_threshold(dataset: dict, detections: Sequence[dict], thresholds: Sequence[float] = F1_THRESHOLDS,
                    iou: float = 0.5) -> dict[float, float]:
    """F1 of the detections scoring >= t, per threshold t: what a user who keeps only those sees. AP integrates
    over scores and cannot choose the cut a server applies; this does (the best F1 on val scenes is the head's
    `score_threshold`). A detection is right when it takes a same-category ground-truth box at IoU >= `iou`,
    greedily by score, each box once (COCOeval's matching, without its crowd and area rules)."""
    from mmbridge.evaluate_act import box_iou

    truth = defaultdict(list)
    for ann in dataset["annotations"]:
        x, y, w, h = ann["bbox"]
        truth[ann["image_id"], ann["category_id"]].append((x, y, x + w, y + h))
    ranked = defaultdict(list)
    for det in sorted(detections, key=lambda d: -d["score"]):
        x, y, w, h = det["bbox"]
        ranked[det["image_id"], det["category_id"]].append((det["score"], (x, y, x + w, y + h)))
    result = {}
    for t in thresholds:
        right = kept = 0
        for key, dets in ranked.items():
            free = list(truth.get(key, []))
            for score, box in dets:
                if score < t:
                    break
                kept += 1
                ious = [box_iou(box, g) for g in free]
                if ious and max(ious) >= iou:
                    free.pop(ious.index(max(ious)))
                    right += 1
        total = sum(len(v) for v in truth.values())
        result[t] = round(2 * right / (kept + total), 4) if kept + total else 0.0
    return result


# -- drawing (issue 14, item 6) ------------------------------------------------------------------

DRAW_VERBS = ("draw", "make", "show", "can you", "paint", "create", "generate", "render", "sketch")


def draw_prompt(text: str) -> str:
    """The chat request that asks a model to draw `text`: as written when it already asks ("Draw …",
    "Paint …", "Show me …"), else "Draw {text}." — the phrasing the draw data trains on."""
    text = text.strip()
    if text.lower().startswith(DRAW_VERBS):
        return text
    return f"Draw {text}" + ("" if text.endswith((".", "!", "?")) else ".")


def draw_head_names(model) -> list[str]:
    """Names of the model's heads that draw images (empty: the model cannot draw)."""
    return [name for name, h in model.config.head_configs.items() if getattr(h, "draws_images", False)]


def set_draw_settings(model, guidance_scale: float | None = None, num_inference_steps: int | None = None) -> None:
    """Change how a loaded model's draw heads sample (the head reads its config at every drawing)."""
    for name in draw_head_names(model):
        config = model.heads[name].config
        if guidance_scale is not None:
            config.guidance_scale = float(guidance_scale)
        if num_inference_steps is not None:
            config.num_inference_steps = int(num_inference_steps)


def read_draw_requests(path) -> list[dict]:
    """A prompts file: JSON lines `{"prompt", "objects"?, "relation"?}` (a line without `objects` is parsed
    from its prompt; one without `prompt` is asked as "Draw {objects}.") or plain prompt lines.
    Returns `{"prompt", "request"}` dicts, `request` a faithfulness `Request` (no objects when the prompt
    names nothing of the world, e.g. "a green hexagon")."""
    import json

    from mmbridge.data.shapes.faithfulness import as_request, parse_request

    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            record = None
            if line.startswith("{"):
                try:
                    record = json.loads(line)
                except ValueError as err:
                    raise ValueError(f"{path}:{n}: not valid JSON ({err})") from None
            if record is None:
                out.append({"prompt": line, "request": parse_request(line)})
                continue
            if not isinstance(record, dict) or not ({"prompt", "objects"} & set(record)):
                raise ValueError(f"{path}:{n}: a JSON line needs 'prompt' or 'objects'")
            try:
                request = as_request(record) if "objects" in record else parse_request(str(record["prompt"]))
            except (KeyError, ValueError, IndexError, StopIteration, TypeError) as err:
                raise ValueError(f"{path}:{n}: cannot read the request ({type(err).__name__}: {err})") from None
            prompt = record.get("prompt") or f"Draw {request.text}."
            out.append({"prompt": str(prompt), "request": request, "id": record.get("id")})
    return out


def render_request(request, seed: int = 0):
    """A ShapesWorld rendering of a request (the reference for the Fréchet distance): its objects at
    random extents and places (world rules: border, gaps, palette jitter), the relation made to hold.
    None when the request names nothing the world can draw."""

    from mmbridge.data.shapes.faithfulness import as_request, relation_holds
    from mmbridge.data.shapes.world import (
        COLORS,
        MAX_OBJECTS,
        SHAPES,
        SIZES,
        Scene,
        ShapeObject,
        jitter_rgb,
        place,
        render,
        rng_for,
    )

    request = as_request(request)
    objects = request.objects
    if not objects or len(objects) > MAX_OBJECTS or any(
            size not in SIZES or color not in COLORS or shape not in SHAPES for size, color, shape in objects):
        return None
    rng = rng_for(seed)
    for _ in range(200):
        placed: list[ShapeObject] = []
        for size, color, shape in objects:
            extent = int(rng.integers(SIZES[size][0], SIZES[size][1] + 1))
            corner = place(extent, [o.box for o in placed], rng)
            if corner is None:
                break
            placed.append(ShapeObject(shape, color, size, extent, *corner, rgb=jitter_rgb(color, rng)))
        if len(placed) < len(objects):
            continue
        r = request.relation
        if r is None or relation_holds(placed[r.a], placed[r.b], r.rel):
            return render(Scene(placed, "black", seed))
    return None


def draw_images(pipeline, prompts: Sequence[str], batch_size: int = 8, max_new_tokens: int = 16,
                progress: bool = True) -> list[tuple[object | None, str]]:
    """(the first image drawn or None, the answer's text) for each prompt, asked as `draw_prompt(p)`."""
    from mmbridge.generation import ImagePart

    out = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="draw", disable=not progress, unit="batch"):
        conversations = [[{"role": "user", "content": [{"type": "text", "text": draw_prompt(p)}]}]
                         for p in prompts[i:i + batch_size]]
        for result in pipeline.generate(conversations, max_new_tokens=max_new_tokens, do_sample=False):
            images = [p.image for p in result.parts if isinstance(p, ImagePart)]
            out.append((images[0] if images else None, result.text))
    return out


@torch.no_grad()
def generator_images(generator_dir, guidance_scale: float = 7.5, num_inference_steps: int = 25, seed: int = 0):
    """`draw(prompts)` for `evaluate_draw` with the frozen generator alone (a diffusers StableDiffusionPipeline
    dir), prompted with each request's caption text ("a large red circle above a small blue square", the
    form it was trained on): the upper bound of what a draw head on it can reach. Same seed per batch."""
    from diffusers import StableDiffusionPipeline

    from mmbridge.data.shapes.faithfulness import parse_request

    sd = StableDiffusionPipeline.from_pretrained(generator_dir, safety_checker=None, requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)

    def draw(prompts: Sequence[str]) -> list[tuple[object, str]]:
        texts = [parse_request(p).text or p for p in prompts]
        images = sd(texts, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                    generator=torch.Generator().manual_seed(seed)).images
        return [(image, text) for image, text in zip(images, texts)]

    return draw


def pooled_image_features(model, processor, images: Sequence, batch_size: int = 32) -> torch.Tensor:
    """The frozen vision encoder's pooled feature of each image (its `pooler_output`; the mean of the
    last hidden state when it has none), (n, hidden) float64 on the CPU."""
    feats = []
    for i in range(0, len(images), batch_size):
        pixels = processor.image_processor([im.convert("RGB") for im in images[i:i + batch_size]],
                                           return_tensors="pt")["pixel_values"]
        encoder = model.vision.model
        out = encoder(pixel_values=pixels.to(next(encoder.parameters()).dtype), return_dict=True)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            pooled = out.last_hidden_state.mean(dim=1)
        feats.append(pooled.double().cpu())
    return torch.cat(feats) if feats else torch.zeros(0, model.vision.hidden_size, dtype=torch.float64)


def frechet_distance(a, b) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (rows = samples), as FID:
    |μa − μb|² + Tr(Σa + Σb − 2 (Σa Σb)^½), the square root by `scipy.linalg.sqrtm` (real part)."""
    import warnings

    import numpy as np
    from scipy import linalg

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) == 0 or len(b) == 0:
        raise ValueError("the Fréchet distance needs at least one feature vector on each side")

    def stats(x):
        cov = np.cov(x, rowvar=False) if len(x) > 1 else np.zeros((x.shape[1], x.shape[1]))
        return x.mean(axis=0), np.atleast_2d(cov)

    (mu_a, cov_a), (mu_b, cov_b) = stats(a), stats(b)
    with warnings.catch_warnings():  # singular covariances (fewer samples than features) are expected
        warnings.simplefilter("ignore")
        root = linalg.sqrtm(cov_a @ cov_b)
        if not np.isfinite(root).all():  # near-singular product: offset both, as the reference FID code does
            offset = np.eye(cov_a.shape[0]) * 1e-6
            root = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    root = np.real(root)
    return float(max(0.0, ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root)))


def evaluate_draw(draw, requests: Sequence[dict], out_dir, features=None, batch_size: int = 8,
                  progress: bool = True) -> tuple[dict, list[dict]]:
    """Faithfulness of drawn images (issue 14, item 6).

    `draw(prompts) -> [(PIL image or None, text)]` draws a batch (`draw_images` over a pipeline, or any
    stand-in: rendered scenes check the reader path); `requests` as `read_draw_requests` returns them.
    Each image is saved as `out_dir/NNNN.png`, read back with the world reader and scored with
    `faithfulness`; a prompt naming nothing of the world is not drawn (`not_in_world`). `features(images)`
    (pooled vision features) adds the Fréchet distance between the drawn images and renderings of the
    same requests. Returns (summary, one record per prompt)."""
    from pathlib import Path

    from mmbridge.data.shapes.faithfulness import faithfulness, summarize
    from mmbridge.data.shapes.reader import read_image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records, scored, drawn, references = [], [], [], []
    todo = [(k, r) for k, r in enumerate(requests) if r["request"].objects]
    for k, r in enumerate(requests):
        if not r["request"].objects:
            records.append({"index": k, "prompt": r["prompt"], "status": "not_in_world",
                            "note": "the prompt names no ShapesWorld object ({size} {color} {shape})"})
    for i in tqdm(range(0, len(todo), batch_size), desc="draw", disable=not progress, unit="batch"):
        chunk = todo[i:i + batch_size]
        for (k, r), (image, text) in zip(chunk, draw([r["prompt"] for _, r in chunk])):
            record = {"index": k, "prompt": r["prompt"], "requested": r["request"].text, "text": text}
            if image is None:
                record.update(status="no_image", faithful=False, readable=False)
                scored.append({"faithful": False, "count": False, "shape": False, "color": False, "size": False,
                               "objects": False, "readable": False, "f1": 0.0,
                               "relation": False if r["request"].relation else None})
            else:
                path = out / f"{k:04d}.png"
                image.save(path)
                reading = read_image(image)
                score = faithfulness(reading, r["request"])
                scored.append(score)
                record.update(status="drawn", image=str(path), read=[o.name for o in reading.objects],
                              issues=list(reading.issues), **{key: score[key] for key in (
                                  "faithful", "readable", "count", "shape", "color", "size", "relation", "f1",
                                  "missing", "extra")})
                drawn.append(image)
                reference = render_request(r["request"], seed=k)
                if reference is not None:
                    references.append(reference)
            records.append(record)
    records.sort(key=lambda rec: rec["index"])
    summary = {"prompts": len(requests), "not_in_world": len(requests) - len(todo), "drawn": len(drawn),
               "no_image": len(todo) - len(drawn)}
    rates = {k: round(v, 4) if isinstance(v, float) else v for k, v in summarize(scored).items()}
    summary["faithful"] = rates.pop("faithful")
    summary["readable"] = rates.pop("readable")
    summary["strict"] = _mean([bool(s["faithful"] and s["readable"]) for s in scored])
    summary["per_attribute"] = rates
    if features is not None and drawn and references:
        summary["frechet_distance"] = round(frechet_distance(features(drawn), features(references)), 4)
        summary["frechet_n"] = [len(drawn), len(references)]
    return summary, records


def evaluate_story(pipeline, num_stories: int, out_dir, split: str = "test", seed: int = 0, steps: int = 3,
                   progress: bool = True) -> tuple[dict, list[dict]]:
    """Prompted stories (issue 14's story score): the sentences of a ShapesWorld story (`make_story`: "At
    first there was a large red circle on a gray background.", "Then a small blue square appears at the top
    left.") are the user turns of one chat, and the model answers each with a drawing. A step is `faithful`
    when the objects read back equal that step's scene, `consistent` (from the second step) when the
    previous drawing's objects carried over under the narrated edit and the edit shows (`story_consistency`,
    positions free: the generator starts from noise each time); `good` = faithful and, after the first step,
    consistent. Images: `out_dir/SSSS-T.png`. Returns (summary, one record per step)."""
    from pathlib import Path

    from mmbridge.data.shapes.edits import make_story
    from mmbridge.data.shapes.faithfulness import faithfulness, story_consistency
    from mmbridge.data.shapes.reader import read_image
    from mmbridge.generation import ImagePart

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    heads = draw_head_names(pipeline.model)
    max_new_tokens = pipeline.model.heads[heads[0]].config.num_slots + 8 if heads else 16
    records = []
    for i in tqdm(range(num_stories), desc="story", disable=not progress, unit="story"):
        chat, previous = pipeline.chat(), None
        for t, step in enumerate(make_story(split, i, seed, steps)):
            result = chat.ask(step["text"], max_new_tokens=max_new_tokens, do_sample=False)
            images = [p.image for p in result.parts if isinstance(p, ImagePart)]
            record = {"story": i, "step": t, "prompt": step["text"], "text": result.text,
                      "requested": [o.name for o in step["scene"].objects], "image": None, "faithful": False}
            objects = None
            if images:
                path = out / f"{i:04d}-{t}.png"
                images[0].save(path)
                objects = read_image(images[0]).objects
                record.update(image=str(path), read=[o.name for o in objects],
                              faithful=bool(faithfulness(objects, step["scene"])["faithful"]))
            if t > 0:
                record["consistent"] = bool(objects is not None and previous is not None and story_consistency(
                    previous, objects, step["edit"])["consistent"])
            record["good"] = record["faithful"] and record.get("consistent", True)
            records.append(record)
            previous = objects
    later = [r for r in records if r["step"] > 0]
    summary = {"stories": num_stories, "steps": len(records), "drawn": sum(r["image"] is not None for r in records),
               "faithful": _mean([r["faithful"] for r in records]),
               "consistent": _mean([r["consistent"] for r in later]),
               "good": _mean([r["good"] for r in records]),
               "good_by_step": [_mean([r["good"] for r in records if r["step"] == t]) for t in range(steps)]}
    return summary, records


POSE_PROMPT = "Find the pose of every figure."  # = data.shapes.act.CANONICAL["pose"], a training phrasing


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


def read_edit_records(path) -> list[dict]:
    """The edit pairs of `mmbridge data shapes --format wave2` (edits/edits_SPLIT.jsonl): per line `instruction`,
    `kind`, `target`, `before` (image path, relative to the file's folder), `before_scene`, `after_scene`.
    Returns `{"id", "instruction", "source" (path), "edit": {"kind", "target", "before", "after"} (scenes)}`."""
    import json
    from pathlib import Path

    from mmbridge.data.shapes.world import Scene

    path = Path(path)
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
                edit = {"kind": raw["kind"], "target": int(raw["target"]),
                        "before": Scene.from_dict(raw["before_scene"]), "after": Scene.from_dict(raw["after_scene"])}
                records.append({"id": raw.get("id", str(n)), "instruction": raw["instruction"],
                                "source": str(path.parent / raw["before"]), "edit": edit})
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{path}:{n}: not an edit pair ({err}); expected the wave2 edits format") from None
    return records


def edit_images(pipeline, requests: Sequence[tuple], batch_size: int = 8, max_new_tokens: int = 80,
                progress: bool = True) -> list[tuple[object | None, str]]:
    """(the edited image or None, the answer's text) for each (source image, instruction): the image and
    the instruction are the user's turn; the image is the first `ImagePart` of the answer."""
    from mmbridge.generation import ImagePart

    out = []
    for i in tqdm(range(0, len(requests), batch_size), desc="edit", disable=not progress, unit="batch"):
        chunk = requests[i:i + batch_size]
        conversations = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
                         for _, text in chunk]
        results = pipeline.generate(conversations, images=[load_image(image) for image, _ in chunk],
                                    max_new_tokens=max_new_tokens, do_sample=False)
        for result in results:
            images = [p.image for p in result.parts if isinstance(p, ImagePart)]
            out.append((images[0] if images else None, result.text))
    return out


def evaluate_edit(edit, records: Sequence[dict], out_dir=None, batch_size: int = 8,
                  progress: bool = True) -> tuple[dict, list[dict]]:
    """Instruction editing (issue 16): `edit([(source, instruction), ...]) -> [(image or None, text)]` edits a
    batch (`edit_images` over a pipeline, or any stand-in: the world's render of the edited scene is the
    oracle); `records` as `read_edit_records` returns them. Each edited image is read back with the world
    reader and scored by `edit_score` (the requested objects, untouched objects kept, the edit applied);
    with `out_dir` it is saved there as `ID.png`. Returns (summary, one record per pair)."""
    from pathlib import Path

    from mmbridge.data.shapes.edit_eval import edit_score, summarize_edits
    from mmbridge.data.shapes.reader import read_image

    out = Path(out_dir) if out_dir else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    scored, rows = [], []
    for i in tqdm(range(0, len(records), batch_size), desc="edit", disable=not progress, unit="batch"):
        chunk = records[i:i + batch_size]
        for rec, (image, text) in zip(chunk, edit([(r["source"], r["instruction"]) for r in chunk])):
            reading = None if image is None else read_image(image)
            score = edit_score(reading, rec["edit"])
            scored.append(score)
            row = {"id": rec["id"], "instruction": rec["instruction"], "text": text, **score,
                   "read": [] if reading is None else [o.name for o in reading.objects]}
            if out and image is not None:
                row["image"] = str(out / f"{rec['id']}.png")
                image.save(row["image"])
            rows.append(row)
    summary = {k: round(v, 4) if isinstance(v, float) else v for k, v in summarize_edits(scored).items()}
    return summary, rows
