"""`mmbridge demo`: the shipped ShapesWorld model on bundled sample scenes — captions, answers, a chat."""

from __future__ import annotations

import json


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="run the shipped ShapesWorld model on bundled sample images")
    parser.add_argument("--model", default="shapes", help="model directory or shipped name (default: shapes)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.set_defaults(func=run)


def _samples():
    """(image path, scene annotation or None) for every bundled sample."""
    from mmbridge.models import sample_images_dir

    folder = sample_images_dir()
    index = folder / "samples.json"
    if index.is_file():
        return [(folder / s["image"], s) for s in json.loads(index.read_text())]
    return [(path, None) for path in sorted(folder.glob("*.png"))]


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
    return 0
