"""Write a prompts file for `mmbridge eval draw` from ShapesWorld test-split scenes.

    python bench/draw_prompts.py --n 1000 --objects 1-2 --out prompts_12.jsonl   # a relation when 2 objects
    python bench/draw_prompts.py --n 1000 --objects 3-4 --out prompts_34.jsonl
    mmbridge eval draw --model M --prompts prompts_12.jsonl --out draw-cfg3 --guidance-scale 3

Each line: {"prompt": "Draw a large red circle above a small blue square.", "objects": [...],
"relation"?: {"a": 0, "rel": "above", "b": 1}} — the request the faithfulness score compares against.
"""

from __future__ import annotations

import argparse
import json

from mmbridge.data.shapes.faithfulness import draw_prompt_records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--objects", default="1-2", help="object count range, e.g. 1-2 or 3-4")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    lo, _, hi = args.objects.partition("-")
    with open(args.out, "w") as f:
        for record in draw_prompt_records(args.n, int(lo), int(hi or lo), args.seed):
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
