"""The lmms-eval adapter (`mmbridge.interop.lmms_plugin`) on a tiny local task with the shipped model.

lmms-eval itself is not installed here (it pulls torchvision and timm, which the CPU constraints exclude),
so the adapter's methods are called directly with requests shaped as lmms-eval 0.7 builds them
(`Instance.args`); the test that loads the class through lmms-eval runs where lmms-eval is installed.
"""

import json
import os
import sys
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from PIL import Image

from mmbridge.models import sample_images_dir

TASK, SPLIT = "shapes_local", "test"


@dataclass
class Request:  # lmms_eval.api.instance.Instance: what the model reads is `.args`
    args: tuple


def _docs(n_images=4):
    root = sample_images_dir()
    records = json.loads((root / "samples.json").read_text())[:n_images]
    return [{"image": Image.open(root / r["image"]).convert("RGB"), "question": q["question"], "answer": q["answer"]}
            for r in records for q in r["questions"]]


def doc_to_visual(doc):
    return [doc["image"]]


def doc_to_target(doc):
    return doc["answer"]


@pytest.fixture(scope="module")
def adapter():
    from mmbridge.interop.lmms_plugin import MMBridgeLMMCore

    model = MMBridgeLMMCore(pretrained="shapes", device="cpu", batch_size=4, max_new_tokens=8)
    model.task_dict = {TASK: {SPLIT: _docs()}}
    return model


def _generate_requests(docs, gen_kwargs):
    return [Request((f"{IMAGE}{d['question']}", dict(gen_kwargs), doc_to_visual, i, TASK, SPLIT))
            for i, d in enumerate(docs)]


IMAGE = "<image>\n"  # lmms-eval tasks often put the image tag in the context; the adapter removes it


def test_importing_the_adapter_does_not_need_lmms_eval():
    import mmbridge.interop.lmms_plugin as plugin

    assert "lmms_eval" not in sys.modules or plugin is not None
    if "lmms_eval" not in sys.modules:
        try:
            import lmms_eval  # noqa: F401
        except ImportError:
            with pytest.raises(ImportError, match="pip install lmms-eval"):
                plugin.MMBridgeLMMS  # noqa: B018


def test_generate_until_is_batched_and_matches_the_pipeline(adapter):
    docs = adapter.task_dict[TASK][SPLIT]
    requests = _generate_requests(docs, {"until": ["\n\n"], "max_new_tokens": 8, "temperature": 0})
    answers = adapter.generate_until(requests)
    assert len(answers) == len(docs) and all(isinstance(a, str) for a in answers)
    # the same questions one by one through the pipeline, with the model's own template
    for doc, answer in list(zip(docs, answers))[:5]:
        conversation = [{"role": "user", "content": [{"type": "image", "image": doc["image"]},
                                                     {"type": "text", "text": doc["question"]}]}]
        [alone] = adapter.pipeline.generate(conversation, max_new_tokens=8)
        assert alone.text.strip() == answer
    correct = sum(a == d["answer"] for a, d in zip(answers, docs))
    print(f"lmms adapter generate_until: {correct}/{len(docs)} exact answers on the local task")
    assert correct >= len(docs) // 2  # the shipped model answers most sample questions


def test_generate_until_cuts_at_until_and_groups_settings(adapter):
    docs = adapter.task_dict[TASK][SPLIT][:3]
    first = adapter.generate_until(_generate_requests(docs, {"max_new_tokens": 8}))
    mixed = _generate_requests(docs, {"max_new_tokens": 8}) + _generate_requests(docs, {"max_new_tokens": 1})
    answers = adapter.generate_until(mixed)
    assert answers[:3] == first
    assert all(len(adapter.answer_tokens(a)) <= 1 for a in answers[3:])
    k = next((i for i, a in enumerate(first) if len(a) >= 2), None)
    if k is not None:  # `until` cuts the answer where it starts
        requests = _generate_requests(docs, {"max_new_tokens": 8, "until": [first[k][1:]]})
        [cut] = adapter.generate_until(requests[k:k + 1])
        assert cut == first[k][:1]


def test_loglikelihood_batched_equals_single_and_knows_greedy(adapter):
    docs = adapter.task_dict[TASK][SPLIT][:6]
    generated = adapter.generate_until(_generate_requests(docs, {"max_new_tokens": 8}))
    requests = []
    for i, (doc, answer) in enumerate(zip(docs, generated)):
        requests.append(Request((IMAGE + doc["question"], answer, doc_to_visual, i, TASK, SPLIT)))  # str target
        requests.append(Request((IMAGE + doc["question"], doc_to_target, doc_to_visual, i, TASK, SPLIT)))
        requests.append(Request((IMAGE + doc["question"], "purple elephant", doc_to_visual, i, TASK, SPLIT)))
    batched = adapter.loglikelihood(requests)
    adapter.batch_size_per_gpu = 1
    try:
        single = adapter.loglikelihood(requests)
    finally:
        adapter.batch_size_per_gpu = 4
    for (lb, gb), (ls, gs) in zip(batched, single):
        assert abs(lb - ls) <= 1e-4 and gb == gs
    for k in range(len(docs)):
        own, _target, wrong = batched[3 * k: 3 * k + 3]
        assert own[1] is True  # the model's own greedy answer is greedy
        assert own[0] < wrong[0] and wrong[1] is False  # lmms-eval's convention: a loss, lower is likelier
    right = sum(batched[3 * k + 1][1] for k in range(len(docs)))
    print(f"lmms adapter loglikelihood: target is greedy for {right}/{len(docs)}")
    # the score is the mean negative log-probability of the continuation's tokens, computed by hand here
    model, processor = adapter.pipeline.model, adapter.pipeline.processor
    doc = docs[0]
    conversation = [{"role": "user", "content": [{"type": "image", "image": doc["image"]},
                                                 {"type": "text", "text": doc["question"]}]}]
    prompt = processor(conversation, add_generation_prompt=True)
    answer = adapter.answer_tokens(doc["answer"])  # as it stands in an answer (see `answer_tokens`)
    ids = torch.cat([prompt["input_ids"], torch.tensor([answer])], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=prompt["pixel_values"],
                       **{k: v for k, v in prompt.items() if k.startswith("qformer_")}).logits
    logprobs = torch.log_softmax(logits[0, -len(answer) - 1:-1].float(), -1)
    expected = -logprobs.gather(-1, torch.tensor(answer)[:, None]).mean().item()
    assert abs(batched[1][0] - expected) <= 1e-4


def test_answer_tokens_are_the_ones_the_model_writes(adapter):
    """Bug: the shipped tokenizer's words carry their trailing space ("4###" -> "4 " + "###"), so "4" alone
    tokenised to another token than the model writes in an answer, and its own greedy answer scored as not
    greedy. Continuations are now tokenised as they stand before the template's end of answer."""
    tokenizer = adapter.tokenizer
    in_answer = tokenizer("4###", add_special_tokens=False)["input_ids"][:-1]
    assert adapter.answer_tokens("4") == in_answer
    assert tokenizer.decode(adapter.answer_tokens("a red circle")).strip() == "a red circle"


def test_unknown_model_args_are_refused():
    from mmbridge.interop.lmms_plugin import MMBridgeLMMCore

    with pytest.raises(ValueError, match="unknown mmbridge model_args"):
        MMBridgeLMMCore(pretrained="shapes", bogus=1)


def test_registered_in_lmms_eval_when_installed():
    pytest.importorskip("lmms_eval.api.model")
    import re
    from importlib.metadata import EntryPoint
    from pathlib import Path

    from lmms_eval.api.model import lmms
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    section = pyproject.split('[project.entry-points."lmms_eval.models"]', 1)[1]
    target = re.search(r'^mmbridge = "([^"]+)"', section, re.M).group(1)
    entry = EntryPoint(name="mmbridge", value=target, group="lmms_eval.models")  # what pip installs
    registry = ModelRegistryV2()
    for manifest in registry._coerce_payload_to_manifests(entry.load()):  # what lmms-eval does with it
        registry.register_manifest(manifest)
    cls = registry.get_model_class("mmbridge")
    assert issubclass(cls, lmms)
    model = cls.create_from_arg_string("pretrained=shapes,batch_size=2,max_new_tokens=4,device=cpu")
    model.task_dict = {TASK: {SPLIT: _docs(1)}}
    docs = model.task_dict[TASK][SPLIT]
    assert len(model.generate_until(_generate_requests(docs, {"max_new_tokens": 4}))) == len(docs)


TASK_YAML = """task: mmbridge_shapes_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 8
  until: ["###"]
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

CHOICE_YAML = """task: mmbridge_shapes_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: !function utils.doc_to_index
doc_to_choice: !function utils.doc_to_choice
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

TASK_UTILS = """from PIL import Image

CHOICES = {choices!r}


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def doc_to_choice(doc):
    return CHOICES


def doc_to_index(doc):
    return CHOICES.index(doc["answer"])
"""


def test_lmms_eval_runs_a_local_task(tmp_path):
    """The full lmms-eval evaluator (task YAML, dataset, requests, metrics) on a local 16-question task."""
    pytest.importorskip("lmms_eval.evaluator")
    from lmms_eval import evaluator, models
    from lmms_eval.tasks import TaskManager

    from mmbridge.interop.lmms_plugin import manifest

    root = sample_images_dir()
    records = json.loads((root / "samples.json").read_text())
    data = tmp_path / "shapes_local.jsonl"
    data.write_text("".join(json.dumps({"image": str(root / r["image"]), **q}) + "\n"
                            for r in records for q in r["questions"]))
    (tmp_path / "shapes_local.yaml").write_text(TASK_YAML.format(data=data))
    (tmp_path / "shapes_local_mc.yaml").write_text(CHOICE_YAML.format(data=data))
    answers = sorted({q["answer"] for r in records for q in r["questions"]})
    (tmp_path / "utils.py").write_text(TASK_UTILS.replace("{choices!r}", repr(answers)))
    models.MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)  # what the entry point does

    results = evaluator.simple_evaluate(
        model="mmbridge", model_args="pretrained=shapes,batch_size=4,max_new_tokens=8,device=cpu",
        tasks=["mmbridge_shapes_local", "mmbridge_shapes_local_mc"],
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        log_samples=False, bootstrap_iters=0)
    generated = results["results"]["mmbridge_shapes_local"]["exact_match,none"]
    choice = results["results"]["mmbridge_shapes_local_mc"]["acc,none"]
    print(f"lmms-eval local task: exact_match {generated:.3f}, multiple-choice acc {choice:.3f}")
    assert generated >= 0.4 and choice >= 0.4
