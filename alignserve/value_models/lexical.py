"""Lexical value heads: V(prefix) from per-token features of the answer so far, no model states.

Some rewards are decided by the words themselves: ``concise`` counts words, ``non_toxic`` is a
bag-of-words classifier, and the MiniLM ``sentiment`` scorer reacts strongly to sentiment
words. A value head on the base's hidden states ranks the first two poorly (Spearman 0.48 and
0.31 at half the answer, ``bench/head_ceiling.py``), while the words so far rank them much
better. A lexical value head reads, for the response tokens y_1..y_t so far,

    x_t = [s_t / 32, s_t / max(t, 1), t / 32],   s_t = sum_i table[y_i]   ([2F + 1])

where ``table`` [V, F] is a fixed per-token feature of the reward's featurizer (below), built
once from the tokenizer and stored in the head's weights. An MLP (``ValueHead``) maps x_t to
the value in reward standard deviations, trained with the same targets as any value head
(TD(lambda) by default).

Decoding needs no forward for it: the value of every candidate next token a is the head on
``x`` of the extended prefix (s_t + table[a], t + 1), an exact V([x, y<t, a]) read from the
token ids alone, so VAS / CD with only lexical heads cost about what plain decoding costs, and
they work with ``values`` "tree" or "q" alike.

Featurizers (``FEATURIZERS``; one per reward that has one):
- ``word_starts`` (``concise``, ``length``): 1 if the token's text starts with whitespace (a
  new word, or a line break before one), else 0. s_t is then about the number of words so far.
- ``profanity`` (``non_toxic``): alt-profanity-check's P(offensive) of the token's text alone.
- ``minilm_sentiment`` (``sentiment``): the sentiment reward's MiniLM margin of the token's text
  alone, in units of its temperature, centred on the vocabulary's median.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

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


FEATURIZERS: dict[str, Callable[[Sequence[str]], Tensor]] = {
    "word_starts": word_starts,
    "profanity": profanity,
    "minilm_sentiment": minilm_sentiment,
}
FEATURIZER_FOR_REWARD = {"concise": "word_starts", "length": "word_starts",
                         "non_toxic": "profanity", "sentiment": "minilm_sentiment"}


def featurizer_for(weights: dict[str, float]) -> str:
    """The featurizer of a single-reward spec; ValueError naming the rewards that have one."""
    names = [n for n, w in weights.items() if w]
    if len(names) != 1 or names[0] not in FEATURIZER_FOR_REWARD:
        raise ValueError(f"--lexical needs exactly one reward with a featurizer, one of "
                         f"{sorted(FEATURIZER_FOR_REWARD)}; got {names}")
    return FEATURIZER_FOR_REWARD[names[0]]


def lexical_table(featurizer: str, tokenizer: Any) -> Tensor:
    """[V, F] float32 per-token features of ``featurizer`` for ``tokenizer``'s vocabulary."""
    if featurizer not in FEATURIZERS:
        raise ValueError(f"unknown featurizer {featurizer!r}; known: {sorted(FEATURIZERS)}")
    return FEATURIZERS[featurizer](_token_texts(tokenizer)).float()


def features_from_sums(s: Tensor, t: Tensor) -> Tensor:
    """[N, F] sums and [N] token counts -> [N, 2F + 1] head inputs (module docstring)."""
    t = t.float()[:, None]
    return torch.cat([s / UNIT, s / t.clamp_min(1.0), t / UNIT], -1)


def lexical_features(table: Tensor, tokens: Tensor, offsets: Tensor) -> Tensor:
    """Training features of every cached state: [sum_s (T_s + 1), 2F + 1].

    ``tokens`` [sum_s T_s] are the samples' response tokens back to back, ``offsets``
    [S + 1] the first state row of each sample (sample s has T_s + 1 states, t = 0..T_s).
    State t of a sample reads its first t tokens, as ``LexicalValueHead.candidate_inputs``
    does while decoding."""
    n_states = int(offsets[-1])
    lengths = offsets[1:] - offsets[:-1] - 1  # T_s
    f = table[tokens.long()]  # [sum T_s, F]
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

    def candidate_inputs(self, history: Sequence[int], cands: Sequence[int],
                         device: torch.device | str | None = None) -> Tensor:
        """[k, 2F + 1] features of the answer so far (``history``, token ids) extended by each
        of the ``cands``, on ``device`` (default: the table's). The decoders pass the engine's
        device, so the scheduler moves the head there as it does every head (``run_heads``)."""
        dev = self.table.device
        s = self.rows(history).sum(0)
        ext = s[None] + self.rows(cands)
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


def is_lexical(module: Any) -> bool:
    return isinstance(module, LexicalValueHead)
