"""Operations: `mmbridge serve` exits non-zero when the model fails to load (one line naming the damaged
file), a stalled request body gets 408, a request that waits too long for its batch gets 503 +
Retry-After, and `/metrics` exposes requests, errors by reason, tokens, queue depth and batch sizes."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from mmbridge.generation import MMBridgePipeline
from mmbridge.serve.app import ServeSettings, create_app
from mmbridge.serve.testing import running_server, shared_tiny_model_dir

MODEL = "tiny"


def valid(**overrides):
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, **overrides}


@pytest.fixture(scope="module")
def pipeline():
    return MMBridgePipeline.from_pretrained(shared_tiny_model_dir())


def test_serve_exits_non_zero_naming_the_damaged_file(tmp_path):
    model = tmp_path / "damaged"
    shutil.copytree(shared_tiny_model_dir(), model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [str(Path(sys.executable).parent / "mmbridge"), "serve", "--model", str(model), "--port", str(port),
               "--log-level", "critical"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("mmbridge serve: error: the model failed to load:"), done.stderr[-2000:]
    assert "model.safetensors" in last and "corrupt or truncated" in last


def test_a_stalled_body_gets_408_and_the_server_stays_healthy(pipeline):
    settings = ServeSettings(model_name=MODEL, body_timeout_s=0.5)
    with running_server(create_app(pipeline, settings)) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n{\"model\": ")
            start = time.monotonic()
            reply = b""
            while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
            elapsed = time.monotonic() - start
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert b'"request_timeout"' in reply and 0.3 < elapsed < 5
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.post(f"{url}/v1/chat/completions", json=valid(), timeout=30).status_code == 200


class SlowPipeline:
    def __init__(self, inner, step_delay):
        self.inner, self.model, self.processor = inner, inner.model, inner.processor
        self.step_delay = step_delay

    def generate(self, conversations, stopping_criteria=None, **kwargs):
        from transformers import StoppingCriteria, StoppingCriteriaList

        delay = self.step_delay

        class Sleep(StoppingCriteria):
            def __call__(self, input_ids, scores, **kw):
                time.sleep(delay)
                import torch

                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        criteria = StoppingCriteriaList([Sleep(), *(stopping_criteria or [])])
        return self.inner.generate(conversations, stopping_criteria=criteria, **kwargs)


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_waiting_too_long_for_its_batch_gets_503(pipeline, stream):
    settings = ServeSettings(model_name=MODEL, max_batch_size=1, queue_timeout_s=0.5)
    with running_server(create_app(SlowPipeline(pipeline, 0.05), settings)) as url:
        results = {}
        long_request = threading.Thread(target=lambda: results.setdefault("long", httpx.post(
            f"{url}/v1/chat/completions", json=valid(max_tokens=60), timeout=60)))
        long_request.start()
        time.sleep(0.2)
        start = time.monotonic()
        if stream:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=valid(stream=True), timeout=30) as r:
                body = "".join(r.iter_text())
            assert r.status_code == 200 and '"queue_timeout"' in body and body.rstrip().endswith("[DONE]")
        else:
            response = httpx.post(f"{url}/v1/chat/completions", json=valid(), timeout=30)
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "queue_timeout" and int(response.headers["Retry-After"]) >= 1
        assert time.monotonic() - start < 2.0
        long_request.join()
        assert results["long"].status_code == 200


def test_metrics_count_requests_errors_tokens_and_batches(pipeline):
    pytest.importorskip("prometheus_client")
    with running_server(create_app(pipeline, ServeSettings(model_name=MODEL))) as url:
        assert httpx.post(f"{url}/v1/chat/completions", json=valid(), timeout=30).status_code == 200
        assert httpx.post(f"{url}/v1/chat/completions", json=valid(max_tokens=True), timeout=30).status_code == 400
        assert httpx.post(f"{url}/v1/chat/completions", json=valid(stop="x" * 999), timeout=30).status_code == 400
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=valid(stream=True), timeout=30) as r:
            "".join(r.iter_text())
        response = httpx.get(f"{url}/metrics")
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
        text = response.text
        for line in ('mmbridge_requests_total{route="/v1/chat/completions",status="200"} 2.0',
                     'mmbridge_requests_total{route="/v1/chat/completions",status="400"} 2.0',
                     'mmbridge_request_errors_total{code="invalid_value",status="400"} 1.0',
                     'mmbridge_request_errors_total{code="limit_exceeded",status="400"} 1.0',
                     'mmbridge_request_seconds_count{route="/v1/chat/completions",stream="true"} 1.0',
                     "mmbridge_batch_rows_count 2.0", "mmbridge_queue_depth 0.0", "mmbridge_running_rows 0.0",
                     "mmbridge_model_ready 1.0"):
            assert line in text, line
        completion = [ln for ln in text.splitlines() if ln.startswith("mmbridge_completion_tokens_total")]
        assert completion and 2 <= float(completion[0].split()[-1]) <= 6
