"""Metrics checked against values worked out by hand (the working is in the comments)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from alignserve.eval.metrics import (
    bon_kl_bound,
    coherence,
    degenerate_fraction,
    distinct_n,
    diversity,
    kl_from_logprobs,
    mean_ci95,
    win_rate,
)
from alignserve.eval.plots import (
    plot_reward_vs_compute,
    plot_reward_vs_cost_grid,
    plot_reward_vs_kl,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- mean_ci95 -------------------------------------------------------------------------------


def test_mean_ci95_three_values() -> None:
    # x = [1, 2, 3]: mean = 2; s^2 = (1 + 0 + 1) / 2 = 1 -> s = 1; se = 1 / sqrt(3) = 0.577350
    # t_{0.975, df=2} = 4.302653 (t table) -> half = 4.302653 * 0.577350 = 2.484138
    mean, lo, hi = mean_ci95([1.0, 2.0, 3.0])
    assert mean == pytest.approx(2.0)
    assert lo == pytest.approx(-0.484138, abs=1e-5)
    assert hi == pytest.approx(4.484138, abs=1e-5)


def test_mean_ci95_two_values() -> None:
    # x = [0, 2]: mean = 1; s^2 = (1 + 1) / 1 = 2 -> s = sqrt(2); se = sqrt(2) / sqrt(2) = 1
    # t_{0.975, df=1} = 12.706205 -> interval = 1 -/+ 12.706205
    mean, lo, hi = mean_ci95(np.array([0.0, 2.0]))
    assert mean == pytest.approx(1.0)
    assert lo == pytest.approx(-11.706205, abs=1e-5)
    assert hi == pytest.approx(13.706205, abs=1e-5)


def test_mean_ci95_single_value_collapses() -> None:
    # n = 1: no spread estimate, so the interval is the point itself.
    assert mean_ci95([0.7]) == (0.7, 0.7, 0.7)


def test_mean_ci95_constant_values_zero_width() -> None:
    # x = [3, 3, 3, 3]: s = 0 -> half-width 0.
    assert mean_ci95([3, 3, 3, 3]) == pytest.approx((3.0, 3.0, 3.0))


def test_mean_ci95_empty_raises() -> None:
    with pytest.raises(ValueError):
        mean_ci95([])


# --- win_rate --------------------------------------------------------------------------------


def test_win_rate_with_tie() -> None:
    # per prompt: 3>1 win (1), 1=1 tie (0.5), 2<4 loss (0), 5>2 win (1) -> 2.5 / 4 = 0.625
    assert win_rate([3, 1, 2, 5], [1, 1, 4, 2]) == pytest.approx(0.625)


def test_win_rate_identical_is_half() -> None:
    # all ties -> 0.5 each -> 0.5
    assert win_rate([0.1, 0.2, 0.3], [0.1, 0.2, 0.3]) == pytest.approx(0.5)


def test_win_rate_length_mismatch_raises() -> None:
    with pytest.raises(ValueError):
        win_rate([1, 2], [1])


# --- kl_from_logprobs ------------------------------------------------------------------------


def test_kl_from_logprobs_hand_values() -> None:
    # response 1: (-1 - -2) + (-2 - -2.5) = 1 + 0.5 = 1.5
    # response 2: (-0.5 - -0.25) = -0.25
    # mean over responses: (1.5 - 0.25) / 2 = 0.625
    policy = [[-1.0, -2.0], [-0.5]]
    base = [[-2.0, -2.5], [-0.25]]
    assert kl_from_logprobs(policy, base) == pytest.approx(0.625)


def test_kl_from_logprobs_identical_is_zero_and_empty_response_counts_zero() -> None:
    # same log-probs -> every log-ratio is 0; an empty response sums to 0 -> mean 0
    assert kl_from_logprobs([[-1.0, -3.0], []], [[-1.0, -3.0], []]) == pytest.approx(0.0)


def test_kl_from_logprobs_mismatch_raises() -> None:
    with pytest.raises(ValueError):
        kl_from_logprobs([[-1.0, -2.0]], [[-1.0]])
    with pytest.raises(ValueError):
        kl_from_logprobs([[-1.0]], [[-1.0], [-2.0]])
    with pytest.raises(ValueError):
        kl_from_logprobs([], [])


# --- diversity / distinct_n ------------------------------------------------------------------


def test_diversity_hand_values() -> None:
    # "a b a b a": bigrams ab ba ab ba -> 2 unique / 4 = 1/2
    #              trigrams aba bab aba -> 2 unique / 3 = 2/3
    #              4-grams abab baba -> 2 unique / 2 = 1      -> product = 1/3
    # "the cat sat": bigrams 2/2 = 1, trigrams 1/1 = 1, no 4-grams (factor 1) -> 1
    # mean over texts: (1/3 + 1) / 2 = 2/3
    assert diversity(["a b a b a", "the cat sat"]) == pytest.approx(2 / 3)


def test_diversity_is_case_insensitive_by_default() -> None:
    # "The the the" -> "the the the": bigrams (the,the) x2 -> 1/2; trigram 1/1 -> 0.5
    assert diversity(["The the the"]) == pytest.approx(0.5)


def test_diversity_custom_tokenizer() -> None:
    # character tokens of "aaaa": bigrams aa x3 -> 1/3; trigrams aaa x2 -> 1/2;
    # 4-gram aaaa x1 -> 1 -> product = 1/6
    assert diversity(["aaaa"], tokenize=list) == pytest.approx(1 / 6)


def test_distinct_n_corpus_level() -> None:
    # bigrams pooled: (a,b) (b,c) | (a,b) (b,d) -> unique {ab, bc, bd} = 3 of 4 -> 0.75
    assert distinct_n(["a b c", "a b d"], 2) == pytest.approx(0.75)
    # unigrams pooled: a b c a b d -> unique {a, b, c, d} = 4 of 6 -> 2/3
    assert distinct_n(["a b c", "a b d"], 1) == pytest.approx(2 / 3)
    # no text long enough for a bigram -> 0.0 by convention
    assert distinct_n(["a", "b"], 2) == 0.0


def test_distinct_n_sees_cross_response_repeats_that_diversity_does_not() -> None:
    # two identical, individually non-repetitive answers: per-text diversity is 1,
    # but pooled bigrams are (x,y) (y,z) twice -> 2 unique / 4 = 0.5
    texts = ["x y z", "x y z"]
    assert diversity(texts) == pytest.approx(1.0)
    assert distinct_n(texts, 2) == pytest.approx(0.5)


# --- degenerate_fraction ---------------------------------------------------------------------


def test_degenerate_fraction_hand_values() -> None:
    # "a a a a a a": 4-grams (a,a,a,a) at positions 0, 1, 2 -> 3 occurrences -> degenerate;
    # "a a a a a": only 2 -> not; "x y z w x y z w x y z w": (x,y,z,w) 3 times -> degenerate;
    # "x y z w x y z w": twice -> not
    texts = ["a a a a a a", "a a a a a", "x y z w x y z w x y z w", "x y z w x y z w"]
    assert degenerate_fraction(texts) == pytest.approx(0.5)
    assert degenerate_fraction(texts, times=2) == pytest.approx(1.0)
    assert degenerate_fraction(["I love it!"] * 3) == 0.0  # across answers is not a loop
    assert degenerate_fraction(["aaa"], n=1, times=3, tokenize=list) == 1.0
    with pytest.raises(ValueError):
        degenerate_fraction([])
    with pytest.raises(ValueError):
        degenerate_fraction(["a"], n=0)


# --- coherence -------------------------------------------------------------------------------

_FAKE_VECTORS = {
    "p1": [1.0, 0.0],
    "r1": [1.0, 1.0],
    "p2": [0.0, 2.0],
    "r2": [0.0, -3.0],
    "p3": [1.0, 2.0],
    "r3": [0.0, 0.0],
}


def _fake_embed(texts: list[str]) -> np.ndarray:
    return np.array([_FAKE_VECTORS[t] for t in texts])


def test_coherence_hand_values() -> None:
    # pair 1: [1,0].[1,1] = 1; norms 1 * sqrt(2) -> cos = 1/sqrt(2) = 0.707107
    # pair 2: [0,2].[0,-3] = -6; norms 2 * 3 = 6 -> cos = -1
    # mean = (0.707107 - 1) / 2 = -0.146447
    value = coherence(["p1", "p2"], ["r1", "r2"], _fake_embed)
    assert value == pytest.approx(-0.146447, abs=1e-6)


def test_coherence_zero_embedding_counts_as_zero() -> None:
    # pair 1: 1/sqrt(2) = 0.707107; pair 3: response embedding is zero -> cos 0
    # mean = 0.707107 / 2 = 0.353553
    value = coherence(["p1", "p3"], ["r1", "r3"], _fake_embed)
    assert value == pytest.approx(0.353553, abs=1e-6)


def test_coherence_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError):
        coherence(["p1"], ["r1", "r2"], _fake_embed)
    with pytest.raises(ValueError):
        coherence(["p1"], ["r1"], lambda texts: np.zeros((1, 2)))


# --- bon_kl_bound ----------------------------------------------------------------------------


def test_bon_kl_bound_hand_values() -> None:
    # n=1: log 1 - 0/1 = 0
    # n=2: log 2 - 1/2 = 0.693147 - 0.5 = 0.193147
    # n=4: log 4 - 3/4 = 1.386294 - 0.75 = 0.636294
    assert bon_kl_bound(1) == 0.0
    assert bon_kl_bound(2) == pytest.approx(0.193147, abs=1e-6)
    assert bon_kl_bound(4) == pytest.approx(0.636294, abs=1e-6)
    with pytest.raises(ValueError):
        bon_kl_bound(0)


# --- plots -----------------------------------------------------------------------------------

_RESULTS = [
    {"strategy": "base", "setting": "T=1.0", "reward": 0.10, "reward_lo": 0.05,
     "reward_hi": 0.15, "kl": 0.0, "tokens_per_returned": 1.0},
    {"strategy": "ARGS", "setting": "w=0.5", "reward": 0.30, "reward_lo": 0.22,
     "reward_hi": 0.38, "kl": 0.4, "tokens_per_returned": 2.0},
    {"strategy": "ARGS", "setting": "w=2.0", "reward": 0.55, "reward_lo": 0.45,
     "reward_hi": 0.65, "kl": 1.6, "tokens_per_returned": 2.0},
    {"strategy": "CD-FUDGE", "setting": "k=10", "reward": 0.45, "reward_lo": 0.40,
     "reward_hi": 0.50, "kl": 0.9, "tokens_per_returned": 11.0},
]


def _assert_png(path: Path) -> None:
    assert path.is_file()
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 1000


def test_plot_reward_vs_kl_writes_png(tmp_path: Path) -> None:
    bon = [{"n": n, "kl": bon_kl_bound(n), "reward": 0.1 + 0.1 * math.log2(n)} for n in (1, 2, 4)]
    bon.append((16, bon_kl_bound(16), 0.5))  # tuple form is accepted too
    out = plot_reward_vs_kl(_RESULTS, bon, tmp_path / "sub" / "kl.png")
    _assert_png(out)


def test_plot_reward_vs_kl_without_bon_curve(tmp_path: Path) -> None:
    _assert_png(plot_reward_vs_kl(_RESULTS, [], tmp_path / "kl_nobon.png"))


def test_plot_reward_vs_compute_writes_png(tmp_path: Path) -> None:
    _assert_png(plot_reward_vs_compute(_RESULTS, tmp_path / "compute.png"))


def test_plot_reward_vs_compute_rejects_nonpositive_compute(tmp_path: Path) -> None:
    bad = [dict(_RESULTS[0], tokens_per_returned=0.0)]
    with pytest.raises(ValueError):
        plot_reward_vs_compute(bad, tmp_path / "bad.png")


def test_plot_reward_vs_cost_grid_writes_png(tmp_path: Path) -> None:
    pts = [dict(r, x=float(r["tokens_per_returned"]), label=r["setting"]) for r in _RESULTS]
    panel = {"title": "demo", "results": pts,
             "reference": [{"label": f"N={n}", "x": float(n), "reward": 0.1 * n}
                           for n in (1, 2, 4)],
             "target": {"x": 1.5, "y": 0.3, "label": "target"}, "ylim": (-1.0, 1.0)}
    _assert_png(plot_reward_vs_cost_grid([[panel, panel], [panel]], tmp_path / "grid.png"))
    with pytest.raises(ValueError):
        plot_reward_vs_cost_grid([[dict(panel, results=[dict(pts[0], x=0.0)])]],
                                 tmp_path / "bad.png")
    with pytest.raises(ValueError):
        plot_reward_vs_cost_grid([], tmp_path / "empty.png")
