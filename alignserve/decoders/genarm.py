"""GenARM (Xu et al.): (log p_base + sum a_i log pi_r_i) / (1 + sum a_i), + a_j * bias_j (lexical).

Each autoregressive reward model (ARM) here is a low-rank adapter on the base model's own
hidden state (``value_models.heads.ARMHead``), so the guidance costs one small matmul per step,
no extra transformer forward; or a lexical ARM (``value_models.lexical.LexicalARM``), a
per-token logit bias learned from the reward's per-token feature, which costs a vector add.

Normalisation (default ``normalize: true``, the reference code's choice): the guided logits are
``(log pi_base + sum_i alpha_i log pi_r_i) / (1 + sum_i alpha_i)``, a geometric mixture of the
base and the ARMs that keeps the base's sharpness. An ARM that equals the base then gives the
base exactly at every alpha, so any change is guidance, not a temperature drop.

A lexical ARM (``LexicalARM``) has no prior scale to discount the base's likelihood, so its
reward reads its bias b: a per-token reward sum_t b(y_t) (``reward_form`` "token", the shipped
ones) or the increment over the base, sum_t log pi_r - log p_base ("increment"). Either way it
enters as ``alpha (log pi_r - log pi_base) = alpha * b + const`` added after the
normalisation: the base at its own temperature with a per-token logit bias, a myopic
token-level form of sampling from p_base * exp(alpha r). A positional lexical ARM's bias also
depends on the answer so far (its word count, say), which ``LexicalARM.context_delta`` adds
per step.

Weights must be >= 0: an ARM's weight range starts at 0 (``Head.info``), so a negative one is a
400. A negative weight does not steer away: an ARM's log-probs contain the base's, so a negative
weight subtracts the base from itself (entirely at alpha = -1, where the normalised formula
also divides by 0), leaving the ARM's untrained tail (it is trained on the base's top-64
tokens only); the samples were noise. To steer away from a reward, use a negative weight with
VAS / CD (value heads) or Best-of-N / ARGS (rewards). ``normalize: false``
samples ``log pi_base + sum_i alpha_i log pi_r_i`` unscaled (the paper's formula read literally):
with an ARM close to the base that is about ``(1 + alpha) log pi_base``, i.e. sampling at
temperature / (1 + alpha), which lowers diversity and inflates KL without steering. Either way
alpha = 0 is the base model exactly. The response's ``alignment.kl_per_token`` is the mean
KL(guided || base) in nats per emitted token, over the full distributions before temperature and
top-p.
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..engine.context import DecodeContext
from ..engine.primitives import Extend, HeadEval, Seq
from ..value_models.heads import PrefixMean, head_input
from .aligned import AlignedDecoder, CommonOptions, emit_one
from .base import Run


def mixture(base: torch.Tensor, arms: torch.Tensor, alphas: torch.Tensor,
            normalize: bool, increment: torch.Tensor | None = None) -> torch.Tensor:
    """Guided log-weights from ``base`` [..., V] base log-probs, ``arms`` [..., H, V] ARM
    log-probs and weights ``alphas`` [H] (>= 0, on ``base``'s device): ``(base + sum_i
    alpha_i arm_i) / (1 + sum_i alpha_i)`` with ``normalize``, else the unscaled numerator.

    ARMs flagged in ``increment`` [H] (bool; lexical ARMs, whose log pi_r - log p_base is their
    per-token bias up to a constant) add ``alpha_j (arm_j - base)`` outside the normalisation:
    the base at its own temperature with a logit bias."""
    inc = increment if increment is not None else torch.zeros_like(alphas, dtype=torch.bool)
    full = alphas.masked_fill(inc, 0.0)
    guided = base + (full[:, None] * arms).sum(-2)
    if normalize:
        guided = guided / (1.0 + full.sum())
    if bool(inc.any()):
        guided = guided + (alphas.masked_fill(~inc, 0.0)[:, None]
                           * (arms - base.unsqueeze(-2))).sum(-2)
    return guided


def arm_names(weights: dict[str, float], heads: list) -> dict[str, str]:  # type: ignore[type-arg]
    """The response's ``alignment.arms``: the ARM each non-zero weight read (a reward name
    resolves to ``<reward>_arm``, or to its lexical ARM where only that is loaded)."""
    return {n: h.name for n, h in zip([n for n, w in weights.items() if w], heads)}


def increments(heads: list) -> list[bool]:  # type: ignore[type-arg]
    """Per head: is it added as ``alpha (log pi_r - log p_base)``, outside the normalisation (a
    ``LexicalARM``: a per-token logit bias on the base)?"""
    return [bool(getattr(h.module, "increment", False)) for h in heads]


class GenArmOptions(CommonOptions):
    normalize: bool = Field(True, description="divide guided logits by (1 + sum alpha), the "
                            "reference normalisation that keeps the base's sharpness; false = "
                            "unscaled sum (sharpens like a temperature drop as alpha grows). "
                            "A lexical ARM's alpha * bias is added outside the division "
                            "either way, so with lexical ARMs only both give the same samples")


class GenArm(AlignedDecoder):
    name = "genarm"
    Options = GenArmOptions
    head_kind = "arm"

    def run_choice(self, ctx: DecodeContext, c: int, seq: Seq, logits) -> Run:
        reg = ctx.resources
        arms = [(reg.heads_for(n, "arm"), w) for n, w in self.weights.items() if w]
        ctx.info["arms"] = arm_names(self.weights, [h for h, _ in arms])
        embed = ctx.runners["base"].model.head_weight
        alphas = torch.tensor([[w for _, w in arms]], dtype=torch.float32, device=logits.device)
        inc = torch.tensor(increments([h for h, _ in arms]), device=logits.device)
        states = any(h.runner != "tokens" for h, _ in arms)  # an ARM that reads hidden states
        gen = ctx.generator(c)
        vseqs, hidden = yield from self.backbone_seqs(ctx, [h for h, _ in arms])
        # ARMs with pool="mean" also read the mean of the answer's states so far
        pool = PrefixMean.for_heads(ctx.prompt_hidden, [h.module for h, _ in arms])
        while True:
            # every request's ARMs of this step run as one call per head (HeadEval)
            dense = torch.stack([o[0] for o in (yield [
                self.arm_op(h, hidden, logits, embed, pool, ctx.choices[c].tokens)
                for h, _ in arms])])[None]  # [1,H,V]
            ctx.stats.guidance_forwards += int(states)  # a lexical ARM runs no forward
            base = torch.log_softmax(logits.float(), -1)[None]
            guided = mixture(base, dense, alphas[0], self.opt.normalize, inc)
            if self.opt.normalize:
                out = yield from ctx.sample(guided, [gen], [ctx.choices[c].tokens])
            else:  # the fused kernel adds sum_i alpha_i dense_i to the base
                if bool(inc.any()):
                    dense = torch.where(inc[None, :, None], dense - base[:, None], dense)
                out = yield from ctx.sample(base, [gen], [ctx.choices[c].tokens], weights=alphas,
                                            dense=dense)
            self.track_kl(ctx, guided[0], base[0])
            tok = int(out.tokens[0])
            ctx.stats.tokens_generated += 1
            if emit_one(ctx, c, tok, logits, out.logprobs[0]):
                return
            outs = yield [Extend(seq, [tok], hidden=True)] + [
                Extend(v, [tok], logits="none", hidden=True) for v in vseqs.values()]
            logits = outs[0].logits[0]
            hidden = {"base": outs[0].hidden, **{r: o.hidden for r, o in zip(vseqs, outs[1:])}}
            if pool is not None:
                pool.add(outs[0].hidden[-1])

    def plain_info(self, info: dict, n: int) -> None:
        info["kl_per_token"] = 0.0  # all alphas 0: the guided distribution is the base's
        info["arms"] = {}  # no ARM read

    def track_kl(self, ctx: DecodeContext, guided: torch.Tensor, base: torch.Tensor) -> None:
        """Add KL(softmax(guided) || base) (nats; [V] logits and base log-probs) to the running
        mean ``ctx.info['kl_per_token']`` over the request's emitted tokens (all choices)."""
        lg = torch.log_softmax(guided.float(), -1)
        kl = float((lg.exp() * (lg - base.float())).sum())
        self._kl = getattr(self, "_kl", (0.0, 0))
        total, n = self._kl[0] + kl, self._kl[1] + 1
        self._kl = (total, n)
        ctx.info["kl_per_token"] = round(total / n, 5)

    @staticmethod
    def arm_op(head, hidden: dict, base_logits, embed,  # type: ignore[no-untyped-def]
               pool: PrefixMean | None = None, history: list[int] | None = None) -> HeadEval:
        """The op whose result is log pi_r over the vocabulary, [1, V]. A base-placed ARM
        adapts the base logits; a backbone ARM is its own small LM: the backbone's early-exit
        logits h_L E^T plus its adapter. A pooled ARM's adapter reads ``pool``'s features. A
        lexical ARM (``LexicalARM``) reads the base logits only: a per-token bias on them,
        changed where a token would complete a lexicon word after the answer so far
        (``history``)."""
        if head.runner == "tokens":
            delta = head.module.context_delta(history or [], base_logits.shape[-1])
            return HeadEval(head.module, (base_logits[None], delta.to(base_logits.device)[None]),
                            "logprobs")
        h = hidden[head.runner]
        prior = base_logits[None] if head.runner == "base" else h.float() @ embed.float().T
        return HeadEval(head.module, (head_input(head.module, h, pool, False), prior),
                        "logprobs", (embed,))
