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

from mmbridge.data.shapes.faithfulness import request_for
from mmbridge.data.shapes.world import rng_for, sample_scene, scene_seed


def prompts(n: int, lo: int, hi: int, seed: int = 0) -> list[dict]:
    rng = rng_for(seed, stream=14)
    out = []
    for i in range(n):
        scene = sample_scene(scene_seed("test", i, seed), num_objects=int(rng.integers(lo, hi + 1)))
        request = request_for(scene, rng)
        record = {"prompt": f"Draw {request.text}.", "objects": [" ".join(t) for t in request.objects]}
        if request.relation:
            record["relation"] = {"a": 0, "rel": request.relation.rel, "b": 1}
        out.append(record)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--objects", default="1-2", help="object count range, e.g. 1-2 or 3-4")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    lo, _, hi = args.objects.partition("-")
    with open(args.out, "w") as f:
        for record in prompts(args.n, int(lo), int(hi or lo), args.seed):
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
