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
from ..engine.primitives import Extend, HeadEval, Seq, Tree
from .aligned import (
    AlignedDecoder,
    AlignmentError,
    CommonOptions,
    emit_one,
    sample_scored,
    topk_ids,
)
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

    def bind(self, registry) -> None:  # type: ignore[no-untyped-def]
        super().bind(registry)
        if self.backbones and not self.opt.batched:
            raise AlignmentError("alignment.batched", "batched=false (the benchmark baseline) "
                                 "supports heads on the base model's states only")

    def slots_needed(self, n: int) -> dict[str, int]:
        need = {"base": n if self.opt.batched else 2 * n}
        need.update({r: n for r in self.backbones})
        return need

    def run_choice(self, ctx: DecodeContext, c: int, seq: Seq, logits) -> Run:
        reg = ctx.resources
        heads = [(reg.heads_for(n, "value"), w) for n, w in self.weights.items() if w]
        betas = torch.tensor([[w for _, w in heads]], dtype=torch.float32)
        gen = ctx.generator(c)
        k = self.opt.top_k
        # backbone-placed heads read their own small model, which follows the answer in step
        vseqs, _ = yield from self.backbone_seqs(ctx, [h for h, _ in heads])
        on_base = any(h.runner == "base" for h, _ in heads)
        while True:
            cands = topk_ids(ctx, logits, k, ctx.choices[c].tokens)
            if self.opt.batched:
                outs = yield [Tree(seq, cands, logits=True, hidden=on_base)] + [
                    Tree(v, cands, logits=False, hidden=True) for v in vseqs.values()]
                ctx.stats.guidance_forwards += 1 + len(vseqs)
                hidden = {"base": outs[0].hidden}
                hidden.update({r: o.hidden for r, o in zip(vseqs, outs[1:])})
                cand_logits = outs[0].logits
            else:
                h_base, cand_logits = yield from self.one_by_one(ctx, seq, cands)
                hidden = {"base": h_base}
            ctx.stats.candidates_scored += len(cands)
            # the heads of every request in this step run as one call per head (HeadEval)
            vals = torch.stack((yield [HeadEval(h.module, (hidden[h.runner],))
                                       for h, _ in heads]))  # [H, k]
            vals = vals - vals.mean(dim=1, keepdim=True)
            out = yield from sample_scored(ctx, logits, gen, cands, vals, ctx.choices[c].tokens,
                                weights=betas, restrict=self.restrict)
            tok = int(out.tokens[0])
            ctx.stats.tokens_generated += 1
            if emit_one(ctx, c, tok, logits, out.logprobs[0]):
                return
            if tok in cands and self.opt.batched:
                i = cands.index(tok)
                for s in (seq, *vseqs.values()):
                    ctx.commit(s, i, tok)
                logits = cand_logits[i]
            else:
                outs = yield [Extend(seq, [tok])] + [Extend(v, [tok], logits="none")
                                                     for v in vseqs.values()]
                logits = outs[0].logits[0]

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
