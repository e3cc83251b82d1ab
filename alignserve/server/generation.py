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
from .sse import close_pending, with_heartbeat
from .state import ServerState

FIRST_EVENT_WAIT_S = 10.0  # longest wait for a stream's first event before its 200 goes out


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
        # branches beyond the KV-cache slots: a 400 naming the field and its range here
        inp.decoder.check_slots(inp.n, srv.client.engine.base.cache.slots)
    except Exception as exc:  # noqa: BLE001
        raise to_api_error(exc) from None
    return inp


async def _result(srv: ServerState, inp: GenerationInput, tm: RequestTimer) -> dict[str, Any]:
    """The engine result of a non-streamed request. Ended before it (the client hung up, the
    request timed out or failed), it still counts what was generated up to then, none of it
    returned: the tokens its choices produced and, where its strategy keeps them
    (``ctx.stats``), every token generated and the guidance forwards, as a stream does."""
    req, q = srv.client.start(inp)
    events = srv.client.events(req, q)
    produced, ended = 0, False
    try:
        async for ev in events:
            tm.event(ev)
            if ev[0] == "delta" and ev[3] is not None:
                produced += 1
            elif ev[0] == "done":
                ended = True
                tm.finish(ev[1])
                return ev[1]
            elif ev[0] == "error":  # counted below with what it generated
                raise ev[1]
    finally:
        await events.aclose()  # type: ignore[attr-defined]
        if not ended:
            stats = getattr(getattr(req, "ctx", None), "stats", None)
            srv.metrics.observe_cancelled(strategy_of(inp.alignment), produced, stats,
                                          returned=0)
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


async def open_stream(srv: ServerState, inp: GenerationInput, request: Request, strategy: str,
                      tm: RequestTimer) -> tuple[tuple, AsyncIterator[tuple]]:
    """Submit a streaming request: (the started request, its ``watched`` events). Errors at
    submission (400, 429) raise their ``APIError`` before the 200.

    With a client whose requests often fail before any output (``fails_before_output``: remote
    mode, whose base server may be down or slow) the first event is awaited too, and an error
    that comes first raises its ``APIError`` (502 / 504 naming the base URL), as the
    non-streamed path does, instead of a 200 and an SSE error event. The wait is bounded by the
    SSE heartbeat interval (``FIRST_EVENT_WAIT_S`` when heartbeats are off): a strategy silent
    for longer (Best-of-N, DeAL) starts its stream then and keeps it alive, and an error after
    that, or after tokens went out, ends the stream as an SSE error event and ``[DONE]``.
    In-process the 200 goes out at once (a queued stream gets its keep-alives)."""
    started = begin(srv, inp)
    events = srv.client.events(*started)
    if not getattr(srv.client, "fails_before_output", False):
        return started, watched(srv, events, strategy, tm, started[0])
    first = asyncio.ensure_future(events.__anext__())
    wait = srv.limits.sse_heartbeat_s if srv.limits.sse_heartbeat_s > 0 else FIRST_EVENT_WAIT_S
    deadline = time.perf_counter() + wait
    try:
        while not first.done() and (left := deadline - time.perf_counter()) > 0:
            await asyncio.wait({first}, timeout=min(0.5, left))
            if not first.done() and await request.is_disconnected():
                srv.metrics.disconnect()
                raise APIError(499, "client closed the connection", None, "client_closed")
        ev = first.result() if first.done() else None
    except BaseException:
        await close_pending(first, events)
        if not started[0].done:
            srv.client.engine.cancel(started[0])
        raise
    if ev is not None and ev[0] == "error":
        await close_pending(first, events)
        raise to_api_error(ev[1])
    return started, watched(srv, _resumed(first, events), strategy, tm, started[0])


async def _resumed(first: asyncio.Future, events: AsyncIterator[tuple]) -> AsyncIterator[tuple]:
    """``events`` whose first item is ``first`` (a started ``__anext__``, maybe still pending)."""
    try:
        try:
            yield await first
        except StopAsyncIteration:
            return
        async for ev in events:
            yield ev
    finally:
        await close_pending(first, events)


async def watched(srv: ServerState, events: AsyncIterator[tuple], strategy: str,
                  tm: RequestTimer, req: Any = None) -> AsyncIterator[tuple]:
    """A started request's engine ``events``, accounting its result or a mid-stream error.
    Closing this (disconnect) closes the client's event generator, whose ``finally`` cancels the
    engine request; ``sse``'s ``on_close`` counts the disconnect (and cancels a request whose
    stream never reached this generator). A stream that ends before its result (closed, timed
    out, failed) still counts what was generated up to then: its streamed tokens, and the
    engine request ``req``'s strategy counts (``ctx.stats``: tokens generated, guidance
    forwards) where it has them."""
    streamed, ended = 0, False
    try:
        async for ev in events:
            tm.event(ev)
            if ev[0] == "done":
                ended = True
                srv.metrics.observe_result(strategy, ev[1])
                tm.finish(ev[1])
            elif ev[0] == "error":  # its tokens are counted below, as a cancelled stream's
                err = to_api_error(ev[1])
                srv.metrics.stream_error(err.code or err.err_type)
            elif ev[0] == "delta" and ev[3] is not None:
                streamed += 1  # one token handed to the response
            yield ev
    finally:
        await events.aclose()  # type: ignore[attr-defined]
        if not ended:  # cancelled or failed: the engine request has stopped by now
            ctx = getattr(req, "ctx", None)
            srv.metrics.observe_cancelled(strategy, streamed, getattr(ctx, "stats", None))


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
