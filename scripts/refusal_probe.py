"""Does an act model refuse requests for classes the world lacks ("Find the hexagons.")? Seconds, not a run.

Two numbers (docs/recipe.md, "Refusals (runs g2 / g3)", has them for runs g1-g6):
* generated: `--n` requests built as the act data builds its `unknown` ones (`UNKNOWN[split]` words in the det / seg
  `PHRASINGS[split]`, split `train` or `heldout`) on the first `--n` images of `--images`; counted refused when
  the answer has no routing part and its text starts with the refusal's first words, and counted apart when it
  is the whole refusal sentence (`UNKNOWN_ANSWER`), word for word; a routed answer whose decoder found nothing
  (no boxes) is counted apart too ("routed, nothing found": a clear answer as well);
* teacher-forced: over the first 48 two-turn chats of `--refusals` (a `refusals.json` of `write_act_data`), how
  often the refusal's first token is the argmax, and its mean probability.

    python scripts/refusal_probe.py --model shapes --refusals runs/e1/act/data/refusals.json

Not a library module.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
from pathlib import Path

import torch
from PIL import Image

from mmbridge.data.formats.llava import to_messages
from mmbridge.data.shapes.act import PHRASINGS, UNKNOWN, UNKNOWN_ANSWER, plural
from mmbridge.generation import MMBridgePipeline
from mmbridge.models import resolve_model_path


def generated(pipe: MMBridgePipeline, images: list[Path], split: str) -> dict:
    rng = random.Random(0)
    requests = []
    for image in images:
        kind = rng.choice(("shape", "shape", "color", "thing"))
        word = rng.choice(UNKNOWN[split][kind])
        one, many = (f"{word} shape", f"{word} shapes") if kind == "color" else (word, plural(word))
        text = rng.choice(PHRASINGS[rng.choice(("det", "seg"))][split]).format(one=one, many=many)
        requests.append([{"role": "user", "content": [{"type": "image", "image": str(image)},
                                                      {"type": "text", "text": text}]}])
    opening = " ".join(UNKNOWN_ANSWER.split()[:3])  # "There is no"
    counts = collections.Counter()
    for answer in pipe.generate(requests, max_new_tokens=24):
        routed = [p for p in answer.parts if p.type != "text"]
        found = any(getattr(p, "boxes", None) for p in routed)
        counts["routed" if routed else "refused" if answer.text.startswith(opening) else "other words"] += 1
        counts["routed, nothing found"] += bool(routed) and not found  # the decoder's answer: also clear
        counts["refused, the whole sentence"] += answer.text.strip() == UNKNOWN_ANSWER and not routed
    return dict(counts)


def teacher_forced(pipe: MMBridgePipeline, refusals: Path, n: int = 48) -> dict:
    chats = [r for r in json.loads(refusals.read_text()) if len(r["conversations"]) == 2][:n]
    model, processor = pipe.model, pipe.processor
    right, probability = 0, []
    for i in range(0, len(chats), 16):
        chunk = chats[i:i + 16]
        batch = processor([to_messages(r["conversations"], r.get("regions")) for r in chunk],
                          images=[Image.open(refusals.parent / r["image"]).convert("RGB") for r in chunk],
                          return_labels=True)
        with torch.no_grad():
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        for row in range(len(chunk)):
            first = (labels[row] != -100).nonzero()[0, 0]
            probs = logits[row, first].softmax(-1)
            probability.append(probs[labels[row, first]].item())
            right += int(probs.argmax() == labels[row, first])
    return {"chats": len(chats), "first_token_right": right, "mean_p_first_token": sum(probability) / len(probability)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--images", default="data/eval-all/act/images")
    parser.add_argument("--refusals", help="a refusals.json of write_act_data (its images beside it)")
    parser.add_argument("--n", type=int, default=40)
    args = parser.parse_args()
    pipe = MMBridgePipeline.from_pretrained(resolve_model_path(args.model))
    images = sorted(Path(args.images).glob("*.png"))[:args.n]
    out = {split: generated(pipe, images, split) for split in ("train", "heldout")}
    if args.refusals:
        out["teacher_forced"] = teacher_forced(pipe, Path(args.refusals))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
