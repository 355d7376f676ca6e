"""Messages with content parts -> model inputs: chat template, tokens, image placeholders, labels.

Conversations are transformers-style: ``[{"role": "user", "content": [{"type": "image", "image": img},
{"type": "text", "text": "What is this?"}]}, ...]``. The Jinja chat template is rendered by the
tokenizer's `apply_chat_template` (a sandboxed Jinja environment); its ``{% generation %}`` spans mark
what the assistant says, which is what the loss is computed on (prompt and image positions get -100,
as in MiniGPT-4). Each image placeholder token then expands to `num_query_tokens` copies.
Images are preprocessed by transformers' PIL/numpy image processor (no torchvision).
"""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from transformers import AutoTokenizer, BatchFeature, BlipImageProcessorPil, PreTrainedTokenizerBase

from mmbridge.tokenization import tokenize_qformer_text

PROCESSOR_CONFIG_NAME = "processor_config.json"
CHAT_TEMPLATE_NAME = "chat_template.jinja"
IGNORE_INDEX = -100
TEMPLATE_PRESETS = ("minigpt4", "llama2", "plain")
#: Default stop strings per preset (MiniGPT-4 stops on its separator "###").
PRESET_STOP_STRINGS = {"minigpt4": ["###"], "llama2": [], "plain": []}
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096


class ImageLoadError(ValueError):
    """An image could not be read (missing file, not an image, too large, truncated)."""


def chat_template_preset(name: str) -> str:
    if name not in TEMPLATE_PRESETS:
        raise ValueError(f"unknown chat template preset {name!r}; choose from {list(TEMPLATE_PRESETS)}")
    return resources.files("mmbridge.templates").joinpath(f"{name}.jinja").read_text()


def load_image(image: Any, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """PIL image, numpy HWC array, path or raw bytes -> RGB PIL image, with clear errors.

    The pixel count is checked from the header, before decoding, so a small file claiming a huge
    size (decompression bomb) costs no memory.
    """
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        return Image.fromarray(image).convert("RGB")
    if isinstance(image, (bytes, bytearray)):
        source, name = io.BytesIO(image), "<bytes>"
    elif isinstance(image, (str, Path)):
        source, name = Path(image), str(image)
        if not source.is_file():
            raise ImageLoadError(f"image file not found: {name}")
    else:
        raise ImageLoadError(f"cannot use {type(image).__name__} as an image (give a path, bytes, PIL image or array)")
    try:
        with Image.open(source) as opened:
            width, height = opened.size
            if width * height > max_pixels:
                raise ImageLoadError(f"image {name} is {width}x{height} px, over the limit of {max_pixels} pixels")
            return opened.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError) as err:
        raise ImageLoadError(f"cannot read image {name}: {err}") from err


def normalize_messages(messages: Sequence[dict]) -> list[dict]:
    """Check roles and part types; plain-string content becomes one text part."""
    if not messages:
        raise ValueError("a conversation needs at least one message")
    normalized = []
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"message {i}: unknown role {role!r} (expected system, user or assistant)")
        content = message.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise ValueError(f"message {i}: content must be a string or a list of parts")
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in ("text", "image", "head", "region"):
                raise ValueError(f"message {i} part {j}: unknown part type {kind!r} (expected 'text' or 'image')")
            if kind == "region":
                check_region(part, f"message {i} part {j}")
                if role != "user":
                    raise ValueError(f"message {i} part {j}: a region (visual prompt) marks a user's image")
            if kind == "head" and (role != "assistant" or not isinstance(part.get("head"), str)):
                raise ValueError(f"message {i} part {j}: a head part (a head's output to train on) belongs in an "
                                 "assistant message and names its head: {'type': 'head', 'head': NAME, 'target': ...}")
            if kind == "text" and not isinstance(part.get("text"), str):
                raise ValueError(f"message {i} part {j}: a text part needs a string 'text'")
            if kind == "image" and role == "system":
                raise ValueError(f"message {i}: images can appear in user messages (inputs) and assistant "
                                 "messages (images the model draws), not in system messages")
        normalized.append({"role": role, "content": content})
    return normalized


#: transformers caches one compiled Jinja template per template string, and its `{% generation %}`
#: extension (AssistantTracker) keeps per-render state on it: two threads rendering at once fail with
#: "AssistantTracker should not be reused before closed" (the server renders from request threads and
#: its batch worker). Renders cost microseconds, so they take turns, process-wide.
_TEMPLATE_LOCK = threading.Lock()

REGION_KINDS = ("box", "point", "scribble", "mask")


def check_region(part: dict, where: str) -> None:
    """A visual prompt: exactly one of box [x0, y0, x1, y1], point [x, y], scribble [[x, y], ...] (fractions
    of the image's width and height) or mask (a 2-D array), and optionally `image`: the index of the
    conversation's image it marks (default: the last image before it)."""
    kinds = [k for k in REGION_KINDS if part.get(k) is not None]
    if len(kinds) != 1:
        raise ValueError(f"{where}: a region gives exactly one of {list(REGION_KINDS)}, got {kinds or 'none'}")
    kind, value = kinds[0], part[kinds[0]]
    if kind == "mask":
        try:
            mask = np.asarray(value, dtype=float)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: a region mask is a 2-D array of 0 / 1") from None
        if mask.ndim != 2 or not mask.size:
            raise ValueError(f"{where}: a region mask is a 2-D array of 0 / 1, got shape {mask.shape}")
        if not (mask > 0).any():
            raise ValueError(f"{where}: the region mask is empty: it marks no pixel of the image")
        return
    points = [value] if kind == "point" else value if kind == "scribble" else [value[:2], value[2:]]
    try:
        ok = len(points) > 0 and all(len(p) == 2 and all(_number(v) and 0.0 <= float(v) <= 1.0 for v in p)
                                     for p in points)
    except (TypeError, ValueError):
        ok = False
    if not ok or (kind == "box" and len(value) != 4):
        raise ValueError(f"{where}: region {kind} must be fractions of the image in [0, 1] (a region outside the "
                         f"image marks nothing), got {value!r}")
    if kind == "box" and not (float(value[0]) < float(value[2]) and float(value[1]) < float(value[3])):
        raise ValueError(f"{where}: a region box is [x0, y0, x1, y1] with x0 < x1 and y0 < y1, got {value!r}")


def _number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def region_mask(part: dict, height: int, width: int) -> np.ndarray:
    """A visual prompt rasterised as a binary mask at the image's size (a point is a small disk, a
    scribble a line of that width)."""
    from PIL import ImageDraw

    if part.get("mask") is not None:
        mask = Image.fromarray(np.asarray(part["mask"], dtype=np.uint8) * 255)
        return np.asarray(mask.resize((width, height), Image.NEAREST)) > 127
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    radius = max(1, min(width, height) // 32)
    if part.get("box") is not None:
        x0, y0, x1, y1 = part["box"]
        draw.rectangle([x0 * width, y0 * height, max(x0 * width, x1 * width - 1), max(y0 * height, y1 * height - 1)],
                       fill=255)
    else:
        points = [part["point"]] if part.get("point") is not None else part["scribble"]
        xy = [(x * width, y * height) for x, y in points]
        if len(xy) > 1:
            draw.line(xy, fill=255, width=2 * radius)
        for x, y in xy:
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=255)
    return np.asarray(canvas) > 127


def images_in(messages: Sequence[dict]) -> list[Any]:
    """The images embedded in image parts (`"image"` key), in order; None for parts without one."""
    return [part.get("image") for m in messages for part in m["content"] if part["type"] == "image"]


def image_instructions(messages: Sequence[dict]) -> list[str]:
    """For every image part, the text of the message it is in (an instruction-aware Q-Former's input)."""
    out = []
    for m in messages:
        text = " ".join(p["text"] for p in m["content"] if p["type"] == "text").strip()
        out += [text for p in m["content"] if p["type"] == "image"]
    return out


@dataclass
class EncodedConversation:
    input_ids: list[int]
    labels: list[int]
    num_images: int
    head_targets: list[tuple[str, Any]] = field(default_factory=list)  # (head, target) in reading order
    regions: list[tuple[int, dict]] = field(default_factory=list)  # (image index in the conversation, part)


class MMBridgeProcessor:
    """Image processor + tokenizer + chat template, saved beside the model (`processor_config.json`)."""

    def __init__(self, image_processor: BlipImageProcessorPil, tokenizer: PreTrainedTokenizerBase,
                 chat_template: str | None = None, num_query_tokens: int = 32, image_token: str = "<ImageHere>",
                 stop_strings: Sequence[str] = (), max_length: int | None = None,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, qformer_cls_token_id: int | None = None,
                 qformer_max_length: int = 64, heads: dict[str, dict[str, list[str]]] | None = None,
                 image_head: str | None = None, region_token: str | None = None):
        """`qformer_cls_token_id` set: the model's Q-Former is instruction-aware, and every call also
        returns `qformer_input_ids` / `qformer_attention_mask` (CLS + the text of each image's message).
        `heads`: head name -> its routes (trigger -> slot tokens), as the model's `HeadConfig.routes`
        (`register_head` fills it). An assistant part `{"type": "head", "head": TRIGGER (or the name of a
        one-route head), "target": T}` is written as the trigger and its slots, and T is returned in
        `head_targets[TRIGGER]`. `image_head`: the head that draws (MiniGPT-5's vokens); an image part in
        an assistant message is a drawing target for it (`{"image": ..., "caption": the part's own "caption", else
        the text of the user's last message}`)."""
        self.heads = {name: {t: list(s) for t, s in routes.items()} for name, routes in (heads or {}).items()}
        self.image_head = image_head
        self.region_token = region_token  # visual prompts: a region part is written as this placeholder
        self.qformer_cls_token_id = qformer_cls_token_id
        self.qformer_max_length = qformer_max_length
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = chat_template or chat_template_preset("minigpt4")
        self.num_query_tokens = num_query_tokens
        self.image_token = image_token
        self.stop_strings = list(stop_strings)
        self.max_length = max_length
        self.max_image_pixels = max_image_pixels
        if image_token not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [image_token]},
                                         replace_extra_special_tokens=False)
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

    # -- images ----------------------------------------------------------------------------
    def preprocess_images(self, images: Sequence[Any]) -> torch.Tensor:
        if not images:
            size = self.image_processor.size
            return torch.zeros(0, 3, size["height"], size["width"])
        pil = [load_image(image, self.max_image_pixels) for image in images]
        return self.image_processor(pil, return_tensors="pt")["pixel_values"]

    def instruction_inputs(self, instructions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Q-Former text inputs for an instruction-aware model (empty for a plain one)."""
        if self.qformer_cls_token_id is None:
            return {}
        ids, mask = tokenize_qformer_text(self.tokenizer, list(instructions), self.qformer_cls_token_id,
                                          self.qformer_max_length)
        return {"qformer_input_ids": ids, "qformer_attention_mask": mask}

    # -- text ------------------------------------------------------------------------------
    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        with _TEMPLATE_LOCK:
            return self.tokenizer.apply_chat_template(
                normalize_messages(messages), chat_template=self.chat_template, tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )

    def encode_text(self, text: str) -> list[int]:
        """Tokenize already-rendered text and expand image placeholders (no special tokens added)."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._expand_image_tokens(ids, [0] * len(ids))[0]

    def register_head(self, head_config) -> None:
        """Know a head the model was given (`MMBridgeModel.add_head`): its routes, and whether it draws."""
        self.heads[head_config.name] = {t: list(s) for t, s in head_config.routes.items()}
        if head_config.draws_images:
            self.image_head = head_config.name
        if head_config.region_token:
            self.region_token = head_config.region_token

    def _route(self, head: str) -> str:
        """A head part's `head` -> its route's trigger (a trigger, or the name of a one-route head)."""
        routes = {t: s for r in self.heads.values() for t, s in r.items()}
        if head in routes:
            return head
        if head in self.heads and len(self.heads[head]) == 1:
            return next(iter(self.heads[head]))
        raise ValueError(f"unknown head {head!r}; this processor knows the triggers {sorted(routes)}"
                         + (f" of head {head!r}: name one" if head in self.heads else ""))

    def assistant_images_to_heads(self, messages: list[dict]) -> list[dict]:
        """Images in assistant messages are what the model must draw: head parts of `image_head`."""
        out, caption = [], None
        for message in messages:
            if message["role"] == "user":
                caption = " ".join(p["text"] for p in message["content"] if p["type"] == "text").strip() or None
            drawn = message["role"] == "assistant" and any(p["type"] == "image" for p in message["content"])
            if drawn and self.image_head is None:
                raise ValueError("an assistant message holds an image (a drawing target), but this model has "
                                 "no drawing head (processor.image_head is unset)")
            if drawn:
                message = {**message, "content": [
                    {"type": "head", "head": self.image_head,
                     "target": {"image": p.get("image"), "caption": p.get("caption") or caption}}
                    if p["type"] == "image" else p for p in message["content"]]}
            out.append(message)
        return out

    def _write_regions(self, messages: list[dict]) -> tuple[list[dict], list[tuple[int, dict]]]:
        """Region parts -> the region placeholder; each with the index of the image it marks."""
        regions, out, seen = [], [], 0
        for message in messages:
            parts = []
            for part in message["content"]:
                if part["type"] == "image":
                    seen += 1
                elif part["type"] == "region":
                    if self.region_token is None:
                        raise ValueError("the message marks a region (a visual prompt), but this model reads none "
                                         "(no head with a region encoder)")
                    index = part.get("image", seen - 1)
                    if not isinstance(index, int) or not 0 <= index < seen:
                        raise ValueError(f"a region marks image {index!r}, but {seen} image(s) come before it")
                    regions.append((index, part))
                    part = {"type": "text", "text": self.region_token}
                parts.append(part)
            out.append({**message, "content": parts})
        return out, regions

    def _write_head_parts(self, messages: list[dict]) -> tuple[list[dict], list[tuple[str, Any]]]:
        """Head parts -> text parts holding the head's tokens; their targets in reading order."""
        targets, out = [], []
        for message in self.assistant_images_to_heads(messages):
            parts = []
            for part in message["content"]:
                if part["type"] == "head":
                    trigger = self._route(part["head"])
                    targets.append((trigger, part.get("target")))
                    part = {"type": "text", "text": trigger + "".join(self.routes[trigger])}
                parts.append(part)
            out.append({**message, "content": parts})
        return out, targets

    @property
    def routes(self) -> dict[str, list[str]]:
        """Every head's routes: trigger -> slot tokens."""
        return {t: s for routes in self.heads.values() for t, s in routes.items()}

    @property
    def slot_token_ids(self) -> set[int]:
        """Tokens forced after a head's trigger: never a training target (the trigger itself is)."""
        return set(self.tokenizer.convert_tokens_to_ids([t for slots in self.routes.values() for t in slots]))

    def encode(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> EncodedConversation:
        messages, head_targets = self._write_head_parts(normalize_messages(messages))
        messages, regions = self._write_regions(messages)
        with _TEMPLATE_LOCK:
            rendered = self.tokenizer.apply_chat_template(
                messages, chat_template=self.chat_template, tokenize=True, return_dict=True,
                return_assistant_tokens_mask=True, add_generation_prompt=add_generation_prompt,
            )
        ids = list(rendered["input_ids"])
        assistant = list(rendered.get("assistant_masks") or [0] * len(ids))
        ids, assistant = self._expand_image_tokens(ids, assistant)
        slots = self.slot_token_ids if self.heads else set()
        labels = [tok if keep and tok not in slots else IGNORE_INDEX for tok, keep in zip(ids, assistant)]
        num_images = sum(p["type"] == "image" for m in messages for p in m["content"])
        placeholders = ids.count(self.image_token_id) // self.num_query_tokens
        if placeholders != num_images:
            raise ValueError(
                f"the chat template rendered {placeholders} image placeholder(s) for {num_images} image part(s); "
                f"the template must write {self.image_token!r} once per image part"
            )
        return EncodedConversation(ids, labels, num_images, head_targets, regions)

    def check_regions(self, encoded: EncodedConversation) -> None:
        """Every `<region>` in the prompt is a marked region (a user who types the placeholder marks none), and
        every region marks a pixel at the model's input size. Not part of `encode`: a chat session keeps its
        marked regions as embeddings and re-encodes bare placeholders."""
        if self.region_token is None:
            return
        if encoded.regions:
            self.region_masks([part for _, part in encoded.regions])
        written = encoded.input_ids.count(self.tokenizer.convert_tokens_to_ids(self.region_token))
        if written != len(encoded.regions):
            raise ValueError(f"the prompt holds {written} {self.region_token} placeholder(s) but marks "
                             f"{len(encoded.regions)} region(s): mark a region with a region part "
                             f"({{'type': 'region', 'box': [x0, y0, x1, y1]}}), not by typing {self.region_token}")

    def _expand_image_tokens(self, ids: list[int], mask: list[int]) -> tuple[list[int], list[int]]:
        out_ids, out_mask = [], []
        for tok, m in zip(ids, mask):
            repeat = self.num_query_tokens if tok == self.image_token_id else 1
            out_ids += [tok] * repeat
            out_mask += [0 if tok == self.image_token_id else m] * repeat
        return out_ids, out_mask

    def __call__(self, conversations: Sequence[dict] | Sequence[Sequence[dict]], images: Sequence[Any] | None = None,
                 add_generation_prompt: bool = False, padding_side: str = "left",
                 return_labels: bool = False, truncation: bool = False,
                 return_qformer_text: bool = False) -> BatchFeature:
        """One conversation or a batch -> `input_ids`, `attention_mask`, `pixel_values` (+ `labels`).

        Images come from the image parts themselves (`{"type": "image", "image": ...}`) or, for
        parts without one, from `images` in order of appearance across the batch.
        With `return_labels`, a processor with heads also returns `head_targets` (head -> targets of
        the head parts in reading order, those cut by truncation left out). `return_qformer_text`
        adds BLIP-2 stage 1's text: `qformer_text_ids` / `qformer_text_mask`, CLS + the answer text + EOS
        of each conversation (one image each), what ITC / ITM / ITG pair with the image.
        """
        batch = [conversations] if conversations and isinstance(conversations[0], dict) else list(conversations)
        encoded = [self.encode(conv, add_generation_prompt) for conv in batch]
        for e in encoded:
            self.check_regions(e)
        all_images = self._collect_images(batch, images)
        instructions = [text for conv in batch
                        for text in image_instructions(self.assistant_images_to_heads(normalize_messages(conv)))]
        if truncation and self.max_length:
            truncated = [self._truncate(e) for e in encoded]
            # Images whose soft prompt was cut off go too (they are the last ones of their sample).
            keep = [i < t.num_images for e, t in zip(encoded, truncated) for i in range(e.num_images)]
            all_images = [img for img, k in zip(all_images, keep) if k]
            instructions = [text for text, k in zip(instructions, keep) if k]
            encoded = truncated
        elif self.max_length:
            for i, e in enumerate(encoded):
                if len(e.input_ids) > self.max_length:
                    raise ValueError(f"conversation {i} is {len(e.input_ids)} tokens, "
                                     f"over max_length {self.max_length}")
        width = max(len(e.input_ids) for e in encoded)
        pad = self.tokenizer.pad_token_id
        input_ids, attention, labels = [], [], []
        for e in encoded:
            n = width - len(e.input_ids)

            def fill(seq: list, value: int, n: int = n) -> list:
                return [value] * n + seq if padding_side == "left" else seq + [value] * n
            input_ids.append(fill(e.input_ids, pad))
            attention.append(fill([1] * len(e.input_ids), 0))
            labels.append(fill(e.labels, IGNORE_INDEX))
        data = {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "attention_mask": torch.tensor(attention, dtype=torch.long),
            "pixel_values": self.preprocess_images(all_images),
            **self.instruction_inputs(instructions),
            **self._region_inputs(encoded),
        }
        if return_qformer_text:
            data.update(self.qformer_text_inputs(batch))
        if return_labels and self.heads:
            data["head_targets"] = self._collect_head_targets(encoded)
        if return_labels:
            empty = [i for i, e in enumerate(encoded) if all(tok == IGNORE_INDEX for tok in e.labels)]
            if empty:  # a loss over no tokens is NaN; say which sample instead
                raise ValueError(
                    f"conversation(s) {empty} have no answer tokens to train on: no assistant turn, an empty "
                    "answer, a chat template without {% generation %} markers, or cut off by max_length")
            data["labels"] = torch.tensor(labels, dtype=torch.long)
        return BatchFeature(data)

    def qformer_text_inputs(self, conversations: Sequence[Sequence[dict]]) -> dict[str, torch.Tensor]:
        texts = []
        for i, conversation in enumerate(conversations):
            messages = normalize_messages(conversation)
            if len(images_in(messages)) != 1:
                raise ValueError(f"conversation {i}: Q-Former text pairs with exactly one image, "
                                 f"found {len(images_in(messages))}")
            texts.append(" ".join(p["text"] for m in messages if m["role"] == "assistant"
                                  for p in m["content"] if p["type"] == "text").strip())
        first = self.qformer_cls_token_id if self.qformer_cls_token_id is not None else self.tokenizer.bos_token_id
        ids, mask = tokenize_qformer_text(self.tokenizer, texts, first, self.qformer_max_length)
        return {"qformer_text_ids": ids, "qformer_text_mask": mask}

    def _region_inputs(self, encoded: list[EncodedConversation]) -> dict[str, torch.Tensor]:
        """`region_image_index` (which image of the batch each region marks) and `region_masks` at the
        image processor's size — what the model's region encoder reads. Empty when no region is marked."""
        if not any(e.regions for e in encoded):
            return {}
        indices, parts, offset = [], [], 0
        for e in encoded:
            indices += [offset + local for local, _ in e.regions]
            parts += [part for _, part in e.regions]
            offset += e.num_images
        return {"region_image_index": torch.tensor(indices, dtype=torch.long), "region_masks": self.region_masks(parts)}

    def region_masks(self, parts: Sequence[dict]) -> torch.Tensor:
        """Region parts -> (R, H, W) masks at the image processor's size."""
        size = self.image_processor.size
        masks = [region_mask(p, size["height"], size["width"]) for p in parts]
        if any(not m.any() for m in masks):
            raise ValueError(f"a region mask marks no pixel at the model's input size ({size['width']} x "
                             f"{size['height']}): mark a larger area")
        return torch.stack([torch.from_numpy(m) for m in masks]).float()

    def _collect_head_targets(self, encoded: list[EncodedConversation]) -> dict[str, list]:
        """Route trigger -> targets of the batch in reading order (rows, then positions)."""
        routes = self.routes
        out: dict[str, list] = {trigger: [] for trigger in routes}
        trigger_ids = {t: self.tokenizer.convert_tokens_to_ids(t) for t in routes}
        for e in encoded:
            present = {trigger: 0 for trigger in routes}
            for trigger, target in e.head_targets:
                # an occurrence survives truncation only with all its slots (as the model reads them)
                start = [i for i, tok in enumerate(e.input_ids) if tok == trigger_ids[trigger]]
                k = present[trigger]
                if k < len(start) and start[k] + len(routes[trigger]) < len(e.input_ids):
                    out[trigger].append(target)
                present[trigger] += 1
        return {trigger: targets for trigger, targets in out.items() if targets}

    def _collect_images(self, batch: list, images: Sequence[Any] | None) -> list[Any]:
        """The input images (user messages), in order; assistant images are drawing targets, not inputs."""
        embedded = [img for conv in batch
                    for img in images_in(self.assistant_images_to_heads(normalize_messages(conv)))]
        extra = list(images or [])
        needed = sum(img is None for img in embedded)
        if needed != len(extra):
            raise ValueError(
                f"the conversation(s) have {len(embedded)} image part(s), {needed} of them without an image, "
                f"but {len(extra)} image(s) were passed"
            )
        supplied = iter(extra)
        return [img if img is not None else next(supplied) for img in embedded]

    def _truncate(self, e: EncodedConversation) -> EncodedConversation:
        # Cut text from the end (MiniGPT-4's max_txt_len); never cut through an image's soft prompt.
        if len(e.input_ids) <= self.max_length:
            return e
        cut = self.max_length
        while cut > 0 and e.input_ids[cut - 1] == self.image_token_id and e.input_ids[cut] == self.image_token_id:
            cut -= 1
        ids = e.input_ids[:cut]
        num_images = ids.count(self.image_token_id) // self.num_query_tokens
        kept_regions = ids.count(self.tokenizer.convert_tokens_to_ids(self.region_token)) if self.region_token else 0
        regions = [r for r in e.regions[:kept_regions] if r[0] < num_images]
        return EncodedConversation(ids, e.labels[:cut], num_images, e.head_targets, regions)

    def decode(self, token_ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    # -- save / load -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"processor_class": type(self).__name__, "num_query_tokens": self.num_query_tokens,
                "image_token": self.image_token, "stop_strings": self.stop_strings,
                "max_length": self.max_length, "max_image_pixels": self.max_image_pixels,
                "qformer_cls_token_id": self.qformer_cls_token_id, "qformer_max_length": self.qformer_max_length,
                "heads": self.heads, "image_head": self.image_head, "region_token": self.region_token}

    def save_pretrained(self, save_directory: str | Path) -> None:
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(save_directory)
        self.image_processor.save_pretrained(save_directory)
        (save_directory / CHAT_TEMPLATE_NAME).write_text(self.chat_template)
        (save_directory / PROCESSOR_CONFIG_NAME).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> MMBridgeProcessor:
        directory = Path(directory)
        config_file = directory / PROCESSOR_CONFIG_NAME
        if not config_file.is_file():
            raise FileNotFoundError(f"{directory} has no {PROCESSOR_CONFIG_NAME}; is it an mmbridge model directory?")
        settings = json.loads(config_file.read_text())
        settings.pop("processor_class", None)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        image_processor = BlipImageProcessorPil.from_pretrained(directory)
        chat_template = (directory / CHAT_TEMPLATE_NAME).read_text()
        return cls(image_processor, tokenizer, chat_template=chat_template, **settings)
