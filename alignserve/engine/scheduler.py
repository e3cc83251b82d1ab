"""The engine: owns the models and runs the step loop in one background thread.

Iteration-level batching: requests join the running set between steps (when the KV-cache slots
their strategy needs are free) and leave as soon as they finish or are cancelled. One step:

1. host rounds: every ``Sample`` operation of every running request runs as ONE fused sampler
   call (``sampling.sample_batch``), every ``Score`` operation as one batched call per reward
   source, every ``HeadEval`` as one call per head module (``run_heads``); strategies whose
   operations are all answered resume, and may ask again (a few rounds at most);
2. one forward round: every ``Extend``/``Tree`` operation runs as batched forwards per model
   (``ModelRunner.run``), and each strategy is resumed with its outputs.

A failing sampler input or reward source fails only the requests whose operations caused it
(the batch is retried op by op); the step goes on for the others.

Callers (the HTTP layer, benchmarks, tests) talk to it through ``submit`` with a callback that
receives events, or the blocking ``generate`` helper. Events: ``("delta", choice, text, info)``,
``("done", result)`` and ``("error", exception)``; exactly one of the last two ends a request.
"""

from __future__ import annotations

import itertools
import json
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .context import DecodeContext
from .output import TokenInfo
from .primitives import EngineError, Extend, HeadEval, Sample, Score, Tree
from .runner import ModelRunner
from .sampling import SamplingParams, sample_batch
from .strategy import Strategy

log = logging.getLogger("alignserve.engine")
Event = tuple
_UNSET = object()  # an operation of the current step whose result is not there yet
HOST_ROUNDS = 8  # sample/score rounds per step before the forward round


class QueueFull(EngineError):
    """The waiting queue is at its configured depth; the server answers 429."""


class RequestTimeout(EngineError):
    pass


@dataclass
class EngineConfig:
    model_dir: Path
    model_name: str = "SmolLM2-135M-Instruct"
    slots: int = 32
    max_len: int = 2048
    max_waiting: int = 64
    request_timeout_s: float = 600.0
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None


@dataclass
class EngineRequest:
    prompt_ids: list[int]
    params: SamplingParams
    decoder: Strategy
    n: int = 1
    prompt_text: str = ""
    request_id: str = ""
    resources: Any = None
    callback: Callable[[Event], None] | None = None
    # filled by the engine
    ctx: DecodeContext | None = None
    gen: Any = None
    pending: list[Any] = field(default_factory=list)  # Op | Sample | Score
    outs: list[Any] = field(default_factory=list)  # results so far, _UNSET where not yet run
    cancelled: bool = False
    deadline: float = 0.0
    done: bool = False
    reserved: dict[str, int] = field(default_factory=dict)
    # time.monotonic() when submitted and when admitted to the batch (0.0 = not yet)
    submitted_at: float = 0.0
    admitted_at: float = 0.0


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        from transformers import AutoTokenizer

        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        dtype = getattr(torch, config.dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(str(config.model_dir))
        self.runners: dict[str, ModelRunner] = {
            "base": ModelRunner("base", config.model_dir, config.slots, config.max_len, dtype,
                                config.device)
        }
        self.eos_ids = self._eos_ids(config.model_dir)
        self._waiting: deque[EngineRequest] = deque()
        self._running: list[EngineRequest] = []
        self._cv = threading.Condition()
        self._reserved: dict[str, int] = {}  # slots promised to running requests, per model
        self._ids = itertools.count()
        self._stop = False
        self.step_count = 0
        self.last_step_s = 0.0
        self._thread = threading.Thread(target=self._loop, name="alignserve-engine", daemon=True)
        self._thread.start()

    # ---- public API ------------------------------------------------------------------------
    @property
    def base(self) -> ModelRunner:
        return self.runners["base"]

    @property
    def max_len(self) -> int:
        return self.config.max_len

    def add_runner(self, name: str, runner: ModelRunner) -> None:
        """Register a guidance backbone (own weights, own KV cache) under ``name``."""
        with self._cv:
            self.runners[name] = runner

    def submit(self, req: EngineRequest) -> EngineRequest:
        need = req.decoder.slots_needed(req.n)
        for model, k in need.items():
            if model not in self.runners:
                raise EngineError(f"strategy needs model {model!r}, which is not loaded")
            if k > self.runners[model].cache.slots:
                raise EngineError(f"request needs {k} KV-cache slots of {model!r}; the server has "
                                  f"{self.runners[model].cache.slots} (lower n or the strategy's "
                                  "branch count)")
        with self._cv:
            if len(self._waiting) >= self.config.max_waiting:
                raise QueueFull(f"queue full ({self.config.max_waiting} waiting requests)")
            req.request_id = req.request_id or f"req-{next(self._ids)}"
            req.submitted_at = time.monotonic()
            req.deadline = req.submitted_at + self.config.request_timeout_s
            self._waiting.append(req)
            self._cv.notify()
        return req

    def cancel(self, req: EngineRequest) -> None:
        """Drop a request whose client went away; safe from any thread, idempotent.

        A waiting request leaves the queue at once (it no longer counts toward
        ``max_waiting``) and ends with its ``("error", EngineError("cancelled"))`` event now; it
        holds no slot reservation yet. A running one is dropped at the start of the next step,
        before admission, so its slots and reservation go to the waiting requests that step.
        """
        with self._cv:
            if req.done:
                return
            req.cancelled = True
            if self._unqueue(req):
                self._end(req, ("error", EngineError("cancelled")))
            self._cv.notify()

    def _unqueue(self, req: EngineRequest) -> bool:
        """Remove ``req`` from the waiting queue (caller holds the lock); False if absent."""
        for i, w in enumerate(self._waiting):
            if w is req:  # identity: dataclass equality would compare field values
                del self._waiting[i]
                return True
        return False

    def generate(self, req: EngineRequest, timeout: float | None = None) -> dict[str, Any]:
        """Blocking helper: submit and wait for the final result (raises the request's error)."""
        q: queue.Queue = queue.Queue()
        user_cb = req.callback

        def cb(ev: Event) -> None:
            if user_cb:
                user_cb(ev)
            if ev[0] in ("done", "error"):
                q.put(ev)

        req.callback = cb
        self.submit(req)
        kind, payload = q.get(timeout=timeout)
        if kind == "error":
            raise payload
        return payload

    @property
    def queue_depth(self) -> int:
        """Requests waiting for slots. Read under the scheduler's lock, so a request being
        admitted (off the queue, not yet in the batch) is never counted as neither."""
        with self._cv:
            return len(self._waiting)

    @property
    def running(self) -> int:
        """Requests in the running batch (under the lock, like ``queue_depth``)."""
        with self._cv:
            return len(self._running)

    def shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=5)

    # ---- the loop --------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._waiting and not self._running:
                    self._cv.wait()
                if self._stop:
                    return
            try:
                self._step()
            except Exception as exc:  # noqa: BLE001 - the loop must survive anything
                log.exception("engine step failed")
                for req in list(self._running):
                    self._fail(req, EngineError(f"engine step failed: {exc}"))

    def _admit(self) -> None:
        with self._cv:
            now = time.monotonic()
            expired = [r for r in self._waiting if now > r.deadline]
            for req in expired:  # timed out while waiting: they free their queue places too
                self._unqueue(req)
                self._end(req, ("error", RequestTimeout(
                    f"request exceeded the {self.config.request_timeout_s:.0f} s timeout "
                    "while waiting for a batch slot")))
            while self._waiting:
                req = self._waiting[0]
                if req.cancelled:
                    self._waiting.popleft()
                    self._end(req, ("error", EngineError("cancelled")))
                    continue
                need = req.decoder.slots_needed(req.n)
                # reserve a request's worst case up front: strategies grow (forks, beams) while
                # they run, and a later request must never take the slots they will need
                if any(self._reserved.get(m, 0) + k > self.runners[m].cache.slots
                       for m, k in need.items()):
                    break
                self._waiting.popleft()
                req.admitted_at = time.monotonic()
                req.reserved = need
                for m, k in need.items():
                    self._reserved[m] = self._reserved.get(m, 0) + k
                self._start(req)

    def _start(self, req: EngineRequest) -> None:
        def on_delta(choice: int, text: str, info: TokenInfo | None) -> None:
            self._send(req, ("delta", choice, text, info))

        # tokens that end a choice: EOS (unless ignore_eos) and the request's stop_token_ids
        stops = (set() if req.params.ignore_eos else set(self.eos_ids))
        stops |= set(req.params.stop_token_ids)
        req.ctx = DecodeContext(self.runners, self.tokenizer, req.prompt_ids, req.params, req.n,
                                stops, on_delta, req.resources, req.prompt_text)
        req.ctx.on_release = lambda model, k: self._release(req, model, k)
        try:
            req.gen = req.decoder.run(req.ctx)
            req.pending = self._advance(req, None)
        except Exception as exc:  # noqa: BLE001
            self._fail(req, exc)
            return
        if not req.done:
            self._running.append(req)

    def _release(self, req: EngineRequest, model: str, k: int) -> None:
        """Lower a running request's reservation (``DecodeContext.release``); the next
        ``_admit`` sees the slots."""
        assert req.ctx is not None
        have = req.reserved.get(model, 0)
        if k > have - req.ctx.held(model):
            raise EngineError(f"release({model!r}, {k}): the request reserves {have} slots and "
                              f"holds {req.ctx.held(model)}")
        with self._cv:
            req.reserved[model] = have - k
            self._reserved[model] -= k

    def _advance(self, req: EngineRequest, outs: list[Any] | None) -> list[Any]:
        """Resume a strategy until it asks for work; finish the request if it returns."""
        try:
            ops = req.gen.send(outs) if outs is not None else next(req.gen)
            for _ in range(10_000):
                if ops:
                    req.outs = [_UNSET] * len(ops)
                    return list(ops)
                ops = req.gen.send([])
            raise EngineError(f"strategy {req.decoder.name} yielded no work repeatedly")
        except StopIteration:
            self._complete(req)
            return []

    def _resume_ready(self, reqs: list[EngineRequest]) -> None:
        """Resume every request whose current operations are all answered."""
        for req in reqs:
            if req.done or any(o is _UNSET for o in req.outs):
                continue
            try:
                req.pending = self._advance(req, req.outs)
            except Exception as exc:  # noqa: BLE001
                log.exception("strategy %s failed", req.decoder.name)
                self._fail(req, exc)

    def _open(self, kinds: tuple[type, ...]) -> list[tuple[EngineRequest, int]]:
        return [(r, i) for r in self._running if not r.done
                for i, op in enumerate(r.pending) if isinstance(op, kinds) and r.outs[i] is _UNSET]

    def _host_round(self) -> bool:
        """Run every open ``Sample`` as one fused call, every open ``Score`` as one call per
        reward source and every open ``HeadEval`` as one call per head module; resume the
        requests they complete. False when there was nothing."""
        samples, scores = self._open((Sample,)), self._open((Score,))
        heads = self._open((HeadEval,))
        if not samples and not scores and not heads:
            return False
        if samples:
            self._batched(samples, sample_batch)
        by_source: dict[tuple[int, str], list[tuple[EngineRequest, int]]] = {}
        for req, i in scores:
            op = req.pending[i]
            by_source.setdefault((id(op.registry), op.source), []).append((req, i))
        for refs in by_source.values():
            self._batched(refs, run_scores)
        by_head: dict[tuple, list[tuple[EngineRequest, int]]] = {}
        for req, i in heads:
            by_head.setdefault(req.pending[i].group, []).append((req, i))
        for refs in by_head.values():
            self._batched(refs, run_heads)
        touched = {id(r): r for r, _ in samples + scores + heads}
        self._resume_ready(list(touched.values()))
        return True

    def _batched(self, refs: list[tuple[EngineRequest, int]], fn: Callable) -> None:
        """``fn`` over all referenced ops at once; if it fails, op by op, failing only the
        requests whose op fails (a bad input or a broken reward source stays theirs)."""
        try:
            outs = fn([r.pending[i] for r, i in refs])
        except Exception:  # noqa: BLE001
            log.warning("batched %s failed; retrying op by op", fn.__name__, exc_info=True)
            for req, i in refs:
                if req.done:
                    continue
                try:
                    req.outs[i] = fn([req.pending[i]])[0]
                except Exception as exc:  # noqa: BLE001
                    self._fail(req, exc)
            return
        for (req, i), out in zip(refs, outs):
            req.outs[i] = out

    def _step(self) -> None:
        t0 = time.perf_counter()
        # drop cancelled and timed-out requests first, so the slots they reserved go to the
        # waiting requests admitted in this same step
        now = time.monotonic()
        for req in list(self._running):
            if req.cancelled:
                self._fail(req, EngineError("cancelled"))
            elif now > req.deadline:
                self._fail(req, RequestTimeout(
                    f"request exceeded the {self.config.request_timeout_s:.0f} s timeout"))
        self._running = [r for r in self._running if not r.done]
        self._admit()
        if not self._running:
            return
        for _ in range(HOST_ROUNDS):  # sampling and reward calls, batched across requests
            if not self._host_round():
                break
            self._running = [r for r in self._running if not r.done]
        by_model: dict[str, list[tuple[EngineRequest, int]]] = {}
        for req, i in self._open((Extend, Tree)):
            by_model.setdefault(req.pending[i].seq.model, []).append((req, i))
        for model, refs in by_model.items():
            ok = []
            for req, i in refs:  # validate per request so one bad request fails alone
                op = req.pending[i]
                if op.seq.length + len(op.tokens) > self.runners[model].max_len:
                    self._fail(req, EngineError(
                        f"context window exceeded: {op.seq.length + len(op.tokens)} > "
                        f"{self.runners[model].max_len} tokens"))
                elif not req.done:
                    ok.append((req, i))
            ok = [(r, i) for r, i in ok if not r.done]
            if not ok:
                continue
            outs = self.runners[model].run([r.pending[i] for r, i in ok])
            for (req, i), out in zip(ok, outs):
                req.outs[i] = out
        self._resume_ready(list(self._running))
        self._running = [r for r in self._running if not r.done]
        self.step_count += 1
        self.last_step_s = time.perf_counter() - t0

    # ---- endings ---------------------------------------------------------------------------
    def _complete(self, req: EngineRequest) -> None:
        ctx = req.ctx
        assert ctx is not None
        for c in range(req.n):
            ctx.finish(c, "stop")
        result = {
            "request_id": req.request_id,
            "choices": [
                {"text": st.text, "finish_reason": st.finish_reason, "tokens": st.tokens,
                 "infos": st.infos}
                for st in ctx.choices
            ],
            "prompt_tokens": len(req.prompt_ids),
            "completion_tokens": sum(len(st.tokens) for st in ctx.choices),
            "prompt_logprobs": ctx.prompt_logprobs,
            "stats": ctx.stats,
            "info": ctx.info,
            "elapsed_s": time.perf_counter() - ctx.stats.started,
        }
        ctx.free_all()
        self._end(req, ("done", result))

    def _fail(self, req: EngineRequest, exc: BaseException) -> None:
        if req.done:
            return
        if req.gen is not None:
            try:
                req.gen.close()
            except Exception:  # noqa: BLE001
                pass
        if req.ctx is not None:
            req.ctx.free_all()
        self._end(req, ("error", exc))

    def _end(self, req: EngineRequest, ev: Event) -> None:
        req.done = True
        for m, k in req.reserved.items():
            self._reserved[m] -= k
        req.reserved = {}
        self._send(req, ev)

    @staticmethod
    def _send(req: EngineRequest, ev: Event) -> None:
        if req.callback is not None:
            try:
                req.callback(ev)
            except Exception:  # noqa: BLE001 - a broken consumer must not stop the engine
                log.exception("event callback failed")

    @staticmethod
    def _eos_ids(model_dir: Path) -> set[int]:
        return eos_ids_from_config(model_dir)


def eos_ids_from_config(model_dir: Path) -> set[int]:
    """``eos_token_id`` (int or list) of a model folder's generation / model config."""
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        p = Path(model_dir) / name
        if p.is_file():
            v = json.loads(p.read_text()).get("eos_token_id")
            if isinstance(v, int):
                ids.add(v)
            elif isinstance(v, list):
                ids.update(int(x) for x in v)
    return ids


def module_to_device(module: torch.nn.Module, device: torch.device) -> None:
    """Move a head's parameters and buffers to ``device`` when they are elsewhere.

    Heads load on the CPU (the registry knows no engine); the first step that runs one on an
    engine on another device (``--device cuda``) moves it there, once: a module already on
    ``device`` is left alone, so the check costs one attribute read per call."""
    t = next(itertools.chain(module.parameters(), module.buffers()), None)
    if t is not None and t.device != device:
        module.to(device)


def run_heads(ops: list[HeadEval]) -> list[torch.Tensor]:
    """All ``HeadEval`` ops of one step with the same ``group`` (module, method, shared
    arguments) as one call on their rows concatenated; split back per op."""
    first = ops[0]
    inputs = [torch.cat([op.inputs[j] for op in ops]) if len(ops) > 1 else first.inputs[j]
              for j in range(len(first.inputs))]
    module_to_device(first.module, inputs[0].device)
    out = getattr(first.module, first.method)(*inputs, *first.shared)
    total = sum(op.rows for op in ops)
    if out.shape[0] != total:
        raise EngineError(f"head {type(first.module).__name__}.{first.method} returned "
                          f"{out.shape[0]} rows for {total}")
    return list(out.split([op.rows for op in ops]))


def run_scores(ops: list[Score]) -> list[np.ndarray]:
    """All ``Score`` ops of one step that name the same reward source, as one batched call."""
    src = ops[0].registry.rewards[ops[0].source]
    prompts = [p for op in ops for p in op.prompts]
    texts = [t for op in ops for t in op.texts]
    options = [o for op in ops for o in op.options]
    flat = np.asarray(src.score(prompts, texts, options), dtype=np.float64)
    if flat.shape != (len(texts),):
        raise EngineError(f"reward {ops[0].source!r} returned {flat.shape} scores for "
                          f"{len(texts)} texts")
    out, r0 = [], 0
    for op in ops:
        out.append(flat[r0:r0 + len(op.texts)])
        r0 += len(op.texts)
    return out
