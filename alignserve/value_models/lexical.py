"""Lexical heads: V(prefix) from per-token features of the answer so far, no model states.

Some rewards are decided by the words themselves: ``concise`` counts words, ``non_toxic`` is a
bag-of-words classifier, and the MiniLM ``sentiment`` scorer reacts strongly to sentiment
words. A value head on the base's hidden states ranks the first two poorly (Spearman 0.48 and
0.31 at half the answer, ``bench/head_ceiling.py``), while the words so far rank them much
better. A lexical value head reads, for the response tokens y_1..y_t so far,

    x_t = [s_t / 32, s_t / max(t, 1), t / 32],   s_t = sum_i table[y_i]   ([2F + 1])

where ``table`` [V, F] is a fixed per-token feature of the reward's featurizer (below), built
once from the tokenizer (or, for a fitted featurizer, from the tokenizer and the training
answers) and stored in the head's weights. An MLP (``ValueHead``) maps x_t to
the value in reward standard deviations, trained with the same targets as any value head
(TD(lambda) by default).

Decoding needs no forward for it: the value of every candidate next token a is the head on
``x`` of the extended prefix (s_t + table[a], t + 1), an exact V([x, y<t, a]) read from the
token ids alone, so VAS / CD with only lexical heads cost about what plain decoding costs, and
they work with ``values`` "tree" or "q" alike.

A lexical ARM (``LexicalARM``) uses the same per-token feature for GenARM: a per-token logit bias
b_a = MLP(table[a]) on the base, trained with GenARM's pairwise loss; it reads the base's logits
only, so GenARM with it costs a vector add per step, plus with a lexicon the bias change of
the tokens that would continue the word in progress (``LexicalARM.context_delta``, computed
once per word in progress and cached; README runs O and Q give its cost).

Featurizers (``FEATURIZERS``, and ``FITTED_FEATURIZERS`` whose table is fitted to training
answers; ``FEATURIZER_FOR_REWARD`` names each reward's default, ``train --featurizer`` another):
- ``word_starts`` (``concise``, ``length``): 1 if the token's text starts with whitespace (a
  new word, or a line break before one), else 0. s_t is then about the number of words so far.
- ``profanity_linear`` (``non_toxic``): alt-profanity-check's linear score of the token's words
  (``profanity_linear_words``); with its "sum" ``Lexicon`` an answer's features add up to the
  classifier's decision numerator on the answer's text, however the words were tokenized.
- ``profanity`` (the previous ``non_toxic`` heads): alt-profanity-check's P(offensive) of the
  token's text alone, raised to the whole word's with its "max" ``Lexicon``.
- ``minilm_words_fit`` (``sentiment``): per-word scores fitted to the reward on the training
  answers (``fit_word_scores``: a ridge regression of the reward on word counts around the
  ``minilm_words`` prior), summed over the token's words with a "sum" ``Lexicon``. Built by
  training (``fitted_table``) and stored in the head, not computable from the tokenizer alone.
- ``minilm_words``: the sentiment reward's MiniLM margin of each whole word alone
  (``minilm_word_margins``), summed over the token's words; with its "sum" ``Lexicon`` a word
  split into tokens reads as the whole word.
- ``minilm_sentiment`` (the first ``sentiment`` heads; shipped as ``sentiment_lex_margin``):
  the MiniLM margin of the token's text alone, in units of its temperature, centred on the
  vocabulary's median.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .heads import ValueHead

UNIT = 32.0  # tokens: the scale of the sum and position features


def _token_texts(tokenizer: Any) -> list[str]:
    """The text of every token id on its own (byte-level BPE markers decoded)."""
    toks = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return [tokenizer.convert_tokens_to_string([t]) if t is not None else "" for t in toks]


def word_starts(texts: Sequence[str]) -> Tensor:
    """[V, 1]: 1.0 where the token's text starts with whitespace, else 0.0."""
    return torch.tensor([[1.0 if t[:1].isspace() else 0.0] for t in texts])


def profanity(texts: Sequence[str]) -> Tensor:
    """[V, 1]: alt-profanity-check's P(offensive) of each token's text (stripped; empty -> the
    probability of ".")."""
    from profanity_check import predict_prob

    prob = predict_prob(np.array([t.strip() or "." for t in texts]))
    return torch.tensor(np.asarray(prob, dtype=np.float32)).reshape(-1, 1)


def minilm_sentiment(texts: Sequence[str]) -> Tensor:
    """[V, 1]: the ``sentiment`` reward's raw margin (MiniLM cosine to the positive minus the
    negative anchor sentences) of each token's text alone (stripped; empty -> "."), divided by
    the reward's temperature (0.05) and centred on the vocabulary's median, so a neutral token
    reads about 0 and "wonderful" about +2."""
    from .rewards import SentimentReward

    reward = SentimentReward()
    margin = reward.raw_margin([t.strip() or "." for t in texts]) / reward.temperature
    table = torch.tensor(np.asarray(margin, dtype=np.float32)).reshape(-1, 1)
    return table - table.median()


_WORD = re.compile(r"\b\w\w+\b")  # scikit-learn's default token_pattern


def word_sum(text: str, words: dict[str, float]) -> float:
    """The sum of ``words``' feature over the words of ``text`` (lower-cased, words of two or
    more word characters, as scikit-learn's default ``token_pattern``; others count 0)."""
    return float(sum(words.get(w, 0.0) for w in _WORD.findall(text.lower())))


def word_sum_table(texts: Sequence[str], words: dict[str, float]) -> Tensor:
    """[len(texts), 1] float32: ``word_sum`` of each token text (the table of a "sum"
    lexicon's featurizer)."""
    return torch.tensor([[word_sum(t, words)] for t in texts], dtype=torch.float32)


def profanity_linear_words(texts: Sequence[str] | None = None) -> dict[str, float]:
    """alt-profanity-check's linear score of every word of its vocabulary: the word's TF-IDF
    weight (idf) times the LinearSVC coefficient, averaged over the calibrated folds. The
    classifier's decision on a text is the sum of these over its words divided by the TF-IDF
    vector's norm (plus the intercept). ``texts`` is unused (the words do not depend on the
    tokenizer)."""
    from profanity_check import profanity_check as pc

    vec, model = pc.vectorizer, pc.model
    coef = np.mean([c.estimator.coef_[0] for c in model.calibrated_classifiers_], 0)
    score = coef * vec.idf_
    return {w: float(score[j]) for w, j in sorted(vec.vocabulary_.items())}


def profanity_linear(texts: Sequence[str]) -> Tensor:
    """[V, 1]: the sum of alt-profanity-check's linear word scores over each token's text
    (``word_sum`` with ``profanity_linear_words``); 0 for tokens with no scored word."""
    words = profanity_linear_words()
    return word_sum_table(texts, words)


_WORD_MARGINS: dict[int, dict[str, float]] = {}  # token texts' hash -> minilm_word_margins


def minilm_word_margins(texts: Sequence[str]) -> dict[str, float]:
    """The ``sentiment`` reward's MiniLM margin of every word on its own, in units of its
    temperature and centred on the words' median, for the words of the token ``texts`` and of
    alt-profanity-check's vocabulary (about 35k for SmolLM2's tokenizer; a general English
    word list that ships offline, so multi-token words are covered too). Words are
    ``word_sum``'s (lower-cased, two or more word characters). Scoring takes 1-3 min on 2 CPU
    cores; the result is memoised per ``texts`` (the dict itself: do not mutate it)."""
    key = hash(tuple(texts))
    if key not in _WORD_MARGINS:
        from profanity_check import profanity_check as pc

        from .rewards import SentimentReward

        words = sorted(set(pc.vectorizer.vocabulary_)
                       | {w for t in texts for w in _WORD.findall(t.lower())})
        reward = SentimentReward()
        margin = reward.raw_margin(words) / reward.temperature
        margin = margin - np.median(margin)
        _WORD_MARGINS[key] = {w: float(m) for w, m in zip(words, margin)}
    return _WORD_MARGINS[key]


def minilm_words(texts: Sequence[str]) -> Tensor:
    """[V, 1]: the sum of ``minilm_word_margins`` over each token's words (``word_sum``); with
    its "sum" ``Lexicon`` an answer's features add up to the sum of its words' margins, so a
    word split into tokens reads as the whole word (" delight" + "ful")."""
    words = minilm_word_margins(texts)
    return word_sum_table(texts, words)


def fit_word_scores(texts: Sequence[str], rewards: Sequence[float], groups: Sequence[int],
                    prior: dict[str, float], alphas: Sequence[float] = (3.0, 10.0, 30.0, 100.0),
                    folds: int = 4) -> tuple[dict[str, float], dict[str, Any]]:
    """Per-word scores whose sum over an answer's words predicts its reward: a ridge regression
    of the standardised reward on the answers' word counts (``word_sum``'s words), on top of a
    ``prior`` word score (``minilm_word_margins``), so ``score_w = k * prior_w + delta_w``.

    The prior's sum is one practically unpenalised column (its weight ``k`` is fitted; the
    ridge penalty ``alpha`` shrinks only the corrections ``delta``), so rare words keep ``k``
    times their prior and words the base writes often move towards what the reward makes of
    them in context. ``alpha`` is chosen among ``alphas`` by prompt-grouped ``folds``-fold
    cross-validation (squared error), never on validation data. ``texts`` [N] answers,
    ``rewards`` [N], ``groups`` [N] prompt ids. The intercept is not kept: the sum predicts the
    standardised reward up to a constant (the heads on top learn their own offset).

    Returns (words -> score, in reward standard deviations per occurrence; fit info: alpha,
    k, cv errors keyed by str(alpha), counts). Raises ValueError on fewer than ``folds``
    prompts, a constant reward, or answers without a single word.
    """
    import scipy.sparse as sp
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import GroupKFold

    y = np.asarray(rewards, dtype=np.float64)
    g = np.asarray(groups)
    if len(set(g.tolist())) < folds or not y.std() > 0:
        raise ValueError(f"fitting word scores needs answers to >= {folds} prompts and a "
                         f"reward that varies; got {len(set(g.tolist()))} prompts, reward std "
                         f"{float(y.std()):.3g}")
    z = (y - y.mean()) / y.std()
    cv = CountVectorizer(token_pattern=_WORD.pattern, lowercase=True)
    counts = cv.fit_transform(texts).astype(np.float64)
    vocab = cv.get_feature_names_out()
    prior_sum = counts @ np.array([prior.get(w, 0.0) for w in vocab])
    unit = float(prior_sum.std()) or 1.0
    big = 100.0  # the prior column, scaled so that the penalty hardly touches its weight

    def design(rows: Any) -> Any:
        return sp.hstack([counts[rows], sp.csr_matrix(prior_sum[rows, None] / unit * big)]).tocsr()

    errors = {}
    for alpha in alphas:
        err = 0.0
        for tr, te in GroupKFold(folds).split(z, z, g):
            m = Ridge(alpha=alpha).fit(design(tr), z[tr])
            err += float(((m.predict(design(te)) - z[te]) ** 2).sum())
        errors[str(float(alpha))] = err / len(z)  # str keys: the manifest is JSON
    alpha = float(min(errors, key=errors.__getitem__))
    m = Ridge(alpha=alpha).fit(design(np.arange(len(z))), z)
    k = float(m.coef_[-1] * big / unit)
    words = {w: k * v for w, v in prior.items()}
    for w, d in zip(vocab, m.coef_[:-1]):
        words[str(w)] = k * prior.get(w, 0.0) + float(d)
    info = {"alpha": alpha, "prior_weight": k, "cv_mse": errors, "answers": len(z),
            "prompts": len(set(g.tolist())), "fitted_words": len(vocab), "words": len(words)}
    return words, info


FITTED_FEATURIZERS: dict[str, str] = {"minilm_words_fit": "minilm_words"}
"""Featurizers whose word scores are fitted to the reward on training answers
(``fit_word_scores``) -> the featurizer of their prior. Training builds their table and
lexicon (``fitted_table``); a head stores both, so serving never refits."""


def fitted_table(featurizer: str, tokenizer: Any, texts: Sequence[str],
                 rewards: Sequence[float], groups: Sequence[int], alpha: float | None = None
                 ) -> tuple[Tensor, Lexicon, dict[str, Any]]:
    """[V, 1] float32 table, "sum" ``Lexicon`` and fit info of a ``FITTED_FEATURIZERS``
    featurizer, fitted on the answers ``texts`` with ``rewards`` (``groups``: their prompts;
    ``fit_word_scores``, whose units and errors apply; ``alpha``: its ridge penalty, default
    chosen by cross-validation). Computes the prior first (for
    ``minilm_words_fit`` 1-3 min of MiniLM scoring, memoised). ValueError for a featurizer
    that is not fitted."""
    if featurizer not in FITTED_FEATURIZERS:
        raise ValueError(f"featurizer {featurizer!r} is not fitted; fitted ones: "
                         f"{sorted(FITTED_FEATURIZERS)}")
    tok_texts = _token_texts(tokenizer)
    words_fn, _ = LEXICONS[FITTED_FEATURIZERS[featurizer]]
    kw = {} if alpha is None else {"alphas": (float(alpha),)}
    words, info = fit_word_scores(texts, rewards, groups, words_fn(tok_texts), **kw)
    return word_sum_table(tok_texts, words), Lexicon(tok_texts, words, "sum"), info


FEATURIZERS: dict[str, Callable[[Sequence[str]], Tensor]] = {
    "word_starts": word_starts,
    "profanity": profanity,
    "minilm_sentiment": minilm_sentiment,
    "minilm_words": minilm_words,
    "profanity_linear": profanity_linear,
}
COUNT_FEATURIZERS = ("word_starts",)
"""Featurizers whose feature counts something (0 or 1 per token): their sum so far is a
position a positional ``LexicalARM`` can bucket."""
FEATURIZER_FOR_REWARD = {"concise": "word_starts", "length": "word_starts",
                         "non_toxic": "profanity_linear", "sentiment": "minilm_words_fit"}


def featurizer_for(weights: dict[str, float]) -> str:
    """The featurizer of a single-reward spec; ValueError naming the rewards that have one."""
    names = [n for n, w in weights.items() if w]
    if len(names) != 1 or names[0] not in FEATURIZER_FOR_REWARD:
        raise ValueError(f"--lexical needs exactly one reward with a featurizer, one of "
                         f"{sorted(FEATURIZER_FOR_REWARD)}; got {names}")
    return FEATURIZER_FOR_REWARD[names[0]]


def lexical_table(featurizer: str, tokenizer: Any) -> Tensor:
    """[V, F] float32 per-token features of ``featurizer`` for ``tokenizer``'s vocabulary."""
    if featurizer in FITTED_FEATURIZERS:
        raise ValueError(f"featurizer {featurizer!r} is fitted to training answers: build it "
                         "with fitted_table")
    if featurizer not in FEATURIZERS:
        raise ValueError(f"unknown featurizer {featurizer!r}; known: {sorted(FEATURIZERS)}")
    return FEATURIZERS[featurizer](_token_texts(tokenizer)).float()


LEXICON = "lexicon.json"  # a head folder's whole-word lexicon (``Lexicon``), when it has one
_LEAD = re.compile(r"^\w+")
_TRAIL = re.compile(r"\w+$")
TAIL_TOKENS = 8  # tokens looked back for the word in progress
DELTA_CACHE = 512  # words in progress whose bias change a LexicalARM keeps (LRU, ~64 MB)


class Lexicon:
    """Whole-word features for tokens that continue a word.

    A byte-level BPE splits many words the reward reacts to into innocent pieces (" dick" is
    " d" + "ick", '"Fucking' is '"F' + "ucking"), so a feature of each token's text alone misses
    them. With a lexicon, the feature (column 0) of a token that continues the word in progress
    (its text starts with a word character and the answer so far ends inside a word) depends on
    ``tail``, the word so far, and ``lead``, the token's leading word characters. ``texts`` [V]
    are the token texts, ``words`` the reward's per-word feature, and ``combine`` says how:

    - ``"max"``: the larger of the token's own feature and ``words[(tail + lead).lower()]``
      (``profanity``: alt-profanity-check's P(offensive) of the words with P >= 0.3);
    - ``"sum"``: features that add up to ``word_sum`` of the answer's text, whatever the
      tokenization (``profanity_linear``: the classifier's linear score of each word). The
      table row of a token is ``word_sum(text)``; a continuing token reads
      ``row - c(lead) - c(tail) + c(tail + lead)`` (c = ``words.get``, 0 for other words), so
      the word in progress is counted as the word it has become so far (telescoping).
      Approximate where the word in progress began more than ``TAIL_TOKENS`` tokens back (it is
      read from its last ones) or holds a letter the tokenizer stores as raw bytes (its pieces
      decode to U+FFFD, not a word character, so the word ends there for the lexicon only).
    """

    def __init__(self, texts: Sequence[str], words: dict[str, float],
                 combine: str = "max") -> None:
        if combine not in ("max", "sum"):
            raise ValueError(f"combine must be 'max' or 'sum', got {combine!r}")
        self.texts = list(texts)
        self.words = dict(words)
        self.combine = combine
        self.lead = [(m.group(0) if (m := _LEAD.match(t)) else "") for t in self.texts]
        self.trail = [(m.group(0) if (m := _TRAIL.search(t)) else "") for t in self.texts]
        by_lead: dict[str, list[int]] = {}
        for i, lead in enumerate(self.lead):
            if lead:
                by_lead.setdefault(lead.lower(), []).append(i)
        # word prefix -> [(token ids that complete it to a lexicon word, that word's feature)]
        self.completions: dict[str, list[tuple[list[int], float]]] = {}
        for w, v in self.words.items():
            for i in range(1, len(w)):
                ids = by_lead.get(w[i:])
                if ids:
                    self.completions.setdefault(w[:i], []).append((ids, v))
        # "sum": which tokens continue a word, and c(lead) of each ([V], float32)
        self.has_lead = torch.tensor([bool(x) for x in self.lead])
        self.lead_c = torch.tensor([self.words.get(x.lower(), 0.0) for x in self.lead])

    def to_json(self) -> dict[str, Any]:
        return {"texts": self.texts, "words": self.words, "combine": self.combine}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Lexicon:
        return cls(obj["texts"], obj["words"], obj.get("combine", "max"))

    def tail(self, history: Sequence[int]) -> str:
        """The word in progress at the end of ``history`` (token ids): the trailing word
        characters of its last tokens, "" when the answer does not end inside a word."""
        out = ""
        for i in reversed(list(history)[-TAIL_TOKENS:]):
            trail = self.trail[i] if i < len(self.trail) else ""
            if not trail:
                break
            out = trail + out
            if len(trail) < len(self.texts[i]):  # the word starts inside this token
                break
        return out

    def feature(self, tail: str, tok: int, row: float) -> float:
        """Column 0 of token ``tok``'s feature after the word in progress ``tail``, given its
        table value ``row`` (``row`` itself unless ``tok`` continues the word)."""
        if tok >= len(self.lead) or not self.lead[tok] or not tail:
            return row
        v = self.words.get((tail + self.lead[tok]).lower())
        if self.combine == "max":
            return row if v is None or v <= row else v
        return (row - float(self.lead_c[tok]) - self.words.get(tail.lower(), 0.0)
                + (v or 0.0))

    def overrides(self, history: Sequence[int]) -> dict[int, float]:
        """{token id: the feature of the word it would complete} for every token that completes
        the word in progress at the end of ``history`` to a lexicon word."""
        return self._completed(self.tail(history).lower())

    def _completed(self, tail: str) -> dict[int, float]:
        """``overrides`` for the (lower-cased) word in progress ``tail``."""
        out: dict[int, float] = {}
        for ids, v in self.completions.get(tail, ()) if tail else ():
            for i in ids:
                out[i] = max(out.get(i, v), v)
        return out

    def deltas(self, history: Sequence[int], column: Tensor,
               ids: Tensor | None = None) -> Tensor | None:
        """The change of column 0 at the end of ``history`` (token ids): for the tokens ``ids``
        [k] (default: every id of ``column``), whose table values are ``column[ids]``
        (``column`` [V'], the table's column 0, any width). [k] (or [V']) float on
        ``column``'s device; None when nothing changes (the answer does not end in a word)."""
        return self.tail_deltas(self.tail(history).lower(), column, ids)

    def tail_deltas(self, tail: str, column: Tensor, ids: Tensor | None = None) -> Tensor | None:
        """``deltas`` for the lower-cased word in progress ``tail`` (it depends on nothing
        else, so callers may cache it per tail)."""
        if not tail:
            return None
        dev = column.device
        idx = torch.arange(column.shape[0], device=dev) if ids is None else ids.to(dev).long()
        inside = idx < len(self.lead)
        over = self._completed(tail)
        fill = float("-inf") if self.combine == "max" else 0.0
        done = torch.full((len(idx),), fill, device=dev)  # c(tail + lead) of each token
        if ids is None:
            keys = [a for a in over if a < column.shape[0]]
            if keys:
                done[torch.tensor(keys, device=dev)] = torch.tensor([over[a] for a in keys],
                                                                    device=dev)
        elif over:
            done = torch.tensor([over.get(a, fill) for a in idx.tolist()], device=dev)
        if self.combine == "max":
            own = column[idx.clamp_max(column.shape[0] - 1)].float()
            return (done - own).clamp_min(0.0)
        safe = idx.clamp_max(len(self.lead) - 1).cpu()
        cont = (self.has_lead[safe].to(dev) & inside).float()
        return cont * (done - self.lead_c[safe].to(dev) - self.words.get(tail, 0.0))


def profanity_lexicon(texts: Sequence[str], floor: float = 0.3) -> dict[str, float]:
    """alt-profanity-check's P(offensive) of every word of its vocabulary with P >= ``floor``."""
    from profanity_check import predict_prob
    from profanity_check import profanity_check as pc

    words = sorted(pc.vectorizer.vocabulary_)
    prob = predict_prob(np.array(words))
    return {w: float(p) for w, p in zip(words, prob) if p >= floor}


LEXICONS: dict[str, tuple[Callable[[Sequence[str]], dict[str, float]], str]] = {
    "profanity": (profanity_lexicon, "max"),
    "profanity_linear": (profanity_linear_words, "sum"),
    "minilm_words": (minilm_word_margins, "sum"),
}
"""featurizer -> (its words' features from the token texts, how ``Lexicon`` combines them)."""


def lexicon_for(featurizer: str, tokenizer: Any) -> Lexicon | None:
    """The whole-word lexicon of ``featurizer`` (None for featurizers without one)."""
    if featurizer not in LEXICONS:
        return None
    texts = _token_texts(tokenizer)
    words, combine = LEXICONS[featurizer]
    return Lexicon(texts, words(texts), combine)


def contextual_rows(table: Tensor, tokens: Tensor, lengths: Sequence[int],
                    lexicon: Lexicon | None) -> Tensor:
    """[sum T_s, F] per-token features of the samples' response tokens (back to back, sample s
    has ``lengths[s]`` tokens): ``table`` rows, with a token that completes a lexicon word
    (given the sample's earlier tokens) reading the larger of its row and the word's feature
    (column 0), as ``LexicalValueHead`` does while decoding."""
    return apply_lexicon(table[tokens.long()], tokens.tolist(), lengths, lexicon)


def token_windows(toks: Sequence[int], lengths: Sequence[int]) -> Iterator[tuple[int, list[int]]]:
    """(j, the last ``TAIL_TOKENS`` tokens before token j in its own sample) for every token
    but each sample's first; ``toks`` holds the samples back to back, ``lengths[s]`` each."""
    pos = 0
    for n in lengths:
        for j in range(pos + 1, pos + int(n)):
            yield j, list(toks[max(pos, j - TAIL_TOKENS):j])
        pos += int(n)


def apply_lexicon(rows: Tensor, toks: list[int], lengths: Sequence[int],
                  lexicon: Lexicon | None) -> Tensor:
    """``rows`` [sum T_s, F] (the table rows of ``toks``) with column 0 of every token that
    continues a word changed as the lexicon says, given its sample's earlier tokens
    (``Lexicon.feature``); a copy (``rows`` itself when there is no lexicon)."""
    if lexicon is None:
        return rows
    f = rows.clone()
    col = f[:, 0].tolist()
    for j, before in token_windows(toks, lengths):
        col[j] = lexicon.feature(lexicon.tail(before), toks[j], col[j])
    f[:, 0] = torch.tensor(col, dtype=f.dtype, device=f.device)
    return f


def features_from_sums(s: Tensor, t: Tensor) -> Tensor:
    """[N, F] sums and [N] token counts -> [N, 2F + 1] head inputs (module docstring)."""
    t = t.float()[:, None]
    return torch.cat([s / UNIT, s / t.clamp_min(1.0), t / UNIT], -1)


def lexical_features(table: Tensor, tokens: Tensor, offsets: Tensor,
                     lexicon: Lexicon | None = None) -> Tensor:
    """Training features of every cached state: [sum_s (T_s + 1), 2F + 1].

    ``tokens`` [sum_s T_s] are the samples' response tokens back to back, ``offsets``
    [S + 1] the first state row of each sample (sample s has T_s + 1 states, t = 0..T_s).
    State t of a sample reads its first t tokens, as ``LexicalValueHead.candidate_inputs``
    does while decoding (with the same ``lexicon``, if any)."""
    n_states = int(offsets[-1])
    lengths = offsets[1:] - offsets[:-1] - 1  # T_s
    f = contextual_rows(table, tokens, lengths.tolist(), lexicon)  # [sum T_s, F]
    c = torch.cumsum(f.double(), 0)
    sample = torch.repeat_interleave(torch.arange(len(lengths)), lengths + 1)
    step = torch.arange(n_states) - offsets[:-1][sample]  # t of each state
    tok_start = torch.cumsum(lengths, 0) - lengths  # each sample's first token row
    last = tok_start[sample] + step - 1  # row of the state's last token (t >= 1)
    before = torch.where((tok_start > 0)[:, None], c[(tok_start - 1).clamp_min(0)],
                         torch.zeros_like(c[:1]))  # cumsum up to the sample's first token
    s = torch.where((step > 0)[:, None], c[last.clamp_min(0)] - before[sample],
                    torch.zeros_like(c[:1]))
    return features_from_sums(s.float(), step)


class LexicalValueHead(ValueHead):
    """A ``ValueHead`` over lexical features (module docstring) with its token table.

    ``table`` [V, F] is a buffer saved with the weights; ``forward`` takes the [N, 2F + 1]
    features like any value head. ``candidate_inputs`` builds the features of a prefix
    extended by each candidate token, on the table's device.
    """

    def __init__(self, vocab: int, features: int, hidden: int = 64) -> None:
        super().__init__(2 * features + 1, hidden, "none")
        self.register_buffer("table", torch.zeros(vocab, features))
        self.lexicon: Lexicon | None = None  # whole-word features (``Lexicon``), if any

    def candidate_inputs(self, history: Sequence[int], cands: Sequence[int],
                         device: torch.device | str | None = None) -> Tensor:
        """[k, 2F + 1] features of the answer so far (``history``, token ids) extended by each
        of the ``cands``, on ``device`` (default: the table's). The decoders pass the engine's
        device, so the scheduler moves the head there as it does every head (``run_heads``).
        With a lexicon, a token that completes a lexicon word reads that word's feature, in
        the history and among the candidates alike (``contextual_rows``)."""
        dev = self.table.device
        rows = apply_lexicon(self.rows(history), list(history), [len(history)], self.lexicon)
        cand = self.rows(cands)
        if self.lexicon is not None:
            d = self.lexicon.deltas(history, self.table[:, 0], torch.tensor(list(cands)))
            if d is not None:
                cand[:, 0] += d.to(cand.dtype)
        ext = rows.sum(0)[None] + cand
        t = torch.full((len(cands),), len(history) + 1, device=dev)
        return features_from_sums(ext, t).to(device or dev)

    def rows(self, ids: Sequence[int]) -> Tensor:
        """[n, F] table rows of token ``ids``; ids past the tokenizer's vocabulary (a model's
        padded embedding slots) read 0."""
        idx = torch.tensor(list(ids), dtype=torch.long, device=self.table.device)
        inside = idx < self.table.shape[0]
        out = self.table[idx.clamp_max(self.table.shape[0] - 1)]
        return out * inside[:, None].to(out.dtype)

    def candidate_values(self, history: Sequence[int], cands: Sequence[int]) -> Tensor:
        """[k] exact values (reward standard deviations) of the prefix extended by each
        candidate; for callers outside the scheduler (remote mode)."""
        with torch.no_grad():
            return self(self.candidate_inputs(history, cands))


class LexicalARM(nn.Module):
    """A token-bias ARM (GenARM's autoregressive reward model in its simplest form):

        log pi_r(a | prefix) = log_softmax(l_base + b)_a,   b_a = MLP(table[a])   ([V'])

    ``l_base`` [N, V'] are the base's logits at the prefix and ``table`` [V, F] the reward's
    per-token featurizer (module docstring), so the bias of every vocabulary token, sampled in
    training or not, is a learned function of that token's feature. The reward the ARM defines
    is r(y) = sum_t log pi_r(y_t | y<t), trained with GenARM's pairwise loss like ``ARMHead``.

    It has no prior scale to discount the base's likelihood (it must keep the base's
    temperature), so its reward reads the bias, not pi_r itself (``reward_form``; trained by
    ``training.train_arm``):

    - ``"increment"``: the increment over the base, r(y) = sum_t log pi_r(y_t) - log p_base(y_t)
      = sum_t b(y_t) - log E_base[e^b] (the DPO-style implicit reward against the reference);
      each step subtracts the bias the base already expected, which caps how well it can rank
      answers (``bench/head_ceiling.py --linear-arm``);
    - ``"token"``: a per-token reward, r(y) = sum_t b(y_t): the sum of the tokens' learned
      scores (in context, with the lexicon's whole-word features); the bias's learned offset
      is a reward per token, i.e. the length preference. It is GenARM's reward of the ARM
      pi_r = softmax(b) measured against a uniform reference (log pi_r - log(1/V) = b + const),
      up to that per-token constant.

    Decoding is the same for both and needs no model states: GenARM adds alpha * b + const to
    the base's log-probs (``decoders.genarm.mixture``), the base at its own temperature with a
    per-token logit bias, the token-level form of sampling from p_base * exp(alpha r).
    ``fc2`` starts at zero: the ARM starts as the base.
    The bias is cached per (device, width) while the module is in eval mode (it is frozen once
    loaded); ``train()`` drops the cache.

    **Positions** (``positions`` P > 0, ``token`` form only, featurizers without a lexicon): the
    bias also reads whether the token ends the text (``end``) and a one-hot bucket of the answer
    so far, the sum of the table's first feature over its tokens (``position_of``; for
    ``word_starts`` the word count, clipped to P - 1): b_a = MLP([table[a], end_a,
    onehot(p)]). A per-token bias alone is the same at every step, so its reward is linear in
    the token and word counts and it cannot say "stop near 30 words"; with the bucket, ending
    (and starting another word) can cost or pay differently at each length. Decoding adds the
    bucket's bias through ``context_delta``, so GenARM needs no change. ``horizon`` (tokens;
    the training samples' length, 0 = none): past it the ARM adds no bias (``past_horizon``).
    """

    pool = "none"
    increment = True  # GenARM adds alpha * (log pi_r - log p_base) = alpha * b + const
    REWARD_FORMS = ("increment", "token")
    MAX_POSITIONS = 256

    def __init__(self, vocab: int, features: int, hidden: int = 16,
                 reward_form: str = "increment", positions: int = 0, horizon: int = 0) -> None:
        super().__init__()
        if reward_form not in self.REWARD_FORMS:
            raise ValueError(f"reward_form must be one of {self.REWARD_FORMS}, got "
                             f"{reward_form!r}")
        if not 0 <= positions <= self.MAX_POSITIONS:
            raise ValueError(f"positions must be from 0 to {self.MAX_POSITIONS}, got "
                             f"{positions}")
        if positions and reward_form != "token":
            raise ValueError("a positional lexical ARM is trained as a per-token reward "
                             "(reward_form 'token')")
        if horizon < 0:
            raise ValueError(f"horizon must be >= 0, got {horizon}")
        self.reward_form = reward_form
        self.positions = positions
        self.horizon = horizon if positions else 0
        self.register_buffer("table", torch.zeros(vocab, features))
        if positions:  # 1 at the end-of-text token ids: ending is a choice the bias can price
            self.register_buffer("end", torch.zeros(vocab))
        self.fc1 = nn.Linear(features + (1 + positions if positions else 0), hidden)
        self.fc2 = nn.Linear(hidden, 1)
        if positions:  # a bucket no training answer reached reads as bucket-less, not noise
            with torch.no_grad():
                self.fc1.weight[:, features + 1:] = 0.0
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)
        self._cache: dict[tuple[Any, ...], Tensor] = {}
        self._deltas: OrderedDict[tuple[str, Any], tuple[Tensor, Tensor]] = OrderedDict()
        self._lexicon: Lexicon | None = None

    @property
    def lexicon(self) -> Lexicon | None:
        """Whole-word features (``Lexicon``), if any; setting it drops the caches."""
        return self._lexicon

    @lexicon.setter
    def lexicon(self, value: Lexicon | None) -> None:
        if value is not None and self.positions:
            raise ValueError("a positional lexical ARM takes no lexicon (its position is the "
                             "plain feature sum of the answer so far)")
        self._lexicon = value
        self.clear_caches()

    def clear_caches(self) -> None:
        """Drop the cached bias and per-word bias changes (``train()``, a new lexicon and
        loading weights call it)."""
        self._cache = {}
        self._deltas = OrderedDict()

    def train(self, mode: bool = True) -> LexicalARM:
        self.clear_caches()
        return super().train(mode)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.clear_caches()
        super()._load_from_state_dict(*args, **kwargs)

    def bias_of(self, features: Tensor, end: Tensor | None = None,
                position: Tensor | int | None = None) -> Tensor:
        """[...] fp32 logit bias of tokens with per-token ``features`` [..., F] (standardised
        by the table's statistics). A positional ARM (``positions`` P > 0) also reads each
        token's end-of-text flag ``end`` [...] and the answer's ``position`` bucket ([...] or
        one int, 0..P-1: see ``position_of``), one-hot."""
        t = self.table.float()
        x = (features.float() - t.mean(0)) / t.std(0).clamp_min(1e-6)
        if self.positions:
            if end is None or position is None:
                raise ValueError("a positional lexical ARM needs each token's end flag and "
                                 "position bucket")
            pos = torch.as_tensor(position, device=x.device).long().expand(x.shape[:-1])
            x = torch.cat([x, end.float().to(x.device)[..., None],
                           F.one_hot(pos, self.positions).float()], -1)
        return self.fc2(torch.tanh(self.fc1(x))).squeeze(-1)

    def counted(self, ids: Tensor) -> Tensor:
        """[...] fp64 what each token id [...] adds to the position: the table's first
        feature (for ``word_starts``, 1 for a word start); 0 for ids past the table."""
        ids = ids.long().to(self.table.device)
        inside = ids < self.table.shape[0]
        return self.table[ids.clamp_max(self.table.shape[0] - 1), 0].double() * inside

    def bucket(self, sums: Tensor) -> Tensor:
        """[...] long position buckets of feature sums [...]: floored, clipped to 0..P-1 (the
        one rule for decoding, ``position_of``, and training, ``training.lexical_positions``)."""
        return torch.floor(sums + 1e-6).clamp(0, self.positions - 1).long()

    def position_of(self, history: Sequence[int]) -> int:
        """The position bucket after ``history`` (token ids): the sum of the table's first
        feature over those tokens (for ``word_starts``, the words so far), floored and clipped
        to 0..P-1; 0 for an ARM without positions."""
        if not self.positions or not history:
            return 0
        return int(self.bucket(self.counted(torch.tensor(list(history))).sum()))

    def past_horizon(self, history: Sequence[int]) -> bool:
        """Has the answer ``history`` reached the positional ARM's ``horizon`` (the answer
        length, in tokens, its training samples were cut at; 0 = none)? Past it the ARM adds no
        bias: it never saw an answer go on, and its reward, read on answers cut there, does not
        charge for not ending (see README, *Positional lexical ARMs*)."""
        return bool(self.horizon) and len(history) >= self.horizon

    def position_bias(self, position: int, width: int | None = None) -> Tensor:
        """[width] fp32 bias of every token id at position bucket ``position`` (``bias()`` is
        bucket 0); cached per (device, width, bucket) in eval mode (at most P x V floats)."""
        width = width or self.table.shape[0]
        if not self.positions or position == 0:
            return self.bias(width)
        key = (self.table.device, width, position)
        if not self.training and key in self._cache:
            return self._cache[key]
        b = self.bias_of(self.table, self.end, position)
        b = torch.cat([b, b.new_zeros(max(width - b.shape[0], 0))])[:width]
        if not self.training:
            self._cache[key] = b.detach()
        return b

    def context_delta(self, history: Sequence[int], width: int) -> Tensor:
        """[width] change of the bias at the end of ``history`` (token ids): with a lexicon,
        the tokens that continue the word in progress take the feature the lexicon gives them
        (``Lexicon.deltas``); zeros otherwise. The change depends on the word in progress
        only, so in eval mode its sparse form (ids, values) is cached per word (LRU,
        ``DELTA_CACHE`` words; with a "sum" lexicon about 15k tokens change per word, 8 bytes
        each, so the cache holds up to ~64 MB); ``clear_caches`` drops it."""
        delta = torch.zeros(width, device=self.table.device)
        if self.positions:  # the bias at the answer's position bucket, against bucket 0's
            with torch.no_grad():
                if self.past_horizon(history):  # no bias at all: the base alone
                    return -self.bias(width)
                p = self.position_of(history)
                return delta if p == 0 else self.position_bias(p, width) - self.bias(width)
        if self.lexicon is None:
            return delta
        tail = self.lexicon.tail(history).lower()
        if not tail:
            return delta
        key = (tail, self.table.device)
        hit = None if self.training else self._deltas.pop(key, None)
        if hit is None:
            hit = self._sparse_delta(tail)
        if not self.training:  # (re)insert as the most recent; pop + insert, no lookup race
            self._deltas[key] = hit
            while len(self._deltas) > DELTA_CACHE:
                self._deltas.popitem(last=False)
        ids, vals = hit
        ids = ids.long()
        keep = ids < width
        delta[ids[keep]] = vals[keep]
        return delta

    def _sparse_delta(self, tail: str) -> tuple[Tensor, Tensor]:
        """(ids [k] int32, bias changes [k] fp32) of the tokens whose bias the word in
        progress ``tail`` changes."""
        assert self.lexicon is not None
        d = self.lexicon.tail_deltas(tail, self.table[:, 0])
        if d is None:
            ids = torch.zeros(0, dtype=torch.int32, device=self.table.device)
            return ids, torch.zeros(0, device=self.table.device)
        ids = d.nonzero()[:, 0]
        feats = self.table[ids].clone()
        feats[:, 0] += d[ids]
        with torch.no_grad():
            before = self.bias_of(self.table[ids]) if self.training \
                else self.bias(self.table.shape[0])[ids]  # eval: the cached table bias
            return ids.int(), (self.bias_of(feats) - before).float()

    def bias_at(self, history: Sequence[int], ids: Sequence[int]) -> Tensor:
        """[k] fp32 logit bias of the tokens ``ids`` at the end of ``history``: the entries
        ``ids`` of ``bias() + context_delta(history)``, computed for those k tokens only (remote
        GenARM reads the remote's top-k); ids past the table read 0."""
        idx = torch.tensor(list(ids), dtype=torch.long, device=self.table.device)
        if self.past_horizon(history):
            return torch.zeros(len(idx), device=self.table.device)
        inside = idx < self.table.shape[0]
        feats = self.table[idx.clamp_max(self.table.shape[0] - 1)].clone()
        d = None if self.lexicon is None else self.lexicon.deltas(history, self.table[:, 0], idx)
        if d is not None:
            feats[:, 0] += d
        end = self.end[idx.clamp_max(self.table.shape[0] - 1)] if self.positions else None
        with torch.no_grad():
            return self.bias_of(feats, end, self.position_of(history)) * inside

    def bias(self, width: int | None = None) -> Tensor:
        """[width] fp32 logit bias per token id (default width: the table's vocabulary); ids past
        the tokenizer's vocabulary (a model's padded embedding slots) get 0."""
        width = width or self.table.shape[0]
        key = (self.table.device, width)
        if not self.training and key in self._cache:
            return self._cache[key]
        b = self.bias_of(self.table, getattr(self, "end", None), 0)
        if width > b.shape[0]:
            b = torch.cat([b, b.new_zeros(width - b.shape[0])])
        b = b[:width]
        if not self.training:
            self._cache[key] = b.detach()
        return b

    def logprobs(self, base_logits: Tensor, delta: Tensor | None = None) -> Tensor:
        """log pi_r [N, V'] from the base's logits [N, V'] at the same prefixes, plus each
        row's ``context_delta`` [N, V'] when given."""
        out = base_logits.float() + self.bias(base_logits.shape[-1])
        return torch.log_softmax(out if delta is None else out + delta, -1)


def is_lexical(module: Any) -> bool:
    """A lexical value head (``LexicalARM`` is not one: it is an ARM)."""
    return isinstance(module, LexicalValueHead)
