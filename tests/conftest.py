"""Shared fixtures: the real default model, and a real uvicorn server on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from alignserve.engine.model_store import resolve_model

    return resolve_model(None, progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProc:
    def __init__(self, extra: list[str]) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(ROOT / ".pytest_cache" / f"server-{self.port}.log", "w")  # noqa: SIM115
        cmd = [sys.executable, "-m", "alignserve.cli", "serve", "--port", str(self.port),
               "--log-level", "warning", *extra]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {Path(self.log.name).read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("server did not become healthy in 180 s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="session")
def server(model_dir: Path):
    (ROOT / ".pytest_cache").mkdir(exist_ok=True)
    heads = ["--heads", str(ROOT / "heads")] if any((ROOT / "heads").glob("*/manifest.json")) \
        else []
    srv = ServerProc(["--slots", "24", "--max-len", "1024", "--max-tokens", "512",
                      "--max-n", "8", "--max-waiting", "64", *heads])
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def oai(server: ServerProc):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


MODEL = "SmolLM2-135M-Instruct"
