"""`mmbridge eval segment|ground|region|route` (the act head; `eval detect` is in `commands/eval.py`):

    mmbridge eval segment --model M --coco coco_test.json          COCOeval segm (and bbox) AP of [SEG]
    mmbridge eval ground  --model M --questions ground_test.jsonl  accuracy at IoU >= 0.5
    mmbridge eval region  --model M --questions region_test.jsonl  region-VQA accuracy
    mmbridge eval route   --model M --questions route_test.jsonl   right route for held-out phrasings

Each prints one JSON object; `--out` writes the predictions (JSON lines; segment: the COCO results).
`data.shapes.act_eval.write_act_eval` writes the files (docs/recipe.md, "Act").
"""

from __future__ import annotations

import json
import sys

ACT_TASKS = ("segment", "ground", "region", "route")
SEGMENT_PROMPT = "Segment every {category}."
REQUIRED = {"ground": ("image", "expression", "box"), "region": ("image", "question", "region", "answer"),
            "route": ("image", "request", "route")}


def handle_act(args) -> int:
    from mmbridge.cli import CLIError

    if args.task == "segment":
        return _segment(args)
    import os

    from mmbridge.commands.chat import load_pipeline
    from mmbridge.evaluate_act import evaluate_grounding, evaluate_region, evaluate_routing, read_act_jsonl

    if not args.questions or not os.path.isfile(args.questions):
        raise CLIError(f"eval {args.task} needs --questions FILE.jsonl ({args.task}_SPLIT.jsonl of "
                       f"data.shapes.act_eval.write_act_eval); got {args.questions}")
    records, skipped = read_act_jsonl(args.questions, REQUIRED[args.task])
    records = records[:args.limit] if args.limit is not None else records
    if not records:
        raise CLIError(f"no usable {args.task} records in {args.questions} (skipped: {skipped})")
    pipeline = load_pipeline(args.model)
    progress = not args.no_progress
    try:
        if args.task == "ground":
            summary, predictions = evaluate_grounding(pipeline, records, args.prompt or "Find {expression}.",
                                                      args.batch_size, progress=progress)
        elif args.task == "region":
            summary, predictions = evaluate_region(pipeline, records, args.batch_size, progress=progress)
        else:
            summary, predictions = evaluate_routing(pipeline, records, args.batch_size, progress=progress)
    except ValueError as err:
        raise CLIError(str(err)) from None
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(json.dumps(p) + "\n" for p in predictions)
    json.dump({"task": args.task, "model": args.model, **summary, "skipped": sum(skipped.values())}, sys.stdout)
    sys.stdout.write("\n")
    return 0


def _segment(args) -> int:
    """COCOeval segm AP (bbox too) of the `[SEG]` route: `eval detect` with a segmentation request."""
    from mmbridge.commands.eval import _coco_task
    from mmbridge.evaluate import evaluate_detection

    def evaluate(pipeline, coco, prompt, batch_size, limit, progress=True):
        if not any("[SEG]" in h.routes for h in pipeline.model.config.head_configs.values()):
            raise ValueError("this model has no act head with a [SEG] route: it cannot segment")
        return evaluate_detection(pipeline, coco, prompt, batch_size, limit, progress=progress)

    return _coco_task(args, "segment", evaluate, SEGMENT_PROMPT, "a COCO file with RLE or polygon masks")
