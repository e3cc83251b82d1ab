"""Shared fixtures: the real default model, and a real uvicorn server on loopback."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import httpx
import pytest

from alignserve.server.launch import ServerProcess

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from alignserve.engine.model_store import resolve_model

    return resolve_model(None, progress=False)


class ServerProc(ServerProcess):
    """A server for a test module or session, logging to ``.pytest_cache/server-ID.log``."""

    def __init__(self, extra: list[str]) -> None:
        (ROOT / ".pytest_cache").mkdir(exist_ok=True)
        log = ROOT / ".pytest_cache" / f"server-{uuid.uuid4().hex[:8]}.log"
        super().__init__(extra, log=log, cwd=ROOT, timeout=180)


def wait_idle(url: str, within: float) -> None:
    """Wait until the server's /health shows nothing running or waiting; fails after
    ``within`` seconds."""
    t0 = time.monotonic()
    while True:
        h = httpx.get(url + "/health", timeout=10).json()
        if h["running"] == 0 and h["waiting"] == 0:
            return
        assert time.monotonic() - t0 < within, f"still busy after {within} s: {h}"
        time.sleep(0.05)


@pytest.fixture(scope="session")
def server(model_dir: Path):
    (ROOT / ".pytest_cache").mkdir(exist_ok=True)
    # the default model loads the heads shipped in the package
    srv = ServerProc(["--slots", "24", "--max-len", "1024", "--max-tokens", "512",
                      "--max-n", "8", "--max-waiting", "64"])
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def oai(server: ServerProc):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


MODEL = "SmolLM2-135M-Instruct"
