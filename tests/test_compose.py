"""Reward composition: every expected number below is worked out by hand in the comments.

Useful constants: log sigmoid(x) = -ln(1 + e^-x), so
  log s(0) = -ln 2 = -0.693147,  log s(1) = -0.313262,  log s(-1) = -1.313262,
  log s(2) = -0.126928,  log s(-2) = -2.126928,  log s(5) = -0.006715,  log s(-5) = -5.006715.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from alignserve.value_models.base import RewardInfo, RewardOptionError
from alignserve.value_models.compose import (
    WeightError,
    combine,
    score_objectives,
    transform_rewards,
    validate_transform,
    validate_weights,
)
from alignserve.value_models.rewards import ConciseReward, KeywordsReward

LS0, LS1, LSM1 = -0.693147, -0.313262, -1.313262
LS2, LSM2, LS5, LSM5 = -0.126928, -2.126928, -0.006715, -5.006715


def close(got: np.ndarray, want: list[float]) -> None:
    np.testing.assert_allclose(got, want, atol=1e-6)


# ---------------------------------------------------------------------------- transforms


def test_identity_combine_no_normalisation() -> None:
    # row 0: 2*1.0 + (-1)*0.5 = 1.5 ; row 1: 2*2.0 + (-1)*(-1.0) = 5.0
    # (sum of weights is 1; dividing by it would change nothing here, but see the next case)
    per = {"a": np.array([1.0, 2.0]), "b": np.array([0.5, -1.0])}
    close(combine(per, {"a": 2.0, "b": -1.0}), [1.5, 5.0])
    # weights sum to 0: combined = 1*a - 1*a' must still be well defined: [1-0.5, 2+1] = [0.5, 3]
    close(combine(per, {"a": 1.0, "b": -1.0}), [0.5, 3.0])
    # scale matters: weight 5 gives 5x the score of weight 1 (no division by sum(w))
    close(combine(per, {"a": 5.0}), [5.0, 10.0])


def test_log_sigmoid_scalar_and_per_row_refs() -> None:
    r = np.array([0.0, 2.0])
    # scalar ref 0: [log s(0), log s(2)]
    close(transform_rewards(r, "log_sigmoid", 0.0), [LS0, LS2])
    # per-row refs [1, 1]: [log s(-1), log s(1)]
    close(transform_rewards(r, "log_sigmoid", [1.0, 1.0]), [LSM1, LS1])
    # weight 3: [3 * -0.693147, 3 * -0.126928] = [-2.079442, -0.380784]
    close(combine({"a": r}, {"a": 3.0}, "log_sigmoid", refs={"a": 0.0}), [-2.079442, -0.380784])


def test_log_sigmoid_reference_sets_use_median() -> None:
    # row sets [0, 1, 5] (median 1) and [2, 4] (median 3); r = [1, 2]
    # -> [log s(1 - 1), log s(2 - 3)] = [log s(0), log s(-1)]
    got = transform_rewards([1.0, 2.0], "log_sigmoid", [[0.0, 1.0, 5.0], [2.0, 4.0]])
    close(got, [LS0, LSM1])
    # same with a 2-D array: rows [0, 2] (median 1) and [4, 6] (median 5); r = [3, 0]
    # -> [log s(2), log s(-5)]
    got = transform_rewards([3.0, 0.0], "log_sigmoid", np.array([[0.0, 2.0], [4.0, 6.0]]))
    close(got, [LS2, LSM5])


def test_log_sigmoid_defaults_to_group_median() -> None:
    # no refs, one group [0, 2, 4] -> median 2 -> [log s(-2), log s(0), log s(2)]
    close(transform_rewards([0.0, 2.0, 4.0], "log_sigmoid"), [LSM2, LS0, LS2])
    # two prompts: p = {0, 2} (median 1), q = {10, 20} (median 15)
    # -> [log s(-1), log s(1), log s(-5), log s(5)]
    got = transform_rewards([0.0, 2.0, 10.0, 20.0], "log_sigmoid", groups=["p", "p", "q", "q"])
    close(got, [LSM1, LS1, LSM5, LS5])


def test_log_sigmoid_stays_finite_for_huge_gaps() -> None:
    # log s(-1000) = -1000 - ln(1 + e^-1000) = -1000 exactly in float64; log s(1000) = 0
    got = transform_rewards([-1000.0, 1000.0], "log_sigmoid", 0.0)
    close(got, [-1000.0, 0.0])


def test_quantile_mid_rank() -> None:
    base = [1.0, 2.0, 2.0, 3.0]  # M = 4, one set shared by all rows (given per row)
    r = [2.0, 2.5, 0.0, 3.0, 4.0]
    # 2.0: less=1 (1), equal=2 -> (1 + 0.5*2)/4 = 0.5
    # 2.5: less=3 -> 3/4 = 0.75 ; 0.0: 0/4 = 0 ; 3.0: (3 + 0.5)/4 = 0.875 ; 4.0: 4/4 = 1
    close(transform_rewards(r, "quantile", [base] * 5), [0.5, 0.75, 0.0, 0.875, 1.0])


def test_quantile_defaults_to_candidates_and_groups() -> None:
    # candidates are the base samples: [3, 1, 2] -> (rank + 0.5)/3 = [2.5/3, 0.5/3, 1.5/3]
    close(transform_rewards([3.0, 1.0, 2.0], "quantile"), [0.833333, 0.166667, 0.5])
    # all tied: each sees 0 below and 2 equal -> (0 + 1)/2 = 0.5
    close(transform_rewards([5.0, 5.0], "quantile"), [0.5, 0.5])
    # groups: p = {1, 9} -> [0.25, 0.75]; q = {100} alone -> 0.5
    close(transform_rewards([1.0, 9.0, 100.0], "quantile", groups=["p", "p", "q"]),
          [0.25, 0.75, 0.5])
    # a per-row scalar reference is a set of size 1: below -> 0, equal -> 0.5, above -> 1
    close(transform_rewards([0.0, 1.0, 2.0], "quantile", [1.0, 1.0, 1.0]), [0.0, 0.5, 1.0])


def test_combine_mixed_transforms_and_scales() -> None:
    # "judge" in logits, "kw" in [0, 1]; one prompt, three candidates that are base samples.
    per = {"judge": np.array([-4.0, 0.0, 8.0]), "kw": np.array([1.0, 0.5, 0.0])}
    # quantile both: judge -> [1/6, 3/6, 5/6], kw -> [5/6, 3/6, 1/6]
    # weights 1 and 1: every row sums to 1.0 -- equal weights mean equal importance
    close(combine(per, {"judge": 1.0, "kw": 1.0}, "quantile"), [1.0, 1.0, 1.0])
    # per-objective transforms: judge log_sigmoid vs median 0 -> [log s(-4), log s(0), log s(8)]
    #   log s(-4) = -4.018150, log s(8) = -0.000335 ; kw identity
    # 0.5*judge + 2*kw = [-2.009075 + 2, -0.346574 + 1, -0.000168 + 0]
    got = combine(per, {"judge": 0.5, "kw": 2.0}, {"judge": "log_sigmoid"})
    close(got, [-0.009075, 0.653426, -0.000168])


def test_combine_zero_weight_skips_objective_and_errors() -> None:
    per = {"a": np.array([1.0, 2.0]), "bad": np.array([np.nan, 1.0])}
    close(combine(per, {"a": 1.0, "bad": 0.0}), [1.0, 2.0])  # 0 * NaN never computed
    with pytest.raises(ValueError, match="non-finite"):
        combine(per, {"bad": 1.0})
    with pytest.raises(ValueError, match="no scores"):
        combine(per, {"missing": 1.0})
    with pytest.raises(ValueError):
        combine({"a": [1.0], "b": [1.0, 2.0]}, {"a": 1.0, "b": 1.0})
    with pytest.raises(ValueError):
        transform_rewards([1.0, 2.0], "log_sigmoid", [1.0])  # wrong number of refs
    with pytest.raises(ValueError):
        transform_rewards([1.0], "softmax")


def test_score_objectives_end_to_end() -> None:
    sources = {"concise": ConciseReward(), "keywords": KeywordsReward()}
    responses = ["red green", "red green blue yellow"]
    options = [{"concise": {"target_words": 2}, "keywords": {"keywords": ["blue"]}},
               {"concise": {"target_words": 2}, "keywords": {"keywords": ["blue"]}}]
    weights = {"concise": 1.0, "keywords": 2.0}
    per = score_objectives(sources, weights, ["q", "q"], responses, options)
    # concise: exp(0) = 1, exp(-|4-2|/2) = exp(-1) = 0.367879 ; keywords: 0, 1
    close(per["concise"], [1.0, 0.367879])
    close(per["keywords"], [0.0, 1.0])
    # combined: [1 + 0, 0.367879 + 2] = [1.0, 2.367879]
    close(combine(per, weights), [1.0, 2.367879])


# ---------------------------------------------------------------------------- validation


AVAILABLE = {
    "vader": RewardInfo("vader", "reward", "d", (-1.0, 1.0)),  # default weight range [-10, 10]
    "judge": RewardInfo("judge", "reward", "d", (-30.0, 30.0), weight_range=(0.0, 5.0)),
}


def test_validate_weights_ok() -> None:
    got = validate_weights({"vader": 2, "judge": 0.5}, AVAILABLE)
    assert got == {"vader": 2.0, "judge": 0.5}
    assert all(type(v) is float for v in got.values())
    assert validate_weights({"vader": -10, "judge": 5}, AVAILABLE)  # bounds are inclusive


@pytest.mark.parametrize(
    ("weights", "field", "fragment"),
    [
        ({"foo": 1.0}, "alignment.weights.foo", "available: judge, vader"),
        ({"vader": math.nan}, "alignment.weights.vader", "[-10, 10]"),
        ({"vader": math.inf}, "alignment.weights.vader", "finite"),
        ({"vader": -math.inf}, "alignment.weights.vader", "finite"),
        ({"vader": 10.5}, "alignment.weights.vader", "[-10, 10]"),
        ({"judge": -0.1}, "alignment.weights.judge", "[0, 5]"),
        ({"judge": 6}, "alignment.weights.judge", "[0, 5]"),
        ({"vader": "1"}, "alignment.weights.vader", "number"),
        ({"vader": True}, "alignment.weights.vader", "number"),
        ({}, "alignment.weights", "at least one"),
        ([("vader", 1.0)], "alignment.weights", "object"),
    ],
)
def test_validate_weights_errors(weights: object, field: str, fragment: str) -> None:
    with pytest.raises(WeightError) as err:
        validate_weights(weights, AVAILABLE)
    assert err.value.field == field
    assert fragment in str(err.value)
    assert isinstance(err.value, ValueError) and isinstance(err.value, RewardOptionError)


def test_validate_transform() -> None:
    assert validate_transform("quantile") == "quantile"
    assert validate_transform({"vader": "log_sigmoid"}, ["vader"]) == {"vader": "log_sigmoid"}
    with pytest.raises(WeightError) as err:
        validate_transform("softmax")
    assert err.value.field == "alignment.transform" and "identity" in str(err.value)
    with pytest.raises(WeightError) as err:
        validate_transform({"vader": "nope"})
    assert err.value.field == "alignment.transform.vader"
    with pytest.raises(WeightError) as err:
        validate_transform({"judge": "identity"}, ["vader"])
    assert err.value.field == "alignment.transform.judge"
