"""Remote mode's cost: every strategy in-process vs through the proxy (issue #14).

    python bench/proxy.py                       # loopback: starts both servers itself
    python bench/proxy.py --vllm-url http://127.0.0.1:8001 --clients 1,8

Starts an in-process ``alignserve serve`` (the reference, and the remote) and
``alignserve serve --base-url`` over it (the proxy, with the local backbone for vas / cd /
genarm); with ``--vllm-url`` also a proxy over that vLLM server. For each strategy and client
count, every server gets the same seeded chat requests (held-out test prompts, ``--max-tokens``
new tokens) from C concurrent clients, servers interleaved so load drifts hit all alike.
Prints, per strategy and level, returned tokens/s, mean latency per returned token, the
proxy / in-process speed ratio, and (proxy) the remote round trips per returned token, read
from the responses' ``alignment.remote_calls``.

Both servers run on this machine, so the proxy's local work (rewards, backbone) competes with
the remote's for the same cores: on one shared CPU the ratio is a floor, not what a GPU remote
would give.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STRATEGIES: dict[str, dict | None] = {
    "sample": None,
    "best_of_n": {"strategy": "best_of_n", "n": 4, "weights": {"sentiment": 1}},
    "cd_block": {"strategy": "cd_block", "k": 4, "block": 8, "weights": {"sentiment": 1}},
    "args": {"strategy": "args", "top_k": 4, "weights": {"vader": 1}},
    "transfer_qstar": {"strategy": "transfer_qstar", "top_k": 3, "rollout": 4,
                       "weights": {"vader": 1}},
    "vas": {"strategy": "vas", "top_k": 8, "weights": {"sentiment": 3}},
    "cd": {"strategy": "cd", "top_k": 8, "weights": {"sentiment": 3}},
    "genarm": {"strategy": "genarm", "weights": {"sentiment": 1}},
    "deal": {"strategy": "deal", "beams": 2, "top_k": 2, "lookahead": 4,
             "weights": {"vader": 1}},
}


def model_of(url: str) -> str:
    return httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]


def one(client: httpx.Client, url: str, model: str, prompt: str, alignment: dict | None,
        max_tokens: int, seed: int) -> tuple[int, float, int | None]:
    """One chat request: (completion tokens, seconds, remote calls or None)."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "seed": seed}
    if alignment is not None:
        body["alignment"] = alignment
    t0 = time.perf_counter()
    r = client.post(url + "/v1/chat/completions", timeout=900, json=body)
    if r.status_code != 200:
        raise RuntimeError(f"{url}: {r.status_code} {r.text[:300]}")
    out = r.json()
    calls = (out.get("alignment") or {}).get("remote_calls")
    return out["usage"]["completion_tokens"], time.perf_counter() - t0, calls


def level(url: str, model: str, prompts: list[str], alignment: dict | None, clients: int,
          requests: int, max_tokens: int) -> dict[str, float]:
    with httpx.Client() as c, ThreadPoolExecutor(clients) as ex:
        t0 = time.perf_counter()
        res = list(ex.map(lambda i: one(c, url, model, prompts[i % len(prompts)], alignment,
                                        max_tokens, i), range(requests)))
        wall = time.perf_counter() - t0
    toks = sum(n for n, _, _ in res)
    calls = [k for _, _, k in res if k is not None]
    return {"tok_s": toks / wall,
            "lat_tok": statistics.fmean(t / max(n, 1) for n, t, _ in res),
            "rt_tok": sum(calls) / toks if calls and toks else float("nan")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="1,8", help="concurrency levels (default 1,8)")
    ap.add_argument("--requests", type=int, default=0,
                    help="requests per level, strategy and server (default: max(2, clients))")
    ap.add_argument("--max-tokens", type=int, default=12, help="new tokens (default 12)")
    ap.add_argument("--strategies", default=",".join(STRATEGIES),
                    help=f"comma-separated subset of {','.join(STRATEGIES)}")
    ap.add_argument("--vllm-url", default=None,
                    help="also measure a proxy over this vLLM server (same model)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per server")
    args = ap.parse_args(argv)
    from alignserve.data.prompts import load_prompts
    from alignserve.engine.model_store import resolve_model
    from alignserve.server.launch import ServerProcess

    model_dir = resolve_model(None, progress=False)
    prompts = [p.text for p in load_prompts("test", "mixed")[:16]]
    names = [s for s in args.strategies.split(",") if s]
    levels = [int(x) for x in args.clients.split(",")]
    common = ["--slots", "32", "--max-n", "8", "--max-len", "1024"]
    if args.threads:
        common += ["--threads", str(args.threads)]
    started = []
    try:
        ref = ServerProcess(common, timeout=300)
        started.append(ref)
        proxy = ServerProcess([*common, "--base-url", ref.url, "--tokenizer", str(model_dir)],
                              timeout=300)
        started.append(proxy)
        servers = {"in-process": ref.url, "proxy": proxy.url}
        if args.vllm_url:
            pv = ServerProcess([*common, "--base-url", args.vllm_url.rstrip("/"),
                                "--tokenizer", str(model_dir)], timeout=300)
            started.append(pv)
            servers["proxy->vLLM"] = pv.url
        models = {k: model_of(u) for k, u in servers.items()}
        for k, u in servers.items():  # warm-up
            level(u, models[k], prompts, None, 1, 1, 4)
        out: dict[tuple[str, str, int], dict[str, float]] = {}
        t_all = time.perf_counter()
        for s in names:
            for c in levels:
                n = args.requests or max(2, c)
                for k, u in servers.items():
                    out[(s, k, c)] = level(u, models[k], prompts, STRATEGIES[s], c, n,
                                           args.max_tokens)
                    print(f"{s:>15} c={c} {k:>12}: {out[(s, k, c)]['tok_s']:.1f} tok/s",
                          file=sys.stderr, flush=True)
        wall = time.perf_counter() - t_all
    finally:
        for srv in reversed(started):
            srv.stop()
    from throughput import cpu_model  # bench/throughput.py: the same CPU name

    print(f"Machine: {cpu_model()}, loopback remote on the same "
          f"machine; chat, {args.max_tokens} new tokens, requests per level = "
          f"{args.requests or 'max(2, clients)'}; "
          f"{wall:.0f} s")
    cols = [k for k in servers if k != "in-process"]
    head = ["strategy", "c", "in-process tok/s", "in-process ms/tok"]
    for k in cols:
        head += [f"{k} tok/s", f"{k} ms/tok", f"{k} / in-process", f"{k} round trips/tok"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for s in names:
        for c in levels:
            r = out[(s, "in-process", c)]
            row = [s, str(c), f"{r['tok_s']:.1f}", f"{1000 * r['lat_tok']:.0f}"]
            for k in cols:
                p = out[(s, k, c)]
                rt = "1 call/request" if s == "sample" else f"{p['rt_tok']:.2f}"
                row += [f"{p['tok_s']:.1f}", f"{1000 * p['lat_tok']:.0f}",
                        f"{p['tok_s'] / r['tok_s']:.2f}x", rt]
            print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
