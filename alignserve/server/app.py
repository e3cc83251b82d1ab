"""OpenAI-compatible HTTP layer (FastAPI): the app assembled from its modules.

Endpoints: ``/v1/completions`` (``completions``), ``/v1/chat/completions`` (``chat``),
``/v1/models``, ``/v1/heads``, ``/health``, ``/metrics`` and the playground page at ``/``
(``info``). Every error leaves in OpenAI's shape ``{"error": {"message", "type", "param",
"code"}}`` with a 4xx status that fits (``errors``); nothing a client sends reaches the engine
unvalidated (``schemas``, ``params``). With API keys configured every endpoint but ``/health`` and
the static playground files needs ``Authorization: Bearer KEY`` (``gate``).
"""

from __future__ import annotations

from collections.abc import Iterable

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from ..engine.api import EngineClient
from . import chat, completions, info
from .connection import ContainErrors
from .errors import APIError, error_body, install_error_handlers, to_api_error
from .gate import GateMiddleware
from .info import STATIC_DIR
from .metrics import Metrics
from .state import DEFAULT_ALIAS_WEIGHTS, ServerLimits, ServerState

__all__ = ["APIError", "ServerLimits", "create_app", "error_body", "to_api_error"]


def create_app(client: EngineClient, model_name: str,
               limits: ServerLimits | None = None,
               alias_weights: dict[str, dict[str, float]] | None = None,
               api_keys: Iterable[str] = ()) -> FastAPI:
    """The HTTP app over ``client``; ``api_keys`` (none = open) guard every endpoint but
    ``/health`` and the playground's static files. ``app.state.server`` holds the shared
    ``ServerState``; ``app.state.metrics`` its ``Metrics``."""
    limits = limits or ServerLimits()
    metrics = Metrics()
    srv = ServerState(client, model_name, limits, metrics,
                      alias_weights or {k: dict(v) for k, v in DEFAULT_ALIAS_WEIGHTS.items()})
    app = FastAPI(title="alignserve", version="0.1.0",
                  description="OpenAI-compatible server for decoding-time alignment")
    app.state.server = srv
    app.state.client = client
    app.state.limits = limits
    app.state.model_name = model_name
    app.state.metrics = metrics

    install_error_handlers(app)
    # an exception escaping the app would make uvicorn drop the keep-alive connection
    app.add_middleware(ContainErrors)
    # added last, so it runs first: a request without a valid key never reaches a handler
    # (plain ASGI, not @app.middleware: that wrapper hides a client's disconnect from handlers)
    app.add_middleware(GateMiddleware, api_keys=list(api_keys), metrics=metrics,
                       max_body_bytes=limits.max_body_bytes, body_timeout_s=limits.body_timeout_s)
    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    for module in (info, completions, chat):
        app.include_router(module.router)
    return app
