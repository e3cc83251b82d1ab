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

    def __post_init__(self) -> None:
        if self.seed is None:
            self.seed = int.from_bytes(os.urandom(6), "little")

    @property
    def adjusts_logits(self) -> bool:
        """Whether any SPEC step-0 processing (penalties, bias, min_tokens) is active."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias
                    or self.repetition_penalty != 1.0 or self.min_tokens > 0)


def row_generator(seed: int, *key: int) -> torch.Generator:
    """A generator for one row, derived from the request seed and the row's key (choice, branch)."""
    digest = hashlib.sha256(repr((int(seed),) + tuple(int(k) for k in key)).encode()).digest()
    g = torch.Generator()
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g


def draw_noise_seeds(gens: list[torch.Generator]) -> Tensor:
    return torch.cat([torch.randint(0, 2**31 - 1, (1,), generator=g) for g in gens])


def build_adjust(params: SamplingParams, histories: Sequence[Sequence[int]],
                 prompt_ids: Sequence[int], stop_ids: Iterable[int],
                 device: torch.device | str = "cpu") -> LogitAdjust | None:
    """The SPEC step-0 tensors for rows whose generated tokens are ``histories`` (one list per
    row: the tokens of that choice or branch so far, prompt excluded). None when the request
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


def sample_rows(
    logits: Tensor,
    params: SamplingParams,
    gens: list[torch.Generator],
    weights: Tensor | None = None,
    dense: Tensor | None = None,
    cand_scores: Tensor | None = None,
    cand_ids: Tensor | None = None,
    n_top: int = 0,
    temperature: float | None = None,
    top_k: int | None = None,
    adjust: LogitAdjust | None = None,
    restrict: bool = False,
) -> SampleOut:
    """Sample one token for each row of ``logits`` [R, V] with the request's parameters.

    ``temperature``/``top_k`` override the request's values (greedy rollouts). ``adjust`` are
    the rows' penalties and bias (``build_adjust``); ``restrict`` samples only among each row's
    ``cand_ids`` (strategies that choose among the candidates they scored). Guidance tensors
    are passed through to the fused sampler.
    """
    r = logits.shape[0]
    dev = logits.device
    t = params.temperature if temperature is None else temperature
    k = params.top_k if top_k is None else top_k
    return guided_sample(
        logits.float(),
        weights,
        dense,
        cand_scores,
        cand_ids,
        temperature=torch.full((r,), float(t), device=dev),
        top_k=torch.full((r,), int(k), dtype=torch.long, device=dev),
        top_p=torch.full((r,), float(params.top_p), device=dev),
        noise_seed=draw_noise_seeds(gens).to(dev),
        n_top=n_top,
        adjust=adjust,
        restrict=torch.ones(r, dtype=torch.bool, device=dev) if restrict else None,
    )
