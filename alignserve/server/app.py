"""OpenAI-compatible HTTP layer (FastAPI). It validates, translates and streams; no tensors here.

Endpoints: ``/v1/completions``, ``/v1/chat/completions`` (SSE with ``stream``), ``/v1/models``,
``/v1/heads``, ``/health``, ``/metrics`` (Prometheus text) and the playground page at ``/``.
Every error leaves in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` with a
4xx status that fits; nothing a client sends reaches the engine unvalidated. With API keys
configured every endpoint but ``/health`` and the static playground files needs
``Authorization: Bearer KEY``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..decoders import STRATEGIES, AlignmentError, build_decoder, strategy_info
from ..engine.api import ContextLengthError, EngineClient, GenerationInput
from ..engine.primitives import EngineError
from ..engine.sampling import SamplingParams
from ..engine.scheduler import QueueFull, RequestTimeout
from .connection import ContainErrors, EngineStream
from .metrics import CONTENT_TYPE, Metrics
from .schemas import ChatCompletionRequest, CompletionRequest
from .validation import invalid_text_error

STATIC_DIR = Path(__file__).resolve().parent / "static"
# alignment fields that multiply work per request (samples, candidates, beams, rollout lengths):
# ``--max-candidates`` caps them all, below each strategy's own published-range maximum
CANDIDATE_FIELDS = ("n", "k", "top_k", "beams", "rollout", "lookahead", "block")
# paths a client may reach without a key: liveness probes and the playground's static files
# (the page itself asks for the key; every API call it makes carries it)
PUBLIC_PATHS = ("/health", "/", "/favicon.ico")
PUBLIC_PREFIXES = ("/static/",)
METRIC_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/heads",
                    "/health", "/metrics")


@dataclass
class ServerLimits:
    """Request limits, all configurable from the CLI."""

    max_tokens: int = 1024
    max_n: int = 16
    max_body_bytes: int = 1_000_000
    max_prompts: int = 32
    default_chat_max_tokens: int = 256
    default_completion_max_tokens: int = 16
    max_candidates: int | None = None  # cap on CANDIDATE_FIELDS; None = the strategies' own


class GateMiddleware:
    """API-key check and per-request metrics, as plain ASGI.

    Plain ASGI rather than ``@app.middleware("http")`` so that a streaming response passes
    through untouched: the client's disconnect reaches the SSE generator directly, which is
    what frees its batch slot at once.
    """

    def __init__(self, app: ASGIApp, api_keys: Iterable[str], metrics: Metrics,
                 max_body_bytes: int | None = None) -> None:
        self.app = app
        self.keys = [k.encode() for k in api_keys if k]
        self.metrics = metrics
        self.max_body = max_body_bytes

    def too_large(self, scope: Scope) -> int | None:
        """The declared body size when it is over the limit (checked before reading it)."""
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and self.max_body is not None:
                return int(value) if int(value) > self.max_body else None
        return None

    def authorized(self, scope: Scope) -> bool:
        path = scope.get("path", "")
        if not self.keys or path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
            return True
        header = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                header = value
                break
        scheme, _, token = header.partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            return False
        # compare against every key in constant time so the answer leaks no prefix length
        return any([hmac.compare_digest(token, k) for k in self.keys])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in METRIC_ENDPOINTS else "other"
        if not self.authorized(scope):
            self.metrics.observe_request(endpoint, "-", 401)
            resp = JSONResponse(error_body(
                "Incorrect or missing API key: send 'Authorization: Bearer KEY'.",
                "invalid_request_error", None, "invalid_api_key"), status_code=401,
                headers={"WWW-Authenticate": "Bearer"})
            await resp(scope, receive, send)
            return
        size = self.too_large(scope)
        if size is not None:
            self.metrics.observe_request(endpoint, "-", 413)
            resp = JSONResponse(error_body(
                f"request body of {size} bytes exceeds the limit of {self.max_body}",
                "invalid_request_error", None, "request_too_large"), status_code=413)
            await resp(scope, receive, send)
            return
        status = [500]

        async def send_wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapped)
        finally:
            strategy = scope.get("state", {}).get("strategy", "-")
            self.metrics.observe_request(endpoint, strategy, status[0])


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, err_type: str = "invalid_request_error",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.err_type, self.headers = err_type, headers


def error_body(message: str, err_type: str, param: str | None, code: str | None) -> dict:
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def create_app(client: EngineClient, model_name: str,
               limits: ServerLimits | None = None,
               alias_weights: dict[str, dict[str, float]] | None = None,
               api_keys: Iterable[str] = ()) -> FastAPI:
    """The HTTP app over ``client``; ``api_keys`` (none = open) guard every endpoint but
    ``/health`` and the playground's static files."""
    limits = limits or ServerLimits()
    metrics = Metrics()
    # weights a MODEL:STRATEGY alias uses when the request names none ("*" = any strategy)
    alias_weights = alias_weights or {"*": {"sentiment": 1.0}, "vas": {"sentiment": 3.0},
                                      "cd": {"sentiment": 3.0}, "genarm": {"sentiment": 1.0}}
    app = FastAPI(title="alignserve", version="0.1.0",
                  description="OpenAI-compatible server for decoding-time alignment")
    app.state.client = client
    app.state.limits = limits
    app.state.model_name = model_name
    app.state.metrics = metrics

    # ---- errors ----------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.err_type, exc.param, exc.code),
                            status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        if (bad_text := invalid_text_error(errs)) is not None:  # a lone surrogate somewhere
            return JSONResponse(error_body(bad_text[0], "invalid_request_error", bad_text[1],
                                           "invalid_value"), status_code=400)
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            msg, param = "Request body is not valid JSON.", None
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

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error", None, code),
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error",
                                       None, None), status_code=500)

    # an exception escaping the app would make uvicorn drop the keep-alive connection
    app.add_middleware(ContainErrors)
    # added last, so it runs first: a request without a valid key never reaches a handler
    # (plain ASGI, not @app.middleware: that wrapper hides a client's disconnect from handlers)
    app.add_middleware(GateMiddleware, api_keys=list(api_keys), metrics=metrics,
                       max_body_bytes=limits.max_body_bytes)

    # ---- playground ------------------------------------------------------------------------
    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        """The browser playground: plain HTML/JS over the public API, no build step."""
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    # ---- simple endpoints ------------------------------------------------------------------
    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics_page() -> PlainTextResponse:
        """Prometheus text format: request counts, tokens, queue, batch, step latency."""
        return PlainTextResponse(metrics.render(client.engine), media_type=CONTENT_TYPE)

    @app.get("/health")
    async def health() -> dict:
        eng = client.engine
        return {"status": "ok", "model": model_name, "running": eng.running,
                "waiting": eng.queue_depth}

    @app.get("/v1/models")
    async def models() -> dict:
        heads = client.resources.describe() if client.resources is not None else []
        data = [{"id": model_name, "object": "model", "created": 0, "owned_by": "alignserve",
                 "max_model_len": client.max_len,
                 "alignment": {"strategies": sorted(STRATEGIES),
                               "objectives": [h["name"] for h in heads]}}]
        data += [{"id": f"{model_name}:{s}", "object": "model", "created": 0,
                  "owned_by": "alignserve", "root": model_name, "max_model_len": client.max_len}
                 for s in sorted(STRATEGIES) if s != "sample"]
        return {"object": "list", "data": data}

    @app.get("/v1/heads")
    async def heads() -> dict:
        """Every reward source and guidance head, with its allowed weight range."""
        rows = client.resources.describe() if client.resources is not None else []
        return {"object": "list", "data": rows, "strategies": strategy_info()}

    # ---- generation ------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        alignment = with_alias(body, request)
        try:
            prompts = body.prompts()
        except ValueError as exc:
            raise APIError(400, str(exc), "prompt") from None
        if len(prompts) > limits.max_prompts:
            raise APIError(400, f"at most {limits.max_prompts} prompts per request", "prompt")
        if body.stream and len(prompts) > 1:
            raise APIError(400, "streaming supports a single prompt", "prompt")
        max_tokens = check_max_tokens(body.max_tokens, limits.default_completion_max_tokens,
                                      "max_tokens")
        check_n(body.n)
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(400, "best_of is not supported; use alignment.strategy='best_of_n'",
                           "best_of")
        n_top = body.logprobs or 0
        check_top_logprobs(alignment, n_top, "logprobs")
        inputs = []
        for p in prompts:
            ids = client.encode(p) if isinstance(p, str) else list(p)
            try:
                client.validate_vocab(ids)
            except ValueError as exc:
                raise APIError(400, str(exc), "prompt") from None
            if not ids:
                raise APIError(400, "prompt must contain at least one token", "prompt")
            text = p if isinstance(p, str) else client.decode(ids)
            mt = fit_max_tokens(len(ids), max_tokens, body.max_tokens is None)
            params = sampling(body, mt, n_top, body.logprobs is not None)
            inputs.append(GenerationInput(ids, text, params, body.n, alignment,
                                          prompt_logprobs=body.echo and body.logprobs is not None))
        rid = f"cmpl-{uuid.uuid4().hex[:24]}"
        if body.stream:
            started = begin(inputs[0])
            return sse(stream_completion(rid, body, inputs[0], started), started)
        for inp in inputs:  # validate every prompt's strategy before running any
            try:
                build_decoder(inp.alignment, registry=client.resources)
            except Exception as exc:  # noqa: BLE001
                raise to_api_error(exc) from None
        # several prompts run side by side, so the engine batches them
        results = list(await asyncio.gather(*(run(inp, request) for inp in inputs)))
        for res in results:
            metrics.observe_result(strategy_of(alignment), res)
        choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        for pi, (inp, res) in enumerate(zip(inputs, results)):
            usage["prompt_tokens"] += res["prompt_tokens"]
            usage["completion_tokens"] += res["completion_tokens"]
            for ci, ch in enumerate(res["choices"]):
                text = ch["text"]
                lp = None
                if body.logprobs is not None:
                    lp = completion_logprobs(ch, res["prompt_logprobs"] if body.echo else None,
                                             len(inp.prompt_text) if body.echo else 0)
                if body.echo:
                    text = inp.prompt_text + text
                choices.append({"index": pi * body.n + ci, "text": text, "logprobs": lp,
                                "finish_reason": ch["finish_reason"]})
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        out = {"id": rid, "object": "text_completion", "created": int(time.time()),
               "model": body.model, "choices": choices, "usage": usage}
        if alignment is not None:
            out["alignment"] = [alignment_summary(r) for r in results]
            if len(results) == 1:
                out["alignment"] = out["alignment"][0]
        return out

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        alignment = with_alias(body, request)
        check_n(body.n)
        try:
            messages = [{"role": m.role if m.role != "developer" else "system",
                         "content": m.text()} for m in body.messages]
        except ValueError as exc:
            raise APIError(400, str(exc), "messages") from None
        text = client.chat_prompt(messages)
        ids = client.encode(text)
        asked = body.max_completion_tokens or body.max_tokens
        field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        max_tokens = check_max_tokens(asked, limits.default_chat_max_tokens, field)
        mt = fit_max_tokens(len(ids), max_tokens, asked is None)
        n_top = body.top_logprobs or 0
        if n_top and not body.logprobs:
            raise APIError(400, "top_logprobs requires logprobs=true", "top_logprobs")
        check_top_logprobs(alignment, n_top, "top_logprobs")
        params = sampling(body, mt, n_top, body.logprobs)
        inp = GenerationInput(ids, text, params, body.n, alignment)
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if body.stream:
            started = begin(inp)
            return sse(stream_chat(rid, body, inp, started), started)
        res = await run(inp, request)
        metrics.observe_result(strategy_of(alignment), res)
        choices = []
        for ci, ch in enumerate(res["choices"]):
            choices.append({
                "index": ci,
                "message": {"role": "assistant", "content": ch["text"]},
                "logprobs": {"content": chat_logprobs(ch["infos"])} if body.logprobs else None,
                "finish_reason": ch["finish_reason"],
            })
        out = {"id": rid, "object": "chat.completion", "created": int(time.time()),
               "model": body.model, "choices": choices, "usage": usage_of(res)}
        if alignment is not None:
            out["alignment"] = alignment_summary(res)
        return out

    # ---- helpers (closures over client/limits) ----------------------------------------------
    def check_model(model: str) -> str | None:
        """Accept the served name or an alias ``NAME:STRATEGY``; returns the alias strategy."""
        base, _, strategy = model.partition(":")
        if base != model_name or (strategy and strategy not in STRATEGIES):
            raise APIError(404, f"The model '{model}' does not exist; available: {model_name} "
                           f"and {model_name}:STRATEGY with STRATEGY in {sorted(STRATEGIES)}",
                           "model", "model_not_found")
        return strategy or None

    def with_alias(body: Any, request: Request) -> dict[str, Any] | None:
        """The request's alignment, with the model alias's strategy and default weights; checks
        the server's candidate cap and labels the request's metrics with its strategy."""
        strategy = check_model(body.model)
        if strategy is None:
            spec = body.alignment
        else:
            spec = {"strategy": strategy, **(body.alignment or {})}
            if strategy != "sample" and "weights" not in spec:
                spec["weights"] = dict(alias_weights.get(strategy, alias_weights["*"]))
        request.state.strategy = strategy_of(spec)
        check_candidates(spec)
        return spec

    def check_candidates(spec: dict[str, Any] | None) -> None:
        """Server-level cap on the alignment fields that multiply a request's work; the
        strategy still validates its own (wider) range and types afterwards."""
        cap = limits.max_candidates
        if not spec or cap is None:
            return
        for name in CANDIDATE_FIELDS:
            v = spec.get(name)
            if isinstance(v, int) and not isinstance(v, bool) and v > cap:
                raise APIError(400, f"alignment.{name} must be at most {cap} on this server "
                                    f"(got {v})", f"alignment.{name}", "invalid_value")

    def check_n(n: int) -> None:
        if n > limits.max_n:
            raise APIError(400, f"n must be between 1 and {limits.max_n}", "n")

    def check_max_tokens(v: int | None, default: int, field: str) -> int:
        if v is None:
            return min(default, limits.max_tokens)
        if v > limits.max_tokens:
            raise APIError(400, f"{field} must be between 0 and {limits.max_tokens}", field)
        return v

    def fit_max_tokens(n_prompt: int, max_tokens: int, defaulted: bool) -> int:
        if defaulted:  # an unset max_tokens shrinks to the room left, as OpenAI does
            max_tokens = max(0, min(max_tokens, client.max_len - n_prompt - 1))
        try:
            client.check_fits(n_prompt, max_tokens)
            if n_prompt >= client.max_len:
                raise ContextLengthError(f"This model's maximum context length is "
                                         f"{client.max_len} tokens; the prompt has {n_prompt}.")
        except ContextLengthError as exc:
            raise APIError(400, str(exc), "messages" if False else "prompt",
                           "context_length_exceeded") from None
        return max_tokens

    def sampling(body: Any, max_tokens: int, n_top: int, logprobs: bool) -> SamplingParams:
        seed = None if body.seed is None else int(body.seed) % (2**63)
        bias = body.logit_bias_ids()
        vocab = client.engine.base.config.vocab_size
        for name, ids in (("logit_bias", list(bias)), ("stop_token_ids", body.stop_token_ids)):
            bad = [t for t in ids or [] if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"{name}: token id {bad[0]} is outside the vocabulary "
                                    f"[0, {vocab})", name)
        if body.min_tokens > max_tokens:
            raise APIError(400, f"min_tokens ({body.min_tokens}) must not exceed the maximum "
                                f"number of tokens ({max_tokens})", "min_tokens")
        return SamplingParams(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                              max_tokens=max_tokens, stop=body.stop or [], seed=seed,
                              logprobs=logprobs, top_logprobs=n_top, ignore_eos=body.ignore_eos,
                              presence_penalty=body.presence_penalty,
                              frequency_penalty=body.frequency_penalty,
                              repetition_penalty=body.repetition_penalty, logit_bias=bias,
                              min_tokens=body.min_tokens,
                              stop_token_ids=list(body.stop_token_ids or []))

    def check_top_logprobs(spec: dict[str, Any] | None, n_top: int, field: str) -> None:
        """Strategies that return a whole chosen sample report each token's logprob but no
        top alternatives: asking for them is a 400, not an empty list."""
        cls = STRATEGIES.get(strategy_of(spec))
        if n_top and cls is not None and not cls.reports_top_logprobs:
            raise APIError(400, f"{field}: strategy '{cls.name}' returns whole chosen samples "
                                "and reports each token's logprob but no top alternatives; "
                                f"set {field} to 0", field)

    async def run(inp: GenerationInput, request: Request | None = None) -> dict[str, Any]:
        """Await one generation; a client that hangs up cancels it (its slots free at once)."""
        task = asyncio.ensure_future(client.run(inp))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.5)
                if done:
                    return task.result()
                if request is not None and await request.is_disconnected():
                    task.cancel()  # leaves the engine's queue (or batch) at once
                    if not getattr(request.state, "gone", False):  # once per request, even
                        request.state.gone = True  # when several prompts run side by side
                        metrics.disconnects += 1
                    raise APIError(499, "client closed the connection", None, "client_closed")
        except (APIError, asyncio.CancelledError):
            task.cancel()
            raise
        except Exception as exc:  # noqa: BLE001
            raise to_api_error(exc) from None

    def sse(gen: AsyncIterator[str], started: tuple) -> StreamingResponse:
        """The SSE response for a submitted request; however it ends (even before its first
        event) a request still live is cancelled, and a client gone before the end counted."""
        req = started[0]

        def on_close(gone: bool) -> None:
            if gone:
                metrics.disconnects += 1
            if not req.done:
                client.engine.cancel(req)

        return EngineStream(gen, on_close, media_type="text/event-stream",
                            headers={"Cache-Control": "no-cache"})

    def begin(inp: GenerationInput):
        """Submit a streaming request; errors (400, 429) surface before the 200 is sent."""
        try:
            return client.start(inp)
        except Exception as exc:  # noqa: BLE001
            raise to_api_error(exc) from None

    def stream_completion(rid: str, body: CompletionRequest, inp: GenerationInput, started):
        async def gen() -> AsyncIterator[str]:
            created = int(time.time())
            agen = watched(client.events(*started), strategy_of(inp.alignment))
            if body.echo:
                for c in range(body.n):
                    yield data({"id": rid, "object": "text_completion", "created": created,
                                "model": body.model, "choices": [{
                                    "index": c, "text": inp.prompt_text, "logprobs": None,
                                    "finish_reason": None}]})
            async for ev in agen:
                if ev[0] == "delta":
                    _, c, text, info = ev
                    if text:
                        lp = None
                        if body.logprobs is not None and info is not None:
                            lp = {"tokens": [client.token_str(info.token)],
                                  "token_logprobs": [info.logprob],
                                  "top_logprobs": [top_map(info.top)], "text_offset": [0]}
                        yield data({"id": rid, "object": "text_completion", "created": created,
                                    "model": body.model, "choices": [{
                                        "index": c, "text": text, "logprobs": lp,
                                        "finish_reason": None}]})
                elif ev[0] == "done":
                    res = ev[1]
                    for c, ch in enumerate(res["choices"]):
                        yield data({"id": rid, "object": "text_completion", "created": created,
                                    "model": body.model, "choices": [{
                                        "index": c, "text": "", "logprobs": None,
                                        "finish_reason": ch["finish_reason"]}]})
                    if body.stream_options and body.stream_options.include_usage:
                        chunk = {"id": rid, "object": "text_completion", "created": created,
                                 "model": body.model, "choices": [], "usage": usage_of(res)}
                        if inp.alignment is not None:
                            chunk["alignment"] = alignment_summary(res)
                        yield data(chunk)
                else:
                    err = to_api_error(ev[1])
                    yield data(error_body(err.message, err.err_type, err.param, err.code))
            yield "data: [DONE]\n\n"
        return gen()

    def stream_chat(rid: str, body: ChatCompletionRequest, inp: GenerationInput, started):
        async def gen() -> AsyncIterator[str]:
            created = int(time.time())

            def chunk(choices: list[dict], **extra: Any) -> str:
                return data({"id": rid, "object": "chat.completion.chunk", "created": created,
                             "model": body.model, "choices": choices, **extra})

            for c in range(body.n):
                yield chunk([{"index": c, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None}])
            async for ev in watched(client.events(*started), strategy_of(inp.alignment)):
                if ev[0] == "delta":
                    _, c, text, info = ev
                    if text:
                        lp = None
                        if body.logprobs and info is not None:
                            lp = {"content": chat_logprobs([info])}
                        yield chunk([{"index": c, "delta": {"content": text}, "logprobs": lp,
                                      "finish_reason": None}])
                elif ev[0] == "done":
                    res = ev[1]
                    for c, ch in enumerate(res["choices"]):
                        yield chunk([{"index": c, "delta": {}, "logprobs": None,
                                      "finish_reason": ch["finish_reason"]}])
                    if body.stream_options and body.stream_options.include_usage:
                        extra: dict[str, Any] = {"usage": usage_of(res)}
                        if inp.alignment is not None:
                            extra["alignment"] = alignment_summary(res)
                        yield chunk([], **extra)
                else:
                    err = to_api_error(ev[1])
                    yield data(error_body(err.message, err.err_type, err.param, err.code))
            yield "data: [DONE]\n\n"
        return gen()

    async def watched(events: AsyncIterator[tuple], strategy: str) -> AsyncIterator[tuple]:
        """Pass a stream's engine events through, accounting its result or a mid-stream
        error. Closing this (disconnect) closes ``events``, whose ``finally`` cancels the engine
        request; ``sse``'s ``on_close`` counts the disconnect (and cancels a request whose
        stream never reached this generator)."""
        try:
            async for ev in events:
                if ev[0] == "done":
                    metrics.observe_result(strategy, ev[1])
                elif ev[0] == "error":
                    err = to_api_error(ev[1])
                    metrics.stream_errors[err.code or err.err_type] += 1
                yield ev
        finally:
            await events.aclose()

    def top_map(top: list[tuple[int, float]] | None) -> dict[str, float] | None:
        if top is None:
            return None
        return {client.token_str(t): lp for t, lp in top}

    def completion_logprobs(ch: dict, prompt_lp: list | None, prompt_chars: int) -> dict:
        tokens, lps, tops, offsets = [], [], [], []
        pos = 0
        for tid, lp, top in (prompt_lp or []):
            s = client.token_str(tid)
            tokens.append(s)
            lps.append(lp)
            tops.append(top_map(top))
            offsets.append(pos)
            pos += len(s)
        pos = prompt_chars
        for info in ch["infos"]:
            s = client.token_str(info.token)
            tokens.append(s)
            lps.append(info.logprob)
            tops.append(top_map(info.top))
            offsets.append(pos)
            pos += len(s)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops,
                "text_offset": offsets}

    def chat_logprobs(infos: list) -> list[dict]:
        out = []
        for info in infos:
            s = client.token_str(info.token)
            out.append({"token": s, "logprob": info.logprob, "bytes": list(s.encode()),
                        "top_logprobs": [
                            {"token": client.token_str(t), "logprob": lp,
                             "bytes": list(client.token_str(t).encode())}
                            for t, lp in (info.top or [])]})
        return out

    return app


def data(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def strategy_of(alignment: dict[str, Any] | None) -> str:
    """The strategy a request asked for, as a metrics label (unknown names are bounded)."""
    name = (alignment or {}).get("strategy", "sample")
    return name if isinstance(name, str) and name in STRATEGIES else "invalid"


def usage_of(res: dict) -> dict:
    return {"prompt_tokens": res["prompt_tokens"], "completion_tokens": res["completion_tokens"],
            "total_tokens": res["prompt_tokens"] + res["completion_tokens"]}


def alignment_summary(res: dict) -> dict:
    st = res["stats"]
    return {**res["info"], "tokens_generated": st.tokens_generated,
            "guidance_forwards": st.guidance_forwards, "candidates_scored": st.candidates_scored,
            "time_s": round(res["elapsed_s"], 4), **st.extra}


def to_api_error(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, AlignmentError):
        return APIError(400, str(exc), exc.field)
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
