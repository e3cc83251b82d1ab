"""The gate every request passes first: API key, declared body size, per-request counting.

Plain ASGI rather than ``@app.middleware("http")`` so that a streaming response passes through
untouched: the client's disconnect reaches the SSE generator directly, which is what frees its
batch slot at once.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Iterable

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_body
from .metrics import Metrics

# paths a client may reach without a key: liveness probes and the playground's static files
# (the page itself asks for the key; every API call it makes carries it)
PUBLIC_PATHS = ("/health", "/", "/favicon.ico")
PUBLIC_PREFIXES = ("/static/",)
METRIC_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/heads",
                    "/health", "/metrics")


class GateMiddleware:
    """API-key check (401), body-size check (413) and ``alignserve_requests_total``."""

    def __init__(self, app: ASGIApp, api_keys: Iterable[str], metrics: Metrics,
                 max_body_bytes: int | None = None) -> None:
        self.app = app
        self.keys = [k.encode() for k in api_keys if k]
        self.metrics = metrics
        self.max_body = max_body_bytes

    def too_large(self, scope: Scope) -> int | None:
        """The declared body size when it is over the limit (checked before reading it)."""
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and self.max_body is not None:
                return int(value) if int(value) > self.max_body else None
        return None

    def authorized(self, scope: Scope) -> bool:
        path = scope.get("path", "")
        if not self.keys or path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
            return True
        header = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                header = value
                break
        scheme, _, token = header.partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            return False
        # compare against every key in constant time so the answer leaks no prefix length
        return any([hmac.compare_digest(token, k) for k in self.keys])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in METRIC_ENDPOINTS else "other"
        if not self.authorized(scope):
            self.metrics.observe_request(endpoint, "-", 401)
            resp = JSONResponse(error_body(
                "Incorrect or missing API key: send 'Authorization: Bearer KEY'.",
                "invalid_request_error", None, "invalid_api_key"), status_code=401,
                headers={"WWW-Authenticate": "Bearer"})
            await resp(scope, receive, send)
            return
        size = self.too_large(scope)
        if size is not None:
            self.metrics.observe_request(endpoint, "-", 413)
            resp = JSONResponse(error_body(
                f"request body of {size} bytes exceeds the limit of {self.max_body}",
                "invalid_request_error", None, "request_too_large"), status_code=413)
            await resp(scope, receive, send)
            return
        scope.setdefault("state", {})["t0"] = time.perf_counter()  # arrival, for latencies
        status = [500]

        async def send_wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapped)
        finally:
            strategy = scope.get("state", {}).get("strategy", "-")
            self.metrics.observe_request(endpoint, strategy, status[0])
