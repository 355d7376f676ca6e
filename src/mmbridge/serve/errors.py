"""The one error type the API raises on purpose; rendered as OpenAI's error envelope."""

from __future__ import annotations


class APIError(Exception):
    """`{"error": {"message", "type", "param", "code"}}` with an HTTP status.

    `type` follows OpenAI's vocabulary (invalid_request_error, authentication_error, ...), so
    clients map it onto their own exception classes.
    """

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return envelope(self.message, self.type, self.param, self.code)


def envelope(message: str, type: str = "invalid_request_error", param: str | None = None,
             code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
