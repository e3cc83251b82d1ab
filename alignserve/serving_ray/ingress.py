"""The ingress: one HTTP endpoint in front of N engine replicas (Ray Serve deployments).

A plain ASGI app run by uvicorn in the ``alignserve serve --replicas N`` process. Every request
but ``GET /health`` and ``GET /metrics`` is forwarded whole (method, path, headers, body) to one
replica, chosen by ``work.Router`` (least outstanding work, ``x-session-id`` pinning), through
that replica's ``DeploymentHandle`` (``options(stream=True)``): the replica's own app answers it,
so every route, status code and error is exactly the single-process server's. The answer carries
``x-alignserve-replica: I``. A request and all its branches run on that one replica.

A replica that dies: its in-flight requests end with a 503 in OpenAI's error shape
(``code="replica_unavailable"``; a stream already under way gets it as an SSE error event, then
``data: [DONE]``), it is taken out of routing at once, and a probe puts it back when Ray Serve
has restarted it. ``/health`` and ``/metrics`` cover every replica (``replica`` label).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from starlette.types import Receive, Scope, Send

from ..server.errors import error_body
from ..server.gate import BodyRejected, ClientGone, GateMiddleware
from ..server.info import LAUNCH_ENV
from ..server.metrics import CONTENT_TYPE
from ..server.state import ServerLimits
from .work import NoReplicaAvailable, Router, Ticket, Work, request_work

log = logging.getLogger("alignserve.ray")
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
REPLICA_HEADER = b"x-alignserve-replica"
SESSION_HEADER = b"x-session-id"


def _replica_died_types() -> tuple[type[BaseException], ...]:
    """Ray's exceptions for a replica whose actor died or cannot be reached."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from ray.serve.exceptions import ReplicaUnavailableError

    return (ActorDiedError, ActorUnavailableError, RayActorError, ReplicaUnavailableError)


def _ray_error() -> tuple[type[BaseException], ...]:
    """Any other failure of Ray or Ray Serve (unavailable deployment, back-pressure, ...)."""
    from ray.exceptions import RayError
    from ray.serve.exceptions import RayServeException

    return (RayError, RayServeException)


def unavailable_body(replica: int | None, why: str) -> dict:
    where = f"engine replica {replica}" if replica is not None else "no engine replica"
    return error_body(f"{where} is unavailable: {why}; retry the request", "server_error", None,
                      "replica_unavailable")


async def _send_json(send: Send, status: int, body: dict,
                     headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    raw = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(raw)).encode()), *headers]})
    await send({"type": "http.response.body", "body": raw, "more_body": False})


def merge_pages(pages: dict[int, str]) -> list[Metric]:
    """Prometheus text pages of several replicas as one set of families, each sample labelled
    ``replica="I"`` (HELP/TYPE once per family)."""
    families: dict[str, Metric] = {}
    for idx, text in sorted(pages.items()):
        for fam in text_string_to_metric_families(text):
            out = families.get(fam.name)
            if out is None:
                out = families[fam.name] = Metric(fam.name, fam.documentation, fam.type)
            for s in fam.samples:
                out.add_sample(s.name, {**s.labels, "replica": str(idx)}, s.value, s.timestamp)
    return list(families.values())


class _Collected:
    """A one-shot prometheus-client collector over ready-made families."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self):  # noqa: ANN201 - the collector protocol
        yield from self.families


class Ingress:
    """The ASGI app. ``handles[i]`` is replica ``i``'s ``DeploymentHandle``."""

    def __init__(self, handles: list[Any], limits: ServerLimits | None = None,
                 api_keys: Iterable[str] = (), probe_interval_s: float = 1.0,
                 probe_timeout_s: float = 10.0) -> None:
        self.handles = handles
        self.router = Router(len(handles))
        self.limits = limits or ServerLimits()
        self.gate = GateMiddleware(lambda *a: None, api_keys, None,  # type: ignore[arg-type]
                                   self.limits.max_body_bytes, self.limits.body_timeout_s)
        self.probe_interval_s = probe_interval_s
        self.probe_timeout_s = probe_timeout_s
        self._probe_task: asyncio.Task | None = None
        self._misses = [0] * len(handles)

    # ---- replica health -------------------------------------------------------------------
    async def probe(self, i: int) -> None:
        """Ask replica ``i`` for its health; a dead actor is down at once, a replica that does
        not answer within ``probe_timeout_s`` three times in a row too."""
        try:
            info = await asyncio.wait_for(self.handles[i].health.remote(),
                                          timeout=self.probe_timeout_s)
        except _replica_died_types():
            self._misses[i] = 0
            self.router.set_up(i, False)
        except Exception:  # noqa: BLE001 - a timeout: restarting, or overloaded
            self._misses[i] += 1
            if self._misses[i] >= 3:
                self.router.set_up(i, False)
        else:
            self._misses[i] = 0
            if not self.router.replicas[i].up:
                log.warning("engine replica %d is up (pid %s)", i, info.get("pid"))
            self.router.set_up(i, True, info)

    async def probe_all(self) -> None:
        await asyncio.gather(*(self.probe(i) for i in range(len(self.handles))))

    async def _probe_loop(self) -> None:
        while True:
            await self.probe_all()
            await asyncio.sleep(self.probe_interval_s)

    def replica_died(self, i: int, exc: BaseException) -> None:
        if self.router.replicas[i].up:
            log.warning("engine replica %d died: %s", i, type(exc).__name__)
        with self.router.lock:
            self.router.replicas[i].failed += 1
        self.router.set_up(i, False)

    # ---- ASGI -----------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if method == "GET" and path == "/health":
            await self.health(send)
        elif method == "GET" and path == "/metrics":
            if not self.gate.authorized(scope):
                await _send_json(send, 401, error_body(
                    "Incorrect or missing API key: send 'Authorization: Bearer KEY'.",
                    "invalid_request_error", None, "invalid_api_key"),
                    [(b"www-authenticate", b"Bearer")])
                return
            await self.metrics(send)
        else:
            await self.forward(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await self.probe_all()
                self._probe_task = asyncio.ensure_future(self._probe_loop())
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                if self._probe_task is not None:
                    self._probe_task.cancel()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def health(self, send: Send) -> None:
        """200 while at least one replica is up (503 when none), with each replica's state."""
        rows = []
        with self.router.lock:
            for r in self.router.replicas:
                rows.append({"replica": r.index, "status": "ok" if r.up else "down",
                             "outstanding_work": round(r.outstanding, 1),
                             "in_flight": r.in_flight, "routed": r.routed, "failed": r.failed,
                             **{k: r.info.get(k) for k in ("pid", "node", "running",
                                                           "waiting")}})
        up = [row for row in rows if row["status"] == "ok"]
        model = next((r.info.get("model") for r in self.router.replicas if r.info), None)
        body = {"status": "ok" if up else "unavailable", "model": model,
                "replicas_up": len(up), "replicas": rows,
                "running": sum(row["running"] or 0 for row in up),
                "waiting": sum(row["waiting"] or 0 for row in up)}
        launch = os.environ.get(LAUNCH_ENV)  # as the single-process /health does
        await _send_json(send, 200 if up else 503, body,
                         [(b"x-alignserve-launch", launch.encode())] if launch else ())

    async def metrics(self, send: Send) -> None:
        """Every live replica's page, labelled ``replica``, plus the router's own series."""
        live = self.router.live()
        answers = await asyncio.gather(
            *(asyncio.wait_for(self.handles[i].metrics.remote(), timeout=self.probe_timeout_s)
              for i in live), return_exceptions=True)
        pages = {i: a for i, a in zip(live, answers) if isinstance(a, str)}
        fams = merge_pages(pages)
        up = GaugeMetricFamily("alignserve_replica_up", "1 while the engine replica is routed "
                               "to, 0 while it is down or restarting", labels=["replica"])
        work = GaugeMetricFamily("alignserve_replica_outstanding_work", "token-rows of work "
                                 "in flight on the replica (prompt + fan-out x max_tokens, "
                                 "paid back as tokens stream)", labels=["replica"])
        inflight = GaugeMetricFamily("alignserve_replica_in_flight_requests",
                                     "requests in flight on the replica", labels=["replica"])
        routed = CounterMetricFamily("alignserve_replica_routed_requests", "requests routed "
                                     "to the replica", labels=["replica"])
        failed = CounterMetricFamily("alignserve_replica_failed_requests", "requests that "
                                     "ended with a 503 because the replica died",
                                     labels=["replica"])
        with self.router.lock:
            for r in self.router.replicas:
                lab = [str(r.index)]
                up.add_metric(lab, 1.0 if r.up else 0.0)
                work.add_metric(lab, r.outstanding)
                inflight.add_metric(lab, r.in_flight)
                routed.add_metric(lab, r.routed)
                failed.add_metric(lab, r.failed)
        reg = CollectorRegistry()
        reg.register(_Collected([*fams, up, work, inflight, routed, failed]))  # type: ignore
        raw = generate_latest(reg)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", CONTENT_TYPE.encode()),
                                (b"content-length", str(len(raw)).encode())]})
        await send({"type": "http.response.body", "body": raw, "more_body": False})

    async def forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Route the request to one replica and relay its answer (see the module docstring)."""
        try:  # 413 for a declared or chunked body past the limit, 408 when it arrives too late
            body = await self.gate.read_request_body(scope, receive)
        except ClientGone:
            return
        except BodyRejected as exc:  # the rest of the body is never read: close the connection
            await _send_json(send, exc.status, exc.body(), [(b"connection", b"close")])
            return
        headers = list(scope.get("headers", []))
        work = Work(1, 1, 1.0)
        if scope["method"] == "POST" and scope["path"] in GENERATION_PATHS:
            try:
                work = request_work(scope["path"], json.loads(body), self.limits)
            except ValueError:
                pass
        session = next((v.decode("latin-1") for k, v in headers if k == SESSION_HEADER), None)
        try:
            ticket = self.router.choose(work, session)
        except NoReplicaAvailable as exc:
            await _send_json(send, 503, unavailable_body(None, str(exc)),
                             [(b"retry-after", b"1")])
            return
        req = {"method": scope["method"], "path": scope["path"],
               "query_string": scope.get("query_string", b""), "headers": headers,
               "body": body, "client": scope.get("client")}
        gen = self.handles[ticket.replica].options(stream=True).http.remote(req)
        relay = asyncio.ensure_future(self._relay(gen, send, ticket))
        gone = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait({relay, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not relay.done():  # the client hung up: stop the replica's work
                relay.cancel()
                with contextlib.suppress(BaseException):
                    await relay
                with contextlib.suppress(Exception):
                    gen.cancel()
            else:
                relay.result()
        finally:
            gone.cancel()
            ticket.close()

    async def _relay(self, gen: Any, send: Send, ticket: Ticket) -> None:
        """Relay replica messages; a streamed (SSE) answer chunk by chunk, any other answer
        whole once complete (so a replica dying mid-way still gets a clean 503)."""
        tag = (REPLICA_HEADER, str(ticket.replica).encode())
        start: dict | None = None
        sse = False
        buffered: list[bytes] = []
        try:
            async for msg in gen:
                if msg["type"] == "start":
                    start = msg
                    sse = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                              for k, v in msg["headers"])
                    if sse:
                        await send({"type": "http.response.start", "status": msg["status"],
                                    "headers": [*msg["headers"], tag]})
                elif sse:
                    await send({"type": "http.response.body", "body": msg["body"],
                                "more_body": True})
                    ticket.progress(msg["body"].count(b'"choices": [{'))
                else:
                    buffered.append(msg["body"])
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure ends in OpenAI's error shape
            status = 503
            if isinstance(exc, _replica_died_types()):
                self.replica_died(ticket.replica, exc)
                err = unavailable_body(ticket.replica, "it stopped while serving this request")
            elif isinstance(exc, _ray_error()):
                err = unavailable_body(ticket.replica, type(exc).__name__)
            else:  # ours: a bug in the relay, never the client's input
                status = 500
                err = error_body(f"internal error: {type(exc).__name__}", "server_error", None,
                                 None)
            log.warning("request on replica %d failed: %r", ticket.replica, exc)
            if start is not None and sse:
                await send({"type": "http.response.body", "more_body": True,
                            "body": f"data: {json.dumps(err)}\n\ndata: [DONE]\n\n".encode()})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            else:
                await _send_json(send, status, err, [tag, (b"retry-after", b"1")])
            return
        if start is None:
            await _send_json(send, 503, unavailable_body(ticket.replica, "no answer"), [tag])
        elif sse:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        else:
            await send({"type": "http.response.start", "status": start["status"],
                        "headers": [*start["headers"], tag]})
            await send({"type": "http.response.body", "body": b"".join(buffered),
                        "more_body": False})


async def _wait_disconnect(receive: Callable) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return
