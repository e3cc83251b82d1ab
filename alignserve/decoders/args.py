"""ARGS (Khanov et al. 2024): score(a) = l(a) + w * r([x, y<t, a]) over the top-k candidates.

The reward is a sequence-level source run on the k extended prefixes (one batched reward call
per step); the base model needs one forward per token. Sampling is restricted to the k
candidates (greedy with temperature 0). Published: k=10, w=1.0 (also 1.5).
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from ..engine.context import DecodeContext
from ..engine.primitives import Extend, Seq
from .aligned import AlignedDecoder, CommonOptions, emit_one, sample_scored, topk_ids
from .base import Run


class ArgsOptions(CommonOptions):
    top_k: int = Field(10, ge=1, le=50, description="candidates scored per token (published 10)")
    batched: bool = Field(True, description="false = one reward call per candidate, as the "
                          "reference code does (for benchmarks only)")


class Args(AlignedDecoder):
    name = "args"
    Options = ArgsOptions

    def run_choice(self, ctx: DecodeContext, c: int, seq: Seq, logits) -> Run:
        gen = ctx.generator(c)
        k = self.opt.top_k
        prefix: list[int] = []
        while True:
            cands = topk_ids(ctx, logits, k, prefix)
            texts = [ctx.tokenizer.decode(prefix + [a], skip_special_tokens=True)
                     for a in cands]
            if self.opt.batched:
                scores, _ = yield from self.score_texts(ctx, texts)
            else:  # the reference code's way: one reward call per candidate
                parts = []
                for t in texts:
                    one, _ = yield from self.score_texts(ctx, [t])
                    parts.append(one)
                scores = np.concatenate(parts)
            ctx.stats.candidates_scored += len(cands)
            out = yield from sample_scored(ctx, logits, gen, cands, scores, prefix)
            tok = int(out.tokens[0])
            ctx.stats.tokens_generated += 1
            if emit_one(ctx, c, tok, logits, out.logprobs[0]):
                return
            prefix.append(tok)
            [o] = yield [Extend(seq, [tok])]
            logits = o.logits[0]
