"""Start ``alignserve serve`` in a subprocess and wait until ``/health`` answers.

One helper for the tests (``tests/conftest.py``'s ``ServerProc``) and the benchmarks
(``bench/throughput.py``, ``bench/load_test.py``)::

    with ServerProcess(["--slots", "8"]) as srv:
        httpx.get(srv.url + "/health")

Raises ``RuntimeError`` when the server exits during start-up (with the tail of its log when
the log is a file) or is not healthy within ``timeout`` seconds (it is then killed).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import IO, Any

import httpx


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m alignserve.cli serve --port PORT --log-level warning *args`` on loopback.

    ``log``: a path (opened for writing, closed by ``stop``), an open file, or None (output
    discarded). ``env`` entries are added to this process's environment, with
    ``HF_HUB_OFFLINE=1`` by default. ``timeout``: seconds to wait for ``/health`` = 200.
    """

    def __init__(self, args: list[str] | tuple[str, ...] = (), *,
                 log: str | Path | IO | None = None, cwd: str | Path | None = None,
                 env: dict[str, str] | None = None,
                 timeout: float = 300.0, host: str = "127.0.0.1") -> None:
        self.port = free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.cmd = [sys.executable, "-m", "alignserve.cli", "serve", "--host", host,
                    "--port", str(self.port), "--log-level", "warning", *args]
        self._own_log = isinstance(log, str | Path)
        self.log: Any = open(log, "w") if self._own_log else log  # noqa: SIM115
        # /health echoes this id, so a server of another process that happens to hold the
        # same port (free_port is racy between processes) is never taken for ours
        self.launch_id = uuid.uuid4().hex
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {}),
                    "ALIGNSERVE_LAUNCH_ID": self.launch_id}
        out = self.log if self.log is not None else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.cmd, cwd=cwd, env=full_env, stdout=out,
                                     stderr=subprocess.STDOUT)
        try:
            self._wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _log_tail(self) -> str:
        name = getattr(self.log, "name", None)
        if isinstance(name, str) and Path(name).is_file():
            try:
                self.log.flush()
            except (ValueError, OSError):
                pass
            return Path(name).read_text(errors="replace")[-3000:]
        return ""

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with code {self.proc.returncode} during "
                                   f"start-up: {self._log_tail()}")
            try:
                r = httpx.get(self.url + "/health", timeout=2)
                if r.status_code == 200 and r.headers.get("x-alignserve-launch") == self.launch_id:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server did not answer /health within {timeout:.0f} s")

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate (then kill after ``timeout`` s); idempotent."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        if self._own_log and self.log is not None and not self.log.closed:
            self.log.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
