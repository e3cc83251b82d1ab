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
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..kernels.guided_sample import SampleOut, guided_sample


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

    def __post_init__(self) -> None:
        if self.seed is None:
            self.seed = int.from_bytes(os.urandom(6), "little")


def row_generator(seed: int, *key: int) -> torch.Generator:
    """A generator for one row, derived from the request seed and the row's key (choice, branch)."""
    digest = hashlib.sha256(repr((int(seed),) + tuple(int(k) for k in key)).encode()).digest()
    g = torch.Generator()
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g


def draw_noise_seeds(gens: list[torch.Generator]) -> Tensor:
    return torch.cat([torch.randint(0, 2**31 - 1, (1,), generator=g) for g in gens])


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
) -> SampleOut:
    """Sample one token for each row of ``logits`` [R, V] with the request's parameters.

    ``temperature``/``top_k`` override the request's values (strategies such as CD restrict
    sampling to their candidate set). Guidance tensors are passed through to the fused sampler.
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
    )
