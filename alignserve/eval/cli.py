"""``alignserve eval``: compare strategies on the held-out test prompts.

Wired into the main CLI with ``add_eval_parser(subparsers)`` and ``run_eval(args)``; kept here so
the evaluation code owns its flags. Examples::

    alignserve eval --strategies sample,best_of_n,cd_block --objective vader \\
        --prompts 2 --max-tokens 8 --seeds 1 --out runs/eval-tiny
    alignserve eval --strategies sample,args,vas,genarm --objective sentiment \\
        --sweep "vas.weight=1,3,5" --bon-curve --out runs/eval
    alignserve eval --url http://127.0.0.1:8000 --strategies sample,best_of_n --out runs/live
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

DEFAULT_HEADS = str(Path(__file__).resolve().parent.parent / "value_models" / "default_heads")


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``eval`` on the main CLI's sub-parsers; returns the new parser."""
    p = subparsers.add_parser(
        "eval", help="evaluate strategies on the held-out test prompts",
        description="Run strategies (and sweeps over their parameters) on the test split, "
                    "score the responses and write results.json, results.md and plots.")
    p.add_argument("--strategies", default="sample,best_of_n",
                   help="comma-separated strategies (sample, best_of_n, args, vas, cd, cd_block, "
                        "genarm, transfer_qstar, deal); plain sampling always runs as the "
                        "reference (default sample,best_of_n)")
    p.add_argument("--objective", default="sentiment",
                   help="NAME[=w][,NAME=w...]: reward sources or guidance heads to steer toward, "
                        "with relative weights; vas/cd use the value head and genarm the ARM "
                        "trained for it, the rest the reward itself (default sentiment)")
    p.add_argument("--suite", default="mixed", choices=["mixed", "rtp", "all"],
                   help="prompt suite; only its test split is used (default mixed)")
    p.add_argument("--prompts", type=int, default=16,
                   help="first N test prompts; 0 = all (default 16)")
    p.add_argument("--max-tokens", type=int, default=48, help="new tokens per response "
                                                                "(default 48)")
    p.add_argument("--seeds", type=int, default=2, help="samples per prompt (default 2)")
    p.add_argument("--sweep", action="append", default=[], metavar="STRATEGY.PARAM=v1,v2",
                   help="grid over a strategy parameter, repeatable (several for one strategy "
                        "form a product); 'weight' scales the objective weights, e.g. "
                        "--sweep vas.weight=1,3,5 --sweep best_of_n.n=1,2,4,8")
    p.add_argument("--bon-curve", action="store_true",
                   help="add Best-of-N for N = 1, 2, 4, 8, 16, 32 as the reference curve")
    p.add_argument("--reward-options", default=None, metavar="JSON",
                   help='per-reward options, e.g. \'{"concise": {"target_words": 20}}\'')
    p.add_argument("--out", default="runs/eval", help="output folder (default runs/eval)")
    p.add_argument("--url", default=None,
                   help="evaluate a live server (e.g. http://127.0.0.1:8000) through the openai "
                        "client instead of the in-process engine")
    p.add_argument("--api-key", default="unused", help="API key for --url")
    p.add_argument("--heads", default=None,
                   help=f"folder of guidance heads for the in-process engine (default "
                        f"'{DEFAULT_HEADS}' when it exists)")
    p.add_argument("--model", default="default", help="base model, as for serve")
    p.add_argument("--concurrency", type=int, default=8,
                   help="requests in flight at once (threads submitting) (default 8)")
    p.add_argument("--slots", type=int, default=None,
                   help="KV-cache slots of the in-process engine (default: enough for the "
                        "largest setting at the given concurrency, at most 256)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="torch device for the in-process engine")
    p.add_argument("--no-coherence", action="store_true",
                   help="skip the MiniLM coherence metric")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def _engine_size(args: argparse.Namespace) -> tuple[int, int]:
    """KV slots and context length for the in-process engine, from the run's settings.

    Slots: the largest per-request need among the settings (checked without a registry, from
    the strategies' own ``slots_needed``) times the concurrency, capped at 256 to bound memory.
    Context: the longest chat-templated test prompt + max tokens + room for tree candidates and
    look-ahead/rollout tokens.
    """
    from ..decoders import STRATEGIES
    from .harness import BON_CURVE, parse_sweep, strategy_params

    need = 1
    room = 64
    grids: dict[str, list[dict[str, Any]]] = {}
    for spec in args.sweep:
        s, p, vals = parse_sweep(spec)
        grids.setdefault(s, []).extend({p: v} for v in vals)
    if args.bon_curve:
        grids.setdefault("best_of_n", []).extend({"n": n} for n in BON_CURVE)
    for name in {*args.strategies.split(","), *grids}:
        cls = STRATEGIES.get(name.strip())
        if cls is None or name == "sample":
            continue
        for params in grids.get(name, []) + [{}]:
            try:
                dec = cls(strategy_params(params))
            except Exception:  # noqa: BLE001 - reported properly when settings are built
                continue
            need = max(need, sum(dec.slots_needed(1).values()))
            opts = dec.opt  # type: ignore[attr-defined]
            room = max(room, int(getattr(opts, "rollout", 0)) + 8,
                       int(getattr(opts, "lookahead", 0)) + 8, int(getattr(opts, "top_k", 0)) + 8)
    slots = args.slots or max(need, min(256, need * max(1, args.concurrency)))
    return slots, _longest_prompt(args) + args.max_tokens + room


def _longest_prompt(args: argparse.Namespace) -> int:
    """Tokens of the longest chat-templated test prompt this run will use."""
    from transformers import AutoTokenizer

    from ..data.prompts import load_prompts
    from ..engine.model_store import resolve_model

    tok = AutoTokenizer.from_pretrained(str(resolve_model(
        None if args.model == "default" else args.model, progress=False)))
    prompts = load_prompts("test", args.suite)
    if args.prompts:
        prompts = prompts[:args.prompts]
    texts = [tok.apply_chat_template([{"role": "user", "content": p.text}],
                                     add_generation_prompt=True, tokenize=False) for p in prompts]
    return max((len(tok(t, add_special_tokens=False).input_ids) for t in texts), default=64)


def run_eval(args: argparse.Namespace) -> int:
    """Run ``alignserve eval``; returns the process exit status (2 on a usage error)."""
    from ..decoders import AlignmentError
    from .harness import EvalConfig, HttpBackend, InProcessBackend, run_eval_config

    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    if args.model == "default":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        ropts = json.loads(args.reward_options) if args.reward_options else {}
    except json.JSONDecodeError as exc:
        print(f"error: --reward-options is not JSON: {exc}", file=sys.stderr)
        return 2
    cfg = EvalConfig(strategies=[s.strip() for s in args.strategies.split(",") if s.strip()],
                     objective=args.objective, suite=args.suite, prompts=args.prompts,
                     max_tokens=args.max_tokens, seeds=args.seeds, sweeps=list(args.sweep),
                     bon_curve=args.bon_curve, concurrency=args.concurrency,
                     reward_options=ropts, coherence=not args.no_coherence)
    try:
        if args.url:
            backend: Any = HttpBackend(args.url, args.api_key)
        else:
            heads = args.heads or (DEFAULT_HEADS if Path(DEFAULT_HEADS).is_dir() else None)
            slots, max_len = _engine_size(args)
            backend = InProcessBackend(args.model, Path(heads) if heads else None, slots=slots,
                                       max_len=max_len, threads=args.threads, device=args.device)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        doc = run_eval_config(cfg, backend, Path(args.out), progress=not args.no_progress,
                              warn=lambda m: print(f"warning: {m}", file=sys.stderr))
    except (AlignmentError, ValueError) as exc:
        field = getattr(exc, "field", None)
        print(f"error: {field + ': ' if field else ''}{exc}", file=sys.stderr)
        return 2
    finally:
        backend.close()
    from .harness import markdown_table

    print(markdown_table(doc))
    print(f"wrote {args.out}/results.json, results.md, reward_vs_kl.png, reward_vs_compute.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m alignserve.eval.cli``) until the main CLI wires it in."""
    ap = argparse.ArgumentParser(prog="alignserve")
    add_eval_parser(ap.add_subparsers(dest="cmd", required=True))
    return run_eval(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
