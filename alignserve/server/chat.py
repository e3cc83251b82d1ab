"""``POST /v1/chat/completions``: messages through the chat template, streamed or not."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request

from ..engine.api import GenerationInput
from . import generation as gen
from .errors import APIError, to_api_error
from .params import (
    check_max_tokens,
    check_n,
    check_stream_options,
    check_top_logprobs,
    fit_max_tokens,
    sampling,
    strategy_of,
    with_alias,
)
from .responses import alignment_summary, chat_logprobs, usage_of
from .schemas import ChatCompletionRequest
from .sse import DONE, data
from .state import ServerState, state_of

router = APIRouter()


def input_of(srv: ServerState, body: ChatCompletionRequest,
             alignment: dict | None) -> GenerationInput:
    """The request's ``GenerationInput``, every field checked (400 naming it)."""
    check_n(srv, body.n)
    check_stream_options(body)
    try:
        messages = [{"role": m.role if m.role != "developer" else "system",
                     "content": m.text()} for m in body.messages]
    except ValueError as exc:
        raise APIError(400, str(exc), "messages") from None
    text = srv.client.chat_prompt(messages)
    ids = srv.client.encode(text)
    asked = body.max_completion_tokens or body.max_tokens
    field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    max_tokens = check_max_tokens(srv, asked, srv.limits.default_chat_max_tokens, field,
                                  least=1)
    mt = fit_max_tokens(srv, len(ids), max_tokens, asked is None, "messages")
    n_top = body.top_logprobs or 0
    if n_top and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs=true", "top_logprobs")
    check_top_logprobs(alignment, n_top, "top_logprobs")
    params = sampling(srv, body, mt, n_top, body.logprobs)
    return gen.build(srv, GenerationInput(ids, text, params, body.n, alignment))


@router.post("/v1/chat/completions")
async def chat(body: ChatCompletionRequest, request: Request):
    srv = state_of(request)
    alignment = with_alias(srv, body, request)
    inp = input_of(srv, body, alignment)
    rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    tm = gen.timer(srv, request, inp)
    if body.stream:
        started, events = await gen.open_stream(srv, inp, request, strategy_of(alignment), tm)
        return gen.sse(srv, stream(srv, rid, body, inp, events), started)
    res = await gen.run(srv, inp, request, tm)
    srv.metrics.observe_result(strategy_of(alignment), res)
    choices = []
    for ci, ch in enumerate(res["choices"]):
        choices.append({
            "index": ci,
            "message": {"role": "assistant", "content": ch["text"]},
            "logprobs": ({"content": chat_logprobs(srv.client, ch["infos"])}
                         if body.logprobs else None),
            "finish_reason": ch["finish_reason"],
        })
    out = {"id": rid, "object": "chat.completion", "created": int(time.time()),
           "model": body.model, "choices": choices, "usage": usage_of(res)}
    if alignment is not None:
        out["alignment"] = alignment_summary(res)
    return out


async def stream(srv: ServerState, rid: str, body: ChatCompletionRequest, inp: GenerationInput,
                 events: AsyncIterator[tuple]) -> AsyncIterator[str]:
    """The SSE body: a role chunk per choice, content deltas, finish reasons, usage, ``[DONE]``."""
    created = int(time.time())

    def chunk(choices: list[dict], **extra: Any) -> str:
        return data({"id": rid, "object": "chat.completion.chunk", "created": created,
                     "model": body.model, "choices": choices, **extra})

    for c in range(body.n):
        yield chunk([{"index": c, "delta": {"role": "assistant", "content": ""},
                      "logprobs": None, "finish_reason": None}])
    async for ev in events:
        if ev[0] == "delta":
            _, c, text, info = ev
            if text:
                lp = None
                if body.logprobs and info is not None:
                    lp = {"content": chat_logprobs(srv.client, [info])}
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
            yield data(to_api_error(ev[1]).body())
    yield DONE
