"""OpenAI-compatible request and response bodies (the subset of Chat Completions we serve).

Message content parts are validated by hand in `app.py` rather than by a pydantic union, so that
an unknown part type gets a precise 400 naming `messages[i].content[j].type`.

Room for wave 2 without breaking OpenAI clients: the standard `message.content` string is always
there; typed output parts (text now; image / detections / keypoints later) are added as an extra
`message.parts` list only when the request asks for them with `"output_parts": true`. Drawn images
also come as `message.images` (OpenRouter's shape: `[{"type": "image_url", "image_url": {"url": data URL}}]`),
and, with `"content_parts": true`, inside `message.content` as OpenAI content parts.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Strict scalars: JSON `true` is not 1, `"yes"` is not true, `"1"` is not a number (ints are fine as
# floats). Every rejected value is a 400 naming its field (app.py maps pydantic's location).
StrictInt = Annotated[int, Field(strict=True)]
StrictFloat = Annotated[float, Field(strict=True)]
StrictBool = Annotated[bool, Field(strict=True)]
StrictStr = Annotated[str, Field(strict=True)]
#: OpenAI's seed is a 64-bit signed integer; torch accepts that range.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1

#: Request fields we refuse rather than silently honour: a request must not bring its own chat
#: template (server-side Jinja) or raw embeddings (bypass of the input pipeline).
REFUSED_FIELDS = ("chat_template", "chat_template_kwargs", "prompt_embeds", "inputs_embeds", "embeddings",
                  "image_embeds", "messages_embeds")
#: OpenAI features we do not implement; refused only when actually switched on.
UNSUPPORTED_WHEN_SET = ("tools", "functions", "tool_choice", "function_call", "logprobs", "top_logprobs",
                        "logit_bias", "audio", "prediction")
#: OpenAI's additive penalties: accepted at 0 (what SDKs send by default), refused otherwise, never ignored.
#: transformers' multiplicative `repetition_penalty` is offered instead (vLLM's extension field).
ADDITIVE_PENALTIES = ("presence_penalty", "frequency_penalty")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: StrictStr
    content: StrictStr | list[Any] | None = None
    name: StrictStr | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: StrictBool = False


class ChatCompletionRequest(BaseModel):
    # Unknown fields are allowed (clients send `user`, `metadata`, ...) and ignored, except the
    # ones in REFUSED_FIELDS / UNSUPPORTED_WHEN_SET, which app.py checks explicitly.
    model_config = ConfigDict(extra="allow")

    model: StrictStr
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: StrictFloat | None = Field(default=None, ge=0, le=2)
    top_p: StrictFloat | None = Field(default=None, gt=0, le=1)
    presence_penalty: StrictFloat | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: StrictFloat | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: StrictFloat | None = Field(default=None, gt=0, le=10)  # extension (vLLM, transformers)
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    n: StrictInt = Field(default=1, ge=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    response_format: dict[str, Any] | None = None
    output_parts: StrictBool = False  # mmbridge extension: also return typed `message.parts`
    content_parts: StrictBool = False  # mmbridge extension: `message.content` as a list of text / image_url parts


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | list[dict[str, Any]]  # the text; content parts (text, image_url) with `content_parts`
    images: list[dict[str, Any]] | None = None  # drawn images as image_url parts (absent when none)
    parts: list[dict[str, Any]] | None = None  # only when requested: text, image, detections parts


class Choice(BaseModel):
    index: int
    message: ResponseMessage
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    images: list[dict[str, Any]] | None = None  # in the final chunk of a choice that drew
    parts: list[dict[str, Any]] | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ImageGenerationRequest(BaseModel):
    """OpenAI Images API `POST /v1/images/generations`: one image of the model's size, as base64."""
    model_config = ConfigDict(extra="allow")  # quality, style, user, background, … are accepted and ignored

    prompt: StrictStr = Field(min_length=1)
    model: StrictStr | None = None
    n: StrictInt = 1
    size: StrictStr | None = None
    response_format: StrictStr | None = None


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mmbridge"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def dump(model: BaseModel) -> dict:
    """JSON-ready dict without None fields (optional OpenAI fields are simply absent)."""
    return model.model_dump(mode="json", exclude_none=True)
