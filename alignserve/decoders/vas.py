"""VAS (Han et al. 2024) and token-wise Controlled Decoding (Mudgal et al. 2024).

VAS: for the top-k candidates a, Q(a) = sum_i beta_i V_i([x, y<t, a]); logits'(a) = l(a) +
Q(a) - mean_topk Q; tokens outside the top-k keep their logits. The k candidates are scored in
ONE tree forward on top of the shared prefix cache (each candidate at position t, seeing the
prefix and itself), and the value heads read the candidates' hidden states. The same forward
yields every candidate's next-token logits, so after sampling a candidate we commit it in place
and need no further forward: guided decoding costs one k-token forward per token, not k+1
forwards. Only if the sampled token lies outside the top-k is one ordinary forward added.

CD (token-wise): pi(a) proportional to pi_base(a) exp(lambda V) over the top-k only, i.e. the same
scores with sampling restricted to the candidates.
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..engine.context import DecodeContext
from ..engine.primitives import Extend, Seq, Tree
from .aligned import AlignedDecoder, CommonOptions, emit_one, topk_ids
from .base import Run


class VasOptions(CommonOptions):
    top_k: int = Field(20, ge=1, le=64, description="candidates valued per token (published 20)")
    batched: bool = Field(True, description="false = the reference code's way, one forward per "
                          "candidate on a copied cache (for benchmarks only)")


class Vas(AlignedDecoder):
    name = "vas"
    Options = VasOptions
    head_kind = "value"
    restrict = False  # VAS leaves non-candidates as they are; CD samples among candidates only

    def slots_needed(self, n: int) -> dict[str, int]:
        return {"base": n if self.opt.batched else 2 * n}

    def run_choice(self, ctx: DecodeContext, c: int, seq: Seq, logits) -> Run:
        reg = ctx.resources
        heads = [(reg.heads_for(n, "value"), w) for n, w in self.weights.items() if w]
        betas = torch.tensor([[w for _, w in heads]], dtype=torch.float32)
        gen = ctx.generator(c)
        k = self.opt.top_k
        while True:
            cands = topk_ids(logits, k)
            if self.opt.batched:
                [tree] = yield [Tree(seq, cands, logits=True, hidden=True)]
                ctx.stats.guidance_forwards += 1
                hidden, cand_logits = tree.hidden, tree.logits
            else:
                hidden, cand_logits = yield from self.one_by_one(ctx, seq, cands)
            ctx.stats.candidates_scored += len(cands)
            vals = torch.stack([h.module(hidden) for h, _ in heads])  # [H, k]
            vals = vals - vals.mean(dim=1, keepdim=True)
            out = ctx.sample(logits[None], [gen], weights=betas, cand_scores=vals[None],
                             cand_ids=torch.tensor([cands]),
                             top_k=k if self.restrict else None)
            tok = int(out.tokens[0])
            ctx.stats.tokens_generated += 1
            if emit_one(ctx, c, tok, logits, out.logprobs[0]):
                return
            if tok in cands and self.opt.batched:
                i = cands.index(tok)
                ctx.commit(seq, i, tok)
                logits = cand_logits[i]
            else:
                [o] = yield [Extend(seq, [tok])]
                logits = o.logits[0]


    def one_by_one(self, ctx: DecodeContext, seq: Seq, cands: list[int]) -> Run:
        """Reference-style scoring: copy the prefix cache and run one forward per candidate."""
        hidden, logits = [], []
        for a in cands:
            [branch] = ctx.fork(seq, 1)
            [o] = yield [Extend(branch, [a], hidden=True)]
            ctx.stats.guidance_forwards += 1
            hidden.append(o.hidden)
            logits.append(o.logits)
            ctx.free(branch)
        return torch.cat(hidden), torch.cat(logits)  # type: ignore[return-value]


class CdOptions(VasOptions):
    top_k: int = Field(20, ge=1, le=64, description="candidate set the policy samples from")


class ControlledDecoding(Vas):
    name = "cd"
    Options = CdOptions
    restrict = True
