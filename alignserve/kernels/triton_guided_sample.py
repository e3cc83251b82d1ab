"""Triton kernel for :func:`alignserve.kernels.guided_sample.guided_sample` (see SPEC.md).

One program handles one row and streams the vocabulary in ``BLOCK_V`` chunks, so every row
can carry its own guidance weights, temperature, top-k, top-p and seed in a single launch.

Why no sort: a full per-row sort of V (up to 128k) is what makes the eager torch chain slow.
Top-k and top-p only need *one threshold each*, and both rules have the same shape:

    keep i  iff  W(key_i) < target,   W(t) = sum_{j : key_j > t} w_j

with ``key = z, w = 1, target = k`` for top-k and ``key = p, w = p, target = top_p`` for
top-p. W is non-increasing, so the kept set is ``{i : key_i >= v*}`` where ``v*`` is the
smallest *present* key with ``W(v*) < target``. Ties share a key, so they are kept or
dropped together, exactly as SPEC demands. ``v*`` is found by a multi-probe bisection on the
monotone int32 image of the float keys (``_ordered_key``): each pass over V evaluates W at
``N_PROBE`` thresholds and also records, per probe, the nearest present key above and below
it. Snapping the interval ends to present keys makes the search exact (the answer is a key
that occurs in the row, not an approximation) and lets it stop as soon as the bracket holds
a single distinct key; in the worst case it needs ``ceil(32 / log2(N_PROBE)) + 1`` passes.

Passes over the V axis of one sampled row:

1. read logits (+ H dense rows), write the guided logits g to a scratch row (skipped when
   there is no guidance), online logsumexp of the raw logits and, when there are no sparse
   candidates, the max / argmax / logsumexp of z;
2. only with sparse candidates: apply them to the scratch row in place (O(K^2 / BLOCK_K)
   work, not a V pass), then one pass for the z statistics;
3. top-k search (if 0 < k < V): bounded as above (12 with the GPU's N_PROBE = 8); on
   Gaussian logits with k = 50 it takes 5-7 passes for V = 32k..128k;
4. top-p (if top_p < 1): one pass for the top-k-kept softmax denominator when top-k is
   active, then the top-p search (same bound; 4-5 passes in the same experiment);
5. one pass: Gumbel-max over kept tokens plus the kept logsumexp;
6. ``n_top`` passes of lexicographic (logprob desc, id asc) max extraction.

A typical top-k + top-p row therefore makes about 13 + n_top passes; a greedy row 1 + n_top.

Greedy rows skip 3-5. Passes 2-6 read only the scratch row (4 bytes/token); while the
batch's B*V*4 scratch bytes fit in L2 (50 MB on H100) they are served from cache, so HBM
traffic stays close to one read of the inputs.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["guided_sample_triton", "hash_uniform_triton"]

_INT32_MAX = tl.constexpr(2147483647)
_INT32_MIN = tl.constexpr(-2147483648)
_INT64_MAX = tl.constexpr(9223372036854775807)
_INT64_MIN = tl.constexpr(-9223372036854775808)
_TWO32 = tl.constexpr(4294967296)


# --------------------------------------------------------------------------------------------
# Hash: bit-identical copy of guided_sample.hash_u32 / hash_uniform (uint32 wraps natively)
# --------------------------------------------------------------------------------------------


@triton.jit
def _fmix32(h):
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    return h ^ (h >> 16)


@triton.jit
def _hash_key(seed):
    """Per-row key; ``seed`` is int64 in [0, 2**31)."""
    s = seed.to(tl.uint32)
    return _fmix32(s * 0x9E3779B1 + 0x7F4A7C15)


@triton.jit
def _hash_uniform(key, idx):
    """Uniform in (0, 1) for token ids ``idx`` (int32) under the row key ``key``."""
    h = _fmix32(key ^ (idx.to(tl.uint32) * 0xCC9E2D51))
    h = _fmix32(h + key)
    return ((h >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 2**-23


@triton.jit
def _hash_uniform_kernel(seed_ptr, out_ptr, N, BLOCK: tl.constexpr):
    """Test hook: u for token ids [0, N) of one seed per program."""
    row = tl.program_id(0).to(tl.int64)
    key = _hash_key(tl.load(seed_ptr + row))
    for start in range(0, N, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        tl.store(out_ptr + row * N + idx, _hash_uniform(key, idx), mask=idx < N)


def hash_uniform_triton(seeds: Tensor, n: int) -> Tensor:
    """``[len(seeds), n]`` uniforms from the Triton hash (to check bit-identity with torch)."""
    seeds = seeds.to(torch.int64).contiguous()
    out = torch.empty(seeds.shape[0], n, dtype=torch.float32, device=seeds.device)
    _hash_uniform_kernel[(seeds.shape[0],)](seeds, out, n, BLOCK=1024)
    return out


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _ordered_key(x):
    """float32 -> int32 with the same order (NaN aside); -0.0 folds onto +0.0 like ``==``."""
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return tl.where(x == 0.0, 0, key)


@triton.jit
def _key_to_float(key):
    bits = tl.where(key < 0, key ^ 0x7FFFFFFF, key)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _lse_update(m, s, x):
    """Fold block ``x`` into a running (max, sum exp(. - max)); -inf-only prefixes are safe."""
    new_m = tl.maximum(m, tl.max(x, axis=0))
    ref = tl.where(new_m == float("-inf"), 0.0, new_m)
    s = s * tl.exp(m - ref) + tl.sum(tl.exp(x - ref), axis=0)
    return new_m, s


@triton.jit
def _load_z_key(g_row, idx, mask, t_eff):
    """Temperature-scaled guided logits and their ordered keys; -inf outside the row.

    (``_ordered_key`` is inlined: the interpreter charges per nested jit call, and this runs
    once per block of every pass.)
    """
    g = tl.load(g_row + idx, mask=mask, other=float("-inf"))
    z = tl.math.div_rn(g, t_eff)  # correctly rounded, like torch's ``g / T``
    bits = z.to(tl.int32, bitcast=True)
    zkey = tl.where(z == 0.0, 0, tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits))
    return z, zkey


@triton.jit
def _z_stats(z, zkey, idx, zmax, zarg, m_z, s_z, kmin):
    """Running max, lowest-index argmax, logsumexp and minimum ordered key of z."""
    bmax = tl.max(z, axis=0)
    barg = tl.min(tl.where(z == bmax, idx, _INT32_MAX), axis=0)
    zarg = tl.where(bmax > zmax, barg, zarg)  # strict: an earlier block wins ties
    new_m = tl.maximum(zmax, bmax)  # == the running max of the logsumexp
    ref = tl.where(new_m == float("-inf"), 0.0, new_m)
    s_z = s_z * tl.exp(m_z - ref) + tl.sum(tl.exp(z - ref), axis=0)
    kmin = tl.minimum(kmin, tl.min(zkey, axis=0))  # -inf padding is harmless
    return new_m, zarg, new_m, s_z, kmin


@triton.jit
def _cand_contrib(cs_ptr, w_ptr, row, H, K, kk, kmask):
    """``sum_h w[row, h] * cand_scores[row, h, kk]`` for a block of candidate slots."""
    acc = tl.zeros(kk.shape, tl.float32)
    for h in range(0, H):
        w = tl.load(w_ptr + row * H + h)
        acc += w * tl.load(cs_ptr + (row * H + h) * K + kk, mask=kmask, other=0.0)
    return acc


@triton.jit
def _top_p_prob(z, zkey, mask, vk, zmax, s_k):
    """Softmax of the top-k-kept z (0 for dropped tokens), as the top-p rule sees it.

    Returns (exp(z - zmax) or 0, p, ordered key of p). p >= 0 is never -0.0, so its key is
    just its bit pattern.
    """
    e = tl.where(mask & (zkey >= vk), tl.exp(z - zmax), 0.0)
    p = tl.math.div_rn(e, s_k)
    return e, p, p.to(tl.int32, bitcast=True)


@triton.jit
def _threshold_search(
    g_row,
    V,
    t_eff,
    lo,
    hi,
    target,
    vk,
    zmax,
    s_k,
    USE_P: tl.constexpr,
    BLOCK_V: tl.constexpr,
    N_PROBE: tl.constexpr,
    MAX_ITERS: tl.constexpr,
):
    """Smallest present key v with W(v) < target (module docstring); keys are int32.

    Invariants: W(lo) >= target (checked on the first pass), W(hi) < target, so the answer
    lies in (lo, hi]. ``lo + 1`` and ``hi`` are snapped to present keys after every pass, so
    ``lo + 1 == hi`` means the bracket holds exactly one distinct key: the answer.
    """
    offs = tl.arange(0, BLOCK_V)
    j = tl.arange(0, N_PROBE).to(tl.int64)
    it = 0
    while (lo + 1 < hi) & (it < MAX_ITERS):
        probes = lo + ((hi - lo) * j) // N_PROBE  # probes[0] == lo
        probes32 = probes.to(tl.int32)
        wsum = tl.zeros([N_PROBE], tl.float32)
        above = tl.full([N_PROBE], _INT32_MAX, tl.int32)
        below = tl.full([N_PROBE], _INT32_MIN, tl.int32)
        for start in range(0, V, BLOCK_V):
            idx = start + offs
            mask = idx < V
            z, zkey = _load_z_key(g_row, idx, mask, t_eff)
            if USE_P:
                _, w, key = _top_p_prob(z, zkey, mask, vk, zmax, s_k)
            else:
                key = zkey
                w = tl.where(mask, 1.0, 0.0)  # counts < 2**24 are exact in float32
            key = tl.where(mask, key, _INT32_MIN)
            gt = key[:, None] > probes32[None, :]
            wsum += tl.sum(tl.where(gt, w[:, None], 0.0), axis=0)
            above = tl.minimum(above, tl.min(tl.where(gt, key[:, None], _INT32_MAX), axis=0))
            below = tl.maximum(below, tl.max(tl.where(gt, _INT32_MIN, key[:, None]), axis=0))
        # W is non-increasing and so are the float sums (rounding is monotone and every
        # probe sums in the same order), hence ``wsum >= target`` holds on a prefix of probes.
        n_ge = tl.sum((wsum >= target).to(tl.int32), axis=0)
        # Nearest present key above the last ">= target" probe a / at or below the first
        # "< target" probe b: no present key lies in (a, a_above) nor in (b_below, b], so W
        # is flat there and the bracket can snap to them.
        a_above = tl.sum(tl.where(j == n_ge - 1, above, 0).to(tl.int64), axis=0)
        b_below = tl.sum(tl.where(j == n_ge, below, 0).to(tl.int64), axis=0)
        new_hi = tl.where(n_ge < N_PROBE, b_below, hi)
        # If even W(lo) < target (first pass only), every key qualifies: the answer is lo + 1.
        hi = tl.where(n_ge > 0, new_hi, lo + 1)
        lo = tl.where(n_ge > 0, a_above - 1, lo)
        it += 1
    return hi.to(tl.int32)


# --------------------------------------------------------------------------------------------
# Main kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _guided_sample_kernel(
    logits_ptr,
    g_ptr,
    w_ptr,
    dense_ptr,
    cs_ptr,
    cid_ptr,
    cval_ptr,
    cfirst_ptr,
    restrict_ptr,
    aid_ptr,
    acnt_ptr,
    aseen_ptr,
    abias_ptr,
    pres_ptr,
    freq_ptr,
    rep_ptr,
    temp_ptr,
    topk_ptr,
    topp_ptr,
    seed_ptr,
    tok_ptr,
    lp_ptr,
    base_lp_ptr,
    top_ids_ptr,
    top_lp_ptr,
    V,
    H,
    K,
    J,
    n_top,
    HAS_DENSE: tl.constexpr,
    HAS_CAND: tl.constexpr,
    HAS_ADJ: tl.constexpr,
    HAS_RESTRICT: tl.constexpr,
    BLOCK_J: tl.constexpr,
    WRITE_G: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    N_PROBE: tl.constexpr,
    MAX_ITERS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_V)
    x_row = logits_ptr + row * V
    g_row = g_ptr + row * V

    t = tl.load(temp_ptr + row)
    sampled = t != 0.0
    t_eff = tl.where(sampled, t, 1.0)  # greedy rows work on z == g

    # ---- pass 1: guidance, raw logsumexp, z statistics -------------------------------------
    m_raw = tl.full((), float("-inf"), tl.float32)
    s_raw = tl.zeros((), tl.float32)
    zmax = tl.full((), float("-inf"), tl.float32)
    zarg = tl.zeros((), tl.int32)
    m_z = tl.full((), float("-inf"), tl.float32)
    s_z = tl.zeros((), tl.float32)
    kmin = tl.full((), _INT32_MAX, tl.int32)
    for start in range(0, V, BLOCK_V):
        idx = start + offs
        mask = idx < V
        x = tl.load(x_row + idx, mask=mask, other=float("-inf"))
        m_raw, s_raw = _lse_update(m_raw, s_raw, x)
        g = x
        if HAS_DENSE:
            acc = tl.zeros([BLOCK_V], tl.float32)
            for h in range(0, H):
                w = tl.load(w_ptr + row * H + h)
                d = tl.load(dense_ptr + (row * H + h) * V + idx, mask=mask, other=0.0)
                acc += w * d
            g = x + acc
        if WRITE_G:
            tl.store(g_row + idx, g, mask=mask)
        if not (HAS_CAND or HAS_ADJ):
            z = tl.math.div_rn(g, t_eff)
            zmax, zarg, m_z, s_z, kmin = _z_stats(
                z, _ordered_key(z), idx, zmax, zarg, m_z, s_z, kmin
            )

    # ---- step 0: penalties and logit bias on the listed tokens (distinct ids per row) -------
    if HAS_ADJ:
        tl.debug_barrier()  # pass 1 wrote g[ids] from other threads of this program
        joffs = tl.arange(0, BLOCK_J)
        pres = tl.load(pres_ptr + row)
        freq = tl.load(freq_ptr + row)
        rep = tl.load(rep_ptr + row)
        for j0 in range(0, J, BLOCK_J):
            jj = j0 + joffs
            jmask = jj < J
            ids = tl.load(aid_ptr + row * J + jj, mask=jmask, other=-1)
            valid = jmask & (ids >= 0) & (ids < V)
            x = tl.load(x_row + ids, mask=valid, other=0.0)
            cnt = tl.load(acnt_ptr + row * J + jj, mask=valid, other=0.0)
            seen = tl.load(aseen_ptr + row * J + jj, mask=valid, other=0)
            bias = tl.load(abias_ptr + row * J + jj, mask=valid, other=0.0)
            xr = tl.where(x > 0, tl.math.div_rn(x, rep), x * rep)
            x = tl.where(seen != 0, xr, x)  # rep == 1 is exact identity
            x = x - freq * cnt
            x = x - pres * tl.where(cnt > 0, 1.0, 0.0)
            x = x + bias
            if HAS_DENSE:
                acc = tl.zeros([BLOCK_J], tl.float32)
                for h in range(0, H):
                    w = tl.load(w_ptr + row * H + h)
                    acc += w * tl.load(dense_ptr + (row * H + h) * V + ids, mask=valid, other=0.0)
                x = x + acc
            tl.store(g_row + ids, x, mask=valid)

    # ---- sparse candidates: scatter into the scratch row, then z statistics -----------------
    if HAS_CAND:
        tl.debug_barrier()  # the stores above came from other threads of this program
        koffs = tl.arange(0, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + koffs
            ids = tl.load(cid_ptr + row * K + kk, mask=kk < K, other=-1)
            # Duplicate ids: the first occurrence adds the summed contribution of all of
            # them, so the scatter below never has two lanes writing the same address.
            total = tl.zeros([BLOCK_K], tl.float32)
            first = (ids >= 0) & (ids < V)
            for j0 in range(0, K, BLOCK_K):
                jj = j0 + koffs
                jmask = jj < K
                ids_j = tl.load(cid_ptr + row * K + jj, mask=jmask, other=-1)
                c_j = _cand_contrib(cs_ptr, w_ptr, row, H, K, jj, jmask)
                same = (ids[:, None] == ids_j[None, :]) & (ids_j[None, :] >= 0)
                total += tl.sum(tl.where(same, c_j[None, :], 0.0), axis=1)
                earlier = same & (jj[None, :] < kk[:, None])
                first = first & (tl.sum(earlier.to(tl.int32), axis=1) == 0)
            gv = tl.load(g_row + ids, mask=first, other=0.0)
            # staged, so a restricted row can mask the whole row before the scatter
            tl.store(cval_ptr + row * K + kk, gv + total, mask=kk < K)
            tl.store(cfirst_ptr + row * K + kk, tl.where(first, ids, -1), mask=kk < K)
        tl.debug_barrier()
        if HAS_RESTRICT:
            if tl.load(restrict_ptr + row) != 0:  # step 1b: only the candidates stay
                for start in range(0, V, BLOCK_V):
                    idx = start + offs
                    tl.store(g_row + idx, tl.full([BLOCK_V], float("-inf"), tl.float32),
                             mask=idx < V)
                tl.debug_barrier()
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + koffs
            ids = tl.load(cfirst_ptr + row * K + kk, mask=kk < K, other=-1)
            val = tl.load(cval_ptr + row * K + kk, mask=kk < K, other=0.0)
            tl.store(g_row + ids, val, mask=(kk < K) & (ids >= 0))
    if HAS_CAND or HAS_ADJ:
        tl.debug_barrier()
        for start in range(0, V, BLOCK_V):
            idx = start + offs
            z, zkey = _load_z_key(g_row, idx, idx < V, t_eff)
            zmax, zarg, m_z, s_z, kmin = _z_stats(z, zkey, idx, zmax, zarg, m_z, s_z, kmin)

    # ---- thresholds (sampled rows) ----------------------------------------------------------
    kmax = _ordered_key(zmax)
    vk = kmin  # keep tokens with ordered_key(z) >= vk; kmin keeps all
    vp = tl.full((), -1, tl.int32)  # keep tokens with ordered_key(p) >= vp; -1 keeps all
    s_k = s_z  # sum over top-k-kept of exp(z - zmax) (m_z == zmax)
    tok = zarg
    log_s = tl.log(s_z)
    if sampled:
        k = tl.load(topk_ptr + row)
        top_p = tl.load(topp_ptr + row)
        if (k > 0) & (k < V):
            vk = _threshold_search(
                g_row,
                V,
                t_eff,
                (kmin - 1).to(tl.int64),
                kmax.to(tl.int64),
                k.to(tl.float32),
                vk,
                zmax,
                s_k,
                False,
                BLOCK_V,
                N_PROBE,
                MAX_ITERS,
            )
        if top_p <= 0.0:
            vk = kmax  # nothing passes "mass above < top_p": only the argmax group stays
        elif top_p < 1.0:
            if vk > kmin:
                s_k = tl.zeros((), tl.float32)
                for start in range(0, V, BLOCK_V):
                    idx = start + offs
                    mask = idx < V
                    z, zkey = _load_z_key(g_row, idx, mask, t_eff)
                    s_k += tl.sum(tl.where(mask & (zkey >= vk), tl.exp(z - zmax), 0.0), axis=0)
            # hi = key(1.0): p <= 1, so W(1.0) = 0 < top_p.
            vp = _threshold_search(
                g_row,
                V,
                t_eff,
                tl.full((), -1, tl.int64),
                tl.full((), 0x3F800000, tl.int64),
                top_p,
                vk,
                zmax,
                s_k,
                True,
                BLOCK_V,
                N_PROBE,
                MAX_ITERS,
            )

        # ---- Gumbel-max over kept tokens + kept logsumexp -----------------------------------
        key = _hash_key(tl.load(seed_ptr + row))
        s_keep = tl.zeros((), tl.float32)
        best = tl.full((), float("-inf"), tl.float32)
        for start in range(0, V, BLOCK_V):
            idx = start + offs
            mask = idx < V
            z, zkey = _load_z_key(g_row, idx, mask, t_eff)
            e, _, pkey = _top_p_prob(z, zkey, mask, vk, zmax, s_k)
            keep = mask & (zkey >= vk) & (pkey >= vp)
            s_keep += tl.sum(tl.where(keep, e, 0.0), axis=0)
            u = _hash_uniform(key, idx)
            score = tl.where(keep, z - tl.log(-tl.log(u)), float("-inf"))
            bmax = tl.max(score, axis=0)
            barg = tl.min(tl.where(score == bmax, idx, _INT32_MAX), axis=0)
            tok = tl.where(bmax > best, barg, tok)
            best = tl.maximum(best, bmax)
        log_s = tl.log(s_keep)

    # ---- outputs -------------------------------------------------------------------------
    z_tok = tl.math.div_rn(tl.load(g_row + tok), t_eff)
    tl.store(tok_ptr + row, tok.to(tl.int64))
    tl.store(lp_ptr + row, (z_tok - zmax) - log_s)
    tl.store(base_lp_ptr + row, (tl.load(x_row + tok) - m_raw) - tl.log(s_raw))

    # ---- top-n: repeated max extraction in (logprob desc, id asc) order ----------------------
    prev = tl.full((), _INT64_MAX, tl.int64)
    for r in range(0, n_top):
        cur = tl.full((), _INT64_MIN, tl.int64)
        for start in range(0, V, BLOCK_V):
            idx = start + offs
            mask = idx < V
            z, zkey = _load_z_key(g_row, idx, mask, t_eff)
            _, _, pkey = _top_p_prob(z, zkey, mask, vk, zmax, s_k)
            keep = (zkey >= vk) & (pkey >= vp)
            lp = tl.where(keep, (z - zmax) - log_s, float("-inf"))
            packed = _ordered_key(lp).to(tl.int64) * _TWO32 + (_TWO32 - 1 - idx.to(tl.int64))
            packed = tl.where(mask & (packed < prev), packed, _INT64_MIN)
            cur = tl.maximum(cur, tl.max(packed, axis=0))
        prev = cur
        hi_part = cur >> 32  # arithmetic shift: floor division, low part is non-negative
        tid = (_TWO32 - 1) - (cur - hi_part * _TWO32)
        tl.store(top_ids_ptr + row * n_top + r, tid)
        tl.store(top_lp_ptr + row * n_top + r, _key_to_float(hi_part.to(tl.int32)))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def guided_sample_triton(
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
    adjust=None,  # LogitAdjust | None (see guided_sample.py; imported lazily there)
    restrict: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Launch the kernel; returns (tokens, logprobs, base_logprobs, top_ids, top_logprobs).

    Shapes are validated by the dispatcher. The scratch row buffer is only allocated when
    guidance changes the logits; otherwise later passes re-read the logits themselves.
    """
    b, v = logits.shape
    dev = logits.device
    logits = logits.to(torch.float32).contiguous()
    h = 0 if weights is None else int(weights.shape[1])
    has_dense = dense is not None and h > 0
    has_cand = cand_ids is not None and cand_scores is not None and h > 0 and cand_ids.shape[1] > 0
    has_adj = adjust is not None and adjust.ids.shape[1] > 0
    has_restrict = restrict is not None and has_cand
    write_g = has_dense or has_cand or has_adj
    g_buf = torch.empty_like(logits) if write_g else logits
    w = weights.to(torch.float32).contiguous() if h > 0 else logits
    d = dense.to(torch.float32).contiguous() if has_dense else logits
    cs = cand_scores.to(torch.float32).contiguous() if has_cand else logits
    cid = cand_ids.to(torch.int64).contiguous() if has_cand else logits
    k_cand = int(cand_ids.shape[1]) if has_cand else 0
    cval = torch.empty(b, max(k_cand, 1), dtype=torch.float32, device=dev)
    cfirst = torch.empty(b, max(k_cand, 1), dtype=torch.int64, device=dev)
    rst = restrict.to(device=dev, dtype=torch.int32).contiguous() if has_restrict else logits
    if has_adj:
        j_adj = int(adjust.ids.shape[1])
        aid = adjust.ids.to(device=dev, dtype=torch.int64).contiguous()
        acnt = adjust.counts.to(device=dev, dtype=torch.float32).contiguous()
        aseen = adjust.seen.to(device=dev, dtype=torch.int32).contiguous()
        abias = adjust.bias.to(device=dev, dtype=torch.float32).contiguous()
        pres = adjust.presence.to(device=dev, dtype=torch.float32).contiguous()
        freq = adjust.frequency.to(device=dev, dtype=torch.float32).contiguous()
        repn = adjust.repetition.to(device=dev, dtype=torch.float32).contiguous()
    else:
        j_adj = 0
        aid = acnt = aseen = abias = pres = freq = repn = logits

    tokens = torch.empty(b, dtype=torch.int64, device=dev)
    lp = torch.empty(b, dtype=torch.float32, device=dev)
    base_lp = torch.empty(b, dtype=torch.float32, device=dev)
    top_ids = torch.empty(b, n_top, dtype=torch.int64, device=dev)
    top_lp = torch.empty(b, n_top, dtype=torch.float32, device=dev)
    if b == 0:
        return tokens, lp, base_lp, top_ids, top_lp

    # The interpreter pays per operation, not per element: big blocks and many probes are
    # cheap there. On GPU, BLOCK_V x N_PROBE bounds the register footprint of the search.
    interp = _interpreting()
    block_v = min(4096 if interp else 1024, triton.next_power_of_2(v))
    n_probe = 16 if interp else 8
    max_iters = -(-32 // (n_probe.bit_length() - 1)) + 2
    block_k = max(16, min(64, triton.next_power_of_2(max(k_cand, 1))))
    _guided_sample_kernel[(b,)](
        logits,
        g_buf,
        w,
        d,
        cs,
        cid,
        cval,
        cfirst,
        rst,
        aid,
        acnt,
        aseen,
        abias,
        pres,
        freq,
        repn,
        temperature.to(device=dev, dtype=torch.float32).contiguous(),
        top_k.to(device=dev, dtype=torch.int64).contiguous(),
        top_p.to(device=dev, dtype=torch.float32).contiguous(),
        noise_seed.to(device=dev, dtype=torch.int64).contiguous(),
        tokens,
        lp,
        base_lp,
        top_ids,
        top_lp,
        v,
        h,
        k_cand,
        j_adj,
        n_top,
        HAS_DENSE=has_dense,
        HAS_CAND=has_cand,
        HAS_ADJ=has_adj,
        HAS_RESTRICT=has_restrict,
        BLOCK_J=max(16, min(256, triton.next_power_of_2(max(j_adj, 1)))),
        WRITE_G=write_g,
        BLOCK_V=block_v,
        BLOCK_K=block_k,
        N_PROBE=n_probe,
        MAX_ITERS=max_iters,
        num_warps=8,
    )
    return tokens, lp, base_lp, top_ids, top_lp
