"""What every handler shares: the engine client, the limits, the metrics (``app.state.server``).

The HTTP layer reaches the engine only through ``EngineClient``'s methods (``encode``,
``chat_prompt``, ``start``/``events``/``stream``, ``token_str``, ...), so another client
implementation with the same methods can serve the same routes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from ..engine.api import EngineClient
from .metrics import Metrics

# weights a MODEL:STRATEGY alias uses when the request names none ("*" = any strategy)
DEFAULT_ALIAS_WEIGHTS = {"*": {"sentiment": 1.0}, "vas": {"sentiment": 3.0},
                         "cd": {"sentiment": 3.0}, "genarm": {"sentiment": 1.0}}


@dataclass
class ServerLimits:
    """Request limits, all configurable from the CLI."""

    max_tokens: int = 1024
    max_n: int = 16
    max_body_bytes: int = 1_000_000
    body_timeout_s: float = 30.0  # seconds a request body may take to arrive, else 408
    max_prompts: int = 32
    default_chat_max_tokens: int = 256
    default_completion_max_tokens: int = 16
    max_candidates: int | None = None  # cap on CANDIDATE_FIELDS; None = the strategies' own
    sse_heartbeat_s: float = 10.0  # idle seconds before a stream sends ": keep-alive"; 0 = off


@dataclass
class ServerState:
    client: EngineClient
    model_name: str
    limits: ServerLimits
    metrics: Metrics
    alias_weights: dict[str, dict[str, float]] = field(
        default_factory=lambda: {k: dict(v) for k, v in DEFAULT_ALIAS_WEIGHTS.items()})
    extra: dict[str, Any] = field(default_factory=dict)


def state_of(request: Request) -> ServerState:
    """The app's ``ServerState`` (set by ``create_app``)."""
    return request.app.state.server
