"""Best-of-N: sample N full answers from the base model, return the best by the reward.

The N samples share one prefill (the prompt's cache is forked) and decode as one batch. The
chosen answer streams once it is known. KL(BoN || base) <= log N - (N-1)/N.
"""

from __future__ import annotations

from pydantic import Field

from ..engine.context import DecodeContext
from ..engine.primitives import Seq
from .aligned import AlignedDecoder, CommonOptions, emit_tokens, rollout
from .base import Run


class BestOfNOptions(CommonOptions):
    n: int = Field(4, ge=1, le=64, description="samples per choice (published yardstick: 4-128)")


class BestOfN(AlignedDecoder):
    name = "best_of_n"
    streams = "final"
    reports_top_logprobs = False
    ranks_alternatives = True
    Options = BestOfNOptions

    def slots_needed(self, n: int) -> dict[str, int]:
        return {"base": n * self.opt.n}

    def run_choice(self, ctx: DecodeContext, c: int, seq: Seq, logits) -> Run:
        big_n = self.opt.n
        branches = [seq] + ctx.fork(seq, big_n - 1)
        # branch 0 uses the choice's own stream, so N=1 is plain sampling token for token
        gens = [ctx.generator(c)] + [ctx.generator(c, 1 + j) for j in range(1, big_n)]
        states, _ = yield from rollout(ctx, branches, logits[None].expand(big_n, -1), gens,
                                       ctx.params.max_tokens, extend_last=False)
        scores, per = self.score_texts(ctx, [st.text for st in states], population=True)
        best = int(scores.argmax())
        ctx.info.setdefault("candidates", []).append(
            {"scores": [round(float(x), 5) for x in scores], "chosen": best})
        st = states[best]
        emit_tokens(ctx, c, st.tokens, st.infos)
        if st.finish_reason and not ctx.finished(c):
            ctx.finish(c, st.finish_reason)
        for b in branches:
            ctx.free(b)
