"""Request gates that run before any routing or body parsing (pure ASGI middleware).

They sit in front of FastAPI on purpose: an unauthenticated client gets 401 before its body is
even read, and an oversized body is refused before it is buffered for JSON parsing.
"""

from __future__ import annotations

import asyncio
import hmac
import json

from mmbridge.serve.errors import envelope


async def send_error(send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    payload = json.dumps(body).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload})


def _protected(scope, prefixes) -> bool:
    return scope["type"] == "http" and scope["path"].startswith(tuple(prefixes))


class APIKeyMiddleware:
    """`Authorization: Bearer <key>` on the API routes; 401 otherwise. Health routes stay open so
    orchestrators can probe them. The comparison is constant-time."""

    def __init__(self, app, api_key: str, prefixes=("/v1",)):
        self.app, self.key, self.prefixes = app, api_key.encode(), prefixes

    async def __call__(self, scope, receive, send):
        if _protected(scope, self.prefixes):
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                message = "missing API key (Authorization: Bearer ...)" if not header else "invalid API key"
                await send_error(send, 401, envelope(message, "authentication_error", None, "invalid_api_key"),
                                 {"WWW-Authenticate": "Bearer"})
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """413 for request bodies over `max_bytes`, declared (Content-Length) or streamed (chunked).

    The body is buffered here, up to the cap, and replayed to the app: the JSON parser needs all
    of it anyway, and this way a chunked upload cannot grow past the cap.
    """

    def __init__(self, app, max_bytes: int, prefixes=("/v1",), timeout_s: float | None = None):
        self.app, self.max_bytes, self.prefixes, self.timeout_s = app, max_bytes, prefixes, timeout_s

    async def __call__(self, scope, receive, send):
        if not _protected(scope, self.prefixes):
            return await self.app(scope, receive, send)
        too_big = envelope(f"request body is larger than the limit of {self.max_bytes} bytes",
                           "invalid_request_error", None, "request_too_large")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await send_error(send, 413, too_big)
        chunks, size = [], 0
        deadline = None if self.timeout_s is None else asyncio.get_running_loop().time() + self.timeout_s
        while True:
            try:  # a stalled body (slow-loris) gets 408 instead of holding the connection forever
                remaining = None if deadline is None else max(0.0, deadline - asyncio.get_running_loop().time())
                message = await asyncio.wait_for(receive(), remaining)
            except asyncio.TimeoutError:
                return await send_error(send, 408, envelope(
                    f"the request body did not arrive within {self.timeout_s:g} s", "invalid_request_error",
                    None, "request_timeout"), {"Connection": "close"})
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await send_error(send, 413, too_big)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards: the real channel (disconnect notifications)

        await self.app(scope, replay, send)
