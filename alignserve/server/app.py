"""OpenAI-compatible HTTP layer (FastAPI). It validates, translates and streams; no tensors here.

Endpoints: ``/v1/completions``, ``/v1/chat/completions`` (SSE with ``stream``), ``/v1/models``,
``/health``. Every error leaves in OpenAI's shape ``{"error": {"message", "type", "param",
"code"}}`` with a 4xx status that fits; nothing a client sends reaches the engine unvalidated.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..decoders import AlignmentError
from ..engine.api import ContextLengthError, EngineClient, GenerationInput
from ..engine.primitives import EngineError
from ..engine.sampling import SamplingParams
from ..engine.scheduler import QueueFull, RequestTimeout
from .schemas import ChatCompletionRequest, CompletionRequest


@dataclass
class ServerLimits:
    """Request limits, all configurable from the CLI."""

    max_tokens: int = 1024
    max_n: int = 16
    max_body_bytes: int = 1_000_000
    max_prompts: int = 32
    default_chat_max_tokens: int = 256
    default_completion_max_tokens: int = 16


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
               limits: ServerLimits | None = None) -> FastAPI:
    limits = limits or ServerLimits()
    app = FastAPI(title="alignserve", version="0.1.0",
                  description="OpenAI-compatible server for decoding-time alignment")
    app.state.client = client
    app.state.limits = limits
    app.state.model_name = model_name

    # ---- errors ----------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.err_type, exc.param, exc.code),
                            status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            msg, param = "Request body is not valid JSON.", None
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

    @app.middleware("http")
    async def _body_limit(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > limits.max_body_bytes:
            return JSONResponse(error_body(
                f"request body of {size} bytes exceeds the limit of {limits.max_body_bytes}",
                "invalid_request_error", None, "request_too_large"), status_code=413)
        return await call_next(request)

    # ---- simple endpoints ------------------------------------------------------------------
    @app.get("/health")
    async def health() -> dict:
        eng = client.engine
        return {"status": "ok", "model": model_name, "running": eng.running,
                "waiting": eng.queue_depth}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [
            {"id": model_name, "object": "model", "created": 0, "owned_by": "alignserve",
             "max_model_len": client.max_len}]}

    # ---- generation ------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
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
            inputs.append(GenerationInput(ids, text, params, body.n, body.alignment,
                                          prompt_logprobs=body.echo and body.logprobs is not None))
        rid = f"cmpl-{uuid.uuid4().hex[:24]}"
        if body.stream:
            return sse(stream_completion(rid, body, inputs[0]))
        results = [await run(inp) for inp in inputs]
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
        if body.alignment is not None:
            out["alignment"] = [alignment_summary(r) for r in results]
            if len(results) == 1:
                out["alignment"] = out["alignment"][0]
        return out

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
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
        params = sampling(body, mt, n_top, body.logprobs)
        inp = GenerationInput(ids, text, params, body.n, body.alignment)
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if body.stream:
            return sse(stream_chat(rid, body, inp))
        res = await run(inp)
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
        if body.alignment is not None:
            out["alignment"] = alignment_summary(res)
        return out

    # ---- helpers (closures over client/limits) ----------------------------------------------
    def check_model(model: str) -> None:
        if model != model_name:
            raise APIError(404, f"The model '{model}' does not exist; available: {model_name}",
                           "model", "model_not_found")

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
        return SamplingParams(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                              max_tokens=max_tokens, stop=body.stop or [], seed=seed,
                              logprobs=logprobs, top_logprobs=n_top, ignore_eos=body.ignore_eos)

    async def run(inp: GenerationInput) -> dict[str, Any]:
        try:
            return await client.run(inp)
        except Exception as exc:  # noqa: BLE001
            raise to_api_error(exc) from None

    def sse(gen: AsyncIterator[str]) -> StreamingResponse:
        return StreamingResponse(gen, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def first_event(inp: GenerationInput):
        """Start a stream, raising API errors (e.g. 429) before any byte is sent."""
        try:
            agen = client.stream(inp)
            return agen, await agen.__anext__()
        except Exception as exc:  # noqa: BLE001
            raise to_api_error(exc) from None

    def stream_completion(rid: str, body: CompletionRequest, inp: GenerationInput):
        async def gen() -> AsyncIterator[str]:
            created = int(time.time())
            agen = client.stream(inp)
            if body.echo:
                for c in range(body.n):
                    yield data({"id": rid, "object": "text_completion", "created": created,
                                "model": body.model, "choices": [{
                                    "index": c, "text": inp.prompt_text, "logprobs": None,
                                    "finish_reason": None}]})
            async for ev in agen:
                if ev[0] == "delta":
                    _, c, text, info = ev
                    st_done = info is None or text == ""
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
                    del st_done
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
                        if body.alignment is not None:
                            chunk["alignment"] = alignment_summary(res)
                        yield data(chunk)
                else:
                    yield data(error_body(str(ev[1]), "server_error", None, None))
            yield "data: [DONE]\n\n"
        return gen()

    def stream_chat(rid: str, body: ChatCompletionRequest, inp: GenerationInput):
        async def gen() -> AsyncIterator[str]:
            created = int(time.time())

            def chunk(choices: list[dict], **extra: Any) -> str:
                return data({"id": rid, "object": "chat.completion.chunk", "created": created,
                             "model": body.model, "choices": choices, **extra})

            for c in range(body.n):
                yield chunk([{"index": c, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None}])
            async for ev in client.stream(inp):
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
                        if body.alignment is not None:
                            extra["alignment"] = alignment_summary(res)
                        yield chunk([], **extra)
                else:
                    err = to_api_error(ev[1])
                    yield data(error_body(err.message, err.err_type, err.param, err.code))
            yield "data: [DONE]\n\n"
        return gen()

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

    del first_event  # kept simple: errors before the first byte are raised in `run`
    return app


def data(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


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
    if isinstance(exc, EngineError):
        return APIError(400, str(exc), None, "engine_error")
    if isinstance(exc, ValueError) and hasattr(exc, "field"):
        return APIError(400, str(exc), exc.field)  # type: ignore[attr-defined]
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", None, None,
                    "server_error")
