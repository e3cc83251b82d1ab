"""DecodeContext: everything a strategy may touch besides yielding forward operations.

One context per request. It owns the request's sequences (so the scheduler can free them whatever
happens), its per-row random generators, and its choices' output state. Strategies see models by
name ("base", or a guidance backbone's name) and never the scheduler itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .output import ChoiceState, Detokenizer, TokenInfo
from .primitives import EngineError, Sample, Seq
from .runner import ModelRunner
from .sampling import SamplingParams, adjusted_logits, build_adjust, row_generator


@dataclass
class Stats:
    """Cost accounting reported in the response's ``alignment`` object."""

    tokens_generated: int = 0  # every token the strategy produced, discarded ones included
    guidance_forwards: int = 0  # forwards of guidance models / reward calls, counted by strategies
    candidates_scored: int = 0
    started: float = field(default_factory=time.perf_counter)
    extra: dict[str, Any] = field(default_factory=dict)


class DecodeContext:
    def __init__(self, runners: dict[str, ModelRunner], tokenizer, prompt_ids: list[int],
                 params: SamplingParams, n: int, eos_ids: set[int],
                 on_delta: Callable[[int, str, TokenInfo | None], None],
                 resources: Any = None, prompt_text: str = "") -> None:
        self.runners = runners
        self.tokenizer = tokenizer
        self.prompt_ids = prompt_ids
        self.prompt_text = prompt_text
        self.params = params
        self.n = n
        self.resources = resources  # rewards / heads registry, opaque to the engine
        self.detok = Detokenizer(tokenizer)
        self.choices = [ChoiceState(params.max_tokens, list(params.stop), set(eos_ids))
                        for _ in range(n)]
        self.eos_ids = set(eos_ids)
        self._on_delta = on_delta
        self.seqs: list[Seq] = []
        self.stats = Stats()
        self.prompt_logprobs: list[float | None] | None = None
        self.prompt_hidden: Tensor | None = None  # final hidden state at the prompt's last token
        self.info: dict[str, Any] = {}  # strategy-specific facts for the response
        # set by the scheduler: lowers this request's slot reservation (see ``release``)
        self.on_release: Callable[[str, int], None] | None = None

    # ---- sequences -------------------------------------------------------------------------
    def new_seq(self, model: str = "base") -> Seq:
        seq = self.runners[model].new_seq()
        self.seqs.append(seq)
        return seq

    def fork(self, seq: Seq, n: int) -> list[Seq]:
        out = self.runners[seq.model].fork(seq, n)
        self.seqs.extend(out)
        return out

    def free(self, seq: Seq) -> None:
        self.runners[seq.model].free(seq)

    def free_all(self) -> None:
        for s in self.seqs:
            if s.slot >= 0:
                self.runners[s.model].free(s)
        self.seqs.clear()

    def release(self, model: str, k: int) -> None:
        """Give back ``k`` of the KV-cache slots of ``model`` reserved for this request.

        The scheduler reserves a request's worst case (``Decoder.slots_needed``) for its whole
        life; a strategy that knows it will never again hold more than ``reserved - k`` slots
        of ``model`` (e.g. Best-of-N after pruning samples, whose slots it has freed) calls this
        so that waiting requests can be admitted at the next engine step. Irreversible.

        Raises ``EngineError`` if the request would then hold more slots than it reserves.
        """
        if k < 0:
            raise EngineError(f"release({model!r}, {k}): k must be >= 0")
        if k and self.on_release is not None:
            self.on_release(model, k)

    def held(self, model: str = "base") -> int:
        """KV-cache slots of ``model`` this request holds now."""
        return sum(1 for s in self.seqs if s.model == model and s.slot >= 0)

    def commit(self, seq: Seq, index: int, token: int) -> None:
        self.runners[seq.model].commit(seq, index, token)

    def truncate(self, seq: Seq, length: int) -> None:
        self.runners[seq.model].truncate(seq, length)

    def room(self, seq: Seq) -> int:
        """Positions still free in this sequence's slot."""
        return self.runners[seq.model].max_len - seq.length

    # ---- randomness and sampling -----------------------------------------------------------
    def generator(self, *key: int) -> torch.Generator:
        assert self.params.seed is not None
        return row_generator(self.params.seed, *key)

    def sample(self, logits: Tensor, gens: list[torch.Generator],
               histories: list[list[int]], *, temperature: float | None = None,
               top_k: int | None = None, **kw: Any) -> Generator[list[Any], list[Any], Any]:
        """Sample one token per row of ``logits`` [R, V] (use as ``out = yield from
        ctx.sample(...)``): the scheduler runs every request's samples of a step as one fused
        call. ``histories[r]`` are the tokens row r has generated so far (its choice's or
        branch's answer), which the request's penalties, logit bias and ``min_tokens`` act on.
        ``temperature``/``top_k`` override the request's (greedy rollouts); ``kw`` are the
        ``Sample`` op's guidance fields. Returns a ``SampleOut`` of CPU tensors."""
        p = self.params
        adj = build_adjust(p, histories, self.prompt_ids, self.eos_ids, logits.device)
        op = Sample(logits=logits, gens=gens,
                    temperature=float(p.temperature if temperature is None else temperature),
                    top_k=int(p.top_k if top_k is None else top_k), top_p=float(p.top_p),
                    adjust=adj, **kw)
        [out] = yield [op]
        return out

    def candidates(self, logits: Tensor, k: int, histories: list[list[int]]) -> Tensor:
        """The top-``k`` token ids [R, k] of each row after penalties and logit bias: the
        candidate set a strategy scores (a +100 bias makes its token a candidate)."""
        adj = build_adjust(self.params, histories, self.prompt_ids, self.eos_ids, logits.device)
        lg = adjusted_logits(logits.float(), adj)
        return torch.topk(lg, min(k, lg.shape[-1]), dim=-1).indices

    # ---- output ----------------------------------------------------------------------------
    def emit(self, choice: int, token: int, logprob: float | None = None,
             top: list[tuple[int, float]] | None = None,
             policy_logprob: float | None = None) -> bool:
        """Append a token to a choice's output; returns True when that choice is finished."""
        st = self.choices[choice]
        if st.finished:
            return True
        info = TokenInfo(token, logprob, top, policy_logprob)
        delta = self.detok.push(st, info)
        if delta or st.finished:
            self._on_delta(choice, delta, info)
        return st.finished

    def finish(self, choice: int, reason: str = "stop") -> None:
        st = self.choices[choice]
        if not st.finished:
            delta = self.detok.finish(st, reason)
            self._on_delta(choice, delta, None)

    def finished(self, choice: int) -> bool:
        return self.choices[choice].finished

    @property
    def all_finished(self) -> bool:
        return all(c.finished for c in self.choices)

    def check_budget(self, seq: Seq, extra: int) -> None:
        if seq.length + extra > self.runners[seq.model].max_len:
            raise EngineError("context window exceeded")
