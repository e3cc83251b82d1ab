"""Wiring: build the engine, the resources it serves and the FastAPI app from CLI arguments."""

from __future__ import annotations

import argparse
from pathlib import Path

from fastapi import FastAPI

from ..engine.api import EngineClient
from ..engine.scheduler import Engine, EngineConfig
from .app import ServerLimits, create_app


def build_server(args: argparse.Namespace, model_dir: Path, name: str) -> FastAPI:
    engine = Engine(EngineConfig(
        model_dir=model_dir, model_name=name, slots=args.slots, max_len=args.max_len,
        max_waiting=args.max_waiting, request_timeout_s=args.request_timeout,
        device=args.device, dtype=args.dtype, threads=args.threads))
    client = EngineClient(engine)
    limits = ServerLimits(max_tokens=args.max_tokens, max_n=args.max_n,
                          max_body_bytes=args.max_body_bytes)
    return create_app(client, name, limits)
