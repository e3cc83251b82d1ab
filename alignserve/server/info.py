"""Read-only endpoints: ``/v1/models``, ``/v1/heads``, ``/health``, ``/metrics`` and the
browser playground at ``/``."""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse

from ..decoders import STRATEGIES, strategy_info
from .metrics import CONTENT_TYPE
from .state import state_of

LAUNCH_ENV = "ALIGNSERVE_LAUNCH_ID"  # echoed by /health (x-alignserve-launch) when set
STATIC_DIR = Path(__file__).resolve().parent / "static"
router = APIRouter()


@router.get("/", include_in_schema=False)
async def playground() -> FileResponse:
    """The browser playground: plain HTML/JS over the public API, no build step."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics_page(request: Request) -> PlainTextResponse:
    """Prometheus text format: request counts, tokens, latency histograms, engine gauges."""
    srv = state_of(request)
    return PlainTextResponse(srv.metrics.render(srv.client.engine), media_type=CONTENT_TYPE)


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 ``{"status": "ok", ...}``; in remote mode also the base server's reachability, and
    503 with ``"status": "degraded"`` while it is unreachable (so a load balancer stops
    sending requests that could only end in 502s)."""
    srv = state_of(request)
    eng = srv.client.engine
    headers = {}
    if launch := os.environ.get(LAUNCH_ENV):  # set by ``ServerProcess``: which server answers
        headers["x-alignserve-launch"] = launch
    body = {"status": "ok", "model": srv.model_name, "running": eng.running,
            "waiting": eng.queue_depth}
    deps = await srv.client.dependency_health()
    if deps:
        body.update(deps)
        if not all(d.get("reachable", True) for d in deps.values()):
            body["status"] = "degraded"
            return JSONResponse(body, status_code=503, headers=headers)
    return JSONResponse(body, headers=headers)


@router.get("/v1/models")
async def models(request: Request) -> dict:
    srv = state_of(request)
    client, name = srv.client, srv.model_name
    heads = client.resources.describe() if client.resources is not None else []
    off = getattr(client, "unavailable_strategies", dict)()  # remote mode: what it cannot run
    served = [s for s in sorted(STRATEGIES) if s not in off]
    data = [{"id": name, "object": "model", "created": 0, "owned_by": "alignserve",
             "max_model_len": client.max_len,
             "alignment": {"strategies": served,
                           "objectives": [h["name"] for h in heads]}}]
    data += [{"id": f"{name}:{s}", "object": "model", "created": 0,
              "owned_by": "alignserve", "root": name, "max_model_len": client.max_len}
             for s in served if s != "sample"]
    return {"object": "list", "data": data}


@router.get("/v1/heads")
async def heads(request: Request) -> dict:
    """Every reward source and guidance head, with its allowed weight range."""
    client = state_of(request).client
    rows = client.resources.describe() if client.resources is not None else []
    strategies = strategy_info(client.engine.base.cache.slots)
    # remote-base mode: strategies the remote's capabilities rule out, with the reason
    off = getattr(client, "unavailable_strategies", dict)()
    for row in strategies:
        if row["name"] in off:
            row["unavailable"] = off[row["name"]]
    return {"object": "list", "data": rows, "strategies": strategies}
