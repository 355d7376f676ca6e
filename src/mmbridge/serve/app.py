"""The OpenAI-compatible HTTP API: `create_app(pipeline_or_loader, settings)` -> FastAPI app.

Routes: `POST /v1/chat/completions` (plain and SSE streaming; drawn images as `message.images`),
`POST /v1/images/generations` (OpenAI Images API, `b64_json`; models with a draw head), `GET /v1/models`, `GET /health`
(liveness: the process answers) and `GET /health/ready` (readiness: 503 until the model is loaded;
loading runs in a background thread so the port opens at once).

Every request is checked completely *before* it takes a generation slot, cheapest first:
1. on the event loop, costing microseconds: strict field types, lone surrogates, stop strings (count,
   length), penalties, `n`, image count, and a lower bound on the prompt's tokens from its UTF-8 size
   (`bytes / longest token`), so a 25 MB message is refused without being tokenized;
2. in a small image pool (never the generation thread), under a deadline: every image's header is read
   and the request's declared pixels summed *before* any image is decoded, then the images decoded;
3. in a worker thread: the chat template and tokenizer, the exact token and context limits.
Every failure is the OpenAI error envelope with a 4xx status naming the offending `param`; unexpected
failures are a bare 500 envelope (the traceback goes to the server log, never to the client).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from mmbridge.generation import GenerationResult, SamplingOptions, part_to_dict
from mmbridge.processing import REGION_KINDS, check_region
from mmbridge.serve.batching import Batcher, Cancelled, Overloaded
from mmbridge.serve.errors import APIError, envelope
from mmbridge.serve.images import (
    DEFAULT_FORMATS,
    ImageInputError,
    ImagePolicy,
    RemoteFetcher,
    image_bytes,
    image_size,
    open_image,
)
from mmbridge.serve.metrics import Metrics, MetricsMiddleware
from mmbridge.serve.schemas import (
    ADDITIVE_PENALTIES,
    REFUSED_FIELDS,
    UNSUPPORTED_WHEN_SET,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    ImageData,
    ImageGenerationRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
    ResponseMessage,
    Usage,
    dump,
)
from mmbridge.serve.security import APIKeyMiddleware, BodyLimitMiddleware

log = logging.getLogger(__name__)
MiB = 1024 * 1024


@dataclass
class ServeSettings:
    model_name: str = "mmbridge"
    api_key: str | None = None              # set: /v1/* needs `Authorization: Bearer <key>`
    # request limits
    max_images: int = 8                     # image parts per request
    max_n: int = 4                          # choices per request
    max_stop: int = 4                       # stop strings (OpenAI's limit)
    default_max_tokens: int = 256           # when the request gives none (capped by the context)
    default_temperature: float = 0.0        # 0 = greedy; short factual answers suit the shapes model
    max_body_bytes: int = 32 * MiB
    max_image_bytes: int = 8 * MiB
    max_image_pixels: int = 4096 * 4096
    max_request_image_pixels: int = 4096 * 4096  # all of a request's images together, from their headers
    image_formats: tuple[str, ...] = DEFAULT_FORMATS
    image_fetcher: RemoteFetcher | None = None  # None: http(s) image URLs are refused
    image_workers: int = 2                  # threads decoding images (bounds their memory and CPU)
    image_timeout_s: float = 10.0           # to fetch and decode one request's images
    max_input_tokens: int | None = None     # prompt tokens per request (None: up to the context)
    max_stop_chars: int = 128               # characters per stop string
    # timeouts
    body_timeout_s: float = 30.0            # to receive a request's whole body (408 after)
    queue_timeout_s: float = 120.0          # a request waiting this long for its batch gets 503 + Retry-After
    shutdown_timeout_s: float = 10.0        # drain: running requests get this long after SIGTERM
    # batching / admission
    max_batch_size: int = 8
    batch_wait_ms: float = 5.0
    max_queue: int = 32
    # web UI mounted at /ui (`serve --ui`)
    ui: bool = False
    keep_uploads: bool = False


class ServerState:
    """The model and batcher once loaded; the load error if it failed."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.pipeline = None
        self.batcher: Batcher | None = None
        self.error: str | None = None
        self.error_detail: str | None = None  # one line for the operator (log, exit message); may name files
        self.on_load_failure: Callable[[], None] | None = None  # `mmbridge serve`: stop the server, exit non-zero
        self.created = int(time.time())
        self.context_length = 0
        self.max_token_bytes = 1
        self.image_pool = ThreadPoolExecutor(max(1, settings.image_workers), thread_name_prefix="mmbridge-images")
        self.metrics = Metrics(queue_depth=lambda: self.batcher.queued if self.batcher else 0,
                               running_rows=lambda: self.batcher.stats["active"] if self.batcher else 0,
                               ready=lambda: float(self.ready))

    def start(self, pipeline_or_loader) -> None:
        if hasattr(pipeline_or_loader, "generate"):
            self._install(pipeline_or_loader)
        else:
            threading.Thread(target=self._load, args=(pipeline_or_loader,), name="mmbridge-load", daemon=True).start()

    def _load(self, loader: Callable[[], Any]) -> None:
        try:
            self._install(loader())
        except Exception as err:  # readiness reports it; `mmbridge serve` then exits non-zero
            from mmbridge.interop.loading import explain_load_error

            detail = explain_load_error(getattr(loader, "path", "the model"), err)
            log.error("model load failed: %s", detail or repr(err), exc_info=detail is None)
            self.error_detail = detail or f"{type(err).__name__}: {err}".splitlines()[0]
            self.error = f"model failed to load: {type(err).__name__}"
            if self.on_load_failure is not None:
                self.on_load_failure()

    def _install(self, pipeline) -> None:
        s = self.settings
        text_config = pipeline.model.config.text_config
        self.context_length = pipeline.processor.max_length or getattr(text_config, "max_position_embeddings", 2048)
        self.max_token_bytes = _max_token_bytes(pipeline.processor.tokenizer)
        self.batcher = Batcher(pipeline, s.max_batch_size, s.batch_wait_ms, s.max_queue)
        self.batcher.on_batch = self.metrics.batch
        self.batcher.start()
        self.pipeline = pipeline  # set last: readiness flips only when everything is in place

    def stop(self) -> None:
        if self.batcher:
            self.batcher.stop()
        self.image_pool.shutdown(wait=False, cancel_futures=True)

    @property
    def ready(self) -> bool:
        return self.pipeline is not None

    def require_ready(self) -> None:
        if self.error:
            raise APIError(503, self.error, type="server_error", code="model_load_failed")
        if not self.ready:
            raise APIError(503, "the model is still loading", type="server_error", code="model_loading",
                           headers={"Retry-After": "5"})


def create_app(pipeline_or_loader, settings: ServeSettings | None = None) -> FastAPI:
    """`pipeline_or_loader`: an `MMBridgePipeline`, or a no-argument callable returning one (loaded
    in a background thread at startup; readiness reports 503 until it returns)."""
    settings = settings or ServeSettings()
    state = ServerState(settings)

    @asynccontextmanager
    async def lifespan(app):
        state.start(pipeline_or_loader)
        yield
        state.stop()

    app = FastAPI(title="mmbridge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.mmbridge = state
    _install_error_handlers(app, state.metrics)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    if settings.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)  # added last = runs first: sees every answer

    @app.get("/metrics")
    async def metrics():
        if not state.metrics.enabled:
            raise APIError(501, "metrics need prometheus_client: pip install 'mmbridge[serve]'",
                           type="server_error", code="metrics_unavailable")
        payload, content_type = state.metrics.render()
        return Response(payload, media_type=content_type)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/health/ready")
    async def ready():
        state.require_ready()
        return {"status": "ready", "model": settings.model_name}

    @app.get("/v1/models")
    async def models():
        return dump(ModelList(data=[ModelCard(id=settings.model_name, created=state.created)]))

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        _check_model(model_id, settings)
        return dump(ModelCard(id=settings.model_name, created=state.created))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        state.require_ready()
        body = await _parse_body(request)
        _check_fields(body, settings)
        _check_cheap_limits(body, state)
        if state.batcher.queued >= state.batcher.max_queue:  # cheap early refusal, before decoding images
            _submit_refused(state)
        conversation = _restore_routes(body, await _convert(body, state), state)
        prompt_tokens, options = await asyncio.to_thread(_tokenize, body, conversation, state)
        if body.stream:
            return _stream(body, conversation, options, state, request)
        job = _submit(state, conversation, options, body.n)
        results = await _wait(job, request, state)
        state.metrics.tokens(prompt_tokens, sum(r.completion_tokens for r in results))
        return dump(ChatCompletion(
            id=_new_id(), created=int(time.time()), model=settings.model_name,
            choices=[Choice(index=i, message=_message(r, body), finish_reason=r.finish_reason)
                     for i, r in enumerate(results)],
            usage=_usage(results, prompt_tokens),
        ))

    @app.post("/v1/images/generations")
    async def images_generations(request: Request):
        state.require_ready()
        body = await _parse_body(request, ImageGenerationRequest)
        conversation, options, prompt = await asyncio.to_thread(_image_request, body, state)
        job = _submit(state, conversation, options, 1)
        [result] = await _wait(job, request, state)
        state.metrics.tokens(result.prompt_tokens, result.completion_tokens)
        drawn = [p for p in result.parts if p.type == "image"]
        if not drawn:
            said = result.text.strip()
            raise APIError(400, "the model answered without drawing an image"
                           + (f": {said[:200]!r}" if said else "") + " — ask for something it can draw",
                           param="prompt", code="image_not_drawn")
        url = part_to_dict(drawn[0])["url"]
        return dump(ImagesResponse(created=int(time.time()), data=[
            ImageData(b64_json=url.split(",", 1)[1], revised_prompt=prompt)]))

    if settings.ui:
        _mount_ui(app, state, settings)
    return app


#: Longest Images API prompt accepted (OpenAI's dall-e-3 limit); the token limits apply as well.
MAX_IMAGE_PROMPT_CHARS = 4000


def _draw_head(state: ServerState):
    """The model's (first) head that draws images, or None."""
    model = state.pipeline.model
    names = [n for n, h in model.config.head_configs.items() if getattr(h, "draws_images", False)]
    return model.heads[names[0]] if names else None


def _image_request(body: ImageGenerationRequest, state: ServerState) -> tuple[list[dict], SamplingOptions, str]:
    """Checks of an Images API request (worker thread: tokenizes) -> (conversation, options, chat prompt)."""
    from mmbridge.evaluate import draw_prompt

    settings = state.settings
    if body.model is not None:
        _check_model(body.model, settings)
    where = _find_surrogate(body.model_dump(exclude_none=True), "")
    if where:
        raise APIError(400, f"{where} holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text",
                       param=where, code="invalid_string")
    head = _draw_head(state)
    if head is None:
        raise APIError(400, f"model {settings.model_name!r} has no draw head: it cannot generate images",
                       param="model", code="model_cannot_draw")
    if body.n != 1:
        raise APIError(400, f"n is {body.n}: this server draws one image per request (n = 1)", param="n",
                       code="unsupported_value")
    side = head.generator.image_size
    if body.size not in (None, "auto", f"{side}x{side}"):
        raise APIError(400, f"size {body.size!r} is not supported: this model draws {side}x{side} images only",
                       param="size", code="unsupported_value")
    if body.response_format not in (None, "b64_json"):
        raise APIError(400, f"response_format {body.response_format!r} is not supported: images are returned "
                       "inline as 'b64_json' (the server hosts no files)", param="response_format",
                       code="unsupported_value")
    if len(body.prompt) > MAX_IMAGE_PROMPT_CHARS:
        raise APIError(400, f"the prompt is {len(body.prompt)} characters, over the limit of "
                       f"{MAX_IMAGE_PROMPT_CHARS}", param="prompt", code="limit_exceeded")
    prompt = draw_prompt(body.prompt)
    conversation = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
    try:
        prompt_tokens = len(state.pipeline.processor.encode(conversation, add_generation_prompt=True).input_ids)
    except ValueError as err:
        raise APIError(400, str(err), param="prompt", code="invalid_prompt") from None
    # room for a short preface, the trigger and its forced slots
    wanted = len(head.config.routes[head.config.trigger]) + 1 + 24
    limit = settings.max_input_tokens
    if (limit is not None and prompt_tokens > limit) or prompt_tokens + wanted > state.context_length:
        raise APIError(400, f"the prompt is {prompt_tokens} tokens: too long to draw within the context of "
                       f"{state.context_length}", param="prompt", code="context_length_exceeded")
    return conversation, SamplingOptions(max_new_tokens=wanted), prompt


# -- request checks ------------------------------------------------------------------------------

def _check_model(name: str, settings: ServeSettings) -> None:
    if name != settings.model_name:
        raise APIError(404, f"model {name!r} does not exist; this server serves {settings.model_name!r}",
                       param="model", code="model_not_found")


def _check_fields(body: ChatCompletionRequest, settings: ServeSettings) -> None:
    extra = body.model_extra or {}
    for name in REFUSED_FIELDS:
        if name in extra:
            raise APIError(400, f"'{name}' is not accepted: the server renders prompts with the model's own chat "
                           "template and embeds inputs itself", param=name, code="unsupported_parameter")
    for name in UNSUPPORTED_WHEN_SET:
        if extra.get(name) not in (None, False, [], {}, "none", "auto"):
            raise APIError(400, f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")
    if body.response_format and body.response_format.get("type") not in (None, "text"):
        raise APIError(400, "only response_format {'type': 'text'} is supported", param="response_format",
                       code="unsupported_parameter")
    _check_model(body.model, settings)
    if body.n > settings.max_n:
        raise APIError(400, f"n is {body.n}, over this server's limit of {settings.max_n}", param="n",
                       code="limit_exceeded")


#: Bodies above this are parsed and validated in a worker thread, not on the event loop.
_PARSE_INLINE_BYTES = 256 * 1024


async def _parse_body(request: Request, schema=ChatCompletionRequest):
    """JSON + pydantic validation of the body; big bodies off the event loop (a 25 MB message takes
    ~0.2 s to parse, which would stall every other connection), then their freed memory is handed back."""
    raw = await request.body()

    def parse() -> ChatCompletionRequest:
        if not raw:
            raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required"}])
        try:
            data = json.loads(raw)
        except ValueError:
            raise RequestValidationError([{"type": "json_invalid", "loc": ("body", 0), "msg": "JSON decode error"}]
                                         ) from None
        if not isinstance(data, dict):
            raise RequestValidationError([{"type": "model_type", "loc": ("body",), "msg": "not an object"}])
        try:
            return schema.model_validate(data)
        except ValidationError as err:
            raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in err.errors()]) from None

    if len(raw) <= _PARSE_INLINE_BYTES:
        return parse()
    try:
        return await asyncio.to_thread(parse)
    finally:
        asyncio.get_running_loop().call_soon(_release_memory_soon)


_trim_pending = threading.Event()


def _release_memory_soon() -> None:
    """After a big body: ask glibc to return freed heap pages to the OS (its heap otherwise keeps the
    pages of 25 MB strings and bytes as RSS). One trim at a time, in a thread; a no-op elsewhere."""
    if _trim_pending.is_set():
        return
    _trim_pending.set()

    def trim():
        time.sleep(0.5)  # let the request's objects go first
        _trim_pending.clear()
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass

    threading.Thread(target=trim, name="mmbridge-trim", daemon=True).start()


_SURROGATE = re.compile("[\ud800-\udfff]")


def _max_token_bytes(tokenizer) -> int:
    """The most UTF-8 bytes any single token stands for (decoded, or as its vocabulary string)."""
    longest = 1
    for token_id in range(len(tokenizer)):
        for text in (tokenizer.decode([token_id]), tokenizer.convert_ids_to_tokens(token_id) or ""):
            longest = max(longest, len(text.encode("utf-8", "surrogatepass")))
    return longest


def _find_surrogate(value, path: str) -> str | None:
    """Path of the first string holding a lone UTF-16 surrogate (valid JSON escapes, not text)."""
    if isinstance(value, str):
        return path if _SURROGATE.search(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            child = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and _SURROGATE.search(key):
                return child
            found = _find_surrogate(item, child)
            if found:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _find_surrogate(item, f"{path}[{index}]")
            if found:
                return found
    return None


def _image_parts(body: ChatCompletionRequest):
    for i, message in enumerate(body.messages):
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                if isinstance(part, dict) and part.get("type") == "image_url":
                    yield i, j, message, part


def _check_cheap_limits(body: ChatCompletionRequest, state: ServerState) -> None:
    """Limits that cost nothing, on the event loop, before any decoding or tokenizing."""
    settings = state.settings
    where = _find_surrogate(body.model_dump(exclude_none=True), "")
    if where:
        raise APIError(400, f"{where} holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text",
                       param=where, code="invalid_string")
    for name in ADDITIVE_PENALTIES:
        if getattr(body, name):
            raise APIError(400, f"'{name}' is not supported (OpenAI's additive penalty); use 'repetition_penalty' "
                           "(multiplicative, > 1 discourages repeats) or leave it at 0", param=name,
                           code="unsupported_parameter")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > settings.max_stop or not all(stop):
        raise APIError(400, f"stop takes at most {settings.max_stop} non-empty strings", param="stop")
    for k, text in enumerate(stop):
        if len(text) > settings.max_stop_chars:
            raise APIError(400, f"stop strings are limited to {settings.max_stop_chars} characters, this one has "
                           f"{len(text)}", param="stop" if isinstance(body.stop, str) else f"stop[{k}]",
                           code="limit_exceeded")
    num_images = sum(1 for _ in _image_parts(body))
    if num_images > settings.max_images:
        raise APIError(400, f"the request has {num_images} images, over this server's limit of "
                       f"{settings.max_images}", param="messages", code="too_many_images")
    # A token stands for at most `max_token_bytes` bytes of text, and a character is at least one byte,
    # so the prompt has at least characters / max_token_bytes tokens (halved again for normalizers that
    # shrink text). Counting characters copies nothing.
    text_chars = 0
    for message in body.messages:
        if isinstance(message.content, str):
            text_chars += len(message.content)
        elif isinstance(message.content, list):
            text_chars += sum(len(p["text"]) for p in message.content
                              if isinstance(p, dict) and isinstance(p.get("text"), str))
    at_least = math.ceil(text_chars / (2 * state.max_token_bytes))
    at_least += num_images * state.pipeline.processor.num_query_tokens
    limit, code = state.context_length, "context_length_exceeded"
    if settings.max_input_tokens is not None and settings.max_input_tokens < limit:
        limit, code = settings.max_input_tokens + 1, "input_tokens_exceeded"
    if at_least >= limit:
        raise APIError(400, f"the prompt is at least {at_least} tokens ({text_chars} characters of text, "
                       f"{num_images} images), over this server's limit of {limit - 1} prompt tokens",
                       param="messages", code=code)


async def _convert(body: ChatCompletionRequest, state: ServerState) -> list[dict]:
    """Messages -> conversation with decoded images, in the image pool under a deadline."""
    settings = state.settings
    max_pixels = min(settings.max_image_pixels, state.pipeline.processor.max_image_pixels)
    policy = ImagePolicy(settings.max_image_bytes, max_pixels, settings.image_formats, settings.image_fetcher)
    if not any(True for _ in _image_parts(body)):
        return [_convert_message(i, m, policy, {}) for i, m in enumerate(body.messages)]
    started = threading.Event()

    def work():
        started.set()
        return _convert_messages(body, policy, settings.max_request_image_pixels)

    future = asyncio.get_running_loop().run_in_executor(state.image_pool, work)
    try:
        return await asyncio.wait_for(asyncio.shield(future), settings.image_timeout_s)
    except asyncio.TimeoutError:
        future.cancel()  # a queued job never starts; a running decode finishes and is dropped
        if started.is_set():
            raise APIError(400, f"the images took longer than {settings.image_timeout_s:g} s to decode",
                           param="messages", code="image_decode_timeout") from None
        raise APIError(503, "the image decoders are busy; retry later", type="server_error",
                       code="server_overloaded", headers={"Retry-After": "1"}) from None


def _convert_messages(body: ChatCompletionRequest, policy: ImagePolicy, max_total_pixels: int) -> list[dict]:
    # Pass 1: every image's bytes and header; the request's pixels are summed before any is decoded.
    blobs, total = {}, 0
    for i, j, message, part in _image_parts(body):
        if message.role != "user":
            continue  # refused by _convert_message before anything is decoded
        spec = part.get("image_url")
        url = spec.get("url") if isinstance(spec, dict) else spec
        if not isinstance(url, str):
            continue
        try:
            data = image_bytes(url, policy)
            width, height = image_size(data, policy)
        except ImageInputError as err:
            raise APIError(400, str(err), param=f"messages[{i}].content[{j}].image_url", code="invalid_image") from None
        total += width * height
        blobs[i, j] = data
    if total > max_total_pixels:
        raise APIError(400, f"the request's images have {total} pixels together, over this server's limit of "
                       f"{max_total_pixels}", param="messages", code="too_many_pixels")
    # Pass 2: decode.
    return [_convert_message(i, m, policy, blobs) for i, m in enumerate(body.messages)]


def _tokenize(body: ChatCompletionRequest, conversation: list[dict], state: ServerState
              ) -> tuple[int, SamplingOptions]:
    """Prompt length and sampling options (worker thread: the chat template and tokenizer are CPU work)."""
    if conversation[-1]["role"] != "user":
        raise APIError(400, "the last message must come from the user", param="messages", code="invalid_messages")
    try:
        encoded = state.pipeline.processor.encode(conversation, add_generation_prompt=True)
        state.pipeline.processor.check_regions(encoded)  # a typed <region>, a region that marks nothing
        prompt_tokens = len(encoded.input_ids)
    except ValueError as err:
        raise APIError(400, str(err), param="messages", code="invalid_messages") from None
    limit = state.settings.max_input_tokens
    if limit is not None and prompt_tokens > limit:
        raise APIError(400, f"the prompt is {prompt_tokens} tokens, over this server's limit of {limit}",
                       param="messages", code="input_tokens_exceeded")
    return prompt_tokens, _options(body, prompt_tokens, state)


def _restore_routes(body: ChatCompletionRequest, conversation: list[dict], state: ServerState) -> list[dict]:
    """Assistant turns sent back with the `parts` this server returned (`output_parts`) become the text the model
    wrote, routing and slot tokens included: from `content` alone a `[DET]` answer is an empty turn, a
    conversation the model never saw (`ChatSession` keeps the same history). Head parts are written in reading
    order after the text before them, which is how the model writes an answer."""
    heads = state.pipeline.model.config.head_configs
    routes = {t: slots for head in heads.values() for t, slots in head.routes.items()}
    triggers = {name: head.trigger for name, head in heads.items() if head.trigger}
    for i, message in enumerate(body.messages):
        parts = (message.model_extra or {}).get("parts")
        if message.role != "assistant" or parts is None:
            continue
        if not isinstance(parts, list):
            raise APIError(400, "an assistant message's parts are a list (as `output_parts` returns them)",
                           param=f"messages[{i}].parts", code="invalid_parts")
        written = []
        for j, part in enumerate(parts):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                written.append(part["text"])
                continue
            route = (part.get("route") or triggers.get(part.get("head"))) if isinstance(part, dict) else None
            if kind not in ("detections", "keypoints", "image", "head") or route not in routes:
                raise APIError(400, f"part {kind!r} with route {route!r}: not an output of this model's heads "
                               f"(routes: {', '.join(routes)})", param=f"messages[{i}].parts[{j}]",
                               code="invalid_parts")
            written.append(route + "".join(routes[route]))
        conversation[i] = {"role": "assistant", "content": [{"type": "text", "text": "".join(written)}]}
    return conversation


def _convert_message(i: int, message, policy: ImagePolicy, blobs: dict) -> dict:
    role = "system" if message.role == "developer" else message.role
    if role not in ("system", "user", "assistant"):
        raise APIError(400, f"unsupported role {message.role!r} (expected system, developer, user or assistant)",
                       param=f"messages[{i}].role", code="invalid_role")
    content = message.content
    if content is None and role == "assistant":
        content = ""
    if isinstance(content, str):
        return {"role": role, "content": [{"type": "text", "text": content}]}
    if not isinstance(content, list):
        raise APIError(400, "content must be a string or a list of content parts", param=f"messages[{i}].content")
    parts = []
    for j, part in enumerate(content):
        where = f"messages[{i}].content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise APIError(400, "a text part needs a string 'text'", param=f"{where}.text")
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            if role != "user":
                raise APIError(400, "images can only appear in user messages", param=where)
            spec = part.get("image_url")
            url = spec.get("url") if isinstance(spec, dict) else spec
            if not isinstance(url, str):
                raise APIError(400, "an image_url part needs image_url.url", param=f"{where}.image_url")
            try:
                parts.append({"type": "image", "image": open_image(blobs[i, j], policy)})
            except ImageInputError as err:
                raise APIError(400, str(err), param=f"{where}.image_url", code="invalid_image") from None
        elif kind == "region":  # mmbridge extension: a visual prompt on this message's image (the act head)
            if role != "user":
                raise APIError(400, "a region (visual prompt) marks an image of a user message", param=where,
                               code="invalid_region")
            region = {k: part[k] for k in (*REGION_KINDS, "image") if part.get(k) is not None}
            try:
                check_region(region, where)
            except ValueError as err:
                raise APIError(400, str(err), param=where, code="invalid_region") from None
            parts.append({"type": "region", **region})
        else:
            raise APIError(400, f"unknown content part type {kind!r} (supported: 'text', 'image_url', 'region')",
                           param=f"{where}.type", code="unknown_part_type")
    return {"role": role, "content": parts}


def _options(body: ChatCompletionRequest, prompt_tokens: int, state: ServerState) -> SamplingOptions:
    settings, context = state.settings, state.context_length
    if prompt_tokens >= context:
        raise APIError(400, f"the prompt is {prompt_tokens} tokens (each image counts as "
                       f"{state.pipeline.processor.num_query_tokens}), the context is {context}",
                       param="messages", code="context_length_exceeded")
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if requested is None:
        max_new = min(settings.default_max_tokens, context - prompt_tokens)
    elif prompt_tokens + requested > context:
        raise APIError(400, f"{param} is {requested} but the prompt is {prompt_tokens} tokens and the context "
                       f"is {context}: at most {context - prompt_tokens} new tokens fit", param=param,
                       code="context_length_exceeded")
    else:
        max_new = requested
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > settings.max_stop or not all(stop):
        raise APIError(400, f"stop takes at most {settings.max_stop} non-empty strings", param="stop")
    temperature = settings.default_temperature if body.temperature is None else body.temperature
    return SamplingOptions(max_new_tokens=max_new, do_sample=temperature > 0, temperature=temperature or 1.0,
                           top_p=body.top_p or 1.0, stop=tuple(stop), seed=body.seed,
                           repetition_penalty=body.repetition_penalty or 1.0)


# -- running -------------------------------------------------------------------------------------

def _submit(state: ServerState, conversation, options, n, on_piece=None):
    try:
        return state.batcher.submit(conversation, options, n, on_piece)
    except Overloaded as busy:
        _submit_refused(state, busy.retry_after)


def _submit_refused(state: ServerState, retry_after: int | None = None):
    b = state.batcher
    b.stats["rejected"] += retry_after is None
    raise APIError(429, f"server at capacity ({b.max_batch_size} running, {b.queued} queued); retry later",
                   type="rate_limit_error", code="server_overloaded",
                   headers={"Retry-After": str(retry_after or b.retry_after())})


def _generation_error(err: BaseException) -> APIError:
    if isinstance(err, ValueError):  # input the checks above did not catch
        return APIError(400, str(err), param="messages")
    log.error("generation failed: %r", err)
    return APIError(500, "generation failed", type="server_error", code="internal_error")


def _queue_timeout(job, state: ServerState) -> APIError | None:
    """A job still waiting for its batch after `queue_timeout_s` is dropped (503 + Retry-After)."""
    if job.started or time.monotonic() - job.enqueued < state.settings.queue_timeout_s:
        return None
    job.cancel.set()  # the worker drops it instead of running it
    return APIError(503, f"the request waited {state.settings.queue_timeout_s:g} s for a batch; retry later",
                    type="server_error", code="queue_timeout",
                    headers={"Retry-After": str(state.batcher.retry_after())})


async def _wait(job, request: Request, state: ServerState) -> list[GenerationResult]:
    """Await a job; cancel it if the client disconnects while it waits or runs, or it waits too long."""
    future = asyncio.wrap_future(job.future)
    try:
        while True:
            done, _ = await asyncio.wait({future}, timeout=0.25)
            if done:
                break
            if await request.is_disconnected():
                job.cancel.set()
                raise APIError(499, "client closed the request", code="client_closed")
            timeout = _queue_timeout(job, state)
            if timeout is not None:
                raise timeout
    except BaseException:
        job.cancel.set()
        # Nobody awaits the job any more: retrieve its outcome (Cancelled) so asyncio does not log it.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        raise
    try:
        return future.result()
    except Cancelled:
        raise APIError(499, "request cancelled", code="cancelled") from None
    except Exception as err:
        raise _generation_error(err) from None


def _stream(body, conversation, options, state: ServerState, request: Request) -> StreamingResponse:
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()
    job = _submit(state, conversation, options, body.n,
                  on_piece=lambda index, text: loop.call_soon_threadsafe(pieces.put_nowait, (index, text)))
    # Queued after every piece the worker produced (same loop, FIFO): marks the end.
    job.future.add_done_callback(lambda _: loop.call_soon_threadsafe(pieces.put_nowait, None))
    base = {"id": _new_id(), "created": int(time.time()), "model": state.settings.model_name}
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def sse(choices, usage=None) -> str:
        return f"data: {json.dumps(dump(ChatCompletionChunk(**base, choices=choices, usage=usage)))}\n\n"

    async def events():
        try:
            for i in range(body.n):
                yield sse([ChunkChoice(index=i, delta=Delta(role="assistant", content=""))])
            while True:
                try:
                    item = await asyncio.wait_for(pieces.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    timeout = _queue_timeout(job, state)
                    if timeout is not None:  # headers are sent: in-band, as OpenAI reports stream errors
                        state.metrics.error(timeout.status, timeout.code)
                        yield f"data: {json.dumps(timeout.body())}\n\n"
                        yield "data: [DONE]\n\n"
                        return
                    continue
                if item is None:
                    break
                yield sse([ChunkChoice(index=item[0], delta=Delta(content=item[1]))])
            try:
                results = job.future.result()
            except Cancelled:
                return
            except Exception as err:  # headers are sent: report in-band, as OpenAI does
                yield f"data: {json.dumps(_generation_error(err).body())}\n\n"
                yield "data: [DONE]\n\n"
                return
            state.metrics.tokens(results[0].prompt_tokens if results else 0,
                                 sum(r.completion_tokens for r in results))
            for i, r in enumerate(results):
                delta = Delta(images=_images_of(r), parts=_parts(r, body))
                yield sse([ChunkChoice(index=i, delta=delta, finish_reason=r.finish_reason)])
            if include_usage:
                yield sse([], usage=_usage(results, results[0].prompt_tokens))
            yield "data: [DONE]\n\n"
        finally:
            job.cancel.set()  # no-op after completion; aborts generation if the client went away

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _usage(results: list[GenerationResult], prompt_tokens: int) -> Usage:
    completion = sum(r.completion_tokens for r in results)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion)


def _image_url(part) -> dict:
    return {"type": "image_url", "image_url": {"url": part_to_dict(part)["url"]}}


def _images_of(result: GenerationResult) -> list[dict] | None:
    """Drawn images as OpenAI `image_url` content parts (PNG data URLs); None when nothing was drawn."""
    return [_image_url(p) for p in result.parts if p.type == "image"] or None


def _message(result: GenerationResult, body: ChatCompletionRequest) -> ResponseMessage:
    """`content` is the answer's text (what every OpenAI client reads); drawn images are `images`; with
    `content_parts: true`, `content` is the answer as text / image_url parts in reading order."""
    content: str | list[dict] = result.text
    if body.content_parts:
        content = [{"type": "text", "text": p.text} if p.type == "text" else _image_url(p)
                   for p in result.parts if p.type in ("text", "image")]
    return ResponseMessage(content=content, images=_images_of(result), parts=_parts(result, body))


def _parts(result: GenerationResult, body: ChatCompletionRequest) -> list[dict] | None:
    """Typed output parts (text and head outputs), only when asked for (`output_parts: true`)."""
    if not body.output_parts:
        return None
    return [part_to_dict(p) for p in result.parts]


def _new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


# -- errors --------------------------------------------------------------------------------------

#: pydantic puts the union member it tried into the location (`content.str`, `stop.list[str]`): not a field.
_UNION_MEMBER = re.compile(r"^(str|int|float|bool|none|list|dict|[a-z-]+\[.*\]|function-[a-z-]+|constrained-[a-z]+)$")


def _loc_to_param(loc) -> str | None:
    param = ""
    for item in loc:
        if item == "body" and not param:
            continue
        if isinstance(item, str) and _UNION_MEMBER.match(item):
            continue
        param += f"[{item}]" if isinstance(item, int) else (f".{item}" if param else str(item))
    return param or None


def _install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    def reply(status, body, headers=None):
        metrics.error(status, body["error"].get("code"))
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(APIError)
    async def api_error(request, err: APIError):
        return reply(err.status, err.body(), err.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, err: RequestValidationError):
        # FastAPI's default is 422 with its own shape; OpenAI clients expect 400 + envelope.
        first = (err.errors() or [{}])[0]
        if first.get("type") == "json_invalid":
            return reply(400, envelope("request body is not valid JSON", code="invalid_json"))
        param = _loc_to_param(first.get("loc", ()))
        if first.get("type") == "missing" and param is None:
            return reply(400, envelope("request body is required", code="invalid_request"))
        if param is None:
            return reply(400, envelope("request body must be a JSON object (Content-Type: application/json)",
                                       code="invalid_request"))
        return reply(400, envelope(f"{param}: {first.get('msg', 'invalid value')}", param=param, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, err: StarletteHTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return reply(err.status_code, envelope(str(err.detail), kind), getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request, err: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return reply(500, envelope("internal server error", "server_error", code="internal_error"))


def _mount_ui(app: FastAPI, state: ServerState, settings: ServeSettings) -> None:
    import gradio as gr

    from mmbridge.serve.ui import AUTH_MESSAGE, UI_CSS, BatcherBackend, build_ui, password_auth

    # The API's image rules (bytes, pixels, formats; no remote fetching) guard the UI's uploads too.
    policy = ImagePolicy(settings.max_image_bytes, settings.max_image_pixels, settings.image_formats, None)
    blocks = build_ui(BatcherBackend(lambda: state.batcher, lambda: state.context_length),
                      keep_uploads=settings.keep_uploads, image_policy=policy)

    @app.get("/", include_in_schema=False)
    async def root():
        return RedirectResponse("/ui/")

    gr.mount_gradio_app(app, blocks, path="/ui", auth=password_auth(settings.api_key),
                        auth_message=AUTH_MESSAGE if settings.api_key else None,
                        max_file_size=settings.max_image_bytes, show_error=False, css=UI_CSS)
