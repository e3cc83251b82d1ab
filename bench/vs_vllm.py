"""Plain chat serving, side by side: the same load against any OpenAI-compatible servers.

    python bench/vs_vllm.py http://127.0.0.1:8000 http://127.0.0.1:8001 --clients 1,8,16

For each client count, every server gets the same greedy chat requests (held-out test prompts,
``--max-tokens`` new tokens, EOS ignored where the server accepts ``ignore_eos``) from C
concurrent clients for ``--requests`` requests, servers interleaved level by level so load
drifts hit all alike. Prints aggregate completion tokens/s, mean latency and the ratio of each
server to the first. The model each server serves is read from its ``/v1/models``.

Starting vLLM's CPU build for it (its own venv, same torch pin; see the engine-batching notes
in the README): ``VLLM_CPU_KVCACHE_SPACE=2 python -m vllm.entrypoints.openai.api_server
--model DIR --served-model-name NAME --dtype float32 --max-model-len 2048`` (~4 min to start).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from alignserve.progress import progress_bar


def model_of(url: str) -> str:
    return httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]


def one(client: httpx.Client, url: str, model: str, prompt: str, max_tokens: int) -> tuple:
    t0 = time.perf_counter()
    r = client.post(url + "/v1/chat/completions", timeout=600, json={
        "model": model, "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
    r.raise_for_status()
    return r.json()["usage"]["completion_tokens"], time.perf_counter() - t0


def level(url: str, model: str, prompts: list[str], clients: int, requests: int,
          max_tokens: int) -> dict[str, float]:
    with httpx.Client() as c, ThreadPoolExecutor(clients) as ex:
        t0 = time.perf_counter()
        res = list(ex.map(lambda i: one(c, url, model, prompts[i % len(prompts)], max_tokens),
                          range(requests)))
        wall = time.perf_counter() - t0
    return {"tok_s": sum(n for n, _ in res) / wall, "lat": statistics.fmean(t for _, t in res)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("urls", nargs="+", help="base URLs (without /v1); the first is the reference")
    ap.add_argument("--clients", default="1,8,16", help="concurrency levels (default 1,8,16)")
    ap.add_argument("--requests", type=int, default=0,
                    help="requests per level and server (default: 2 x clients, at least 4)")
    ap.add_argument("--max-tokens", type=int, default=32, help="new tokens (default 32)")
    args = ap.parse_args(argv)
    from alignserve.data.prompts import load_prompts

    prompts = [p.text for p in load_prompts("test", "mixed")[:16]]
    urls = [u.rstrip("/") for u in args.urls]
    models = {u: model_of(u) for u in urls}
    levels = [int(x) for x in args.clients.split(",")]
    for u in urls:  # warm-up
        level(u, models[u], prompts, 1, 1, 4)
    out: dict[tuple[str, int], dict[str, float]] = {}
    bar = progress_bar(total=len(levels) * len(urls), desc="levels x servers", file=sys.stderr)
    for c in levels:
        n = args.requests or max(4, 2 * c)
        for u in urls:
            out[(u, c)] = level(u, models[u], prompts, c, n, args.max_tokens)
            bar.update(1)
    bar.close()
    from throughput import cpu_model  # bench/throughput.py: the same CPU name

    print(f"Machine: {cpu_model()}, {os.cpu_count()} cores, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end; "
          f"greedy chat, {args.max_tokens} tokens")
    print("| server | model | " + " | ".join(f"tok/s c={c} | ratio c={c}" for c in levels) + " |")
    print("|---|---|" + "---|---|" * len(levels))
    for u in urls:
        cells = []
        for c in levels:
            tok_s, ref = out[(u, c)]["tok_s"], out[(urls[0], c)]["tok_s"]
            cells.append(f"{tok_s:.1f} | {tok_s / ref:.2f}×")
        print(f"| {u} | {models[u]} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
