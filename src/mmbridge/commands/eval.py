"""`mmbridge eval vqa|caption|retrieval --model DIR --questions FILE.jsonl [--out preds.jsonl]`, and
`mmbridge eval detect --model DIR --coco FILE.json [--prompt "Find every {category}."]` (COCOeval AP), and
`mmbridge eval draw --model DIR --prompts FILE [--out DIR] [--guidance-scale S]` (draw faithfulness; `--generator
SD_DIR`: the generator alone), `mmbridge eval story --model DIR [--stories N]` (stories drawn turn by turn), and
`mmbridge eval edit --model DIR --edits edits/edits_SPLIT.jsonl [--out DIR]` (instruction-edit accuracy), and
`mmbridge eval all --model DIR [--data DIR] [--scenes N] [--out DIR]` (every task the model can do, one table).

Prints one JSON object (the metric, `n`, per-type numbers); `--out` writes one prediction per line. `eval all`
prints a markdown table and writes it with every task's JSON summary under `--out`.
"""

from __future__ import annotations

import json
import sys

from mmbridge.commands.eval_act import ACT_TASKS  # segment, ground, region, route: commands/eval_act.py
from mmbridge.evaluate_all import TASKS as ALL_TASKS  # eval all's rows (light module: no torch at import)

TASKS = ("vqa", "caption", "retrieval", "detect", "draw", "story", "pose", "edit", "all")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="evaluate a model: VQA accuracy, caption triple F1, ITC retrieval R@1, detection AP, "
                     "draw faithfulness, edit accuracy",
        description="Evaluate on an eval JSON-lines file (format: docs/world.md; `mmbridge data shapes --format eval` "
                    "writes vqa_SPLIT.jsonl and caption_SPLIT.jsonl). retrieval reads a caption file.")
    parser.add_argument("task", choices=(*TASKS, *ACT_TASKS))
    parser.add_argument("--model", default="shapes", help="model directory or shipped name (default: shapes)")
    parser.add_argument("--questions", metavar="FILE.jsonl",
                        help="the eval file (vqa, caption, retrieval; ground, region, route: pretrain.act's)")
    parser.add_argument("--coco", metavar="FILE.json",
                        help="detect / segment: a COCO file with boxes (and masks); pose: one with keypoints")
    parser.add_argument("--prompt", default=None,
                        help='detect: the request; "{category}" asks per category (default: "Find every {category}.")')
    parser.add_argument("--out", default=None, metavar="PREDS.jsonl",
                        help="write per-item predictions here (draw: the folder for the images and draw.jsonl; "
                             "all: the folder for the table, the summaries and the images; default eval-all)")
    parser.add_argument("--data", default="eval-data", metavar="DIR",
                        help="all: the eval files' folder, written there first if it lacks them (default eval-data)")
    parser.add_argument("--scenes", type=int, default=1000,
                        help="all: test-split scenes to write the eval files from (default 1000)")
    parser.add_argument("--tasks", default=None,
                        help="all: comma-separated subset of " + ",".join(ALL_TASKS))
    parser.add_argument("--prompts", metavar="FILE",
                        help='draw: JSON lines {"prompt", "objects"?, "relation"?} or plain prompt lines')
    parser.add_argument("--edits", metavar="FILE.jsonl",
                        help="edit: the edit pairs of `mmbridge data shapes --format wave2` (edits/edits_SPLIT.jsonl)")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="draw: classifier-free guidance scale for this run (default: the model's)")
    parser.add_argument("--steps", type=int, default=None,
                        help="draw: diffusion sampling steps for this run (default: the model's)")
    parser.add_argument("--no-fid", action="store_true", help="draw: skip the Fréchet distance")
    parser.add_argument("--score-threshold", type=float, default=0.05,
                        help="detect / segment / pose: keep detections scoring above this for COCOeval (default "
                             "0.05, the usual COCO-eval setting: AP integrates over scores, so a serving threshold "
                             "such as the head's 0.5 would cut its recall)")
    parser.add_argument("--stories", type=int, default=100,
                        help="story: how many test-split stories to draw step by step (default 100)")
    parser.add_argument("--generator", metavar="DIR", default=None,
                        help="draw: score this frozen generator alone (a StableDiffusionPipeline dir, or `shipped`: "
                             "the shipped foundation's) prompted with the requests' caption text — the upper bound "
                             "of a draw head on it; --model then only gives the vision encoder of the Fréchet "
                             "distance")
    parser.add_argument("--blind", action="store_true",
                        help="vqa: ask the question without the image (the question-only baseline)")
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
    if args.task in ACT_TASKS:
        from mmbridge.commands.eval_act import handle_act

        return handle_act(args)
    if args.task == "detect":
        return _detect(args)
    if args.task == "draw":
        return _draw(args)
    if args.task == "story":
        return _story(args)
    if args.task == "pose":
        return _pose(args)
    if args.task == "edit":
        return _edit(args)
    if args.task == "all":
        return _all(args)
    if not args.questions:
        raise CLIError(f"eval {args.task} needs --questions FILE.jsonl")
    kind = "vqa" if args.task == "vqa" else "caption"
    if args.blind and args.task != "vqa":
        raise CLIError("--blind is for eval vqa (the question-only baseline)")
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
            summary, predictions = evaluate_vqa(pipeline, records, args.batch_size, progress=progress,
                                                blind=args.blind)
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
    """`mmbridge eval detect --model DIR --coco FILE.json [--prompt ...]`: COCOeval box / mask AP."""
    from mmbridge.evaluate import DETECTION_PROMPT, evaluate_detection

    return _coco_task(args, "detect", evaluate_detection, DETECTION_PROMPT, "a COCO file")


def _coco_task(args, task: str, evaluate, default_prompt: str, what: str) -> int:
    """The COCO-scored tasks (detect, pose): check the file, run, print one JSON object, `--out` the results."""
    import os

    from mmbridge.cli import CLIError
    from mmbridge.commands.chat import load_pipeline

    if not args.coco or not os.path.isfile(args.coco):
        raise CLIError(f"eval {task} needs --coco FILE.json ({what}); got {args.coco}")
    if not 0 < args.score_threshold < 1:
        raise CLIError(f"--score-threshold must be in (0, 1), got {args.score_threshold}")
    pipeline = load_pipeline(args.model)
    for head in pipeline.model.heads.values():
        if head.config.kind == "act":  # this run only (read at every decode); the saved model keeps its own
            head.config.score_threshold = args.score_threshold
    try:
        summary, results = evaluate(pipeline, args.coco, args.prompt or default_prompt, args.batch_size,
                                    args.limit, progress=not args.no_progress)
    except ValueError as err:
        raise CLIError(str(err)) from None
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f)
    json.dump({"task": task, "model": args.model, "score_threshold": args.score_threshold, **summary}, sys.stdout)
    sys.stdout.write("\n")
    return 0


def _draw(args) -> int:
    import os

    from mmbridge.cli import CLIError
    from mmbridge.commands.chat import load_pipeline
    from mmbridge.evaluate import (
        draw_head_names,
        draw_images,
        evaluate_draw,
        generator_images,
        pooled_image_features,
        read_draw_requests,
        set_draw_settings,
    )
    from mmbridge.heads_config import DrawConfig

    if not args.prompts or not os.path.isfile(args.prompts):
        raise CLIError(f"eval draw needs --prompts FILE (JSON lines or plain prompts); got {args.prompts}")
    if args.guidance_scale is not None and args.guidance_scale < 1.0:
        raise CLIError(f"--guidance-scale must be >= 1 (1 = no guidance), got {args.guidance_scale}")
    if args.steps is not None and args.steps < 1:
        raise CLIError(f"--steps must be >= 1, got {args.steps}")
    try:
        requests = read_draw_requests(args.prompts)
    except ValueError as err:
        raise CLIError(str(err)) from None
    if args.limit is not None:
        requests = requests[:args.limit]
    if not requests:
        raise CLIError(f"no prompts in {args.prompts}")
    # The generator alone needs the model only for its ViT (the Fréchet distance): --no-fid skips the load.
    pipeline = None if args.generator and args.no_fid else load_pipeline(args.model)
    out = args.out or "draw-eval"
    progress = not args.no_progress
    if args.generator == "shipped":
        from mmbridge.pretrain.recipe import SHIPPED_FOUNDATION

        args.generator = str(SHIPPED_FOUNDATION / "generator")
    if args.generator:
        if not os.path.isfile(os.path.join(args.generator, "model_index.json")):
            raise CLIError(f"--generator {args.generator!r} is not a diffusers pipeline directory "
                           "(no model_index.json)")
        defaults = DrawConfig()
        guidance = defaults.guidance_scale if args.guidance_scale is None else args.guidance_scale
        steps = args.steps or defaults.num_inference_steps
        draw = generator_images(args.generator, guidance, steps)
        settings = {"generator": args.generator, "guidance_scale": guidance, "steps": steps}
    else:
        heads = draw_head_names(pipeline.model)
        if not heads:
            raise CLIError(f"model {args.model!r} has no draw head: it cannot draw (README: heads that draw and act)")
        set_draw_settings(pipeline.model, args.guidance_scale, args.steps)
        config = pipeline.model.heads[heads[0]].config
        settings = {"model": args.model, "guidance_scale": config.guidance_scale, "steps": config.num_inference_steps,
                    "num_vokens": 1 + config.num_slots}

        def draw(prompts):
            return draw_images(pipeline, prompts, batch_size=len(prompts), progress=False,
                               max_new_tokens=config.num_slots + 8)

    def features(images):
        return pooled_image_features(pipeline.model, pipeline.processor, images).numpy()

    summary, records = evaluate_draw(draw, requests, out, None if args.no_fid else features,
                                     batch_size=args.batch_size, progress=progress)
    with open(os.path.join(out, "draw.jsonl"), "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    summary = {"task": "draw", **settings, **summary, "out": out}
    json.dump(summary, sys.stdout)
    sys.stdout.write("\n")
    return 0


def _story(args) -> int:
    """`mmbridge eval story --model DIR [--stories N] [--out DIR]`: prompted stories, drawn turn by turn."""
    import os

    from mmbridge.cli import CLIError
    from mmbridge.commands.chat import load_pipeline
    from mmbridge.evaluate import draw_head_names, evaluate_story, set_draw_settings

    if args.stories < 1:
        raise CLIError(f"--stories must be >= 1, got {args.stories}")
    pipeline = load_pipeline(args.model)
    if not draw_head_names(pipeline.model):
        raise CLIError(f"model {args.model!r} has no draw head: it cannot draw (README: heads that draw and act)")
    set_draw_settings(pipeline.model, args.guidance_scale, args.steps)
    out = args.out or "story-eval"
    summary, records = evaluate_story(pipeline, args.stories, out, progress=not args.no_progress)
    with open(os.path.join(out, "story.jsonl"), "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    json.dump({"task": "story", "model": args.model, **summary, "out": out}, sys.stdout)
    sys.stdout.write("\n")
    return 0


def _pose(args) -> int:
    """`mmbridge eval pose --model DIR --coco pose/coco_pose_SPLIT.json [--prompt ...]`: COCOeval keypoints AP."""
    from mmbridge.evaluate import POSE_PROMPT, evaluate_pose

    return _coco_task(args, "pose", evaluate_pose, POSE_PROMPT,
                      "COCO keypoints: pose/coco_pose_SPLIT.json of `mmbridge data shapes --format wave2`")


def _edit(args) -> int:
    """`mmbridge eval edit --model DIR --edits edits/edits_SPLIT.jsonl [--out DIR]`: the world reader checks each
    edited image (the requested objects, untouched objects kept, the edit applied); one JSON object."""
    import os

    from mmbridge.cli import CLIError
    from mmbridge.commands.chat import load_pipeline
    from mmbridge.evaluate import edit_images, evaluate_edit, read_edit_records

    if not args.edits or not os.path.isfile(args.edits):
        raise CLIError(f"eval edit needs --edits FILE.jsonl (edits/edits_SPLIT.jsonl of `mmbridge data shapes "
                       f"--format wave2`); got {args.edits}")
    try:
        records = read_edit_records(args.edits)[:args.limit]
    except ValueError as err:
        raise CLIError(str(err)) from None
    if not records:
        raise CLIError(f"no edit pairs in {args.edits}")
    pipeline = load_pipeline(args.model)
    routes = [h for h in pipeline.model.config.head_configs.values() if "[EDIT]" in h.routes]
    if not routes:
        raise CLIError(f"model {args.model!r} has no act head with an [EDIT] route: it cannot edit images")
    slots = len(routes[0].routes["[EDIT]"])

    def edit(requests):
        return edit_images(pipeline, requests, batch_size=len(requests), max_new_tokens=slots + 8, progress=False)

    summary, rows = evaluate_edit(edit, records, args.out, batch_size=args.batch_size, progress=not args.no_progress)
    if args.out:
        with open(os.path.join(args.out, "edit.jsonl"), "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    json.dump({"task": "edit", "model": args.model, **summary, **({"out": args.out} if args.out else {})},
              sys.stdout)
    sys.stdout.write("\n")
    return 0


def _all(args) -> int:
    """`mmbridge eval all --model DIR [--data DIR] [--scenes N] [--tasks a,b] [--limit N] [--out DIR]`."""
    import os

    from mmbridge.cli import CLIError
    from mmbridge.commands.chat import load_pipeline
    from mmbridge.evaluate_all import evaluate_all, markdown_table, write_eval_data

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else list(ALL_TASKS)
    unknown = [t for t in tasks if t not in ALL_TASKS]
    if unknown or not tasks:
        raise CLIError(f"--tasks: unknown {unknown or 'empty list'}; choose from {','.join(ALL_TASKS)}")
    if args.scenes < 1:
        raise CLIError(f"--scenes must be >= 1, got {args.scenes}")
    if args.limit is not None and args.limit < 1:
        raise CLIError(f"--limit must be >= 1, got {args.limit}")
    out = args.out or "eval-all"
    if os.path.exists(out) and not os.path.isdir(out):
        raise CLIError(f"--out {out} exists and is not a directory")

    def log(line):
        print(line, file=sys.stderr, flush=True)

    log(f"eval data: {write_eval_data(args.data, args.scenes, progress=not args.no_progress)}")
    pipeline = load_pipeline(args.model)
    results = evaluate_all(pipeline, args.data, out, tasks, args.limit, args.batch_size,
                           progress=not args.no_progress, log=log)
    table = markdown_table(results)
    header = (f"`mmbridge eval all --model {args.model}`: {args.scenes} test scenes"
              + (f", at most {args.limit} items per task" if args.limit else ""))
    with open(os.path.join(out, "all.md"), "w") as f:
        f.write(f"{header}\n\n{table}\n")
    with open(os.path.join(out, "all.json"), "w") as f:
        json.dump({"model": args.model, "scenes": args.scenes, "limit": args.limit, "tasks": results}, f, indent=1)
    print(f"{header}\n\n{table}\n\nsummaries: {os.path.join(out, 'all.json')}")
    return 0
