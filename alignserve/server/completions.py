"""``POST /v1/completions``: one or more prompts (text or token ids), streamed or not."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

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
from .responses import alignment_summary, completion_logprobs, stream_logprobs, usage_of
from .schemas import CompletionRequest
from .sse import DONE, data
from .state import ServerState, state_of

router = APIRouter()


def inputs_of(srv: ServerState, body: CompletionRequest,
              alignment: dict | None) -> list[GenerationInput]:
    """One ``GenerationInput`` per prompt, every field checked (400 naming it)."""
    client, limits = srv.client, srv.limits
    try:
        prompts = body.prompts()
    except ValueError as exc:
        raise APIError(400, str(exc), "prompt") from None
    if len(prompts) > limits.max_prompts:
        raise APIError(400, f"at most {limits.max_prompts} prompts per request", "prompt")
    if body.stream and len(prompts) > 1:
        raise APIError(400, "streaming supports a single prompt", "prompt")
    max_tokens = check_max_tokens(srv, body.max_tokens, limits.default_completion_max_tokens,
                                  "max_tokens")
    check_n(srv, body.n)
    check_stream_options(body)
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
        mt = fit_max_tokens(srv, len(ids), max_tokens, body.max_tokens is None)
        params = sampling(srv, body, mt, n_top, body.logprobs is not None)
        inputs.append(GenerationInput(ids, text, params, body.n, alignment,
                                      prompt_logprobs=body.echo and body.logprobs is not None))
    return inputs


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    srv = state_of(request)
    alignment = with_alias(srv, body, request)
    inputs = inputs_of(srv, body, alignment)
    rid = f"cmpl-{uuid.uuid4().hex[:24]}"
    if body.stream:
        inp = gen.build(srv, inputs[0])
        started, events = await gen.open_stream(srv, inp, request, strategy_of(alignment),
                                                gen.timer(srv, request, inp))
        return gen.sse(srv, stream(srv, rid, body, inp, events), started)
    for inp in inputs:  # validate every prompt's strategy before running any
        gen.build(srv, inp)
    # several prompts run side by side, so the engine batches them
    tasks = [asyncio.ensure_future(gen.run(srv, inp, request, gen.timer(srv, request, inp)))
             for inp in inputs]
    try:
        results = list(await asyncio.gather(*tasks))
    except BaseException:
        # one prompt failed or the client left: stop the others, and count the prompts that
        # had finished as generated but not returned (this response never goes out)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for t in tasks:
            if not t.cancelled() and t.exception() is None:
                res = t.result()
                srv.metrics.observe_cancelled(strategy_of(alignment), res["completion_tokens"],
                                              res.get("stats"), returned=0)
        raise
    for res in results:
        srv.metrics.observe_result(strategy_of(alignment), res)
    choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    for pi, (inp, res) in enumerate(zip(inputs, results)):
        usage["prompt_tokens"] += res["prompt_tokens"]
        usage["completion_tokens"] += res["completion_tokens"]
        for ci, ch in enumerate(res["choices"]):
            lp = None
            if body.logprobs is not None:
                lp = completion_logprobs(srv.client, ch,
                                         res["prompt_logprobs"] if body.echo else None,
                                         len(inp.prompt_text) if body.echo else 0)
            text = inp.prompt_text + ch["text"] if body.echo else ch["text"]
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


async def stream(srv: ServerState, rid: str, body: CompletionRequest, inp: GenerationInput,
                 events: AsyncIterator[tuple]) -> AsyncIterator[str]:
    """The SSE body: echoed prompt, text deltas, finish reasons, usage, ``[DONE]``."""
    created = int(time.time())

    def chunk(c: int, text: str, lp: dict | None, finish: str | None) -> str:
        return data({"id": rid, "object": "text_completion", "created": created,
                     "model": body.model, "choices": [{
                         "index": c, "text": text, "logprobs": lp, "finish_reason": finish}]})

    if body.echo:
        for c in range(body.n):
            yield chunk(c, inp.prompt_text, None, None)
    async for ev in events:
        if ev[0] == "delta":
            _, c, text, info = ev
            if text:
                lp = None
                if body.logprobs is not None and info is not None:
                    lp = stream_logprobs(srv.client, info)
                yield chunk(c, text, lp, None)
        elif ev[0] == "done":
            res = ev[1]
            for c, ch in enumerate(res["choices"]):
                yield chunk(c, "", None, ch["finish_reason"])
            if body.stream_options and body.stream_options.include_usage:
                last = {"id": rid, "object": "text_completion", "created": created,
                        "model": body.model, "choices": [], "usage": usage_of(res)}
                if inp.alignment is not None:
                    last["alignment"] = alignment_summary(res)
                yield data(last)
        else:
            yield data(to_api_error(ev[1]).body())
    yield DONE

