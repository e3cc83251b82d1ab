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

Values (``values``): ``"tree"`` is the exact V([x, y<t, a]) of each candidate from the tree
forward above; ``"q"`` reads them from a Q-head (``value_models.heads.QHead``), which predicts
V([x, y<t, a]) - V([x, y<t]) for every token from the current state alone, so a guided token
costs one ordinary one-token forward plus a [k, D] product, like plain decoding. ``"auto"`` uses
Q-heads when every weighted reward has one on the base and ``batched`` is true, else the tree.
The default is ``"tree"``: on the shipped heads the Q-head's values steer less per unit of KL
than the exact ones (README, frontier table), so the cheap mode is opt-in. Both are in reward
standard deviations, so beta means the same either way.

Lexical value heads (``value_models/lexical.py``, placement ``"tokens"``) value each candidate
exactly from the answer's token ids, with no forward: when every weighted head is lexical, the
request takes the one-forward-per-token path whatever ``values`` says (reported as
``"lexical"``); mixed with state heads, their values join the tree's or the Q-heads'.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from ..engine.context import DecodeContext
from ..engine.primitives import Extend, HeadEval, Seq, Tree
from ..value_models.heads import Head, PrefixMean, head_input
from ..value_models.lexical import is_lexical
from .aligned import (
    AlignedDecoder,
    AlignmentError,
    CommonOptions,
    emit_one,
    sample_scored,
    topk_ids,
)
from .base import Run


def head_info(heads: Mapping[str, Head], q: bool) -> dict[str, dict[str, str]]:
    """What the response's ``info`` says each weight read: with ``q`` (values='q'),
    ``q_heads`` names the Q-head read for each weighted reward or head; ``lexical_heads`` the
    lexical value heads valued from token ids ({} if none), whatever the values mode."""
    info = {"q_heads": {n: h.name for n, h in heads.items() if not is_lexical(h.module)}} \
        if q else {}
    info["lexical_heads"] = {n: h.name for n, h in heads.items() if is_lexical(h.module)}
    return info


def distilled_from(registry, value):  # type: ignore[no-untyped-def]
    """The Q-head trained on ``value``'s V, or None. Its manifest records the value head's
    weights hash (``training.value_head_sha256``; older manifests: its folder, matched by
    name), so a Q-head is never paired with another value head of the same reward, whose units
    and advantages it does not share."""
    for h in registry.heads.values():
        tr = h.manifest.get("training") or {}
        if h.kind != "q":
            continue
        sha, src = tr.get("value_head_sha256"), tr.get("value_head")
        if sha and sha == value.weights_sha256 or not sha and src and Path(src).name == value.name:
            return h
    return None


class VasOptions(CommonOptions):
    top_k: int = Field(20, ge=1, le=64, description="candidates valued per token (published 20)")
    batched: bool = Field(True, description="false = the reference code's way, one forward per "
                          "candidate on a copied cache (for benchmarks only)")
    values: Literal["auto", "tree", "q"] = Field(
        "tree", description="candidate values: 'tree' = exact V of each candidate from a "
        "k-token tree forward; 'q' = a Q-head's values from the current state (no extra "
        "forward); 'auto' = 'q' when every weighted reward has a Q-head, else 'tree' "
        "(default 'tree'). Lexical value heads (placement 'tokens') value candidates from "
        "token ids whatever this says; with only those the response reports 'lexical'")


class Vas(AlignedDecoder):
    name = "vas"
    Options = VasOptions
    head_kind = "value"
    slot_formula = "n per model it reads (2 x n on the base with batched=false)"
    restrict = False  # VAS leaves non-candidates as they are; CD samples among candidates only

    q_heads: dict = {}

    def bind(self, registry) -> None:  # type: ignore[no-untyped-def]
        super().bind(registry)
        if self.backbones and not self.opt.batched:
            raise AlignmentError("alignment.batched", "batched=false (the benchmark baseline) "
                                 "supports heads on the base model's states only")
        self.q_heads = {}
        if registry is None or self.plain:
            return
        weighted = {n: registry.heads_for(n, "value") for n, w in self.weights.items() if w}
        if all(h.runner == "tokens" for h in weighted.values()):
            # lexical heads value every candidate from token ids: no tree, no Q-head needed
            # (and nothing for batched=false's per-candidate forwards to do)
            self.q_heads = weighted
            return
        if self.opt.values == "tree":
            return
        if self.opt.values == "q" and not self.opt.batched:
            raise AlignmentError("alignment.values", "values='q' needs no candidate forwards; "
                                 "batched=false applies to values='tree' only")
        found, missing = {}, []
        for name, w in self.weights.items():
            if not w:
                continue
            value = registry.heads_for(name, "value")
            q = value if value.runner == "tokens" else distilled_from(registry, value)
            if q is None or value.runner not in ("base", "tokens"):
                missing.append(name)
            else:
                found[name] = q
        if missing and self.opt.values == "q":
            have = sorted(h.name for h in registry.heads.values() if h.kind == "q")
            raise AlignmentError("alignment.values", f"values='q' needs a Q-head distilled "
                                 f"from the value head of {missing} (alignserve train q "
                                 f"--value-head DIR); loaded Q-heads: {have}")
        if not missing and self.opt.batched:
            self.q_heads = found

    def plain_info(self, info: dict, n: int) -> None:
        info["values"] = "none"  # all weights 0: no candidate was valued
        if self.opt.values == "q":  # the key a values='q' run reports; no Q-head was read
            info["q_heads"] = {}
        info["lexical_heads"] = {}  # nor any lexical head

    def slots_needed(self, n: int) -> dict[str, int]:
        if self.q_heads:
            return {"base": n}
        need = {"base": n if self.opt.batched else 2 * n}
        need.update({r: n for r in self.backbones})
        return need

    def run_choice(self, ctx: DecodeContext, c: int, seq: Seq, logits) -> Run:
        if self.q_heads:
            return (yield from self.run_choice_q(ctx, c, seq, logits))
        ctx.info["values"] = "tree"
        reg = ctx.resources
        named = {n: reg.heads_for(n, "value") for n, w in self.weights.items() if w}
        ctx.info.update(head_info(named, q=False))
        heads = [(named[n], w) for n, w in self.weights.items() if w]
        betas = torch.tensor([[w for _, w in heads]], dtype=torch.float32)
        gen = ctx.generator(c)
        k = self.opt.top_k
        # backbone-placed heads read their own small model, which follows the answer in step
        vseqs, _ = yield from self.backbone_seqs(ctx, [h for h, _ in heads])
        on_base = any(h.runner == "base" for h, _ in heads)
        # heads with pool="mean" also read the mean of the answer's states so far
        pool = PrefixMean.for_heads(ctx.prompt_hidden, [h.module for h, _ in heads])
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
            # the heads of every request in this step run as one call per head (HeadEval)
            vals = torch.stack((yield [
                HeadEval(h.module, (h.module.candidate_inputs(ctx.choices[c].tokens, cands,
                                                         logits.device),))
                if is_lexical(h.module) else
                HeadEval(h.module, (head_input(h.module, hidden[h.runner], pool, True),))
                for h, _ in heads]))  # [H, k]
            tok, done = yield from self.pick(ctx, c, logits, gen, cands, vals, betas)
            if done:
                return
            if tok in cands and self.opt.batched:
                i = cands.index(tok)
                for s in (seq, *vseqs.values()):
                    ctx.commit(s, i, tok)
                logits = cand_logits[i]
                if pool is not None:
                    pool.add(hidden["base"][i])
            else:
                outs = yield [Extend(seq, [tok], hidden=pool is not None)] + [
                    Extend(v, [tok], logits="none") for v in vseqs.values()]
                logits = outs[0].logits[0]
                if pool is not None:
                    pool.add(outs[0].hidden[-1])

    def run_choice_q(self, ctx: DecodeContext, c: int, seq: Seq, logits) -> Run:
        """Values from Q-heads on the current state: one one-token forward per token."""
        heads = [(self.q_heads[n], w) for n, w in self.weights.items() if w]
        lexical = [is_lexical(h.module) for h, _ in heads]
        if all(lexical):  # exact values from token ids alone (value_models/lexical.py)
            ctx.info["values"] = "lexical"
            ctx.info.update(head_info(self.q_heads, q=False))
        else:
            ctx.info["values"] = "q"
            ctx.info.update(head_info(self.q_heads, q=True))
        betas = torch.tensor([[w for _, w in heads]], dtype=torch.float32)
        embed = ctx.runners["base"].model.head_weight
        gen = ctx.generator(c)
        hidden = ctx.prompt_hidden[None]  # [1, D] state of the prefix
        pool = PrefixMean.for_heads(hidden, [h.module for h, _ in heads])
        while True:
            history = ctx.choices[c].tokens
            cands = topk_ids(ctx, logits, self.opt.top_k, history)
            rows = None if all(lexical) else embed[torch.tensor(cands, device=embed.device)][None]
            outs = yield [  # Q-heads: [1, k] each; lexical value heads: [k]
                HeadEval(h.module, (h.module.candidate_inputs(history, cands, logits.device),))
                if lex else
                HeadEval(h.module, (head_input(h.module, hidden, pool, False), rows))
                for (h, _), lex in zip(heads, lexical)]
            vals = torch.stack([o if lex else o[0] for o, lex in zip(outs, lexical)])
            vals = vals.float().cpu()  # [H, k]
            tok, done = yield from self.pick(ctx, c, logits, gen, cands, vals, betas)
            if done:
                return
            [o] = yield [Extend(seq, [tok], hidden=not all(lexical))]
            logits, hidden = o.logits[0], o.hidden
            if pool is not None:
                pool.add(hidden[-1])

    def pick(self, ctx: DecodeContext, c: int, logits, gen, cands: list[int], vals,
             betas) -> Run:
        """Centre the [H, k] values over the candidates, sample with beta-weighted shifts and
        emit; returns (token, whether choice ``c`` is finished)."""
        ctx.stats.candidates_scored += len(cands)
        vals = vals - vals.mean(dim=1, keepdim=True)
        out = yield from sample_scored(ctx, logits, gen, cands, vals, ctx.choices[c].tokens,
                                       weights=betas, restrict=self.restrict)
        tok = int(out.tokens[0])
        ctx.stats.tokens_generated += 1
        return tok, emit_one(ctx, c, tok, logits, out.logprobs[0])  # type: ignore[return-value]

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
