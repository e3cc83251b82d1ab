"""The evaluation harness: spec parsing, settings, and one tiny real run through the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from alignserve.eval.harness import (
    BON_CURVE,
    build_settings,
    parse_sweep,
    parse_weights,
    resolve_objectives,
    strategy_weights,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def registry():
    from alignserve.value_models.registry import Registry
    from alignserve.value_models.rewards import default_rewards

    return Registry(default_rewards())  # rewards only, no heads


def test_parse_specs() -> None:
    assert parse_weights("sentiment") == {"sentiment": 1.0}
    assert parse_weights("sentiment=2, concise=0.5") == {"sentiment": 2.0, "concise": 0.5}
    assert parse_sweep("best_of_n.n=1,2,4") == ("best_of_n", "n", [1, 2, 4])
    assert parse_sweep("vas.weight=0.5,3") == ("vas", "weight", [0.5, 3])
    assert parse_sweep("args.batched=false") == ("args", "batched", [False])
    for bad in ("n=1,2", "best_of_n.n=", "best_of_n=1"):
        with pytest.raises(ValueError):
            parse_sweep(bad)
    with pytest.raises(ValueError):
        parse_weights("sentiment=high")


def test_settings_grid_skip_and_bon_curve(registry) -> None:
    objs = resolve_objectives("vader=2", registry)
    assert strategy_weights("args", objs, registry, 1.5) == {"vader": 3.0}
    assert strategy_weights("vas", objs, registry) is None  # no value head loaded
    warnings: list[str] = []
    settings = build_settings(["vas", "cd_block"], ["cd_block.k=2,3", "cd_block.block=4,8"],
                              objs, registry, bon_curve=True, warn=warnings.append)
    keys = [s.key for s in settings]
    assert keys[0] == "sample base"  # the reference always runs first
    assert sum(s.strategy == "cd_block" for s in settings) == 4  # a 2 x 2 grid
    assert [s.params["n"] for s in settings if s.strategy == "best_of_n"] == list(BON_CURVE)
    assert all(s.reference for s in settings if s.strategy == "best_of_n")
    assert not any(s.strategy == "vas" for s in settings)
    assert warnings and "vas" in warnings[0]
    with pytest.raises(ValueError, match="unknown objective"):
        resolve_objectives("nonexistent", registry)
    from alignserve.decoders import AlignmentError

    with pytest.raises(AlignmentError):  # out of the strategy's range: fails before generating
        build_settings(["best_of_n"], ["best_of_n.n=0"], objs, registry)
    # --reward-options reach the requests of reward-scored strategies, for scored rewards only;
    # a name the objectives do not score (a typo) fails instead of being dropped
    both = resolve_objectives("vader=1,concise=1", registry)
    opts = {"concise": {"target_words": 9}}
    args = [s for s in build_settings(["args"], [], both, registry, reward_options=opts)
            if s.strategy == "args"]
    assert args and all(s.alignment["reward_options"] == opts for s in args)
    with pytest.raises(AlignmentError, match="'consice', which the objectives do not score"):
        build_settings(["args"], [], both, registry, reward_options={"consice": {}})
    with pytest.raises(AlignmentError, match="do not score"):
        build_settings(["args"], [], objs, registry, reward_options=opts)


def test_sweep_head_picks_the_head_to_weight() -> None:
    """``vas.head=NAME`` weights that head instead of the objective's default value head (the
    frontier's lexical-head runs); unknown heads fail before generating."""
    from alignserve.decoders import AlignmentError
    from alignserve.value_models.registry import Registry

    reg = Registry.build(None, default_heads=True)
    objs = resolve_objectives("non_toxic", reg)
    settings = build_settings(["vas"], ["vas.head=non_toxic_lex", "vas.weight=4,8"], objs, reg)
    got = [s.alignment["weights"] for s in settings if s.strategy == "vas"]
    assert got == [{"non_toxic_lex": 4.0}, {"non_toxic_lex": 8.0}]
    assert all("head" not in s.alignment for s in settings if s.alignment)
    default = build_settings(["vas"], ["vas.weight=4"], objs, reg)
    assert default[-1].alignment["weights"] == {"non_toxic": 4.0}  # -> non_toxic_value
    with pytest.raises(AlignmentError):
        build_settings(["vas"], ["vas.head=no_such_head"], objs, reg)
    with pytest.raises(ValueError, match="approximates 'concise', not the objective"):
        build_settings(["vas"], ["vas.head=concise_lex"], objs, reg)
    # "a+b": the mean of two estimates of the objective (each weighted by beta / 2)
    mixed = build_settings(["vas"], ["vas.head=non_toxic+non_toxic_lex", "vas.weight=8"],
                           objs, reg)
    assert mixed[-1].alignment["weights"] == {"non_toxic": 4.0, "non_toxic_lex": 4.0}
    with pytest.raises(ValueError, match="approximates 'concise'"):
        build_settings(["vas"], ["vas.head=non_toxic_lex+concise_lex"], objs, reg)
    for spec in ("vas.head=non_toxic_lex+non_toxic_lex", "vas.head=non_toxic_lex+",
                 "vas.head=+"):
        with pytest.raises(ValueError, match="distinct heads"):
            build_settings(["vas"], [spec], objs, reg)


def test_tiny_eval_run(tmp_path: Path, model_dir: Path) -> None:
    """2 prompts x 8 tokens: sample, Best-of-N n=1,2 and a small cd_block, through the CLI."""
    from alignserve.eval.cli import main

    out = tmp_path / "eval"
    rc = main(["eval", "--strategies", "sample,best_of_n,cd_block", "--objective", "vader",
               "--prompts", "2", "--max-tokens", "8", "--seeds", "1",
               "--sweep", "best_of_n.n=1,2", "--sweep", "cd_block.k=2",
               "--sweep", "cd_block.block=4", "--concurrency", "4", "--no-progress",
               "--out", str(out)])
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    rows = {f"{r['strategy']} {r['setting']}": r for r in doc["results"]}
    assert list(rows) == ["sample base", "best_of_n n=1", "best_of_n n=2", "cd_block k=2 block=4"]
    assert doc["split"] == "test" and len(doc["prompts"]) == 2
    base, bon1, bon2 = rows["sample base"], rows["best_of_n n=1"], rows["best_of_n n=2"]
    # sampling against itself: a coin flip, no drift
    assert base["win_rate"] == 0.5 and base["kl"] == 0.0 and base["kl_proxy"] == 0.0
    assert base["kl_mc"] == pytest.approx(0.0, abs=1e-3)  # policy == base at temperature 1
    # Best-of-1 is plain sampling token for token (same seeds), so every number agrees (the
    # base log-probs up to float rounding: the two paths compute them in different batches)
    assert doc["samples"]["best_of_n n=1"] == doc["samples"]["sample base"]
    assert bon1["reward"] == pytest.approx(base["reward"])
    assert bon1["win_rate"] == 0.5 and bon1["kl_proxy"] == pytest.approx(0.0, abs=1e-3)
    assert bon2["kl"] == pytest.approx(math.log(2) - 0.5) and bon2["kl_source"] == "exact"
    assert bon2["win_rate"] >= 0.5  # the best of two includes the plain sample itself
    assert bon2["tokens_per_returned"] > 1.5  # two samples generated per returned answer
    assert [p["n"] for p in doc["bon_curve"]] == [1, 2]
    for r in doc["results"]:
        assert r["errors"] == 0 and r["responses"] == 2
        assert r["reward_lo"] <= r["reward"] <= r["reward_hi"]
        assert 0.0 <= r["win_rate"] <= 1.0 and 0.0 <= r["diversity"] <= 1.0
        assert -1.0 <= r["coherence"] <= 1.0
        assert r["tokens_per_s"] > 0 and r["wall_s_per_response"] > 0
    md = (out / "results.md").read_text()
    assert "| strategy | setting | reward [95% CI]" in md
    assert all(f"| {s} |" in md for s in ("sample", "best_of_n", "cd_block"))
    for name in ("reward_vs_kl.png", "reward_vs_compute.png"):
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE
