"""Figures of merit for decoding-time alignment (see docs/methods.md, "Figures of merit").

All functions are pure: they take plain Python/NumPy inputs, return Python floats (or a tuple
of floats) and keep no state, so they can be unit-tested on hand-made inputs and reused by the
benchmark scripts and the server alike. Models (reward models, embedders) are never loaded
here; where one is needed it is injected as a callable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from numpy.typing import ArrayLike

Tokenizer = Callable[[str], list[str]]
EmbedFn = Callable[[list[str]], np.ndarray]


def _as_1d(values: ArrayLike, name: str) -> np.ndarray:
    """Convert to a non-empty 1-D float array, failing loudly instead of returning NaN."""
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty")
    return arr


def mean_ci95(values: ArrayLike) -> tuple[float, float, float]:
    """Mean with a two-sided 95% Student-t confidence interval.

    mean = (1/n) sum_i x_i,  s = sqrt(sum_i (x_i - mean)^2 / (n - 1)),
    half = t_{0.975, n-1} * s / sqrt(n),  result = (mean, mean - half, mean + half).

    The t quantile (rather than 1.96) keeps the interval honest for the small prompt counts
    of per-category breakdowns. With n = 1 there is no spread estimate, so the interval
    collapses to (x, x, x) rather than being infinite.

    Raises:
        ValueError: if ``values`` is empty.
    """
    x = _as_1d(values, "values")
    n = x.size
    mean = float(x.mean())
    if n == 1:
        return mean, mean, mean
    from scipy.stats import t as student_t  # local import: only this function needs scipy

    half = float(student_t.ppf(0.975, df=n - 1)) * float(x.std(ddof=1)) / math.sqrt(n)
    return mean, mean - half, mean + half


def win_rate(a: ArrayLike, b: ArrayLike) -> float:
    """Fraction of prompts on which ``a`` beats ``b``, counting ties as half a win.

    win_rate = (1/n) sum_i ( [a_i > b_i] + 0.5 * [a_i == b_i] ).

    ``a[i]`` and ``b[i]`` must score the same prompt (e.g. reward of the steered and of the
    base response), which makes the comparison paired and removes prompt difficulty from it.
    Ties count 0.5 so that two identical systems get exactly 0.5.

    Raises:
        ValueError: if the inputs are empty or of different lengths.
    """
    xa, xb = _as_1d(a, "a"), _as_1d(b, "b")
    if xa.shape != xb.shape:
        raise ValueError(f"a and b must have the same length, got {xa.size} and {xb.size}")
    wins = (xa > xb).astype(np.float64) + 0.5 * (xa == xb).astype(np.float64)
    return float(wins.mean())


def kl_from_logprobs(
    policy_logprobs: Sequence[Sequence[float]], base_logprobs: Sequence[Sequence[float]]
) -> float:
    """Monte-Carlo estimate of KL(pi || base) per response, from the sampled tokens.

    KL ~= (1/R) sum_{r=1..R} sum_{t=1..T_r} ( log pi(y_{r,t} | ...) - log base(y_{r,t} | ...) ).

    Each response y_r is sampled from the steered policy pi, so the sum of its per-token
    log-ratios is an unbiased estimate of the sequence-level KL(pi || base); averaging over
    responses reduces the variance. Individual responses can give negative values even though
    the KL itself is non-negative. ``policy_logprobs[r][t]`` and ``base_logprobs[r][t]`` must
    score the same token.

    Raises:
        ValueError: if there are no responses, or the two nestings do not line up.
    """
    if len(policy_logprobs) == 0:
        raise ValueError("need at least one response")
    if len(policy_logprobs) != len(base_logprobs):
        raise ValueError(
            f"got {len(policy_logprobs)} policy responses but {len(base_logprobs)} base responses"
        )
    per_response: list[float] = []
    for r, (lp_pi, lp_base) in enumerate(zip(policy_logprobs, base_logprobs, strict=True)):
        if len(lp_pi) != len(lp_base):
            raise ValueError(
                f"response {r}: {len(lp_pi)} policy log-probs but {len(lp_base)} base log-probs"
            )
        diff = np.asarray(lp_pi, dtype=np.float64) - np.asarray(lp_base, dtype=np.float64)
        per_response.append(float(diff.sum()))
    return float(np.mean(per_response))


def _ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """All contiguous n-grams of ``tokens`` (empty if there are fewer than n tokens)."""
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def _whitespace_tokens(text: str) -> list[str]:
    """Default tokenizer: lower-cased whitespace split, so 'The' and 'the' count as repeats."""
    return text.lower().split()


def _diversity_one(tokens: Sequence[str]) -> float:
    """prod_{n=2..4} (unique n-grams / total n-grams) for one token sequence."""
    score = 1.0
    for n in (2, 3, 4):
        grams = _ngrams(tokens, n)
        if grams:  # too short for any n-gram: nothing can repeat, factor is 1
            score *= len(set(grams)) / len(grams)
    return score


def diversity(texts: Sequence[str], tokenize: Tokenizer | None = None) -> float:
    """Per-response repetition score, averaged over responses (higher = less repetitive).

    For one text with total_n n-grams of which unique_n are distinct,
    repeated_n = total_n - unique_n and
        div(text) = prod_{n=2..4} (1 - repeated_n / total_n) = prod_{n=2..4} unique_n / total_n,
    with a factor of 1 when the text has no n-grams of that order. The result is
        diversity = (1/N) sum_i div(text_i).

    This is the *within-response* measure used in the literature: it catches degenerate
    loops ("the the the ...") that strong guidance can cause. It does not notice that many
    responses say the same thing; use :func:`distinct_n` for that *across-response* view.

    Args:
        texts: responses to score.
        tokenize: text -> tokens; defaults to a lower-cased whitespace split. Pass the model's
            tokenizer to measure on subword tokens instead.

    Raises:
        ValueError: if ``texts`` is empty.
    """
    if len(texts) == 0:
        raise ValueError("texts must not be empty")
    tok = tokenize or _whitespace_tokens
    return float(np.mean([_diversity_one(tok(text)) for text in texts]))


def distinct_n(texts: Sequence[str], n: int, tokenize: Tokenizer | None = None) -> float:
    """Corpus-level distinct-n: distinct n-grams over all n-grams, pooled across responses.

    distinct_n = |union_i set(ngrams_n(text_i))| / sum_i |ngrams_n(text_i)|.

    Unlike :func:`diversity` (which scores each response on its own and averages), this pools
    all responses, so it drops when the strategy produces near-identical answers to different
    prompts or samples (mode collapse), even if each answer is individually non-repetitive.
    N-grams do not span text boundaries. Returns 0.0 when no text has n tokens.

    Raises:
        ValueError: if ``n < 1``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    tok = tokenize or _whitespace_tokens
    unique: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        grams = _ngrams(tok(text), n)
        unique.update(grams)
        total += len(grams)
    return len(unique) / total if total else 0.0


def degenerate_fraction(texts: Sequence[str], n: int = 4, times: int = 3,
                        tokenize: Tokenizer | None = None) -> float:
    """Fraction of texts in which some token n-gram occurs at least ``times`` times.

    degenerate(text) = [max_g count_g(ngrams_n(tokens(text))) >= times], occurrences may
    overlap ("a a a a a a" holds the 4-gram (a, a, a, a) three times), and the result is
        degenerate_fraction = (1/N) sum_i degenerate(text_i).

    The default (a 4-gram three times) flags the loops strong guidance falls into ("I love it!
    I love it! I love it!") while a normal 30-50-token answer essentially never triggers it.
    Pass the model's tokenizer (``tokenizer.tokenize``) to count subword tokens.

    Raises:
        ValueError: if ``texts`` is empty, or ``n`` or ``times`` is < 1.
    """
    if len(texts) == 0:
        raise ValueError("texts must not be empty")
    if n < 1 or times < 1:
        raise ValueError(f"n and times must be >= 1, got n={n}, times={times}")
    tok = tokenize or _whitespace_tokens
    flagged = 0
    for text in texts:
        counts: dict[tuple[str, ...], int] = {}
        for g in _ngrams(tok(text), n):
            counts[g] = counts.get(g, 0) + 1
        flagged += bool(counts) and max(counts.values()) >= times
    return flagged / len(texts)


def coherence(prompts: Sequence[str], responses: Sequence[str], embed_fn: EmbedFn) -> float:
    """Mean cosine similarity between each prompt's and its response's embedding.

    coherence = (1/N) sum_i <e(p_i), e(r_i)> / (||e(p_i)|| * ||e(r_i)||),

    where e = ``embed_fn``. It is a cheap check that steering did not push the response off
    topic. The embedder is injected (MiniLM in production, a fake in tests) so this module
    never loads a model. Prompts and responses are embedded in one call so the embedder can
    batch them. A zero embedding gives cosine 0 rather than NaN.

    Args:
        prompts: N prompt texts.
        responses: N response texts, ``responses[i]`` answering ``prompts[i]``.
        embed_fn: list of M strings -> array of shape [M, D].

    Raises:
        ValueError: on empty or mismatched inputs, or an embedding of the wrong shape.
    """
    if len(prompts) == 0:
        raise ValueError("prompts must not be empty")
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
    n = len(prompts)
    emb = np.asarray(embed_fn(list(prompts) + list(responses)), dtype=np.float64)
    if emb.ndim != 2 or emb.shape[0] != 2 * n:
        raise ValueError(f"embed_fn must return shape [{2 * n}, D], got {emb.shape}")
    p, r = emb[:n], emb[n:]
    denom = np.linalg.norm(p, axis=1) * np.linalg.norm(r, axis=1)
    dots = np.einsum("ij,ij->i", p, r)
    cos = np.divide(dots, denom, out=np.zeros_like(dots), where=denom > 0)
    return float(cos.mean())


def bon_kl_bound(n: int) -> float:
    """Analytic KL(pi_BoN || base) of Best-of-N sampling: log n - (n - 1) / n.

    This is the standard closed form for choosing the best of n i.i.d. base samples (exact
    when rewards have no ties; an upper bound in general). It puts Best-of-N on the same
    reward-vs-KL axes as the guided decoders without estimating its KL by sampling.
    bon_kl_bound(1) = 0 (plain sampling).

    Raises:
        ValueError: if ``n < 1``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n
