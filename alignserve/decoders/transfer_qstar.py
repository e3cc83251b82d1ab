"""Transfer Q* (Chakraborty et al. 2024): score(a) = l(a) + w * r(rollout from [x, y<t, a]).

For each of the top-k candidates a, roll out m tokens greedily from [x, y<t, a] with a baseline
model (here the base model itself; point it at an aligned model where one exists), score the
rollout with the sequence reward, and sample among the candidates with the shifted logits. The k
rollouts run as one batch forked from the shared prefix; the chosen candidate's branch is then
cut back to the candidate and adopted as the sequence, so no forward is repeated.
Published: k=10, rollout 20 tokens (direct), w=1.0.
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..engine.context import DecodeContext
from ..engine.primitives import Extend, Seq
from .aligned import (
    AlignedDecoder,
    CommonOptions,
    emit_one,
    finish_state,
    rollout,
    sample_scored,
    topk_ids,
)
from .base import Run


class TransferQOptions(CommonOptions):
    top_k: int = Field(10, ge=1, le=32, description="candidates per token (published 10)")
    rollout: int = Field(20, ge=1, le=128, description="rollout length m (published 20)")


class TransferQStar(AlignedDecoder):
    name = "transfer_qstar"
    Options = TransferQOptions
    slot_params = ("top_k",)
    slot_formula = "n x (alignment.top_k + 1)"

    def slots_needed(self, n: int) -> dict[str, int]:
        return {"base": n * (self.opt.top_k + 1)}

    def run_choice(self, ctx: DecodeContext, c: int, seq: Seq, logits) -> Run:
        gen = ctx.generator(c)
        k, m = self.opt.top_k, self.opt.rollout
        done: list[int] = []
        while True:
            cands = topk_ids(ctx, logits, k, done)
            branches = ctx.fork(seq, len(cands))
            outs = yield [Extend(b, [a]) for b, a in zip(branches, cands)]
            states = [finish_state(ctx) for _ in cands]
            for st, a in zip(states, cands):
                st.tokens = done + [a]
                st.max_tokens = len(done) + 1 + m
            first = torch.cat([o.logits for o in outs])
            greedy_gens = [ctx.generator(c, 7)] * len(cands)  # unused by greedy sampling
            states, _ = yield from rollout(ctx, branches, first, greedy_gens, m - 1, greedy=True,
                                           extend_last=False, states=states)
            texts = [ctx.tokenizer.decode(st.tokens, skip_special_tokens=True) for st in states]
            scores, _ = yield from self.score_texts(ctx, texts)
            ctx.stats.candidates_scored += len(cands)
            ctx.stats.tokens_generated += len(cands)
            out = yield from sample_scored(ctx, logits, gen, cands, scores, done)
            tok = int(out.tokens[0])
            ctx.stats.tokens_generated += 1
            i = cands.index(tok) if tok in cands else 0
            finished = emit_one(ctx, c, tok, logits, out.logprobs[0])
            for j, b in enumerate(branches):
                if j != i:
                    ctx.free(b)
            ctx.free(seq)
            seq = branches[i]
            ctx.truncate(seq, len(ctx.prompt_ids) + len(done) + 1)
            logits = outs[i].logits[0]
            done.append(tok)
            if finished:
                return
