"""Dynamic batching, admission control (429 + Retry-After) and cancellation on disconnect."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import httpx
import pytest

from mmbridge.generation import MMBridgePipeline, SamplingOptions
from mmbridge.serve.app import ServeSettings, create_app
from mmbridge.serve.batching import Batcher, Overloaded
from mmbridge.serve.testing import running_server, shared_tiny_model_dir


class CountingPipeline:
    """Records each generate call's batch size; optional per-decoding-step delay."""

    def __init__(self, step_delay: float = 0.0):
        self.inner = MMBridgePipeline.from_pretrained(shared_tiny_model_dir())
        self.model, self.processor = self.inner.model, self.inner.processor
        self.batch_sizes: list[int] = []
        self.steps = 0

        def slow_step(module, args, kwargs):
            self.steps += 1
            time.sleep(step_delay)

        self.model.llm.model.register_forward_pre_hook(slow_step, with_kwargs=True)

    def generate(self, conversations, **kwargs):
        self.batch_sizes.append(len(conversations))
        return self.inner.generate(conversations, **kwargs)

    def stream(self, conversation, **kwargs):
        return self.inner.stream(conversation, **kwargs)


def conv(text):
    return [{"role": "user", "content": text}]


def test_concurrent_requests_share_forward_passes_and_match_solo_results():
    pipeline = CountingPipeline()
    options = SamplingOptions(max_new_tokens=6)
    prompts = [f"question {i}?" for i in range(6)]
    solo = [pipeline.inner.generate([conv(p)], options=options)[0].text for p in prompts]
    batcher = Batcher(pipeline, max_batch_size=8, max_wait_ms=50, max_queue=16).start()
    try:
        jobs = [batcher.submit(conv(p), options) for p in prompts]
        texts = [job.future.result(30)[0].text for job in jobs]
    finally:
        batcher.stop()
    assert texts == solo
    assert len(pipeline.batch_sizes) < len(prompts) and max(pipeline.batch_sizes) > 1


def test_incompatible_options_are_not_batched_together():
    pipeline = CountingPipeline()
    batcher = Batcher(pipeline, max_batch_size=8, max_wait_ms=50, max_queue=16).start()
    try:
        jobs = [batcher.submit(conv("a"), SamplingOptions(max_new_tokens=3)),
                batcher.submit(conv("b"), SamplingOptions(max_new_tokens=5))]
        results = [job.future.result(30)[0] for job in jobs]
    finally:
        batcher.stop()
    assert pipeline.batch_sizes == [1, 1]
    assert results[0].completion_tokens <= 3


def test_queue_bound_raises_overloaded():
    pipeline = CountingPipeline(step_delay=0.05)
    batcher = Batcher(pipeline, max_batch_size=1, max_wait_ms=0, max_queue=1).start()
    try:
        running = batcher.submit(conv("a"), SamplingOptions(max_new_tokens=20))
        time.sleep(0.1)  # the worker took it
        waiting = batcher.submit(conv("b"), SamplingOptions(max_new_tokens=2))
        with pytest.raises(Overloaded) as busy:
            batcher.submit(conv("c"), SamplingOptions(max_new_tokens=2))
        assert busy.value.retry_after >= 1
        assert running.future.result(30) and waiting.future.result(30)
    finally:
        batcher.stop()


@pytest.fixture
def slow_server():
    pipeline = CountingPipeline(step_delay=0.02)
    settings = ServeSettings(model_name="tiny", max_batch_size=2, max_queue=2, batch_wait_ms=1)
    app = create_app(pipeline, settings)
    with running_server(app) as url:
        yield url, app.state.mmbridge.batcher, pipeline


def test_burst_beyond_capacity_gets_fast_429_and_accepted_requests_finish(slow_server):
    url, batcher, _ = slow_server
    body = {"model": "tiny", "messages": conv("hi"), "max_tokens": 15}

    client = httpx.Client(timeout=60, limits=httpx.Limits(max_connections=20))
    client.get(f"{url}/health")  # client set-up cost (TLS context etc.) paid before timing

    def send(_):
        start = time.monotonic()
        response = client.post(f"{url}/v1/chat/completions", json=body)
        return response, time.monotonic() - start

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        outcomes = list(pool.map(send, range(12)))
    client.close()
    ok = [r for r, _ in outcomes if r.status_code == 200]
    busy = [(r, t) for r, t in outcomes if r.status_code == 429]
    assert ok and busy and len(ok) + len(busy) == 12
    for response, seconds in busy:
        assert int(response.headers["Retry-After"]) >= 1
        assert response.json()["error"]["code"] == "server_overloaded"
        assert seconds < 1.0, [round(t, 2) for _, t in outcomes]  # refused at once
    assert all(r.json()["usage"]["completion_tokens"] == 15 for r in ok)
    assert httpx.get(f"{url}/health").status_code == 200


def test_client_disconnect_mid_stream_aborts_generation_and_frees_the_slot(slow_server):
    url, batcher, pipeline = slow_server
    body = {"model": "tiny", "messages": conv("hi"), "max_tokens": 400, "stream": True}  # ~8 s if not aborted
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            received = [next(lines) for _ in range(6)]  # role chunk + a few content chunks
    assert all(line.startswith("data: ") or not line for line in received)
    deadline = time.monotonic() + 3
    while (batcher.stats["cancelled"] < 1 or batcher.stats["active"]) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert batcher.stats["cancelled"] == 1 and batcher.stats["active"] == 0
    steps_after_cancel = pipeline.steps
    time.sleep(0.3)
    assert pipeline.steps == steps_after_cancel < 200  # generation stopped, far from 400 steps
    again = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": False, "max_tokens": 3}, timeout=30)
    assert again.status_code == 200


def test_client_disconnect_while_waiting_non_streaming_cancels(slow_server):
    url, batcher, _ = slow_server
    body = {"model": "tiny", "messages": conv("hi"), "max_tokens": 400}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
    deadline = time.monotonic() + 3
    while (batcher.stats["cancelled"] < 1 or batcher.stats["active"]) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert batcher.stats["cancelled"] == 1 and batcher.stats["active"] == 0


def test_stop_fails_pending_jobs():
    pipeline = CountingPipeline(step_delay=0.02)
    batcher = Batcher(pipeline, max_batch_size=1, max_wait_ms=0, max_queue=4).start()
    batcher.submit(conv("a"), SamplingOptions(max_new_tokens=10))
    time.sleep(0.05)
    pending = batcher.submit(conv("b"), SamplingOptions(max_new_tokens=10))
    batcher.stop()
    assert pending.future.exception(5) is not None
    assert not threading.Thread.is_alive(batcher._thread)
