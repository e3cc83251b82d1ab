"""One engine replica: a Ray Serve deployment that owns the single-process server's app.

``EngineReplica`` builds exactly what ``alignserve serve`` builds (``server.main.build_server``:
engine, heads, rewards, the FastAPI app with its gate and metrics) inside a Ray actor, and
serves HTTP requests handed to it by the ingress as plain dicts, through the app's ASGI
interface. ``http`` is an async generator of the response's ASGI messages, so a streamed
answer flows through chunk by chunk (``handle.options(stream=True)``); closing it early (the
client went away) delivers ``http.disconnect`` to the app, which cancels the engine request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any


class EngineReplica:
    """Ray Serve deployment class (decorated in ``launch``); ``index`` labels its metrics."""

    def __init__(self, args: argparse.Namespace, index: int) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from ..engine.model_store import DEFAULT_MODEL_NAME, resolve_model
        from ..server.main import build_server

        model_dir = resolve_model(args.model)
        name = args.served_name or (DEFAULT_MODEL_NAME if args.model == "default"
                                    else model_dir.name)
        self.index = index
        self.app = build_server(args, model_dir, name)
        self.srv = self.app.state.server

    async def health(self) -> dict[str, Any]:
        """Liveness and load: ``{"replica", "pid", "node", "model", "running", "waiting"}``."""
        import ray

        eng = self.srv.client.engine
        return {"replica": self.index, "pid": os.getpid(),
                "node": ray.get_runtime_context().get_node_id(), "model": self.srv.model_name,
                "running": eng.running, "waiting": eng.queue_depth}

    async def metrics(self) -> str:
        """This replica's Prometheus page (what ``/metrics`` shows on a single server)."""
        return self.srv.metrics.render(self.srv.client.engine)

    async def http(self, req: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Serve one HTTP request through the app. ``req``: ``method``, ``path``,
        ``query_string`` (bytes), ``headers`` (list of (bytes, bytes)), ``body`` (bytes).
        Yields ``{"type": "start", "status", "headers"}`` once, then ``{"type": "body",
        "body": bytes}`` chunks, as the app sends them."""
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
                 "http_version": "1.1", "method": req["method"], "scheme": "http",
                 "path": req["path"], "raw_path": req["path"].encode(),
                 "query_string": req.get("query_string", b""), "root_path": "",
                 "headers": [(bytes(k), bytes(v)) for k, v in req["headers"]],
                 "client": tuple(req.get("client") or ("127.0.0.1", 0)),
                 "server": ("127.0.0.1", 0), "state": {}}
        out: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()
        body_sent = False

        async def receive() -> dict[str, Any]:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": req.get("body", b""),
                        "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(msg: dict[str, Any]) -> None:
            await out.put(msg)

        async def run() -> None:
            try:
                await self.app(scope, receive, send)
            finally:
                await out.put(None)

        task = asyncio.ensure_future(run())
        try:
            while True:
                msg = await out.get()
                if msg is None:
                    return
                if msg["type"] == "http.response.start":
                    yield {"type": "start", "status": msg["status"],
                           "headers": [(bytes(k), bytes(v)) for k, v in msg.get("headers", [])]}
                elif msg["type"] == "http.response.body" and msg.get("body"):
                    yield {"type": "body", "body": bytes(msg["body"])}
        finally:
            gone.set()  # the app sees the client leave and cancels the engine request
            if not task.done():
                with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(asyncio.shield(task), timeout=5.0)
                task.cancel()
