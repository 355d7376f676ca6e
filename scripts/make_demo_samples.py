"""Render the sample scenes bundled for `mmbridge demo` (test split: never seen in training).

Usage: python scripts/make_demo_samples.py   (rewrites src/mmbridge/assets/samples/)
"""

import json
from pathlib import Path

from mmbridge.data.shapes.act import grounding_expressions
from mmbridge.data.shapes.dataset import eval_questions, make_sample

OUT = Path(__file__).resolve().parents[1] / "src" / "mmbridge" / "assets" / "samples"
INDICES = [0, 1, 2, 3]


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    index = []
    for i in INDICES:
        sample = make_sample("test", i)
        name = f"{sample.key}.png"
        sample.image.save(OUT / name)
        questions = eval_questions(sample.scene, per_type=1)[:4]
        # the act demo's truth: every object's box (pixels x0 y0 x1 y1) and one referring expression
        objects = [{"size": o.size, "color": o.color, "shape": o.shape, "box": list(o.box)}
                   for o in sample.scene.objects]
        index.append({"image": name, "caption": sample.annotation["caption"],
                      "questions": [{"question": q["question"], "answer": q["answer"]} for q in questions],
                      "objects": objects, "grounding": grounding_expressions(sample.scene)[-1]})  # relational if any
    (OUT / "samples.json").write_text(json.dumps(index, indent=2) + "\n")
    print(f"wrote {len(index)} samples to {OUT}")


if __name__ == "__main__":
    main()
