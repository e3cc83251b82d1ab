"""GenARM (Xu et al. 2025): decode with log pi_base + sum_i alpha_i log pi_r_i.

Each autoregressive reward model (ARM) here is a low-rank adapter on the base model's own
hidden state (``value_models.heads.ARMHead``), so the guidance costs one small matmul per step,
no extra transformer forward. Normalisation: by default the guided logits are
``log_softmax(l) + sum_i alpha_i log pi_r_i`` sampled at the request's temperature (alpha = 0
is the base model exactly). With ``normalize: true`` they are divided by (1 + sum alpha), the
reference code's choice, which keeps the distribution's sharpness comparable as alpha grows.
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..engine.context import DecodeContext
from ..engine.primitives import Extend, Seq
from .aligned import AlignedDecoder, CommonOptions, emit_one
from .base import Run


class GenArmOptions(CommonOptions):
    normalize: bool = Field(False, description="divide guided logits by (1 + sum alpha)")


class GenArm(AlignedDecoder):
    name = "genarm"
    Options = GenArmOptions
    head_kind = "arm"

    def run_choice(self, ctx: DecodeContext, c: int, seq: Seq, logits) -> Run:
        reg = ctx.resources
        arms = [(reg.heads_for(n, "arm"), w) for n, w in self.weights.items() if w]
        alphas = torch.tensor([[w for _, w in arms]], dtype=torch.float32)
        embed = ctx.runners["base"].model.head_weight
        gen = ctx.generator(c)
        scale = 1.0 + float(alphas.sum()) if self.opt.normalize else 1.0
        vseqs, hidden = yield from self.backbone_seqs(ctx, [h for h, _ in arms])
        while True:
            dense = torch.stack([self.arm_logprobs(h, hidden, logits, embed)
                                 for h, _ in arms])[None]  # [1, H, V]
            ctx.stats.guidance_forwards += 1
            base = torch.log_softmax(logits.float(), -1)[None]
            if self.opt.normalize:
                guided = (base + (alphas[:, :, None] * dense).sum(1)) / scale
                out = yield from ctx.sample(guided, [gen], [ctx.choices[c].tokens])
            else:
                out = yield from ctx.sample(base, [gen], [ctx.choices[c].tokens], weights=alphas,
                                 dense=dense)
            tok = int(out.tokens[0])
            ctx.stats.tokens_generated += 1
            if emit_one(ctx, c, tok, logits, out.logprobs[0]):
                return
            outs = yield [Extend(seq, [tok], hidden=True)] + [
                Extend(v, [tok], logits="none", hidden=True) for v in vseqs.values()]
            logits = outs[0].logits[0]
            hidden = {"base": outs[0].hidden, **{r: o.hidden for r, o in zip(vseqs, outs[1:])}}

    @staticmethod
    def arm_logprobs(head, hidden: dict, base_logits, embed):  # type: ignore[no-untyped-def]
        """log pi_r over the vocabulary. A base-placed ARM adapts the base logits; a backbone
        ARM is its own small LM: the backbone's early-exit logits h_L E^T plus its adapter."""
        h = hidden[head.runner]
        prior = base_logits[None] if head.runner == "base" else h.float() @ embed.float().T
        return head.module.logprobs(h, prior, embed)[0]
