"""The recipe's see table: what the model answers about held-out scenes after each bridge stage, next to
blind baselines, so the stage that loses information (and what the image adds) is visible.

Per stage (stage 2, stage 3; stage 1 trains no path into the LM — its projection is still fresh — so
only its retrieval is measured), on the canonical questions (`eval_questions`) of a fixed set of val
scenes, per question type:

* `teacher_forced` — the true answer is the most likely of its type's candidate answers (teacher-forced
  log-likelihood of answer + end marker, given the image and the question): what the model *knows*,
  also where it does not yet answer in the right form (a strict all-tokens-argmax criterion would
  only repeat greedy decoding);
* `free` — greedy generation, scored like `mmbridge eval vqa` (official VQA normalisation);
* `question_only` — the same model and decoding without the image (`mmbridge eval vqa --blind`).

Blind baselines of the frozen LM (the same for every stage): `text_upper_bound` — the LM reading the
scene's description as text where the image would stand (`text_qa_accuracy`: the ceiling of a frozen
LM) — and `question_only_lm` — the LM with an empty context.
"""

from __future__ import annotations

import torch

from mmbridge.data.shapes.dataset import eval_questions
from mmbridge.data.shapes.metrics import vqa_match
from mmbridge.data.shapes.world import make_scene, render
from mmbridge.pretrain.shapes import END, accuracy_by_type, first_turn, text_qa_accuracy
from mmbridge.pretrain.text import greedy_answers

#: Row kinds of a stage, in table order.
STAGE_ROWS = ("teacher_forced", "free", "question_only")
BASELINE_ROWS = ("text_upper_bound", "question_only_lm")


def see_records(num_scenes: int, split: str = "val") -> list[dict]:
    """The canonical questions of scenes 0..num_scenes-1 of `split`, each with its scene's image."""
    records = []
    for i in range(num_scenes):
        scene = make_scene(split, i, 0)
        image = render(scene)
        records += [{"image": image, "question": q["question"], "answer": q["answer"], "type": q["type"]}
                    for q in eval_questions(scene) if q["type"] != "describe"]
    return records


def _conversation(record: dict, with_answer: bool) -> list[dict]:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": record["question"]}]}]
    if with_answer:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": record["answer"]}]})
    return messages


@torch.no_grad()
def answer_logprobs(model, processor, records: list[dict], answers: list[str], batch_size: int = 32) -> list[float]:
    """Teacher-forced log-likelihood of `answers[i]` (its tokens and the end marker, the trained tokens of
    the answer turn) given records[i]'s image and question."""
    model.eval()
    scores = []
    for i in range(0, len(records), batch_size):
        chunk = records[i:i + batch_size]
        conversations = [_conversation({**r, "answer": a}, True) for r, a in zip(chunk, answers[i:i + batch_size])]
        batch = processor(conversations, images=[r["image"] for r in chunk], return_labels=True, padding_side="right")
        labels = batch.pop("labels")
        inputs = {k: v for k, v in batch.items() if k not in ("head_targets",)}
        logprobs = model(**inputs).logits[:, :-1].float().log_softmax(-1)
        target = labels[:, 1:]
        trained = target != -100
        picked = logprobs.gather(-1, target.clamp(min=0)[..., None])[..., 0]
        scores += (picked * trained).sum(-1).tolist()
    return scores


def teacher_forced_correct(model, processor, records: list[dict], batch_size: int = 32) -> list[bool]:
    """Per record: is the true answer the most likely, under teacher forcing, of its type's candidate answers
    (every answer of that type among `records`: the colours, the shapes, yes / no, ...)? Greedy decoding
    can only be right where the strict argmax path is, so this is the row that shows what the model
    *knows* even where it has not learned the answer's form yet (after stage 2: descriptions, no yes/no)."""
    candidates: dict[str, list[str]] = {}
    for r in records:
        candidates.setdefault(r["type"], [])
        if r["answer"] not in candidates[r["type"]]:
            candidates[r["type"]].append(r["answer"])
    pairs = [(i, a) for i, r in enumerate(records) for a in candidates[r["type"]]]
    scores = answer_logprobs(model, processor, [records[i] for i, _ in pairs], [a for _, a in pairs], batch_size)
    best: dict[int, tuple[float, str]] = {}
    for (i, answer), score in zip(pairs, scores):
        if i not in best or score > best[i][0]:
            best[i] = (score, answer)
    return [best[i][1] == r["answer"] for i, r in enumerate(records)]


def stage_see(model, processor, records: list[dict], batch_size: int = 32) -> dict[str, dict]:
    """The three rows of one stage (see the module docstring), each `accuracy_by_type`."""
    from mmbridge.evaluate import evaluate_vqa
    from mmbridge.generation import MMBridgePipeline

    types = [r["type"] for r in records]
    pipeline = MMBridgePipeline(model.eval(), processor)
    out = {"teacher_forced": accuracy_by_type(teacher_forced_correct(model, processor, records, batch_size), types)}
    for row, blind in (("free", False), ("question_only", True)):
        _, predictions = evaluate_vqa(pipeline, records, batch_size, progress=False, blind=blind)
        out[row] = accuracy_by_type([p["correct"] for p in predictions], types)
    return out


@torch.no_grad()
def blind_baselines(lm, tokenizer, num_scenes: int, split: str = "val") -> dict[str, dict]:
    """The frozen LM on the same questions: from the description as text, and from the question alone
    (an empty context where the image would stand)."""
    records = see_records(num_scenes, split)
    prompts = [first_turn("", r["question"]) for r in records]
    blind = [vqa_match(p, r["answer"]) for p, r in zip(greedy_answers(lm, tokenizer, prompts, END), records)]
    return {"text_upper_bound": text_qa_accuracy(lm, tokenizer, num_scenes=num_scenes, split=split),
            "question_only_lm": accuracy_by_type(blind, [r["type"] for r in records])}


def see_table(stages: dict[str, dict]) -> dict:
    """Collect the see rows and retrieval R@1 of a recipe report's stages into one table:
    `{"rows": [{"stage", "row", "all", "n", <type>: accuracy, ...}], "retrieval": {stage: {...}}}`."""
    rows, retrieval, baselines = [], {}, None
    for name, result in stages.items():
        for row in STAGE_ROWS:
            if row in result.get("see", {}):
                rows.append({"stage": name, "row": row, **result["see"][row]})
        baselines = result.get("blind_baselines", baselines)
        if "itc_recall_at_1_val1000" in result:
            retrieval[name] = result["itc_recall_at_1_val1000"]
    for row in BASELINE_ROWS if baselines else ():
        rows.append({"stage": "frozen LM", "row": row, **baselines[row]})
    return {"rows": rows, "retrieval": retrieval}


def format_see_table(table: dict) -> str:
    """The table as aligned text lines (percentages), for the recipe log."""
    rows = table["rows"]
    lines = []
    if rows:
        types = sorted({k for r in rows for k in r} - {"stage", "row", "all", "n"})
        header = f"{'stage':<10} {'row':<17} {'n':>4} {'all':>6}" + "".join(f" {t:>8}" for t in types)
        lines.append(header)
        for r in rows:
            cells = "".join(f" {100 * r[t]:8.1f}" if t in r else f" {'-':>8}" for t in types)
            lines.append(f"{r['stage']:<10} {r['row']:<17} {r['n']:>4} {100 * r['all']:6.1f}{cells}")
    for stage, recall in table["retrieval"].items():
        lines.append(f"retrieval R@1 after {stage}: image->text {100 * recall['image_to_text_r1']:.1f} %, "
                     f"text->image {100 * recall['text_to_image_r1']:.1f} %")
    return "\n".join(lines)
