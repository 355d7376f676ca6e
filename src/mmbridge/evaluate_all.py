"""`mmbridge eval all`: every task a model can do, on one set of held-out ShapesWorld scenes, in one table.

The eval files are written once into a data folder (`write_eval_data`: test-split scenes in the eval
and wave-2 formats, the act eval files, draw prompts of 1–2 and 3–4 objects) and reused by later runs
with the same scene count and seed. The model is loaded once; each task it supports is scored with the
same function as its own `mmbridge eval TASK`, and a task the model lacks (no draw head, no `[POSE]`
route, …) is listed with the reason instead of a number.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

# task -> (the numbers the table shows: summary key, label); the full summaries go to the JSON.
HEADLINES: dict[str, tuple[tuple[str, str], ...]] = {
    "vqa": (("accuracy", "accuracy"), ("worst_type", "worst type")),
    "caption": (("f1", "triple F1"),),
    "retrieval": (("image_to_text_r1", "R@1 image→text"), ("text_to_image_r1", "R@1 text→image")),
    "detect": (("bbox_ap", "box AP"), ("bbox_ap50", "box AP50")),
    "segment": (("segm_ap", "mask AP"), ("segm_ap50", "mask AP50")),
    "ground": (("accuracy", "acc@IoU0.5"),),
    "region": (("accuracy", "accuracy"),),
    "route": (("accuracy", "accuracy (held-out phrasings)"),),
    "draw12": (("faithful", "faithful, 1–2 objects"),),
    "draw34": (("faithful", "faithful, 3–4 objects"),),
    "story": (("good", "steps faithful + consistent"),),
    "pose": (("keypoints_ap", "keypoint AP"),),
    "edit": (("accuracy", "accuracy"),),
}
TASKS = tuple(HEADLINES)
DATA_MANIFEST = "eval_all_data.json"


def write_eval_data(out: str | os.PathLike, scenes: int = 1000, seed: int = 0, progress: bool = True) -> Path:
    """The eval files of every task for `scenes` test-split scenes (a quarter as many stick figures and edit
    pairs; the figures' held-out `[POSE]` requests join the route file). Nothing is rewritten when `out` already
    holds them for the same `scenes` and `seed`."""
    from mmbridge.data.build import generate
    from mmbridge.data.shapes.act_eval import write_act_eval
    from mmbridge.data.shapes.faithfulness import draw_prompt_records

    out = Path(out)
    manifest = {"scenes": scenes, "seed": seed, "split": "test", "version": 2}  # 2: pose requests in route
    if (out / DATA_MANIFEST).is_file() and json.loads((out / DATA_MANIFEST).read_text()) == manifest:
        return out
    out.mkdir(parents=True, exist_ok=True)
    generate(str(out), scenes, seed, "test", ["eval", "wave2"], wave2_num=max(1, scenes // 4), progress=progress)
    write_act_eval(out / "act", scenes, split="test", seed=seed, pose_figures=max(1, scenes // 4))
    for name, (lo, hi) in (("prompts_12.jsonl", (1, 2)), ("prompts_34.jsonl", (3, 4))):
        with open(out / name, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in draw_prompt_records(scenes, lo, hi, seed))
    (out / DATA_MANIFEST).write_text(json.dumps(manifest))  # last: a half-written folder is rewritten
    return out


def evaluate_all(pipeline, data_dir: str | os.PathLike, out_dir: str | os.PathLike, tasks: Sequence[str] = TASKS,
                 limit: int | None = None, batch_size: int = 32, progress: bool = True,
                 log: Callable[[str], None] = lambda line: None) -> dict[str, dict]:
    """Score `pipeline` on each of `tasks` with the files of `write_eval_data(data_dir)`; `limit` caps the
    items of every task (questions, prompts, images, stories, edit pairs). Returns {task: summary}; a task
    the model cannot do has `{"skipped": reason}`. Each summary is also written to `out_dir/TASK.json`
    (draw, story and edit images under `out_dir/TASK/`)."""
    data, out = Path(data_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown eval task(s) {unknown}; choose from {list(TASKS)}")
    results = {}
    for task in tasks:
        start = time.perf_counter()
        try:
            summary = _run(task, pipeline, data, out, limit, batch_size, progress)
        except ValueError as err:  # what the model cannot do, said by the task's own evaluator
            summary = {"skipped": str(err)}
        summary = {"task": task, **summary, "seconds": round(time.perf_counter() - start, 1)}
        (out / f"{task}.json").write_text(json.dumps(summary, default=_jsonable, indent=1))
        results[task] = summary
        log(f"{task}: {_headline_text(task, summary)} ({summary['seconds']} s)")
    return results


def _run(task: str, pipeline, data: Path, out: Path, limit: int | None, batch_size: int, progress: bool) -> dict:
    from mmbridge import evaluate as ev
    from mmbridge import evaluate_act as ea
    from mmbridge.data.formats.evaljsonl import read_eval_jsonl

    def head_records(name, required):
        records, _ = ea.read_act_jsonl(str(data / "act" / f"{name}_test.jsonl"), required)
        return records[:limit]

    if task in ("vqa", "caption", "retrieval"):
        kind = "vqa" if task == "vqa" else "caption"
        records = list(read_eval_jsonl(str(data / f"{kind}_test.jsonl"), kind=kind, check_images=True))[:limit]
        if task == "vqa":
            summary = ev.evaluate_vqa(pipeline, records, batch_size, progress=progress)[0]
            per_type = summary.get("per_type") or {}
            if per_type:
                worst = min(per_type, key=lambda t: _accuracy(per_type[t]))
                summary["worst_type"] = f"{worst} {_accuracy(per_type[worst]):.3f}"
            return summary
        if task == "caption":
            return ev.evaluate_caption(pipeline, records, batch_size, progress=progress)[0]
        return ev.evaluate_retrieval(pipeline.model, pipeline.processor, records, max(batch_size, 64),
                                     progress=progress)[0]
    if task in ("detect", "segment", "pose"):
        coco = data / "act" / ("coco_pose_test.json" if task == "pose" else "coco_test.json")
        if task == "segment" and not _has_route(pipeline, "[SEG]"):
            raise ValueError("this model has no act head with a [SEG] route: it cannot segment")
        evaluate, prompt = ((ev.evaluate_pose, ev.POSE_PROMPT) if task == "pose" else
                            (ev.evaluate_detection, "Segment every {category}." if task == "segment"
                             else ev.DETECTION_PROMPT))
        with _score_threshold(pipeline.model, 0.05):  # COCOeval integrates over scores (as `eval detect`)
            summary = evaluate(pipeline, str(coco), prompt, min(batch_size, 16), limit, progress=progress)[0]
        summary.pop("f1_by_threshold", None)
        return summary
    if task == "ground":
        return ea.evaluate_grounding(pipeline, head_records("ground", ("image", "expression", "box")),
                                     batch_size=min(batch_size, 16), progress=progress)[0]
    if task == "region":
        return ea.evaluate_region(pipeline, head_records("region", ("image", "question", "region", "answer")),
                                  batch_size=min(batch_size, 16), progress=progress)[0]
    if task == "route":
        return ea.evaluate_routing(pipeline, head_records("route", ("image", "request", "route")),
                                   batch_size=min(batch_size, 16), progress=progress)[0]
    if task in ("draw12", "draw34", "story"):
        heads = ev.draw_head_names(pipeline.model)
        if not heads:
            raise ValueError("this model has no draw head: it cannot draw")
        slots = pipeline.model.heads[heads[0]].config.num_slots
        if task == "story":
            return ev.evaluate_story(pipeline, limit or 100, out / task, progress=progress)[0]
        requests = ev.read_draw_requests(str(data / f"prompts_{task[4:]}.jsonl"))[:limit]

        def draw(prompts):
            return ev.draw_images(pipeline, prompts, batch_size=len(prompts), progress=False,
                                  max_new_tokens=slots + 8)

        summary = ev.evaluate_draw(draw, requests, out / task, None, batch_size=min(batch_size, 8),
                                   progress=progress)[0]
        return summary
    # edit
    routes = [h for h in pipeline.model.config.head_configs.values() if "[EDIT]" in h.routes]
    if not routes:
        raise ValueError("this model has no act head with an [EDIT] route: it cannot edit images")
    records = ev.read_edit_records(str(data / "edits" / "edits_test.jsonl"))[:limit]
    slots = len(routes[0].routes["[EDIT]"])

    def edit(requests):
        return ev.edit_images(pipeline, requests, batch_size=len(requests), max_new_tokens=slots + 8, progress=False)

    return ev.evaluate_edit(edit, records, out / task, batch_size=min(batch_size, 8), progress=progress)[0]


def _has_route(pipeline, route: str) -> bool:
    return any(route in h.routes for h in pipeline.model.config.head_configs.values())


class _score_threshold:
    """Every act head's serving score threshold set to `value` for a block, then restored."""

    def __init__(self, model, value: float):
        self.heads = [h for h in model.heads.values() if h.config.kind == "act"]
        self.value, self.saved = value, [h.config.score_threshold for h in self.heads]

    def __enter__(self):
        for head in self.heads:
            head.config.score_threshold = self.value

    def __exit__(self, *exc):
        for head, saved in zip(self.heads, self.saved):
            head.config.score_threshold = saved


def _accuracy(entry) -> float:
    return entry["accuracy"] if isinstance(entry, dict) else float(entry)


def _jsonable(value):
    return value.item() if hasattr(value, "item") else str(value)


def _headline_text(task: str, summary: dict) -> str:
    if "skipped" in summary:
        return f"skipped ({summary['skipped']})"
    return ", ".join(f"{label} {_fmt(summary.get(key))}" for key, label in HEADLINES[task])


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "—" if value is None else str(value)


def markdown_table(results: dict[str, dict]) -> str:
    """One row per (task, headline number): `| task | metric | value | n | seconds |`."""
    lines = ["| task | metric | value | n | seconds |", "|---|---|---|---|---|"]
    for task, summary in results.items():
        if "skipped" in summary:
            lines.append(f"| {task} | — | not supported: {summary['skipped']} | | |")
            continue
        n = next((summary[k] for k in ("n", "prompts", "images", "steps", "pairs", "edits") if k in summary), "")
        for key, label in HEADLINES[task]:
            lines.append(f"| {task} | {label} | {_fmt(summary.get(key))} | {n} | {summary['seconds']} |")
    return "\n".join(lines)
