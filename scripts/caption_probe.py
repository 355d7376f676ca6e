"""Do a model's captions run to their end? Seconds, not a run: "Describe the image." on the first `--n` images of
an eval-all caption file; counts the answers that do not end in "." and those that route to a head mid-caption,
and prints a few (run h1 stopped 11 of 200 captions after ", ", 4 of them in `[DET]`; docs/recipe.md, "Runs g8 /
h1 / h3").

    python scripts/caption_probe.py --model shapes --captions data/eval-all/caption_test.jsonl

Not a library module.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mmbridge.generation import MMBridgePipeline
from mmbridge.models import resolve_model_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--captions", default="data/eval-all/caption_test.jsonl")
    parser.add_argument("--n", type=int, default=200)
    args = parser.parse_args()
    pipe = MMBridgePipeline.from_pretrained(resolve_model_path(args.model))
    path = Path(args.captions)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:args.n]
    ask = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    results = pipe.generate([ask] * len(rows), images=[str(path.parent / r["image"]) for r in rows],
                            max_new_tokens=60, do_sample=False)
    unfinished = [r for r in results if not r.text.rstrip().endswith(".")]
    routed = [r for r in results if any(p.type != "text" for p in r.parts)]
    print(json.dumps({"captions": len(results), "unfinished": len(unfinished), "routed": len(routed),
                      "examples": [r.raw_text[:120] for r in unfinished[:5]]}))


if __name__ == "__main__":
    main()
