"""DeAL (Huang et al. 2024): decoding as heuristic search with lookahead, for any objective.

A frontier of ``beams`` partial answers; each is expanded with its ``top_k`` next tokens, every
expansion is rolled out greedily for ``lookahead`` tokens (all expansions as one batch), prefix
plus lookahead is scored with the combined objective (model rewards, keyword inclusion, length,
regex/JSON checks, in any weighted mix), and the best ``beams`` expansions survive. Lookahead
tokens are then cut off again (caches are truncated, not recomputed). When every beam has
finished, the best complete answer is returned (streamed once chosen).
Reimplementation defaults: lookahead 10, 5 beams, top-k 3.
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..engine.context import DecodeContext
from ..engine.output import Detokenizer, TokenInfo
from ..engine.primitives import Extend, Seq
from .aligned import AlignedDecoder, CommonOptions, emit_tokens, finish_state, rollout, topk_ids
from .base import Run


class DealOptions(CommonOptions):
    beams: int = Field(5, ge=1, le=16, description="frontier size")
    top_k: int = Field(3, ge=1, le=16, description="expansions per beam")
    lookahead: int = Field(10, ge=0, le=64, description="greedy lookahead tokens per expansion")


class Deal(AlignedDecoder):
    name = "deal"
    streams = "final"
    reports_top_logprobs = False
    Options = DealOptions
    slot_params = ("beams", "top_k")
    slot_formula = "n x alignment.beams x (alignment.top_k + 1)"

    def slots_needed(self, n: int) -> dict[str, int]:
        return {"base": n * (self.opt.beams * self.opt.top_k + self.opt.beams)}

    def plain_info(self, info: dict, n: int) -> None:
        """All weights 0: no search; each choice is its single plain answer."""
        info["candidates"] = [{"complete": 1} for _ in range(n)]

    def run_choice(self, ctx: DecodeContext, c: int, seq: Seq, logits) -> Run:
        o = self.opt
        p0 = len(ctx.prompt_ids)
        # a beam: (seq, answer tokens, next-token logits, state holding the answer's infos)
        beams = [(seq, [], logits, finish_state(ctx))]
        complete = []
        det = Detokenizer(ctx.tokenizer)
        while beams:
            kids, forks, states = [], [], []
            for bseq, toks, lg, parent in beams:
                cands = topk_ids(ctx, lg, o.top_k, toks)
                base_lp = torch.log_softmax(lg.float(), -1)
                forks.extend(ctx.fork(bseq, len(cands)))  # one cache copy per beam
                for a in cands:
                    kids.append((bseq, toks + [a]))
                    st = finish_state(ctx)  # the expansion token goes through the stop rules
                    st.tokens, st.infos = list(parent.tokens), list(parent.infos)
                    det.push(st, TokenInfo(a, float(base_lp[a])))
                    states.append(st)
            for bseq, *_ in beams:
                ctx.free(bseq)
            outs = yield [Extend(f, [t[-1]]) for f, (_, t) in zip(forks, kids)]
            ends = [st.finished for st in states]
            look = [finish_state(ctx) for _ in kids]
            for lk, st in zip(look, states):
                lk.tokens = list(st.tokens)
                lk.finish_reason = st.finish_reason
                lk.text = st.text
                lk.max_tokens = min(ctx.params.max_tokens, len(st.tokens) + o.lookahead)
            first = torch.cat([x.logits for x in outs])
            look, _ = yield from rollout(ctx, forks, first, [ctx.generator(c, 9)] * len(forks),
                                         o.lookahead, greedy=True, extend_last=False,
                                         states=look)
            texts = [st.text if st.finished else det.decode(st.tokens) for st in look]
            scores, _ = yield from self.score_texts(ctx, texts)
            ctx.stats.candidates_scored += len(kids)
            ctx.stats.tokens_generated += len(kids)
            order = sorted(range(len(kids)), key=lambda j: -scores[j])
            nxt = []
            for j in order:
                if ends[j]:
                    if len(complete) < o.beams:
                        complete.append((float(scores[j]), states[j]))
                    ctx.free(forks[j])
                elif len(nxt) < o.beams - len(complete) and len(nxt) < o.beams:
                    ctx.truncate(forks[j], p0 + len(states[j].tokens))
                    nxt.append((forks[j], states[j].tokens, outs[j].logits[0], states[j]))
                else:
                    ctx.free(forks[j])
            beams = nxt
        emit_best(ctx, c, complete)


def emit_best(ctx, c: int, complete: list) -> None:  # type: ignore[no-untyped-def]
    """Emit the best-scoring completed beam ``(score, ChoiceState)`` as choice ``c`` (an empty
    answer when none completed) and record how many completed."""
    best = max(complete, key=lambda x: x[0])[1] if complete else finish_state(ctx)
    ctx.info.setdefault("candidates", []).append({"complete": len(complete)})
    emit_tokens(ctx, c, best.tokens, best.infos)
    if best.finish_reason and not ctx.finished(c):
        ctx.finish(c, best.finish_reason)
