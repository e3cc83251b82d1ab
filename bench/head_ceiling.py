"""How far the shipped heads are from what their inputs allow (issue #12's head targets).

The targets are value Spearman@50% >= 0.6 and ARM pairwise accuracy >= 0.75. This compares
each shipped head with reference rankers on the same validation samples (the shipped sample
cache: 80 validation prompts x 8 samples x 48 tokens; sampled first if missing, as
``alignserve train all`` would), so a miss can be told apart from a ceiling:

* value heads, Spearman rho against the final reward, at 50% of each response (the target's
  metric) and at 100%:
  - ``head``: the shipped value head on the frozen base's states (what VAS / CD use);
  - ``text@50%``: the reward source itself on the decoded first half of the response. A
    reference, not a head: it reads the words, which a head must infer from the states. Where
    it is far above the head, the missing signal is in the text but not in the states.
* ARMs, pairwise accuracy on within-prompt pairs whose rewards differ by more than ``margin``
  reward standard deviations (0.1 is the shipped heads' margin; 1.0 keeps clear pairs only):
  - ``ARM``: the shipped ARM's sum_t log pi_r(y_t) (exact, full vocabulary);
  - ``value head at the end``: the shipped value head at the last state, which has read the
    whole answer: how well one head on these states ranks the pairs at all;
  - ``text@50%``: the reward on the first half of each response.
* lexical heads (where ``<reward>_lex`` ships): the plain sum of their per-token feature over
  half of / the whole answer beside the lexical value head's rho and the lexical ARM's
  accuracy, and with ``--linear-arm`` the lexical ARM with its bias replaced by ``c *
  feature``: whether the words lack the signal, or the head's form or training loses it.

    python bench/head_ceiling.py                      # the cache `alignserve train all` made
    python bench/head_ceiling.py --run-dir DIR --rewards sentiment --out runs/head_ceiling

Without the validation samples under ``--run-dir`` it stops and says so; ``--sample`` samples
them first (80 prompts x 8 x 48 tokens: 10-30 min on 2 CPU cores).

Writes ``head_ceiling.json``, ``head_ceiling.md`` and ``head_ceiling.png`` (grouped bars with
the target lines) to ``--out`` (default ``runs/head_ceiling``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

REWARDS = ("sentiment", "non_toxic", "concise")
MARGINS = (0.1, 1.0)


def partial_texts(tokenizer: Any, split: Any, frac: float) -> list[str]:
    """The decoded first ``frac`` of every sample's response tokens (the value metric's cut)."""
    out = []
    for s in range(split.num_samples):
        a = int(split.offsets[s]) - s  # token rows: one fewer per sample than state rows
        t_len = int(split.lengths[s]) - 1
        cut = round(t_len * frac)
        out.append(tokenizer.decode(split.tokens[a:a + cut].tolist(), skip_special_tokens=True))
    return out


def pair_accuracy(score: np.ndarray, pairs: list[tuple[int, int]]) -> float:
    """Fraction of (winner, loser) pairs that ``score`` orders the same way (ties count 0.5)."""
    w = score[[p[0] for p in pairs]]
    lo = score[[p[1] for p in pairs]]
    return float(np.mean((w > lo) + 0.5 * (w == lo)))


def shipped_cfg(reward: str, run_dir: str, device: str = "cpu", threads: int | None = None,
                progress: bool = False) -> Any:
    """The shipped heads' data settings (their sample cache) for one reward."""
    from alignserve.value_models import training as T

    return T.TrainConfig(kind="value", reward=reward, out=str(Path(run_dir) / "unused"),
                         run_dir=run_dir, device=device, threads=threads, progress=progress,
                         **T.SHIPPED_DATA).resolved()


def one_reward(reward: str, run_dir: str, device: str, threads: int | None,
               progress: bool, linear_arm: bool = False) -> dict[str, Any]:
    from scipy.stats import spearmanr

    from alignserve.value_models import training as T
    from alignserve.value_models.heads import default_heads_dir, load_head
    from alignserve.value_models.rewards import default_rewards

    cfg = shipped_cfg(reward, run_dir, device, threads, progress)
    weights = T.parse_reward_spec(reward)
    base = T.BaseModel(cfg.model, cfg.device, cfg.slots, cfg.threads)
    try:
        val = T.load_split(base, cfg, "validation", cfg.val_prompts, weights)
        embed, tokenizer = base.embed, base.tokenizer
        sources = default_rewards(base.model_dir)
        prompts = [p["text"] for p in T.sample_responses(base, cfg, T.select_prompts(
            "validation", cfg.suite, cfg.val_prompts), T.cache_dir(cfg, "validation"))["prompts"]
            for _ in p["responses"]]
    finally:
        base.close()
    heads = default_heads_dir()
    vhead = load_head(heads / f"{reward}_value")
    arm = load_head(heads / f"{reward}_arm")
    stats = vhead.manifest["reward_stats"]
    val.rewards = (val.rewards - stats["mean"]) / stats["std"]  # margins in reward stds
    r = val.rewards.numpy()

    # value head: the metric the target uses, on the features the head reads
    pooled = vhead.manifest["arch"].get("pool", "none") != "none"
    states = val.hidden
    feats = T.mean_pool_features(states, val.offsets) if pooled else states
    vm = T.value_metrics(vhead.module, T.Split(feats, val.offsets, val.group, val.tokens,
                                               val.rewards, val.folder))
    v_all = T._predict(vhead.module, feats).numpy()
    v_end = v_all[val.offsets[1:].numpy() - 1]

    # the reward itself on the first half of each response
    half = partial_texts(tokenizer, val, 0.5)
    text50 = np.zeros(len(half))
    for name, w in weights.items():
        text50 += w * np.asarray(sources[name].score(prompts, half), dtype=np.float64)
    rho_text = float(spearmanr(text50, r).statistic)

    # ARM: exact accuracies at each margin, beside the references on the same pairs
    arms = []
    for margin in MARGINS:
        pairs = T.preference_pairs(val, margin)
        am = T.arm_metrics(arm.module, val, pairs, embed)
        arms.append({"margin": margin, "pairs": len(pairs),
                     "arm": am.get("pairwise_accuracy", float("nan")),
                     "base_alone": am.get("base_pairwise_accuracy", float("nan")),
                     "value_head_at_end": pair_accuracy(v_end, pairs),
                     "text_at_50": pair_accuracy(text50, pairs)})
    lex = lexical_rows(reward, heads, val, embed, arms, linear_arm)
    return {"reward": reward, "samples": val.num_samples,
            "value": {"head_50": vm["spearman_50"], "head_100": vm["spearman_100"],
                      "text_50": rho_text, "head_pool": vhead.manifest["arch"].get("pool")},
            "arm": arms, "lexical": lex}


LINEAR_C = (0.05, 0.5, 2.0)


def lexical_rows(reward: str, heads: Path, val: Any, embed: Any, arms: list[dict[str, Any]],
                 linear_arm: bool) -> dict[str, Any] | None:
    """The shipped lexical heads of ``reward`` beside the plain sum of their per-token feature
    (the head's table with its lexicon, as training and decoding read it) over the first half
    and over the whole of each answer: how much of what the words say each head keeps. With
    ``linear_arm``, also the lexical ARM with its bias replaced by ``c * feature`` (the best c
    of ``LINEAR_C``, signed as the feature's orientation): whether the ARM's form or its
    training limits its accuracy. Features are oriented to rise with the reward (their sign
    flipped where their sum over whole answers ranks the reward negatively). Adds
    ``lex_arm`` and ``feature_sum_at_end`` to each row of ``arms``; None without a lexical
    value head."""
    from scipy.stats import spearmanr

    from alignserve.value_models import training as T
    from alignserve.value_models.heads import load_head
    from alignserve.value_models.lexical import contextual_rows, lexical_features

    if not (heads / f"{reward}_lex").is_dir():
        return None
    vlex = load_head(heads / f"{reward}_lex")
    feats = lexical_features(vlex.module.table, val.tokens, val.offsets, vlex.module.lexicon)
    vm = T.value_metrics(vlex.module, T.Split(feats, val.offsets, val.group, val.tokens,
                                              val.rewards, val.folder))
    lengths = (val.lengths - 1).tolist()
    rows = contextual_rows(vlex.module.table, val.tokens, lengths, vlex.module.lexicon)[:, 0]
    ends = np.cumsum([0, *lengths])
    half = np.array([float(rows[a:a + round((b - a) * 0.5)].sum())
                     for a, b in zip(ends[:-1], ends[1:])])
    full = np.array([float(rows[a:b].sum()) for a, b in zip(ends[:-1], ends[1:])])
    r = val.rewards.numpy()
    # a feature may point against the reward (non_toxic's is an offensiveness score, concise's
    # a word count): orient it by its rank correlation with the reward over whole answers
    sign = 1.0 if spearmanr(full, r).statistic >= 0 else -1.0
    half, full = sign * half, sign * full
    out: dict[str, Any] = {"featurizer": vlex.manifest["arch"]["lexical"]["featurizer"],
                           "orientation": sign,
                           "head_50": vm["spearman_50"],
                           "feature_sum_50": float(spearmanr(half, r).statistic)}
    arm_dir = heads / f"{reward}_lex_arm"
    lex_arm = load_head(arm_dir).module if arm_dir.is_dir() else None
    for a in arms:
        pairs = T.preference_pairs(val, a["margin"])
        a["feature_sum_at_end"] = pair_accuracy(full, pairs)
        if lex_arm is not None:
            a["lex_arm"] = T.arm_metrics(lex_arm, val, pairs, embed)["pairwise_accuracy"]
    if lex_arm is not None and linear_arm:
        pairs = T.preference_pairs(val, MARGINS[0])
        std = float(lex_arm.table[:, 0].float().std())
        best = {}
        lex_arm.reward_form = "increment"  # the sweep measures the increment form's ceiling
        for c in LINEAR_C:
            with torch.no_grad():  # tanh(0.01 x) ~ 0.01 x: bias = c * (feature - its mean)
                for t in (lex_arm.fc1.weight, lex_arm.fc1.bias, lex_arm.fc2.weight,
                          lex_arm.fc2.bias):
                    t.zero_()
                lex_arm.fc1.weight[0, 0] = 0.01
                lex_arm.fc2.weight[0, 0] = sign * c * 100.0 * std
            lex_arm.clear_caches()  # the weights changed in place
            best[str(c)] = T.arm_metrics(lex_arm, val, pairs, embed)["pairwise_accuracy"]
        out["linear_arm"] = best
    return out


def to_markdown(rows: list[dict[str, Any]], machine: str) -> str:
    out = [f"Machine: {machine}. Validation split of the shipped sample cache "
           f"({rows[0]['samples']} samples).", "",
           "| reward | value head rho@50% (target 0.6) | value head rho@100% | reward on "
           "the text @50% |", "|---|---|---|---|"]
    for row in rows:
        v = row["value"]
        out.append(f"| {row['reward']} | **{v['head_50']:.2f}** | {v['head_100']:.2f} | "
                   f"{v['text_50']:.2f} |")
    out += ["", "| reward | margin (reward stds) | pairs | ARM acc (target 0.75) | base alone | "
            "value head at the end | reward on the text @50% |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        for a in row["arm"]:
            out.append(f"| {row['reward']} | {a['margin']:g} | {a['pairs']} | **{a['arm']:.2f}** "
                       f"| {a['base_alone']:.2f} | {a['value_head_at_end']:.2f} | "
                       f"{a['text_at_50']:.2f} |")
    lex = [row for row in rows if row.get("lexical")]
    if lex:
        out += ["", "| reward | lexical featurizer | lexical value head rho@50% | feature sum "
                "@50% (oriented) | margin | lexical ARM acc | feature sum at the end (pair "
                "acc) | ARM with bias c * feature, best c |", "|---|---|---|---|---|---|---|---|"]
        for row in lex:
            x = row["lexical"]
            lin = x.get("linear_arm")
            best = (f"{max(lin.values()):.2f} (c {max(lin, key=lin.__getitem__)})"
                    if lin else "—")
            for a in row["arm"]:
                la = f"**{a['lex_arm']:.2f}**" if "lex_arm" in a else "—"
                out.append(f"| {row['reward']} | {x['featurizer']} | **{x['head_50']:.2f}** | "
                           f"{x['feature_sum_50']:.2f} | {a['margin']:g} | {la} | "
                           f"{a['feature_sum_at_end']:.2f} | "
                           f"{best if a['margin'] == MARGINS[0] else '—'} |")
    return "\n".join(out) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(len(rows))
    ax1.bar(x - 0.2, [r["value"]["head_50"] for r in rows], 0.4, label="value head @50%")
    ax1.bar(x + 0.2, [r["value"]["text_50"] for r in rows], 0.4, label="reward on text @50%")
    ax1.axhline(0.6, color="k", ls="--", lw=1, label="target 0.6")
    ax1.set_xticks(x, [r["reward"] for r in rows])
    ax1.set_ylabel("Spearman rho vs final reward")
    ax1.set_title("value heads")
    ax1.legend(fontsize=8)
    first = [next(a for a in r["arm"] if a["margin"] == MARGINS[0]) for r in rows]
    ax2.bar(x - 0.27, [a["arm"] for a in first], 0.27, label="ARM")
    ax2.bar(x, [a["value_head_at_end"] for a in first], 0.27, label="value head at the end")
    ax2.bar(x + 0.27, [a["text_at_50"] for a in first], 0.27, label="reward on text @50%")
    ax2.axhline(0.75, color="k", ls="--", lw=1, label="target 0.75")
    ax2.set_ylim(0.3, 1.0)
    ax2.set_xticks(x, [r["reward"] for r in rows])
    ax2.set_ylabel(f"pairwise accuracy (margin {MARGINS[0]:g} std)")
    ax2.set_title("ARMs")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rewards", nargs="+", default=list(REWARDS), choices=REWARDS,
                    help="rewards whose shipped value head and ARM are compared (default all)")
    ap.add_argument("--run-dir", default="runs/train",
                    help="the sample cache's run dir (default runs/train, as `alignserve train "
                         "all`)")
    ap.add_argument("--sample", action="store_true",
                    help="sample the validation split first when it is not cached (10-30 min)")
    ap.add_argument("--out", default="runs/head_ceiling",
                    help="output folder for head_ceiling.{json,md,png} (default "
                         "runs/head_ceiling)")
    ap.add_argument("--device", default="cpu", help="torch device (default cpu)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--no-progress", action="store_true", help="hide progress bars")
    ap.add_argument("--linear-arm", action="store_true",
                    help="also score each lexical ARM with its bias replaced by c * feature, "
                         f"c in {LINEAR_C} (a few minutes per reward)")
    args = ap.parse_args(argv)
    from alignserve.value_models.training import cache_dir

    missing = [str(cache_dir(shipped_cfg(r, args.run_dir), "validation"))
               for r in args.rewards]
    missing = [m for m in dict.fromkeys(missing) if not (Path(m) / "samples.pt").is_file()]
    if missing and not args.sample:
        ap.error(f"no cached validation samples in {missing[0]}: point --run-dir at the run "
                 "dir `alignserve train all` used, or pass --sample to sample them (10-30 min)")
    out = Path(args.out)
    try:  # fail now rather than after the work
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        ap.error(f"--out {args.out}: {exc}")
    torch.manual_seed(0)
    sys.path.insert(0, str(Path(__file__).parent))
    from strategies import machine  # the same machine line as the other benches

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for reward in args.rewards:
        print(f"[head_ceiling] {reward} ...", file=sys.stderr, flush=True)
        rows.append(one_reward(reward, args.run_dir, args.device, args.threads,
                               not args.no_progress, args.linear_arm))
    mach = machine(args.device, torch.get_num_threads())
    md = to_markdown(rows, mach)
    (out / "head_ceiling.json").write_text(json.dumps({"machine": mach, "rows": rows}, indent=1))
    (out / "head_ceiling.md").write_text(md)
    plot(rows, out / "head_ceiling.png")
    print(md)
    print(f"wrote {out}/head_ceiling.{{json,md,png}}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
