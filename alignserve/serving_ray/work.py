"""Routing by outstanding work: what a request costs, and which replica should take it.

No Ray here (unit-testable on its own). A request's *work* is counted in token-rows: the
prompt is prefilled once (branches fork its KV cache), then every branch the strategy fans out
to decodes up to ``max_tokens`` tokens::

    work = prompt_tokens + fan_out * max_tokens
    fan_out = sum(strategy.slots_needed(n).values())   # n x samples / candidates / beams

``prompt_tokens`` is estimated as ``len(prompt text) / 4`` (the ingress does not tokenize).
A replica's outstanding work is the sum of its in-flight requests' remaining work; a streamed
request pays its work back as its tokens arrive (``fan_out / n`` per delta chunk), any request
pays the rest back when it ends. ``Router.choose`` picks the live replica with the least
outstanding work (ties: fewer requests routed so far, then the lower index); an ``x-session-id``
header pins a conversation to the replica that served its first request while that replica is
up.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from ..server.state import ServerLimits

CHARS_PER_TOKEN = 4  # rough prompt-length estimate (English text, BPE vocabularies)
MAX_SESSIONS = 10_000  # pinned sessions remembered (least recently used dropped first)


class NoReplicaAvailable(RuntimeError):
    """Every replica is down (dead, restarting or not yet started)."""


@dataclass
class Work:
    """What one request costs: ``fan_out`` sequences (KV-cache slots, all choices and branches)
    for ``n`` returned choices, ``total`` token-rows (see the module docstring)."""

    fan_out: int
    n: int
    total: float

    @property
    def per_chunk(self) -> float:
        """Token-rows one streamed delta chunk (one token of one choice) stands for."""
        return self.fan_out / max(1, self.n)


def fan_out(model: str, n: int, alignment: Any) -> int:
    """Sequences a request decodes side by side: ``n`` for plain sampling, else the strategy's
    ``slots_needed(n)`` summed over models (``n`` when the options are invalid: the replica
    then answers the 400). ``model`` may be an alias ``NAME:STRATEGY``."""
    from ..decoders import STRATEGIES, Sample

    spec = dict(alignment) if isinstance(alignment, dict) else {}
    alias = model.partition(":")[2] if isinstance(model, str) else ""
    name = spec.pop("strategy", None) or alias or "sample"
    cls = STRATEGIES.get(name) if isinstance(name, str) else None
    if cls is None or cls is Sample:
        return n
    try:
        return max(n, int(sum(cls(spec).slots_needed(n).values())))
    except Exception:  # noqa: BLE001 - invalid options: the replica's 400 says why
        return n


def _int(v: Any, default: int) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else default


def _prompt_chars(path: str, body: dict[str, Any]) -> tuple[int, int]:
    """(characters of prompt text, number of prompts) of a completions or chat body."""
    if path.endswith("/chat/completions"):
        msgs = body.get("messages")
        chars = 0
        for m in msgs if isinstance(msgs, list) else []:
            c = m.get("content") if isinstance(m, dict) else None
            if isinstance(c, str):
                chars += len(c)
            elif isinstance(c, list):
                chars += sum(len(p.get("text", "")) for p in c
                             if isinstance(p, dict) and isinstance(p.get("text"), str))
        return chars, 1
    p = body.get("prompt")
    if isinstance(p, str):
        return len(p), 1
    if isinstance(p, list) and p and all(isinstance(x, int) for x in p):
        return len(p) * CHARS_PER_TOKEN, 1
    if isinstance(p, list) and p:
        return sum(len(x) if isinstance(x, str) else len(x) * CHARS_PER_TOKEN
                   for x in p if isinstance(x, str | list)), len(p)
    return 0, 1


def request_work(path: str, body: Any, limits: ServerLimits | None = None) -> Work:
    """The ``Work`` of a POST to ``path`` with JSON ``body`` (any body: an invalid one costs
    little, the replica refuses it). Defaults for an unset ``max_tokens`` are the server's
    (``ServerLimits``: 16 for completions, 256 for chat)."""
    limits = limits or ServerLimits()
    if not isinstance(body, dict):
        return Work(1, 1, 1.0)
    n = max(1, _int(body.get("n"), 1))
    chat = path.endswith("/chat/completions")
    default = limits.default_chat_max_tokens if chat else limits.default_completion_max_tokens
    asked = body.get("max_completion_tokens") if chat else None
    max_tokens = min(_int(asked if asked is not None else body.get("max_tokens"), default),
                     limits.max_tokens)
    chars, prompts = _prompt_chars(path, body)
    fo = fan_out(str(body.get("model", "")), n, body.get("alignment")) * prompts
    return Work(fo, n * prompts, chars / CHARS_PER_TOKEN + fo * max(1, max_tokens))


@dataclass
class ReplicaLoad:
    """One replica as the router sees it."""

    index: int
    up: bool = False
    outstanding: float = 0.0  # token-rows of work in flight
    in_flight: int = 0
    routed: int = 0  # requests routed here since start
    failed: int = 0  # requests that ended because the replica died
    info: dict[str, Any] = field(default_factory=dict)  # last health answer (pid, running, ...)


class Ticket:
    """One routed request's claim on its replica's outstanding work (thread-safe)."""

    def __init__(self, router: Router, replica: int, work: Work) -> None:
        self.router, self.replica, self.work = router, replica, work
        self.left = work.total
        self.closed = False

    def progress(self, chunks: int = 1) -> None:
        """``chunks`` streamed delta chunks arrived: pay back their work."""
        with self.router.lock:
            if self.closed:
                return
            paid = min(self.left, chunks * self.work.per_chunk)
            self.left -= paid
            self.router.replicas[self.replica].outstanding -= paid

    def close(self) -> None:
        """The request ended (any way): pay back what is left; idempotent."""
        with self.router.lock:
            if self.closed:
                return
            self.closed = True
            r = self.router.replicas[self.replica]
            r.outstanding = max(0.0, r.outstanding - self.left)
            r.in_flight -= 1
            self.left = 0.0


class Router:
    """Least-outstanding-work routing over ``count`` replicas with optional session pinning."""

    def __init__(self, count: int) -> None:
        self.replicas = [ReplicaLoad(i) for i in range(count)]
        self.sessions: OrderedDict[str, int] = OrderedDict()
        self.lock = threading.Lock()

    def set_up(self, index: int, up: bool, info: dict[str, Any] | None = None) -> None:
        with self.lock:
            self.replicas[index].up = up
            if info is not None:
                self.replicas[index].info = info

    def live(self) -> list[int]:
        return [r.index for r in self.replicas if r.up]

    def choose(self, work: Work, session: str | None = None) -> Ticket:
        """Route a request costing ``work``; raises ``NoReplicaAvailable`` when none is up."""
        with self.lock:
            live = [r for r in self.replicas if r.up]
            if not live:
                raise NoReplicaAvailable("no engine replica is available (all are down or "
                                         "restarting); retry shortly")
            pick = None
            if session is not None:
                pinned = self.sessions.get(session)
                if pinned is not None and self.replicas[pinned].up:
                    pick = self.replicas[pinned]
                    self.sessions.move_to_end(session)
            if pick is None:
                pick = min(live, key=lambda r: (r.outstanding, r.routed, r.index))
                if session is not None:
                    self.sessions[session] = pick.index
                    self.sessions.move_to_end(session)
                    while len(self.sessions) > MAX_SESSIONS:
                        self.sessions.popitem(last=False)
            pick.outstanding += work.total
            pick.in_flight += 1
            pick.routed += 1
            return Ticket(self, pick.index, work)
