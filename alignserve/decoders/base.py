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
    # alignment parameters that multiply the KV-cache slots a request needs (``slots_needed``),
    # and that formula in words for the 400 naming them
    slot_params: ClassVar[tuple[str, ...]] = ()
    slot_formula: ClassVar[str] = "n"

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        self.options = dict(options or {})

    def slots_needed(self, n: int) -> dict[str, int]:
        """KV-cache slots this request needs at most, per model (the scheduler admits on it)."""
        return {"base": n}

    # ---- what fits in the server's KV-cache slots ------------------------------------------
    def _need(self, n: int, values: dict[str, int] | None = None) -> int:
        """Total slots (all models) for request ``n`` with some slot parameters replaced."""
        opt = getattr(self, "opt", None)
        if opt is None or not values:
            return sum(self.slots_needed(n).values())
        self.opt = opt.model_copy(update=values)
        try:
            return sum(self.slots_needed(n).values())
        finally:
            self.opt = opt

    @classmethod
    def param_range(cls, name: str) -> tuple[int, int]:
        """The published ``(minimum, maximum)`` of integer alignment parameter ``name``."""
        prop = cls.Options.model_json_schema()["properties"][name]  # type: ignore[attr-defined]
        return int(prop.get("minimum", 1)), int(prop["maximum"])

    def fit_max(self, name: str, n: int, slots: int) -> int:
        """The largest value of slot parameter ``name`` (the others as set) whose request of
        ``n`` choices fits in ``slots``; ``minimum - 1`` when none does."""
        lo, hi = self.param_range(name)
        best = lo - 1
        for v in range(lo, hi + 1):  # the ranges are short (<= 64 values)
            if self._need(n, {name: v}) > slots:
                break
            best = v
        return best

    def check_slots(self, n: int, slots: int) -> None:
        """Refuse a request whose branches cannot fit in the server's ``slots`` KV-cache slots
        (``--slots``) with an ``AlignmentError`` naming the field to lower and its allowed
        range: ``n`` when one choice fits and the request's ``n`` multiplies it, else the
        first alignment parameter (``slot_params``) above what fits with the others as sent."""
        from .aligned import AlignmentError

        need = self._need(n)
        if need <= slots:
            return
        one = self._need(1)
        why = (f"strategy '{self.name}' needs {self.slot_formula} KV-cache slots and this "
               f"server has {slots} (--slots)")
        if one <= slots:
            max_n = max(k for k in range(1, n) if self._need(k) <= slots)
            raise AlignmentError("n", f"n must be between 1 and {max_n} with this alignment "
                                 f"({why}: {one} per choice, {need} for n={n})")
        opt = getattr(self, "opt", None)
        parts, field = [], None
        for name in self.slot_params:
            lo, _ = self.param_range(name)
            m = self.fit_max(name, 1, slots)
            got = getattr(opt, name)
            if m < lo:
                parts.append(f"alignment.{name} cannot fit with the other values sent")
            else:
                parts.append(f"alignment.{name} must be between {lo} and {m}")
            if field is None and got > m:
                field = f"alignment.{name}"
        sent = ", ".join(f"alignment.{p}={getattr(opt, p)}" for p in self.slot_params)
        hint = ("; with the other values sent, " + "; ".join(parts)) if parts else ""
        raise AlignmentError(field or (f"alignment.{self.slot_params[0]}" if self.slot_params
                                       else "n"),
                             f"{self.name} with {sent or 'these options'} needs {one} KV-cache "
                             f"slots per choice ({why}){hint}")

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
