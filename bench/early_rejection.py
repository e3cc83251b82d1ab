"""Early rejection benchmark: does pruned Best-of-N reach Best-of-16's reward at Best-of-4's cost?

Issue #17's target: on >= 48 held-out prompts x 3 seeds, for the ``sentiment`` objective (the
``mixed`` suite's test prompts) and the ``non_toxic`` objective (the ``rtp`` suite's test
prompts), Best-of-N with early rejection (Speculative Rejection, Sun et al., NeurIPS 2024)
reaches plain Best-of-16's mean reward at no more than plain Best-of-4's wall time per answer,
with one client and with 8 concurrent clients, in the same run.

For each objective and concurrency C, every configuration (plain Best-of-4 and Best-of-16 with
``keep=1``, then the early-rejection settings given with ``--er``) answers every (prompt, seed)
job, submitted to the in-process engine from C threads. Configurations are interleaved seed by
seed so that load drifting on a shared machine hits them alike. Reported per configuration:

* reward: the objective's raw score of the returned answer, averaged over seeds per prompt,
  then mean and Student-t 95% interval over prompts; the paired difference with Best-of-16;
* wall time per answer: the batch's wall time divided by the answers it returned (at C = 1
  this is the latency), and its ratio to Best-of-4's at the same C;
* tokens generated per answer (pruned and losing samples included) and samples pruned.

Writes ``results.md``, ``results.json`` and ``early_rejection.png`` (reward vs relative wall
time, one panel per objective and concurrency) to ``--out``.

    python bench/early_rejection.py --prompts 8 --seeds 1 --new-tokens 16   # small, minutes
    python bench/early_rejection.py                     # the issue's 48 prompts x 3 seeds, 32 tok
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

T0 = time.perf_counter()
SUITE = {"sentiment": "mixed", "non_toxic": "rtp"}
# the server's default policy for n=16, a denser schedule, and a cheap one starting 32 samples
# (chosen on the validation split, sentiment, 8 prompts x 16 tokens; see README)
DEFAULT_ER = ("n=16", "n=16,prune_every=4", "n=32,prune_every=2,keep=0.25")


def log(msg: str) -> None:
    print(f"[bench {time.perf_counter() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


@dataclass
class Config:
    label: str
    params: dict[str, Any]
    # filled by the run: key (concurrency) -> measurements
    walls: dict[int, float] = field(default_factory=dict)
    answers: dict[int, int] = field(default_factory=dict)
    rewards: dict[int, dict[tuple[int, int], float]] = field(default_factory=dict)
    texts: dict[int, dict[tuple[int, int], str]] = field(default_factory=dict)
    generated: dict[int, list[int]] = field(default_factory=dict)
    pruned: dict[int, list[int]] = field(default_factory=dict)


def parse_er(spec: str) -> dict[str, Any]:
    """``"n=16,prune_every=4,keep=0.25"`` -> best_of_n options."""
    out: dict[str, Any] = {}
    for part in spec.split(","):
        k, _, v = part.partition("=")
        if not v:
            raise SystemExit(f"bad --er {spec!r}: expected name=value pairs")
        out[k.strip()] = float(v) if k.strip() == "keep" else int(v)
    return out


def label_of(p: dict[str, Any]) -> str:
    if p.get("keep") == 1.0:
        return f"BoN-{p['n']}"
    rest = ",".join(f"{k}={v}" for k, v in p.items() if k != "n")
    return f"ER-{p['n']}" + (f" ({rest})" if rest else " (defaults)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--objectives", default="sentiment,non_toxic")
    ap.add_argument("--prompts", type=int, default=48, help="held-out prompts per objective")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32, help="max_tokens per answer")
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--split", default="test", choices=["train", "validation", "test"],
                    help="prompt split (tune on validation, report on test)")
    ap.add_argument("--er", action="append", default=None,
                    help="an early-rejection setting, e.g. n=16,prune_every=4,keep=0.25 "
                         f"(repeatable; default {' / '.join(DEFAULT_ER)})")
    ap.add_argument("--ref-n", type=int, default=16, help="the Best-of-N whose reward to reach")
    ap.add_argument("--cheap-n", type=int, default=4, help="the Best-of-N whose cost to match")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="runs/early_rejection")
    args = ap.parse_args(argv)

    from strategies import machine

    from alignserve.data.prompts import load_prompts
    from alignserve.decoders import build_decoder
    from alignserve.engine.model_store import resolve_model
    from alignserve.engine.sampling import SamplingParams
    from alignserve.engine.scheduler import Engine, EngineConfig, EngineRequest
    from alignserve.eval.metrics import mean_ci95
    from alignserve.value_models.registry import Registry

    if args.threads:
        torch.set_num_threads(args.threads)
    levels = [int(c) for c in args.concurrency.split(",")]
    objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    for o in objectives:
        if o not in SUITE:
            raise SystemExit(f"unknown objective {o!r}; choose from {sorted(SUITE)}")
    er = [parse_er(s) for s in (args.er or DEFAULT_ER)]
    params = [{"n": args.cheap_n, "keep": 1.0}, {"n": args.ref_n, "keep": 1.0}, *er]
    for p in params:  # validate before loading anything
        build_decoder({"strategy": "best_of_n", **p}, registry=None)
    ref_label, cheap_label = label_of(params[1]), label_of(params[0])

    model_dir = resolve_model(None, progress=False)
    registry = Registry.build()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    prompts: dict[str, list[tuple[list[int], str]]] = {}
    for o in objectives:
        rows = load_prompts(args.split, SUITE[o])[:args.prompts]
        if len(rows) < args.prompts:
            log(f"{o}: only {len(rows)} {args.split} prompts in suite {SUITE[o]}")
        enc = []
        for p in rows:
            text = tok.apply_chat_template([{"role": "user", "content": p.text}],
                                           add_generation_prompt=True, tokenize=False)
            enc.append((list(tok(text, add_special_tokens=False).input_ids), text))
        prompts[o] = enc
    longest = max(len(ids) for enc in prompts.values() for ids, _ in enc)
    max_n = max(p["n"] for p in params)
    engine = Engine(EngineConfig(model_dir=model_dir, slots=max_n * max(levels),
                                 max_len=longest + args.new_tokens + 8, max_waiting=100_000,
                                 request_timeout_s=36_000, device=args.device))

    def one(o: str, p: dict[str, Any], i: int, seed: int, max_tokens: int) -> dict[str, Any]:
        ids, text = prompts[o][i]
        dec = build_decoder({"strategy": "best_of_n", "weights": {o: 1.0}, **p},
                            registry=registry)
        return engine.generate(EngineRequest(
            prompt_ids=ids, prompt_text=text, decoder=dec, resources=registry,
            params=SamplingParams(temperature=1.0, max_tokens=max_tokens, seed=seed)))

    log("warm-up (model, reward models)")
    for o in objectives:
        for p in params:
            one(o, p, 0, 0, 2)
    def run_batch(o: str, c: Config, conc: int, seed: int) -> None:
        """Every prompt of objective ``o`` once with ``seed``, from ``conc`` threads."""
        lock = threading.Lock()

        def job(i: int) -> None:
            r = one(o, c.params, i, seed, args.new_tokens)
            with lock:
                c.rewards.setdefault(conc, {})[(i, seed)] = float(r["info"]["rewards"][o][0])
                c.texts.setdefault(conc, {})[(i, seed)] = r["choices"][0]["text"]
                c.generated.setdefault(conc, []).append(r["stats"].tokens_generated)
                c.pruned.setdefault(conc, []).append(sum(r["info"].get("pruned_per_check", [])))

        n_prompts = len(prompts[o])
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=conc) as pool:
            list(pool.map(job, range(n_prompts)))
        dt = time.perf_counter() - t0
        c.walls[conc] = c.walls.get(conc, 0.0) + dt
        c.answers[conc] = c.answers.get(conc, 0) + n_prompts
        log(f"{o} c={conc} seed {seed} {c.label}: {dt / n_prompts:.2f} s/answer")

    configs: dict[str, list[Config]] = {}
    for o in objectives:
        configs[o] = [Config(label_of(p), p) for p in params]
        for conc in levels:
            for s in range(args.seeds):
                for c in configs[o]:
                    run_batch(o, c, conc, 1000 + s)
    engine.shutdown()

    # ---- report ------------------------------------------------------------------------------
    lines: list[str] = []
    doc: dict[str, Any] = {"machine": machine(args.device, torch.get_num_threads()),
                           "settings": vars(args), "results": {}}
    lines.append(f"Machine: {doc['machine']}")
    lines.append(f"Settings: {args.prompts} {args.split} prompts x {args.seeds} seed(s), "
                 f"max {args.new_tokens} new tokens (EOS and stop end answers), temperature 1, "
                 f"in-process engine, concurrency {args.concurrency}; objectives "
                 + ", ".join(f"{o} ({SUITE[o]} suite)" for o in objectives) + ".")
    verdicts = []
    for o in objectives:
        cfgs = configs[o]
        ref, cheap = cfgs[1], cfgs[0]
        for conc in levels:
            keys = sorted(ref.rewards[conc])
            idx = sorted({i for i, _ in keys})

            def per_prompt(c: Config, conc: int = conc, keys: list = keys,
                           idx: list = idx) -> np.ndarray:
                return np.array([statistics.fmean(c.rewards[conc][k] for k in keys
                                                  if k[0] == i) for i in idx])

            lines.append(f"\n**{o}**, {conc} client(s)\n")
            lines.append(f"| setting | reward [95% CI] | vs {ref_label} [95% CI] | s/answer "
                         f"| wall vs {cheap_label} | tokens generated / answer | "
                         f"pruned / answer |")
            lines.append("|---|---|---|---|---|---|---|")
            cheap_wall = cheap.walls[conc] / cheap.answers[conc]
            ref_pp = per_prompt(ref)
            rows = []
            for c in cfgs:
                pp = per_prompt(c)
                m, lo, hi = mean_ci95(pp)
                dm, dlo, dhi = mean_ci95(pp - ref_pp)
                wall = c.walls[conc] / c.answers[conc]
                row = {"label": c.label, "params": c.params, "reward": m, "ci": [lo, hi],
                       "diff_vs_ref": dm, "diff_ci": [dlo, dhi], "s_per_answer": wall,
                       "wall_vs_cheap": wall / cheap_wall,
                       "tokens_generated": statistics.fmean(c.generated[conc]),
                       "pruned": statistics.fmean(c.pruned[conc])}
                rows.append(row)
                diff = "—" if c is ref else f"{dm:+.3f} [{dlo:+.3f}, {dhi:+.3f}]"
                lines.append(f"| {c.label} | {m:.3f} [{lo:.3f}, {hi:.3f}] | {diff} | {wall:.2f} "
                             f"| {wall / cheap_wall:.2f}x | {row['tokens_generated']:.1f} | "
                             f"{row['pruned']:.1f} |")
                if c.params.get("keep") != 1.0:
                    reward_ok = m >= ref_pp.mean()
                    cost_ok = wall <= cheap_wall
                    verdicts.append(
                        f"{o}, c={conc}, {c.label}: reward {m:.3f} vs {ref_label} "
                        f"{ref_pp.mean():.3f} -> {'reached' if reward_ok else 'NOT reached'} "
                        f"(paired diff upper 95% bound {dhi:+.3f}); wall {wall / cheap_wall:.2f}x "
                        f"{cheap_label} -> {'within' if cost_ok else 'NOT within'}; target "
                        f"{'MET' if reward_ok and cost_ok else 'not met'}")
            doc["results"][f"{o}/c={conc}"] = rows
        same = all(c.texts[levels[0]] == c.texts[lv] for c in cfgs for lv in levels)
        lines.append(f"\n{o}: answers identical at every concurrency: {same}")
    lines.append("\nTargets (reward >= plain " + ref_label + "'s mean, wall per answer <= plain "
                 + cheap_label + "'s, same concurrency, same run):")
    lines += [f"- {v}" for v in verdicts]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(doc, indent=1, default=str))
    plot(doc, objectives, levels, cheap_label, out / "early_rejection.png")
    log(f"wrote {out}/results.md, results.json, early_rejection.png")
    return 0


def plot(doc: dict[str, Any], objectives: list[str], levels: list[int], cheap_label: str,
         path: Path) -> None:
    """Reward (95% CI) against wall time per answer relative to the cheap Best-of-N."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2 * len(levels), 3.8 * len(objectives)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(objectives), len(levels), squeeze=False)
    for r, o in enumerate(objectives):
        for k, conc in enumerate(levels):
            ax = axes[r][k]
            for j, row in enumerate(doc["results"][f"{o}/c={conc}"]):
                plain = row["params"].get("keep") == 1.0
                x, y = row["wall_vs_cheap"], row["reward"]
                ax.errorbar([x], [y], yerr=[[y - row["ci"][0]], [row["ci"][1] - y]],
                            fmt="s" if plain else "o", color=f"C{j}", capsize=3,
                            label=row["label"])
            ax.axvline(1.0, color="grey", lw=0.8, ls="--")
            ax.set_title(f"{o}, {conc} client(s)")
            ax.set_xlabel(f"wall time per answer / {cheap_label}'s")
            ax.set_ylabel(f"{o} reward")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
