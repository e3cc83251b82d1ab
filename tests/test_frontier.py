"""bench/frontier.py: flags, prompt spread, the target verdicts on hand-made rows, and one tiny
real run (2 prompts x 4 tokens) that checks the KL bookkeeping against the sampler."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from conftest import ROOT

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def frontier():
    spec = importlib.util.spec_from_file_location("frontier", ROOT / "bench" / "frontier.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["frontier"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_flags_quick_and_overrides(frontier) -> None:
    full = frontier.parse_args([])
    assert (full.prompts, full.seeds, full.max_tokens) == (48, 3, 32)
    assert full.temperature == 0.7 and full.clients == 8
    assert full.objectives == ["sentiment", "non_toxic", "concise"]
    assert "best_of_n.n=2,4,8,16" in full.sweeps
    quick = frontier.parse_args(["--quick", "--prompts", "4"])
    assert (quick.prompts, quick.seeds, quick.max_tokens) == (4, 1, 16)  # explicit flag wins
    # a --sweep replaces that strategy's default grid; grids of unselected strategies drop out
    cfg = frontier.parse_args(["--strategies", "best_of_n,vas", "--sweep", "vas.weight=9"])
    assert cfg.sweeps == ["best_of_n.n=2,4,8,16", "vas.weight=9"]
    assert full.no_repeat_ngram_size == 0
    assert frontier.parse_args(["--no-repeat-ngram-size", "4"]).no_repeat_ngram_size == 4
    for bad in (["--temperature", "0"], ["--seeds", "0"], ["--objectives", ","],
                ["--no-repeat-ngram-size", "-1"],
                ["--strategies", "cd", "--sweep", "vas.weight=4"],  # vas is not run
                ["--sweep", "vas.weight=8,8"]):  # a repeated value
        with pytest.raises(SystemExit):
            frontier.parse_args(bad)


def test_spread_takes_categories_in_turn(frontier) -> None:
    from alignserve.data.prompts import load_prompts

    test = load_prompts("test", "mixed")
    got = frontier.spread(test, 8)
    assert [p.category for p in got[:4]] == list(dict.fromkeys(p.category for p in test))
    assert len(got) == 8 and len({p.id for p in got}) == 8
    assert all(p in test for p in got)  # the held-out split only
    assert frontier.spread(test, 0) == list(test)


def _row(strategy, params, reward, c1, cn, d2=0.9, degenerate=0.0):
    return {"strategy": strategy, "params": params,
            "setting": " ".join(f"{k}={v}" for k, v in params.items()) or "base",
            "reward": reward, "wall_rel_c1": c1, "wall_rel_cn": cn, "distinct_2": d2,
            "degenerate": degenerate, "errors": 0}


def test_verdict_checks_every_condition(frontier) -> None:
    rows = [
        _row("sample", {}, 0.10, 1.0, 1.0, d2=0.90),
        _row("best_of_n", {"n": 8}, 0.60, 4.0, 3.0),
        _row("vas", {"weight": 2}, 0.40, 1.2, 1.1),  # too little reward
        _row("vas", {"weight": 4}, 0.65, 1.9, 1.5),  # meets: <= 2.0 and <= 1.5
        _row("cd", {"weight": 8}, 0.70, 1.8, 1.6),  # 1.6 > half of 3.0 at 8 clients
        _row("genarm", {"weight": 2}, 0.62, 1.0, 1.0, d2=0.80),  # distinct-2 < 0.95 x 0.90
        _row("genarm", {"weight": 4}, 0.90, 1.0, 1.0, degenerate=0.05),  # loops
    ]
    v = frontier.verdict("sentiment", rows, 8)
    assert v["met"] == {"vas": True, "cd": False, "genarm": False}
    assert v["line"].startswith("Target sentiment")
    assert "VAS MET, CD NOT MET, GenARM NOT MET" in v["line"]
    vas, cd, genarm = v["details"]
    assert "weight=4" in vas and "FAILS" not in vas
    assert "wall time 0.45 / 0.53 of Best-of-8's (<= 0.5) FAILS" in cd
    assert genarm.count("FAILS") == 1  # the closest GenARM setting fails one condition only
    no_bon = frontier.verdict("sentiment", rows[:1] + rows[2:], 8)
    assert "cannot check" in no_bon["line"] and no_bon["met"]["vas"] is None


def test_markdown_flags_rows_with_failed_responses(frontier) -> None:
    """A failed response scores as an empty answer, so a row with failures is no result: the
    table says which rows had them."""
    rows = [_row("sample", {}, 0.10, 1.0, 1.0), _row("vas", {"weight": 4}, 0.2, 1.0, 1.0)]
    rows[1]["errors"], rows[1]["errors_cn"], rows[1]["responses"] = 3, 2, 8
    for r in rows:
        r.update(reward_lo=0.0, reward_hi=0.3, tokens_per_returned=1.0,
                 positions_per_returned=2.0, kl_per_token=0.1, kl_source="mc",
                 s_per_answer_c1=1.0, s_per_answer_cn=0.5)
    doc = {"config": {"clients": 8, "seeds": 1, "max_tokens": 4, "temperature": 0.7,
                      "heads": "h", "quick": True},
           "machine": "m", "device": "cpu", "objectives": [
               {"objective": "sentiment", "suite": "mixed", "prompts": ["p"], "rows": rows,
                "verdict": frontier.verdict("sentiment", rows, 8)}]}
    md = frontier.markdown(doc)
    assert "Failed responses" in md and "vas weight=4: 3 of 8 at 1 client, 2 at 8" in md


def test_tiny_run(tmp_path: Path, frontier) -> None:
    """2 prompts x 4 tokens at 1 and 2 clients: plain, Best-of-2/8 and VAS with today's heads."""
    out = tmp_path / "frontier"
    rc = frontier.main(["--objectives", "sentiment", "--prompts", "2", "--seeds", "1",
                        "--max-tokens", "4", "--clients", "2", "--strategies", "best_of_n,vas",
                        "--sweep", "best_of_n.n=2,8", "--sweep", "vas.weight=3",
                        "--out", str(out), "--no-progress"])
    assert rc == 0
    doc = json.loads((out / "frontier.json").read_text())
    [obj] = doc["objectives"]
    assert obj["split"] == "test" and obj["suite"] == "mixed" and len(obj["prompts"]) == 2
    rows = {f"{r['strategy']} {r['setting']}": r for r in obj["rows"]}
    assert list(rows) == ["sample base", "best_of_n n=2", "best_of_n n=8", "vas weight=3"]
    plain, bon8, vas = rows["sample base"], rows["best_of_n n=8"], rows["vas weight=3"]
    # the teacher-forced log p_T agrees with the sampler's own log-probability: plain KL = 0
    assert plain["kl_source"] == "mc" and abs(plain["kl_per_token"]) < 1e-4
    assert plain["wall_rel_c1"] == 1.0 and plain["wall_rel_cn"] == 1.0
    assert bon8["kl_source"] == "exact" and bon8["tokens_per_returned"] > 2
    # VAS runs a k-token tree forward per token: more positions than plain, one token each
    assert vas["tokens_per_returned"] == 1.0
    assert vas["positions_per_returned"] > plain["positions_per_returned"] + 10
    for r in obj["rows"]:
        assert r["errors"] == 0 and r["responses"] == 2
        assert r["reward_lo"] <= r["reward"] <= r["reward_hi"]
        assert r["s_per_answer_c1"] > 0 and r["s_per_answer_cn"] > 0
        assert -1.0 <= r["coherence"] <= 1.0  # on-topic: prompt-answer MiniLM cosine
    assert set(obj["verdict"]["met"]) == {"vas", "cd", "genarm"}
    md = (out / "frontier.md").read_text()
    assert "| strategy | setting | reward [95% CI] |" in md and "Target sentiment" in md
    assert "| degenerate | on-topic |" in md and "Failed responses" not in md
    assert (out / "frontier.png").read_bytes()[:8] == PNG_SIGNATURE
    # every answer at one client, with its setting and reward (frontier.json keeps six)
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 4 * 2 and "_answers" not in json.dumps(doc)
    vas_answers = [a for a in answers if a["setting"] == "vas weight=3"]
    assert [a["text"] for a in vas_answers] == [a["text"] for a in vas["samples"]]
    assert [a["reward"] for a in vas_answers] == [a["reward"] for a in vas["samples"]]


def test_heads_report_lists_shipped_heads_and_prints_null_metrics_as_na(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """bench/heads_report.py: one row per shipped head with its target verdict; a head whose
    metrics are null (undefined, written so by save_head) reads n/a, not a crash."""
    spec = importlib.util.spec_from_file_location("heads_report",
                                                  ROOT / "bench" / "heads_report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    from alignserve.value_models.heads import default_heads_dir

    assert report.main() == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| `")]
    shipped = sorted(p.parent.name for p in default_heads_dir().glob("*/manifest.json"))
    assert [r.split("`")[1] for r in rows] == shipped
    assert any("concise_lex_arm" in r and "accuracy >= 0.75: met" in r for r in rows)

    for name in ("concise_value", "concise_lex_arm"):
        folder = tmp_path / name
        folder.mkdir()
        m = json.loads((default_heads_dir() / name / "manifest.json").read_text())
        m["metrics"] = {k: None for k in m["metrics"]}
        (folder / "manifest.json").write_text(json.dumps(m))
    assert report.main(str(tmp_path)) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| `")]
    assert len(rows) == 2 and all(r.count("n/a") >= 2 and ">= 0." in r for r in rows), rows
    assert not any("None" in r or "not met" in r for r in rows), rows  # unknown, not failed
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text("{not json")
    assert report.main(str(tmp_path)) == 1  # the others are still listed
    out = capsys.readouterr()
    assert "broken/manifest.json: not a head manifest" in out.err and out.out.count("| `") == 2
    (tmp_path / "empty").mkdir()
    assert report.main(str(tmp_path / "empty")) == 2
    assert "no heads in" in capsys.readouterr().err
    assert report.main(str(tmp_path / "missing")) == 2
