"""A soak test CI can afford (≈ 25 s of load, loopback only): good, bad, streaming and disconnecting clients
at once against a real server. Asserts no 5xx, every good request answered correctly, bounded RSS growth
and a fast `/health` throughout."""

from __future__ import annotations

import base64
import io
import json
import random
import threading
import time

import httpx
import pytest

from mmbridge.generation import MMBridgePipeline
from mmbridge.serve.app import ServeSettings, create_app
from mmbridge.serve.testing import png_data_url, running_server, shared_tiny_model_dir

MODEL = "tiny"
LOAD_SECONDS = 25


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def zero_png(size):
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size)).save(buffer, "PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def body(**overrides):
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, **overrides}


def bad_requests():
    """(name, kwargs for httpx.post) of the issue's reproductions and other malformed input: all 4xx."""
    zero = zero_png(4096)
    eight = [{"type": "image_url", "image_url": {"url": zero}} for _ in range(8)]
    as_json = {"content-type": "application/json"}
    return [
        ("4 MB message", {"json": body(messages=[{"role": "user", "content": "ab " * 1_400_000}])}),
        ("30000-char stop", {"json": body(stop="x" * 30000)}),
        ("eight zero 4096² PNGs", {"json": body(messages=[{"role": "user", "content": eight}])}),
        ("lone surrogate", {"content": b'{"model":"tiny","max_tokens":3,"messages":[{"role":"user","content":'
                                       b'"a\\ud800b"}]}', "headers": as_json}),
        ("seed 2^64", {"json": body(seed=2**64, temperature=1.0)}),
        ("seed 2^64 streaming", {"json": body(seed=2**64, temperature=1.0, stream=True)}),
        ("max_tokens true", {"json": body(max_tokens=True)}),
        ("stream yes", {"json": body(stream="yes")}),
        ("presence_penalty", {"json": body(presence_penalty=1.0)}),
        ("invalid JSON", {"content": b'{"model": ', "headers": as_json}),
        ("bad base64", {"json": body(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}])}),
        ("unknown model", {"json": body(model="nope")}),
    ]


@pytest.fixture(scope="module")
def pipeline():
    return MMBridgePipeline.from_pretrained(shared_tiny_model_dir())


def test_soak_mixed_clients(pipeline):
    settings = ServeSettings(model_name=MODEL, max_batch_size=8, max_queue=256, batch_wait_ms=5)
    image = png_data_url((30, 160, 60))
    image_body = body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                             {"type": "text", "text": "What is it?"}]}])
    bad = bad_requests()
    with running_server(create_app(pipeline, settings)) as url:
        endpoint = f"{url}/v1/chat/completions"
        expected = {"text": httpx.post(endpoint, json=body(), timeout=60).json()["choices"][0]["message"]["content"],
                    "image": httpx.post(endpoint, json=image_body, timeout=60).json()["choices"][0]["message"][
                        "content"]}
        for _, kwargs in bad:  # warm every path once before the baseline
            httpx.post(endpoint, timeout=60, **kwargs)
        baseline = rss_mb()
        stop_at = time.monotonic() + LOAD_SECONDS
        problems: list[str] = []
        counts = {"good": 0, "stream": 0, "bad": 0, "dropped": 0, "health": 0}
        health_worst = [0.0]
        lock = threading.Lock()

        def note(kind, problem=None):
            with lock:
                counts[kind] += 1
                if problem:
                    problems.append(problem)

        def good_client(seed):
            rng = random.Random(seed)
            with httpx.Client(timeout=60) as http:
                while time.monotonic() < stop_at:
                    kind = rng.choice(["text", "image"])
                    response = http.post(endpoint, json=body() if kind == "text" else image_body)
                    ok = response.status_code == 200 and \
                        response.json()["choices"][0]["message"]["content"] == expected[kind]
                    note("good", None if ok else f"good {kind}: {response.status_code} {response.text[:200]}")

        def stream_client(seed):
            with httpx.Client(timeout=60) as http:
                while time.monotonic() < stop_at:
                    text, done = "", False
                    with http.stream("POST", endpoint, json=body(stream=True)) as response:
                        status = response.status_code
                        for line in response.iter_lines():
                            if line == "data: [DONE]":
                                done = True
                            elif line.startswith("data: "):
                                chunk = json.loads(line[6:])
                                for choice in chunk.get("choices", []):
                                    text += choice["delta"].get("content") or ""
                    ok = status == 200 and done and text == expected["text"]
                    note("stream", None if ok else f"stream: {status} {done} {text!r}")

        def bad_client(seed):
            rng = random.Random(seed)
            with httpx.Client(timeout=60) as http:
                while time.monotonic() < stop_at:
                    name, kwargs = rng.choice(bad)
                    response = http.post(endpoint, **kwargs)
                    ok = 400 <= response.status_code < 500 and set(response.json()["error"]) == {
                        "message", "type", "param", "code"}
                    note("bad", None if ok else f"bad {name}: {response.status_code} {response.text[:200]}")

        def disconnecting_client(seed):
            rng = random.Random(seed)
            while time.monotonic() < stop_at:
                try:
                    if rng.random() < 0.5:
                        with httpx.Client(timeout=60) as http, \
                                http.stream("POST", endpoint, json=body(stream=True, max_tokens=200)) as response:
                            next(response.iter_lines())  # then hang up mid-stream
                    else:
                        httpx.post(endpoint, json=body(max_tokens=200), timeout=0.05)  # gives up while waiting
                except httpx.TimeoutException:
                    pass
                note("dropped")

        def health_poller():
            with httpx.Client(timeout=10) as http:
                while time.monotonic() < stop_at:
                    start = time.monotonic()
                    response = http.get(f"{url}/health")
                    elapsed = time.monotonic() - start
                    with lock:
                        health_worst[0] = max(health_worst[0], elapsed)
                    note("health", None if response.status_code == 200 else f"health {response.status_code}")
                    time.sleep(0.1)

        workers = [*(threading.Thread(target=good_client, args=(i,)) for i in range(4)),
                   *(threading.Thread(target=stream_client, args=(i,)) for i in range(3)),
                   *(threading.Thread(target=bad_client, args=(i,)) for i in range(2)),
                   *(threading.Thread(target=disconnecting_client, args=(i,)) for i in range(2)),
                   threading.Thread(target=health_poller)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(LOAD_SECONDS + 60)
        growth = rss_mb() - baseline
        metrics = httpx.get(f"{url}/metrics").text

    print(counts, f"health worst {health_worst[0]:.3f} s, RSS growth {growth:.0f} MB")
    assert not problems, problems[:10]
    assert counts["good"] >= 20 and counts["stream"] >= 10 and counts["bad"] >= 20 and counts["dropped"] >= 5, counts
    assert health_worst[0] < 1.0, health_worst
    assert growth < 150, f"RSS grew {growth:.0f} MB"
    assert 'status="500"' not in metrics and 'status="503"' not in metrics


def test_chat_template_renders_from_many_threads_once_served(pipeline):
    """Found by the soak: transformers' cached template keeps per-render state (AssistantTracker), so two
    threads rendering at once could fail; a Batcher makes the pipeline's renders take turns."""
    from mmbridge.serve.batching import Batcher

    Batcher(pipeline)  # not started: serializing the template is part of construction
    conversation = [{"role": "user", "content": [{"type": "text", "text": "hello there " * 20}]}]
    errors = []

    def render():
        for _ in range(150):
            try:
                pipeline.processor.encode(conversation, add_generation_prompt=True)
            except Exception as err:  # noqa: BLE001 - any failure is the finding
                errors.append(repr(err))

    threads = [threading.Thread(target=render) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
