"""Prometheus text exposition for ``GET /metrics``, written by hand.

The format is a few lines of text per metric, so a client library would be a dependency for
nothing. Counters live here and are bumped from the asyncio thread only (the HTTP layer), so they
need no lock; gauges (queue depth, running requests, step latency) are read from the engine when
scraped, so they are never stale.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _esc(v: str) -> str:
    """Escape a label value as the exposition format requires."""
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**kv: str) -> str:
    if not kv:
        return ""
    return "{" + ",".join(f'{k}="{_esc(str(v))}"' for k, v in sorted(kv.items())) + "}"


class Metrics:
    """Counters of what the server did since it started."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str, str]] = Counter()  # (endpoint, strategy, code)
        self.tokens_generated: Counter[str] = Counter()  # by strategy: every token produced
        self.tokens_returned: Counter[str] = Counter()   # by strategy: tokens in the response
        self.tokens_discarded: Counter[str] = Counter()  # generated - returned
        self.guidance_forwards: Counter[str] = Counter()
        self.stream_errors: Counter[str] = Counter()     # errors after the 200 was sent
        self.disconnects = 0

    # ---- recording -------------------------------------------------------------------------
    def observe_request(self, endpoint: str, strategy: str, status: int) -> None:
        self.requests[(endpoint, strategy, str(status))] += 1

    def observe_result(self, strategy: str, res: dict[str, Any]) -> None:
        """Account a finished generation from its engine result (``stats`` and usage)."""
        st = res.get("stats")
        returned = int(res.get("completion_tokens", 0))
        generated = int(getattr(st, "tokens_generated", 0) or 0)
        # plain sampling does not count tokens in stats; then everything produced was returned
        generated = max(generated, returned)
        self.tokens_generated[strategy] += generated
        self.tokens_returned[strategy] += returned
        self.tokens_discarded[strategy] += generated - returned
        self.guidance_forwards[strategy] += int(getattr(st, "guidance_forwards", 0) or 0)

    # ---- exposition ------------------------------------------------------------------------
    def render(self, engine: Any) -> str:
        """The Prometheus text page; ``engine`` supplies the live gauges."""
        out: list[str] = []

        def metric(name: str, kind: str, help_: str,
                   rows: list[tuple[dict[str, str], float]]) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            for labels, value in rows:
                out.append(f"{name}{_labels(**labels)} {_num(value)}")

        metric("alignserve_requests_total", "counter",
               "HTTP requests by endpoint, alignment strategy and status code",
               [({"endpoint": e, "strategy": s, "code": c}, v)
                for (e, s, c), v in sorted(self.requests.items())])
        metric("alignserve_tokens_generated_total", "counter",
               "tokens produced by strategies, discarded candidates included",
               [({"strategy": s}, v) for s, v in sorted(self.tokens_generated.items())])
        metric("alignserve_tokens_returned_total", "counter",
               "completion tokens returned to clients",
               [({"strategy": s}, v) for s, v in sorted(self.tokens_returned.items())])
        metric("alignserve_tokens_discarded_total", "counter",
               "tokens generated but not returned (rejected samples, blocks, rollouts)",
               [({"strategy": s}, v) for s, v in sorted(self.tokens_discarded.items())])
        metric("alignserve_guidance_forwards_total", "counter",
               "forwards of guidance models and reward calls",
               [({"strategy": s}, v) for s, v in sorted(self.guidance_forwards.items())])
        metric("alignserve_stream_errors_total", "counter",
               "errors sent inside a stream after its 200 status, by error type",
               [({"type": t}, v) for t, v in sorted(self.stream_errors.items())])
        metric("alignserve_client_disconnects_total", "counter",
               "requests (streamed or not) whose client went away before the end",
               [({}, self.disconnects)])
        metric("alignserve_queue_depth", "gauge", "requests waiting for KV-cache slots",
               [({}, engine.queue_depth)])
        metric("alignserve_running_requests", "gauge", "requests in the running batch",
               [({}, engine.running)])
        metric("alignserve_step_latency_seconds", "gauge",
               "duration of the engine's last step (one batched forward per model)",
               [({}, engine.last_step_s)])
        metric("alignserve_engine_steps_total", "counter", "engine steps since start",
               [({}, engine.step_count)])
        return "\n".join(out) + "\n"


def _num(v: float) -> str:
    if isinstance(v, int) or float(v).is_integer():
        return str(int(v))
    return repr(float(v))
