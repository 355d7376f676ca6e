"""Requests that are cheap to send and expensive to serve are refused first, fast, with a 4xx naming the
field (issue 17's reproductions, each against a real server): huge messages are not tokenized, long stop
strings are not compiled, a request's image pixels are summed from headers before any decode, lone
surrogates, out-of-range seeds and loosely typed fields are 400s, additive penalties are refused."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import httpx
import openai
import pytest

from mmbridge.generation import MMBridgePipeline
from mmbridge.serve.app import ServeSettings, create_app
from mmbridge.serve.testing import running_server, shared_tiny_model_dir

MODEL = "tiny"


@pytest.fixture(scope="module")
def pipeline():
    return MMBridgePipeline.from_pretrained(shared_tiny_model_dir())


@pytest.fixture(scope="module")
def base_url(pipeline):
    with running_server(create_app(pipeline, ServeSettings(model_name=MODEL))) as url:
        yield url


JSON = {"content-type": "application/json"}


def as_json(body) -> bytes:
    return json.dumps(body).encode()  # ASCII escapes, as curl would send them: lone surrogates survive


def valid(**overrides):
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, **overrides}


def post(base_url, body=None, **kwargs):
    if body is not None:
        kwargs["json"] = body
    return httpx.post(f"{base_url}/v1/chat/completions", timeout=60, **kwargs)


def refused(base_url, body=None, *, status=400, param=None, code=None, within=1.0, **kwargs):
    start = time.perf_counter()
    response = post(base_url, body, **kwargs)
    elapsed = time.perf_counter() - start
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    assert elapsed < within, f"took {elapsed:.2f} s"
    return error


def test_a_4mb_message_is_refused_before_tokenizing(base_url):
    body = valid(messages=[{"role": "user", "content": "ab " * 1_400_000}])
    error = refused(base_url, body, param="messages", code="context_length_exceeded")
    assert "at least" in error["message"]


def test_a_25mb_message_under_the_body_cap_is_refused_fast(base_url):
    payload = ('{"model": "tiny", "max_tokens": 3, "messages": [{"role": "user", "content": "'
               + "ab " * 8_500_000 + '"}]}').encode()
    refused(base_url, content=payload, headers={"content-type": "application/json"}, param="messages",
            code="context_length_exceeded", within=3.0)


def test_max_input_tokens_is_enforced_exactly(pipeline):
    settings = ServeSettings(model_name=MODEL, max_input_tokens=20)
    with running_server(create_app(pipeline, settings)) as url:
        assert post(url, valid()).status_code == 200
        refused(url, valid(messages=[{"role": "user", "content": "hello there " * 12}]), param="messages",
                code="input_tokens_exceeded")
        refused(url, valid(messages=[{"role": "user", "content": "hello there " * 500}]), param="messages",
                code="input_tokens_exceeded")  # the cheap bound, before tokenizing


def test_long_or_many_stop_strings(base_url):
    refused(base_url, valid(stop="x" * 30000), param="stop", code="limit_exceeded")
    refused(base_url, valid(stop=["a", "x" * 30000]), param="stop[1]", code="limit_exceeded")
    refused(base_url, valid(stop=["a", "b", "c", "d", "e"]), param="stop")
    assert post(base_url, valid(stop=["x" * 128])).status_code == 200


def _zero_png(size: int) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size)).save(buffer, "PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_eight_zero_4096_pngs_are_summed_from_headers_and_refused(base_url):
    url = _zero_png(4096)
    parts = [{"type": "image_url", "image_url": {"url": url}} for _ in range(8)]
    body = valid(messages=[{"role": "user", "content": [*parts, {"type": "text", "text": "hi"}]}])
    refused(base_url, body, param="messages", code="too_many_pixels")
    parts = [{"type": "image_url", "image_url": {"url": url}} for _ in range(9)]
    refused(base_url, valid(messages=[{"role": "user", "content": parts}]), param="messages",
            code="too_many_images")


def test_a_request_near_the_pixel_cap_decodes_off_the_generation_thread(base_url):
    """A big (within limits) image keeps the image pool busy, not the model: a text request meanwhile
    is answered as fast as it would be alone."""
    big = {"type": "image_url", "image_url": {"url": _zero_png(4000)}}
    body = valid(messages=[{"role": "user", "content": [big, {"type": "text", "text": "hi"}]}])
    post(base_url, valid())  # warm
    start = time.perf_counter()
    post(base_url, valid())
    alone = time.perf_counter() - start
    results = {}
    thread = threading.Thread(target=lambda: results.setdefault("big", post(base_url, body)))
    thread.start()
    time.sleep(0.05)
    start = time.perf_counter()
    assert post(base_url, valid()).status_code == 200
    loaded = time.perf_counter() - start
    thread.join()
    assert results["big"].status_code == 200
    assert loaded < max(2 * alone, alone + 0.25), (alone, loaded)


def test_lone_surrogates_are_a_400_naming_the_field(base_url):
    raw = b'{"model":"tiny","max_tokens":3,"messages":[{"role":"user","content":"a\\ud800b"}]}'
    refused(base_url, content=raw, headers={"content-type": "application/json"}, param="messages[0].content",
            code="invalid_string")
    parts = [{"type": "text", "text": "ok"}, {"type": "text", "text": "x\udfffy"}]
    refused(base_url, content=as_json(valid(messages=[{"role": "user", "content": parts}])), headers=JSON,
            param="messages[0].content[1].text")
    refused(base_url, content=as_json(valid(stop=["\ud83d"])), headers=JSON, param="stop[0]")
    # a real pair is fine
    assert post(base_url, valid(messages=[{"role": "user", "content": "smile \U0001F600"}])).status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_out_of_range_seed_names_seed(base_url, stream):
    refused(base_url, valid(seed=2**64, temperature=1.0, stream=stream), param="seed")
    refused(base_url, valid(seed=-(2**63) - 1, stream=stream), param="seed")
    assert post(base_url, valid(seed=2**63 - 1, temperature=1.0, stream=stream)).status_code == 200


@pytest.mark.parametrize(("field", "value"), [
    ("max_tokens", True), ("max_tokens", 2.0), ("max_tokens", "3"), ("max_completion_tokens", False),
    ("stream", "yes"), ("stream", 1), ("n", True), ("n", "2"), ("seed", "7"), ("seed", 1.5),
    ("temperature", "0.5"), ("temperature", True), ("top_p", False), ("output_parts", "true"),
    ("model", 5), ("stop", 5), ("repetition_penalty", 0), ("repetition_penalty", True),
])
def test_strict_types_name_the_field(base_url, field, value):
    refused(base_url, valid(**{field: value}), param=field)


def test_nested_fields_are_strict_too(base_url):
    refused(base_url, valid(stream=True, stream_options={"include_usage": "yes"}),
            param="stream_options.include_usage")
    refused(base_url, valid(messages=[{"role": 1, "content": "hi"}]), param="messages[0].role")
    refused(base_url, valid(messages=[{"role": "user", "content": 7}]), param="messages[0].content")


def test_additive_penalties_are_refused_not_ignored(base_url):
    for name in ("presence_penalty", "frequency_penalty"):
        error = refused(base_url, valid(**{name: 0.5}), param=name, code="unsupported_parameter")
        assert "repetition_penalty" in error["message"]
        refused(base_url, valid(**{name: 3}), param=name)  # out of OpenAI's range
        assert post(base_url, valid(**{name: 0})).status_code == 200  # the SDK default is accepted
    for field in ("logprobs", "logit_bias"):
        refused(base_url, valid(**{field: True if field == "logprobs" else {"5": 10}}), param=field)


def test_repetition_penalty_is_applied(base_url, pipeline):
    from mmbridge.generation import SamplingOptions

    conv = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    plain = pipeline.generate([conv], options=SamplingOptions(max_new_tokens=24))[0].text
    penalised = pipeline.generate([conv], options=SamplingOptions(max_new_tokens=24, repetition_penalty=5.0))[0].text
    body = valid(messages=[{"role": "user", "content": "hi"}], max_tokens=24)
    assert post(base_url, body).json()["choices"][0]["message"]["content"] == plain
    got = post(base_url, {**body, "repetition_penalty": 5.0}).json()["choices"][0]["message"]["content"]
    assert got == penalised and penalised != plain


def test_the_official_client_sees_bad_request_errors(base_url):
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=30)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                       presence_penalty=1.0)
    assert err.value.body["param"] == "presence_penalty"
