"""Server-sent events: ``data: {json}`` lines, ``data: [DONE]``, and keep-alive comments.

A stream whose strategy works a long time before its next event (Best-of-N and DeAL send their
answer only once it is chosen; a request may also wait in the queue) would look idle to a proxy,
which may cut it. ``with_heartbeat`` sends the SSE comment ``: keep-alive`` after every
``interval`` seconds without an event; clients ignore comments (the SSE spec; OpenAI's SDKs).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

DONE = "data: [DONE]\n\n"
HEARTBEAT = ": keep-alive\n\n"


def data(obj: dict) -> str:
    """One SSE event holding ``obj`` as JSON."""
    return f"data: {json.dumps(obj)}\n\n"


async def with_heartbeat(events: AsyncIterator[str], interval: float) -> AsyncIterator[str]:
    """``events`` with ``HEARTBEAT`` inserted after each ``interval`` seconds of silence.

    ``interval <= 0`` passes ``events`` through unchanged. The next event is awaited in a task
    so the wait can time out without cancelling it; closing this generator cancels that task
    (the cancellation reaches the engine client's ``finally``) and closes ``events``.
    """
    if interval <= 0:
        try:
            async for chunk in events:
                yield chunk
        finally:
            await events.aclose()  # type: ignore[attr-defined]
        return
    it = events.__aiter__()
    pending: asyncio.Future | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(it.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield HEARTBEAT
                continue
            nxt, pending = pending, None
            try:
                chunk = nxt.result()
            except StopAsyncIteration:
                return
            yield chunk
    finally:
        await close_pending(pending, events)


async def close_pending(pending: asyncio.Future | None, events: AsyncIterator) -> None:
    """Cancel ``pending`` (an ``__anext__`` of ``events`` run as a task) unless it is done, then
    close ``events`` (for the engine clients' event generators that cancels a live request)."""
    if pending is not None and not pending.done():
        pending.cancel()
        with contextlib.suppress(BaseException):
            await pending
    await events.aclose()  # type: ignore[attr-defined]
