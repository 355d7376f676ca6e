"""The OpenAI-compatible API on a real uvicorn server, driven by the official `openai` client
(plain and streaming) and by raw httpx for requests no client would send (docs/serving.md, Hardening)."""

from __future__ import annotations

import base64
import resource
import struct
import threading
import zlib

import httpx
import openai
import pytest

from mmbridge.generation import MMBridgePipeline, SamplingOptions
from mmbridge.processing import load_image
from mmbridge.serve.app import ServeSettings, create_app
from mmbridge.serve.testing import png_data_url, running_server, shared_tiny_model_dir

MODEL = "tiny"
RED, BLUE = png_data_url((220, 40, 40)), png_data_url((50, 90, 230))


@pytest.fixture(scope="module")
def pipeline():
    return MMBridgePipeline.from_pretrained(shared_tiny_model_dir())


@pytest.fixture(scope="module")
def base_url(pipeline):
    settings = ServeSettings(model_name=MODEL, max_images=2, max_n=3, max_body_bytes=2 * 1024 * 1024)
    with running_server(create_app(pipeline, settings)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=30)


def image_part(url):
    return {"type": "image_url", "image_url": {"url": url}}


def ask(*parts):
    return [{"role": "user", "content": list(parts)}]


def post(base_url, body=None, **kwargs):
    if body is not None:
        kwargs["json"] = body
    return httpx.post(f"{base_url}/v1/chat/completions", timeout=30, **kwargs)


def valid(**overrides):
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **overrides}


# -- happy paths with the official client -----------------------------------------------------------

def test_health_models_and_readiness(base_url, client):
    assert httpx.get(f"{base_url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{base_url}/health/ready").status_code == 200
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_plain_completion_matches_the_pipeline(client, pipeline):
    messages = ask(image_part(RED), {"type": "text", "text": "What color is the circle?"})
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    expected = pipeline.generate([{"role": "user", "content": [
        {"type": "image", "image": load_image(base64.b64decode(RED.split(",", 1)[1]))},
        {"type": "text", "text": "What color is the circle?"}]}], options=SamplingOptions(max_new_tokens=12))[0]
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert response.usage.prompt_tokens == expected.prompt_tokens
    assert response.usage.completion_tokens == expected.completion_tokens
    assert response.usage.total_tokens == expected.prompt_tokens + expected.completion_tokens


def test_multi_turn_with_several_images_and_max_completion_tokens(client):
    messages = [
        {"role": "system", "content": "You answer about shapes."},
        {"role": "user", "content": [image_part(RED), {"type": "text", "text": "What color is it?"}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": [image_part(BLUE), {"type": "text", "text": "And this one?"}]},
    ]
    response = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=5)
    assert response.usage.completion_tokens <= 5
    assert response.usage.prompt_tokens > 2 * 4  # two images, 4 query tokens each, plus text


def test_streaming_matches_plain_and_reports_usage(client):
    messages = ask({"type": "text", "text": "Describe the image."}, image_part(BLUE))
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == plain.usage.total_tokens


def test_sse_wire_format_ends_with_done(base_url):
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=valid(stream=True), timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"


def test_n_seed_stop_and_temperature(client):
    kwargs = dict(model=MODEL, messages=ask({"type": "text", "text": "hi"}), max_tokens=8, temperature=1.0,
                  top_p=0.9, seed=7, n=2)
    first, again = client.chat.completions.create(**kwargs), client.chat.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    greedy = client.chat.completions.create(model=MODEL, messages=kwargs["messages"], max_tokens=8, temperature=0)
    stop = greedy.choices[0].message.content[2:4]
    cut = client.chat.completions.create(model=MODEL, messages=kwargs["messages"], max_tokens=8, temperature=0,
                                         stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert stop not in cut.choices[0].message.content


def test_streaming_with_n(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=ask({"type": "text", "text": "hi"}),
                                                 max_tokens=4, n=2, stream=True))
    finished = {c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}


def test_typed_output_parts_only_when_requested(base_url):
    plain = post(base_url, valid()).json()
    assert "parts" not in plain["choices"][0]["message"]
    typed = post(base_url, valid(output_parts=True)).json()
    message = typed["choices"][0]["message"]
    assert message["parts"] == [{"type": "text", "text": message["content"]}]


# -- hardening (docs/serving.md): status, param, envelope; the server stays healthy ----------------------

def _png_header_claiming(width: int, height: int) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _b64(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _image_request(url):
    return valid(messages=ask(image_part(url), {"type": "text", "text": "?"}))


BAD_REQUESTS = {
    # name: (request kwargs for httpx.post, status, param or None, code or None)
    "invalid base64": ({"json": _image_request("data:image/png;base64,@@not-base64@@")}, 400,
                       "messages[0].content[0].image_url", "invalid_image"),
    "data url without ;base64": ({"json": _image_request("data:image/png,iVBORw0KGgo=")}, 400,
                                 "messages[0].content[0].image_url", "invalid_image"),
    "non-image bytes": ({"json": _image_request(_b64(b"just some text, not an image"))}, 400,
                        "messages[0].content[0].image_url", "invalid_image"),
    "format outside allowlist (TIFF)": ({"json": _image_request(png_data_url(fmt="TIFF"))}, 400,
                                        "messages[0].content[0].image_url", "invalid_image"),
    "http image url (remote fetch off)": ({"json": _image_request("http://example.com/a.png")}, 400,
                                          "messages[0].content[0].image_url", "invalid_image"),
    "https image url (remote fetch off)": ({"json": _image_request("https://example.com/a.png")}, 400,
                                           "messages[0].content[0].image_url", "invalid_image"),
    "file:// url": ({"json": _image_request("file:///etc/passwd")}, 400, "messages[0].content[0].image_url",
                    "invalid_image"),
    "local path": ({"json": _image_request("/etc/passwd")}, 400, "messages[0].content[0].image_url", "invalid_image"),
    "too many images": ({"json": valid(messages=ask(image_part(RED), image_part(RED), image_part(BLUE)))}, 400,
                        "messages", "too_many_images"),
    "prompt + max_tokens over context": ({"json": valid(max_tokens=600)}, 400, "max_tokens",
                                         "context_length_exceeded"),
    "prompt + max_completion_tokens over context": ({"json": valid(max_tokens=None, max_completion_tokens=511)},
                                                    400, "max_completion_tokens", "context_length_exceeded"),
    "prompt alone over context": ({"json": valid(messages=[{"role": "user", "content": "hi " * 600}])}, 400,
                                  "messages", "context_length_exceeded"),
    "max_tokens = 0": ({"json": valid(max_tokens=0)}, 400, "max_tokens", None),
    "max_tokens < 0": ({"json": valid(max_tokens=-5)}, 400, "max_tokens", None),
    "malformed JSON": ({"content": b'{"model": "tiny", "messages": [', "headers": {"content-type": "application/json"}},
                       400, None, "invalid_json"),
    "body not an object": ({"json": ["not", "an", "object"]}, 400, None, None),
    "empty body": ({"content": b"", "headers": {"content-type": "application/json"}}, 400, None, None),
    "unknown part type": ({"json": valid(messages=ask({"type": "input_audio", "input_audio": {"data": "AAAA"}}))},
                          400, "messages[0].content[0].type", "unknown_part_type"),
    "request-supplied chat_template": ({"json": valid(chat_template="{{ 7*7 }}")}, 400, "chat_template",
                                       "unsupported_parameter"),
    "raw prompt embeddings": ({"json": valid(prompt_embeds=[[0.1, 0.2]])}, 400, "prompt_embeds",
                              "unsupported_parameter"),
    "tools requested": ({"json": valid(tools=[{"type": "function", "function": {"name": "f"}}])}, 400, "tools",
                        "unsupported_parameter"),
    "unknown role": ({"json": valid(messages=[{"role": "tool", "content": "x"}])}, 400, "messages[0].role",
                     "invalid_role"),
    "image in assistant message": ({"json": valid(messages=[{"role": "assistant", "content": [image_part(RED)]},
                                                            {"role": "user", "content": "?"}])}, 400,
                                   "messages[0].content[0]", None),
    "empty messages": ({"json": valid(messages=[])}, 400, "messages", None),
    "n over limit": ({"json": valid(n=9)}, 400, "n", "limit_exceeded"),
    "temperature out of range": ({"json": valid(temperature=5)}, 400, "temperature", None),
    "too many stop strings": ({"json": valid(stop=["a", "b", "c", "d", "e"])}, 400, "stop", None),
    "unknown model": ({"json": valid(model="gpt-4o")}, 404, "model", "model_not_found"),
    "body over size cap": ({"json": valid(padding="x" * (3 * 1024 * 1024))}, 413, None, "request_too_large"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_envelope_and_server_stays_healthy(base_url, case):
    kwargs, status, param, code = BAD_REQUESTS[case]
    response = post(base_url, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    if code:
        assert error["code"] == code
    assert "Traceback" not in response.text and 'File "' not in response.text
    assert httpx.get(f"{base_url}/health").status_code == 200


def test_decompression_bomb_header_rejected_before_decoding(base_url):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    response = post(base_url, _image_request(_b64(_png_header_claiming(30000, 30000))))
    assert response.status_code == 400
    assert "limit" in response.json()["error"]["message"]
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 100  # decoding would take 2.7 GB


def test_openai_client_sees_typed_errors(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=ask({"type": "text", "text": "hi"}), max_tokens=10_000)
    assert err.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=ask({"type": "text", "text": "hi"}))


def test_server_answers_normally_after_all_bad_requests(client):
    response = client.chat.completions.create(model=MODEL, messages=ask({"type": "text", "text": "hi"}), max_tokens=3)
    assert response.choices[0].finish_reason in ("stop", "length")


def test_readiness_is_503_until_the_model_is_loaded(pipeline):
    release = threading.Event()

    def slow_loader():
        release.wait(20)
        return pipeline

    with running_server(create_app(slow_loader, ServeSettings(model_name=MODEL))) as url:
        assert httpx.get(f"{url}/health").status_code == 200
        not_ready = httpx.get(f"{url}/health/ready")
        assert not_ready.status_code == 503 and not_ready.json()["error"]["code"] == "model_loading"
        early = post(url, valid())
        assert early.status_code == 503 and "Retry-After" in early.headers
        release.set()
        for _ in range(200):
            if httpx.get(f"{url}/health/ready").status_code == 200:
                break
            threading.Event().wait(0.05)
        assert post(url, valid()).status_code == 200


def test_failed_load_is_reported_by_readiness():
    def broken_loader():
        raise FileNotFoundError("/secret/path/model")

    with running_server(create_app(broken_loader, ServeSettings(model_name=MODEL))) as url:
        for _ in range(100):
            response = httpx.get(f"{url}/health/ready")
            if response.json()["error"]["code"] == "model_load_failed":
                break
            threading.Event().wait(0.02)
        assert response.status_code == 503 and "/secret" not in response.text
        assert httpx.get(f"{url}/health").status_code == 200
