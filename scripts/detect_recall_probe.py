"""Recall of a few fixed detection requests at the model's score threshold: of the true boxes of the first 96 test
scenes, how many a box finds at IoU >= 0.5, and how many boxes find none ("extra"). `mmbridge eval detect` asks
per shape category and scores AP over all scores; this asks generic categories ("Find every shape.") at the
threshold a user gets — where run j5's negatives lowered the scores (docs/recipe.md, "Run j5").

    python scripts/detect_recall_probe.py shapes [THRESHOLD]

Not a library module.
"""

import sys

from PIL import Image

from mmbridge.data.formats.coco import read_coco
from mmbridge.evaluate_act import box_iou
from mmbridge.generation import MMBridgePipeline
from mmbridge.models import resolve_model_path

PROMPTS = {"Find every shape.": None, "Segment every object.": None,
           "Find every red shape.": lambda a: a["color"] == "red", "Find all circles.": lambda a: a["category_id"] == 1}


def main() -> None:
    model = sys.argv[1]
    pipe = MMBridgePipeline.from_pretrained(resolve_model_path(model))
    if len(sys.argv) > 2:
        pipe.model.heads["act"].config.score_threshold = float(sys.argv[2])
    records = list(read_coco("data/eval-all/act/coco_test.json", check_images=True))[:96]
    for prompt, wanted in PROMPTS.items():
        found = total = extra = 0
        for i in range(0, len(records), 16):
            chunk = records[i:i + 16]
            chats = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
                     for _ in chunk]
            answers = pipe.generate(chats, images=[Image.open(r["path"]).convert("RGB") for r in chunk],
                                    max_new_tokens=12, do_sample=False)
            for record, answer in zip(chunk, answers):
                w, h = record["width"], record["height"]
                truth = [[x / w, y / h, (x + bw) / w, (y + bh) / h] for a in record["annotations"]
                         if wanted is None or wanted(a) for x, y, bw, bh in [a["bbox"]]]
                boxes = [b for p in answer.parts if getattr(p, "boxes", None) is not None for b in p.boxes]
                matched = sum(any(box_iou(t, b) >= 0.5 for b in boxes) for t in truth)
                found, total, extra = found + matched, total + len(truth), extra + max(0, len(boxes) - matched)
        print(f"{model} threshold {pipe.model.heads['act'].config.score_threshold}: {prompt} "
              f"recall {found}/{total} extra {extra}")


if __name__ == "__main__":
    main()
