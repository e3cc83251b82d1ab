"""Plain sampling: the base model alone. ``n`` choices share one prefill (the cache is forked)."""

from __future__ import annotations

from ..engine.context import DecodeContext
from .base import Decoder, Run, decode_rows, prefill


class Sample(Decoder):
    name = "sample"

    def run(self, ctx: DecodeContext) -> Run:
        seq, last = yield from prefill(ctx, bool(self.options.get("prompt_logprobs")))
        if ctx.params.max_tokens == 0:
            for c in range(ctx.n):
                ctx.finish(c, "length")
            return
        seqs = [seq] + ctx.fork(seq, ctx.n - 1)
        gens = [ctx.generator(c) for c in range(ctx.n)]
        logits = last[None].expand(ctx.n, -1)
        yield from decode_rows(ctx, seqs, logits, list(range(ctx.n)), gens)
