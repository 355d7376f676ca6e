"""`mmbridge demo`: the shipped ShapesWorld model on bundled sample scenes — captions, answers, a chat;
for a model with a draw head, a few drawings saved beside a markdown page and checked by the world reader;
for a model with an act head, detections, masks and a grounded box on each sample, saved as overlay PNGs
and scored against the scene's true boxes, and (with a `[POSE]` route) the keypoints of the bundled stick
figures, scored by OKS against their true keypoints; (with an `[EDIT]` route) edits of two test scenes of the
world, read back and scored, and an edit the world cannot do."""

from __future__ import annotations

import json


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="run the shipped ShapesWorld model on bundled sample images")
    parser.add_argument("--model", default="shapes", help="model directory or shipped name (default: shapes)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--out", default="mmbridge-demo",
                        help="where drawings and act overlays are saved (default: ./mmbridge-demo)")
    parser.set_defaults(func=run)


def _samples():
    """(image path, scene annotation or None) for every bundled sample."""
    from mmbridge.models import sample_images_dir

    folder = sample_images_dir()
    index = folder / "samples.json"
    if index.is_file():
        return [(folder / s["image"], s) for s in json.loads(index.read_text())]
    return [(path, None) for path in sorted(folder.glob("test-*.png"))]


def run(args) -> int:
    from mmbridge.cli import CLIError
    from mmbridge.commands.chat import load_pipeline

    pipeline = load_pipeline(args.model)
    samples = _samples()
    if not samples:
        raise CLIError("no bundled sample images found (mmbridge/assets/samples); is the installation complete?")
    from mmbridge.data.shapes.metrics import caption_triple_f1, parse_triples, vqa_match

    right = asked = 0
    for path, scene in samples:
        print(f"== {path.name}" + (f"  (truth: {scene['caption']})" if scene else ""))
        questions = [("Describe the image.", scene.get("caption") if scene else None)]
        questions += [(qa["question"], qa["answer"]) for qa in (scene or {}).get("questions", [])]
        if not scene:
            questions += [("How many shapes are there?", None)]
        conversations = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
                         for q, _ in questions]
        results = pipeline.generate(conversations, images=[str(path)] * len(questions),
                                    max_new_tokens=args.max_new_tokens)
        for (question, truth), result in zip(questions, results):
            mark = ""
            if truth is not None and question == "Describe the image.":
                f1 = caption_triple_f1(result.text, [dict(zip(("size", "color", "shape"), t))
                                                     for t in parse_triples(truth)])
                mark = f"   [objects named right: F1 {f1:.2f}]"
            elif truth is not None:
                ok = vqa_match(result.text, truth)
                right, asked = right + ok, asked + 1
                mark = "   [right]" if ok else f"   [wrong, truth: {truth}]"
            print(f"  Q: {question}\n  A: {result.text}{mark}")
        print()
    if asked:
        print(f"{right} of {asked} answers right.\n")

    path, _ = samples[0]
    print(f"== multi-turn chat about {path.name}")
    session = pipeline.chat(max_new_tokens=args.max_new_tokens)
    for i, turn in enumerate(["How many shapes are there?", "Describe the image.", "Is there a red circle?"]):
        answer = session.ask(turn, images=[str(path)] if i == 0 else None)
        print(f"  you:   {turn}\n  model: {answer.text}")
    _draw(pipeline, args)
    _act(pipeline, args, samples)
    _missing_class(pipeline, args, samples)
    _pose(pipeline, args)
    _edit(pipeline, args)
    return 0


#: What the demo asks a model with a draw head to draw (one and two objects, a relation).
DRAW_PROMPTS = ("Draw a large red circle above a small blue square.", "Draw a small green triangle.")


def _draw(pipeline, args) -> None:
    """Draw `DRAW_PROMPTS`, save each answer (images + `chat.md`) under `--out`, print the paths, and mark
    each image right or wrong by reading its objects back (`data.shapes.reader`). Nothing for a model
    without a draw head."""
    if not any(getattr(h, "draws_images", False) for h in pipeline.model.config.head_configs.values()):
        return
    from mmbridge.commands.outputs import OutputWriter
    from mmbridge.data.shapes.faithfulness import faithfulness
    from mmbridge.data.shapes.reader import read_image

    print()
    print(f"== drawing (images and chat.md under {args.out})")
    writer = OutputWriter(args.out)
    conversations = [[{"role": "user", "content": [{"type": "text", "text": p}]}] for p in DRAW_PROMPTS]
    right = 0
    for prompt, result in zip(DRAW_PROMPTS, pipeline.generate(conversations, max_new_tokens=args.max_new_tokens)):
        saved = writer.write(prompt, result)
        images = [(path, part.image) for path, part in zip(saved, [p for p in result.parts if p.type != "text"])
                  if part.type == "image"]
        print(f"  you:   {prompt}")
        if result.text:
            print(f"  model: {result.text}")
        if not images:
            print("  [wrong: no image drawn]")
            continue
        for n, (path, image) in enumerate(images):
            reading = read_image(image)
            score = faithfulness(reading, prompt)
            names = [o.name for o in reading.objects]
            more = f", … ({len(names)} objects)" if len(names) > 4 else ""
            seen = ", ".join(names[:4]) + more or "nothing readable"
            right += bool(score["faithful"]) and n == 0  # the answer's first image is the drawing
            mark = "right" if score["faithful"] else "wrong"
            print(f"  image: {path}   [{mark}: read {seen}]")
    print(f"{right} of {len(DRAW_PROMPTS)} drawings right (read back by the world reader).")


#: What the demo asks a model with an act head about each sample (route -> request; {expression}: the
#: sample's referring expression).
ACT_REQUESTS = {"[DET]": "Find every shape.", "[SEG]": "Segment every shape.", "[GRD]": "Find {expression}."}


def _act(pipeline, args, samples) -> None:
    """Each act route the model has, on each sample with its truth: the answer's boxes matched to the true
    boxes at IoU >= 0.5 (right: every object found and nothing else; `[GRD]`: the one box on the expressed
    object), the overlay PNG and its JSON saved under `--out/act`. Nothing for a model without an act head."""
    from pathlib import Path

    from mmbridge.commands.outputs import OutputWriter
    from mmbridge.evaluate_act import box_iou
    from mmbridge.processing import load_image

    routes = {t for h in pipeline.model.config.head_configs.values() if h.kind == "act" for t in h.routes}
    asks = [(route, text) for route, text in ACT_REQUESTS.items() if route in routes]
    samples = [(path, scene) for path, scene in samples if scene and scene.get("objects")]
    if not asks or not samples:
        return
    out = Path(args.out) / "act"
    print()
    print(f"== finding (overlays and chat.md under {out})")
    writer, right, asked = OutputWriter(out), 0, 0
    for path, scene in samples:
        image = load_image(str(path))
        size = image.width, image.height, image.width, image.height
        truth = [[v / s for v, s in zip(o["box"], size)] for o in scene["objects"]]
        texts = [text.format(expression=scene["grounding"]["expression"]) for _, text in asks]
        conversations = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}]
                         for t in texts]
        results = pipeline.generate(conversations, images=[image] * len(texts), max_new_tokens=args.max_new_tokens,
                                    do_sample=False)
        print(f"-- {path.name}  (truth: {len(truth)} objects; {scene['grounding']['expression']!r} is the "
              f"{' '.join(scene['objects'][scene['grounding']['object']][k] for k in ('size', 'color', 'shape'))})")
        for (route, _), text, result in zip(asks, texts, results):
            saved = writer.write(text, result, image)
            found = [p for p in result.parts if p.type == "detections" and p.route == route]
            boxes = found[0].boxes if found else []
            if route == "[GRD]":
                wanted = [truth[scene["grounding"]["object"]]]
                ok = bool(boxes) and box_iou(boxes[0], wanted[0]) >= 0.5
                verdict = f"IoU {box_iou(boxes[0], wanted[0]):.2f}" if boxes else "no box"
            else:
                matched = _matched(boxes, truth, box_iou)
                ok = bool(found) and matched == len(truth) == len(boxes)
                verdict = f"{matched} of {len(truth)} objects found, {len(boxes) - matched} extra"
            right, asked = right + ok, asked + 1
            overlay = next((str(p) for p in saved if p.name.endswith("-overlay.png")), "no overlay: nothing found")
            answer = result.text or (route if found else "")
            print(f"  you:   {text}\n  model: {answer}   [{'right' if ok else 'wrong'}: {verdict}]  {overlay}")
    print(f"{right} of {asked} act answers right (boxes at IoU >= 0.5).")


#: A request for a class ShapesWorld does not have: a clear answer has no boxes (words, or nothing found).
MISSING_CLASS_REQUESTS = ("Find the hexagons.", "Segment every pink shape.")


def _missing_class(pipeline, args, samples) -> None:
    """`MISSING_CLASS_REQUESTS` on the first sample, for a model that detects: right when the answer holds no
    box (the shipped model is trained to say so in words; a routed answer that finds nothing is right too)."""
    from mmbridge.processing import load_image

    routes = {t for h in pipeline.model.config.head_configs.values() if h.kind == "act" for t in h.routes}
    if not {"[DET]", "[SEG]"} <= routes or not samples:
        return
    path, _ = samples[0]
    image = load_image(str(path))
    print()
    print(f"== a class the world lacks, on {path.name}")
    conversations = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}]
                     for t in MISSING_CLASS_REQUESTS]
    results = pipeline.generate(conversations, images=[image] * len(conversations),
                                max_new_tokens=args.max_new_tokens, do_sample=False)
    right = 0
    for text, result in zip(MISSING_CLASS_REQUESTS, results):
        boxes = sum(len(p.boxes) for p in result.parts if p.type == "detections")
        right += boxes == 0
        answer = result.text or " ".join(f"[{p.route} {len(p.boxes)} found]" for p in result.parts
                                         if p.type == "detections")
        print(f"  you:   {text}\n  model: {answer}   [{'right: no boxes' if boxes == 0 else f'wrong: {boxes} boxes'}]")
    print(f"{right} of {len(results)} requests for a missing class answered without boxes.")


def _matched(boxes, truth, iou) -> int:
    """Greedy one-to-one matching at IoU >= 0.5 (boxes come best-scored first): how many true boxes are found."""
    free, hits = list(range(len(truth))), 0
    for box in boxes:
        best = max(free, key=lambda k: iou(box, truth[k]), default=None)
        if best is not None and iou(box, truth[best]) >= 0.5:
            free.remove(best)
            hits += 1
    return hits


POSE_REQUEST = "Find the pose of every figure."


def _pose(pipeline, args) -> None:
    """The bundled stick figures (`samples/poses.json`), for a model with a `[POSE]` route: the best-scored
    person's keypoints against the figure's true ones by OKS (COCO's formula and sigmas; right at >= 0.5, AP50's
    threshold), the overlay PNG saved under `--out/pose`."""
    from pathlib import Path

    import torch

    from mmbridge.commands.outputs import OutputWriter
    from mmbridge.modeling.act.keypoints import keypoint_sigmas, oks
    from mmbridge.models import sample_images_dir
    from mmbridge.processing import load_image

    if not any("[POSE]" in h.routes for h in pipeline.model.config.head_configs.values() if h.kind == "act"):
        return
    index = sample_images_dir() / "poses.json"
    figures = json.loads(index.read_text()) if index.is_file() else []
    if not figures:
        return
    out = Path(args.out) / "pose"
    print()
    print(f"== poses (overlays and chat.md under {out})")
    writer, right = OutputWriter(out), 0
    images = [load_image(str(sample_images_dir() / f["image"])) for f in figures]
    conversations = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": POSE_REQUEST}]}]
                     for _ in figures]
    results = pipeline.generate(conversations, images=images, max_new_tokens=args.max_new_tokens, do_sample=False)
    for figure, image, result in zip(figures, images, results):
        saved = writer.write(POSE_REQUEST, result, image)
        found = [p for p in result.parts if p.type == "keypoints" and p.keypoints]
        w, h = image.size
        truth = torch.tensor(figure["keypoints"], dtype=torch.float32).view(1, -1, 3)
        x0, y0, x1, y1 = figure["box"]
        similarity = 0.0
        if found:
            predicted = torch.tensor([[k[:2] for k in found[0].keypoints[0]]], dtype=torch.float32)
            scale = torch.tensor([w, h], dtype=torch.float32)
            similarity = oks(predicted * scale, truth[..., :2], (truth[..., 2] > 0).float(),
                             torch.tensor([(x1 - x0) * (y1 - y0)], dtype=torch.float32),
                             keypoint_sigmas(truth.shape[1]))[0, 0].item()
        ok = similarity >= 0.5
        right += ok
        overlay = next((str(p) for p in saved if p.name.endswith("-overlay.png")), "no overlay: nothing found")
        verdict = f"OKS {similarity:.2f}" if found else "no keypoints"
        print(f"-- {figure['image']}  (truth: {figure['caption']})\n  you:   {POSE_REQUEST}\n"
              f"  model: {result.text or '[POSE]'}   [{'right' if ok else 'wrong'}: {verdict}]  {overlay}")
    print(f"{right} of {len(figures)} poses right (OKS >= 0.5).")


#: The world's test edit pairs the demo asks a model with an `[EDIT]` route to make, and one it cannot make.
EDIT_PAIRS, IMPOSSIBLE_EDIT = (0, 1), "Make the shapes transparent."


def _edit(pipeline, args) -> None:
    """`EDIT_PAIRS` (`data.shapes.edits.edit_pair("test", i)`): the source scene and the instruction sent, the
    edited image saved under `--out/edit` and read back by the world reader (right: the requested objects and
    nothing else changed, `data.shapes.edit_eval.edit_score`); then `IMPOSSIBLE_EDIT`, answered in words."""
    from pathlib import Path

    from mmbridge.commands.outputs import OutputWriter
    from mmbridge.data.shapes.annotations import short_caption
    from mmbridge.data.shapes.edit_eval import edit_score
    from mmbridge.data.shapes.edits import edit_pair
    from mmbridge.data.shapes.reader import read_image

    if not any("[EDIT]" in h.routes for h in pipeline.model.config.head_configs.values() if h.kind == "act"):
        return
    out = Path(args.out) / "edit"
    print()
    print(f"== editing (images and chat.md under {out})")
    writer, right = OutputWriter(out), 0
    edits = [edit_pair("test", i) for i in EDIT_PAIRS]
    asks = [(e["before"], e["instruction"]) for e in edits] + [(edits[0]["before"], IMPOSSIBLE_EDIT)]
    conversations = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
                     for _, text in asks]
    results = pipeline.generate(conversations, images=[scene.render() for scene, _ in asks],
                                max_new_tokens=args.max_new_tokens, do_sample=False)
    for n, ((scene, text), result) in enumerate(zip(asks, results)):
        saved = writer.write(text, result, scene.render())
        edited = [(path, part) for path, part in zip(saved, [p for p in result.parts if p.type != "text"])
                  if part.type == "image"]
        print(f"-- {short_caption(scene)}\n  you:   {text}")
        if n == len(edits):
            print(f"  model: {result.text or '(an image)'}")
            continue
        if not edited:
            print(f"  model: {result.text}   [wrong: no image]")
            continue
        path, part = edited[0]
        score = edit_score(read_image(part.image), edits[n])
        right += bool(score["correct"])
        names = ", ".join(o.name for o in read_image(part.image).objects) or "nothing readable"
        print(f"  image: {path}   [{'right' if score['correct'] else 'wrong'}: read {names}]")
    print(f"{right} of {len(edits)} edits right (read back by the world reader).")
