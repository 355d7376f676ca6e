"""Generation: batched and streaming answers, chat sessions that keep their KV cache across turns.

`generate` returns typed output parts (text, and what the model's heads decoded), so callers — the CLI,
the server, the UI — never parse strings to learn what the model produced. Decoding itself is
transformers' `generate` (greedy / sampling / beam, stop strings, streamers) in all three paths (batched,
streaming, chat sessions), each with the same head hook:

1. a logits processor forces a head's slot tokens right after its trigger (and suppresses them anywhere
   else), so the slots sit in the KV cache exactly as in training and the answer simply continues;
2. after generation, rows that hold a trigger get one forward pass over prompt + answer (a post-pass,
   batched) whose hidden states at trigger + slots go to the head's `decode`;
3. the decoded tensors become parts (`generation.parts`) in the order they were written.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import DynamicCache, GenerationConfig, LogitsProcessor, LogitsProcessorList, TextIteratorStreamer

from mmbridge.generation.parts import OutputPart, TextPart, build_part
from mmbridge.modeling import MMBridgeModel
from mmbridge.processing import MMBridgeProcessor, image_instructions, images_in, normalize_messages


@dataclass
class GenerationResult:
    parts: list[OutputPart]
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list, repr=False)
    raw_text: str = field(default="", repr=False)  # the answer as generated, before stripping

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.parts if p.type == "text")


@dataclass
class SamplingOptions:
    """What a user may set per request; mapped onto a transformers `GenerationConfig`."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    num_beams: int = 1
    repetition_penalty: float = 1.0
    stop: Sequence[str] = ()
    seed: int | None = None

    def generation_config(self, base: GenerationConfig, processor: MMBridgeProcessor) -> GenerationConfig:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        tokenizer = processor.tokenizer
        config = GenerationConfig.from_dict(base.to_dict())
        config.update(
            max_new_tokens=self.max_new_tokens, do_sample=self.do_sample, num_beams=self.num_beams,
            repetition_penalty=self.repetition_penalty, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, stop_strings=self.stop_strings(processor) or None,
            max_length=None,
            # The image placeholder is input-only: generated, it would ask for a soft prompt that does
            # not exist (and break the next chat turn), so its logit is always -inf. Head slot tokens are
            # only ever forced after their trigger (`HeadSlotForcer`).
            suppress_tokens=[processor.image_token_id, *sorted(processor.slot_token_ids),
                             *([processor.tokenizer.convert_tokens_to_ids(processor.region_token)]
                               if processor.region_token else [])],
        )
        if self.do_sample:
            config.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or None)
        else:
            config.update(temperature=None, top_p=None, top_k=None)
        return config

    def stop_strings(self, processor: MMBridgeProcessor) -> list[str]:
        return list(dict.fromkeys([*processor.stop_strings, *self.stop]))


def _rng(seed: int | None):
    if seed is None:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.random.fork_rng(devices=[]))
    torch.manual_seed(seed)
    return stack


def _cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    hits = [text.find(s) for s in stops if s and s in text]
    return (text[: min(hits)], True) if hits else (text, False)


class HeadSlotForcer(LogitsProcessor):
    """After a head's trigger token, force its slot tokens one by one (per row, so batches and beams
    work). transformers applies custom processors after its own (suppression included), so a forced
    slot wins over the suppression that keeps slots out of free text."""

    def __init__(self, slots_after: dict[int, list[int]]):
        self.slots_after = slots_after
        self.longest = max((len(v) for v in slots_after.values()), default=0)

    def next_forced(self, row: list[int]) -> int | None:
        for back in range(1, self.longest + 1):  # is the token `back` places ago a trigger still owed slots?
            if len(row) < back:
                break
            slots = self.slots_after.get(row[-back])
            if slots is not None and back <= len(slots) and row[len(row) - back + 1:] == slots[:back - 1]:
                return slots[back - 1]
        return None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        tails = input_ids[:, -self.longest:].tolist() if self.longest else []
        for row, tail in enumerate(tails):
            forced = self.next_forced(tail)
            if forced is not None:
                scores[row] = float("-inf")
                scores[row, forced] = 0.0
        return scores


class RoutesOpenAnswers(LogitsProcessor):
    """Routing tokens of heads whose routes only open an answer (`ActConfig.route_mid_answer` false) are
    suppressed once the answer has a token. `prompt_length`: how many of the ids `generate` passes are the
    prompt's (0 when it generates from embeddings and passes only the new tokens)."""

    def __init__(self, trigger_ids: list[int], prompt_length: int = 0):
        self.trigger_ids, self.prompt_length = trigger_ids, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] > self.prompt_length:
            scores[:, self.trigger_ids] = float("-inf")
        return scores


class MMBridgePipeline:
    """Model + processor -> answers. Components are passed in, as in diffusers pipelines."""

    def __init__(self, model: MMBridgeModel, processor: MMBridgeProcessor):
        self.model = model.eval()
        self.processor = processor
        _check_processor_matches(model, processor)
        ids = model.config.added_tokens
        routes = {t: s for head in model.config.head_configs.values() for t, s in head.routes.items()}
        self.trigger_ids = {ids[t] for t in routes}
        self.slot_forcer = HeadSlotForcer({ids[t]: [ids[s] for s in slots] for t, slots in routes.items()})
        self.opening_triggers = sorted(ids[t] for head in model.config.head_configs.values()
                                       if not getattr(head, "route_mid_answer", True) for t in head.routes)

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, quantize: str | None = None,
                        kv_cache: str | None = None, compile: bool = False,
                        merge_adapters: bool = False) -> MMBridgePipeline:
        """Load a model dir. `quantize="int8"`, `kv_cache="static"`, `compile`, `merge_adapters`: decode
        options (`generation.decode_options`; measured by `mmbridge bench`)."""
        from mmbridge.generation.decode_options import apply_decode_options

        model = MMBridgeModel.from_pretrained(path, dtype=dtype, quantize=quantize)
        apply_decode_options(model, kv_cache=kv_cache, compile=compile, merge_adapters=merge_adapters)
        return cls(model, MMBridgeProcessor.from_pretrained(path))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _options(self, options: SamplingOptions | None, kwargs: dict) -> SamplingOptions:
        return SamplingOptions(**kwargs) if options is None else options

    def _logits_processors(self, prompt_length: int = 0) -> LogitsProcessorList:
        """The slot forcer, and the suppression of opening-only routes after an answer's first token.
        `prompt_length`: as `RoutesOpenAnswers` takes it."""
        processors = [self.slot_forcer] if self.trigger_ids else []
        if self.opening_triggers:  # before the forcer: a trigger's forced slots are never suppressed
            processors.insert(0, RoutesOpenAnswers(self.opening_triggers, prompt_length))
        return LogitsProcessorList(processors)

    def _decode_heads(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, new_ids: torch.Tensor,
                      images: Callable[[], tuple[torch.Tensor | None, ...]]) -> list[list[tuple[int, str, str, dict]]]:
        """Per row: (position in the answer, head name, route trigger, decoded tensors) of every head it
        triggered. One batched forward over the rows that need it; `images` -> (soft prompts, vision
        features, region features, pixels in [0, 1]) is computed only then."""
        found: list[list[tuple[int, str, str, dict]]] = [[] for _ in range(len(new_ids))]
        if not self.trigger_ids or not any(int(t) in self.trigger_ids for t in new_ids.flatten().tolist()):
            return found
        full = torch.cat([prompt_ids, new_ids], dim=1)
        mask = torch.cat([prompt_mask, torch.ones_like(new_ids)], dim=1)
        width = prompt_ids.shape[1]
        soft_prompts, vision_features, region_features, pixels = images()
        decoded = self.model.decode_heads(full, mask, soft_prompts, vision_features, region_features, pixels)
        for row, position, name, trigger, tensors in decoded:
            if position >= width:  # triggers in the prompt (earlier turns) were decoded then
                found[row].append((position - width, name, trigger, tensors))
        return found

    # -- one shot, batched -----------------------------------------------------------------
    @torch.no_grad()
    def generate(self, conversations: Sequence[dict] | Sequence[Sequence[dict]], images: Sequence[Any] | None = None,
                 options: SamplingOptions | None = None, stopping_criteria=None, **kwargs) -> list[GenerationResult]:
        """Answer one conversation or a batch (left-padded, each sample stops on its own).

        `stopping_criteria` (a transformers `StoppingCriteriaList`) is passed through to `generate`;
        the server uses it to abort rows whose client went away.
        """
        options = self._options(options, kwargs)
        inputs = self.processor(conversations, images=images, add_generation_prompt=True).to(self.device)
        config = options.generation_config(self.model.llm.model.generation_config, self.processor)
        with _rng(options.seed):
            new_tokens = self.model.generate(**inputs, generation_config=config, tokenizer=self.processor.tokenizer,
                                             stopping_criteria=stopping_criteria,
                                             logits_processor=self._logits_processors())
        heads = self._decode_heads(inputs["input_ids"], inputs["attention_mask"], new_tokens,
                                   lambda: self._images(inputs))
        prompt_lengths = inputs["attention_mask"].sum(dim=1).tolist()
        return [self._result(row.tolist(), options, n, found)
                for row, n, found in zip(new_tokens, prompt_lengths, heads)]

    def _images(self, inputs) -> tuple[torch.Tensor | None, ...]:
        """(soft prompts, vision features, region features, pixels in [0, 1]) of a processed batch's images."""
        if inputs["pixel_values"].shape[0] == 0:
            return None, None, None, None
        pixel_values = inputs["pixel_values"]
        vision_features = self.model.vision(pixel_values)
        instructions = inputs.get("qformer_input_ids"), inputs.get("qformer_attention_mask")
        query_states = self.model.get_query_states(pixel_values, *instructions, vision_features)
        soft_prompts = self.model.project_queries(query_states)
        regions = None
        if inputs.get("region_masks") is not None:
            regions = self.model.region_features(pixel_values, inputs["region_image_index"], inputs["region_masks"],
                                                 vision_features, *instructions, query_states)
        return soft_prompts, vision_features, regions, self._pixels(pixel_values)

    def _pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The processor's normalisation undone: the images as the vision encoder saw them, in [0, 1]
        (what an editing head starts from)."""
        processor = self.processor.image_processor
        if getattr(processor, "do_normalize", False):
            mean = torch.tensor(processor.image_mean, device=pixel_values.device, dtype=torch.float32)
            std = torch.tensor(processor.image_std, device=pixel_values.device, dtype=torch.float32)
            pixel_values = pixel_values.float() * std[:, None, None] + mean[:, None, None]
        return pixel_values.float().clamp(0, 1)

    def _result(self, new_ids: list[int], options: SamplingOptions, prompt_tokens: int,
                heads: Sequence[tuple[int, str, str, dict]] = ()) -> GenerationResult:
        tokenizer = self.processor.tokenizer
        finished = tokenizer.eos_token_id in new_ids
        kept = new_ids[: new_ids.index(tokenizer.eos_token_id)] if finished else list(new_ids)
        while kept and kept[-1] == tokenizer.pad_token_id:  # rows that stopped early are padded
            kept.pop()
        raw = tokenizer.decode(kept, skip_special_tokens=True)
        stops = options.stop_strings(self.processor)
        answer, stopped = _cut_at_stop(raw, stops)
        reason = "stop" if finished or stopped else "length"
        parts = self._parts(kept, heads, stops) if heads else [TextPart(answer.strip())]
        return GenerationResult(parts, reason, prompt_tokens, len(kept), kept, answer)

    def _parts(self, kept: list[int], heads: Sequence[tuple[int, str, str, dict]], stops: Sequence[str]) -> list:
        """Text and head parts in reading order, cut at the first stop string like the plain answer."""
        configs = self.model.config.head_configs
        pieces, cursor = [], 0
        for position, name, trigger, tensors in heads:
            if position >= len(kept):
                continue
            pieces.append(self.processor.tokenizer.decode(kept[cursor:position], skip_special_tokens=True))
            pieces.append(build_part(configs[name].kind, name, trigger, tensors))
            cursor = position + 1 + len(configs[name].routes[trigger])
        pieces.append(self.processor.tokenizer.decode(kept[cursor:], skip_special_tokens=True))
        parts = []
        for piece in pieces:
            if not isinstance(piece, str):
                parts.append(piece)
                continue
            text, stopped = _cut_at_stop(piece, stops)
            if text:
                parts.append(TextPart(text))
            if stopped:
                break
        if parts and parts[0].type == "text":
            parts[0].text = parts[0].text.lstrip()
        if parts and parts[-1].type == "text":
            parts[-1].text = parts[-1].text.rstrip()
        return [p for p in parts if p.type != "text" or p.text]

    # -- streaming -------------------------------------------------------------------------
    def stream(self, conversation: Sequence[dict], images: Sequence[Any] | None = None,
               options: SamplingOptions | None = None, stopping_criteria=None, **kwargs) -> Iterator[str]:
        """Yield text as it is produced; the pieces join to exactly `generate(...)[0].text`.

        The final `GenerationResult` is the generator's return value (`StopIteration.value`).
        """
        options = self._options(options, kwargs)
        inputs = self.processor(conversation, images=images, add_generation_prompt=True).to(self.device)
        config = options.generation_config(self.model.llm.model.generation_config, self.processor)
        holder: dict[str, Any] = {}

        def run(streamer):
            beams = options.num_beams > 1  # transformers cannot stream beam search: emit at the end
            with _rng(options.seed):
                holder["ids"] = self.model.generate(**inputs, generation_config=config,
                                                    tokenizer=self.processor.tokenizer,
                                                    streamer=None if beams else streamer,
                                                    stopping_criteria=stopping_criteria,
                                                    logits_processor=self._logits_processors())[0].tolist()
            if beams:
                _emit_all(streamer, holder["ids"])

        yield from self._stream_text(run, options)
        new = torch.tensor([holder["ids"]], device=self.device)
        with torch.no_grad():
            heads = self._decode_heads(inputs["input_ids"], inputs["attention_mask"], new,
                                       lambda: self._images(inputs))[0]
        return self._result(holder["ids"], options, int(inputs["attention_mask"].sum()), heads)

    def _stream_text(self, run, options: SamplingOptions) -> Iterator[str]:
        streamer = SnapshotStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        errors: list[BaseException] = []

        def target():
            try:
                run(streamer)
            except BaseException as err:  # surfaced in the caller's thread below
                errors.append(err)
                streamer.end()

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        yield from StopStringFilter(options.stop_strings(self.processor)).filter_snapshots(streamer)
        thread.join()
        if errors:
            raise errors[0]

    # -- sessions --------------------------------------------------------------------------
    def chat(self, system: str | None = None, reuse_cache: bool = True, **defaults) -> ChatSession:
        return ChatSession(self, system=system, reuse_cache=reuse_cache, **defaults)


class SnapshotStreamer(TextIteratorStreamer):
    """A `TextIteratorStreamer` that queues the whole answer decoded so far after every token instead of the
    new characters. transformers' streamer assumes decoding is prefix-stable; a tokenizer whose decoder
    rejoins words and punctuation (the shapes tokenizer decodes "4 " then "4###") breaks that, and its
    deltas would show "4 ##". `StopStringFilter.filter_snapshots` turns the snapshots into clean pieces."""

    def put(self, value):
        if len(value.shape) > 1:
            if value.shape[0] > 1:
                raise ValueError("streaming supports one sequence at a time")
            value = value[0]
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self.token_cache.extend(value.tolist())
        self.on_finalized_text(self.tokenizer.decode(self.token_cache, **self.decode_kwargs))

    def end(self):
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs) if self.token_cache else None
        self.token_cache, self.next_tokens_are_prompt = [], True
        if text is None:  # nothing generated (or `_emit_all` already sent the whole answer)
            self.text_queue.put(self.stop_signal, timeout=self.timeout)
        else:
            self.on_finalized_text(text, stream_end=True)


class StopStringFilter:
    """Turns raw streamed text into what the non-streaming answer shows: cut at the first stop
    string, leading/trailing whitespace stripped. Holds back text that may be the start of a stop
    string or trailing whitespace until the next piece decides."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]

    def filter(self, pieces) -> Iterator[str]:
        """From pieces that join to the text (deltas)."""
        return self.filter_snapshots(itertools.accumulate(pieces))

    def filter_snapshots(self, snapshots) -> Iterator[str]:
        """From snapshots: each the whole text so far (`SnapshotStreamer`). Characters already shown are never
        taken back, so the last word waits for the next snapshot (as transformers' streamer waits for a space)."""
        text, emitted, stopped = "", 0, False
        for snapshot in snapshots:
            if stopped:
                continue  # drain the streamer so the generating thread can finish
            text = snapshot
            cut, stopped = _cut_at_stop(text, self.stops)
            safe = len(cut) if stopped else len(cut) - self._held_back(cut)
            if not stopped:  # the last word may still change: the rest of a character's bytes, rejoined punctuation
                safe = min(safe, max(cut.rfind(" "), cut.rfind("\n")) + 1)
            visible = cut[:safe].rstrip()
            start = len(visible) - len(visible.lstrip()) if emitted == 0 else 0
            if len(visible) > emitted:
                yield visible[max(emitted, start):]
                emitted = len(visible)
        if not stopped and text.strip():
            tail = text.rstrip()
            if len(tail) > emitted:
                yield tail[emitted:] if emitted else tail.lstrip()

    def _held_back(self, text: str) -> int:
        for k in range(min(len(text), max((len(s) for s in self.stops), default=0)), 0, -1):
            if any(s.startswith(text[-k:]) for s in self.stops):
                return k
        return 0


class ChatSession:
    """A multi-turn conversation that keeps the LLM's KV cache between turns.

    Each turn the whole conversation is tokenised again (cheap) and the cache is kept for the
    longest common token prefix with what it already holds, so turn N only runs the LLM over its own
    new tokens — even when a template re-tokenises an earlier answer differently. Image soft prompts
    are computed once per image. `reuse_cache=False` re-encodes everything each turn (the reference).
    """

    def __init__(self, pipeline: MMBridgePipeline, system: str | None = None, reuse_cache: bool = True, **defaults):
        self.pipeline = pipeline
        self.reuse_cache = reuse_cache
        self.defaults = defaults
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self._image_features: list[torch.Tensor] = []  # soft prompts, one tensor per user turn with images
        self._vision_features: list[torch.Tensor] = []  # what heads read (act decoders attend to the image)
        self._region_features: list[torch.Tensor] = []  # visual prompts, one tensor per user turn with regions
        self._pixels: list[torch.Tensor] = []  # the images in [0, 1] (what an editing head starts from)
        self._cache: DynamicCache | None = None
        self._cached_ids: list[int] = []

    def reset(self) -> None:
        self.messages = [m for m in self.messages if m["role"] == "system"]
        self._image_features, self._vision_features, self._region_features, self._pixels = [], [], [], []
        self._cache, self._cached_ids = None, []

    def _add_user_turn(self, content: str | list[dict], images: Sequence[Any] | None) -> None:
        if isinstance(content, str):
            content = [*({"type": "image"} for _ in images or ()), {"type": "text", "text": content}]
        message = normalize_messages([{"role": "user", "content": content}])[0]
        supplied = iter(images or ())
        resolved = []
        for image in images_in([message]):
            try:
                resolved.append(image if image is not None else next(supplied))
            except StopIteration:
                raise ValueError("the message has more image parts than images were given") from None
        if next(supplied, None) is not None:
            raise ValueError("more images were given than the message has image parts")
        processor = self.pipeline.processor
        pixel_values = processor.preprocess_images(resolved).to(self.pipeline.device)
        if resolved:
            instructions = {k: v.to(self.pipeline.device)
                            for k, v in processor.instruction_inputs(image_instructions([message])).items()}
            with torch.no_grad():
                vision_features = self.pipeline.model.vision(pixel_values)
                self._vision_features.append(vision_features)
                self._pixels.append(self.pipeline._pixels(pixel_values))
                query_states = self.pipeline.model.get_query_states(pixel_values, **instructions,
                                                                    vision_features=vision_features)
                self._image_features.append(self.pipeline.model.project_queries(query_states))
            _, regions = processor._write_regions([message])
            if regions:  # visual prompts mark this message's images
                masks = processor.region_masks([part for _, part in regions]).to(self.pipeline.device)
                index = torch.tensor([i for i, _ in regions], device=self.pipeline.device)
                with torch.no_grad():
                    self._region_features.append(self.pipeline.model.region_features(
                        pixel_values, index, masks, vision_features, **instructions, query_states=query_states))
        elif any(p["type"] == "region" for p in message["content"]):
            raise ValueError("in a chat session a region marks an image of the same message")
        # Images (and marked regions) are kept as embeddings only; the messages keep bare placeholders.
        bare = [{"type": "text", "text": p["text"]} if p["type"] == "text"
                else {"type": "text", "text": processor.region_token} if p["type"] == "region" else {"type": p["type"]}
                for p in message["content"]]
        self.messages.append({"role": "user", "content": bare})

    def ask(self, content: str | list[dict], images: Sequence[Any] | None = None, **kwargs) -> GenerationResult:
        stream = self.ask_stream(content, images, **kwargs)
        while True:
            try:
                next(stream)
            except StopIteration as done:
                return done.value

    def ask_stream(self, content: str | list[dict], images: Sequence[Any] | None = None, **kwargs) -> Iterator[str]:
        """Stream the answer to a new user turn; the `GenerationResult` is the generator's return value."""
        options = SamplingOptions(**{**self.defaults, **kwargs})
        self._add_user_turn(content, images)
        pipeline, model = self.pipeline, self.pipeline.model
        target = pipeline.processor.encode(self.messages, add_generation_prompt=True).input_ids
        ids = torch.tensor([target], device=pipeline.device)
        features = torch.cat(self._image_features) if self._image_features else None
        regions = torch.cat(self._region_features) if self._region_features else None
        config = options.generation_config(model.llm.model.generation_config, pipeline.processor)
        holder: dict[str, Any] = {}

        def run(streamer):
            model.llm.hook_output_layer()
            with torch.no_grad(), _rng(options.seed):
                embeds = model.embed_inputs(ids, image_features=features, region_features=regions)
                if options.num_beams > 1:  # beams need a cache per beam: encode from scratch
                    out = model.llm.model.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids),
                                                   generation_config=config, tokenizer=pipeline.processor.tokenizer,
                                                   logits_processor=pipeline._logits_processors())
                    holder["new"], self._cache, self._cached_ids = out[0].tolist(), None, []
                    _emit_all(streamer, holder["new"])
                    return
                cache, start = self._reusable_cache(target)
                if start < len(target) - 1:
                    model.llm(inputs_embeds=embeds[:, start:-1], past_key_values=cache, use_cache=True,
                              position_ids=torch.arange(start, len(target) - 1, device=ids.device)[None],
                              logits_to_keep=1)  # only the cache is wanted: skip the prefix's logits
                pad = pipeline.processor.tokenizer.pad_token_id
                text_ids = ids.masked_fill(ids == model.config.image_token_index, pad)
                # The session's own cache, even where a static one is configured. generate() fills a config's
                # unset fields from the model's, so only an argument overrides a static default — and transformers
                # warns about arguments next to a generation_config, so it is passed only then.
                config.cache_implementation = None
                static = {"cache_implementation": None} if model.llm.model.generation_config.cache_implementation \
                    else {}
                out = model.llm.model.generate(input_ids=text_ids, attention_mask=torch.ones_like(ids),
                                               past_key_values=cache, generation_config=config, streamer=streamer,
                                               tokenizer=pipeline.processor.tokenizer, **static,
                                               logits_processor=pipeline._logits_processors(len(target)))
                holder["new"], self._cache = out[0, len(target):].tolist(), cache

        yield from pipeline._stream_text(run, options)
        with torch.no_grad():
            vision = torch.cat(self._vision_features) if self._vision_features else None
            pixels = torch.cat(self._pixels) if self._pixels else None
            heads = pipeline._decode_heads(ids, torch.ones_like(ids), torch.tensor([holder["new"]], device=ids.device),
                                           lambda: (features, vision, regions, pixels))[0]
        result = pipeline._result(holder["new"], options, len(target), heads)
        if self._cache is not None:
            self._cached_ids = target + result.token_ids
            _crop_to(self._cache, len(self._cached_ids))
        self.messages.append({"role": "assistant", "content": [{"type": "text",
                                                                "text": self._written(result, options)}]})
        return result

    def _written(self, result: GenerationResult, options: SamplingOptions) -> str:
        """The answer as the model wrote it, heads' routing and slot tokens included, for the history: with the
        answer's plain text (`raw_text`, special tokens skipped) the next turn would read "[DET]…" as nothing —
        a conversation the model never saw — and its cache would no longer match the history."""
        tokenizer = self.pipeline.processor.tokenizer
        structural = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
        text = tokenizer.decode([t for t in result.token_ids if t not in structural], skip_special_tokens=False)
        return _cut_at_stop(text, options.stop_strings(self.pipeline.processor))[0]

    def _reusable_cache(self, target: list[int]) -> tuple[DynamicCache, int]:
        if not (self.reuse_cache and self._cache is not None):
            return DynamicCache(), 0
        common = 0
        for a, b in zip(self._cached_ids, target):
            if a != b:
                break
            common += 1
        keep = min(common, len(target) - 1)
        _crop_to(self._cache, keep)
        return self._cache, self._cache.get_seq_length()


def _emit_all(streamer: SnapshotStreamer, token_ids: list[int]) -> None:
    streamer.on_finalized_text(streamer.tokenizer.decode(token_ids, skip_special_tokens=True), stream_end=True)


def _crop_to(cache: DynamicCache, length: int) -> None:
    """Keep the first `length` positions (transformers' `crop` takes how many to remove)."""
    excess = cache.get_seq_length() - length
    if excess > 0:
        cache.crop(-excess)


def _check_processor_matches(model: MMBridgeModel, processor: MMBridgeProcessor) -> None:
    """The model config is the one source of truth; a processor saved beside it must agree with it."""
    config = model.config
    if processor.num_query_tokens != config.num_query_tokens:
        raise ValueError(f"the processor expands each image to {processor.num_query_tokens} tokens but the model "
                         f"has {config.num_query_tokens} queries; save the processor with the model")
    expected = {name: head.routes for name, head in config.head_configs.items()}
    if processor.heads != expected:
        raise ValueError(f"the processor's heads {processor.heads} differ from the model's {expected}")
