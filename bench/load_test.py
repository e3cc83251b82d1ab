"""Bounded loopback load test: many concurrent clients, mixed strategies, streams, disconnects.

Starts its own server (or targets ``--url``), runs ``--clients`` concurrent clients for
``--duration`` seconds, each sending a random mix of plain and aligned requests (sample,
best_of_n, cd_block, args, all with small parameters), half of them streamed, and some streams
abandoned after a couple of chunks. It then reports:

- every status code seen (the pass condition is zero 5xx) and malformed responses (zero);
- throughput (completed requests and completion tokens per second);
- the server's RSS after warm-up vs at the end (flat = within 10 %), a leak check for the
  per-request state (KV slots, queues, callbacks) that disconnects and errors must release;
- that the server is idle again afterwards (no slot leaked by an abandoned stream).

    .venv/bin/python bench/load_test.py --clients 32 --duration 60
    .venv/bin/python bench/load_test.py --clients 8 --duration 20 --warmup 5   # quick

Exit status 1 when any check fails, so CI could run it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from alignserve.server.launch import ServerProcess

MODEL = "SmolLM2-135M-Instruct"
ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Write a sentence about the sea.", "Give me one tip for sleeping well.",
           "Describe a cat in a few words.", "What is a good breakfast?",
           "Tell me something cheerful.", "Explain rain to a child."]
# (name, alignment) — small parameters so a 2-core CPU keeps up with dozens of clients
MIX: list[tuple[str, dict[str, Any] | None]] = [
    ("sample", None),
    ("best_of_n", {"strategy": "best_of_n", "n": 2, "weights": {"vader": 1.0}}),
    ("cd_block", {"strategy": "cd_block", "k": 2, "block": 4, "weights": {"vader": 1.0}}),
    ("args", {"strategy": "args", "top_k": 3, "weights": {"vader": 1.0}}),
]


@dataclass
class Stats:
    codes: Counter = field(default_factory=Counter)
    by_strategy: Counter = field(default_factory=Counter)
    malformed: list[str] = field(default_factory=list)
    completed: int = 0
    disconnected: int = 0
    tokens: int = 0
    transport_errors: Counter = field(default_factory=Counter)
    error_messages: Counter = field(default_factory=Counter)  # 4xx bodies, stream errors


def start_server(args: argparse.Namespace) -> ServerProcess:
    return ServerProcess(["--slots", str(args.slots), "--max-len", "512",
                          "--max-waiting", str(args.max_waiting)],
                         log=args.server_log, cwd=ROOT, timeout=300)


def check_completion(body: dict[str, Any], chat: bool) -> str | None:
    """Why a non-streamed 200 body is malformed, or None when it is well-formed."""
    try:
        ch = body["choices"][0]
        text = ch["message"]["content"] if chat else ch["text"]
        assert isinstance(text, str)
        assert ch["finish_reason"] in ("stop", "length")
        u = body["usage"]
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    except (KeyError, IndexError, TypeError, AssertionError) as exc:
        return f"bad body ({type(exc).__name__}): {json.dumps(body)[:200]}"
    return None


async def one_request(c: httpx.AsyncClient, url: str, rng: random.Random, st: Stats,
                      args: argparse.Namespace) -> None:
    name, alignment = rng.choice(MIX)
    chat = rng.random() < 0.5
    stream = rng.random() < 0.5
    body: dict[str, Any] = {"model": MODEL, "max_tokens": args.max_tokens,
                            "seed": rng.randrange(1 << 30), "stream": stream}
    prompt = rng.choice(PROMPTS)
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if alignment:
        body["alignment"] = alignment
    if stream:
        body["stream_options"] = {"include_usage": True}
    path = "/v1/chat/completions" if chat else "/v1/completions"
    st.by_strategy[name] += 1
    if not stream:
        r = await c.post(url + path, json=body)
        st.codes[r.status_code] += 1
        if r.status_code != 200:
            st.error_messages[f"{r.status_code} {name}: {r.text[:160]}"] += 1
        if r.status_code == 200:
            why = check_completion(r.json(), chat)
            if why:
                st.malformed.append(why)
            else:
                st.completed += 1
                st.tokens += r.json()["usage"]["completion_tokens"]
        return
    abandon = rng.random() < args.disconnect_frac
    async with c.stream("POST", url + path, json=body) as r:
        st.codes[r.status_code] += 1
        if r.status_code != 200:
            st.error_messages[f"{r.status_code} {name}: {(await r.aread())[:160]!r}"] += 1
            return
        events, done, finish, usage, errored = 0, False, None, None, False
        async for line in r.aiter_lines():
            if not line:
                continue
            if not line.startswith("data: "):
                st.malformed.append(f"not an SSE data line: {line[:80]}")
                return
            payload = line[6:]
            if payload == "[DONE]":
                done = True
                break
            obj = json.loads(payload)
            if "error" in obj:
                st.codes[f"stream-error:{obj['error'].get('code')}"] += 1
                st.error_messages[f"stream {name}: {obj['error'].get('message')}"] += 1
                errored = True
                continue
            for ch in obj.get("choices", []):
                finish = ch.get("finish_reason") or finish
            usage = obj.get("usage") or usage
            events += 1
            if abandon and events >= 2:
                st.disconnected += 1
                return  # leaving the block closes the connection mid-stream
        if errored and done:
            return  # a well-formed error chunk then [DONE]: counted above, not malformed
        if not done or finish not in ("stop", "length") or usage is None:
            st.malformed.append(f"stream ended badly: done={done} finish={finish} usage={usage}")
        else:
            st.completed += 1
            st.tokens += usage["completion_tokens"]


async def client_loop(cid: int, url: str, until: float, st: Stats,
                      args: argparse.Namespace) -> None:
    rng = random.Random(args.seed * 1000 + cid)
    async with httpx.AsyncClient(timeout=args.request_timeout) as c:
        while time.monotonic() < until:
            try:
                await one_request(c, url, rng, st, args)
            except (httpx.HTTPError, json.JSONDecodeError) as exc:
                st.transport_errors[type(exc).__name__] += 1


async def run_load(url: str, proc: psutil.Process | None, args: argparse.Namespace
                   ) -> dict[str, Any]:
    st = Stats()
    t0 = time.monotonic()
    until = t0 + args.duration
    tasks = [asyncio.create_task(client_loop(i, url, until, st, args))
             for i in range(args.clients)]
    await asyncio.sleep(min(args.warmup, args.duration))
    rss_warm = proc.memory_info().rss if proc else None
    completed_warm, tokens_warm, t_warm = st.completed, st.tokens, time.monotonic()
    rss_peak = rss_warm or 0
    while not all(t.done() for t in tasks):
        await asyncio.sleep(1.0)
        if proc:
            rss_peak = max(rss_peak, proc.memory_info().rss)
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - t_warm
    # idle again: every abandoned stream's slots were released
    idle_s = None
    t_idle = time.monotonic()
    async with httpx.AsyncClient(timeout=10) as c:
        while time.monotonic() - t_idle < 30:
            h = (await c.get(url + "/health")).json()
            if h["running"] == 0 and h["waiting"] == 0:
                idle_s = time.monotonic() - t_idle
                break
            await asyncio.sleep(0.1)
        metrics = (await c.get(url + "/metrics")).text
    rss_end = proc.memory_info().rss if proc else None
    return {"stats": st, "elapsed": elapsed, "rss_warm": rss_warm, "rss_end": rss_end,
            "rss_peak": rss_peak, "idle_s": idle_s, "metrics": metrics,
            "completed_after_warmup": st.completed - completed_warm,
            "tokens_after_warmup": st.tokens - tokens_warm, "total_s": time.monotonic() - t0}


def _metric(text: str, name: str) -> str:
    """One unlabelled sample from Prometheus text ("?" when absent)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return f"{float(line.split()[1]):.0f}"
    return "?"


def report(res: dict[str, Any], args: argparse.Namespace) -> bool:
    st: Stats = res["stats"]
    five = sum(v for k, v in st.codes.items() if isinstance(k, int) and k >= 500)
    mb = 1 / 2**20
    rows = [("clients x duration", f"{args.clients} x {args.duration:.0f} s "
                                   f"(warm-up {args.warmup:.0f} s)"),
            ("requests by strategy", ", ".join(f"{k} {v}" for k, v in sorted(
                st.by_strategy.items()))),
            ("status codes", ", ".join(f"{k}: {v}" for k, v in sorted(
                st.codes.items(), key=lambda kv: str(kv[0])))),
            ("5xx", str(five)),
            ("malformed responses", str(len(st.malformed))),
            ("transport errors", ", ".join(f"{k} {v}" for k, v in st.transport_errors.items())
             or "0"),
            ("completed / abandoned mid-stream", f"{st.completed} / {st.disconnected}"),
            ("disconnects counted by the server", _metric(res["metrics"],
                                                          "alignserve_client_disconnects_total")),
            ("throughput after warm-up", f"{res['completed_after_warmup'] / res['elapsed']:.2f} "
                                         f"req/s, {res['tokens_after_warmup'] / res['elapsed']:.1f}"
                                         " completion tok/s"),
            ("idle again after the run", "no" if res["idle_s"] is None
             else f"yes, {res['idle_s']:.2f} s")]
    flat = True
    if res["rss_warm"]:
        growth = res["rss_end"] / res["rss_warm"] - 1
        flat = abs(growth) <= 0.10
        rows.append(("server RSS warm-up -> end (peak)",
                     f"{res['rss_warm'] * mb:.0f} MiB -> {res['rss_end'] * mb:.0f} MiB "
                     f"({growth:+.1%}; peak {res['rss_peak'] * mb:.0f} MiB) "
                     f"{'flat' if flat else 'NOT flat'}"))
    print("| check | result |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    for m in st.malformed[:5]:
        print("malformed:", m, file=sys.stderr)
    for m, n in st.error_messages.most_common(5):
        print(f"error x{n}: {m}", file=sys.stderr)
    return five == 0 and not st.malformed and res["idle_s"] is not None and flat


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default=None,
                    help="target a running server instead of starting one (RSS needs --pid)")
    ap.add_argument("--pid", type=int, default=None, help="server process id, with --url")
    ap.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    ap.add_argument("--duration", type=float, default=60.0,
                    help="seconds of load (default 60)")
    ap.add_argument("--warmup", type=float, default=10.0,
                    help="seconds before the first RSS sample and throughput window (default 10)")
    ap.add_argument("--max-tokens", type=int, default=16, help="max_tokens per request")
    ap.add_argument("--disconnect-frac", type=float, default=0.2,
                    help="share of streams abandoned after two chunks (default 0.2)")
    ap.add_argument("--slots", type=int, default=32, help="server --slots when started here")
    ap.add_argument("--max-waiting", type=int, default=64,
                    help="server --max-waiting when started here (429s beyond it)")
    ap.add_argument("--request-timeout", type=float, default=300.0,
                    help="client-side timeout per request, seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--server-log", default=None,
                    help="write the started server's output (warnings, tracebacks) here")
    args = ap.parse_args(argv)
    server = None
    if args.url:
        url, pid = args.url.rstrip("/"), args.pid
    else:
        server = start_server(args)
        url, pid = server.url, server.pid
    try:
        proc = psutil.Process(pid) if pid else None
        res = asyncio.run(run_load(url, proc, args))
    finally:
        if server is not None:
            server.stop(10)
    ok = report(res, args)
    print(f"\n{'PASS' if ok else 'FAIL'} ({res['total_s']:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
