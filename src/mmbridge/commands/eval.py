"""`mmbridge eval vqa|caption|retrieval --model DIR --questions FILE.jsonl [--out preds.jsonl]`, and
`mmbridge eval detect --model DIR --coco FILE.json [--prompt "Find every {category}."]` (COCOeval AP).

Prints one JSON object (the metric, `n`, per-type numbers); `--out` writes one prediction per line.
"""

from __future__ import annotations

import json
import sys

TASKS = ("vqa", "caption", "retrieval", "detect", "pose")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="evaluate a model: VQA accuracy, caption triple F1, ITC retrieval R@1",
        description="Evaluate on an eval JSON-lines file (format: docs/world.md; `mmbridge data shapes --format eval` "
                    "writes vqa_SPLIT.jsonl and caption_SPLIT.jsonl). retrieval reads a caption file.")
    parser.add_argument("task", choices=TASKS)
    parser.add_argument("--model", default="shapes", help="model directory or shipped name (default: shapes)")
    parser.add_argument("--questions", metavar="FILE.jsonl", help="the eval file (vqa, caption, retrieval)")
    parser.add_argument("--coco", metavar="FILE.json",
                        help="detect: a COCO file with boxes (and masks); pose: one with keypoints")
    parser.add_argument("--prompt", default=None,
                        help='detect: the request; "{category}" asks per category (default: "Find every {category}.")')
    parser.add_argument("--out", default=None, metavar="PREDS.jsonl", help="write per-item predictions here")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N records only")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (stderr)")
    parser.set_defaults(func=handle)


def handle(args) -> int:
    from mmbridge.cli import CLIError
    from mmbridge.data.formats.common import ReadStats
    from mmbridge.data.formats.evaljsonl import read_eval_jsonl

    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.task == "detect":
        return _detect(args)
    if args.task == "pose":
        return _pose(args)
    if not args.questions:
        raise CLIError(f"eval {args.task} needs --questions FILE.jsonl")
    kind = "vqa" if args.task == "vqa" else "caption"
    stats = ReadStats()
    try:
        records = list(read_eval_jsonl(args.questions, kind=kind, stats=stats, check_images=True))
    except FileNotFoundError:
        raise CLIError(f"eval file not found: {args.questions}") from None
    if args.limit is not None:
        records = records[:args.limit]
    if not records:
        raise CLIError(f"no usable {kind} records in {args.questions} ({stats.skipped} skipped: {dict(stats.reasons)})")

    from mmbridge.commands.chat import load_pipeline
    from mmbridge.evaluate import evaluate_caption, evaluate_retrieval, evaluate_vqa

    pipeline = load_pipeline(args.model)
    progress = not args.no_progress
    try:
        if args.task == "vqa":
            summary, predictions = evaluate_vqa(pipeline, records, args.batch_size, progress=progress)
        elif args.task == "caption":
            summary, predictions = evaluate_caption(pipeline, records, args.batch_size, progress=progress)
        else:
            summary, predictions = evaluate_retrieval(pipeline.model, pipeline.processor, records,
                                                      max(args.batch_size, 1), progress=progress)
    except ValueError as err:
        raise CLIError(str(err)) from None
    summary = {"task": args.task, "model": args.model, **summary, "skipped": stats.skipped}
    if args.out:
        with open(args.out, "w") as f:
            for p in predictions:
                f.write(json.dumps(p) + "\n")
    json.dump(summary, sys.stdout)
    sys.stdout.write("\n")
    return 0


def _detect(args) -> int:
    import os

    from mmbridge.cli import CLIError
    from mmbridge.commands.chat import load_pipeline
    from mmbridge.evaluate import DETECTION_PROMPT, evaluate_detection

    if not args.coco or not os.path.isfile(args.coco):
        raise CLIError(f"eval detect needs --coco FILE.json (a COCO file); got {args.coco}")
    pipeline = load_pipeline(args.model)
    try:
        summary, detections = evaluate_detection(pipeline, args.coco, args.prompt or DETECTION_PROMPT,
                                                 args.batch_size, args.limit, progress=not args.no_progress)
    except ValueError as err:
        raise CLIError(str(err)) from None
    if args.out:
        with open(args.out, "w") as f:
            json.dump(detections, f)
    json.dump({"task": "detect", "model": args.model, **summary}, sys.stdout)
    sys.stdout.write("\n")
    return 0


def _pose(args) -> int:
    """`mmbridge eval pose --model DIR --coco pose/coco_pose_SPLIT.json [--prompt ...]`: COCOeval keypoints AP."""
    import os

    from mmbridge.cli import CLIError
    from mmbridge.commands.chat import load_pipeline
    from mmbridge.evaluate import POSE_PROMPT, evaluate_pose

    if not args.coco or not os.path.isfile(args.coco):
        raise CLIError(f"eval pose needs --coco FILE.json (COCO keypoints: pose/coco_pose_SPLIT.json of "
                       f"`mmbridge data shapes --format wave2`); got {args.coco}")
    pipeline = load_pipeline(args.model)
    try:
        summary, results = evaluate_pose(pipeline, args.coco, args.prompt or POSE_PROMPT, args.batch_size,
                                         args.limit, progress=not args.no_progress)
    except ValueError as err:
        raise CLIError(str(err)) from None
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f)
    json.dump({"task": "pose", "model": args.model, **summary}, sys.stdout)
    sys.stdout.write("\n")
    return 0
