"""Built-in reward sources against hand-written preference pairs, with the real models.

Each file in tests/data/reward_pairs/ holds (prompt, better, worse[, options]) rows written for
this project, where ``better`` is clearly better for that one objective. A reward passes when it
scores ``better`` strictly above ``worse`` on at least 90% of its pairs. Run with ``-s`` to see
the accuracies.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from alignserve.engine.model_store import resolve_model  # noqa: E402
from alignserve.value_models.base import RewardOptionError, RewardSource  # noqa: E402
from alignserve.value_models.rewards import (  # noqa: E402
    ConciseReward,
    HFClassifierReward,
    HFNextTokenScorer,
    JsonReward,
    JudgeReward,
    KeywordsReward,
    NextTokenScorer,
    RegexReward,
    default_rewards,
    minilm_model_dir,
)

PAIRS = Path(__file__).parent / "data" / "reward_pairs"
BUILTINS = ["sentiment", "vader", "non_toxic", "concise", "keywords", "regex", "json", "judge"]


@pytest.fixture(scope="module")
def rewards() -> dict[str, RewardSource]:
    return default_rewards(resolve_model(None, progress=False))


def load_pairs(name: str) -> list[dict[str, Any]]:
    with open(PAIRS / f"{name}.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def test_registry(rewards: dict[str, RewardSource]) -> None:
    assert set(BUILTINS) | {"length"} == set(rewards)
    for name, src in rewards.items():
        assert isinstance(src, RewardSource)
        assert src.info.name == name and src.info.kind == "reward"
        lo, hi = src.info.range
        assert math.isfinite(lo) and math.isfinite(hi) and lo < hi
    assert "judge" not in default_rewards()  # no scorer, no judge


@pytest.mark.parametrize("name", BUILTINS)
def test_pair_accuracy(rewards: dict[str, RewardSource], name: str) -> None:
    rows = load_pairs(name)
    assert len(rows) >= 30
    prompts = [r["prompt"] for r in rows]
    opts = [r.get("options", {}) for r in rows]
    src = rewards[name]
    better = src.score(prompts, [r["better"] for r in rows], opts)
    worse = src.score(prompts, [r["worse"] for r in rows], opts)
    lo, hi = src.info.range
    assert all(lo <= s <= hi for s in better + worse), "score outside documented range"
    wins = [b > w for b, w in zip(better, worse, strict=True)]
    acc = sum(wins) / len(wins)
    misses = [i for i, ok in enumerate(wins) if not ok]
    print(f"\n[pairs] {name}: {acc:.1%} ({sum(wins)}/{len(wins)}) misses={misses}")
    assert acc >= 0.9


# ---------------------------------------------------------------------------- batching


BATCH_ROWS: dict[str, list[tuple[str, str, dict[str, Any]]]] = {
    "sentiment": [("q", "What a lovely surprise, thank you!", {}),
                  ("q2", "This is the worst service I have ever had.", {}),
                  ("q3", "The meeting is at three.", {})],
    "vader": [("q", "Great job!!", {}), ("q", "meh", {}), ("q", "I hate this.", {})],
    "non_toxic": [("q", "Have a nice day.", {}), ("q", "shut up you idiot", {})],
    "concise": [("q", "one two three", {"target_words": 3}),
                ("q", "one two three", {"target_words": 30}),
                ("q", "one two three four five six", {})],
    "length": [("q", "one two", {"target_words": 2}), ("q", "a b c d", {"target_words": 1})],
    "keywords": [("q", "Cats and dogs", {"keywords": ["cat", "dogs"]}),
                 ("q", "concatenate the cat", {"keywords": ["cat"]}),
                 ("q", "Ice  Cream is nice", {"keywords": ["ice cream", "cake", "nice"]})],
    "regex": [("q", "Call 555-123-4567", {"pattern": r"\d{3}-\d{3}-\d{4}"}),
              ("q", "HELLO", {"pattern": "hello", "flags": "i"}),
              ("q", "HELLO", {"pattern": "hello"})],
    "json": [("q", '{"a": 1}', {"required_keys": ["a"]}), ("q", "x {\"a\": 1} y", {}),
             ("q", "nope", {}), ("q", '{"a": 1}', {"required_keys": ["b"]})],
    "judge": [("How do I boil an egg?", "Boil it for nine minutes, then cool it.", {}),
              ("What is 2+2?", "Go away, idiot.", {"question": "Is the reply polite?"}),
              ("Name a colour.", "Blue.", {}),
              ("Write a long greeting.", "Hello there, it is truly wonderful to meet you "
               "today, I hope your week has been going well and that you are happy.", {})],
}


@pytest.mark.parametrize("name", sorted(BATCH_ROWS))
def test_batch_equals_one_by_one(rewards: dict[str, RewardSource], name: str) -> None:
    rows = BATCH_ROWS[name]
    prompts, responses, opts = map(list, zip(*rows, strict=True))
    batched = rewards[name].score(prompts, responses, opts)
    single = [rewards[name].score([p], [r], [o])[0] for p, r, o in rows]
    np.testing.assert_allclose(batched, single, rtol=1e-4, atol=1e-4)


def test_empty_batch_and_length_mismatch(rewards: dict[str, RewardSource]) -> None:
    for name in BUILTINS:
        assert rewards[name].score([], [], []) == []
    with pytest.raises(ValueError):
        rewards["vader"].score(["a", "b"], ["x"])
    with pytest.raises(ValueError):
        rewards["vader"].score(["a"], ["x"], [{}, {}])


def test_known_values() -> None:
    concise = ConciseReward()
    # 3 words vs target 3 -> exp(0) = 1; 6 words vs 3 -> exp(-1); default target 30, 15 words
    # -> exp(-0.5).
    got = concise.score(["", "", ""], ["a b c", "a b c d e f", " ".join(["w"] * 15)],
                        [{"target_words": 3}, {"target_words": 3}, None])
    np.testing.assert_allclose(got, [1.0, math.exp(-1), math.exp(-0.5)])
    kw = KeywordsReward()
    # "cat" must not match inside "concatenate"; "ice cream" matches across double spaces.
    assert kw.score([""], ["concatenate"], [{"keywords": ["cat"]}]) == [0.0]
    assert kw.score([""], ["ICE  cream, no cake"], [{"keywords": ["ice cream", "pie"]}]) == [0.5]
    js = JsonReward()
    assert js.score_one('```json\n{"a": [1, 2]}\n```', ["a"]) == 1.0
    assert js.score_one("[1, 2, 3]") == 1.0
    assert js.score_one('Here: {"a": 1} done.', ["a"]) == 0.5
    assert js.score_one('{"a": 1}', ["b"]) == 0.25
    assert js.score_one("42") == 0.0  # bare scalars are not structured output
    assert js.score_one("{a: 1}") == 0.0


# ---------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("name", "opts", "field"),
    [
        ("concise", {"target_words": 0}, "alignment.options.concise.target_words"),
        ("concise", {"target_words": 2001}, "alignment.options.concise.target_words"),
        ("concise", {"target_words": "ten"}, "alignment.options.concise.target_words"),
        ("concise", {"target_words": True}, "alignment.options.concise.target_words"),
        ("concise", {"target_words": 2.5}, "alignment.options.concise.target_words"),
        ("length", {"target_words": -3}, "alignment.options.length.target_words"),
        ("concise", {"target": 10}, "alignment.options.concise.target"),
        ("keywords", {}, "alignment.options.keywords.keywords"),
        ("keywords", {"keywords": []}, "alignment.options.keywords.keywords"),
        ("keywords", {"keywords": "cat"}, "alignment.options.keywords.keywords"),
        ("keywords", {"keywords": ["x"] * 33}, "alignment.options.keywords.keywords"),
        ("keywords", {"keywords": ["ok", "  "]}, "alignment.options.keywords.keywords"),
        ("regex", {}, "alignment.options.regex.pattern"),
        ("regex", {"pattern": "(unclosed"}, "alignment.options.regex.pattern"),
        ("regex", {"pattern": "a" * 501}, "alignment.options.regex.pattern"),
        ("regex", {"pattern": "(a+)+$"}, "alignment.options.regex.pattern"),
        ("regex", {"pattern": r"(\w+\s?)*x"}, "alignment.options.regex.pattern"),
        ("regex", {"pattern": r"(a)\1"}, "alignment.options.regex.pattern"),
        ("regex", {"pattern": "a", "flags": "x"}, "alignment.options.regex.flags"),
        ("json", {"required_keys": "id"}, "alignment.options.json.required_keys"),
        ("json", {"required_keys": [1]}, "alignment.options.json.required_keys"),
        ("judge", {"question": ""}, "alignment.options.judge.question"),
        ("judge", {"question": "?" * 501}, "alignment.options.judge.question"),
        ("vader", {"anything": 1}, "alignment.options.vader.anything"),
    ],
)
def test_option_errors_name_the_field(rewards: dict[str, RewardSource], name: str,
                                      opts: dict[str, Any], field: str) -> None:
    with pytest.raises(RewardOptionError) as err:
        rewards[name].score(["p"], ["r"], [opts])
    assert err.value.field == field
    assert str(err.value)
    # The same error comes from the cheap up-front check the server can call while parsing.
    with pytest.raises(RewardOptionError):
        rewards[name].validate_options(opts)  # type: ignore[attr-defined]


def test_regex_accepts_safe_bounded_nesting() -> None:
    rx = RegexReward()
    assert rx.score([""], ["gw 10.0.0.1"], [{"pattern": r"(\d{1,3}\.){3}\d{1,3}"}]) == [1.0]
    assert rx.score([""], ["aaab"], [{"pattern": r"(?>a+)+b"}]) == [1.0]  # atomic: no backtrack


# ---------------------------------------------------------------------------- judge / classifier


def test_judge_uses_any_next_token_scorer(rewards: dict[str, RewardSource]) -> None:
    judge = rewards["judge"]
    assert isinstance(judge, JudgeReward)
    scorer = judge.scorer
    assert isinstance(scorer, NextTokenScorer) and isinstance(scorer, HFNextTokenScorer)
    text = judge.format("Hi?", "Hello!", "Is this a good answer?")
    assert "Hello!" in text and text.rstrip().endswith("assistant")
    logits = scorer.next_token_logits([text, text + " "])
    assert logits.ndim == 2 and logits.shape[0] == 2


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MiniLM with a freshly initialised 2-label head: a real local classifier folder."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    src = minilm_model_dir()
    out = tmp_path_factory.mktemp("clf")
    model = AutoModelForSequenceClassification.from_pretrained(
        src, num_labels=2, id2label={0: "NEG", 1: "POS"}, label2id={"NEG": 0, "POS": 1})
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def test_hf_classifier(tiny_classifier: Path) -> None:
    by_name = HFClassifierReward(tiny_classifier, label="pos")
    by_index = HFClassifierReward(tiny_classifier, label=1, output="logit", name="clf_logit")
    prompts, responses = ["a", "b", "c"], ["I loved it", "terrible", "ok then, fine"]
    prob = by_name.score(prompts, responses)
    assert all(0.0 <= p <= 1.0 for p in prob)
    logit = by_index.score(prompts, responses)
    single = [by_name.score([p], [r])[0] for p, r in zip(prompts, responses, strict=True)]
    np.testing.assert_allclose(prob, single, atol=1e-5)
    neg = HFClassifierReward(tiny_classifier, label="NEG", output="logit").score(prompts,
                                                                              responses)
    # softmax over two labels: P(POS) = sigmoid(logit_POS - logit_NEG)
    expect = 1 / (1 + np.exp(-(np.array(logit) - np.array(neg))))
    np.testing.assert_allclose(prob, expect, atol=1e-5)
    paired = HFClassifierReward(tiny_classifier, label=1, pair=True, name="clf_pair")
    assert len(paired.score(prompts, responses)) == 3
    with pytest.raises(ValueError, match="NEG"):
        HFClassifierReward(tiny_classifier, label="neutral").score(["a"], ["b"])
