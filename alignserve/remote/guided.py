"""Head-guided and search strategies over a remote base: ``vas``, ``cd``, ``genarm``, ``deal``.

The remote gives each step's top candidates and their log-probabilities (``max_tokens=1``,
``logprobs=k``, the prompt as token ids); guidance is computed here with the same formulas as
in-process (``alignserve.decoders.vas`` / ``genarm`` / ``deal``) and the same shared helpers
(``topk_ids``, ``sample_scored``, ``score_texts``, the sampler). Value heads and ARMs read a
local backbone (``alignserve.remote.backbone.LocalBackbone``) that is fed the same tokens;
lexical value heads read the answer's token ids only and lexical ARMs the remote's log-probs
only, so with them no local model runs.

Round trips per returned token (each "call" is one HTTP request to the remote, possibly with
several prompts):

* ``vas``, ``cd``: 1 call (the top-k) + 1 local tree forward over the k candidates (in
  sequence: the tree needs the candidates). A VAS token outside the candidates adds one local
  ``Extend``, overlapped with the next call. With lexical value heads only: 1 call, no local
  forward (no backbone needed).
* ``genarm``: 1 call, overlapped with the local ``Extend`` of the previous token (both read the
  same prefix; the ARM needs the hidden state at its last token). With lexical ARMs only: 1
  call, no local forward (no backbone needed).
* ``deal``: per search step (one token on every beam) 2 calls: the top-k of all beams as one
  multi-prompt call, then all expansions' greedy lookaheads as one multi-prompt call; rewards
  local. The answer is only returned once the search ends.

Differences from in-process, all caused by the remote returning only its top log-probabilities
(alignserve and vLLM: 20): VAS samples among the remote's top-20 (tokens beyond it have no
logits here, as with top-k sampling at 20; in-process they keep their logits); GenARM's guided
distribution is the in-process one restricted to and renormalised over the remote's top-20,
with the ARM's base prior read from those log-probabilities; ``alignment.kl_per_token`` is
measured over the same top-20.
"""

from __future__ import annotations

import asyncio
from typing import Any

import torch

from ..decoders.aligned import AlignmentError, finish_state, sample_scored, topk_ids
from ..decoders.deal import emit_best
from ..decoders.genarm import arm_names, increments, mixture
from ..decoders.vas import head_info
from ..engine.output import Detokenizer, TokenInfo
from ..value_models.heads import Head, PrefixMean, head_input
from ..value_models.lexical import is_lexical
from .backbone import LocalBackbone
from .strategies import RemoteCtx, _stops, drive, next_top, sparse_logits


def _tops(ctx: RemoteCtx, top: dict[int, float]) -> list[tuple[int, float]] | None:
    n_top = ctx.params.top_logprobs
    return sorted(top.items(), key=lambda x: -x[1])[:n_top] if n_top else None


async def run_value_guided(ctx: RemoteCtx, dec: Any, backbone: LocalBackbone | None,
                           vocab: int) -> None:
    """VAS / token-wise CD: per token the remote's top-k, their values from the value heads on
    the local backbone's tree forward over the k candidates (``values: "q"``: from the Q-heads
    on the backbone's current state, no tree; lexical value heads: from the token ids, no
    backbone at all, so ``backbone`` may be None when every weighted head is lexical), vals
    centred over the top-k, logits'(a) = logprob(a) + sum_i beta_i vals_i(a) (CD: sampled
    among the k only)."""
    reg = ctx.resources
    use_q = bool(getattr(dec, "q_heads", None))  # values "q": Q-heads on the current state
    named = {n: dec.q_heads[n] if use_q else reg.heads_for(n, "value")
             for n, w in dec.weights.items() if w}
    heads = [(named[n], w) for n, w in dec.weights.items() if w]
    betas = torch.tensor([[w for _, w in heads]], dtype=torch.float32)
    lexical = [is_lexical(h.module) for h, _ in heads]
    ctx.info["values"] = "lexical" if all(lexical) else "q" if use_q else "tree"
    ctx.info.update(head_info(named, q=use_q and not all(lexical)))  # as in-process
    if all(lexical):  # token ids are all they read: no backbone sequence, no prefill
        return await run_lexical(ctx, dec, heads, betas, vocab)
    if backbone is None:  # the client refuses such requests with a 400 first (check_request)
        raise AlignmentError("alignment.weights", "heads that read hidden states need a local "
                             "backbone (--local-backbone DIR)")
    embed = backbone.embed if use_q else None
    k = dec.opt.top_k
    # VAS leaves the other tokens as they are: ask for every top logprob the remote returns
    want = max(k if dec.restrict else ctx.caps.max_logprobs, ctx.params.top_logprobs)
    seqs = await backbone.acquire(ctx.n)
    try:
        states = await backbone.prefill(seqs, ctx.prompt_ids)

        async def one(c: int) -> None:
            seq, gen, done = seqs[c], ctx.generator(c), []
            state = states[c:c + 1].float().cpu()  # [1, D] the backbone's current state
            # heads with pool="mean" also read the mean of the answer's states so far
            pool = PrefixMean.for_heads(state, [h.module for h, _ in heads])
            behind: int | None = None  # a sampled token the backbone has not read yet
            while True:
                if behind is None:
                    top = await next_top(ctx, done, want)
                else:
                    top, state = await asyncio.gather(next_top(ctx, done, want),
                                                      backbone.extend(seq, behind))
                    state = state.float().cpu()
                    behind = None
                    if pool is not None:
                        pool.add(state[-1])
                if not top:
                    ctx.finish(c, "stop")
                    return
                logits = sparse_logits(top, vocab)
                cands = topk_ids(ctx, logits, k, done)
                ctx.stats.candidates_scored += len(cands)
                if use_q:
                    ids = torch.tensor(cands, device=embed.device)  # type: ignore[union-attr]
                    rows = embed[ids].float().cpu()[None]  # type: ignore[index]  # [1, k, D]
                    vals = torch.stack([
                        h.module.candidate_values(done, cands).cpu() if lex else
                        h.module(head_input(h.module, state, pool, False), rows)[0]
                        for (h, _), lex in zip(heads, lexical)])  # [H, k]
                else:
                    hidden = (await backbone.tree_hidden(seq, cands)).float().cpu()
                    ctx.stats.guidance_forwards += 1
                    vals = torch.stack([
                        h.module.candidate_values(done, cands).cpu() if lex else
                        h.module(head_input(h.module, hidden, pool, True))
                        for (h, _), lex in zip(heads, lexical)])  # [H, k]
                tok = emit_scored(ctx, c, dec, top, logits, gen, cands, vals, done, betas)
                if tok is None:
                    return
                if tok in cands and not use_q:
                    await backbone.commit(seq, cands.index(tok), tok)
                    if pool is not None:
                        pool.add(hidden[cands.index(tok)])
                else:
                    behind = tok

        await asyncio.gather(*(one(c) for c in range(ctx.n)))
    finally:
        backbone.release(seqs)


async def run_lexical(ctx: RemoteCtx, dec: Any, heads: list[tuple[Head, float]],
                      betas: torch.Tensor, vocab: int) -> None:
    """VAS / CD whose weighted heads are all lexical: per token the remote's top-k and each
    candidate's exact value from the token ids of the answer so far; no local model runs."""
    want = max(dec.opt.top_k if dec.restrict else ctx.caps.max_logprobs,
               ctx.params.top_logprobs)

    async def one(c: int) -> None:
        gen, done = ctx.generator(c), []
        while True:
            top = await next_top(ctx, done, want)
            if not top:
                ctx.finish(c, "stop")
                return
            logits = sparse_logits(top, vocab)
            cands = topk_ids(ctx, logits, dec.opt.top_k, done)
            ctx.stats.candidates_scored += len(cands)
            vals = torch.stack([h.module.candidate_values(done, cands).cpu()
                                for h, _ in heads])  # [H, k]
            if emit_scored(ctx, c, dec, top, logits, gen, cands, vals, done, betas) is None:
                return

    await asyncio.gather(*(one(c) for c in range(ctx.n)))


def emit_scored(ctx: RemoteCtx, c: int, dec: Any, top: dict, logits: torch.Tensor, gen: Any,
                cands: list[int], vals: torch.Tensor, done: list[int],
                betas: torch.Tensor) -> int | None:
    """Centre the [H, k] candidate values, sample with the beta-weighted shifts (CD: among the
    candidates only), emit the token for choice ``c`` and append it to ``done``; returns the
    token, or None once the choice has finished."""
    vals = vals - vals.mean(dim=1, keepdim=True)
    out = drive(sample_scored(ctx, logits, gen, cands, vals, done, weights=betas,
                              restrict=dec.restrict))
    tok = int(out.tokens[0])
    ctx.stats.tokens_generated += 1
    if ctx.emit(c, tok, top.get(tok), _tops(ctx, top), float(out.logprobs[0])):
        return None
    done.append(tok)
    return tok


async def run_genarm(ctx: RemoteCtx, dec: Any, backbone: LocalBackbone | None,
                     vocab: int) -> None:
    """GenARM over the remote's top-k (k = the most top logprobs it returns): with base
    log-probs b(a) renormalised over the k and each ARM's log pi_r(a) = log_softmax over the k
    of (s * b(a) + E_a (B (A h))) (h: the local backbone's hidden state at the prefix's last
    token), sample (b + sum_i alpha_i log pi_r_i) / (1 + sum_i alpha_i) (``normalize``; else
    not divided). A lexical ARM's log pi_r is log_softmax(b(a) + bias_a) and enters as alpha *
    (log pi_r - b), its bias up to a constant (``decoders.genarm.mixture``); with only lexical
    ARMs no local model runs, so
    ``backbone`` may be None."""
    reg = ctx.resources
    arms = [(reg.heads_for(n, "arm"), w) for n, w in dec.weights.items() if w]
    ctx.info["arms"] = arm_names(dec.weights, [h for h, _ in arms])  # as in-process
    alphas = torch.tensor([w for _, w in arms], dtype=torch.float32)
    inc = torch.tensor(increments([h for h, _ in arms]))
    states = any(h.runner != "tokens" for h, _ in arms)  # lexical ARMs read logprobs only
    if states and backbone is None:  # the client refuses it with a 400 first (check_request)
        raise AlignmentError("alignment.weights", "ARMs that read hidden states need a local "
                             "backbone (--local-backbone DIR)")
    local = backbone if states else None  # the local model the ARMs read, if any
    embed = local.embed.detach().float().cpu() if local else None
    k = max(ctx.caps.max_logprobs, ctx.params.top_logprobs)
    seqs = await local.acquire(ctx.n) if local else []
    try:
        hidden0 = (await local.prefill(seqs, ctx.prompt_ids)).float().cpu() if local else None

        def arm_row(head: Head, lp: torch.Tensor, ids: list[int], h: Any,
                    pool: PrefixMean | None, done: list[int]) -> torch.Tensor:
            if head.runner == "tokens":  # LexicalARM: a per-token bias on the base
                return torch.log_softmax(lp + head.module.bias_at(done, ids), -1)
            assert embed is not None
            emb = embed[torch.tensor(ids)]  # [k, D]
            return torch.log_softmax(head.module.base_scale * lp + head.module.delta(
                head_input(head.module, h, pool, False), emb)[0], -1)

        async def one(c: int) -> None:
            gen, done = ctx.generator(c), []
            h = hidden0[c:c + 1] if hidden0 is not None else None
            pool = PrefixMean.for_heads(h, [hd.module for hd, _ in arms]) \
                if h is not None else None
            top = await next_top(ctx, done, k)
            while True:
                if not top:
                    ctx.finish(c, "stop")
                    return
                ids = list(top)
                lp = torch.tensor([top[i] for i in ids], dtype=torch.float32)
                base = torch.log_softmax(lp, -1)
                arm = torch.stack([arm_row(head, lp, ids, h, pool, done) for head, _ in arms])
                ctx.stats.guidance_forwards += int(local is not None)  # lexical: no forward
                guided = mixture(base, arm, alphas, dec.opt.normalize, inc)
                dec.track_kl(ctx, guided, base)
                full = torch.full((vocab,), float("-inf"))
                full[torch.tensor(ids)] = guided
                out = drive(ctx.sample(full[None], [gen], [done]))
                tok = int(out.tokens[0])
                ctx.stats.tokens_generated += 1
                if ctx.emit(c, tok, top.get(tok), _tops(ctx, top), float(out.logprobs[0])):
                    return
                done.append(tok)
                if h is None:
                    top = await next_top(ctx, done, k)
                    continue
                assert local is not None
                top, hn = await asyncio.gather(next_top(ctx, done, k), local.extend(seqs[c], tok))
                h = hn.float().cpu()
                if pool is not None:
                    pool.add(h[-1])

        await asyncio.gather(*(one(c) for c in range(ctx.n)))
    finally:
        if local is not None:
            local.release(seqs)


async def run_deal(ctx: RemoteCtx, dec: Any, vocab: int) -> None:
    """DeAL: a frontier of ``beams`` answers; each step expands every beam with its ``top_k``
    next tokens (the remote's top logprobs), rolls every expansion out greedily for
    ``lookahead`` tokens on the remote, scores prefix + lookahead locally, keeps the best
    ``beams``; finished expansions join the complete set; the best complete answer is returned.
    """
    o = dec.opt
    det = Detokenizer(ctx.tokenizer)

    async def one(c: int) -> None:
        beams = [finish_state(ctx)]
        complete: list[tuple[float, Any]] = []
        while beams:
            groups = await ctx.complete([ctx.prompt_ids + b.tokens for b in beams], top=o.top_k,
                                        max_tokens=1, temperature=0.0)
            states = []
            for parent, [ch] in zip(beams, groups):
                top = ch.tops[0] if ch.tops else {}
                if not top:  # the remote offers nothing after this beam: it ends here
                    st = finish_state(ctx)
                    st.tokens, st.infos = list(parent.tokens), list(parent.infos)
                    det.finish(st, "stop")
                    states.append(st)
                    continue
                for a in topk_ids(ctx, sparse_logits(top, vocab), o.top_k, parent.tokens):
                    st = finish_state(ctx)  # the expansion token goes through the stop rules
                    st.tokens, st.infos = list(parent.tokens), list(parent.infos)
                    det.push(st, TokenInfo(a, top.get(a)))
                    states.append(st)
            ends = [st.finished for st in states]
            room = {j: min(o.lookahead, ctx.params.max_tokens - len(st.tokens))
                    for j, st in enumerate(states) if not st.finished}
            todo = [j for j, r in room.items() if r > 0]
            rolls: dict[int, Any] = {}
            if todo:
                outs = await ctx.complete([ctx.prompt_ids + states[j].tokens for j in todo],
                                          top=0, max_tokens=max(room[j] for j in todo),
                                          temperature=0.0, **_stops(ctx))
                rolls = {j: g[0] for j, g in zip(todo, outs)}
            texts = []
            for j, st in enumerate(states):
                if st.finished:
                    texts.append(st.text)
                    continue
                r = rolls.get(j)
                look = ctx.replay(st.tokens, r.ids if r else [], r.finish_reason if r else None,
                                  max_tokens=len(st.tokens) + room[j])
                ctx.stats.tokens_generated += len(look.tokens) - len(st.tokens)
                texts.append(look.text)
            scores, _ = await ctx.score(dec, texts)
            ctx.stats.candidates_scored += len(states)
            ctx.stats.tokens_generated += len(states)
            nxt = []
            for j in sorted(range(len(states)), key=lambda j: -scores[j]):
                if ends[j]:
                    if len(complete) < o.beams:
                        complete.append((float(scores[j]), states[j]))
                elif len(nxt) < o.beams - len(complete):
                    nxt.append(states[j])
            beams = nxt
        emit_best(ctx, c, complete)

    await asyncio.gather(*(one(c) for c in range(ctx.n)))
