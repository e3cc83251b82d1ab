"""The gate every request passes first: API key, body size, body read time, request counting.

The body is read here, whole, before any handler runs: a body over ``max_body_bytes`` gets 413
whether it declared its size (refused before reading) or came chunked without a
``Content-Length`` (refused as soon as it passes the limit), and a body that does not arrive
within ``body_timeout_s`` gets 408, so a slow or stalled client cannot hold a connection or make
the server tokenize megabytes. Handlers then read the buffered body as usual.

Plain ASGI rather than ``@app.middleware("http")`` so that a streaming response passes through
untouched: the client's disconnect reaches the SSE generator directly, which is what frees its
batch slot at once.
"""

from __future__ import annotations

import asyncio
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


class BodyRejected(Exception):
    """The request body is refused before any handler sees it: ``status`` 413 or 408."""

    def __init__(self, status: int, message: str, code: str, err_type: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.err_type = status, message, code, err_type

    def body(self) -> dict:
        return error_body(self.message, self.err_type, None, self.code)


class ClientGone(Exception):
    """The client disconnected while its request body was being read."""


async def read_body(receive: Receive, max_bytes: int | None, timeout_s: float | None) -> bytes:
    """The whole request body from ASGI ``receive``.

    Raises ``BodyRejected`` (413 ``request_too_large`` once more than ``max_bytes`` bytes have
    arrived; 408 ``timeout`` when the body is not complete within ``timeout_s`` seconds) and
    ``ClientGone`` on ``http.disconnect``. ``None`` turns a limit off."""
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientGone
                chunk = message.get("body", b"")
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    raise BodyRejected(413, f"request body exceeds the limit of {max_bytes} "
                                       "bytes", "request_too_large", "invalid_request_error")
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
    except TimeoutError:
        raise BodyRejected(408, f"the request body did not arrive within {timeout_s:g} s "
                           f"({size} bytes received)", "timeout", "timeout_error") from None


class GateMiddleware:
    """API-key check (401), body-size (413) and body-read-time (408) checks, and
    ``alignserve_requests_total``."""

    def __init__(self, app: ASGIApp, api_keys: Iterable[str], metrics: Metrics,
                 max_body_bytes: int | None = None, body_timeout_s: float | None = None) -> None:
        self.app = app
        self.keys = [k.encode() for k in api_keys if k]
        self.metrics = metrics
        self.max_body = max_body_bytes
        self.body_timeout = body_timeout_s

    async def read_request_body(self, scope: Scope, receive: Receive) -> bytes:
        """The request's whole body under this gate's limits (``read_body``); a declared
        ``Content-Length`` over ``max_body_bytes`` is refused (413) before anything is read.
        Raises ``BodyRejected`` and ``ClientGone`` as ``read_body`` does."""
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and self.max_body is not None:
                if int(value) > self.max_body:
                    raise BodyRejected(413, f"request body of {int(value)} bytes exceeds the "
                                       f"limit of {self.max_body}", "request_too_large",
                                       "invalid_request_error")
                break
        return await read_body(receive, self.max_body, self.body_timeout)

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
        scope.setdefault("state", {})["t0"] = time.perf_counter()  # arrival, for latencies
        try:
            body = await self.read_request_body(scope, receive)
        except ClientGone:  # left during the upload: counted as a client that went away
            self.metrics.observe_request(endpoint, "-", 499)
            return
        except BodyRejected as exc:
            self.metrics.observe_request(endpoint, "-", exc.status)
            # the rest of the body is never read: close the connection rather than let the
            # client keep it busy trickling bytes the server would read and discard
            await JSONResponse(exc.body(), status_code=exc.status,
                               headers={"Connection": "close"})(scope, receive, send)
            return
        replayed = False

        async def receive_buffered() -> Message:
            """The buffered body once, then the client's own events (its disconnect)."""
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        status = [500]

        async def send_wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive_buffered, send_wrapped)
        finally:
            strategy = scope.get("state", {}).get("strategy", "-")
            self.metrics.observe_request(endpoint, strategy, status[0])
