"""Keeping connections and engine requests sound, however a response ends.

* ``ContainErrors`` — an exception that escapes a handler must not escape the ASGI app: Starlette's
  outermost ``ServerErrorMiddleware`` answers it and then re-raises, and uvicorn closes a
  connection whose app raised after the response started, so the client's next request on the
  same keep-alive connection was reset. Here the exception is logged and answered (a 500 in
  OpenAI's shape, or, when a response is already under way, a clean end of it: an SSE error event
  and ``data: [DONE]``), and the app returns normally.
* ``EngineStream`` — a ``StreamingResponse`` tied to one engine request: ``on_close`` runs once
  when the response ends for any reason (finished, the client gone before the first event or
  mid-stream, an error), so a stream closed before its generator ever started still cancels its
  request; closing the generator alone cannot, because a never-started async generator runs no
  ``finally``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable

from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("alignserve.server")


def _error(message: str) -> dict:
    return {"error": {"message": message, "type": "server_error", "param": None, "code": None}}


class ContainErrors:
    """Plain ASGI middleware: no exception from the app below reaches the server."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = complete = sse = False

        async def tracked(message: Message) -> None:
            nonlocal started, complete, sse
            if message["type"] == "http.response.start":
                started = True
                sse = any(k == b"content-type" and v.startswith(b"text/event-stream")
                          for k, v in message.get("headers", []))
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                complete = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except ClientDisconnect:
            # the client is gone (on ASGI 2.4 servers a failing ``send`` says so): no one to
            # answer, and nothing went wrong on our side
            log.debug("client gone during %s %s", scope.get("method"), scope.get("path"))
        except Exception as exc:  # noqa: BLE001 - this is the last line of defence
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            message = f"internal error: {type(exc).__name__}"
            try:
                if not started:
                    await JSONResponse(_error(message), status_code=500)(scope, receive, send)
                elif not complete:
                    tail = b""
                    if sse:  # end the stream as the API does: an error event, then [DONE]
                        tail = f"data: {json.dumps(_error(message))}\n\ndata: [DONE]\n\n".encode()
                    await send({"type": "http.response.body", "body": tail, "more_body": False})
            except Exception:  # noqa: BLE001 - the client may be gone; nothing more to do
                log.debug("could not send the error response", exc_info=True)


class EngineStream(StreamingResponse):
    """SSE response that calls ``on_close(gone)`` exactly once when it ends, whatever the cause.

    ``gone`` is True when the client left before the response's end (its last body message
    never went out and no error of ours cut it short). The body generator is closed first (so
    its own ``finally`` blocks run now rather than at garbage collection), then ``on_close``
    runs; it is where the HTTP layer cancels the engine request if it is still live and counts
    the disconnect.
    """

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[bool], None],
                 **kwargs: object) -> None:
        super().__init__(content, **kwargs)  # type: ignore[arg-type]
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        complete = failed = False

        async def tracked(message: Message) -> None:
            nonlocal complete
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                complete = True

        try:
            await super().__call__(scope, receive, tracked)
        except ClientDisconnect:
            raise
        except BaseException:
            failed = True  # our fault (or shutdown), not the client leaving
            raise
        finally:
            try:
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
            except Exception:  # noqa: BLE001 - closing must not stop the cancellation below
                log.debug("closing the stream's generator failed", exc_info=True)
            finally:
                self._on_close(not complete and not failed)
