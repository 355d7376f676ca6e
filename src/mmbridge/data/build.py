"""Write a ShapesWorld split to disk in the ecosystem formats (what ``mmbridge data shapes`` runs).

Layout of ``out/`` (every path inside a file is relative to that file's directory)::

    images/{split}-000000.png          the images llava/coco/eval point at
    shards/shapes-{split}-000000.tar   webdataset: key.png + key.txt (short caption) + key.json (everything)
    annotations_{split}.jsonl          the full annotation of every scene (+ "image")
    llava_{split}.json                 LLaVA conversations
    coco_{split}.json                  COCO boxes + RLE masks (+ color/size attributes)
    vqa_{split}.jsonl caption_{split}.jsonl   eval files (docs/world.md), canonical questions only
    text_{split}.txt text_{split}.jsonl       text-only corpus for the language model
    pose/ edits/ stories/              wave-2 sets (format "wave2" or "all")
    manifest_{split}.json              what was written, with counts and timing

Scenes are rendered and annotated in worker processes; the parent only writes files, in index
order, so the output is identical for any number of workers.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from contextlib import ExitStack

from tqdm import tqdm

from .formats.coco import CocoBuilder, encode_mask
from .formats.evaljsonl import write_jsonl
from .formats.llava import to_llava, write_llava
from .formats.webdataset import ShardWriter
from .shapes.annotations import corpus_line
from .shapes.dataset import corpus_records, eval_questions, make_sample, sample_key
from .shapes.edits import edit_pair, make_story
from .shapes.pose import KEYPOINTS, SKELETON, sample_pose
from .shapes.world import IMAGE_SIZE, SHAPES, WORLD_VERSION, png_bytes, scene_seed

FORMATS = ("wds", "llava", "coco", "eval", "text", "wave2")
SHAPE_CATEGORIES = [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)]
PERSON_CATEGORY = [{"id": 1, "name": "person", "supercategory": "person", "keypoints": list(KEYPOINTS),
                    "skeleton": SKELETON}]


def resolve_formats(formats) -> tuple[str, ...]:
    chosen = set()
    for f in formats or ["all"]:
        chosen |= set(FORMATS) if f == "all" else {f}
    unknown = chosen - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown format(s) {sorted(unknown)}; choose from {FORMATS + ('all',)}")
    return tuple(f for f in FORMATS if f in chosen)


def _scene_job(job: tuple) -> dict:
    """Everything the parent needs to write scene ``index`` (runs in a worker)."""
    split, index, seed, formats = job
    s = make_sample(split, index, seed)
    out = {"key": s.key, "png": png_bytes(s.image), "ann": s.annotation}
    if "coco" in formats:
        out["rles"] = [encode_mask(m) for m in s.scene.masks()]
    if "eval" in formats:
        out["vqa"] = eval_questions(s.scene)
    if "text" in formats:
        out["text"] = corpus_records(s.scene)
    return out


def _wave2_job(job: tuple) -> dict:
    split, index, seed = job
    key = sample_key(split, index)
    pose = sample_pose(scene_seed(split, index, seed))
    edit = edit_pair(split, index, seed)
    story = make_story(split, index, seed)
    return {"key": key, "pose": (png_bytes(pose.render()), pose),
            "edit": (png_bytes(edit["before"].render()), png_bytes(edit["after"].render()), edit),
            "story": [(png_bytes(step["scene"].render()), step) for step in story]}


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _imap(fn, jobs, workers: int):
    if workers <= 1:
        yield from map(fn, jobs)
        return
    # fork is cheap and the parent holds nothing big; spawn would re-import numpy per worker
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    with ctx.Pool(workers) as pool:
        yield from pool.imap(fn, jobs, chunksize=16)


def generate(out: str, num: int, seed: int = 0, split: str = "train", formats=("all",),
             workers: int | None = None, shard_size: int = 1000, wave2_num: int | None = None,
             progress: bool = True) -> dict:
    """Render ``num`` scenes of ``split`` into ``out`` in ``formats``; returns the manifest."""
    formats = resolve_formats(formats)
    workers = workers if workers is not None else min(os.cpu_count() or 1, 8)
    scene_seed(split, max(num - 1, 0), seed)  # validates split/seed/num before any work
    start = time.time()
    os.makedirs(out, exist_ok=True)
    need_images = bool({"llava", "coco", "eval"} & set(formats))
    if need_images:
        os.makedirs(os.path.join(out, "images"), exist_ok=True)
    files: dict[str, list[str] | str] = {}
    llava, vqa, captions = [], [], []
    coco = CocoBuilder(SHAPE_CATEGORIES, {"description": f"ShapesWorld {split}", "version": WORLD_VERSION})

    with ExitStack() as stack:
        shards = stack.enter_context(ShardWriter(os.path.join(out, "shards", f"shapes-{split}-%06d.tar"),
                                                 shard_size)) if "wds" in formats else None
        ann_f = stack.enter_context(open(os.path.join(out, f"annotations_{split}.jsonl"), "w")) if need_images else None
        text_f = stack.enter_context(open(os.path.join(out, f"text_{split}.txt"), "w")) if "text" in formats else None
        textj_f = (stack.enter_context(open(os.path.join(out, f"text_{split}.jsonl"), "w"))
                   if "text" in formats else None)
        bar = stack.enter_context(tqdm(total=num, desc=f"shapes {split}", unit="scene", disable=not progress))
        jobs = ((split, i, seed, formats) for i in range(num))
        for rec in _imap(_scene_job, jobs, workers):
            key, ann = rec["key"], rec["ann"]
            image = f"images/{key}.png"
            if shards is not None:
                shards.write({"__key__": key, "png": rec["png"], "txt": ann["caption"], "json": ann})
            if need_images:
                _write(os.path.join(out, image), rec["png"])
                ann_f.write(json.dumps({"key": key, "image": image, **ann}, separators=(",", ":")) + "\n")
            if "llava" in formats:
                llava.append(to_llava(key, image, ann["conversation"]))
            if "coco" in formats:
                image_id = coco.add_image(image, IMAGE_SIZE, IMAGE_SIZE, key=key)
                for obj, rle in zip(ann["scene"]["objects"], rec["rles"]):
                    coco.add_annotation(image_id, obj["shape"], obj["box"], rle=rle, color=obj["color"],
                                        size=obj["size"], extent=obj["extent"])
            if "eval" in formats:
                vqa += [{"image": image, "question": q["question"], "answer": q["answer"], "type": q["type"],
                         "id": f"{key}-{k}"} for k, q in enumerate(rec["vqa"])]
                captions.append({"image": image, "id": key, "caption": ann["caption"], "objects": [
                    {"shape": o["shape"], "color": o["color"], "size": o["size"]} for o in ann["scene"]["objects"]]})
            if "text" in formats:
                for r in rec["text"]:
                    text_f.write(corpus_line(r) + "\n")
                    textj_f.write(json.dumps(r, separators=(",", ":")) + "\n")
            bar.update()
        if shards is not None:
            files["wds"] = [os.path.relpath(p, out) for p in shards.close()]

    if need_images:
        files["annotations"] = f"annotations_{split}.jsonl"
    if "llava" in formats:
        write_llava(llava, os.path.join(out, f"llava_{split}.json"))
        files["llava"] = f"llava_{split}.json"
    if "coco" in formats:
        coco.save(os.path.join(out, f"coco_{split}.json"))
        files["coco"] = f"coco_{split}.json"
    if "eval" in formats:
        write_jsonl(vqa, os.path.join(out, f"vqa_{split}.jsonl"))
        write_jsonl(captions, os.path.join(out, f"caption_{split}.jsonl"))
        files["eval"] = [f"vqa_{split}.jsonl", f"caption_{split}.jsonl"]
    if "text" in formats:
        files["text"] = [f"text_{split}.txt", f"text_{split}.jsonl"]
    counts = {"scenes": num, "vqa": len(vqa), "llava": len(llava), "coco_annotations": len(coco.annotations)}
    if "wave2" in formats:
        n2 = wave2_num if wave2_num is not None else max(1, num // 10)
        files.update(_generate_wave2(out, n2, seed, split, workers, progress))
        counts["wave2"] = n2
    manifest = {"world": WORLD_VERSION, "split": split, "seed": seed, "num": num, "formats": list(formats),
                "files": files, "counts": counts, "seconds": round(time.time() - start, 2), "workers": workers}
    with open(os.path.join(out, f"manifest_{split}.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def _generate_wave2(out: str, num: int, seed: int, split: str, workers: int, progress: bool) -> dict:
    """Pose (COCO keypoints), edit pairs and stories, each under its own folder."""
    for sub in ("pose", "edits", "stories"):
        os.makedirs(os.path.join(out, sub, "images"), exist_ok=True)
    pose_coco = CocoBuilder(PERSON_CATEGORY, {"description": f"ShapesWorld stick figures {split}"})
    edits, stories = [], []
    jobs = ((split, i, seed) for i in range(num))
    for rec in tqdm(_imap(_wave2_job, jobs, workers), total=num, desc=f"wave2 {split}", disable=not progress):
        key = rec["key"]
        png, pose = rec["pose"]
        _write(os.path.join(out, "pose", "images", f"{key}.png"), png)
        image_id = pose_coco.add_image(f"images/{key}.png", IMAGE_SIZE, IMAGE_SIZE, key=key, caption=pose.caption())
        pose_coco.add_annotation(image_id, "person", pose.box, keypoints=pose.coco_keypoints(), color=pose.color)
        before, after, edit = rec["edit"]
        _write(os.path.join(out, "edits", "images", f"{key}-before.png"), before)
        _write(os.path.join(out, "edits", "images", f"{key}-after.png"), after)
        edits.append({"id": key, "kind": edit["kind"], "instruction": edit["instruction"], "target": edit["target"],
                      "before": f"images/{key}-before.png", "after": f"images/{key}-after.png",
                      "before_scene": edit["before"].to_dict(), "after_scene": edit["after"].to_dict()})
        steps = []
        for t, (png, step) in enumerate(rec["story"]):
            _write(os.path.join(out, "stories", "images", f"{key}-{t}.png"), png)
            steps.append({"text": step["text"], "image": f"images/{key}-{t}.png", "scene": step["scene"].to_dict()})
        stories.append({"id": key, "steps": steps})
    pose_coco.save(os.path.join(out, "pose", f"coco_pose_{split}.json"))
    write_jsonl(edits, os.path.join(out, "edits", f"edits_{split}.jsonl"))
    write_jsonl(stories, os.path.join(out, "stories", f"stories_{split}.jsonl"))
    return {"pose": f"pose/coco_pose_{split}.json", "edits": f"edits/edits_{split}.jsonl",
            "stories": f"stories/stories_{split}.jsonl"}
