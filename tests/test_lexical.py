"""Lexical value heads and lexical ARMs: features, training checks, and VAS / CD / GenARM with the
shipped ones on the real model (values from token ids alone, no guidance forward)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT

from alignserve.decoders import AlignmentError, build_decoder
from alignserve.decoders.genarm import mixture
from alignserve.engine.sampling import SamplingParams
from alignserve.engine.scheduler import Engine, EngineConfig, EngineRequest
from alignserve.value_models.heads import load_head, tokenizer_fingerprint
from alignserve.value_models.lexical import (
    UNIT,
    LexicalARM,
    LexicalValueHead,
    Lexicon,
    apply_lexicon,
    contextual_rows,
    featurizer_for,
    lexical_features,
    word_starts,
    word_sum,
)
from alignserve.value_models.registry import Registry
from alignserve.value_models.training import (
    Split,
    TrainConfig,
    arm_sequence_logprobs_exact,
    arm_sequence_logprobs_topk,
    lexical_arm_features,
)

HEADS = ROOT / "alignserve" / "value_models" / "default_heads"


def _random_samples(seed: int, vocab: int = 50, n: int = 5) -> tuple[torch.Tensor, torch.Tensor,
                                                                       list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    samples = [torch.randint(0, vocab, (int(torch.randint(0, 7, (1,), generator=g)),),
                             generator=g).tolist() for _ in range(n)]
    tokens = torch.tensor([t for s in samples for t in s], dtype=torch.long)
    offsets = torch.tensor([0] + [len(s) + 1 for s in samples]).cumsum(0)
    return tokens, offsets, samples


def test_training_features_are_the_prefix_sums_of_each_sample() -> None:
    """State t of a sample reads its first t tokens: [s/32, s/max(t,1), t/32]; a loop over
    every sample (empty ones included) says the same as the vectorised version."""
    table = torch.rand(50, 2, generator=torch.Generator().manual_seed(0))
    tokens, offsets, samples = _random_samples(1)
    feats = lexical_features(table, tokens, offsets)
    rows = []
    for s in samples:
        for t in range(len(s) + 1):
            tot = table[s[:t]].sum(0) if t else torch.zeros(2)
            rows.append(torch.cat([tot / UNIT, tot / max(t, 1), torch.tensor([t / UNIT])]))
    torch.testing.assert_close(feats, torch.stack(rows))


def test_decoding_features_equal_training_features() -> None:
    """What VAS feeds the head for candidate a after history y<t is exactly the training
    feature of state t + 1 of an answer that continued with a."""
    torch.manual_seed(0)
    head = LexicalValueHead(50, 2, hidden=8)
    head.table.copy_(torch.rand(50, 2))
    tokens, offsets, samples = _random_samples(2)
    feats = lexical_features(head.table, tokens, offsets)
    for i, s in enumerate(samples):
        for t in range(len(s)):
            got = head.candidate_inputs(s[:t], [s[t], 7])[0]
            torch.testing.assert_close(got, feats[int(offsets[i]) + t + 1])
            v = head.candidate_values(s[:t], [s[t]])
            torch.testing.assert_close(v, head(feats[int(offsets[i]) + t + 1][None]))


def _toy_lexicon() -> Lexicon:
    """10 tokens; "bad" is offensive (0.9) and splits into " b" + "ad" or " ba" + "d"."""
    texts = [" b", "ad", " ba", "d", " good", ",", "AD", " x", "ads", "."]
    return Lexicon(texts, {"bad": 0.9, "bads": 0.8})


def test_lexicon_reads_whole_words_split_into_tokens() -> None:
    lex = _toy_lexicon()
    assert lex.tail([4, 0]) == "b" and lex.tail([2]) == "ba" and lex.tail([0, 5]) == ""
    # " b" + "ad" / "AD" make "bad", " b" + "ads" makes "bads"
    assert lex.overrides([0]) == {1: 0.9, 6: 0.9, 8: 0.8}
    assert lex.overrides([2]) == {3: 0.9}  # " ba" + "d"
    assert lex.overrides([0, 5]) == {} and lex.overrides([]) == {}
    table = torch.full((10, 1), 0.1)
    rows = apply_lexicon(table[torch.tensor([0, 1, 5, 2, 3, 1])], [0, 1, 5, 2, 3, 1], [6], lex)
    assert rows[:, 0].tolist() == pytest.approx([0.1, 0.9, 0.1, 0.1, 0.9, 0.1])
    # samples do not read each other's tokens: "ad" opening the second sample is no word
    rows = apply_lexicon(table[torch.tensor([0, 1, 0])], [0, 1, 0], [2, 1], lex)
    assert rows[:, 0].tolist() == pytest.approx([0.1, 0.9, 0.1])


def test_decoding_features_equal_training_features_with_a_lexicon() -> None:
    torch.manual_seed(0)
    head = LexicalValueHead(10, 1, hidden=8)
    head.table.copy_(torch.rand(10, 1) * 0.2)
    head.lexicon = _toy_lexicon()
    samples = [[0, 1, 5, 2, 3], [4, 0, 6, 9], [], [2, 3, 8], [0, 8, 1, 7]]
    tokens = torch.tensor([t for s in samples for t in s], dtype=torch.long)
    offsets = torch.tensor([0] + [len(s) + 1 for s in samples]).cumsum(0)
    feats = lexical_features(head.table, tokens, offsets, head.lexicon)
    plain = lexical_features(head.table, tokens, offsets)
    assert not torch.equal(feats, plain)  # some sample completes "bad"
    for i, s in enumerate(samples):
        for t in range(len(s)):
            got = head.candidate_inputs(s[:t], [s[t], 7])[0]
            torch.testing.assert_close(got, feats[int(offsets[i]) + t + 1])


def test_lexical_arm_context_delta_follows_the_lexicon() -> None:
    arm = LexicalARM(10, 1, hidden=4)
    arm.table.copy_(torch.full((10, 1), 0.1))
    arm.table[7, 0] = 1.0  # spread, so the standardisation is defined
    torch.nn.init.normal_(arm.fc2.weight)
    arm.lexicon = _toy_lexicon()
    arm.eval()
    d = arm.context_delta([0], 12)
    assert d.shape == (12,) and set(d.nonzero()[:, 0].tolist()) == {1, 6, 8}
    feats = arm.table[[1]].clone()
    feats[0, 0] = 0.9
    with torch.no_grad():
        want = float(arm.bias_of(feats)[0] - arm.bias()[1])
    assert float(d[1]) == pytest.approx(want, abs=1e-6)
    assert not arm.context_delta([0, 5], 12).any()


_SUM_TEXTS = [" b", "ad", " ba", "d", " good", ",", "AD", " x", "ads", ".", "bad", " bad"]
_SUM_WORDS = {"bad": 3.0, "bads": 2.0, "ba": -1.0, "good": -0.5, "ad": 0.25}


def _sum_lexicon() -> tuple[Lexicon, torch.Tensor]:
    """A "sum" lexicon over 12 tokens and its table (``word_sum`` of each token's text)."""
    table = torch.tensor([[word_sum(t, _SUM_WORDS)] for t in _SUM_TEXTS])
    return Lexicon(_SUM_TEXTS, _SUM_WORDS, "sum"), table


def test_sum_lexicon_features_add_up_to_the_words_of_the_text() -> None:
    """Whatever the tokenization, a sample's features sum to ``word_sum`` of its text: the
    word in progress counts as the word it has become so far (" ba" is -1, " ba" + "d" is
    "bad": +3 in all)."""
    lex, table = _sum_lexicon()
    samples = [[2, 3], [0, 1], [0, 8, 5, 2], [4, 0, 6, 9, 11], [2, 3, 8, 1], [10, 1], [7]]
    tokens = torch.tensor([t for s in samples for t in s])
    rows = contextual_rows(table, tokens, [len(s) for s in samples], lex)[:, 0]
    pos = 0
    for s in samples:
        got = float(rows[pos:pos + len(s)].sum())
        pos += len(s)
        assert got == pytest.approx(word_sum("".join(_SUM_TEXTS[t] for t in s), _SUM_WORDS))
    # the step that turns " ba" into "bad" reads bad - ba, and "bad" + "ad" makes no word
    assert lex.feature("ba", 3, float(table[3, 0])) == pytest.approx(4.0)
    assert lex.feature("bad", 1, float(table[1, 0])) == pytest.approx(-3.0)
    assert lex.feature("", 1, 0.25) == 0.25 and lex.feature("bad", 5, 0.0) == 0.0
    # deltas over the whole vocabulary (ARMs) and for some candidates (value heads) agree
    dense = lex.deltas([2], table[:, 0])
    some = lex.deltas([2], table[:, 0], torch.tensor([3, 5, 1, 11]))
    assert dense is not None and some is not None
    assert torch.allclose(dense[[3, 5, 1, 11]], some)
    for a in range(len(_SUM_TEXTS)):
        want = lex.feature("ba", a, float(table[a, 0])) - float(table[a, 0])
        assert float(dense[a]) == pytest.approx(want)
    assert lex.deltas([2, 5], table[:, 0]) is None  # the answer ends outside a word


def test_decoding_features_equal_training_features_with_a_sum_lexicon() -> None:
    torch.manual_seed(0)
    lex, table = _sum_lexicon()
    head = LexicalValueHead(12, 1, hidden=8)
    head.table.copy_(table)
    head.lexicon = lex
    samples = [[0, 1, 5, 2, 3], [4, 0, 6, 9], [], [2, 3, 8], [0, 8, 1, 7], [10, 1, 11]]
    tokens = torch.tensor([t for s in samples for t in s], dtype=torch.long)
    offsets = torch.tensor([0] + [len(s) + 1 for s in samples]).cumsum(0)
    feats = lexical_features(head.table, tokens, offsets, lex)
    assert not torch.equal(feats, lexical_features(head.table, tokens, offsets))
    for i, s in enumerate(samples):
        for t in range(len(s)):
            got = head.candidate_inputs(s[:t], [s[t], 7, 13])  # 13: past the table
            torch.testing.assert_close(got[0], feats[int(offsets[i]) + t + 1])


def _sum_arm() -> tuple[LexicalARM, Lexicon, torch.Tensor]:
    """A lexical ARM (eval mode, random output layer) over ``_sum_lexicon``."""
    lex, table = _sum_lexicon()
    arm = LexicalARM(12, 1, hidden=4)
    arm.table.copy_(table)
    torch.nn.init.normal_(arm.fc2.weight)
    arm.lexicon = lex
    arm.eval()
    return arm, lex, table


def test_lexical_arm_context_delta_with_a_sum_lexicon() -> None:
    arm, lex, table = _sum_arm()
    d = arm.context_delta([2], 14)  # after " ba": every token that continues the word changes
    changed = {a for a in range(12) if lex.feature("ba", a, float(table[a, 0]))
               != float(table[a, 0])}
    assert set(d.nonzero()[:, 0].tolist()) <= changed and 3 in changed
    feats = table[[3]].clone()
    feats[0, 0] = lex.feature("ba", 3, float(table[3, 0]))
    with torch.no_grad():
        assert float(d[3]) == pytest.approx(float(arm.bias_of(feats)[0] - arm.bias()[3]),
                                             abs=1e-6)
    assert d[12:].eq(0).all() and not arm.context_delta([2, 5], 14).any()


def test_lexical_arm_caches_the_delta_per_word_in_progress() -> None:
    """In eval mode the bias change is kept per word in progress: another history ending in
    the same word reads the cached change, which equals a fresh computation at any width;
    ``train()``, a new lexicon and new weights drop the cache, and training mode never fills
    it."""
    arm, lex, table = _sum_arm()
    first = arm.context_delta([2], 14)
    assert list(arm._deltas) == [("ba", arm.table.device)]
    again = arm.context_delta([4, 5, 2], 14)  # another history ending in the same word
    assert torch.equal(first, again) and len(arm._deltas) == 1
    assert torch.equal(arm.context_delta([2], 9), first[:9])  # narrower width, same cache
    arm.train()
    assert not arm._deltas
    fresh = arm.context_delta([2], 14)  # training mode: computed, never cached
    assert torch.allclose(fresh, first, atol=1e-6) and not arm._deltas
    arm.eval()
    arm.context_delta([2], 14)
    arm.lexicon = lex  # a new lexicon, or new weights, drop what was cached
    assert not arm._deltas and not arm._cache
    arm.context_delta([2], 14)
    arm.load_state_dict(arm.state_dict())
    assert not arm._deltas and not arm._cache


@pytest.mark.parametrize("combine", ["none", "max", "sum"])
def test_lexical_arm_bias_at_some_ids_is_the_dense_bias_there(combine: str) -> None:
    """Remote GenARM reads the bias of the remote's top-k only (``bias_at``): the same numbers
    as the full-vocabulary bias plus context delta, ids past the table included."""
    lex, table = _sum_lexicon()
    arm = LexicalARM(12, 1, hidden=4)
    arm.table.copy_(table)
    torch.nn.init.normal_(arm.fc2.weight)
    arm.lexicon = {"none": None, "max": _toy_lexicon(), "sum": lex}[combine]
    arm.eval()
    ids = [3, 1, 13, 0, 8, 11]
    for history in ([], [2], [0], [2, 5], [4, 0]):
        dense = arm.bias(14) + arm.context_delta(history, 14)
        assert torch.allclose(arm.bias_at(history, ids), dense[ids], atol=1e-6)


def test_profanity_linear_words_are_the_classifiers_linear_score() -> None:
    """alt-profanity-check's decision on a text is the sum of our word scores over the text
    divided by the norm of its TF-IDF vector, plus the intercept (scikit-learn's own analyzer
    gives the counts); the shipped tokenizer's pieces add up to the same sum."""
    import numpy as np
    from profanity_check import profanity_check as pc

    from alignserve.value_models.lexical import profanity_linear_words

    words = profanity_linear_words()
    vec, model = pc.vectorizer, pc.model
    folds = model.calibrated_classifiers_
    for text in ["You are a fucking idiot, shut up.", "What a lovely kitchen table.",
                 "That homophobe called him a dick!", "the the and of"]:
        x = vec.transform([text])
        dec = np.mean([c.estimator.decision_function(x)[0] for c in folds])
        counts: dict[str, int] = {}
        for w in vec.build_analyzer()(text):
            if w in vec.vocabulary_:
                counts[w] = counts.get(w, 0) + 1
        norm = float(np.sqrt(sum((n * vec.idf_[vec.vocabulary_[w]]) ** 2
                                 for w, n in counts.items())))
        icpt = float(np.mean([c.estimator.intercept_[0] for c in folds]))
        lin = word_sum(text, words) / norm + icpt if norm else icpt
        assert dec == pytest.approx(lin, abs=1e-6)
    assert word_sum("You are a fucking idiot", words) > 40 > word_sum("a lovely table", words)


def test_candidates_past_the_table_read_zero() -> None:
    """A model may have more embedding slots than its tokenizer has tokens: such a candidate
    reads feature 0 instead of failing the request."""
    head = LexicalValueHead(50, 1, hidden=4)
    head.table.fill_(1.0)
    x = head.candidate_inputs([3, 4], [5, 60])
    torch.testing.assert_close(x[:, 0] * UNIT, torch.tensor([3.0, 2.0]))


def test_word_start_feature_counts_words() -> None:
    texts = [" the", "cat", "\n", " sat", ".", "  "]
    assert word_starts(texts).squeeze(1).tolist() == [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]


@pytest.mark.parametrize(("kw", "needle"), [
    ({"kind": "value", "reward": "vader"}, "--lexical needs exactly one reward"),
    ({"kind": "value", "reward": "concise,non_toxic"}, "--lexical needs exactly one reward"),
    ({"kind": "q", "reward": "concise"}, "--lexical is for value heads and ARMs"),
    ({"kind": "arm", "reward": "concise", "pool": "mean"}, "takes no --pool"),
    ({"kind": "value", "reward": "concise", "pool": "mean"}, "takes no --pool"),
    ({"kind": "value", "reward": "concise", "backbone_layers": 4}, "takes no --pool"),
    ({"kind": "arm", "reward": "sentiment", "prompts": 3}, "--prompts must be >= 4"),
    ({"kind": "arm", "reward": "concise", "arm_reward": "bonus"}, "--arm-reward must be one"),
    ({"kind": "value", "reward": "sentimnt"}, r"unknown reward source\(s\) \['sentimnt'\]"),
    ({"kind": "arm", "reward": "concise", "arm_reward": "token", "lexical": False},
     "--arm-reward is for lexical ARMs"),
    ({"kind": "value", "reward": "concise", "arm_reward": "token"},
     "--arm-reward is for lexical ARMs"),
    ({"kind": "value", "reward": "concise", "featurizer": "bag"}, "--featurizer must be one"),
    ({"kind": "value", "reward": "concise", "featurizer": "word_starts", "lexical": False},
     "are for lexical heads"),
    ({"kind": "value", "reward": "concise", "word_fit_alpha": 30.0},
     "--word-fit-alpha is for a featurizer fitted to the reward .* this head's is 'word_sta"),
    ({"kind": "value", "reward": "sentiment", "word_fit_alpha": 0.0},
     "--word-fit-alpha must be finite and > 0"),
    ({"kind": "value", "reward": "sentiment", "word_fit_alpha": float("inf")},
     "--word-fit-alpha must be finite and > 0"),
    ({"kind": "value", "reward": "sentiment", "featurizer": "minilm_sentiment",
      "word_fit_alpha": 30.0}, "this head's is 'minilm_sentiment'"),
])
def test_lexical_training_settings_are_checked_before_sampling(kw, needle) -> None:
    with pytest.raises(ValueError, match=needle):
        TrainConfig(**{"out": "/tmp/x", "lexical": True, **kw}).resolved()


def test_a_lexical_arm_is_trained_as_a_per_token_reward_by_default() -> None:
    lex = TrainConfig(kind="arm", reward="concise", out="/tmp/x", lexical=True).resolved()
    assert lex.arm_reward == "token"
    states = TrainConfig(kind="arm", reward="concise", out="/tmp/x").resolved()
    assert states.arm_reward is None  # an ARM on model states has no such choice


def test_token_reward_is_the_sum_of_the_tokens_scores_in_context() -> None:
    """The ``"token"`` reward of a lexical ARM: sum_t b(y_t), read from each token's
    in-context feature (``lex_y``), not from its table row. An unknown form is refused, also
    from a manifest."""
    from types import SimpleNamespace

    from alignserve.value_models.heads import HeadError, build_module
    from alignserve.value_models.training import lexical_token_rewards

    torch.manual_seed(0)
    arm = LexicalARM(6, 1, hidden=4, reward_form="token")
    arm.table.copy_(torch.tensor([[0.0], [1.0], [2.0], [-1.0], [0.5], [3.0]]))
    torch.nn.init.normal_(arm.fc2.weight)
    b = arm.bias().detach()
    # two samples: tokens [1, 2] and [5, 3, 3] (their lex_y: the table rows, 1 more in row 1)
    lex_y = arm.table[[1, 2, 5, 3, 3]].clone()
    lex_y[1, 0] += 1.0  # an in-context feature (a word completed) differs from the table's
    split = SimpleNamespace(lex_y=lex_y, lengths=torch.tensor([3, 4]),
                            tokens=torch.tensor([1, 2, 5, 3, 3]), offsets=torch.tensor([0, 3, 7]))
    got = lexical_token_rewards(arm, split, [0, 1]).detach()
    with torch.no_grad():
        first = float(b[1] + arm.bias_of(lex_y[1:2])[0])
    assert abs(first - float(b[1] + b[2])) > 1e-3  # the context matters here
    assert got.tolist() == pytest.approx([first, float(b[5] + 2 * b[3])], abs=1e-5)
    with pytest.raises(ValueError, match="reward_form must be one of"):
        LexicalARM(6, 1, reward_form="bonus")
    with pytest.raises(HeadError, match="arch: reward_form must be one of"):
        build_module("arm", {"reward_form": "bonus", "lexical": {"vocab": 6, "features": 1}})


def test_no_q_head_from_a_lexical_value_head(tmp_path: Path) -> None:
    from alignserve.value_models.training import run_training

    cfg = TrainConfig(kind="q", reward="concise", out=str(tmp_path / "q"),
                      value_head=str(HEADS / "concise_lex"), run_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="lexical value head: it needs no Q-head"):
        run_training(cfg, log=lambda s: None)
    assert not (tmp_path / "run").exists()  # refused before any sampling


def test_featurizer_names_the_rewards_that_have_one() -> None:
    assert featurizer_for({"concise": 1.0}) == "word_starts"
    assert featurizer_for({"non_toxic": 2.0}) == "profanity_linear"
    assert featurizer_for({"sentiment": 1.0}) == "minilm_words_fit"
    with pytest.raises(ValueError, match="concise"):
        featurizer_for({"vader": 1.0})


def test_minilm_sentiment_featurizer_orders_words_by_the_rewards_sentiment() -> None:
    """The real MiniLM scorer on single words: positive words above the neutral median,
    negative ones below (the table of the first ``sentiment_lex``)."""
    from alignserve.value_models.lexical import minilm_sentiment

    words = [" wonderful", "terrible", " the", "table", " chair", "love", " awful"]
    t = minilm_sentiment(words)[:, 0]
    assert t.shape == (len(words),) and float(t.median()) == 0.0
    assert t[0] > 0.5 and t[5] > 0.5 and t[1] < -0.5 and t[6] < -0.5
    assert abs(float(t[2])) < 0.5



def test_fit_word_scores_learns_what_the_reward_makes_of_words_around_the_prior() -> None:
    """A synthetic reward counts "good" minus "bad" (and nothing else); the prior knows only
    "good". The fit keeps the prior's direction, learns "bad" from the data, leaves neutral
    words near 0, keeps words the answers never use at k times their prior, and picks alpha
    by grouped cross-validation."""
    from alignserve.value_models.lexical import fit_word_scores

    rng = np.random.default_rng(0)
    vocab = ["good", "bad", "table", "chair", "lamp", "door"]
    texts, rewards, groups = [], [], []
    for i in range(400):
        words = list(rng.choice(vocab, size=int(rng.integers(4, 12))))
        texts.append(" ".join(words))
        rewards.append(words.count("good") - words.count("bad") + rng.normal(0, 0.1))
        groups.append(i // 8)
    prior = {"good": 1.0, "unseen": 2.0}
    words, info = fit_word_scores(texts, rewards, groups, prior, alphas=(0.1, 1.0, 100.0))
    assert words["good"] > 0.5 and words["bad"] < -0.5
    assert all(abs(words[w]) < 0.1 for w in ("table", "chair", "lamp", "door"))
    assert info["prior_weight"] > 0 and words["unseen"] == pytest.approx(2 * info["prior_weight"])
    assert info["alpha"] in (0.1, 1.0) and set(info["cv_mse"]) == {"0.1", "1.0", "100.0"}
    assert info["cv_mse"]["100.0"] > info["cv_mse"][str(info["alpha"])]
    with pytest.raises(ValueError, match="prompts"):
        fit_word_scores(texts[:8], rewards[:8], groups[:8], prior)
    with pytest.raises(ValueError, match="reward that varies"):
        fit_word_scores(texts, [1.0] * len(texts), groups, prior)
    # the prior's weight escapes the penalty: a prior equal to the truth, under a penalty that
    # shrinks every word's correction to about a tenth, is kept at full weight (a penalised
    # prior column would shrink too)
    exact = {"good": 1.0, "bad": -1.0}
    words, info = fit_word_scores(texts, rewards, groups, exact, alphas=(1e4,))
    sd = float(np.std(rewards))
    assert info["prior_weight"] == pytest.approx(1 / sd, rel=0.05)
    assert words["good"] == pytest.approx(1 / sd, rel=0.05)
    assert words["bad"] == pytest.approx(-1 / sd, rel=0.05)
    assert abs(words["table"]) < 1e-3


def test_a_fitted_featurizer_has_no_table_without_training_answers() -> None:
    from alignserve.value_models.lexical import lexical_table

    with pytest.raises(ValueError, match="fitted to training answers"):
        lexical_table("minilm_words_fit", None)
    from alignserve.value_models.lexical import fitted_table

    with pytest.raises(ValueError, match="not fitted"):
        fitted_table("minilm_words", None, [], [], [])


def test_the_shipped_fitted_sentiment_words_read_as_whole_words(model_dir: Path) -> None:
    """``sentiment_lex``'s word scores (``minilm_words_fit``, fitted on the base's answers):
    sentiment words point the right way, its table row of a one-word token is that word's
    score, and a word the tokenizer splits reads as the whole word through the sum lexicon."""
    from transformers import AutoTokenizer

    from alignserve.value_models.lexical import apply_lexicon, word_sum

    head = load_head(HEADS / "sentiment_lex")
    fit = head.manifest["arch"]["lexical"]["word_fit"]
    assert fit["prior_weight"] > 0 and fit["answers"] >= 8000
    assert str(fit["alpha"]) in fit["cv_mse"]
    lex = head.module.lexicon
    words = lex.words
    assert words["wonderful"] > 0.1 > -0.1 > words["terrible"]
    assert words["love"] > words["hate"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    (one,) = tok(" wonderful", add_special_tokens=False).input_ids
    assert float(head.module.table[one, 0]) == pytest.approx(words["wonderful"], abs=1e-6)
    for text in (" It was a delightfully unbelievable evening.", " Heartwarming!"):
        ids = tok(text, add_special_tokens=False).input_ids
        rows = apply_lexicon(head.module.rows(ids), ids, [len(ids)], lex)
        assert float(rows[:, 0].sum()) == pytest.approx(word_sum(text, words), abs=1e-4)

# ---- the shipped lexical heads on the real model ---------------------------------------------
@pytest.fixture(scope="module")
def engine(model_dir: Path):
    eng = Engine(EngineConfig(model_dir=model_dir, slots=16, max_len=256, max_waiting=16))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def registry(engine):
    return Registry.build(None, tokenizer_fingerprint(engine.tokenizer),
                          engine.base.config.hidden_size, default_heads=True)


def _run(engine, registry, alignment, seed=3, max_tokens=12):
    text = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tell me what you think of people who cut in line."}],
        add_generation_prompt=True, tokenize=False)
    ids = engine.tokenizer(text, add_special_tokens=False).input_ids
    return engine.generate(EngineRequest(
        prompt_ids=ids, prompt_text=text, resources=registry,
        decoder=build_decoder(alignment, registry=registry),
        params=SamplingParams(temperature=1.0, max_tokens=max_tokens, seed=seed,
                              ignore_eos=True)))


def test_shipped_lexical_heads_load_and_keep_the_conventional_names(engine, registry) -> None:
    for name, featurizer in (("concise_lex", "word_starts"), ("non_toxic_lex", "profanity_linear"),
                             ("sentiment_lex", "minilm_words_fit")):
        h = registry.heads[name]
        assert h.kind == "value" and h.runner == "tokens"
        assert h.manifest["arch"]["lexical"]["featurizer"] == featurizer
        assert h.manifest["metrics"]["spearman_50"] > 0.55
        assert load_head(HEADS / name).module.table.shape == (len(engine.tokenizer), 1)
    margin = registry.heads["sentiment_lex_margin"]  # the first sentiment featurizer, kept
    assert margin.manifest["arch"]["lexical"]["featurizer"] == "minilm_sentiment"
    assert margin.module.lexicon is None and margin.manifest["metrics"]["spearman_50"] > 0.4
    # a weight named by the reward still reads its state-based value head
    assert registry.heads_for("concise", "value").name == "concise_value"
    assert registry.heads_for("non_toxic", "value").name == "non_toxic_value"


@pytest.mark.parametrize(("strategy", "extra"), [("vas", {}), ("cd", {}),
                                               ("vas", {"batched": False})])
def test_lexical_vas_and_cd_need_no_guidance_forward(engine, registry, strategy, extra) -> None:
    plain = _run(engine, registry, None)
    zero = _run(engine, registry, {"strategy": strategy, "weights": {"non_toxic_lex": 0}})
    assert zero["choices"][0]["tokens"] == plain["choices"][0]["tokens"]
    steered = _run(engine, registry, {"strategy": strategy, "weights": {"concise_lex": 20},
                                      **extra})
    assert steered["info"]["values"] == "lexical"
    assert steered["info"]["lexical_heads"] == {"concise_lex": "concise_lex"}
    assert steered["stats"].guidance_forwards == 0  # no tree, no Q-head forward
    assert steered["stats"].candidates_scored == 12 * 20  # top-k 20 valued per token
    assert steered["choices"][0]["tokens"] != plain["choices"][0]["tokens"]


@pytest.mark.parametrize("values", ["tree", "q"])
def test_lexical_heads_mix_with_state_heads(engine, registry, values) -> None:
    res = _run(engine, registry, {"strategy": "vas", "values": values, "top_k": 8,
                                  "weights": {"sentiment": 2, "non_toxic_lex": 4}})
    assert res["info"]["values"] == values
    assert res["completion_tokens"] == 12
    assert res["info"]["lexical_heads"] == {"non_toxic_lex": "non_toxic_lex"}
    if values == "q":
        assert res["info"]["q_heads"] == {"sentiment": "sentiment_q"}
    else:
        assert "q_heads" not in res["info"]


@pytest.mark.parametrize("strategy", ["vas", "cd", "genarm"])
def test_two_weights_on_one_head_are_400(registry, strategy) -> None:
    """A reward and its head's name both weighted would add up past the head's range: the
    second one is refused, naming the head."""
    kind = "arm" if strategy == "genarm" else "value"
    with pytest.raises(AlignmentError) as ei:
        build_decoder({"strategy": strategy,
                       "weights": {"sentiment": 1, f"sentiment_{kind}": 1}}, registry=registry)
    assert ei.value.field == f"alignment.weights.sentiment_{kind}"
    assert f"sentiment_{kind}" in str(ei.value) and "weight it once" in str(ei.value)


# ---- lexical ARMs ---------------------------------------------------------------------------

def _lexical_arm(vocab: int = 12, seed: int = 0) -> LexicalARM:
    torch.manual_seed(seed)
    arm = LexicalARM(vocab, 1, hidden=4)
    arm.table.copy_(torch.randn(vocab, 1))
    torch.nn.init.normal_(arm.fc2.weight)
    return arm.eval()


def test_lexical_arm_starts_as_the_base_and_is_a_per_token_bias() -> None:
    torch.manual_seed(0)
    base = torch.randn(3, 14)  # 2 padded embedding slots past the 12-token table
    fresh = LexicalARM(12, 1)
    assert torch.allclose(fresh.logprobs(base), torch.log_softmax(base, -1))
    arm = _lexical_arm()
    b = arm.bias(14)
    assert b.shape == (14,) and b[12:].eq(0).all() and b[:12].std() > 0
    assert torch.allclose(arm.logprobs(base), torch.log_softmax(base + b, -1), atol=1e-6)


def test_genarm_mixture_adds_a_lexical_arms_bias_at_the_bases_temperature() -> None:
    """An increment ARM enters as alpha * (log pi_r - log p) = alpha * bias (+ a constant);
    a state ARM in the same mixture keeps the reference normalisation among the others."""
    torch.manual_seed(1)
    base = torch.log_softmax(torch.randn(1, 12), -1)
    arm = _lexical_arm()
    lex = arm.logprobs(base)
    other = torch.log_softmax(torch.randn(1, 12), -1)
    for alpha in (0.5, 3.0):
        got = mixture(base, lex[:, None], torch.tensor([alpha]), True, torch.tensor([True]))
        want = base + alpha * arm.bias(12)
        assert torch.allclose(torch.log_softmax(got, -1), torch.log_softmax(want, -1), atol=1e-5)
    both = mixture(base, torch.stack([other, lex], 1), torch.tensor([1.0, 2.0]), True,
                   torch.tensor([False, True]))
    want = (base + other) / 2 + 2.0 * arm.bias(12)
    assert torch.allclose(torch.log_softmax(both, -1), torch.log_softmax(want, -1), atol=1e-5)
    # without increment flags the formula is the reference one
    assert torch.allclose(mixture(base, other[:, None], torch.tensor([1.0]), True),
                          (base + other) / 2)


@pytest.mark.parametrize("lexicon", ["none", "max", "sum"])
def test_lexical_arm_top_k_training_sum_is_exact_when_the_candidates_cover_the_vocabulary(
        lexicon: str) -> None:
    """The sampled-softmax sum over the recorded top-K (training) equals the full-vocabulary
    one (metrics) when K is the whole vocabulary, with and without a lexicon, and both equal
    the sum of log pi_r(y_t) with each step's bias (whole words included) by hand."""
    torch.manual_seed(2)
    vocab, dim = 10, 6
    embed = torch.randn(vocab, dim)
    samples = [[0, 1, 5, 2, 3], [4, 0, 6, 9], [2, 3, 8], [0, 8, 1, 7]]
    tokens = torch.tensor([t for s in samples for t in s], dtype=torch.long)
    offsets = torch.tensor([0] + [len(s) + 1 for s in samples]).cumsum(0)
    hidden = torch.randn(int(offsets[-1]), dim)
    lengths = offsets[1:] - offsets[:-1]
    rows = torch.cat([torch.arange(int(a), int(a) + int(n) - 1)
                      for a, n in zip(offsets[:-1], lengths)])  # the states before each token
    lp = torch.log_softmax(hidden[rows] @ embed.T, -1)
    cand_lp, cand_ids = lp.sort(-1, descending=True)
    split = Split(hidden, offsets, torch.zeros(len(lengths), dtype=torch.long), tokens,
                  torch.zeros(len(lengths)), Path("."), cand_ids, cand_lp)
    arm = _lexical_arm(vocab)
    arm.lexicon = {"none": None, "max": _toy_lexicon(), "sum": _sum_lexicon()[0]}[lexicon]
    lexical_arm_features(split, arm.table, arm.lexicon)
    idx = range(len(samples))
    exact = arm_sequence_logprobs_exact(arm, split, idx, embed)
    assert torch.allclose(arm_sequence_logprobs_topk(arm, split, idx, embed), exact, atol=1e-4)
    by_hand = []
    for i, s in enumerate(samples):
        base = hidden[int(offsets[i]):int(offsets[i]) + len(s)] @ embed.T
        by_hand.append(sum(float(arm.logprobs(base[t:t + 1], arm.context_delta(s[:t], vocab)[
            None])[0, s[t]]) for t in range(len(s))))
    assert exact.tolist() == pytest.approx(by_hand, abs=1e-4)


def test_shipped_lexical_arms_load_and_steer_genarm_without_state_reads(engine, registry):
    for name, featurizer, positions in (("sentiment_lex_arm", "minilm_words_fit", 0),
                                        ("non_toxic_lex_arm", "profanity_linear", 0),
                                        ("concise_lex_arm", "word_starts", 40)):
        h = registry.heads[name]
        assert h.kind == "arm" and h.runner == "tokens" and isinstance(h.module, LexicalARM)
        assert h.manifest["arch"]["lexical"]["featurizer"] == featurizer
        assert h.module.positions == positions
        assert h.module.reward_form == h.manifest["arch"]["reward_form"] == "token"
        assert h.manifest["metrics"]["pairwise_accuracy"] > 0.75
    # a weight named by the reward still reads its state ARM
    assert registry.heads_for("sentiment", "arm").name == "sentiment_arm"
    plain = _run(engine, registry, None)
    zero = _run(engine, registry, {"strategy": "genarm", "weights": {"sentiment_lex_arm": 0}})
    assert zero["choices"][0]["tokens"] == plain["choices"][0]["tokens"]
    assert zero["info"]["arms"] == {}
    steered = _run(engine, registry, {"strategy": "genarm", "weights": {"sentiment_lex_arm": 0.3}})
    assert steered["info"]["arms"] == {"sentiment_lex_arm": "sentiment_lex_arm"}
    assert steered["info"]["kl_per_token"] > 0
    assert steered["stats"].guidance_forwards == 0  # a bias on the base's logits, no forward
    assert steered["choices"][0]["tokens"] != plain["choices"][0]["tokens"]
    # the unscaled formula adds the same bias through the fused sampler (same samples)
    raw = _run(engine, registry, {"strategy": "genarm", "normalize": False,
                                  "weights": {"sentiment_lex_arm": 0.3}})
    assert raw["choices"][0]["tokens"] == steered["choices"][0]["tokens"]


def test_a_value_heads_name_does_not_read_the_arm_of_the_same_stem(registry) -> None:
    """``sentiment_lex`` is a value head: GenARM refuses it (naming its kind) instead of
    reading ``sentiment_lex_arm``, as it refuses ``sentiment_value``."""
    for name in ("sentiment_lex", "sentiment_value"):
        with pytest.raises(AlignmentError) as ei:
            build_decoder({"strategy": "genarm", "weights": {name: 1}}, registry=registry)
        assert ei.value.field == f"alignment.weights.{name}"
        assert "is a value head" in str(ei.value)
        # the hint names the ARMs of the same reward, the lexical one included
        assert "'sentiment_arm', 'sentiment_lex_arm'" in str(ei.value)
    # a Q-head in genarm: no advice about values (genarm has none); an ARM in vas: the value
    # heads of its reward, and the Q-head route
    with pytest.raises(AlignmentError) as ei:
        build_decoder({"strategy": "genarm", "weights": {"non_toxic_q": 1}}, registry=registry)
    assert "values" not in str(ei.value) and "'non_toxic_lex_arm'" in str(ei.value)
    with pytest.raises(AlignmentError) as ei:
        build_decoder({"strategy": "vas", "weights": {"non_toxic_lex_arm": 1}},
                      registry=registry)
    assert "['non_toxic_lex', 'non_toxic_value']" in str(ei.value)
    with pytest.raises(AlignmentError) as ei:
        build_decoder({"strategy": "cd", "weights": {"sentiment_q": 1}}, registry=registry)
    assert "with values: 'q'" in str(ei.value)


@pytest.mark.parametrize("strategy", ["vas", "cd"])
def test_zero_weight_on_a_lexical_head_reports_the_same_fields(engine, registry,
                                                               strategy) -> None:
    """Weight 0 on a lexical head is plain sampling, and its ``alignment`` has the keys the
    guided run has (``lexical_heads`` empty, ``values`` "none")."""
    zero = _run(engine, registry, {"strategy": strategy, "weights": {"non_toxic_lex": 0}})
    guided = _run(engine, registry, {"strategy": strategy, "weights": {"non_toxic_lex": 8}})
    assert set(zero["info"]) == set(guided["info"]), (zero["info"], guided["info"])
    assert zero["info"]["lexical_heads"] == {} and zero["info"]["values"] == "none"
    assert guided["info"]["lexical_heads"] == {"non_toxic_lex": "non_toxic_lex"}


def test_cli_featurizer_choices_are_the_featurizers() -> None:
    """``train value/arm --featurizer`` accepts exactly the featurizers the code has."""
    from alignserve.cli import build_parser
    from alignserve.value_models.lexical import FEATURIZERS, FITTED_FEATURIZERS

    ap = build_parser()
    for kind in ("value", "arm"):
        for name in [*FEATURIZERS, *FITTED_FEATURIZERS]:
            args = ap.parse_args(["train", kind, "--reward", "sentiment", "--out", "/tmp/x",
                                  "--lexical", "--featurizer", name])
            assert args.featurizer == name
        action = next(a for sub in ap._subparsers._group_actions  # type: ignore[union-attr]
                      for a in sub.choices["train"]._subparsers._group_actions[0]
                      .choices[kind]._actions if a.dest == "featurizer")
        assert sorted(action.choices) == sorted([*FEATURIZERS, *FITTED_FEATURIZERS])


def _positional_arm(vocab: int = 8, positions: int = 4) -> LexicalARM:
    """A positional token ARM over ``vocab`` ids: ids 1, 3, 5 start a word, id 7 ends the
    text; random (seeded) weights so the bias depends on token and position."""
    torch.manual_seed(0)
    arm = LexicalARM(vocab, 1, hidden=4, reward_form="token", positions=positions)
    arm.table[[1, 3, 5], 0] = 1.0
    arm.end[7] = 1.0
    torch.nn.init.normal_(arm.fc1.weight)
    torch.nn.init.normal_(arm.fc2.weight)
    return arm.eval()


def test_positional_arm_reads_the_word_count_so_far_and_the_end_flag() -> None:
    arm = _positional_arm()
    assert arm.position_of([]) == 0
    assert arm.position_of([2, 4]) == 0  # no word start yet
    assert arm.position_of([1, 2, 3]) == 2
    assert arm.position_of([1, 3, 5, 1, 3, 5]) == 3  # clipped to P - 1
    with torch.no_grad():
        b0, b2 = arm.position_bias(0), arm.position_bias(2)
        # the same token costs differently at another length; ending too
        assert abs(float(b0[1] - b2[1])) > 1e-3 and abs(float(b0[7] - b2[7])) > 1e-3
        # the end flag is an input: id 7 and id 0 have the same table row, not the same bias
        assert abs(float(b0[7] - b0[0])) > 1e-3
        # decoding: context_delta moves bucket 0's bias to the history's bucket, exactly
        width = 10  # a padded vocabulary: ids past the table read 0
        got = arm.bias(width) + arm.context_delta([1, 2, 3], width)
        assert got[:8].tolist() == pytest.approx(b2.tolist(), abs=1e-6)
        assert got[8:].tolist() == [0.0, 0.0]
        # remote GenARM reads the same numbers for a few ids only
        assert arm.bias_at([1, 2, 3], [7, 1, 9]).tolist() == pytest.approx(
            [float(b2[7]), float(b2[1]), 0.0], abs=1e-6)
    with pytest.raises(ValueError, match="needs each token's end flag"):
        arm.bias_of(arm.table)


def test_positional_arm_adds_nothing_past_its_horizon() -> None:
    """Past the answer length its samples were cut at, the ARM leaves the base alone (its reward
    never charged an answer for not ending), in-process and in remote mode."""
    arm = _positional_arm()
    arm.horizon = 3
    with torch.no_grad():
        inside = arm.bias(8) + arm.context_delta([1, 2], 8)
        assert inside.abs().max() > 1e-3
        past = arm.bias(8) + arm.context_delta([1, 2, 3], 8)
        assert past.tolist() == pytest.approx([0.0] * 8, abs=1e-6)
        assert arm.bias_at([1, 2, 3, 4], [7, 1]).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="horizon must be >= 0"):
        LexicalARM(8, 1, reward_form="token", positions=4, horizon=-1)


def test_positional_arm_starts_position_free_and_refuses_a_lexicon() -> None:
    """Untrained position columns are zero, so a bucket training never reached reads as
    bucket 0; a lexicon (whole-word features) is refused, as are other reward forms."""
    torch.manual_seed(0)
    arm = LexicalARM(8, 1, hidden=4, reward_form="token", positions=4)
    torch.nn.init.normal_(arm.fc2.weight)
    arm.eval()
    with torch.no_grad():
        assert arm.position_bias(3).tolist() == pytest.approx(arm.position_bias(0).tolist())
    with pytest.raises(ValueError, match="takes no lexicon"):
        arm.lexicon = Lexicon(["a", " b"], {"ab": 1.0}, "sum")
    with pytest.raises(ValueError, match="per-token reward"):
        LexicalARM(8, 1, reward_form="increment", positions=4)
    with pytest.raises(ValueError, match="positions must be from 0 to 256"):
        LexicalARM(8, 1, reward_form="token", positions=257)


def test_positional_token_reward_sums_each_tokens_bias_at_its_position() -> None:
    """Training reads every response token at the bucket its sample had reached before it
    (``lexical_positions``), as decoding does."""
    from types import SimpleNamespace

    from alignserve.value_models.training import lexical_positions, lexical_token_rewards

    arm = _positional_arm()
    samples = [[1, 2, 3, 5, 7], [4, 1, 1]]
    tokens = torch.tensor([t for s in samples for t in s])
    pos = lexical_positions(arm, tokens, [5, 3])
    assert pos.tolist() == [0, 1, 1, 2, 3, 0, 0, 1]
    # samples with no tokens, first or last, move nothing
    assert lexical_positions(arm, tokens, [0, 5, 3, 0]).tolist() == pos.tolist()
    split = SimpleNamespace(lengths=torch.tensor([6, 4]), tokens=tokens,
                            offsets=torch.tensor([0, 6, 10]), lex_y=None, cand_ids=None)
    lexical_arm_features(split, arm.table, None, arm)
    assert split.lex_pos.tolist() == pos.tolist()
    got = lexical_token_rewards(arm, split, [0, 1]).detach()
    with torch.no_grad():
        want = [sum(float(arm.position_bias(arm.position_of(s[:t]))[s[t]])
                    for t in range(len(s))) for s in samples]
    assert got.tolist() == pytest.approx(want, abs=1e-5)


def test_an_answer_ended_early_reads_the_bias_decoding_adds_there() -> None:
    """``--end-pairs``: the token reward of a sample's first ``cut`` tokens followed by an
    end-of-text token is the sum decoding would add along that answer (each token's bias at
    its bucket, then the end token's at the prefix's bucket); pairs with the whole answer are
    oriented by the rewards and skipped within the margin."""
    from types import SimpleNamespace

    from alignserve.value_models.training import (
        end_pair_differences,
        lexical_end_rewards,
        lexical_token_rewards,
        prefix_end_items,
    )

    arm = _positional_arm()
    samples = [[1, 2, 3, 5, 7], [4, 1, 1]]
    tokens = torch.tensor([t for s in samples for t in s])
    nan = float("nan")
    # state rows (T_s + 1 per sample): the reward of the first t tokens, NaN = not scored;
    # t = 0 (nothing said) and t = T (the whole answer) are no early ending
    partial = torch.tensor([0.5, 0.1, nan, 0.9, nan, -2.0, nan, 0.3, 0.4, 0.0])
    split = SimpleNamespace(lengths=torch.tensor([6, 4]), tokens=tokens, partial=partial,
                            offsets=torch.tensor([0, 6, 10]), lex_y=None, cand_ids=None,
                            num_samples=2)
    lexical_arm_features(split, arm.table, None, arm)
    items = prefix_end_items(split)
    assert {s: c.tolist() for s, (c, _) in items.items()} == {0: [1, 3], 1: [1, 2]}
    assert items[0][1].tolist() == pytest.approx([0.1, 0.9])
    sums, ended, own, rew = lexical_end_rewards(arm, split, [0, 1], items)
    assert sums.tolist() == pytest.approx(
        lexical_token_rewards(arm, split, [0, 1]).tolist(), abs=1e-5)
    with torch.no_grad():
        def decoded(s: list[int]) -> float:  # what GenARM adds along s, then ending
            total = sum(float(arm.position_bias(arm.position_of(s[:t]))[s[t]])
                        for t in range(len(s)))
            return total + float(arm.position_bias(arm.position_of(s))[7])
        want = [decoded(samples[0][:1]), decoded(samples[0][:3]), decoded(samples[1][:1]),
                decoded(samples[1][:2])]
    assert ended.tolist() == pytest.approx(want, abs=1e-5)
    assert own.tolist() == [0, 0, 1, 1] and rew.tolist() == pytest.approx([0.1, 0.9, 0.3, 0.4])
    # answers' rewards 0.5 / 0.35: prefix 0.1 loses, 0.9 wins, 0.3 / 0.4 tie within 0.1
    d = end_pair_differences(sums, ended, own, rew, torch.tensor([0.5, 0.35]), 0.1)
    assert d.detach().tolist() == pytest.approx(
        torch.stack([sums[0] - ended[0], ended[1] - sums[0]]).detach().tolist(), abs=1e-5)


def test_positional_arm_round_trips_through_a_head_folder(tmp_path: Path) -> None:
    from alignserve.value_models.heads import Head, HeadError, build_module, save_head

    arm = _positional_arm()
    lex = {"vocab": 8, "features": 1, "featurizer": "word_starts"}
    manifest = {"reward": "concise", "tokenizer": None, "placement": "tokens",
                "arch": {"hidden": 4, "reward_form": "token", "positions": 4, "horizon": 6,
                         "lexical": lex},
                "weight_range": [0.0, 0.5], "range": [-1e9, 0.0]}
    save_head(tmp_path / "pos_arm", Head("pos_arm", "arm", arm, manifest))
    back = load_head(tmp_path / "pos_arm").module.eval()
    assert back.positions == 4 and back.horizon == 6 and back.end.tolist() == arm.end.tolist()
    with torch.no_grad():
        assert back.position_bias(2).tolist() == pytest.approx(arm.position_bias(2).tolist())
    with pytest.raises(HeadError, match="arch: positions must be from 0 to 256"):
        build_module("arm", {"reward_form": "token", "positions": 999, "lexical": lex})


@pytest.mark.parametrize("kw, needle", [
    ({"kind": "arm", "reward": "concise", "positions": 8, "lexical": False},
     "--positions is for lexical ARMs"),
    ({"kind": "value", "reward": "concise", "positions": 8}, "--positions is for lexical ARMs"),
    ({"kind": "arm", "reward": "concise", "positions": 8, "arm_reward": "increment"},
     "--positions needs --arm-reward token"),
    ({"kind": "arm", "reward": "concise", "positions": -1}, "--positions must be from 0 to 256"),
    ({"kind": "arm", "reward": "non_toxic", "positions": 8},
     r"counting featurizer \['word_starts'\]; this head's is 'profanity_linear'"),
    ({"kind": "arm", "reward": "sentiment", "positions": 8}, "this head's is 'minilm_words_fit'"),
    ({"kind": "arm", "reward": "concise", "positions": 8, "featurizer": "minilm_sentiment"},
     "this head's is 'minilm_sentiment'"),
    ({"kind": "arm", "reward": "concise", "end_pairs": 4}, "it needs --positions P > 0"),
    ({"kind": "arm", "reward": "concise", "positions": 8, "end_pairs": -1},
     "--end-pairs must be >= 0"),
    ({"kind": "arm", "reward": "concise", "positions": 8, "end_pairs": 48},
     r"--end-pairs must be below --max-new-tokens \(48\)"),
    ({"kind": "arm", "reward": "concise", "samples": 1},
     "--samples must be >= 2 for an ARM"),
])
def test_positional_arm_settings_are_checked_before_sampling(kw, needle) -> None:
    with pytest.raises(ValueError, match=needle):
        TrainConfig(**{"out": "/tmp/x", "lexical": True, **kw}).resolved()
