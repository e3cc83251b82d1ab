"""The alignment strategies over a remote base model: small async functions, rewards local.

Each strategy gets a ``RemoteCtx`` (the request, its output state, the remote transport) and
does the base model's work through ``/v1/completions`` calls on the remote, with the request's
sampling fields passed on; rewards and the candidates' sampling run here, with the same scoring
(``AlignedDecoder.score_texts``), sampler (``sampling.sample_batch``) and output rules
(``output.Detokenizer``: stop strings, EOS, ``max_tokens``) as the in-process strategies.

Remote round trips (one "call" may carry several prompts and ``n`` samples):

* ``sample``: 1 call (streamed when the client streams).
* ``best_of_n``: 1 call with ``n = N`` per choice; no early rejection (``keep`` < 1 is refused).
* ``cd_block``: 1 call per block (``n = K``, ``max_tokens = M``, continuing the kept prefix).
* ``args``: 1 call per token (``max_tokens = 1``, ``logprobs = top_k``).
* ``transfer_qstar``: 2 calls per token (the top-k, then the k greedy rollouts as one
  multi-prompt call).
* ``vas``, ``cd``, ``genarm``, ``deal``: in ``alignserve.remote.guided`` (1, 1, 1 call per token
  and 2 calls per search step).

Candidates come from the remote's top logprobs, so ``top_k`` is capped by what the remote returns
(alignserve and vLLM: 20). Candidate selection then applies the request's penalties and logit
bias to those candidates' logprobs, as ``DecodeContext.candidates`` does on full logits.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..engine.context import DecodeContext, Stats
from ..engine.output import ChoiceState, Detokenizer, TokenInfo
from ..engine.primitives import Sample, Score
from ..engine.sampling import (
    SamplingParams,
    adjusted_logits,
    build_adjust,
    row_generator,
    sample_batch,
)
from ..engine.scheduler import run_scores
from .http import RemoteCaps, RemoteHTTP, TokenMap

# rewards run on one thread, one batch at a time, as they do on the in-process engine thread
REWARD_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="alignserve-rewards")


@dataclass
class RemoteChoice:
    """One remote completion choice in our terms."""

    text: str
    finish_reason: str | None
    ids: list[int]                     # exact ids, or the local re-encoding of ``text``
    infos: list[TokenInfo] = field(default_factory=list)
    tops: list[dict[int, float]] = field(default_factory=list)  # per position, exact ids only


class RemoteCtx:
    """What a remote strategy may touch: duck-types the parts of ``DecodeContext`` that the
    shared helpers (``score_texts``, ``report``, ``sample_scored``, ``topk_ids``) read."""

    def __init__(self, http: RemoteHTTP, caps: RemoteCaps, tmap: TokenMap, tokenizer: Any,
                 prompt_ids: list[int], prompt_text: str, params: SamplingParams, n: int,
                 eos_ids: set[int], resources: Any,
                 on_delta: Callable[[int, str, TokenInfo | None], None]) -> None:
        self.http, self.caps, self.tmap, self.tokenizer = http, caps, tmap, tokenizer
        self.prompt_ids, self.prompt_text, self.params, self.n = prompt_ids, prompt_text, params, n
        stops = set() if params.ignore_eos else set(eos_ids)
        stops |= set(params.stop_token_ids)
        self.eos_ids = stops
        self.resources = resources
        self.detok = Detokenizer(tokenizer)
        self.choices = [ChoiceState(params.max_tokens, list(params.stop), set(stops))
                        for _ in range(n)]
        self._on_delta = on_delta
        self.stats = Stats()
        self.info: dict[str, Any] = {}
        self.prompt_logprobs: list[Any] | None = None
        self.completion_tokens: int | None = None  # the remote's usage, when it says
        self.remote_calls = 0

    # ---- randomness and sampling (as DecodeContext) ------------------------------------------
    def generator(self, *key: int) -> torch.Generator:
        assert self.params.seed is not None
        return row_generator(self.params.seed, *key)

    def remote_seed(self, *key: int) -> int:
        """A seed for one remote call, derived from the request seed and the call's key."""
        d = hashlib.sha256(repr((int(self.params.seed or 0),) + key).encode()).digest()
        return int.from_bytes(d[:4], "little") & 0x7FFFFFFF

    # the same ``Sample`` operation as in-process (a generator: ``yield from ctx.sample``)
    sample = DecodeContext.sample

    def candidates(self, logits: Tensor, k: int, histories: list[list[int]]) -> Tensor:
        adj = build_adjust(self.params, histories, self.prompt_ids, self.eos_ids, logits.device)
        lg = adjusted_logits(logits.float(), adj)
        k = min(k, int(torch.isfinite(lg).sum(-1).min()))
        return torch.topk(lg, max(k, 1), dim=-1).indices

    # ---- output: the same stop / EOS / max_tokens rules as in-process ------------------------
    emit = DecodeContext.emit
    finish = DecodeContext.finish
    finished = DecodeContext.finished

    def emit_text(self, choice: int, text: str, infos: list[TokenInfo], ids: list[int],
                  finish_reason: str | None) -> None:
        """Pass the remote's own text through (it applied stop strings and EOS itself)."""
        st = self.choices[choice]
        if st.finished:
            return
        st.tokens.extend(ids)
        st.infos.extend(infos)
        st.text += text
        st.sent = len(st.text)
        if finish_reason is not None:
            st.finish_reason = finish_reason
        if text or finish_reason is not None:
            self._on_delta(choice, text, infos[-1] if infos else None)

    # ---- remote calls ------------------------------------------------------------------------
    def sampling_body(self) -> dict[str, Any]:
        """The request's sampling fields for the remote (extensions only when set)."""
        p = self.params
        body: dict[str, Any] = {"temperature": p.temperature, "top_p": p.top_p}
        if p.stop:
            body["stop"] = list(p.stop)
        if p.top_k:
            body["top_k"] = p.top_k
        if p.presence_penalty:
            body["presence_penalty"] = p.presence_penalty
        if p.frequency_penalty:
            body["frequency_penalty"] = p.frequency_penalty
        if p.repetition_penalty != 1.0:
            body["repetition_penalty"] = p.repetition_penalty
        if p.logit_bias:
            body["logit_bias"] = {str(k): v for k, v in p.logit_bias.items()}
        if p.min_tokens:
            body["min_tokens"] = p.min_tokens
        if p.stop_token_ids:
            body["stop_token_ids"] = list(p.stop_token_ids)
        if p.ignore_eos:
            body["ignore_eos"] = True
        return body

    def logprob_fields(self, top: int) -> dict[str, Any]:
        if not self.caps.logprobs:
            return {}
        out: dict[str, Any] = {"logprobs": min(top, self.caps.max_logprobs)}
        if self.caps.token_ids:
            out["return_tokens_as_token_ids"] = True
        return out

    async def complete(self, prompts: list[list[int]], top: int = 0, **kw: Any
                       ) -> list[list[RemoteChoice]]:
        """One remote call over ``prompts`` (token ids); the choices grouped by prompt."""
        self.remote_calls += 1
        res = await self.http.complete(prompt=prompts if len(prompts) > 1 else prompts[0],
                                       **self.logprob_fields(top), **kw)
        n = int(kw.get("n", 1))
        choices = sorted(res["choices"], key=lambda ch: int(ch.get("index", 0)))
        parsed = [self.parse(ch) for ch in choices]
        return [parsed[i * n:(i + 1) * n] for i in range(len(prompts))]

    def parse(self, ch: dict[str, Any]) -> RemoteChoice:
        text = ch.get("text") or ""
        lp = ch.get("logprobs") or {}
        toks = list(lp.get("tokens") or [])
        lps = list(lp.get("token_logprobs") or [None] * len(toks))
        tops_raw = list(lp.get("top_logprobs") or [None] * len(toks))
        exact = [self.tmap.exact(s) for s in toks]
        if toks and all(i is not None for i in exact):
            ids = [int(i) for i in exact]  # type: ignore[arg-type]
        else:  # no logprobs, or a piece of a UTF-8 character: our tokenization of the text
            ids = list(self.tokenizer(text, add_special_tokens=False).input_ids)
        infos, tops = [], []
        for s, v, t in zip(toks, lps, tops_raw):
            top = {}
            for ts, tv in (t or {}).items():
                tid = self.tmap.exact(ts)
                if tid is not None and tv is not None:
                    top[tid] = float(tv)
            tops.append(top)
            top_list = sorted(top.items(), key=lambda x: -x[1])[:self.params.top_logprobs]
            infos.append(TokenInfo(self.tmap.display(s), None if v is None else float(v),
                                   top_list if self.params.top_logprobs else None))
        return RemoteChoice(text, ch.get("finish_reason"), ids, infos, tops)

    async def score(self, dec: Any, texts: list[str], population: bool = False):
        """``dec.score_texts`` on the reward thread (the event loop keeps serving)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            REWARD_POOL, lambda: drive(dec.score_texts(self, texts, population)))

    async def report(self, dec: Any) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(REWARD_POOL, lambda: drive(dec.report(self)))

    def replay(self, done: list[int], new: list[int], remote_finish: str | None,
               max_tokens: int | None = None) -> ChoiceState:
        """A scratch state for an answer ``done + new`` under the request's stop rules."""
        st = ChoiceState(max_tokens or self.params.max_tokens, list(self.params.stop),
                         set(self.eos_ids))
        st.tokens = list(done)
        for t in new:
            self.detok.push(st, TokenInfo(t))
            if st.finished:
                break
        if not st.finished:
            if remote_finish == "stop":  # the remote ended it (EOS, its stop rules)
                self.detok.finish(st, "stop")
            else:
                st.text = self.detok.decode(st.tokens)
        return st


# ---- strategies ------------------------------------------------------------------------------
def drive(gen: Any) -> Any:
    """Run a shared strategy helper (a generator of ``Sample`` / ``Score`` operations, which
    the in-process scheduler batches across requests) to completion here; return its value."""
    try:
        ops = next(gen)
        while True:
            if not all(isinstance(op, (Sample, Score)) for op in ops):
                raise TypeError(f"remote mode cannot run {ops!r}")
            outs = [sample_batch([op])[0] if isinstance(op, Sample) else run_scores([op])[0]
                    for op in ops]
            ops = gen.send(outs)
    except StopIteration as stop:
        return stop.value


async def prompt_logprobs(ctx: RemoteCtx) -> None:
    """Log-probabilities of the prompt tokens (``echo`` with ``logprobs``): one extra call."""
    res = await ctx.http.complete(prompt=ctx.prompt_ids, max_tokens=1, echo=True,
                                  temperature=0.0, **ctx.logprob_fields(ctx.params.top_logprobs))
    ch = ctx.parse(res["choices"][0])
    out: list[Any] = [(ctx.prompt_ids[0], None, None)]
    for i in range(1, len(ctx.prompt_ids)):
        info = ch.infos[i] if i < len(ch.infos) else TokenInfo(ctx.prompt_ids[i])
        out.append((ctx.prompt_ids[i], info.logprob, info.top))
    ctx.prompt_logprobs = out


async def run_sample(ctx: RemoteCtx, stream: bool) -> None:
    """Plain sampling: the remote does it all; its text, stop handling and finish reasons are
    passed through (streamed chunk by chunk when the client streams)."""
    p = ctx.params
    body = dict(prompt=ctx.prompt_ids, n=ctx.n, max_tokens=p.max_tokens, seed=p.seed,
                **ctx.sampling_body(), **ctx.logprob_fields(p.top_logprobs))
    if not stream:
        ctx.remote_calls += 1
        res = await ctx.http.complete(**body)
        for ch in res["choices"]:
            rc = ctx.parse(ch)
            c = int(ch.get("index", 0))
            ids = [i.token for i in rc.infos] if rc.infos else rc.ids
            ctx.emit_text(c, rc.text, rc.infos, ids, rc.finish_reason or "stop")
        ctx.completion_tokens = (res.get("usage") or {}).get("completion_tokens")
        ctx.stats.tokens_generated += sum(len(st.tokens) for st in ctx.choices)
        return
    ctx.remote_calls += 1
    async for chunk in ctx.http.stream(**body, stream_options={"include_usage": True}):
        for ch in chunk.get("choices") or []:
            rc = ctx.parse(ch)
            ids = [i.token for i in rc.infos]
            ctx.emit_text(int(ch.get("index", 0)), rc.text, rc.infos, ids, rc.finish_reason)
        if chunk.get("usage"):
            ctx.completion_tokens = chunk["usage"].get("completion_tokens")
    for c in range(ctx.n):  # a stream that ended without a finish reason
        if not ctx.finished(c):
            ctx.emit_text(c, "", [], [], "stop")
    ctx.stats.tokens_generated += sum(len(st.tokens) for st in ctx.choices)


async def run_best_of_n(ctx: RemoteCtx, dec: Any) -> None:
    """Best-of-N: N samples per choice in one remote call (``n = N·choices``), best by the
    request's combined reward over the N (the transform's reference set)."""
    big_n = dec.opt.n
    p = ctx.params
    [samples] = await ctx.complete([ctx.prompt_ids], top=0, n=big_n * ctx.n,
                                   max_tokens=p.max_tokens, seed=p.seed, **ctx.sampling_body())
    ctx.info["early_rejection"] = {"prune_every": None, "keep": 1.0,
                                   "min_live": dec.opt.min_live}
    ctx.info["samples_started"] = big_n * ctx.n
    ctx.info["pruned_per_check"] = []
    for c in range(ctx.n):
        group = samples[c * big_n:(c + 1) * big_n]
        ctx.stats.tokens_generated += sum(len(s.ids) for s in group)
        scores, _ = await ctx.score(dec, [s.text for s in group], population=True)
        ctx.stats.candidates_scored += len(group)  # every sample, scored once
        best = int(np.argmax(scores))
        ctx.info.setdefault("candidates", []).append(
            {"scores": [round(float(s), 5) for s in scores], "chosen": best})
        s = group[best]
        ctx.emit_text(c, s.text, s.infos, s.ids, s.finish_reason or "stop")
    returned = sum(len(st.tokens) for st in ctx.choices)
    ctx.info["tokens_discarded"] = max(0, ctx.stats.tokens_generated - returned)


async def run_cd_block(ctx: RemoteCtx, dec: Any) -> None:
    """Blockwise CD: per round one remote call with ``n = K``, ``max_tokens = M`` continuing the
    kept prefix; the K blocks are scored on the whole answer so far, the best is kept."""
    k, m = dec.opt.k, dec.opt.block
    p = ctx.params

    async def one(c: int) -> None:
        done: list[int] = []
        step = 0
        while not ctx.finished(c):
            mt = min(m, p.max_tokens - len(done))
            [blocks] = await ctx.complete([ctx.prompt_ids + done], top=0, n=k, max_tokens=mt,
                                          seed=ctx.remote_seed(c, step), **ctx.sampling_body())
            states = [ctx.replay(done, b.ids, b.finish_reason) for b in blocks]
            ctx.stats.tokens_generated += sum(len(st.tokens) - len(done) for st in states)
            scores, _ = await ctx.score(dec, [st.text for st in states], population=True)
            ctx.stats.candidates_scored += len(states)  # the K blocks this step chose among
            st = states[int(np.argmax(scores))]
            finished = False
            for t in st.tokens[len(done):]:
                if ctx.emit(c, t):
                    finished = True
                    break
            if st.finish_reason and not finished:
                ctx.finish(c, st.finish_reason)
            if not st.tokens[len(done):] and not ctx.finished(c):
                ctx.finish(c, "stop")  # the remote produced nothing: nothing more will come
            done = list(st.tokens)
            step += 1

    await asyncio.gather(*(one(c) for c in range(ctx.n)))


def sparse_logits(top: dict[int, float], vocab: int) -> Tensor:
    """A [V] logits row holding the remote's top logprobs, -inf elsewhere."""
    lg = torch.full((vocab,), float("-inf"))
    if top:
        lg[torch.tensor(list(top))] = torch.tensor(list(top.values()), dtype=torch.float32)
    return lg


async def next_top(ctx: RemoteCtx, prefix: list[int], k: int) -> dict[int, float]:
    """The remote's top-``k`` next tokens after ``prompt + prefix`` with their logprobs."""
    [[ch]] = await ctx.complete([ctx.prompt_ids + prefix], top=k, max_tokens=1,
                                temperature=0.0)
    return ch.tops[0] if ch.tops else {}


async def run_token_level(ctx: RemoteCtx, dec: Any, vocab: int) -> None:
    """ARGS and Transfer Q*: per token, the remote's top-k candidates, each scored locally (the
    extended prefix for ARGS; a greedy remote rollout of ``rollout - 1`` tokens after it for
    Transfer Q*), then one token sampled among them with ``l(a) + w·r``."""
    from ..decoders.aligned import sample_scored, topk_ids

    k = dec.opt.top_k
    qstar = dec.name == "transfer_qstar"

    async def one(c: int) -> None:
        gen = ctx.generator(c)
        done: list[int] = []
        while True:
            top = await next_top(ctx, done, max(k, ctx.params.top_logprobs))
            if not top:
                ctx.finish(c, "stop")
                return
            logits = sparse_logits(top, vocab)
            cands = topk_ids(ctx, logits, k, done)
            if qstar:
                m = dec.opt.rollout
                rolls: list[Any] = [None] * len(cands)
                if m > 1:  # the k greedy rollouts as one multi-prompt call
                    groups = await ctx.complete([ctx.prompt_ids + done + [a] for a in cands],
                                                top=0, max_tokens=m - 1, temperature=0.0,
                                                **_stops(ctx))
                    rolls = [g[0] for g in groups]
                texts = [ctx.replay(done + [a], r.ids if r else [],
                                    r.finish_reason if r else None,
                                    max_tokens=len(done) + 1 + m).text
                         for a, r in zip(cands, rolls)]
                ctx.stats.tokens_generated += len(cands) * m
            else:
                texts = [ctx.tokenizer.decode(done + [a], skip_special_tokens=True)
                         for a in cands]
            scores, _ = await ctx.score(dec, texts)
            ctx.stats.candidates_scored += len(cands)
            out = drive(sample_scored(ctx, logits, gen, cands, scores, done))
            tok = int(out.tokens[0])
            ctx.stats.tokens_generated += 1
            n_top = ctx.params.top_logprobs
            tops = sorted(top.items(), key=lambda x: -x[1])[:n_top] if n_top else None
            if ctx.emit(c, tok, top.get(tok), tops, float(out.logprobs[0])):
                return
            done.append(tok)

    await asyncio.gather(*(one(c) for c in range(ctx.n)))


def _stops(ctx: RemoteCtx) -> dict[str, Any]:
    """The request's stop rules for a remote rollout (stop strings, ``ignore_eos``)."""
    out: dict[str, Any] = {"stop": list(ctx.params.stop)} if ctx.params.stop else {}
    if ctx.params.ignore_eos:
        out["ignore_eos"] = True
    return out
