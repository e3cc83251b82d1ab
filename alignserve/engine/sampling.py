"""Per-request sampling parameters and per-row random streams.

Reproducibility contract: a request with a ``seed`` gives the same tokens whether it runs alone or
beside other requests. Each row (choice, or branch of a choice) owns a ``torch.Generator`` seeded
from (request seed, row key); every sampling step draws one 31-bit ``noise_seed`` from it, and the
sampler turns that into per-token Gumbel noise with a counter-based hash (see
``alignserve/kernels/SPEC.md``). Nothing about the batch leaks into a row's randomness.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..kernels.guided_sample import LogitAdjust, SampleOut, apply_adjust, guided_sample


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False
    presence_penalty: float = 0.0  # OpenAI: minus this once for each generated token
    frequency_penalty: float = 0.0  # OpenAI: minus this per occurrence in the generated tokens
    repetition_penalty: float = 1.0  # vLLM / Keskar et al.: over prompt and generated tokens
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> bias in [-100, 100]
    min_tokens: int = 0  # vLLM: EOS and stop_token_ids are banned before this many tokens
    stop_token_ids: list[int] = field(default_factory=list)  # end a choice like EOS (vLLM)
    no_repeat_ngram_size: int = 0  # HF generate: a generated n-gram never occurs twice; 0 = off

    def __post_init__(self) -> None:
        if self.seed is None:
            self.seed = int.from_bytes(os.urandom(6), "little")

    @property
    def adjusts_logits(self) -> bool:
        """Whether any SPEC step-0 processing (penalties, bias, min_tokens) is active."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias
                    or self.repetition_penalty != 1.0 or self.min_tokens > 0
                    or self.no_repeat_ngram_size > 0)


def row_generator(seed: int, *key: int) -> torch.Generator:
    """A generator for one row, derived from the request seed and the row's key (choice, branch)."""
    digest = hashlib.sha256(repr((int(seed),) + tuple(int(k) for k in key)).encode()).digest()
    g = torch.Generator()
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g


def draw_noise_seeds(gens: list[torch.Generator]) -> Tensor:
    return torch.cat([torch.randint(0, 2**31 - 1, (1,), generator=g) for g in gens])


def repeated_ngram_bans(history: Sequence[int], n: int) -> set[int]:
    """Tokens that would complete an n-gram already in ``history`` (a row's generated tokens,
    prompt excluded): the tokens that followed each earlier occurrence of the last n - 1
    tokens (n = 1: every token generated so far). Hugging Face ``no_repeat_ngram_size``."""
    if n <= 0 or len(history) < n - 1:
        return set()
    if n == 1:
        return set(history)
    tail = tuple(history[len(history) - n + 1:])
    return {int(history[i + n - 1]) for i in range(len(history) - n + 1)
            if tuple(history[i:i + n - 1]) == tail}


def build_adjust(params: SamplingParams, histories: Sequence[Sequence[int]],
                 prompt_ids: Sequence[int], stop_ids: Iterable[int],
                 device: torch.device | str = "cpu") -> LogitAdjust | None:
    """The SPEC step-0 tensors for rows whose generated tokens are ``histories`` (one list per
    row: the tokens of that choice or branch so far, prompt excluded); ``min_tokens`` and
    ``no_repeat_ngram_size`` bans ride in the bias as ``-inf``. None when the request
    asks for no processing, so plain requests pay nothing. Only the tokens a row has seen or
    biased are listed: O(prompt + history) host work per row and step."""
    if not params.adjusts_logits:
        return None
    prompt_seen = set(prompt_ids) if params.repetition_penalty != 1.0 else set()
    stops = list(stop_ids)
    rows = []
    for hist in histories:
        counts = Counter(hist)
        bias = dict(params.logit_bias)
        if len(hist) < params.min_tokens:
            for t in stops:
                bias[t] = float("-inf")
        for t in repeated_ngram_bans(hist, params.no_repeat_ngram_size):
            bias[t] = float("-inf")
        seen = prompt_seen | set(counts) if params.repetition_penalty != 1.0 else set(counts)
        ids = sorted(seen | set(bias))
        rows.append([(t, float(counts.get(t, 0)), t in seen, bias.get(t, 0.0)) for t in ids])
    r, j = len(rows), max((len(x) for x in rows), default=0)
    ids_t = torch.full((r, j), -1, dtype=torch.long)
    counts_t = torch.zeros(r, j)
    seen_t = torch.zeros(r, j, dtype=torch.bool)
    bias_t = torch.zeros(r, j)
    for i, row in enumerate(rows):
        if row:
            ids, cnt, sn, b = zip(*row)
            n = len(row)
            ids_t[i, :n] = torch.tensor(ids)
            counts_t[i, :n] = torch.tensor(cnt)
            seen_t[i, :n] = torch.tensor(sn)
            bias_t[i, :n] = torch.tensor(b)
    return LogitAdjust(
        ids=ids_t.to(device), counts=counts_t.to(device), seen=seen_t.to(device),
        bias=bias_t.to(device),
        presence=torch.full((r,), float(params.presence_penalty), device=device),
        frequency=torch.full((r,), float(params.frequency_penalty), device=device),
        repetition=torch.full((r,), float(params.repetition_penalty), device=device))


def adjusted_logits(logits: Tensor, adjust: LogitAdjust | None) -> Tensor:
    """Logits [R, V] after penalties and bias: what candidate selection (top-k) must rank."""
    return logits if adjust is None else apply_adjust(logits, adjust)


def _pad_adjust(ops: Sequence[Any], b: int, device: torch.device) -> LogitAdjust | None:
    """The ops' ``LogitAdjust`` stacked over all B rows, J padded with -1 ids (rows without
    processing get neutral penalties, so they are unchanged)."""
    if all(op.adjust is None for op in ops):
        return None
    j = max(op.adjust.ids.shape[1] for op in ops if op.adjust is not None)
    ids = torch.full((b, j), -1, dtype=torch.long, device=device)
    counts = torch.zeros(b, j, device=device)
    seen = torch.zeros(b, j, dtype=torch.bool, device=device)
    bias = torch.zeros(b, j, device=device)
    pres, freq = torch.zeros(b, device=device), torch.zeros(b, device=device)
    rep = torch.ones(b, device=device)
    r0 = 0
    for op in ops:
        r1 = r0 + op.rows
        a = op.adjust
        if a is not None:
            jj = a.ids.shape[1]
            ids[r0:r1, :jj], counts[r0:r1, :jj] = a.ids, a.counts
            seen[r0:r1, :jj], bias[r0:r1, :jj] = a.seen, a.bias
            pres[r0:r1], freq[r0:r1], rep[r0:r1] = a.presence, a.frequency, a.repetition
        r0 = r1
    return LogitAdjust(ids, counts, seen, bias, pres, freq, rep)


def sample_batch(ops: Sequence[Any]) -> list[SampleOut]:
    """Run many ``Sample`` operations (any requests, any settings) as ONE fused sampler call.

    Rows are concatenated; per-row temperature / top-k / top-p / noise seed come from each op;
    guidance is padded to the largest H (zero weights) and K (-1 ids), which changes no row's
    result (the sampler is batch-invariant, SPEC.md). The outputs are moved to the host once
    and split back per op (``top_ids``/``top_logprobs`` cut to each op's ``n_top``).

    Raises whatever ``guided_sample`` raises for malformed inputs (the scheduler then retries
    op by op, so one bad request fails alone).
    """
    logits = torch.cat([op.logits.float() for op in ops])
    b, v = logits.shape
    dev = logits.device
    per_row = [(op.temperature, op.top_k, op.top_p) for op in ops for _ in range(op.rows)]
    temperature = torch.tensor([t for t, _, _ in per_row], dtype=torch.float32, device=dev)
    top_k = torch.tensor([k for _, k, _ in per_row], dtype=torch.long, device=dev)
    top_p = torch.tensor([p for _, _, p in per_row], dtype=torch.float32, device=dev)
    seeds = torch.cat([draw_noise_seeds(op.gens) for op in ops]).to(dev)
    h = max((op.weights.shape[1] for op in ops if op.weights is not None), default=0)
    kk = max((op.cand_ids.shape[1] for op in ops if op.cand_ids is not None), default=0)
    weights = dense = cand_scores = cand_ids = restrict = None
    if h:
        weights = torch.zeros(b, h, device=dev)
        if any(op.dense is not None for op in ops):
            dense = torch.zeros(b, h, v, device=dev)
        if kk:
            cand_scores = torch.zeros(b, h, kk, device=dev)
    if kk:
        cand_ids = torch.full((b, kk), -1, dtype=torch.long, device=dev)
    if any(op.restrict for op in ops):
        restrict = torch.zeros(b, dtype=torch.bool, device=dev)
    r0 = 0
    for op in ops:
        r1 = r0 + op.rows
        if op.weights is not None:
            hh = op.weights.shape[1]
            weights[r0:r1, :hh] = op.weights  # type: ignore[index]
            if op.dense is not None:
                dense[r0:r1, :hh] = op.dense  # type: ignore[index]
            if op.cand_scores is not None:
                cs = op.cand_scores
                cand_scores[r0:r1, :hh, :cs.shape[2]] = cs  # type: ignore[index]
        if op.cand_ids is not None:
            cand_ids[r0:r1, :op.cand_ids.shape[1]] = op.cand_ids  # type: ignore[index]
        if op.restrict:
            restrict[r0:r1] = True  # type: ignore[index]
        r0 = r1
    n_top = max(op.n_top for op in ops)
    out = guided_sample(logits, weights, dense, cand_scores, cand_ids, temperature=temperature,
                        top_k=top_k, top_p=top_p, noise_seed=seeds, n_top=n_top,
                        adjust=_pad_adjust(ops, b, dev), restrict=restrict)
    # one device-to-host transfer for the whole step (no per-row synchronisation)
    host = SampleOut(*(t.cpu() for t in (out.tokens, out.logprobs, out.base_logprobs,
                                          out.top_ids, out.top_logprobs)))
    res, r0 = [], 0
    for op in ops:
        r1 = r0 + op.rows
        res.append(SampleOut(host.tokens[r0:r1], host.logprobs[r0:r1],
                             host.base_logprobs[r0:r1], host.top_ids[r0:r1, :op.n_top],
                             host.top_logprobs[r0:r1, :op.n_top]))
        r0 = r1
    return res
