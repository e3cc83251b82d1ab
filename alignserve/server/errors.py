"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

``APIError`` is what handlers raise; ``to_api_error`` maps engine and strategy exceptions to
the status that fits (400 for the client's input, 408 timeout, 429 full queue, 500 ours);
``install_error_handlers`` answers every exception FastAPI sees in that shape, request
validation errors included (the first error names the field as ``param``).
"""

from __future__ import annotations

import math
from email.message import Message

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..decoders import AlignmentError
from ..engine.api import ContextLengthError
from ..engine.primitives import EngineError
from ..engine.scheduler import QueueFull, RequestTimeout
from ..remote.http import RemoteError
from .validation import invalid_text_error


class APIError(Exception):
    """An HTTP error answered as ``error_body(...)`` with ``status`` and ``headers``."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, err_type: str = "invalid_request_error",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        if code is None and status == 400:  # a bad value unless the raiser says otherwise
            code = "invalid_value"
        self.status, self.message, self.param, self.code = status, message, param, code
        self.err_type, self.headers = err_type, headers

    def body(self) -> dict:
        return error_body(self.message, self.err_type, self.param, self.code)


def error_body(message: str, err_type: str, param: str | None, code: str | None) -> dict:
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def to_api_error(exc: BaseException) -> APIError:
    """The ``APIError`` for an exception raised while building, submitting or running."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, AlignmentError):
        return APIError(400, str(exc), exc.field, "invalid_value")
    if isinstance(exc, RemoteError):  # remote-base mode: the base server failed (502 / 504)
        return APIError(exc.status, str(exc), None, exc.code, "server_error")
    if isinstance(exc, QueueFull):
        return APIError(429, str(exc), None, "queue_full", "rate_limit_error",
                        headers={"Retry-After": "1"})
    if isinstance(exc, RequestTimeout):
        return APIError(408, str(exc), None, "timeout", "timeout_error")
    if isinstance(exc, ContextLengthError):
        return APIError(400, str(exc), "prompt", "context_length_exceeded")
    if isinstance(exc, EngineError) and str(exc).startswith("engine step failed"):
        # the batch's forward crashed: the server's fault, never the request's
        return APIError(500, str(exc), None, "engine_step_failed", "server_error")
    if isinstance(exc, EngineError):
        return APIError(400, str(exc), None, "engine_error")
    if isinstance(exc, ValueError) and hasattr(exc, "field"):
        return APIError(400, str(exc), exc.field)  # type: ignore[attr-defined]
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", None, None,
                    "server_error")


def _union_tag(x: object) -> bool:
    """A pydantic location element naming a union member's type, not a field."""
    return isinstance(x, str) and (x in ("str", "int", "float", "bool", "none") or "[" in x)


def validation_error(errs: list) -> JSONResponse:
    """A 400 naming the first invalid field of a request body pydantic refused."""
    if (bad_text := invalid_text_error(errs)) is not None:  # a lone surrogate somewhere
        return JSONResponse(error_body(bad_text[0], "invalid_request_error", bad_text[1],
                                       "invalid_value"), status_code=400)
    first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
    # pydantic names the member of a union it tried ("stop.str", "prompt.list[int]"): not a field
    loc = [str(x) for x in first.get("loc", ()) if x != "body" and not _union_tag(x)]
    param = ".".join(loc) or None
    bad = first.get("input")
    if first.get("type") == "json_invalid":
        msg, param = "Request body is not valid JSON.", None
    elif first.get("type") == "missing" and param is None:  # no body at all
        msg = "Request body is missing: send the request's fields as a JSON object."
    elif isinstance(bad, float) and not math.isfinite(bad):  # JSON NaN / Infinity
        msg = f"Invalid value for '{param}': must be a finite number, not {bad}"
    elif first.get("type") == "unsupported_field":
        param = ".".join(loc + [first["ctx"]["field"]])
        msg = f"Unsupported value for '{param}': {first['msg']}"
    elif first.get("type") == "extra_forbidden":
        msg = (f"Unknown field '{param}': this server does not implement it (see the "
               "README's API section for the supported fields)")
    else:
        msg = f"Invalid value for '{param}': {first.get('msg')}" if param else first["msg"]
    return JSONResponse(error_body(msg, "invalid_request_error", param, "invalid_value"),
                        status_code=400)


def declared_non_json(request: Request) -> str | None:
    """The request's ``Content-Type`` when it is not JSON (``application/json``, any ``+json``
    type, any charset): its value, or ``"none"`` when the header is missing (FastAPI reads a
    body without one as JSON no more, against cross-site request forgery); None for JSON."""
    value = request.headers.get("content-type")
    if not value:
        return "none"
    msg = Message()
    msg["content-type"] = value
    sub = msg.get_content_subtype()
    if msg.get_content_maintype() == "application" and (sub == "json" or sub.endswith("+json")):
        return None
    return value


def unsupported_media_type(content_type: str) -> JSONResponse:
    """415 for a body declared as something other than JSON (as vLLM answers)."""
    return JSONResponse(error_body(
        f"Unsupported Media Type: the request body must be JSON sent with 'Content-Type: "
        f"application/json', got '{content_type}' (with curl: -H 'Content-Type: "
        "application/json' or --json; plain -d sends application/x-www-form-urlencoded)",
        "invalid_request_error", None, "unsupported_media_type"), status_code=415)


def install_error_handlers(app: FastAPI) -> None:
    """Answer ``APIError``, validation errors, HTTP errors and anything else in OpenAI's shape."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI reads a body as JSON only when it is declared JSON (or undeclared): any other
        # type fails as "not a dictionary", which is the wrong message
        if (ctype := declared_non_json(request)) is not None:
            return unsupported_media_type(ctype)
        return validation_error(list(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 400: "invalid_value"}.get(exc.status_code)
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error", None, code),
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error",
                                       None, None), status_code=500)
