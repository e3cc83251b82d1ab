"""Best-of-N: sample N full answers from the base model, return the best by the reward.

The N samples share one prefill (the prompt's cache is forked) and decode as one batch. The
chosen answer streams once it is known. KL(BoN || base) <= log N - (N-1)/N.

**Early rejection** (Speculative Rejection, Sun et al., NeurIPS 2024): every ``prune_every``
tokens the unfinished samples' partial answers are scored with the request's combined reward
(its sources, weights and transform; the live partials are the transform's reference set), and
only the best ``max(min_live, ceil(keep * live))`` keep generating; the others are dropped and
their KV-cache slots freed and given back to the scheduler at once, so a waiting request can be
admitted while this one still runs. Samples that end (EOS, a stop string, ``max_tokens``) are
never dropped: they cost nothing more and stay candidates. The best complete answer among the
survivors is returned. Pruning is on by default for ``n >= 8`` (``keep`` 0.5) and off below;
``keep=1`` turns it off and is the plain algorithm token for token.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import Field, WithJsonSchema

from ..engine.context import DecodeContext
from ..engine.output import ChoiceState
from ..engine.primitives import Seq
from .aligned import AlignedDecoder, CommonOptions, emit_tokens, finish_state, rollout
from .base import Run

PRUNE_FROM_N = 8
"""Smallest ``n`` for which early rejection is on when the request does not set ``keep``."""
DEFAULT_KEEP = 0.5


class BestOfNOptions(CommonOptions):
    n: int = Field(4, ge=1, le=64, description="samples per choice (published yardstick: 4-128)")
    prune_every: int = Field(8, ge=1, le=4096,
                             description="early rejection: tokens generated between checks")
    # the schema says "number" (not number-or-null) so generic form builders offer a number box
    keep: Annotated[float | None, WithJsonSchema(
        {"type": "number", "exclusiveMinimum": 0, "maximum": 1})] = Field(
        None, gt=0.0, le=1.0,
        description=f"early rejection: fraction of the live samples kept at each check "
                    f"(default {DEFAULT_KEEP} when n >= {PRUNE_FROM_N}, else 1 = no pruning)")
    min_live: int = Field(2, ge=1, le=64,
                          description="early rejection: stop pruning once this many samples "
                                      "are still generating")


def visible_text(ctx: DecodeContext, st: ChoiceState) -> str:
    """The text of a (possibly unfinished) sample as its answer would show it so far.

    A finished state's text is already trimmed at its stop string. An unfinished one cannot
    contain a whole stop string (it would have finished), but it may end with the beginning of
    one or with half a UTF-8 character; both are cut, as streaming holds them back.
    """
    if st.finished:
        return st.text
    text = ctx.detok.decode(st.tokens).rstrip("\ufffd")
    cut = len(text)
    for s in st.stop:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                cut = min(cut, len(text) - n)
                break
    return text[:cut]


class BestOfN(AlignedDecoder):
    name = "best_of_n"
    streams = "final"
    reports_top_logprobs = False
    ranks_alternatives = True
    Options = BestOfNOptions
    slot_params = ("n",)
    slot_formula = "n x alignment.n"

    @property
    def keep(self) -> float:
        """The keep fraction in force (the default depends on ``n``)."""
        if self.opt.keep is not None:
            return float(self.opt.keep)
        return DEFAULT_KEEP if self.opt.n >= PRUNE_FROM_N else 1.0

    @property
    def prunes(self) -> bool:
        return self.keep < 1.0 and self.opt.n > self.opt.min_live

    def slots_needed(self, n: int) -> dict[str, int]:
        return {"base": n * self.opt.n}

    def run_choice(self, ctx: DecodeContext, c: int, seq: Seq, logits) -> Run:
        big_n = self.opt.n
        branches = [seq] + ctx.fork(seq, big_n - 1)
        # branch 0 uses the choice's own stream, so N=1 is plain sampling token for token
        gens = [ctx.generator(c)] + [ctx.generator(c, 1 + j) for j in range(1, big_n)]
        states = [finish_state(ctx) for _ in range(big_n)]
        last = [logits] * big_n
        live = list(range(big_n))  # still generating
        pruned: set[int] = set()
        info = self._er_info(ctx)
        info["samples_started"] += big_n
        max_tokens = ctx.params.max_tokens
        done = 0
        while live and done < max_tokens:
            # chunks of prune_every tokens; a branch's tokens do not depend on the chunking
            chunk = min(self.opt.prune_every, max_tokens - done)
            _, sub_last = yield from rollout(
                ctx, [branches[i] for i in live], torch.stack([last[i] for i in live]),
                [gens[i] for i in live], chunk, extend_last=done + chunk < max_tokens,
                states=[states[i] for i in live])
            done += chunk
            for i, lg in zip(live, sub_last):
                last[i] = lg
            for i in live:  # ended samples stay candidates; their cache is not needed any more
                if states[i].finished:
                    self._drop(ctx, branches[i])
            live = [i for i in live if not states[i].finished]
            if self.prunes and done < max_tokens and len(live) > self.opt.min_live:
                partial = [visible_text(ctx, states[i]) for i in live]
                scores, _ = yield from self.score_texts(ctx, partial, population=True)
                m = max(self.opt.min_live, math.ceil(self.keep * len(live)))
                order = np.argsort(-scores, kind="stable")
                drop = sorted(live[j] for j in order[m:])
                for i in drop:
                    self._drop(ctx, branches[i])
                pruned.update(drop)
                live = [i for i in live if i not in pruned]
                per = info["pruned_per_check"]  # check k is at (k + 1) * prune_every tokens
                k = done // self.opt.prune_every - 1
                per.extend([0] * (k + 1 - len(per)))
                per[k] += len(drop)
        cands = [i for i in range(big_n) if i not in pruned]
        texts = [states[i].text for i in cands]
        scores, _ = yield from self.score_texts(ctx, texts, population=True)
        # every sample was scored by the reward: the pruned ones at a check, the rest here
        ctx.stats.candidates_scored += big_n
        best = cands[int(scores.argmax())]
        full: list[float | None] = [None] * big_n
        for i, s in zip(cands, scores):
            full[i] = round(float(s), 5)
        # scores are per branch (None for pruned ones); chosen is the branch index
        ctx.info.setdefault("candidates", []).append({"scores": full, "chosen": best})
        st = states[best]
        emit_tokens(ctx, c, st.tokens, st.infos)
        if st.finish_reason and not ctx.finished(c):
            ctx.finish(c, st.finish_reason)
        for b in branches:
            self._drop(ctx, b)

    def plain_info(self, info: dict[str, Any], n: int) -> None:
        """All weights 0: each choice is one plain sample, nothing scored, pruned or thrown
        away (no pruning check ran: ``prune_every`` None, everything kept)."""
        info["early_rejection"] = {"prune_every": None, "keep": 1.0,
                                   "min_live": self.opt.min_live}
        info["samples_started"] = n
        info["pruned_per_check"] = []
        info["candidates"] = []
        info["tokens_discarded"] = 0

    def _er_info(self, ctx: DecodeContext) -> dict[str, Any]:
        if "early_rejection" not in ctx.info:
            ctx.info["early_rejection"] = {
                "prune_every": self.opt.prune_every if self.prunes else None,
                "keep": self.keep, "min_live": self.opt.min_live}
            ctx.info["samples_started"] = 0
            ctx.info["pruned_per_check"] = []
        return ctx.info

    @staticmethod
    def _drop(ctx: DecodeContext, seq: Seq) -> None:
        """Free a branch's slot and hand the reservation back to the scheduler."""
        if seq.slot >= 0:
            ctx.free(seq)
            ctx.release(seq.model, 1)

    def report(self, ctx: DecodeContext) -> Run:
        yield from super().report(ctx)
        if "samples_started" in ctx.info and not self.plain:
            returned = sum(len(st.tokens) for st in ctx.choices)
            ctx.info["tokens_discarded"] = max(0, ctx.stats.tokens_generated - returned)


