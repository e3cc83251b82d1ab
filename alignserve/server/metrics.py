"""Prometheus metrics for ``GET /metrics`` (``prometheus-client``, one registry per app).

Counters and histograms are recorded from the asyncio thread (the HTTP layer); the engine's
gauges (queue depth, running requests, last step latency, steps) are read from the engine when
scraped, so they are never stale. Names, labels and buckets are listed in the README
("Metrics"); ``docs/grafana-dashboard.json`` charts them.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

try:  # no ``*_created`` series: they double the page for no chart anyone draws
    from prometheus_client import disable_created_metrics
    disable_created_metrics()
except ImportError:  # pragma: no cover - older clients
    pass

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
REQ = ("endpoint", "strategy")  # labels of the per-request histograms
# bucket upper bounds (the README's "Metrics" table lists the same)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5, 5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
COST_BUCKETS = (1, 1.25, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class EngineCollector:
    """Gauges read from the engine at scrape time (``engine`` set by ``Metrics.render``)."""

    def __init__(self) -> None:
        self.engine: Any = None

    def collect(self):  # noqa: ANN201 - the prometheus-client collector protocol
        eng = self.engine
        if eng is None:
            return
        for name, help_, value in (
                ("alignserve_queue_depth", "requests waiting for KV-cache slots",
                 eng.queue_depth),
                ("alignserve_running_requests", "requests in the running batch", eng.running),
                ("alignserve_step_latency_seconds",
                 "duration of the engine's last step (one batched forward per model)",
                 eng.last_step_s)):
            yield GaugeMetricFamily(name, help_, value=value)
        yield CounterMetricFamily("alignserve_engine_steps", "engine steps since start",
                                  value=eng.step_count)


class Metrics:
    """Everything ``/metrics`` shows, in its own ``CollectorRegistry``."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("alignserve_requests", "HTTP requests by endpoint, alignment "
                                "strategy and status code", ("code", "endpoint", "strategy"),
                                registry=r)
        by_s = ("strategy",)
        self.tokens_generated = Counter("alignserve_tokens_generated", "tokens produced by "
                                        "strategies, discarded candidates included", by_s,
                                        registry=r)
        self.tokens_returned = Counter("alignserve_tokens_returned",
                                       "completion tokens returned to clients", by_s, registry=r)
        self.tokens_discarded = Counter("alignserve_tokens_discarded", "tokens generated but "
                                        "not returned (rejected samples, blocks, rollouts)",
                                        by_s, registry=r)
        self.guidance_forwards = Counter("alignserve_guidance_forwards",
                                         "forwards of guidance models and reward calls", by_s,
                                         registry=r)
        self.stream_errors = Counter("alignserve_stream_errors", "errors sent inside a stream "
                                     "after its 200 status, by error type", ("type",),
                                     registry=r)
        self._disconnects = Counter("alignserve_client_disconnects", "requests (streamed or "
                                    "not) whose client went away before the end", registry=r)
        self.disconnects = 0  # the same count, readable without parsing the page
        self.ttft = Histogram("alignserve_time_to_first_token_seconds", "seconds from the "
                              "request's arrival to its first generated token", REQ,
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("alignserve_inter_token_latency_seconds", "seconds between "
                             "successive output deltas (tokens) of a request", REQ,
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("alignserve_request_latency_seconds", "seconds from the request's "
                             "arrival to its last token (end to end)", REQ,
                             buckets=E2E_BUCKETS, registry=r)
        self.queue = Histogram("alignserve_queue_time_seconds", "seconds a request waited in "
                               "the engine's queue before admission to the batch", REQ,
                               buckets=QUEUE_BUCKETS, registry=r)
        self.prompt_tokens = Histogram("alignserve_prompt_tokens", "prompt tokens per request",
                                       REQ, buckets=TOKEN_BUCKETS, registry=r)
        self.generation_tokens = Histogram("alignserve_generation_tokens", "completion tokens "
                                           "returned per request", REQ, buckets=TOKEN_BUCKETS,
                                           registry=r)
        self.guidance_cost = Histogram("alignserve_guidance_cost_ratio", "tokens generated per "
                                       "token returned, per request (1 = no overhead)", by_s,
                                       buckets=COST_BUCKETS, registry=r)
        self._engine = EngineCollector()
        r.register(self._engine)

    # ---- recording -------------------------------------------------------------------------
    def observe_request(self, endpoint: str, strategy: str, status: int) -> None:
        self.requests.labels(str(status), endpoint, strategy).inc()

    def disconnect(self) -> None:
        self.disconnects += 1
        self._disconnects.inc()

    def stream_error(self, kind: str) -> None:
        self.stream_errors.labels(kind).inc()

    def observe_result(self, strategy: str, res: dict[str, Any]) -> None:
        """Account a finished generation from its engine result (``stats`` and usage)."""
        st = res.get("stats")
        returned = int(res.get("completion_tokens", 0))
        generated = int(getattr(st, "tokens_generated", 0) or 0)
        # plain sampling does not count tokens in stats; then everything produced was returned
        generated = max(generated, returned)
        self.tokens_generated.labels(strategy).inc(generated)
        self.tokens_returned.labels(strategy).inc(returned)
        self.tokens_discarded.labels(strategy).inc(generated - returned)
        self.guidance_forwards.labels(strategy).inc(int(getattr(st, "guidance_forwards", 0)
                                                        or 0))
        if returned:
            self.guidance_cost.labels(strategy).observe(generated / returned)

    def observe_cancelled(self, strategy: str, produced: int, stats: Any,
                          returned: int | None = None) -> None:
        """Account a generation ended before its result (client gone, timed out, failed).

        ``produced``: the tokens its choices emitted up to then; ``returned``: those that
        reached the client (a stream's, the default: all of them; a non-streamed request's: 0);
        ``stats``: its strategy's counts (None when unknown), for the tokens generated (at
        least ``produced``) and the guidance forwards. No per-request histogram: the request
        has no end-to-end result."""
        returned = produced if returned is None else returned
        generated = max(int(getattr(stats, "tokens_generated", 0) or 0), produced)
        self.tokens_generated.labels(strategy).inc(generated)
        self.tokens_returned.labels(strategy).inc(returned)
        self.tokens_discarded.labels(strategy).inc(generated - returned)
        self.guidance_forwards.labels(strategy).inc(int(getattr(stats, "guidance_forwards", 0)
                                                        or 0))

    # ---- exposition ------------------------------------------------------------------------
    def render(self, engine: Any) -> str:
        """The Prometheus text page; ``engine`` supplies the live gauges."""
        self._engine.engine = engine
        return generate_latest(self.registry).decode()


class RequestTimer:
    """Latencies of one generation, fed its engine events; ``t0`` is ``time.perf_counter()``
    when the request arrived. ``finish(res)`` records the per-request histograms."""

    def __init__(self, metrics: Metrics, endpoint: str, strategy: str, t0: float) -> None:
        self.m, self.labels, self.t0 = metrics, (endpoint, strategy), t0
        self.first: float | None = None
        self.last: float | None = None

    def event(self, ev: tuple) -> None:
        """One engine event. An output delta (a token emitted, or text released) counts; the
        closing flush of a finished choice (no token, no text) does not."""
        if ev[0] != "delta" or (ev[3] is None and not ev[2]):
            return
        now = time.perf_counter()
        if self.first is None:
            self.first = now
            self.m.ttft.labels(*self.labels).observe(now - self.t0)
        else:
            self.m.itl.labels(*self.labels).observe(now - (self.last or now))
        self.last = now

    def finish(self, res: dict[str, Any]) -> None:
        self.m.e2e.labels(*self.labels).observe(time.perf_counter() - self.t0)
        if "queue_s" in res:
            self.m.queue.labels(*self.labels).observe(max(0.0, float(res["queue_s"])))
        self.m.prompt_tokens.labels(*self.labels).observe(int(res.get("prompt_tokens", 0)))
        self.m.generation_tokens.labels(*self.labels).observe(
            int(res.get("completion_tokens", 0)))
