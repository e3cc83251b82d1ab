"""Wiring: build the engine, the resources it serves and the FastAPI app from CLI arguments."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from fastapi import FastAPI

from ..engine.api import EngineClient
from ..engine.scheduler import Engine, EngineConfig
from ..value_models.registry import Registry
from .app import create_app
from .state import ServerLimits

log = logging.getLogger(__name__)


def build_server(args: argparse.Namespace, model_dir: Path, name: str) -> FastAPI:
    keys = api_keys(args)  # fail on a bad key file before spending seconds on the model
    engine = Engine(EngineConfig(
        model_dir=model_dir, model_name=name, slots=args.slots, max_len=args.max_len,
        max_waiting=args.max_waiting, request_timeout_s=args.request_timeout,
        device=args.device, dtype=args.dtype, threads=args.threads))
    from ..value_models.heads import tokenizer_fingerprint
    from ..value_models.registry import Registry
    from ..value_models.rewards import HFNextTokenScorer

    heads = heads_dirs(args)
    registry = Registry.build([Path(h) for h in heads],
                              tokenizer_fingerprint(engine.tokenizer),
                              engine.base.config.hidden_size,
                              judge_scorer=HFNextTokenScorer(model_dir),
                              default_heads=getattr(args, "model", "default") == "default"
                              and not getattr(args, "no_default_heads", False))
    attach_backbones(engine, registry)
    announce_heads(registry)
    client = EngineClient(engine, registry)
    limits = ServerLimits(max_tokens=args.max_tokens, max_n=args.max_n,
                          max_body_bytes=args.max_body_bytes,
                          body_timeout_s=getattr(args, "body_timeout", 30.0),
                          max_candidates=getattr(args, "max_candidates", None),
                          sse_heartbeat_s=getattr(args, "sse_heartbeat", 10.0))
    return create_app(client, name, limits, api_keys=keys)


def build_remote_server(args: argparse.Namespace) -> FastAPI:
    """Remote mode (``--base-url``): the same app over a base model served elsewhere.

    Loads the local tokenizer (``--tokenizer``), probes the remote (tokenizer equality,
    capabilities; ``ValueError`` when unusable) and serves ``RemoteEngineClient``. Rewards are
    local. The local backbone (``--local-backbone DIR``; by default the ``--tokenizer`` folder
    when it holds model weights; ``none`` = off) is loaded with the heads that read it: the
    shipped default heads when they fit its tokenizer and hidden size, and every ``--heads``
    folder (which must fit). Without a backbone only lexical value heads and lexical ARMs
    load (``lexical_registry``).
    """
    from transformers import AutoTokenizer

    from ..remote.backbone import LocalBackbone, has_weights
    from ..remote.client import RemoteEngineClient, eos_ids_of, vocab_size_of
    from ..remote.http import RemoteHTTP, probe
    from ..value_models.heads import HeadError, tokenizer_fingerprint

    keys = api_keys(args)
    if not args.tokenizer:
        raise ValueError("--base-url needs --tokenizer DIR (a folder with the base model's "
                         "tokenizer files, equal to the remote's)")
    tok_dir = Path(args.tokenizer)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    http = RemoteHTTP(args.base_url, args.base_model, args.base_api_key,
                      timeout_s=args.request_timeout, retries=args.base_retries)
    caps = probe(http, tok)
    max_len = min(args.max_len, caps.max_model_len or args.max_len)
    bb_arg = getattr(args, "local_backbone", None)
    bb_dir: Path | None = None
    if bb_arg is None:
        bb_dir = tok_dir if has_weights(tok_dir) else None
    elif bb_arg != "none":
        bb_dir = Path(bb_arg)
        if not has_weights(bb_dir):
            raise ValueError(f"--local-backbone {bb_dir}: not a model folder (config.json and "
                             "*.safetensors weights)")
        check = AutoTokenizer.from_pretrained(bb_dir)
        if tokenizer_fingerprint(check) != tokenizer_fingerprint(tok):
            raise ValueError(f"--local-backbone {bb_dir} has another tokenizer than "
                             f"--tokenizer {tok_dir}: it must read the base's tokens")
    heads = heads_dirs(args)
    backbone = None
    if bb_dir is None:
        registry = lexical_registry(heads, tokenizer_fingerprint(tok),
                                    not getattr(args, "no_default_heads", False))
    else:
        from ..value_models.rewards import HFNextTokenScorer

        if args.threads:
            torch.set_num_threads(args.threads)
        backbone = LocalBackbone(bb_dir, args.slots, max_len, getattr(torch, args.dtype),
                                 args.device)
        fp, dim = tokenizer_fingerprint(tok), backbone.hidden_size
        judge = HFNextTokenScorer(bb_dir)
        use_default = not getattr(args, "no_default_heads", False)
        try:
            registry = Registry.build([Path(h) for h in heads], fp, dim, judge_scorer=judge,
                                      default_heads=use_default)
        except HeadError:
            if not use_default:
                raise
            # the shipped heads were trained on SmolLM2-135M-Instruct: skip them for another
            # backbone, but a --heads folder that does not fit is still an error
            registry = Registry.build([Path(h) for h in heads], fp, dim, judge_scorer=judge)
    announce_heads(registry)
    client = RemoteEngineClient(http, tok, caps, registry, max_len, eos_ids_of(tok_dir, tok),
                                slots=args.slots, request_timeout_s=args.request_timeout,
                                vocab_size=vocab_size_of(tok_dir, tok), backbone=backbone)
    limits = ServerLimits(max_tokens=args.max_tokens, max_n=args.max_n,
                          max_body_bytes=args.max_body_bytes,
                          body_timeout_s=getattr(args, "body_timeout", 30.0),
                          max_candidates=getattr(args, "max_candidates", None),
                          sse_heartbeat_s=getattr(args, "sse_heartbeat", 10.0))
    name = args.served_name or http.model or "remote"
    return create_app(client, name, limits, api_keys=keys)


def lexical_registry(heads: list[str], fingerprint: str, default_heads: bool) -> Registry:
    """Remote mode without a local backbone: the built-in rewards plus the lexical value heads
    and lexical ARMs (they read token ids or the base's log-probs, no hidden states) of the
    package (``default_heads``) and of ``heads``. Raises ValueError naming a ``--heads`` head
    that reads hidden states, and ``HeadError`` for a folder that does not load."""
    from ..value_models.heads import HeadError, load_heads

    try:
        registry = Registry.build(None, fingerprint, None, default_heads=default_heads)
    except HeadError as exc:  # the shipped heads were trained for another tokenizer
        log.warning("shipped lexical heads skipped: %s", exc)
        registry = Registry.build(None)
    registry.note = ("this server has no local backbone: only lexical value heads and lexical "
                     "ARMs are loaded; start it with --local-backbone DIR for the others")
    registry.heads = {n: h for n, h in registry.heads.items() if h.runner == "tokens"}
    for d in heads:
        for h in load_heads(Path(d), fingerprint):
            if h.runner != "tokens":
                raise ValueError(f"--heads {d}: {h.name} reads hidden states, which needs a "
                                 "local backbone in remote mode (--local-backbone DIR); only "
                                 "lexical value heads and lexical ARMs work without one")
            registry.heads[h.name] = h
    return registry


def api_keys(args: argparse.Namespace) -> list[str]:
    """Keys from ``--api-key`` and ``--api-keys-file`` (one per line, '#' comments skipped).

    Read before the model loads, so a missing key file fails fast. An empty file is an error:
    asking for keys and getting an open server would be the worst outcome.
    """
    keys = [k.strip() for k in (getattr(args, "api_key", None) or []) if k.strip()]
    path = getattr(args, "api_keys_file", None)
    if path:
        lines = Path(path).read_text().splitlines()
        file_keys = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        if not file_keys:
            raise ValueError(f"--api-keys-file {path} contains no keys")
        keys += file_keys
    return keys


def heads_dirs(args: argparse.Namespace) -> list[str]:
    """The ``--heads`` folders (repeatable; a single value when built by hand)."""
    return args.heads if isinstance(args.heads, list) else [args.heads] if args.heads else []


def announce_heads(registry: Registry) -> None:
    """One start-up line on stderr naming every guidance head loaded (and its folder), so an
    operator sees what ``--heads`` / the shipped heads gave without calling ``/v1/heads``."""
    by_dir: dict[str, list[str]] = {}
    for h in sorted(registry.heads.values(), key=lambda h: h.name):
        by_dir.setdefault(str(h.path.parent) if h.path else "?", []).append(
            f"{h.name} ({h.kind})")
    text = "; ".join(f"{d}: {', '.join(names)}" for d, names in by_dir.items()) or "none"
    print(f"alignserve: {len(registry.heads)} guidance head(s) loaded: {text}", file=sys.stderr,
          flush=True)


def attach_backbones(engine: Engine, registry: Registry) -> None:
    """Give every backbone-placed head its backbone: the base's first L layers, own KV cache."""
    from ..engine.runner import ModelRunner

    cfg = engine.config
    for head in registry.heads.values():
        name = head.runner
        if name not in ("base", "tokens") and name not in engine.runners:
            layers = int(head.manifest["arch"]["layers"])
            engine.add_runner(name, ModelRunner(name, cfg.model_dir, cfg.slots, cfg.max_len,
                                                getattr(torch, cfg.dtype), cfg.device,
                                                num_layers=layers))
