"""Base class and shared helpers for decoding strategies.

A strategy is a small class whose ``run(ctx)`` is a generator over the engine's primitives
(``alignserve.engine.primitives``): it yields lists of forward operations and receives their
outputs. It never parses HTTP and never sees the scheduler.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..engine.context import DecodeContext
from ..engine.primitives import Extend, ForwardOut, Op, Seq

Run = Generator[list[Op], list[ForwardOut], None]


class Decoder:
    """One instance per request. Subclasses set ``name`` and implement ``run``."""

    name: ClassVar[str] = "base"
    streams: ClassVar[str] = "token"  # "token", "block" or "final": how output reaches a stream
    reports_top_logprobs: ClassVar[bool] = True  # False: emits chosen samples without top-n

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        self.options = dict(options or {})

    def slots_needed(self, n: int) -> dict[str, int]:
        """KV-cache slots this request needs at most, per model (the scheduler admits on it)."""
        return {"base": n}

    def run(self, ctx: DecodeContext) -> Run:
        raise NotImplementedError


def prefill(ctx: DecodeContext, want_prompt_logprobs: bool) -> Run:
    """Prefill the prompt once; returns (seq, last-position logits [V]) via StopIteration value."""
    seq = ctx.new_seq("base")
    [out] = yield [Extend(seq, list(ctx.prompt_ids), logits="all" if want_prompt_logprobs
                          else "last", hidden=True)]
    assert out.logits is not None and out.hidden is not None
    ctx.prompt_hidden = out.hidden[-1]
    if want_prompt_logprobs:
        ctx.prompt_logprobs = prompt_logprobs(out.logits, ctx.prompt_ids,
                                              ctx.params.top_logprobs)
    return seq, out.logits[-1]  # type: ignore[return-value]


def prompt_logprobs(logits: Tensor, ids: list[int], n_top: int) -> list[Any]:
    """Log-probabilities of each prompt token given the ones before it (None for the first)."""
    lp = torch.log_softmax(logits[:-1].float(), dim=-1)
    tgt = torch.tensor(ids[1:], dtype=torch.long)
    vals = lp.gather(1, tgt[:, None])[:, 0].tolist() if len(ids) > 1 else []
    out: list[Any] = [(ids[0], None, None)]
    tops = torch.topk(lp, n_top, dim=-1) if n_top and len(ids) > 1 else None
    for i, v in enumerate(vals):
        top = None
        if tops is not None:
            top = list(zip(tops.indices[i].tolist(), tops.values[i].tolist()))
        out.append((ids[i + 1], v, top))
    return out


def emit_rows(ctx: DecodeContext, choices: list[int], tokens: Tensor, base_logprobs: Tensor,
              logits: Tensor | None, policy_logprobs: Tensor | None = None) -> list[bool]:
    """Emit one token per choice with the base model's log-probabilities; returns done flags."""
    n_top = ctx.params.top_logprobs
    tops = None
    if n_top and logits is not None:
        tops = torch.topk(torch.log_softmax(logits.float(), dim=-1), n_top, dim=-1)
    done = []
    for r, c in enumerate(choices):
        top = None
        if tops is not None:
            top = list(zip(tops.indices[r].tolist(), tops.values[r].tolist()))
        plp = float(policy_logprobs[r]) if policy_logprobs is not None else None
        done.append(ctx.emit(c, int(tokens[r]), float(base_logprobs[r]), top, plp))
    return done


def decode_rows(ctx: DecodeContext, seqs: list[Seq], logits: Tensor, choices: list[int],
                gens: list[torch.Generator]) -> Run:
    """Plain token-by-token sampling of several rows until each choice finishes."""
    live = list(range(len(seqs)))
    while live:
        out = yield from ctx.sample(logits, [gens[i] for i in live],
                         [ctx.choices[choices[i]].tokens for i in live])
        ctx.stats.tokens_generated += len(live)
        done = emit_rows(ctx, [choices[i] for i in live], out.tokens, out.base_logprobs, logits,
                         out.logprobs)
        keep = [j for j, d in enumerate(done) if not d]
        live = [live[j] for j in keep]
        if not live:
            return
        toks = out.tokens[keep].tolist()
        outs = yield [Extend(seqs[i], [t]) for i, t in zip(live, toks)]
        logits = torch.cat([o.logits for o in outs])  # type: ignore[misc]


def parallel(gens: list[Run]) -> Run:
    """Run several strategy generators as one: their operations share each engine step.

    This is how one request's ``n`` choices (and any other independent branches) batch together
    without each strategy having to manage lists of rows.
    """
    live: dict[int, Run] = dict(enumerate(gens))
    pending: dict[int, list[Op]] = {}
    for i, g in list(live.items()):
        try:
            pending[i] = list(next(g))
        except StopIteration:
            del live[i]
    while live:
        order = [(i, pending[i]) for i in live]
        outs = yield [op for _, ops in order for op in ops]
        pos = 0
        for i, ops in order:
            part, pos = outs[pos:pos + len(ops)], pos + len(ops)
            try:
                pending[i] = list(live[i].send(part))
            except StopIteration:
                del live[i]
