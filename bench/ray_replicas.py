"""Ray Serve scale-out: aggregate tokens/s for 1 and 2 engine replicas, and the ingress's
routing overhead per request, against plain single-process servers. One run, side by side.

Three servers are up at once, every engine with one torch thread (``--threads 1``,
``--replica-cpus 1``): two plain ``alignserve serve`` processes A and B, and
``alignserve serve --replicas 2`` (a local Ray). Rounds interleave four configurations so
background load hits them alike:

* ``plain x1``: all clients on server A;
* ``plain x2``: half the clients on A, half on B (the no-Ray control for two engines);
* ``ray x1``: the Ray server with every request pinned to one replica (one ``x-session-id``);
* ``ray x2``: the Ray server, routed by least outstanding work over both replicas.

Load: ``--clients`` concurrent clients, each sending ``--requests`` plain-sampling completions
of ``--new-tokens`` tokens back to back (``ignore_eos``); tokens/s = completion tokens / wall.
Overhead: ``--probes`` sequential 1-token requests to A and to the Ray server, interleaved; the
median latency difference is the per-request cost of the ingress hop (HTTP relay, the Ray
handle call, the replica's ASGI bridge). On 2 CPU cores expect two engines about flat against
one (or below it: two half batches instead of one full one on the same cores); replicas pay off
with more cores or machines.

    .venv/bin/python bench/ray_replicas.py                      # ~5 min on 2 busy cores
    .venv/bin/python bench/ray_replicas.py --rounds 1 --clients 4 --new-tokens 16
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402

from alignserve.server.launch import ServerProcess  # noqa: E402

MODEL = "SmolLM2-135M-Instruct"
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[bench {time.perf_counter() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def burst(url: str, clients: int, per_client: int, new_tokens: int,
          session: str | None) -> int:
    """Completion tokens produced by ``clients`` threads sending requests back to back."""
    tokens = [0] * clients
    errors: list[str] = []
    headers = {"x-session-id": session} if session else {}

    def worker(c: int) -> None:
        with httpx.Client(timeout=600) as cl:
            for r in range(per_client):
                resp = cl.post(url + "/v1/completions", headers=headers, json={
                    "model": MODEL, "prompt": f"Story {c}.{r}: once upon a time",
                    "max_tokens": new_tokens, "ignore_eos": True, "seed": c * 100 + r})
                if resp.status_code != 200:
                    errors.append(f"{resp.status_code} {resp.text[:200]}")
                    return
                tokens[c] += resp.json()["usage"]["completion_tokens"]

    threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise RuntimeError(f"request failed: {errors[0]}")
    return sum(tokens)


def together(targets: list[tuple[str, str | None, int]], per_client: int,
             new_tokens: int) -> float:
    """Aggregate tokens/s of several bursts ``(url, session, clients)`` run at the same time
    (all their tokens over the wall time of the slowest)."""
    out = [0] * len(targets)
    t = time.perf_counter()

    def run(i: int) -> None:
        url, session, clients = targets[i]
        out[i] = burst(url, clients, per_client, new_tokens, session)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(targets))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return sum(out) / (time.perf_counter() - t)


def probe_latency(url: str, n: int) -> list[float]:
    """Seconds per sequential 1-token request (keep-alive connection)."""
    out = []
    with httpx.Client(timeout=120) as cl:
        for i in range(n):
            t = time.perf_counter()
            r = cl.post(url + "/v1/completions", json={"model": MODEL, "prompt": "Hi",
                                                       "max_tokens": 1, "seed": i})
            r.raise_for_status()
            out.append(time.perf_counter() - t)
    return out


def wait_replicas(url: str, count: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if httpx.get(url + "/health", timeout=10).json().get("replicas_up") == count:
            return
        time.sleep(1)
    raise RuntimeError(f"{count} replicas did not come up")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--clients", type=int, default=8,
                    help="concurrent clients, even (default 8)")
    ap.add_argument("--requests", type=int, default=2, help="requests per client (default 2)")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens per request (default 32)")
    ap.add_argument("--probes", type=int, default=20,
                    help="sequential 1-token requests per server for the overhead (default 20)")
    ap.add_argument("--slots", type=int, default=16, help="KV-cache slots per engine")
    args = ap.parse_args(argv)

    logdir = Path(tempfile.mkdtemp(prefix="ray_bench_"))
    common = ["--slots", str(args.slots), "--max-len", "512", "--max-tokens", "256"]
    log(f"starting servers (logs in {logdir})")
    half = args.clients // 2
    with ServerProcess([*common, "--threads", "1"], log=logdir / "a.log", timeout=300) as a, \
            ServerProcess([*common, "--threads", "1"], log=logdir / "b.log", timeout=300) as b:
        ray = ServerProcess([*common, "--replicas", "2", "--replica-cpus", "1"],
                            log=logdir / "ray.log", timeout=300)
        try:
            wait_replicas(ray.url, 2)
            configs = {"plain x1": [(a.url, None, args.clients)],
                       "plain x2": [(a.url, None, half), (b.url, None, half)],
                       "ray x1": [(ray.url, "pin-one-replica", args.clients)],
                       "ray x2": [(ray.url, None, args.clients)]}
            for url in (a.url, b.url, ray.url):  # warm-up
                burst(url, 2, 1, 4, None)
            tps: dict[str, list[float]] = {k: [] for k in configs}
            for r in range(args.rounds):
                order = list(configs) if r % 2 == 0 else list(reversed(configs))
                for name in order:
                    tps[name].append(together(configs[name], args.requests, args.new_tokens))
                    log(f"round {r + 1} {name}: {tps[name][-1]:.1f} tok/s")
            lat: dict[str, list[float]] = {"plain": [], "ray": []}
            for _ in range(2):  # interleave the probe halves too
                lat["plain"] += probe_latency(a.url, args.probes // 2)
                lat["ray"] += probe_latency(ray.url, args.probes // 2)
            routed = httpx.get(ray.url + "/health", timeout=10).json()["replicas"]
        finally:
            ray.stop(timeout=60)

    base = statistics.median(tps["plain x1"])
    print(f"\n## Ray Serve replicas: {args.clients} clients x {args.requests} requests x "
          f"{args.new_tokens} tokens, {args.rounds} interleaved rounds, {os.cpu_count()} CPUs, "
          "1 torch thread per engine")
    print("\n| configuration | aggregate tok/s (median) | vs plain x1 |")
    print("|---|---:|---:|")
    for name in tps:
        med = statistics.median(tps[name])
        print(f"| {name} | {med:.1f} | {med / base:.2f}x |")
    ratio = statistics.median(tps["ray x2"]) / statistics.median(tps["plain x2"])
    print(f"\nray x2 / plain x2: {ratio:.2f}x")
    ms, mr = statistics.median(lat["plain"]), statistics.median(lat["ray"])
    print("\n| 1-token request latency | median ms |")
    print("|---|---:|")
    print(f"| single process | {ms * 1000:.1f} |")
    print(f"| through the Ray ingress | {mr * 1000:.1f} |")
    print(f"| routing overhead per request | {(mr - ms) * 1000:.1f} ({mr / ms:.2f}x) |")
    print("\nrequests routed per replica: "
          + ", ".join(f"replica {r['replica']}: {r['routed']}" for r in routed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
