"""mmbridge models as an lmms-eval model: `lmms-eval --model mmbridge --model_args pretrained=DIR ...`.

lmms-eval (https://github.com/EvolvingLMMs-Lab/lmms-eval) runs the standard suites (MME, MMBench, VQAv2,
TextVQA, …) on any class that subclasses its `lmms_eval.api.model.lmms` and answers three calls, each
on a list of requests whose `.args` are (lmms-eval 0.7, "simple" models):

* `generate_until`: `(context, gen_kwargs, doc_to_visual, doc_id, task, split)` -> one string each;
* `loglikelihood`:  `(context, doc_to_target, doc_to_visual, doc_id, task, split)` -> `(score, is_greedy)`,
  the continuation being `doc_to_target` (a string, or a function of the document). The score follows what
  lmms-eval's own models return and its multiple-choice scorer expects (`argmin`): the continuation's mean
  per-token negative log-likelihood, i.e. LLaVA's `outputs.loss` (lmms-eval issue #370), not a log-probability;
* `generate_until_multi_round`: not supported (raises).

`doc_to_visual(self.task_dict[task][split][doc_id])` gives the document's images (PIL). Each request
becomes one user message — its images, then the context's text (lmms-eval's `<image>` tags removed) —
rendered by the model's own chat template, so the prompt is the one the model was trained on.

lmms-eval is imported lazily: `MMBridgeLMMCore` holds the logic and needs only mmbridge; the class
lmms-eval loads, `MMBridgeLMMS` (this module's attribute, created on first access), adds lmms-eval's
base class. lmms-eval finds it through the `lmms_eval.models` entry point (`pyproject.toml`), which
returns `manifest()`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch

MODEL_ID = "mmbridge"
IMAGE_TAG = "<image>"  # lmms-eval's image marker in contexts


def _flatten(visuals) -> list:
    out = []
    for item in visuals or []:
        if isinstance(item, (list, tuple)):
            out.extend(_flatten(item))
        elif item is not None:
            out.append(item)
    return out


class MMBridgeLMMCore:
    """The adapter's logic over `MMBridgePipeline`; `task_dict` is filled by lmms-eval's evaluator."""

    is_simple = True

    def __init__(self, pretrained: str = "shapes", device: str | None = None, dtype: str | None = None,
                 batch_size: int | str = 8, max_new_tokens: int = 64, **kwargs: Any) -> None:
        from mmbridge.generation import MMBridgePipeline
        from mmbridge.interop.loading import resolve_dtype
        from mmbridge.models import resolve_model_path

        super().__init__()  # lmms-eval's `lmms.__init__` when it is the base (rank, world size, task_dict)
        if kwargs:
            raise ValueError(f"unknown mmbridge model_args {sorted(kwargs)}; known: pretrained, device, dtype, "
                             "batch_size, max_new_tokens")
        self.pipeline = MMBridgePipeline.from_pretrained(resolve_model_path(pretrained), dtype=resolve_dtype(dtype))
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.pipeline.model.to(self._device)
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.task_dict: dict = getattr(self, "task_dict", {}) or {}
        self._rank, self._world_size = 0, 1

    # lmms-eval reads these
    @property
    def model(self):
        return self.pipeline.model

    @property
    def tokenizer(self):
        return self.pipeline.processor.tokenizer

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    # -- requests -> conversations ---------------------------------------------------------------
    def _visuals(self, doc_to_visual, doc_id, task, split) -> list:
        if doc_to_visual is None:
            return []
        return _flatten(doc_to_visual(self.task_dict[task][split][doc_id]))

    @staticmethod
    def _conversation(context: str, visuals: Sequence[Any]) -> list[dict]:
        text = " ".join(context.replace(IMAGE_TAG, " ").split()) if IMAGE_TAG in context else context.strip()
        content = [{"type": "image", "image": image} for image in visuals] + [{"type": "text", "text": text}]
        return [{"role": "user", "content": content}]

    def _continuation(self, doc_to_target, doc_id, task, split) -> str:
        if isinstance(doc_to_target, str):
            return doc_to_target
        return doc_to_target(self.task_dict[task][split][doc_id])

    # -- generate_until ----------------------------------------------------------------------------
    def _sampling(self, gen_kwargs: dict) -> tuple[dict, list[str]]:
        gen_kwargs = dict(gen_kwargs or {})
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen_kwargs.get("temperature") or 0)
        options = {"max_new_tokens": int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens),
                   "num_beams": int(gen_kwargs.get("num_beams") or 1),
                   "do_sample": bool(gen_kwargs.get("do_sample", temperature > 0)) and temperature > 0}
        if options["do_sample"]:
            options.update(temperature=temperature, top_p=float(gen_kwargs.get("top_p") or 1.0))
        return options, until

    def generate_until(self, requests) -> list[str]:
        """Batched (up to `batch_size` requests with the same generation settings per call), greedy by
        default; each answer is cut at the first of its `until` strings."""
        args = [request.args for request in requests]
        results: list[str | None] = [None] * len(args)
        groups: dict[str, list[int]] = {}
        for i, (_, gen_kwargs, *_rest) in enumerate(args):
            groups.setdefault(json.dumps(gen_kwargs or {}, sort_keys=True, default=str), []).append(i)
        for indices in groups.values():
            options, until = self._sampling(args[indices[0]][1])
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                conversations = [self._conversation(args[i][0], self._visuals(*args[i][2:6])) for i in chunk]
                answers = self.pipeline.generate(conversations, stop=until, **options)
                for i, answer in zip(chunk, answers):
                    text = answer.text
                    hits = [text.find(s) for s in until if s and s in text]
                    results[i] = (text[:min(hits)] if hits else text).strip()
        return results  # type: ignore[return-value]

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("mmbridge's lmms-eval adapter does not support multi-round generation")

    # -- loglikelihood -----------------------------------------------------------------------------
    @torch.no_grad()
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(mean negative log-likelihood of the continuation's tokens given the prompt — lower is likelier,
        lmms-eval's convention —, whether greedy decoding produces exactly those tokens). Batched by
        `batch_size` (right-padded); `continuation_logprobs` gives the summed log-probabilities instead."""
        return [(-total / n, greedy) for total, n, greedy in self.continuation_logprobs(requests)]

    @torch.no_grad()
    def answer_tokens(self, text: str) -> list[int]:
        """The token ids of `text` as it stands in an answer: tokenised with the template's end of answer (its first
        stop string) after it, keeping the tokens that cover `text`'s characters. A tokenizer whose words carry their
        trailing space (the shapes tokenizer writes "4###" as "4 " + "###") has a different token for "4" at the end
        of a string than inside an answer; scoring that one would score what the model never writes."""
        stops = self.pipeline.processor.stop_strings
        if not stops or not getattr(self.tokenizer, "is_fast", False):
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        encoded = self.tokenizer(text + stops[0], add_special_tokens=False, return_offsets_mapping=True)
        return [i for i, (begin, _) in zip(encoded["input_ids"], encoded["offset_mapping"]) if begin < len(text)]

    def continuation_logprobs(self, requests) -> list[tuple[float, int, bool]]:
        """(log P(continuation | prompt) summed over its tokens, number of tokens, is_greedy) per request."""
        processor = self.pipeline.processor
        out: list[tuple[float, int, bool]] = []
        args = [request.args for request in requests]
        for start in range(0, len(args), self.batch_size):
            chunk = args[start:start + self.batch_size]
            conversations = [self._conversation(a[0], self._visuals(*a[2:6])) for a in chunk]
            continuations = [self._continuation(a[1], *a[3:6]) for a in chunk]
            # lmms-eval writes its target delimiter (" ") before a continuation; a chat template whose
            # generation prompt already ends in whitespace ("###Assistant: ") must not get a second one.
            continuations = [c.lstrip() if processor.render(conv, add_generation_prompt=True)[-1:].isspace() else c
                             for c, conv in zip(continuations, conversations)]
            prompt = processor(conversations, add_generation_prompt=True, padding_side="right")
            rows, spans = [], []
            for ids, mask, continuation in zip(prompt["input_ids"], prompt["attention_mask"], continuations):
                head = ids[mask.bool()].tolist()
                tail = self.answer_tokens(continuation)
                if not tail:
                    raise ValueError(f"the continuation {continuation!r} has no tokens")
                rows.append(head + tail)
                spans.append((len(head), len(tail)))
            width = max(len(r) for r in rows)
            pad = self.tokenizer.pad_token_id
            input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
            attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
            inputs = {k: v for k, v in prompt.items() if k not in ("input_ids", "attention_mask", "labels")}
            inputs = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
            logits = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                                **inputs).logits.float()
            logprobs = torch.log_softmax(logits, dim=-1)
            for row, (n_prompt, n_cont) in enumerate(spans):
                targets = input_ids[row, n_prompt:n_prompt + n_cont].to(self.device)
                scores = logprobs[row, n_prompt - 1:n_prompt - 1 + n_cont]
                total = scores.gather(-1, targets[:, None]).sum().item()
                greedy = bool((scores.argmax(-1) == targets).all())
                out.append((total, n_cont, greedy))
        return out


_CLASS = None


def __getattr__(name: str):
    """`MMBridgeLMMS`: the lmms-eval model class, built (and lmms-eval imported) on first access."""
    global _CLASS
    if name != "MMBridgeLMMS":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _CLASS is None:
        try:
            from lmms_eval.api.model import lmms
        except ImportError as err:
            raise ImportError("the mmbridge lmms-eval model needs lmms-eval: pip install lmms-eval") from err

        class MMBridgeLMMS(MMBridgeLMMCore, lmms):
            """mmbridge model for lmms-eval (`--model mmbridge --model_args pretrained=DIR,batch_size=8`)."""

            is_simple = True

            def loglikelihood(self, requests):
                return [_survive_unwrap(result) for result in MMBridgeLMMCore.loglikelihood(self, requests)]

        MMBridgeLMMS.__module__ = __name__
        _CLASS = MMBridgeLMMS
    return _CLASS


def _survive_unwrap(result: tuple[float, bool]):
    """lmms-eval 0.7.3's evaluator passes every response through `unwrap_generation_output`, which turns a
    `(float, bool)` pair into its string (breaking `loglikelihood` / `multiple_choice` tasks for every model);
    a `GenerationResult` holding the pair comes back out unchanged. Versions that keep pairs get the pair."""
    try:
        from lmms_eval.api.instance import GenerationResult, unwrap_generation_output
    except ImportError:
        return result
    if unwrap_generation_output(result)[0] == result:
        return result
    return GenerationResult(text=result)


def manifest():
    """lmms-eval's `lmms_eval.models` entry point: registers `--model mmbridge`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.MMBridgeLMMS")
