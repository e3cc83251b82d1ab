"""Running one generation for a handler: build its strategy, submit, await or stream it.

Shared by the completions and chat handlers. A client that hangs up cancels its engine request
(the slots free at once) and is counted once in ``alignserve_client_disconnects_total``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from ..decoders import build_decoder
from ..engine.api import GenerationInput
from ..engine.primitives import EngineError
from .connection import EngineStream
from .errors import APIError, to_api_error
from .metrics import RequestTimer
from .params import strategy_of
from .sse import with_heartbeat
from .state import ServerState


def arrival(request: Request) -> float:
    """``time.perf_counter()`` when the gate saw the request (now, if it did not)."""
    return getattr(request.state, "t0", None) or time.perf_counter()


def timer(srv: ServerState, request: Request, inp: GenerationInput) -> RequestTimer:
    return RequestTimer(srv.metrics, request.url.path, strategy_of(inp.alignment),
                        arrival(request))


def build(srv: ServerState, inp: GenerationInput) -> GenerationInput:
    """Build and validate ``inp``'s strategy (``inp.decoder``); a bad one is a 400, and so is
    one the engine client cannot run (remote-base mode), with the reason."""
    off = getattr(srv.client, "unavailable_strategies", dict)()
    name = strategy_of(inp.alignment)
    if name in off:
        raise APIError(400, f"strategy {name!r} is not available on this server: {off[name]}",
                       "alignment.strategy")
    try:
        inp.decoder = build_decoder(inp.alignment, prompt_logprobs=inp.prompt_logprobs,
                                    registry=srv.client.resources)
    except Exception as exc:  # noqa: BLE001
        raise to_api_error(exc) from None
    return inp


async def _result(srv: ServerState, inp: GenerationInput, tm: RequestTimer) -> dict[str, Any]:
    async for ev in srv.client.stream(inp):
        tm.event(ev)
        if ev[0] == "done":
            tm.finish(ev[1])
            return ev[1]
        if ev[0] == "error":
            raise ev[1]
    raise EngineError("generation ended without a result")


async def run(srv: ServerState, inp: GenerationInput, request: Request,
              tm: RequestTimer) -> dict[str, Any]:
    """Await one generation; a client that hangs up cancels it (its slots free at once)."""
    task = asyncio.ensure_future(_result(srv, inp, tm))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()  # leaves the engine's queue (or batch) at once
                if not getattr(request.state, "gone", False):  # once per request, even
                    request.state.gone = True  # when several prompts run side by side
                    srv.metrics.disconnect()
                raise APIError(499, "client closed the connection", None, "client_closed")
    except (APIError, asyncio.CancelledError):
        task.cancel()
        raise
    except Exception as exc:  # noqa: BLE001
        raise to_api_error(exc) from None


def begin(srv: ServerState, inp: GenerationInput) -> tuple:
    """Submit a streaming request; errors (400, 429) surface before the 200 is sent."""
    try:
        return srv.client.start(inp)
    except Exception as exc:  # noqa: BLE001
        raise to_api_error(exc) from None


async def watched(srv: ServerState, started: tuple, strategy: str,
                  tm: RequestTimer) -> AsyncIterator[tuple]:
    """A started request's engine events, accounting its result or a mid-stream error.
    Closing this (disconnect) closes the client's event generator, whose ``finally`` cancels the
    engine request; ``sse``'s ``on_close`` counts the disconnect (and cancels a request whose
    stream never reached this generator)."""
    events = srv.client.events(*started)
    try:
        async for ev in events:
            tm.event(ev)
            if ev[0] == "done":
                srv.metrics.observe_result(strategy, ev[1])
                tm.finish(ev[1])
            elif ev[0] == "error":
                err = to_api_error(ev[1])
                srv.metrics.stream_error(err.code or err.err_type)
            yield ev
    finally:
        await events.aclose()  # type: ignore[attr-defined]


def sse(srv: ServerState, gen: AsyncIterator[str], started: tuple) -> EngineStream:
    """The SSE response for a submitted request; however it ends (even before its first
    event) a request still live is cancelled, and a client gone before the end counted."""
    req = started[0]

    def on_close(gone: bool) -> None:
        if gone:
            srv.metrics.disconnect()
        if not req.done:
            srv.client.engine.cancel(req)

    return EngineStream(with_heartbeat(gen, srv.limits.sse_heartbeat_s), on_close,
                        media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
