"""Shared machinery of the alignment strategies: options, objectives, scoring, rollouts.

Every aligned strategy accepts ``weights`` ({objective name: weight}, the sliders) in the
request's ``alignment`` object, plus its own parameters, each validated with its published
default and allowed range. ``transform`` is accepted by the strategies that rank alternative
answers to one prompt (best_of_n, cd_block) and ``reward_options`` (per reward options such as
``{"concise": {"target_words": 20}}``) by the reward-scored ones (not vas, cd, genarm);
``AlignedDecoder.refused_common`` lists what a strategy refuses. A request whose weights are all
zero runs plain sampling exactly (same seed, same tokens), because it *is* plain sampling.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor

from ..engine.context import DecodeContext
from ..engine.output import ChoiceState, Detokenizer, TokenInfo
from ..engine.primitives import Extend, Score, Seq
from .base import Decoder, Run, decode_rows, emit_rows, parallel, prefill


class AlignmentError(ValueError):
    """An invalid ``alignment`` field; ``field`` is the dotted path reported in the 400."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class CommonOptions(BaseModel):
    """Fields every aligned strategy takes; subclasses add their own. Strict types, as
    ``/v1/heads`` publishes them: a weight is a JSON number (integers accepted), a count an
    integer, a flag a boolean; ``"1"``, ``true`` or ``null`` for a number is refused."""

    model_config = ConfigDict(extra="forbid", strict=True)
    weights: dict[str, float] = Field(default_factory=dict)
    transform: str = Field("identity", pattern="^(identity|log_sigmoid|quantile)$")
    reward_options: dict[str, dict[str, Any]] = Field(default_factory=dict)


class AlignedDecoder(Decoder):
    """Base of every aligned strategy. Subclasses define ``Options`` and ``run_choice``."""

    Options: ClassVar[type[CommonOptions]] = CommonOptions
    head_kind: ClassVar[str | None] = None  # "value"/"arm" when weights name heads, else rewards
    # scores whole alternative answers to one prompt, which log-sigmoid / quantile transforms
    # use as their per-prompt reference (best_of_n, cd_block); others refuse a transform
    ranks_alternatives: ClassVar[bool] = False
    slot_formula = "n per model it reads (the base and each head backbone)"

    @classmethod
    def refused_common(cls) -> tuple[str, ...]:
        """Common fields this strategy refuses (a 400 unless left at their default), so
        ``/v1/heads`` does not list them: ``transform`` without a set of alternative answers,
        ``reward_options`` when guided by trained heads."""
        return (*(() if cls.ranks_alternatives else ("transform",)),
                *(() if cls.head_kind is None else ("reward_options",)))

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        opts = dict(options or {})
        self.prompt_lp = bool(opts.pop("prompt_logprobs", False))
        try:
            self.opt = self.Options(**opts)
        except ValidationError as exc:
            e = exc.errors()[0]
            loc = ".".join(str(x) for x in e["loc"])
            raise AlignmentError(f"alignment.{loc}",
                                 f"invalid alignment.{loc}: {e['msg']}") from None
        super().__init__(opts)
        self.weights = {k: float(v) for k, v in self.opt.weights.items()}
        if self.opt.transform != "identity" and not self.ranks_alternatives:
            raise AlignmentError("alignment.transform", f"transform {self.opt.transform!r} "
                                 "needs a set of alternative answers to one prompt as its "
                                 "reference; only best_of_n and cd_block have one")
        if self.opt.reward_options and self.head_kind is not None:
            raise AlignmentError("alignment.reward_options", f"{self.name} is guided by "
                                 f"trained {self.head_kind} heads, whose reward options were "
                                 "fixed at training; use a reward-scored strategy (args, "
                                 "best_of_n, cd_block, deal, transfer_qstar) to set them")

    # ---- validation against what the server has loaded ---------------------------------------
    def bind(self, registry: Any) -> None:
        """Check weights and reward options against the registry (called before submission)."""
        from ..value_models.compose import validate_weights

        if registry is None:
            if any(self.weights.values()):
                raise AlignmentError("alignment.weights", "no rewards are loaded on this server")
            return
        infos = registry.infos()
        if self.head_kind is not None:  # weights name rewards with a trained head, or heads
            avail, named = {}, {}
            for name in self.weights:
                head = registry.heads_for(name, self.head_kind)
                if head is not None and head.name in named:  # e.g. sentiment + sentiment_value
                    raise AlignmentError(f"alignment.weights.{name}",
                                         f"{name!r} and {named[head.name]!r} both name the "
                                         f"{self.head_kind} head {head.name!r}; weight it once "
                                         f"(its range applies to the sum)")
                if head is not None:
                    named[head.name] = name
                if head is None:
                    kinds = sorted(h.name for h in registry.heads.values()
                                   if h.kind == self.head_kind)
                    other = registry.heads.get(name)
                    hint = "" if other is None else self._other_kind_hint(registry, other)
                    note = getattr(registry, "note", None)  # e.g. why heads were left out
                    raise AlignmentError(f"alignment.weights.{name}",
                                         f"no {self.head_kind} head for {name!r}; available: "
                                         f"{kinds}{hint}" + (f" ({note})" if note else ""))
                avail[name] = head.info
            infos = avail
            # heads placed on a backbone read their own small model: the request needs its slots
            self.backbones = sorted({registry.heads_for(n, self.head_kind).runner
                                     for n in self.weights} - {"base", "tokens"})
        else:
            infos = {n: i for n, i in infos.items() if n in registry.rewards}
        try:
            self.weights = validate_weights(self.weights, infos)
        except ValueError as exc:
            raise AlignmentError(getattr(exc, "field", "alignment.weights"), str(exc)) from None
        # every weighted reward source's options (required ones included) are checked here,
        # before admission, not when the engine first scores
        scored = [] if self.head_kind is not None else \
            [n for n, w in self.weights.items() if w and n in registry.rewards]
        for name in dict.fromkeys([*self.opt.reward_options, *scored]):
            ro = self.opt.reward_options.get(name, {})
            if name not in registry.rewards:
                raise AlignmentError(f"alignment.reward_options.{name}",
                                     f"unknown reward {name!r}")
            if name not in self.weights:  # options for a reward nothing scores would do nothing
                raise AlignmentError(f"alignment.reward_options.{name}",
                                     f"reward {name!r} has no entry in alignment.weights, so "
                                     "its options would not be used: weight it or drop them")
            check = getattr(registry.rewards[name], "validate_options", None)
            if check is not None:
                try:
                    check(ro)
                except ValueError as exc:
                    fld = getattr(exc, "field", f"alignment.reward_options.{name}")
                    fld = fld.replace("alignment.options.", "alignment.reward_options.", 1)
                    raise AlignmentError(fld, str(exc)) from None

    def _other_kind_hint(self, registry: Any, other: Any) -> str:
        """What to weight instead of ``other``, a head of another kind than this strategy
        reads: the heads of the right kind for its reward, or the reward itself."""
        reward = other.manifest.get("reward")
        same = sorted(h.name for h in registry.heads.values()
                      if h.kind == self.head_kind and h.manifest.get("reward") == reward)
        a = "an" if other.kind[0] in "aeiou" else "a"
        q = (", which reads its Q-head with values: 'q'"
             if other.kind == "q" and self.head_kind == "value" else "")
        return (f" ({other.name!r} is {a} {other.kind} head; {self.name} reads "
                f"{self.head_kind} heads: for reward {reward!r} weight "
                + (f"one of {same} or " if same else "") + f"{reward!r} itself{q})")

    backbones: list[str] = []

    def slots_needed(self, n: int) -> dict[str, int]:
        return {"base": n, **{r: n for r in self.backbones}}

    def backbone_seqs(self, ctx: DecodeContext, heads: list[Any]) -> Run:
        """One sequence per backbone the heads read, prefilled with the prompt; returns
        ({runner: seq}, {runner: hidden state at the prompt's last token})."""
        runners = {h.runner for h in heads} - {"base", "tokens"}  # "tokens": lexical heads
        vseqs = {r: ctx.new_seq(r) for r in sorted(runners)}
        hidden: dict[str, Tensor] = {"base": ctx.prompt_hidden[None]}
        if vseqs:
            outs = yield [Extend(v, list(ctx.prompt_ids), logits="none", hidden=True)
                          for v in vseqs.values()]
            hidden.update({r: o.hidden for r, o in zip(vseqs, outs)})
        return vseqs, hidden  # type: ignore[return-value]

    @property
    def plain(self) -> bool:
        return not any(self.weights.values())

    def plain_info(self, info: dict[str, Any], n: int) -> None:
        """Fill in, for a run of ``n`` choices with all weights 0 (plain sampling), the
        strategy's own ``alignment`` fields that a guided run reports, with their values for
        "no search ran", so the response has the same keys at every weight (``rewards`` and
        ``weights`` come from ``report`` either way)."""

    # ---- the run ---------------------------------------------------------------------------
    def run(self, ctx: DecodeContext) -> Run:
        seq, last = yield from prefill(ctx, self.prompt_lp)
        ctx.info["strategy"] = self.name
        if ctx.params.max_tokens == 0:
            for c in range(ctx.n):
                ctx.finish(c, "length")
            return
        seqs = [seq] + ctx.fork(seq, ctx.n - 1)
        if self.plain:
            gens = [ctx.generator(c) for c in range(ctx.n)]
            yield from decode_rows(ctx, seqs, last[None].expand(ctx.n, -1), list(range(ctx.n)),
                                   gens)
            self.plain_info(ctx.info, ctx.n)
        else:
            yield from parallel([self.run_choice(ctx, c, seqs[c], last) for c in range(ctx.n)])
        yield from self.report(ctx)

    def run_choice(self, ctx: DecodeContext, c: int, seq: Seq, logits: Tensor) -> Run:
        raise NotImplementedError

    # ---- helpers for subclasses ------------------------------------------------------------
    def reward_names(self) -> list[str]:
        return [n for n, w in self.weights.items() if w]

    def score_texts(self, ctx: DecodeContext, texts: list[str],
                    population: bool = False) -> Run:
        """Combined and per-objective sequence rewards of ``texts`` (responses to this prompt).

        With ``population`` the texts are alternatives for one prompt, so the log-sigmoid and
        quantile transforms use them as the per-prompt reference set.
        """
        from ..value_models.compose import combine

        names = self.reward_names()
        outs = (yield [self._score_op(ctx, n, n, texts) for n in names]) if texts else []
        per = {n: np.asarray(o, dtype=np.float64) for n, o in zip(names, outs)} if texts \
            else {n: np.zeros(0) for n in names}
        ctx.stats.guidance_forwards += len(per) * len(texts)
        # alternatives for one prompt are their own reference set (log-sigmoid, quantile)
        transform = self.opt.transform if population else "identity"
        used = {n: w for n, w in self.weights.items() if w}
        return combine(per, used, transform), per

    def _score_op(self, ctx: DecodeContext, source: str, objective: str,
                  texts: list[str]) -> Score:
        """A batched reward call: ``source`` on ``texts`` with ``objective``'s options."""
        opts = self.opt.reward_options.get(objective, {})
        return Score(source, [ctx.prompt_text] * len(texts), list(texts),
                     [opts] * len(texts), ctx.resources)

    def report(self, ctx: DecodeContext) -> Run:
        """Per-objective rewards of the returned texts, for the response's ``alignment``."""
        reg = ctx.resources
        if reg is None:
            return
        texts = [st.text for st in ctx.choices]
        sources: dict[str, str] = {}  # objective -> the reward source that scores it
        for name in self.weights:
            if name in reg.rewards:
                sources[name] = name
            else:
                head = reg.heads.get(name)
                name_r = head.manifest.get("reward") if head is not None else None
                if name_r in reg.rewards:
                    sources[name] = name_r
        outs = yield [self._score_op(ctx, src, name, texts) for name, src in sources.items()]
        ctx.info["rewards"] = {name: [round(float(x), 5) for x in o]
                               for name, o in zip(sources, outs)}
        ctx.info["weights"] = self.weights


def finish_state(ctx: DecodeContext) -> ChoiceState:
    """A scratch output state with the request's stop rules (for branches never emitted)."""
    p = ctx.params
    return ChoiceState(p.max_tokens, list(p.stop), set(ctx.eos_ids))


def rollout(ctx: DecodeContext, seqs: list[Seq], logits: Tensor, gens: list[torch.Generator],
            max_new: int, greedy: bool = False, extend_last: bool = True,
            states: list[ChoiceState] | None = None) -> Run:
    """Sample up to ``max_new`` tokens on each branch without emitting them.

    ``logits[i]`` are branch i's next-token logits. Returns (states, last_logits) through
    StopIteration: each branch's ``ChoiceState`` (tokens, text trimmed at stop strings, finish
    reason) and its next-token logits after the rollout. Branches stop at EOS / stop strings /
    the request's max_tokens as a real answer would. With ``extend_last`` the final sampled token
    is fed too, so the branch's cache is complete and it can be adopted as the answer.
    """
    det = Detokenizer(ctx.tokenizer)
    states = states or [finish_state(ctx) for _ in seqs]
    last = [logits[i] for i in range(len(seqs))]
    live = [i for i in range(len(seqs)) if not states[i].finished]
    for step in range(max_new):
        if not live:
            break
        out = yield from ctx.sample(torch.stack([last[i] for i in live]), [gens[i] for i in live],
                         [states[i].tokens for i in live], temperature=0.0 if greedy else None)
        ctx.stats.tokens_generated += len(live)
        feed = []
        for j, i in enumerate(live):
            tok = int(out.tokens[j])
            det.push(states[i], TokenInfo(tok, float(out.base_logprobs[j]),
                                          policy_logprob=float(out.logprobs[j])))
            if not states[i].finished:  # finished branches need no further cache entries
                feed.append((i, tok))
        live = [i for i, _ in feed]
        if feed and (step < max_new - 1 or extend_last):
            outs = yield [Extend(seqs[i], [t]) for i, t in feed]
            for (i, _), o in zip(feed, outs):
                last[i] = o.logits[0]
    for st in states:
        if not st.finished:
            st.text = det.decode(st.tokens)
    return states, last  # type: ignore[return-value]


def emit_tokens(ctx: DecodeContext, c: int, tokens: list[int],
                infos: list[TokenInfo] | None = None) -> bool:
    """Emit a chosen branch's tokens for choice ``c``; True once the choice is finished."""
    for i, t in enumerate(tokens):
        info = infos[i] if infos and i < len(infos) else TokenInfo(t)
        if ctx.emit(c, t, info.logprob, None, info.policy_logprob):
            return True
    return False


def sample_scored(ctx: DecodeContext, logits: Tensor, gen: torch.Generator, cands: list[int],
                  scores: np.ndarray | Tensor, history: list[int],
                  weights: Tensor | None = None, restrict: bool = True) -> Run:
    """Sample one token with ``l(a) + sum_h w_h scores[h, a]`` added on the candidates.

    ``logits`` [V] are the base logits, ``scores`` [k] (already weighted, ``weights`` None) or
    [H, k] with ``weights`` [1, H]. With ``restrict`` (ARGS, Transfer Q*, token-wise CD: any
    strategy that chooses among the candidates it scored) every other token is masked after
    the shift, so an unscored token can never be drawn and one candidate is exactly greedy;
    VAS passes ``restrict=False`` (tokens outside the top-k keep their logits). The request's
    temperature, top-k/top-p, penalties and logit bias apply as everywhere else.
    """
    s = torch.as_tensor(scores, dtype=torch.float32)
    if weights is None:
        s, weights = s.reshape(1, -1), torch.ones(1, 1)
    return (yield from ctx.sample(logits[None], [gen], [history], weights=weights,
                                  cand_scores=s[None], cand_ids=torch.tensor([cands]),
                                  restrict=restrict))


def topk_ids(ctx: DecodeContext, logits: Tensor, k: int, history: list[int]) -> list[int]:
    """The ``k`` candidates of one row [V]: top-k after the request's penalties and bias."""
    return ctx.candidates(logits[None], k, [history])[0].tolist()


def emit_one(ctx: DecodeContext, c: int, token: int, logits: Tensor,
             policy_logprob: Tensor | None = None) -> bool:
    """Emit one sampled token with its base log-probability (and top-n when requested)."""
    lp = torch.log_softmax(logits.float(), -1)
    plp = policy_logprob.view(1) if policy_logprob is not None else None
    return emit_rows(ctx, [c], torch.tensor([token]), lp[token].view(1), logits[None], plp)[0]




