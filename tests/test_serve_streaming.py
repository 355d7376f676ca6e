"""Streaming requests join the dynamic batch: concurrent streams (and plain requests) share forward passes,
each stream's pieces arrive while the batch runs and join to exactly the plain answer (stop strings
too), and a client that stops reading never stalls the batch."""

from __future__ import annotations

import concurrent.futures
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


class CountingPipeline:
    """Records the rows of every generate call; `step_delay` slows each decoding step."""

    def __init__(self, step_delay: float = 0.0):
        self.inner = MMBridgePipeline.from_pretrained(shared_tiny_model_dir())
        self.model, self.processor = self.inner.model, self.inner.processor
        self.trigger_ids = self.inner.trigger_ids
        self.batch_sizes: list[int] = []
        self.model.llm.model.register_forward_pre_hook(lambda *a, **k: time.sleep(step_delay), with_kwargs=True)

    def generate(self, conversations, **kwargs):
        self.batch_sizes.append(len(conversations))
        return self.inner.generate(conversations, **kwargs)


@pytest.fixture(scope="module")
def served():
    pipeline = CountingPipeline(step_delay=0.01)
    settings = ServeSettings(model_name=MODEL, max_batch_size=8, batch_wait_ms=50, max_queue=64)
    with running_server(create_app(pipeline, settings)) as url:
        yield url, pipeline


def messages(text):
    return [{"role": "user", "content": text}]


def stream_pieces(url, body):
    """Content pieces with their arrival times, the finish reason and the usage chunk."""
    pieces, finish, usage = [], None, None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            for choice in chunk["choices"]:
                if choice["delta"].get("content"):
                    pieces.append((time.monotonic(), choice["delta"]["content"]))
                finish = choice.get("finish_reason") or finish
            usage = chunk.get("usage") or usage
    return pieces, finish, usage


def test_concurrent_streams_share_batches_and_match_plain_answers(served):
    url, pipeline = served
    prompts = [f"question {i} about shapes" for i in range(8)]
    plain = {p: httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": messages(p),
                                                                "max_tokens": 24}, timeout=60).json()
             for p in prompts}
    pipeline.batch_sizes.clear()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        streamed = dict(zip(prompts, pool.map(lambda p: stream_pieces(url, {
            "model": MODEL, "messages": messages(p), "max_tokens": 24,
            "stream_options": {"include_usage": True}}), prompts)))
    assert max(pipeline.batch_sizes) > 1, pipeline.batch_sizes  # streams were batched together
    assert len(pipeline.batch_sizes) < len(prompts)
    for prompt, (pieces, finish, usage) in streamed.items():
        expected = plain[prompt]["choices"][0]
        assert "".join(text for _, text in pieces) == expected["message"]["content"]
        assert finish == expected["finish_reason"]
        assert usage == plain[prompt]["usage"]
    # pieces arrived while generating, not all at the end
    spread = [pieces[-1][0] - pieces[0][0] for pieces, _, _ in streamed.values() if len(pieces) > 2]
    assert spread and max(spread) > 0.05


def test_streaming_and_plain_requests_share_one_batch(served):
    url, pipeline = served
    body = {"model": MODEL, "messages": messages("hi"), "max_tokens": 12}
    pipeline.batch_sizes.clear()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        plain = [pool.submit(lambda: httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json())
                 for _ in range(2)]
        streams = [pool.submit(stream_pieces, url, body) for _ in range(2)]
        answers = [f.result()["choices"][0]["message"]["content"] for f in plain]
        texts = ["".join(t for _, t in f.result()[0]) for f in streams]
    assert max(pipeline.batch_sizes) > 1
    assert texts == answers[:1] * 2 and answers[0] == answers[1]


def test_stop_strings_and_n_in_batched_streams(served):
    url, _ = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
    greedy = client.chat.completions.create(model=MODEL, messages=messages("hi"), max_tokens=16)
    text = greedy.choices[0].message.content
    stop = text[3:5]
    plain = client.chat.completions.create(model=MODEL, messages=messages("hi"), max_tokens=16, stop=[stop])
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages("hi"), max_tokens=16, stop=[stop],
                                                 stream=True))
    joined = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert joined == plain.choices[0].message.content and stop not in joined
    kwargs = dict(model=MODEL, messages=messages("hi"), max_tokens=8, temperature=1.0, seed=11, n=2)
    plain_n = client.chat.completions.create(**kwargs)
    by_choice = {0: "", 1: ""}
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            by_choice[choice.index] += choice.delta.content or ""
    assert [by_choice[0], by_choice[1]] == [c.message.content for c in plain_n.choices]


def test_a_client_that_stops_reading_does_not_stall_the_batch(served):
    url, _ = served
    body = {"model": MODEL, "messages": messages("hi"), "max_tokens": 200, "stream": True}
    stalled = threading.Event()
    with httpx.Client(timeout=60) as slow:
        with slow.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            next(response.iter_lines())  # one event read, then the client stops reading
            stalled.set()
            start = time.monotonic()
            others = [httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": False, "max_tokens": 6},
                                 timeout=60) for _ in range(3)]
            elapsed = time.monotonic() - start
    assert all(r.status_code == 200 for r in others)
    assert elapsed < 10, elapsed  # each waits at most for the running batch, which never waits on the reader
