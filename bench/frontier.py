"""Reward vs cost frontier (issue #12): does guidance reach Best-of-8's reward at half its cost?

For each objective (``sentiment``, ``non_toxic``, ``concise``) every setting — plain sampling
(= Best-of-1), Best-of-{2,4,8,16}, VAS and CD beta sweeps, a GenARM alpha sweep, ARGS and
blockwise CD — answers the same held-out test prompts with the same seeds, in this process
(``Engine`` + ``Registry``, as ``bench/strategies.py``), twice: one client (requests one after
another) and N concurrent clients (default 8). Settings are interleaved chunk by chunk in a
shuffled order, so a change in machine load while the run goes on hits all of them alike; costs
are reported as ratios to plain sampling measured in the same rounds.

Columns (quality from the one-client run; both runs use the same seeds):

* reward: the objective's reward source itself (e.g. the MiniLM zero-shot sentiment scorer for
  ``sentiment``), mean with a 95% Student-t interval over prompts (seeds averaged per prompt);
* wall time per answer ÷ plain's, at 1 and at N clients (batch wall time / answers);
* tokens generated per returned token (discarded samples, blocks and candidates included) and
  token positions processed per returned token (every transformer position: prompt prefill,
  decode steps, tree candidates, rollouts, backbones; reward models such as MiniLM are not
  counted, their cost is in the wall time);
* KL per token from plain sampling at the same temperature: Best-of-N ``log N - (N-1)/N``
  (exact) and blockwise CD ``(log K - (K-1)/K) * blocks`` (bound), divided by the mean answer
  length; token-wise strategies the Monte-Carlo estimate ``sum_t log pi(y_t) - log p_T(y_t)``,
  with ``p_T`` from one teacher-forced forward of the base at the run's temperature (plain
  sampling's own estimate is 0 up to float rounding, a check of the bookkeeping);
* distinct-2 (whitespace bigrams pooled over all answers) and the fraction of degenerate
  answers (a model-token 4-gram occurring 3 or more times).

Targets, printed as a verdict per objective: VAS, CD and GenARM each reach Best-of-8's mean
reward at <= 1/2 of Best-of-8's wall time per answer, at 1 and at N clients, with distinct-2
>= 0.95x plain's and no degenerate answer.

Outputs in ``--out`` (default ``runs/frontier``): ``frontier.json`` (every number, the exact
settings, sample answers), ``answers.jsonl`` (every answer at one client with its
reward, one JSON object a line), ``frontier.md`` (README-ready tables and verdicts) and
``frontier.png`` (reward vs wall time relative to plain, Best-of-N as the reference curve; one
column per objective, one row per concurrency level).

    python bench/frontier.py                                # 48 prompts x 3 seeds, 3 objectives
    python bench/frontier.py --quick --objectives sentiment # 8 prompts x 1 seed, 16 tokens
    python bench/frontier.py --device cuda --heads heads --out runs/frontier-gpu
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SUITE = {"sentiment": "mixed", "non_toxic": "rtp", "concise": "mixed"}
"""Prompt suite per objective (its test split only): neutral written prompts for sentiment
and concise, RealToxicityPrompts for non_toxic; any other objective uses ``mixed``."""

GUIDED = ("vas", "cd", "genarm")
"""The strategies the targets are about."""

STRATEGIES = "best_of_n,vas,cd,genarm,args,cd_block"
SWEEPS = ["best_of_n.n=2,4,8,16", "vas.weight=1,2,4,8", "cd.weight=1,2,4,8",
          "genarm.weight=0.5,1,2,4", "args.weight=3"]
QUICK_SWEEPS = ["best_of_n.n=2,4,8", "vas.weight=3,6", "cd.weight=3,6",
                "genarm.weight=1,2", "args.weight=3"]
FULL = {"prompts": 48, "seeds": 3, "max_tokens": 32}
QUICK = {"prompts": 8, "seeds": 1, "max_tokens": 16}
SYMBOL = {"vas": "β", "cd": "λ", "genarm": "α", "args": "w"}  # what "weight" means per strategy

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[frontier {time.perf_counter() - T0:6.0f}s] {msg}", file=sys.stderr, flush=True)


# ---- configuration ---------------------------------------------------------------------------
@dataclass
class Config:
    """Everything that defines a run (stored in frontier.json)."""

    objectives: list[str]
    prompts: int
    seeds: int
    max_tokens: int
    temperature: float
    clients: int
    strategies: list[str]
    sweeps: list[str]
    heads: str | None
    out: str
    quick: bool
    device: str = "cpu"
    threads: int | None = None
    progress: bool = True
    no_repeat_ngram_size: int = 0


def parse_args(argv: Sequence[str] | None = None) -> Config:
    """Command line -> Config; ``--quick`` changes only what was not given explicitly."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objectives", default="sentiment,non_toxic,concise",
                    help="comma-separated reward sources, each with a value head and an ARM "
                         "(default sentiment,non_toxic,concise)")
    ap.add_argument("--prompts", type=int, default=None,
                    help=f"held-out test prompts per objective, spread over the suite's "
                         f"categories; 0 = the whole test split (default {FULL['prompts']}, "
                         f"quick {QUICK['prompts']})")
    ap.add_argument("--seeds", type=int, default=None,
                    help=f"samples per prompt (default {FULL['seeds']}, quick {QUICK['seeds']})")
    ap.add_argument("--max-tokens", type=int, default=None,
                    help=f"new tokens per answer (default {FULL['max_tokens']}, quick "
                         f"{QUICK['max_tokens']})")
    ap.add_argument("--temperature", type=float, default=0.7,
                    help="sampling temperature of every setting, > 0 (default 0.7)")
    ap.add_argument("--clients", type=int, default=8,
                    help="concurrent clients of the second measurement (default 8)")
    ap.add_argument("--strategies", default=STRATEGIES,
                    help=f"besides plain sampling (default {STRATEGIES})")
    ap.add_argument("--sweep", action="append", default=[], metavar="STRATEGY.PARAM=v1,v2",
                    help="replaces the default grid of that strategy; 'weight' scales the "
                         "objective weight (beta for vas/cd, alpha for genarm, w for args); "
                         "'head' names the head to weight instead of the objective's default "
                         "one (vas.head=non_toxic_lex), or several joined by + for the mean "
                         "of their values (vas.head=non_toxic+non_toxic_lex). "
                         f"Defaults: {' '.join(SWEEPS)}; quick: {' '.join(QUICK_SWEEPS)}")
    ap.add_argument("--heads", default=None,
                    help="folder of guidance heads (default: the heads shipped in the package)")
    ap.add_argument("--out", default="runs/frontier", help="output folder (default runs/frontier)")
    ap.add_argument("--quick", action="store_true",
                    help=f"small run: {QUICK['prompts']} prompts x {QUICK['seeds']} seed, "
                         f"{QUICK['max_tokens']} tokens, fewer weights")
    ap.add_argument("--no-repeat-ngram-size", type=int, default=0, metavar="N",
                    help="every request of every setting (plain and Best-of-N included) bans "
                         "repeating an N-gram of its answer (the request field of that name; "
                         "N >= 4 makes the 'degenerate' column 0 by construction) (default 0)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    a = ap.parse_args(argv)
    from alignserve.value_models.heads import default_heads_dir

    base = QUICK if a.quick else FULL
    strategies = [s.strip() for s in a.strategies.split(",") if s.strip() and s != "sample"]
    try:
        sweeps = merge_sweeps(QUICK_SWEEPS if a.quick else SWEEPS, a.sweep, strategies)
    except ValueError as exc:  # a malformed --sweep
        ap.error(str(exc))
    cfg = Config(
        objectives=[o.strip() for o in a.objectives.split(",") if o.strip()],
        prompts=base["prompts"] if a.prompts is None else a.prompts,
        seeds=base["seeds"] if a.seeds is None else a.seeds,
        max_tokens=base["max_tokens"] if a.max_tokens is None else a.max_tokens,
        temperature=a.temperature, clients=a.clients, strategies=strategies,
        sweeps=sweeps,
        heads=a.heads if a.heads is not None else str(default_heads_dir()),
        out=a.out, quick=a.quick, device=a.device, threads=a.threads,
        progress=not a.no_progress, no_repeat_ngram_size=a.no_repeat_ngram_size)
    problems = [f"--{k} must be >= {lo}" for k, v, lo in (
        ("prompts", cfg.prompts, 0), ("seeds", cfg.seeds, 1), ("max-tokens", cfg.max_tokens, 1),
        ("clients", cfg.clients, 1), ("no-repeat-ngram-size", cfg.no_repeat_ngram_size, 0))
        if v < lo]
    if not cfg.temperature > 0:
        problems.append("--temperature must be > 0 (the KL needs a sampling distribution)")
    if not cfg.objectives:
        problems.append("--objectives names no objective")
    if problems:
        ap.error("; ".join(problems))
    return cfg


def merge_sweeps(defaults: Sequence[str], given: Sequence[str],
                 strategies: Sequence[str]) -> list[str]:
    """Default grids, where ``given`` replaces every default grid of the strategies it names;
    only grids of selected strategies are kept. ValueError for a ``given`` sweep of a strategy
    that is not selected."""
    from alignserve.eval.harness import parse_sweep

    named = {parse_sweep(s)[0] for s in given}
    off = sorted(named - set(strategies))
    if off:
        raise ValueError(f"--sweep names {off}, not in --strategies {list(strategies)}")
    keep = [s for s in defaults if parse_sweep(s)[0] not in named] + list(given)
    return [s for s in keep if parse_sweep(s)[0] in strategies]


# ---- plan ------------------------------------------------------------------------------------
def spread(prompts: Sequence[Any], n: int) -> list[Any]:
    """The first ``n`` prompts taking the categories in turn (all when n is 0 or too large),
    so a small run still covers every kind of prompt."""
    if not n or n >= len(prompts):
        return list(prompts)
    by_cat: dict[str, list[Any]] = {}
    for p in prompts:
        by_cat.setdefault(p.category, []).append(p)
    out: list[Any] = []
    while len(out) < n:
        for group in by_cat.values():
            if group and len(out) < n:
                out.append(group.pop(0))
    return out


@dataclass
class Plan:
    """One objective's run: prompts, settings and jobs."""

    objective: str
    suite: str
    prompts: list[Any]
    objectives: list[Any]
    settings: list[Any]
    jobs: list[Any]


def engine_size(cfg: Config, longest_prompt: int) -> tuple[int, int]:
    """KV slots (the hungriest setting's need times the clients) and context length."""
    from alignserve.decoders import STRATEGIES as CLASSES
    from alignserve.eval.harness import parse_sweep, strategy_params

    need, room = 1, 8
    grids: dict[str, list[dict[str, Any]]] = {}
    for s in cfg.sweeps:
        name, p, vals = parse_sweep(s)
        grids.setdefault(name, []).extend({p: v} for v in vals)
    for name in cfg.strategies:
        for params in grids.get(name, []) + [{}]:
            dec = CLASSES[name](strategy_params(params))
            need = max(need, dec.slots_needed(1)["base"])
            room = max(room, int(getattr(getattr(dec, "opt", None), "top_k", 0)) + 8)
    return need * cfg.clients, longest_prompt + cfg.max_tokens + room


def make_plans(cfg: Config, backend: Any, warn: Callable[[str], None]) -> list[Plan]:
    from alignserve.data.prompts import load_prompts
    from alignserve.eval.harness import build_settings, make_jobs, resolve_objectives

    plans = []
    for name in cfg.objectives:
        suite = SUITE.get(name, "mixed")
        prompts = spread(load_prompts("test", suite), cfg.prompts)  # held out, never tuned on
        objectives = resolve_objectives(name, backend.registry)
        settings = build_settings(cfg.strategies, cfg.sweeps, objectives, backend.registry,
                                  warn=warn)
        jobs = make_jobs([p.text for p in prompts], cfg.seeds)
        plans.append(Plan(name, suite, prompts, objectives, settings, jobs))
    return plans


# ---- measurement -----------------------------------------------------------------------------
@dataclass
class Measured:
    """One setting at one concurrency level: responses in job order, wall time, positions."""

    responses: list[Any] = field(default_factory=list)
    wall_s: float = 0.0
    positions: int = 0


def measure(plan: Plan, backend: Any, cfg: Config, clients: int,
            tick: Callable[[], None], status: Callable[[str], None]) -> dict[str, Measured]:
    """Every setting on every job at ``clients`` concurrency, interleaved chunk by chunk.

    One client: chunks of one job (requests one after another); N clients: chunks of 2N jobs
    submitted from N threads. In each round the settings run in a shuffled (seeded) order."""
    size = 1 if clients == 1 else 2 * clients
    chunks = [plan.jobs[i:i + size] for i in range(0, len(plan.jobs), size)]
    rng = random.Random(12 + clients)
    out = {st.key: Measured() for st in plan.settings}
    for jobs in chunks:
        order = list(plan.settings)
        rng.shuffle(order)
        for st in order:
            status(f"{plan.objective} c={clients} {st.key}")
            p0 = backend.positions_processed()
            t0 = time.perf_counter()
            resp = backend.generate(jobs, st.alignment, cfg.max_tokens, clients, tick,
                                    temperature=cfg.temperature)
            m = out[st.key]
            m.wall_s += time.perf_counter() - t0
            m.positions += backend.positions_processed() - p0
            m.responses += resp
    return out


def kl_per_token(setting: Any, resp: Sequence[Any], tempered: list[list[float]] | None,
                 mean_tokens: float) -> tuple[float, str]:
    """KL per returned token from plain sampling at the run's temperature, and its source."""
    from alignserve.eval.harness import kl_bound

    bound = kl_bound(setting, mean_tokens)
    if bound is not None and setting.strategy != "sample":
        src = "bound" if setting.strategy == "cd_block" else "exact"
        return (bound / mean_tokens if mean_tokens else math.nan), src
    if tempered is None:
        return math.nan, "—"
    total, count = 0.0, 0
    for r, lp_t in zip(resp, tempered, strict=True):
        for a, b in zip(r.policy_logprobs or [], lp_t):
            if math.isfinite(a) and math.isfinite(b):
                total += a - b
                count += 1
    return (total / count if count else math.nan), "mc"


def evaluate(plan: Plan, backend: Any, cfg: Config, bar: Any) -> list[dict[str, Any]]:
    """Measure one objective's settings at 1 and N clients and compute every column."""
    from alignserve.eval.harness import TOKENWISE, score_responses, summarize
    from alignserve.eval.metrics import degenerate_fraction
    from alignserve.value_models.rewards import minilm_embed

    def status(s: str) -> None:
        bar.set_postfix_str(s, refresh=False)

    status(f"{plan.objective} warm-up")
    for st in plan.settings:  # loads reward models, warms allocators; not timed
        backend.generate(plan.jobs[:1], st.alignment, 2, 1, lambda: None,
                         temperature=cfg.temperature)
    levels = [1] if cfg.clients == 1 else [1, cfg.clients]
    runs = {c: measure(plan, backend, cfg, c, lambda: bar.update(1), status) for c in levels}
    n = levels[-1]
    prompts = [j.prompt for j in plan.jobs]
    rows = []
    for st in plan.settings:
        one, many = runs[1][st.key], runs[n][st.key]
        resp = one.responses
        for r in resp:
            if r.error:
                log(f"warning: {plan.objective} {st.key}: a response failed: {r.error}")
                break
        texts = [r.text for r in resp]
        rewards = score_responses(backend.registry, plan.objectives, prompts, texts, {})
        # on-topic check: MiniLM cosine of prompt and answer (a fooled scorer shows up here)
        row = summarize(st, plan.jobs, resp, rewards, plan.objectives, None, one.wall_s,
                        minilm_embed)
        for k in ("win_rate", "win_rates", "kl_proxy", "kl_mc", "kl_bound", "kl", "kl_source",
                  "tokens_per_s", "batch_wall_s"):
            row.pop(k, None)  # T=1 / not-measured figures of the generic harness
        tempered = None
        if st.strategy in TOKENWISE:
            status(f"{plan.objective} KL {st.key}")
            tempered = backend.tempered_logprobs(plan.jobs, [r.tokens or [] for r in resp],
                                                 cfg.temperature, 2 * cfg.clients,
                                                 lambda: bar.update(1))
        row["kl_per_token"], row["kl_source"] = kl_per_token(st, resp, tempered,
                                                             row["mean_tokens"])
        returned = sum(r.n_tokens for r in resp)
        row["positions_per_returned"] = one.positions / returned if returned else math.nan
        row["s_per_answer_c1"] = one.wall_s / len(resp)
        row["s_per_answer_cn"] = many.wall_s / len(many.responses)
        row["latency_cn"] = sum(r.wall_s for r in many.responses) / len(many.responses)
        row["degenerate"] = degenerate_fraction(texts, tokenize=backend.tok.tokenize)
        row["same_text_c1_cn"] = sum(a.text == b.text for a, b in zip(resp, many.responses)) \
            / len(resp)
        # failures at 1 client (``errors``, from summarize: their rows score empty answers) and
        # at N clients (timed only); one level when --clients 1
        row["errors_cn"] = sum(r.error is not None for r in many.responses) \
            if many is not one else 0
        row["short"] = short_label(st)
        answers = [{"objective": plan.objective, "setting": st.key, "prompt": j.prompt,
                    "seed": j.seed, "text": t, "reward": float(rewards[plan.objective][i]),
                    "error": r.error}
                   for i, (j, t, r) in enumerate(zip(plan.jobs, texts, resp))]
        row["samples"] = [{k: a[k] for k in ("prompt", "seed", "text", "reward")}
                          for a in answers[:6]]
        row["_answers"] = answers  # every answer: answers.jsonl, not frontier.json
        rows.append(row)
    plain = next(r for r in rows if r["strategy"] == "sample")
    for r in rows:
        r["wall_rel_c1"] = r["s_per_answer_c1"] / plain["s_per_answer_c1"]
        r["wall_rel_cn"] = r["s_per_answer_cn"] / plain["s_per_answer_cn"]
    return rows


def reward_range(plan: Plan, registry: Any) -> list[float] | None:
    """The objective's possible reward values, padded by 5% (the plot's y limits)."""
    lo = hi = 0.0
    wsum = sum(abs(ob.weight) for ob in plan.objectives) or 1.0  # as the harness combines them
    for ob in plan.objectives:
        for name, w in ob.score.items():
            a, b = (float(x) * w * ob.weight / wsum for x in registry.rewards[name].info.range)
            lo, hi = lo + min(a, b), hi + max(a, b)
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return None
    pad = 0.05 * (hi - lo)
    return [lo - pad, hi + pad]


def short_label(setting: Any) -> str:
    """Point label for the plot: ``N=8``, ``β=4``, ``K=4 M=8``..."""
    p = dict(setting.params)
    if setting.strategy == "best_of_n":
        return f"N={p.get('n')}"
    if setting.strategy == "sample":
        return "N=1"
    parts = []
    if "weight" in p:
        parts.append(f"{SYMBOL.get(setting.strategy, 'w')}={p.pop('weight'):g}")
    if setting.strategy == "cd_block":
        a = setting.alignment or {}
        from alignserve.decoders import STRATEGIES as CLASSES

        opt = CLASSES["cd_block"].Options(**{k: v for k, v in a.items() if k != "strategy"})
        parts.append(f"K={opt.k} M={opt.block}")
        p.pop("k", None)
        p.pop("block", None)
    parts += [f"{k}={v}" for k, v in p.items()]
    return " ".join(parts)


# ---- verdicts --------------------------------------------------------------------------------
NAMES = {"vas": "VAS", "cd": "CD", "genarm": "GenARM"}


def verdict(objective: str, rows: Sequence[Mapping[str, Any]], clients: int) -> dict[str, Any]:
    """Check the issue's targets on one objective's rows.

    Each guided strategy (VAS, CD, GenARM) meets the target when one of its settings has mean
    reward >= Best-of-8's, wall time per answer <= 1/2 of Best-of-8's at 1 and at ``clients``
    clients (ratios to plain measured in the same run), distinct-2 >= 0.95x plain's, no
    degenerate answer and no failed request. Returns ``{"line": str, "details": [str],
    "met": {strategy: bool | None}}`` (None: not run / not checkable).
    """
    plain = next((r for r in rows if r["strategy"] == "sample"), None)
    bon8 = next((r for r in rows if r["strategy"] == "best_of_n"
                 and int(r["params"].get("n", 0)) == 8), None)
    if plain is None or bon8 is None:
        return {"line": f"Target {objective}: cannot check (needs plain sampling and Best-of-8 "
                        "in the run)", "details": [], "met": dict.fromkeys(GUIDED)}
    ref = (f"Best-of-8 reward {bon8['reward']:.3f} at {bon8['wall_rel_c1']:.2f}x / "
           f"{bon8['wall_rel_cn']:.2f}x plain's wall time per answer (1 / {clients} clients)")
    d2_min = 0.95 * plain["distinct_2"]

    def checks(r: Mapping[str, Any]) -> dict[str, tuple[bool, str]]:
        c1 = r["wall_rel_c1"] / bon8["wall_rel_c1"]
        cn = r["wall_rel_cn"] / bon8["wall_rel_cn"]
        return {
            "reward": (r["reward"] >= bon8["reward"],
                       f"reward {r['reward']:.3f} vs {bon8['reward']:.3f}"),
            "cost": (c1 <= 0.5 and cn <= 0.5,
                     f"wall time {c1:.2f} / {cn:.2f} of Best-of-8's (<= 0.5)"),
            "diversity": (r["distinct_2"] >= d2_min,
                          f"distinct-2 {r['distinct_2']:.3f} (>= {d2_min:.3f})"),
            "repetition": (r["degenerate"] == 0 and r["errors"] + r.get("errors_cn", 0) == 0,
                           f"degenerate {r['degenerate']:.0%}"
                           + (f", {r['errors'] + r.get('errors_cn', 0)} failed"
                              if r["errors"] + r.get("errors_cn", 0) else "")),
        }

    met: dict[str, bool | None] = {}
    details = []
    for s in GUIDED:
        cands = [r for r in rows if r["strategy"] == s]
        if not cands:
            met[s] = None
            details.append(f"{NAMES[s]}: not in this run (not selected, or no head loaded)")
            continue
        scored = [(r, checks(r)) for r in cands]
        ok = [(r, c) for r, c in scored if all(v for v, _ in c.values())]
        met[s] = bool(ok)
        if ok:
            r, c = max(ok, key=lambda rc: rc[0]["reward"])
        else:  # the closest: most checks passed, then highest reward
            r, c = max(scored, key=lambda rc: (sum(v for v, _ in rc[1].values()),
                                               rc[0]["reward"]))
        word = "MET" if ok else "NOT MET"
        why = "; ".join(f"{txt} {'ok' if v else 'FAILS'}" for v, txt in c.values())
        details.append(f"{NAMES[s]} {word} ({'by' if ok else 'closest:'} {r['setting']}: {why})")
    summary = ", ".join(f"{NAMES[s]} " + ("MET" if met[s] else "not run" if met[s] is None
                                          else "NOT MET") for s in GUIDED)
    notes = []
    if plain["degenerate"] > 0:
        notes.append(f"plain sampling itself has {plain['degenerate']:.0%} degenerate answers")
    below = [lvl for lvl, k in (("1", "wall_rel_c1"), (str(clients), "wall_rel_cn"))
             if 0.5 * bon8[k] < 1.0]
    if below:  # half of Best-of-8's time is less than plain sampling's own
        where = " and ".join(below) + (" client" if below == ["1"] else " clients")
        notes.append(f"at {where} half of Best-of-8's wall time is below plain sampling's, out "
                     "of reach for a strategy that runs at least plain's forwards")
    note = f" (note: {'; '.join(notes)})" if notes else ""
    return {"line": f"Target {objective} ({ref}): {summary}{note}", "details": details,
            "met": met}


# ---- outputs ---------------------------------------------------------------------------------
def _f(x: Any, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return f"{x:.{digits}f}"


def markdown(doc: Mapping[str, Any]) -> str:
    """README-ready tables (one per objective) with verdicts and a legend."""
    cfg = doc["config"]
    n = cfg["clients"]
    lines = [f"Machine: {doc['machine']}; {doc['device']}.",
             f"Settings: {cfg['max_tokens']} new tokens, temperature {cfg['temperature']:g}, "
             f"{cfg['seeds']} seed(s) per prompt, 1 client (one request after another) and {n} "
             f"concurrent clients in the same run; heads from `{cfg['heads']}`"
             + (f"; every request with no_repeat_ngram_size {cfg['no_repeat_ngram_size']}"
                if cfg.get("no_repeat_ngram_size") else "")
             + (" (quick run)" if cfg["quick"] else "") + ".", ""]
    for obj in doc["objectives"]:
        rows = obj["rows"]
        plain = next(r for r in rows if r["strategy"] == "sample")
        lines += [
            f"**{obj['objective']}** — reward: the `{obj['objective']}` source; "
            f"{len(obj['prompts'])} held-out test prompts (`{obj['suite']}`) × {cfg['seeds']} "
            f"seed(s); plain sampling {plain['s_per_answer_c1']:.2f} s/answer at 1 client, "
            f"{plain['s_per_answer_cn']:.2f} s/answer at {n}.",
            "",
            f"| strategy | setting | reward [95% CI] | wall/answer ÷ plain, 1 client | "
            f"÷ plain, {n} clients | gen tok/tok | positions/tok | KL/tok (source) | "
            f"distinct-2 | degenerate | on-topic |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            setting = "plain (Best-of-1)" if r["strategy"] == "sample" else r["setting"]
            lines.append(
                f"| {r['strategy']} | {setting} | {_f(r['reward'], 3)} [{_f(r['reward_lo'], 3)}, "
                f"{_f(r['reward_hi'], 3)}] | {_f(r['wall_rel_c1'])} | {_f(r['wall_rel_cn'])} | "
                f"{_f(r['tokens_per_returned'], 1)} | {_f(r['positions_per_returned'], 1)} | "
                f"{_f(r['kl_per_token'], 3)} ({r['kl_source']}) | {_f(r['distinct_2'])} | "
                f"{r['degenerate']:.0%} | {_f(r.get('coherence', math.nan))} |")
        failed = [f"{r['strategy']} {r['setting']}: {r['errors']} of {r['responses']} at 1 "
                  f"client, {r.get('errors_cn', 0)} at {n}"
                  for r in rows if r.get("errors") or r.get("errors_cn")]
        if failed:  # a failed response scores as an empty answer: these rows are not results
            lines += ["", "**Failed responses (see the log; at 1 client they score as empty "
                      "answers, at N clients they only shorten the timing): "
                      + "; ".join(failed) + ".**"]
        v = obj["verdict"]
        lines += ["", f"{v['line']}"] + [f"- {d}" for d in v["details"]] + [""]
    lines += [
        "Reward: the objective's own reward source on the returned text; interval: Student t "
        "over prompts (seeds averaged per prompt). Wall time per answer: the batch's wall time "
        "over its answers, as a ratio to plain sampling measured in the same interleaved "
        "rounds. gen tok/tok: tokens the strategy generated (discarded samples, blocks and "
        "candidates included) per returned token; positions/tok: token positions run through a "
        "transformer (prompt prefill included; reward models not counted) per returned token. "
        "KL/tok: KL from plain sampling at the same temperature per returned token — exact "
        "(Best-of-N `log N − (N−1)/N`), bound (blockwise CD) or mc (Monte-Carlo "
        "`Σ log π − log p_T`). distinct-2: whitespace bigrams pooled over all answers. "
        "degenerate: answers with a model-token 4-gram occurring ≥ 3 times. on-topic: mean "
        "MiniLM cosine between prompt and answer (informational, not part of the verdict).",
    ]
    return "\n".join(lines) + "\n"


def plot(doc: Mapping[str, Any], path: Path) -> Path:
    """Reward vs wall time relative to plain; rows: 1 and N clients, columns: objectives."""
    from alignserve.eval.plots import plot_reward_vs_cost_grid

    n = doc["config"]["clients"]
    levels = [("c1", "1 client")] + ([("cn", f"{n} concurrent clients")] if n > 1 else [])
    grid = []
    for key, name in levels:
        row = []
        for obj in doc["objectives"]:
            rows = obj["rows"]
            ref = [r for r in rows if r["strategy"] in ("sample", "best_of_n")]
            pts = [r for r in rows if r["strategy"] not in ("sample", "best_of_n")]
            bon8 = next((r for r in ref if r["strategy"] == "best_of_n"
                         and int(r["params"].get("n", 0)) == 8), None)
            row.append({
                "title": f"{obj['objective']}, {name}",
                "reference": [{"label": r["short"], "x": r[f"wall_rel_{key}"],
                               "reward": r["reward"]} for r in ref],
                "results": [{"strategy": r["strategy"], "label": r["short"],
                             "x": r[f"wall_rel_{key}"], "reward": r["reward"],
                             "reward_lo": r["reward_lo"], "reward_hi": r["reward_hi"]}
                            for r in pts],
                "target": None if bon8 is None else {
                    "x": 0.5 * bon8[f"wall_rel_{key}"], "y": bon8["reward"],
                    "label": "target: Best-of-8's reward at ≤ ½ its time"},
                "ylim": obj.get("reward_range"),
            })
        grid.append(row)
    cfg = doc["config"]
    return plot_reward_vs_cost_grid(
        grid, path, reference_label="Best-of-N (N=1: plain sampling)",
        xlabel=f"wall time per answer ÷ plain sampling's (log); {cfg['max_tokens']} tokens, "
               f"T={cfg['temperature']:g}")


def jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        return jsonable(x.item())
    return x


def write(doc: Mapping[str, Any], out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "frontier.json", "md": out / "frontier.md",
             "png": out / "frontier.png", "answers": out / "answers.jsonl"}
    answers = [a for o in doc["objectives"] for r in o["rows"] for a in r.get("_answers", [])]
    doc = {**doc, "objectives": [
        {**o, "rows": [{k: v for k, v in r.items() if k != "_answers"} for r in o["rows"]]}
        for o in doc["objectives"]]}
    paths["json"].write_text(json.dumps(jsonable(doc), indent=2, ensure_ascii=False) + "\n")
    paths["answers"].write_text("".join(json.dumps(jsonable(a), ensure_ascii=False) + "\n"
                                        for a in answers))
    paths["md"].write_text(markdown(doc))
    plot(doc, paths["png"])
    return paths


# ---- main ------------------------------------------------------------------------------------
def machine_line(device: str) -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    from strategies import machine  # bench/strategies.py: the same machine line

    return machine(device, torch.get_num_threads())


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    from transformers import AutoTokenizer

    from alignserve.data.prompts import load_prompts
    from alignserve.engine.model_store import resolve_model
    from alignserve.eval.harness import InProcessBackend
    from alignserve.progress import progress_bar, quiet_library_bars

    quiet_library_bars()
    tok = AutoTokenizer.from_pretrained(str(resolve_model(None, progress=False)))
    texts = [tok.apply_chat_template([{"role": "user", "content": p.text}],
                                     add_generation_prompt=True, tokenize=False)
             for o in cfg.objectives
             for p in spread(load_prompts("test", SUITE.get(o, "mixed")), cfg.prompts)]
    longest = max(len(tok(t, add_special_tokens=False).input_ids) for t in texts)
    slots, max_len = engine_size(cfg, longest)
    mach = machine_line(cfg.device)
    log(f"engine: {slots} KV slots x {max_len} positions; heads {cfg.heads}")
    backend = InProcessBackend(None, Path(cfg.heads) if cfg.heads else None, slots=slots,
                               max_len=max_len, threads=cfg.threads, device=cfg.device)
    backend.no_repeat_ngram_size = cfg.no_repeat_ngram_size
    try:
        try:
            plans = make_plans(cfg, backend, warn=lambda m: log(f"warning: {m}"))
        except ValueError as exc:  # unknown objective, a sweep value out of range (AlignmentError)
            field = getattr(exc, "field", None)
            hint = ""
            if field and field.startswith("alignment.weights"):  # often a default sweep's weight
                hint = ("; set the weights to sweep with --sweep STRATEGY.weight=v1,v2 within "
                        "the head's range (GET /v1/heads, or the manifest's weight_range)")
            print(f"error: {field + ': ' if field else ''}{exc}{hint}", file=sys.stderr)
            return 2
        levels = 1 if cfg.clients == 1 else 2
        from alignserve.eval.harness import TOKENWISE

        total = sum(len(p.jobs) * (len(p.settings) * levels
                                   + sum(s.strategy in TOKENWISE for s in p.settings))
                    for p in plans)
        log(f"{len(plans)} objective(s) x {[len(p.settings) for p in plans]} settings x "
            f"{[len(p.jobs) for p in plans]} answers x {levels} concurrency levels")
        bar = progress_bar(total=total, desc="frontier", unit="ans", dynamic_ncols=True,
                           disable=not cfg.progress)
        objectives = []
        try:
            for plan in plans:
                rows = evaluate(plan, backend, cfg, bar)
                objectives.append({
                    "objective": plan.objective, "suite": plan.suite, "split": "test",
                    "prompts": [{"id": p.id, "category": p.category} for p in plan.prompts],
                    "scored_with": [asdict(o) for o in plan.objectives],
                    "reward_range": reward_range(plan, backend.registry), "rows": rows,
                    "verdict": verdict(plan.objective, rows, cfg.clients)})
        finally:
            bar.close()
    finally:
        backend.close()
    doc = {"config": asdict(cfg), "machine": mach, "device": backend.device,
           "load_avg_end": os.getloadavg(), "wall_s": time.perf_counter() - T0,
           "objectives": objectives}
    paths = write(doc, Path(cfg.out))
    print(markdown(doc))
    for o in objectives:
        print(o["verdict"]["line"])
    print(f"wrote {paths['json']}, {paths['md']}, {paths['png']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
