"""Per-request composition of several reward sources into one scalar score per candidate.

A request names the rewards it cares about with weights ``{name: w}`` and picks one transform
``T`` (or one per objective). For candidate row ``j`` the combined score is::

    combined[j] = sum_i  w_i * T_i(r_i[j])

Exactly that: **no division by sum(w)**, no re-centring, no clipping. Reasons:

* Weights may be negative (a request can ask for *less* of an objective), so ``sum(w)`` can be
  zero or flip the sign of the whole score.
* The magnitude is meaningful downstream. Best-of-N only needs the ordering (which dividing by a
  positive constant would not change anyway), but reward-guided decoding (ARGS-style
  ``logit + combined``) uses the scale: ``{"vader": 5}`` must steer harder than
  ``{"vader": 1}``. Normalising would make those two requests identical.
* It matches the directional-preference view (DPA): the score is ``v . T(r)`` for the user's
  weight vector ``v``; the user owns the scale of ``v``.

Objectives with weight 0 are skipped entirely (so a NaN-free result never depends on them).

Transforms (``T``), applied per objective before weighting:

* ``identity``: ``T(r) = r``; the raw score, in the range the source documents.
* ``log_sigmoid``: ``T(r) = log sigmoid(r - r_ref(x))`` in (-inf, 0] (Wang et al. 2024). Near 0
  when the candidate beats its prompt's reference by a clear margin, about ``r - r_ref`` (very
  negative) when far below it; so summing over objectives acts like a soft AND and rewards
  fixing a bad objective more than polishing a good one. Computed as ``-softplus(r_ref - r)``,
  which stays finite for any finite input. ``r_ref`` comes from ``refs`` (see below): a per-row
  reference value is used as is; a per-row *set* of base-sample rewards gives its median.
* ``quantile``: ``T(r) = (#{b < r} + 0.5 * #{b == r}) / M`` in [0, 1], the mid-rank empirical
  CDF of ``r`` among the ``M`` base-sample rewards ``b`` for the same prompt (InfAlign). Ties
  count half, so a candidate equal to every base sample gets 0.5, and when the candidates *are*
  the base samples, the quantiles of a group of distinct values are ``(k + 0.5) / M`` for
  ranks ``k = 0..M-1`` (symmetric around 0.5). Quantiles put objectives with very different
  scales (a judge logit of +-10 and a [0, 1] keyword fraction) on the same footing, so equal
  weights mean equal importance.

References (``refs[name]``), one of:

* a float: the same reference for every row;
* a 1-D array of length N: one reference reward per row (``quantile`` treats it as a set of
  size 1, so the score is 0, 0.5 or 1);
* a 2-D array ``[N, M]`` or a list of N 1-D arrays (lengths may differ): the base-sample
  rewards for each row's prompt.

When an objective needs a reference and ``refs`` has none for it, the rows themselves are the
reference set, grouped by ``groups`` (rows with equal group ids share a prompt; ``None`` means
one group). That is exactly right for Best-of-N over samples of the base model, where the
candidates are base samples.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from alignserve.value_models.base import RewardInfo, RewardOptionError, RewardSource

__all__ = [
    "TRANSFORMS",
    "WeightError",
    "combine",
    "quantile_transform",
    "log_sigmoid_transform",
    "score_objectives",
    "transform_rewards",
    "validate_transform",
    "validate_weights",
]

TRANSFORMS = ("identity", "log_sigmoid", "quantile")

RefLike = float | Sequence[float] | Sequence[Sequence[float]] | np.ndarray


class WeightError(RewardOptionError):
    """An invalid weight or transform in a request; ``field`` names it (e.g.
    ``alignment.weights.vader``) for the 400. A ``RewardOptionError`` subclass so the server can
    catch one type for every per-request alignment error."""


def validate_weights(weights: Any, available: Mapping[str, RewardInfo]) -> dict[str, float]:
    """Check a request's ``{name: weight}`` against the loaded rewards; return clean floats.

    Raises ``WeightError`` when ``weights`` is not a non-empty mapping, a name is not loaded
    (the message lists what is), or a weight is not a finite real number inside that reward's
    ``info.weight_range`` (inclusive; the message states the range). Booleans are refused even
    though Python treats them as numbers: ``true`` in JSON is almost surely a client bug.
    """
    if not isinstance(weights, Mapping):
        raise WeightError("alignment.weights", "weights must be an object mapping reward names "
                                               "to numbers")
    if not weights:
        raise WeightError("alignment.weights", "weights must name at least one reward")
    clean: dict[str, float] = {}
    for name, raw in weights.items():
        fld = f"alignment.weights.{name}"
        if name not in available:
            known = ", ".join(sorted(available)) or "none"
            raise WeightError(fld, f"unknown reward '{name}' (available: {known})")
        lo, hi = available[name].weight_range
        if isinstance(raw, bool) or not isinstance(raw, (int, float, np.integer, np.floating)):
            raise WeightError(fld, f"weight for '{name}' must be a number in [{lo:g}, {hi:g}]")
        w = float(raw)
        if not math.isfinite(w):
            raise WeightError(fld, f"weight for '{name}' must be finite, in [{lo:g}, {hi:g}]")
        if not lo <= w <= hi:
            raise WeightError(fld, f"weight for '{name}' must be in [{lo:g}, {hi:g}], got {w:.12g}")
        clean[name] = w
    return clean


def validate_transform(transform: Any, names: Sequence[str] | None = None
                       ) -> str | dict[str, str]:
    """Check a transform spec: one name from ``TRANSFORMS`` or ``{reward name: transform}``.

    With a mapping, names not listed default to ``identity``; ``names`` (if given) are the
    weighted rewards, and a mapping key outside them is an error.
    """
    allowed = ", ".join(TRANSFORMS)
    if isinstance(transform, str):
        if transform not in TRANSFORMS:
            raise WeightError("alignment.transform",
                              f"unknown transform '{transform}' (allowed: {allowed})")
        return transform
    if isinstance(transform, Mapping):
        out: dict[str, str] = {}
        for key, val in transform.items():
            fld = f"alignment.transform.{key}"
            if names is not None and key not in names:
                raise WeightError(fld, f"transform given for '{key}', which has no weight")
            if not isinstance(val, str) or val not in TRANSFORMS:
                raise WeightError(fld, f"unknown transform {val!r} (allowed: {allowed})")
            out[str(key)] = val
        return out
    raise WeightError("alignment.transform",
                      f"transform must be a string ({allowed}) or an object of them")


def _group_index(n: int, groups: Sequence[Hashable] | None) -> list[np.ndarray]:
    """Row indices of each group, in first-seen order."""
    if groups is None:
        return [np.arange(n)]
    if len(groups) != n:
        raise ValueError(f"groups has {len(groups)} entries for {n} rows")
    seen: dict[Hashable, list[int]] = {}
    for i, g in enumerate(groups):
        seen.setdefault(g, []).append(i)
    return [np.asarray(ix) for ix in seen.values()]


def _ref_sets(values: np.ndarray, ref: RefLike | None,
              groups: Sequence[Hashable] | None) -> list[np.ndarray]:
    """One 1-D array of reference rewards per row, from any accepted ``ref`` form."""
    n = len(values)
    if ref is None:
        sets: list[np.ndarray] = [np.empty(0)] * n
        for ix in _group_index(n, groups):
            members = values[ix]
            for i in ix:
                sets[i] = members
        return sets
    if isinstance(ref, (int, float, np.integer, np.floating)):
        return [np.asarray([float(ref)])] * n
    if isinstance(ref, np.ndarray) and ref.ndim == 2:
        if ref.shape[0] != n:
            raise ValueError(f"reference array has {ref.shape[0]} rows for {n} candidates")
        return [np.asarray(row, dtype=np.float64) for row in ref]
    items = list(ref)  # type: ignore[arg-type]
    if len(items) != n:
        raise ValueError(f"reference has {len(items)} entries for {n} candidates")
    out = []
    for item in items:
        arr = np.atleast_1d(np.asarray(item, dtype=np.float64))
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError("each row's reference must be a number or a non-empty 1-D list")
        out.append(arr)
    return out


def log_sigmoid_transform(values: np.ndarray, ref: RefLike | None = None,
                          groups: Sequence[Hashable] | None = None) -> np.ndarray:
    """``log sigmoid(r - r_ref)`` per row; a row's reference set contributes its median."""
    r = np.asarray(values, dtype=np.float64)
    refs = np.array([float(np.median(s)) for s in _ref_sets(r, ref, groups)], dtype=np.float64)
    # log sigmoid(x) = -softplus(-x) = -logaddexp(0, -x): finite for every finite x.
    return -np.logaddexp(0.0, refs - r)


def quantile_transform(values: np.ndarray, ref: RefLike | None = None,
                       groups: Sequence[Hashable] | None = None) -> np.ndarray:
    """Mid-rank empirical quantile of each row's reward within its reference set, in [0, 1]."""
    r = np.asarray(values, dtype=np.float64)
    out = np.empty_like(r)
    for j, s in enumerate(_ref_sets(r, ref, groups)):
        out[j] = (np.sum(s < r[j]) + 0.5 * np.sum(s == r[j])) / s.size
    return out


def transform_rewards(values: Sequence[float] | np.ndarray, transform: str = "identity",
                      ref: RefLike | None = None,
                      groups: Sequence[Hashable] | None = None) -> np.ndarray:
    """Apply one transform to one objective's rewards (``[N]``); see the module docstring."""
    r = np.asarray(values, dtype=np.float64)
    if r.ndim != 1:
        raise ValueError(f"rewards must be 1-D, got shape {r.shape}")
    if transform == "identity":
        return r.copy()
    if transform == "log_sigmoid":
        return log_sigmoid_transform(r, ref, groups)
    if transform == "quantile":
        return quantile_transform(r, ref, groups)
    raise ValueError(f"unknown transform '{transform}' (allowed: {', '.join(TRANSFORMS)})")


def combine(per_objective: Mapping[str, Sequence[float] | np.ndarray],
            weights: Mapping[str, float], transform: str | Mapping[str, str] = "identity",
            refs: Mapping[str, RefLike] | None = None,
            groups: Sequence[Hashable] | None = None) -> np.ndarray:
    """``sum_i w_i * T_i(r_i)`` per row (float64 ``[N]``); no normalisation by ``sum(w)``.

    ``per_objective`` maps each weighted reward name to its raw scores for the N rows (extra
    names are ignored). ``transform`` is one name for all objectives or ``{name: transform}``
    (missing names use ``identity``). ``refs`` and ``groups`` supply references for
    ``log_sigmoid`` and ``quantile``; see the module docstring. Raises ``ValueError`` if a
    weighted objective is missing, lengths differ, or a weighted objective has non-finite scores
    (a reward source bug, better loud than a silently NaN ranking).
    """
    refs = refs or {}
    used = {k: float(w) for k, w in weights.items() if float(w) != 0.0}
    n: int | None = None
    for name in weights:
        if name not in per_objective:
            raise ValueError(f"no scores for weighted reward '{name}'")
        size = len(per_objective[name])
        if n is not None and size != n:
            raise ValueError(f"reward '{name}' has {size} scores, others have {n}")
        n = size
    total = np.zeros(n or 0, dtype=np.float64)
    for name, w in used.items():
        r = np.asarray(per_objective[name], dtype=np.float64)
        if not np.all(np.isfinite(r)):
            raise ValueError(f"reward '{name}' produced non-finite scores")
        t = transform if isinstance(transform, str) else transform.get(name, "identity")
        total += w * transform_rewards(r, t, refs.get(name), groups)
    return total


def score_objectives(sources: Mapping[str, RewardSource], weights: Mapping[str, float],
                     prompts: Sequence[str], responses: Sequence[str],
                     options: Sequence[Mapping[str, Mapping[str, Any]]] | None = None,
                     ) -> dict[str, np.ndarray]:
    """Score the rows with every reward that has a non-zero weight; feed the result to
    ``combine``. ``options[j]`` is row ``j``'s ``{reward name: {option: value}}``."""
    out: dict[str, np.ndarray] = {}
    for name, w in weights.items():
        if float(w) == 0.0:
            continue
        per_row = None if options is None else [o.get(name, {}) for o in options]
        out[name] = np.asarray(sources[name].score(prompts, responses, per_row), np.float64)
    return out
