"""Prometheus metrics for `GET /metrics` (needs `prometheus_client`, in the `serve` extra).

One registry per app (several apps in one process, as in the tests, do not collide). What is counted:

    mmbridge_requests_total{route, status}            every HTTP request that reached the app
    mmbridge_request_errors_total{status, code}       4xx/5xx by reason (the envelope's `code`)
    mmbridge_request_seconds{route, stream}           latency histogram (to the last byte for streams)
    mmbridge_prompt_tokens_total / _completion_tokens_total
    mmbridge_queue_depth, mmbridge_running_rows       gauges read at scrape time
    mmbridge_batch_rows, mmbridge_batch_seconds       per dynamic batch
    mmbridge_model_ready                              1 once the model is loaded

Without prometheus_client every method is a no-op and `/metrics` answers 501.
"""

from __future__ import annotations

import time
from collections.abc import Callable

try:
    import prometheus_client as prom
except ImportError:  # optional: the server runs without it
    prom = None

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
ROUTES = ("/v1/chat/completions", "/v1/images/generations", "/v1/models", "/health", "/health/ready", "/metrics")


class Metrics:
    def __init__(self, queue_depth: Callable[[], float], running_rows: Callable[[], float],
                 ready: Callable[[], float]):
        self.enabled = prom is not None
        if not self.enabled:
            return
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.requests = prom.Counter("mmbridge_requests", "HTTP requests", ["route", "status"], registry=r)
        self.errors = prom.Counter("mmbridge_request_errors", "error responses by reason", ["status", "code"],
                                   registry=r)
        self.latency = prom.Histogram("mmbridge_request_seconds", "request latency", ["route", "stream"],
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = prom.Counter("mmbridge_prompt_tokens", "prompt tokens served", registry=r)
        self.completion_tokens = prom.Counter("mmbridge_completion_tokens", "tokens generated", registry=r)
        self.batch_rows = prom.Histogram("mmbridge_batch_rows", "rows per dynamic batch", buckets=BATCH_BUCKETS,
                                         registry=r)
        self.batch_seconds = prom.Histogram("mmbridge_batch_seconds", "seconds per dynamic batch",
                                            buckets=LATENCY_BUCKETS, registry=r)
        prom.Gauge("mmbridge_queue_depth", "requests waiting for a batch", registry=r).set_function(queue_depth)
        prom.Gauge("mmbridge_running_rows", "rows in the running batch", registry=r).set_function(running_rows)
        prom.Gauge("mmbridge_model_ready", "1 once the model is loaded", registry=r).set_function(ready)

    def error(self, status: int, code: str | None) -> None:
        if self.enabled:
            self.errors.labels(str(status), code or "none").inc()

    def tokens(self, prompt: int, completion: int) -> None:
        if self.enabled:
            self.prompt_tokens.inc(prompt)
            self.completion_tokens.inc(completion)

    def batch(self, rows: int, seconds: float) -> None:
        if self.enabled:
            self.batch_rows.observe(rows)
            self.batch_seconds.observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return prom.generate_latest(self.registry), prom.CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Counts every HTTP response by route and status and times it to its last byte (pure ASGI, so it
    sees the 401/413/408 that the security middleware answers before routing)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.metrics.enabled:
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in ROUTES else ("/v1/models/{id}" if path.startswith("/v1/models/") else
                                             "/ui" if path.startswith("/ui") else "other")
        start, status, stream = time.perf_counter(), {"code": 500}, {"sse": "false"}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                headers = dict(message.get("headers") or [])
                if headers.get(b"content-type", b"").startswith(b"text/event-stream"):
                    stream["sse"] = "true"
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.requests.labels(route, str(status["code"])).inc()
            self.metrics.latency.labels(route, stream["sse"]).observe(time.perf_counter() - start)
