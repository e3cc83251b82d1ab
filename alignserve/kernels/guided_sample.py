"""Fused guided-logit reweighting and sampling: public entry point and torch reference.

The binding contract lives in ``SPEC.md`` next to this file. This module holds three things:

* :func:`hash_uniform`, the counter-based noise source. Sampling noise is a pure function of
  ``(noise_seed, token index)`` so the same seed yields the same token on the torch and the
  Triton path and regardless of which other rows share the batch (no RNG state to thread
  through the engine, and replays are exact).
* :func:`guided_sample_torch`, a plain, vectorised torch reference of the SPEC. It favours
  readability over speed: sorting the whole vocabulary is the obvious way to express the
  tie rules, and the Triton kernel is tested against it.
* :func:`guided_sample`, the dispatcher the engine calls. It must import without Triton or
  CUDA so the CPU test suite and CPU-only deployments keep working.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "LogitAdjust",
    "SampleOut",
    "guided_sample",
    "guided_sample_torch",
    "hash_u32",
    "hash_uniform",
    "resolve_backend",
]

_M32 = 0xFFFFFFFF

# Constants of the hash. They are part of the sampling contract: changing any of them changes
# which token a given seed draws, so the Triton copy in ``triton_guided_sample.py`` must match.
HASH_SEED_MUL = 0x9E3779B1  # odd golden-ratio multiplier: spreads consecutive seeds apart
HASH_SEED_ADD = 0x7F4A7C15
HASH_IDX_MUL = 0xCC9E2D51
HASH_FMIX_1 = 0x85EBCA6B  # murmur3 fmix32 finaliser constants
HASH_FMIX_2 = 0xC2B2AE35
UNIFORM_BITS = 23  # float32 holds (2**23 - 1) + 0.5 exactly, so u never rounds to 0 or 1


@dataclass
class SampleOut:
    """Result of one :func:`guided_sample` call (all tensors on the input device).

    Attributes:
        tokens: ``[B]`` int64 chosen token per row.
        logprobs: ``[B]`` float32 log-probability of the token under the processed
            distribution (guided, temperature-scaled, top-k/top-p masked).
        base_logprobs: ``[B]`` float32 log-probability of the token under the raw model.
        top_ids: ``[B, n_top]`` int64 best tokens of the processed distribution, descending.
        top_logprobs: ``[B, n_top]`` float32 their processed log-probabilities.
    """

    tokens: Tensor
    logprobs: Tensor
    base_logprobs: Tensor
    top_ids: Tensor
    top_logprobs: Tensor


@dataclass
class LogitAdjust:
    """Per-row processing of the raw logits before guidance (SPEC step 0).

    OpenAI's ``presence_penalty`` / ``frequency_penalty``, vLLM's ``repetition_penalty`` and
    ``logit_bias`` (``min_tokens`` rides in ``bias`` as ``-inf`` on the stop tokens). Only the
    J tokens a row has seen or biased are listed, so the cost is O(J), not O(V).

    Attributes:
        ids: ``[B, J]`` int64 token ids, distinct within a row; ``-1`` is padding.
        counts: ``[B, J]`` float32 occurrences of the token in the row's generated tokens.
        seen: ``[B, J]`` bool, the token is in the prompt or the generated tokens.
        bias: ``[B, J]`` float32 added last; ``-inf`` bans the token.
        presence: ``[B]`` float32 subtracted once from every generated token (OpenAI).
        frequency: ``[B]`` float32 subtracted per occurrence (OpenAI).
        repetition: ``[B]`` float32 > 0; seen tokens' logits are divided by it when positive
            and multiplied when negative (Keskar et al. 2019, as vLLM does); 1.0 is off.
    """

    ids: Tensor
    counts: Tensor
    seen: Tensor
    bias: Tensor
    presence: Tensor
    frequency: Tensor
    repetition: Tensor


def adjusted_values(x: Tensor, adj: LogitAdjust) -> Tensor:
    """SPEC step 0 on the gathered raw logits ``x`` [B, J] of ``adj.ids``: the new values."""
    rep = adj.repetition.float()[:, None]
    pos = torch.where(x > 0, x / rep, x * rep)
    x = torch.where(adj.seen, pos, x)  # x / 1 and x * 1 are exact: rep == 1 is a no-op
    counts = adj.counts.float()
    x = x - adj.frequency.float()[:, None] * counts
    x = x - adj.presence.float()[:, None] * (counts > 0).float()
    return x + adj.bias.float()


def apply_adjust(logits: Tensor, adj: LogitAdjust | None) -> Tensor:
    """The raw logits [B, V] after SPEC step 0 (a new float32 tensor; input untouched)."""
    x = logits.float()
    if adj is None or adj.ids.shape[1] == 0:
        return x
    b, v = x.shape
    valid = adj.ids >= 0
    idx = torch.where(valid, adj.ids, torch.full_like(adj.ids, v))  # padding -> spare column
    ext = torch.cat([x, x.new_zeros(b, 1)], dim=1)
    new = adjusted_values(ext.gather(1, idx), adj)
    return ext.scatter(1, idx, new)[:, :v]


def candidate_mask(cand_ids: Tensor, v: int) -> Tensor:
    """[B, V] bool: True at each row's valid candidate ids (SPEC step 1b)."""
    b = cand_ids.shape[0]
    idx = torch.where(cand_ids >= 0, cand_ids, torch.full_like(cand_ids, v))
    mask = torch.zeros(b, v + 1, dtype=torch.bool, device=cand_ids.device)
    return mask.scatter_(1, idx, True)[:, :v]


# --------------------------------------------------------------------------------------------
# Counter-based hash
# --------------------------------------------------------------------------------------------


def _mul32(a: Tensor, c: int) -> Tensor:
    """``(a * c) mod 2**32`` for ``a`` in [0, 2**32) held in int64, without int64 overflow.

    Multiplying two 32-bit values directly could overflow int64 (undefined in C++), so the
    constant is split into 16-bit halves; every partial product stays below 2**48.
    """
    lo = a * (c & 0xFFFF)
    hi = ((a * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _fmix32(h: Tensor) -> Tensor:
    """murmur3's 32-bit finaliser: full avalanche, so neighbouring counters look independent."""
    h = h ^ (h >> 16)
    h = _mul32(h, HASH_FMIX_1)
    h = h ^ (h >> 13)
    h = _mul32(h, HASH_FMIX_2)
    return h ^ (h >> 16)


def hash_u32(seed: Tensor | int, idx: Tensor | int) -> Tensor:
    """32-bit hash of ``(seed, idx)`` as an int64 tensor in [0, 2**32) (broadcasting).

    Definition (all arithmetic mod 2**32)::

        key = fmix32(seed * HASH_SEED_MUL + HASH_SEED_ADD)
        h   = fmix32(key ^ (idx * HASH_IDX_MUL))
        h   = fmix32(h + key)

    The second round keyed by ``key`` keeps two seeds' streams from being mere permutations
    of each other, which a single ``fmix32(f(seed) ^ g(idx))`` would allow.
    """
    seed_t = torch.as_tensor(seed, dtype=torch.int64) & _M32
    idx_t = torch.as_tensor(idx, dtype=torch.int64) & _M32
    key = _fmix32((_mul32(seed_t, HASH_SEED_MUL) + HASH_SEED_ADD) & _M32)
    h = _fmix32(key ^ _mul32(idx_t, HASH_IDX_MUL))
    return _fmix32((h + key) & _M32)


def _i32(c: int) -> int:
    """A uint32 constant as the int32 with the same bits."""
    return c - (1 << 32) if c >= 1 << 31 else c


def _srl(h: Tensor, s: int) -> Tensor:
    """Logical right shift of int32 bits (torch's >> on int32 is arithmetic)."""
    return (h >> s) & ((1 << (32 - s)) - 1)


def _fmix32_i32(h: Tensor) -> Tensor:
    h = h ^ _srl(h, 16)
    h = h * _i32(HASH_FMIX_1)
    h = h ^ _srl(h, 13)
    h = h * _i32(HASH_FMIX_2)
    return h ^ _srl(h, 16)


_IDX_CACHE: dict[tuple[int, str], Tensor] = {}


def gumbel_uniform_rows(seeds: Tensor, v: int) -> Tensor:
    """``hash_uniform(seeds[:, None], arange(v))`` computed fast, for the sampling hot path.

    Same bits as ``hash_uniform`` (the tests check it) but in int32 arithmetic, where torch's
    multiply wraps mod 2**32 exactly like the uint32 definition, and with the per-column term
    ``idx * HASH_IDX_MUL`` cached per vocabulary size: about 4x less work than the int64
    emulation, which matters because this runs for every sampled row at every step.
    """
    dev = seeds.device
    key_ = (v, str(dev))
    col = _IDX_CACHE.get(key_)
    if col is None:
        col = _mul32(torch.arange(v, dtype=torch.int64, device=dev), HASH_IDX_MUL)
        col = torch.where(col >= 1 << 31, col - (1 << 32), col).to(torch.int32)
        _IDX_CACHE[key_] = col
    seed_t = seeds.to(torch.int64) & _M32
    key = _fmix32((_mul32(seed_t, HASH_SEED_MUL) + HASH_SEED_ADD) & _M32)
    key = torch.where(key >= 1 << 31, key - (1 << 32), key).to(torch.int32)[:, None]
    h = _fmix32_i32(key ^ col[None, :])
    h = _fmix32_i32(h + key)
    top = _srl(h, 32 - UNIFORM_BITS).to(torch.float32)
    return (top + 0.5) * (2.0**-UNIFORM_BITS)


def hash_uniform(seed: Tensor | int, idx: Tensor | int) -> Tensor:
    """Uniform float32 in the open interval (0, 1) from ``(seed, idx)``; counter-based.

    ``u = ((h >> 9) + 0.5) * 2**-23`` lies in [2**-24, 1 - 2**-24]: strictly inside (0, 1)
    so the Gumbel transform ``-log(-log(u))`` is always finite. Every step is exact in
    float32, which is what makes the value bit-identical between torch and Triton.
    (24 bits would not do: 2**24 - 0.5 is not representable and would round u up to 1.)
    """
    h = hash_u32(seed, idx)
    top = (h >> (32 - UNIFORM_BITS)).to(torch.float32)
    return (top + 0.5) * (2.0**-UNIFORM_BITS)


# --------------------------------------------------------------------------------------------
# Torch reference
# --------------------------------------------------------------------------------------------


def _guided_logits(
    logits: Tensor,
    weights: Tensor | None,
    dense: Tensor | None,
    cand_scores: Tensor | None,
    cand_ids: Tensor | None,
    adjust: LogitAdjust | None = None,
    restrict: Tensor | None = None,
) -> Tensor:
    """SPEC steps 0-1b: adjusted logits, ``+ sum_h w_h dense_h``, sparse candidate additions,
    then (restricted rows) every non-candidate masked to -inf."""
    g = _shifted_logits(apply_adjust(logits, adjust), weights, dense, cand_scores, cand_ids)
    if restrict is not None and cand_ids is not None:
        keep = candidate_mask(cand_ids, g.shape[1]) | ~restrict.to(torch.bool)[:, None]
        g = torch.where(keep, g, torch.full_like(g, float("-inf")))
    return g


def _shifted_logits(
    g: Tensor,
    weights: Tensor | None,
    dense: Tensor | None,
    cand_scores: Tensor | None,
    cand_ids: Tensor | None,
) -> Tensor:
    """SPEC step 1: ``g = logits + sum_h w_h dense_h``, then sparse candidate additions."""
    if weights is None or weights.shape[1] == 0:
        return g
    w = weights.float()
    if dense is not None:
        g = g + (w[:, :, None] * dense.float()).sum(dim=1)
    if cand_scores is not None and cand_ids is not None and cand_ids.shape[1] > 0:
        contrib = (w[:, :, None] * cand_scores.float()).sum(dim=1)  # [B, K]
        valid = cand_ids >= 0
        # Padding (-1) adds an exact 0.0 at column 0, which leaves g unchanged.
        idx = torch.where(valid, cand_ids, torch.zeros_like(cand_ids))
        contrib = torch.where(valid, contrib, torch.zeros_like(contrib))
        g = g.clone().scatter_add_(1, idx, contrib)
    return g


def _mass_above(p: Tensor) -> Tensor:
    """Per token ``S_i = sum_{j : p_j > p_i} p_j`` (strictly greater, so ties share S).

    Sort descending; the exclusive cumulative sum at the *first* member of each tie group is
    the mass strictly above the whole group. ``cummax`` propagates it over the group, which
    works because exclusive sums are non-decreasing along the sorted order.
    """
    ps, order = torch.sort(p, dim=1, descending=True, stable=True)
    csum = torch.cumsum(ps, dim=1)
    excl = torch.cat([torch.zeros_like(csum[:, :1]), csum[:, :-1]], dim=1)
    new_group = torch.ones_like(ps, dtype=torch.bool)
    new_group[:, 1:] = ps[:, 1:] != ps[:, :-1]
    group_excl = torch.where(new_group, excl, torch.full_like(excl, -1.0))
    group_excl = torch.cummax(group_excl, dim=1).values
    return torch.empty_like(p).scatter_(1, order, group_excl)


def guided_sample_torch(
    logits: Tensor,
    weights: Tensor | None,
    dense: Tensor | None,
    cand_scores: Tensor | None,
    cand_ids: Tensor | None,
    temperature: Tensor,
    top_k: Tensor,
    top_p: Tensor,
    noise_seed: Tensor,
    n_top: int = 0,
    adjust: LogitAdjust | None = None,
    restrict: Tensor | None = None,
) -> SampleOut:
    """Readable torch implementation of SPEC.md; the oracle the Triton kernel is tested on.

    Vectorised over rows (every setting is a per-row tensor); no Python loop over the batch.
    """
    b, v = logits.shape
    dev = logits.device
    g = _guided_logits(logits, weights, dense, cand_scores, cand_ids, adjust, restrict)
    neg_inf = torch.full_like(g, float("-inf"))

    temperature = temperature.to(device=dev, dtype=torch.float32)
    greedy = temperature == 0
    t_safe = torch.where(greedy, torch.ones_like(temperature), temperature)
    z = g / t_safe[:, None]  # step 3 (greedy rows keep z == g)

    # Top-k: keep i iff #{j: z_j > z_i} < k  <=>  z_i >= (k-th largest z, counted with ties).
    k = top_k.to(device=dev, dtype=torch.int64)
    k_on = (k > 0) & (k < v) & ~greedy
    keep = torch.ones_like(z, dtype=torch.bool)
    if bool(k_on.any()):  # topk over the largest k needed, not a full sort of the vocabulary
        k_max = int(torch.where(k_on, k, torch.ones_like(k)).max())
        z_top = torch.topk(z, k_max, dim=1).values  # sorted descending, ties repeated
        kth = z_top.gather(1, (k - 1).clamp(0, k_max - 1)[:, None])
        keep = torch.where(k_on[:, None], z >= kth, keep)

    # Top-p on the softmax of the top-k-kept logits; argmax always survives.
    p_lim = top_p.to(device=dev, dtype=torch.float32)
    p_on = (p_lim < 1.0) & ~greedy
    if bool(p_on.any()):  # the one full sort, only when some row asks for top-p
        p = torch.softmax(torch.where(keep, z, neg_inf), dim=1)
        is_max = z == z.max(dim=1, keepdim=True).values
        keep_p = (_mass_above(p) < p_lim[:, None]) | is_max
        keep = keep & torch.where(p_on[:, None], keep_p, torch.ones_like(keep_p))

    logp = torch.log_softmax(torch.where(keep, z, neg_inf), dim=1)

    # Step 4: Gumbel-max with counter-based noise; step 2: plain argmax for greedy rows.
    greedy_tok = torch.argmax(g, dim=1)  # first maximum = lowest index on ties
    if bool(greedy.all()):
        tokens = greedy_tok
    else:
        u = gumbel_uniform_rows(noise_seed.to(device=dev), v)
        gumbel = -torch.log(-torch.log(u))
        sampled_tok = torch.argmax(torch.where(keep, z + gumbel, neg_inf), dim=1)
        tokens = torch.where(greedy, greedy_tok, sampled_tok)

    logprobs = logp.gather(1, tokens[:, None]).squeeze(1)
    base_logprobs = torch.log_softmax(logits.float(), dim=1).gather(1, tokens[:, None])

    # Step 6: stable sort => equal log-probabilities are listed by ascending token id.
    if n_top > 0:
        top_lp, top_ids = torch.sort(logp, dim=1, descending=True, stable=True)
        top_lp, top_ids = top_lp[:, :n_top].contiguous(), top_ids[:, :n_top].contiguous()
    else:
        top_lp = logp.new_empty((b, 0))
        top_ids = torch.empty((b, 0), dtype=torch.int64, device=dev)
    return SampleOut(
        tokens=tokens,
        logprobs=logprobs,
        base_logprobs=base_logprobs.squeeze(1),
        top_ids=top_ids,
        top_logprobs=top_lp,
    )


# --------------------------------------------------------------------------------------------
# Dispatcher
# --------------------------------------------------------------------------------------------

_BACKENDS = ("auto", "torch", "triton")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """Pick "torch" or "triton".

    An explicit ``backend`` wins; otherwise ``ALIGNSERVE_SAMPLER`` (so operators can flip a
    deployment without a code change); otherwise Triton on CUDA when importable, else torch.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get("ALIGNSERVE_SAMPLER", "auto").strip().lower() or "auto"
        if env not in _BACKENDS:
            raise ValueError(f"ALIGNSERVE_SAMPLER must be one of {_BACKENDS}, got {env!r}")
        backend = env
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "torch"
    if backend == "triton" and not _triton_available():
        raise RuntimeError("backend='triton' requested but triton is not importable")
    return backend


def _check_inputs(
    logits: Tensor,
    weights: Tensor | None,
    dense: Tensor | None,
    cand_scores: Tensor | None,
    cand_ids: Tensor | None,
    temperature: Tensor,
    top_k: Tensor,
    top_p: Tensor,
    noise_seed: Tensor,
    n_top: int,
    adjust: LogitAdjust | None = None,
    restrict: Tensor | None = None,
) -> None:
    """Shape checks only: value checks would force a device sync on every decoding step."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got {tuple(logits.shape)}")
    b, v = logits.shape
    h = 0 if weights is None else weights.shape[1]
    if weights is not None and tuple(weights.shape) != (b, h):
        raise ValueError(f"weights must be [B, H], got {tuple(weights.shape)}")
    if dense is not None and (weights is None or tuple(dense.shape) != (b, h, v)):
        raise ValueError("dense must be [B, H, V] and needs weights")
    if (cand_scores is None) != (cand_ids is None):
        raise ValueError("cand_scores and cand_ids must be given together")
    if cand_ids is not None and cand_scores is not None:
        if cand_ids.dim() != 2 or cand_ids.shape[0] != b:
            raise ValueError(f"cand_ids must be [B, K], got {tuple(cand_ids.shape)}")
        kk = cand_ids.shape[1]
        if weights is None or tuple(cand_scores.shape) != (b, h, kk):
            raise ValueError("cand_scores must be [B, H, K] and needs weights")
    for name, t in (
        ("temperature", temperature),
        ("top_k", top_k),
        ("top_p", top_p),
        ("noise_seed", noise_seed),
    ):
        if tuple(t.shape) != (b,):
            raise ValueError(f"{name} must be [B], got {tuple(t.shape)}")
    if not 0 <= n_top <= v:
        raise ValueError(f"n_top must be in [0, V], got {n_top}")
    if adjust is not None:
        j = adjust.ids.shape[1] if adjust.ids.dim() == 2 else -1
        for name in ("ids", "counts", "seen", "bias"):
            t = getattr(adjust, name)
            if t.dim() != 2 or tuple(t.shape) != (b, j):
                raise ValueError(f"adjust.{name} must be [B, J], got {tuple(t.shape)}")
        for name in ("presence", "frequency", "repetition"):
            t = getattr(adjust, name)
            if tuple(t.shape) != (b,):
                raise ValueError(f"adjust.{name} must be [B], got {tuple(t.shape)}")
    if restrict is not None:
        if tuple(restrict.shape) != (b,):
            raise ValueError(f"restrict must be [B], got {tuple(restrict.shape)}")
        if cand_ids is None:
            raise ValueError("restrict needs cand_ids (the set to restrict sampling to)")


def guided_sample(
    logits: Tensor,
    weights: Tensor | None,
    dense: Tensor | None,
    cand_scores: Tensor | None,
    cand_ids: Tensor | None,
    temperature: Tensor,
    top_k: Tensor,
    top_p: Tensor,
    noise_seed: Tensor,
    n_top: int = 0,
    backend: str = "auto",
    adjust: LogitAdjust | None = None,
    restrict: Tensor | None = None,
) -> SampleOut:
    """Adjust, guide, temperature-scale, top-k/top-p filter and sample one token per row.

    See SPEC.md: ``adjust`` (penalties and logit bias, step 0) and ``restrict`` ([B] bool: the
    row samples only among its valid ``cand_ids``, step 1b) are optional.

    ``backend`` is "auto" (Triton on CUDA, torch elsewhere; ``ALIGNSERVE_SAMPLER`` may
    override), "torch" or "triton". Both backends compute the same function; see SPEC.md.
    """
    _check_inputs(
        logits, weights, dense, cand_scores, cand_ids, temperature, top_k, top_p, noise_seed, n_top,
        adjust, restrict,
    )
    chosen = resolve_backend(backend, logits.device)
    if chosen == "triton":
        if not logits.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError(
                "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU debugging)"
            )
        from alignserve.kernels.triton_guided_sample import guided_sample_triton

        tokens, logprobs, base_lp, top_ids, top_lp = guided_sample_triton(
            logits,
            weights,
            dense,
            cand_scores,
            cand_ids,
            temperature,
            top_k,
            top_p,
            noise_seed,
            n_top,
            adjust,
            restrict,
        )
        return SampleOut(tokens, logprobs, base_lp, top_ids, top_lp)
    return guided_sample_torch(
        logits,
        weights,
        dense,
        cand_scores,
        cand_ids,
        temperature,
        top_k,
        top_p,
        noise_seed,
        n_top,
        adjust,
        restrict,
    )
