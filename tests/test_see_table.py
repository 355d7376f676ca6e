"""The recipe's see table (pretrain/see.py): teacher-forced and free answers per type, blind baselines, and
`mmbridge eval vqa --blind`."""

from types import SimpleNamespace

import pytest
import torch

from mmbridge.pretrain.see import (
    answer_logprobs,
    blind_baselines,
    format_see_table,
    see_records,
    see_table,
    stage_see,
    teacher_forced_correct,
)
from mmbridge.testing import build_tiny


@pytest.fixture(scope="module")
def tiny():
    return build_tiny(seed=0, init_std=0.5)


def test_records_are_fixed_canonical_questions_of_val_scenes():
    a, b = see_records(3), see_records(3)
    assert [(r["question"], r["answer"]) for r in a] == [(r["question"], r["answer"]) for r in b]
    assert {r["type"] for r in a} >= {"count", "color", "shape", "exists"} and "describe" not in {r["type"] for r in a}
    assert a[0]["image"].size == (64, 64)


class _Oracle(torch.nn.Module):
    """Logits that predict each next input token (teacher forcing: always right), or, with `wrong`, the right
    token everywhere except the last position of each row."""

    def __init__(self, vocab: int, wrong: bool = False):
        super().__init__()
        self.vocab, self.wrong = vocab, wrong

    def forward(self, input_ids, attention_mask=None, **kwargs):
        target = torch.roll(input_ids, -1, dims=1)
        if self.wrong:
            last = attention_mask.sum(1) - 2  # the position that predicts the final token ("###")
            target[torch.arange(len(target)), last] = (target[torch.arange(len(target)), last] + 1) % self.vocab
        return SimpleNamespace(logits=torch.nn.functional.one_hot(target, self.vocab).float())


def test_answer_logprobs_score_the_answer_and_its_end_marker(tiny):
    _, processor = tiny
    records = see_records(2)
    vocab = len(processor.tokenizer)
    answers = [r["answer"] for r in records]
    right = answer_logprobs(_Oracle(vocab), processor, records, answers, batch_size=4)
    wrong = answer_logprobs(_Oracle(vocab, wrong=True), processor, records, answers, batch_size=4)
    assert all(w < r for r, w in zip(right, wrong))  # the end marker's token counts too


def test_teacher_forced_picks_the_most_likely_candidate_of_the_type(tiny, monkeypatch):
    import mmbridge.pretrain.see as see

    _, processor = tiny
    records = see_records(3)
    # a model that always prefers "yes", "red", "2", ...: the first answer seen of each type
    first = {}
    for r in records:
        first.setdefault(r["type"], r["answer"])
    monkeypatch.setattr(see, "answer_logprobs", lambda m, p, recs, answers, b: [
        float(a == first[r["type"]]) for r, a in zip(recs, answers)])
    correct = teacher_forced_correct(None, processor, records)
    assert correct == [r["answer"] == first[r["type"]] for r in records] and any(correct) and not all(correct)


def test_a_stage_gets_three_rows_per_type(tiny):
    model, processor = tiny
    records = see_records(2)
    rows = stage_see(model, processor, records, batch_size=8)
    assert list(rows) == ["teacher_forced", "free", "question_only"]
    types = {r["type"] for r in records}
    for row in rows.values():
        assert row["n"] == len(records) and types <= set(row) and 0 <= row["all"] <= 1


def test_blind_baselines_of_the_frozen_lm(tiny):
    model, processor = tiny
    out = blind_baselines(model.llm.model, processor.tokenizer, num_scenes=2)
    assert set(out) == {"text_upper_bound", "question_only_lm"}
    assert out["text_upper_bound"]["n"] == out["question_only_lm"]["n"] == len(see_records(2))


def test_table_collects_stages_baselines_and_retrieval():
    row = {"all": 0.5, "n": 10, "color": 0.25, "count": 1.0}
    recall = {"image_to_text_r1": 0.9, "text_to_image_r1": 0.8, "n": 1000}
    stages = {"stage1": {"itc_recall_at_1_val1000": recall},
              "stage2": {"see": {"teacher_forced": row, "free": row, "question_only": row},
                         "blind_baselines": {"text_upper_bound": row, "question_only_lm": row},
                         "itc_recall_at_1_val1000": recall},
              "stage3": {"see": {"teacher_forced": row, "free": row, "question_only": row}}}
    table = see_table(stages)
    assert [(r["stage"], r["row"]) for r in table["rows"]] == [
        ("stage2", "teacher_forced"), ("stage2", "free"), ("stage2", "question_only"),
        ("stage3", "teacher_forced"), ("stage3", "free"), ("stage3", "question_only"),
        ("frozen LM", "text_upper_bound"), ("frozen LM", "question_only_lm")]
    assert list(table["retrieval"]) == ["stage1", "stage2"]
    text = format_see_table(table)
    assert "color" in text.splitlines()[0] and "   25.0" in text and "image->text 90.0 %" in text


class _CannedPipeline:
    def __init__(self):
        self.calls = []

    def generate(self, conversations, images=None, **kwargs):
        from mmbridge.generation import GenerationResult, TextPart

        self.calls.append((conversations, images))
        return [GenerationResult([TextPart("yes")], "stop", 0, 0, [], "yes") for _ in conversations]


def test_eval_vqa_blind_leaves_the_image_out():
    from mmbridge.evaluate import evaluate_vqa

    records = [{"question": "Is there a red circle?", "answer": "yes", "type": "exists", "image_path": "/none.png"}]
    pipeline = _CannedPipeline()
    summary, _ = evaluate_vqa(pipeline, records, progress=False, blind=True)
    conversations, images = pipeline.calls[0]
    assert images is None and [p["type"] for p in conversations[0][0]["content"]] == ["text"]
    assert summary["blind"] is True and summary["accuracy"] == 1.0


def test_blind_is_for_vqa_only(capsys):
    from mmbridge.cli import main

    assert main(["eval", "caption", "--model", "x", "--questions", "y.jsonl", "--blind"]) == 2
    assert "--blind" in capsys.readouterr().err
