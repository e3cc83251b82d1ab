"""Throughput benchmark: alignserve's engine vs Hugging Face ``generate()`` on the same model.

Measured side by side in one run, fp32, greedy, a fixed number of new tokens per request (EOS is
ignored on both sides: ``min_new_tokens`` for HF, ``ignore_eos`` for us), prompts from the
``test`` split formatted with the chat template:

1. batch-1 tokens/s: HF ``generate()`` one prompt at a time vs our in-process engine one request
   at a time (``Engine.generate`` with the plain ``Sample`` strategy), over the same prompts,
   interleaved prompt by prompt (alternating which goes first) so background load hits both;
2. HF ``generate()`` with batch 8 (left padding), aggregate tokens/s, for reference;
3. over HTTP: a real ``alignserve serve`` subprocess and 1, 4, 8, 16 concurrent clients, each
   sending its requests back to back; aggregate tokens/s and the ratio vs one client.

Tokens/s counts generated tokens only, over wall time including prefill. The goals checked at
the end: batch-1 within 10% of ``generate()``, and 8 concurrent clients at least 3x the
aggregate throughput of one.

    .venv/bin/python bench/throughput.py                       # defaults, ~5 min on 2 cores
    .venv/bin/python bench/throughput.py --prompts 4 --new-tokens 16 --concurrency 1,4,8
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from alignserve.server.launch import ServerProcess  # noqa: E402

T0 = time.perf_counter()
GOAL_BATCH1 = 0.90  # ours/HF at batch 1
GOAL_CONC8 = 3.0  # 8 clients vs 1 client, aggregate


def log(msg: str) -> None:
    print(f"[bench {time.perf_counter() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# ---- machine ---------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(threads: int) -> dict[str, Any]:
    import transformers

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "usable_cores": usable,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "torch_threads": threads, "python": platform.python_version(),
            "load_avg_at_start": load}


# ---- prompts ---------------------------------------------------------------------------------
def load_chat_prompts(tok: Any, n: int) -> list[dict[str, Any]]:
    """``n`` test prompts (cycled if the split is smaller) as text, messages and token ids."""
    from alignserve.data import load_prompts

    pool = load_prompts("test")
    if not pool:
        raise SystemExit("no prompts in the test split")
    out = []
    for i in range(n):
        p = pool[i % len(pool)]
        messages = [{"role": "user", "content": p.text}]
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = list(tok(text, add_special_tokens=False).input_ids)
        out.append({"id": p.id, "messages": messages, "text": text, "ids": ids})
    return out


# ---- HF generate() ---------------------------------------------------------------------------
class HFRunner:
    def __init__(self, model_dir: Path, tok: Any) -> None:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        self.tok = tok
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        self.model.eval()
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.pad_id = int(pad)

    @torch.inference_mode()
    def generate(self, batch_ids: list[list[int]], new_tokens: int) -> list[list[int]]:
        """Greedy, exactly ``new_tokens`` new tokens per row, left padding for batches."""
        width = max(len(x) for x in batch_ids)
        input_ids = torch.full((len(batch_ids), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch_ids), width), dtype=torch.long)
        for r, ids in enumerate(batch_ids):
            input_ids[r, width - len(ids):] = torch.tensor(ids)
            mask[r, width - len(ids):] = 1
        out = self.model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  pad_token_id=self.pad_id, num_beams=1)
        return [row[width:].tolist() for row in out]


# ---- our engine, in process ------------------------------------------------------------------
class EngineRunner:
    def __init__(self, model_dir: Path, threads: int) -> None:
        from alignserve.engine.scheduler import Engine, EngineConfig

        self.engine = Engine(EngineConfig(model_dir=model_dir, threads=threads))

    def generate(self, ids: list[int], new_tokens: int) -> list[int]:
        from alignserve.decoders.sample import Sample
        from alignserve.engine.sampling import SamplingParams
        from alignserve.engine.scheduler import EngineRequest

        params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, seed=0)
        res = self.engine.generate(EngineRequest(prompt_ids=list(ids), params=params,
                                                 decoder=Sample()), timeout=600)
        return list(res["choices"][0]["tokens"])

    def close(self) -> None:
        self.engine.shutdown()


def check_len(who: str, toks: list[int], n: int) -> None:
    if len(toks) != n:
        raise RuntimeError(f"{who} produced {len(toks)} tokens, expected exactly {n}")


def bench_batch1(prompts: list[dict], n_new: int, hf: HFRunner | None,
                 ours: EngineRunner) -> dict[str, Any]:
    """Interleaved batch-1 runs: for each prompt, HF and ours back to back (order alternates)."""
    log("batch-1 warm-up")
    if hf is not None:
        hf.generate([prompts[0]["ids"]], n_new)
    ours.generate(prompts[0]["ids"], n_new)
    times: dict[str, list[float]] = {"hf": [], "ours": []}
    outs: dict[str, list[list[int]]] = {"hf": [], "ours": []}
    for i, p in enumerate(prompts):
        order = ["hf", "ours"] if i % 2 == 0 else ["ours", "hf"]
        for who in order:
            if who == "hf" and hf is None:
                continue
            t = time.perf_counter()
            toks = hf.generate([p["ids"]], n_new)[0] if who == "hf" else ours.generate(
                p["ids"], n_new)
            times[who].append(time.perf_counter() - t)
            check_len(who, toks, n_new)
            outs[who].append(toks)
        msg = ", ".join(f"{w} {times[w][-1]:.2f}s" for w in order if times[w])
        log(f"batch-1 prompt {i + 1}/{len(prompts)} ({len(p['ids'])} prompt tokens): {msg}")
    res: dict[str, Any] = {}
    for who in ("hf", "ours"):
        if not times[who]:
            continue
        total = sum(times[who])
        res[who] = {"requests": len(times[who]), "tokens": n_new * len(times[who]),
                    "wall_s": total, "tok_s": n_new * len(times[who]) / total,
                    "latency_p50_s": statistics.median(times[who]), "per_request_s": times[who]}
    if outs["hf"]:
        res["greedy_identical"] = sum(a == b for a, b in zip(outs["hf"], outs["ours"]))
    return res


def bench_hf_batched(prompts: list[dict], n_new: int, hf: HFRunner, bs: int) -> dict[str, Any]:
    batches = [prompts[i:i + bs] for i in range(0, len(prompts), bs)]
    log(f"HF batch-{len(batches[0])} warm-up")  # full length: the first batched call is slow
    hf.generate([p["ids"] for p in batches[0]], n_new)
    t = time.perf_counter()
    tokens = 0
    for j, b in enumerate(batches):
        outs = hf.generate([p["ids"] for p in b], n_new)
        for o in outs:
            check_len("hf batched", o, n_new)
        tokens += sum(len(o) for o in outs)
        log(f"HF batch {j + 1}/{len(batches)} done")
    wall = time.perf_counter() - t
    return {"batch": min(bs, len(prompts)), "requests": len(prompts), "tokens": tokens,
            "wall_s": wall, "tok_s": tokens / wall}


# ---- over HTTP -------------------------------------------------------------------------------
def start_server(threads: int, logfile: Any) -> ServerProcess:
    args = ["--slots", "32", "--threads", str(threads)]
    log("starting server: alignserve serve " + " ".join(args))
    return ServerProcess(args, log=logfile, timeout=300)


def http_round(url: str, model: str, prompts: list[dict], clients: int, per_client: int,
               n_new: int) -> dict[str, Any]:
    """``clients`` threads released together, each sending ``per_client`` requests in turn."""
    import httpx

    barrier = threading.Barrier(clients + 1)
    lat: list[float] = []
    tokens: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()

    def worker(c: int) -> None:
        with httpx.Client(base_url=url, timeout=600) as http:
            barrier.wait()
            for r in range(per_client):
                p = prompts[(c * per_client + r) % len(prompts)]
                body = {"model": model, "messages": p["messages"], "max_tokens": n_new,
                        "temperature": 0, "ignore_eos": True}
                t = time.perf_counter()
                try:
                    resp = http.post("/v1/chat/completions", json=body)
                    resp.raise_for_status()
                    got = int(resp.json()["usage"]["completion_tokens"])
                except Exception as exc:  # noqa: BLE001 - reported below
                    with lock:
                        errors.append(f"client {c}: {type(exc).__name__}: {exc}")
                    return
                dt = time.perf_counter() - t
                with lock:
                    lat.append(dt)
                    tokens.append(got)

    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in range(clients)]
    for th in threads:
        th.start()
    barrier.wait()
    t0 = time.perf_counter()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} HTTP request(s) failed; first: {errors[0]}")
    short = [t for t in tokens if t != n_new]
    if short:
        raise RuntimeError(f"{len(short)} response(s) had != {n_new} completion tokens")
    return {"clients": clients, "requests": len(lat), "tokens": sum(tokens), "wall_s": wall,
            "tok_s": sum(tokens) / wall, "latency_p50_s": statistics.median(lat)}


def bench_http(prompts: list[dict], n_new: int, levels: list[int], per_client: int,
               threads: int) -> list[dict[str, Any]]:
    import httpx

    srv = None
    with tempfile.NamedTemporaryFile("w+", prefix="alignserve-bench-", suffix=".log") as lf:
        try:
            srv = start_server(threads, lf)
            url = srv.url
            model = httpx.get(url + "/health", timeout=5).json()["model"]
            log(f"server up at {url} (model {model}); warm-up")
            http_round(url, model, prompts, 1, 1, n_new)
            http_round(url, model, prompts, max(levels), 1, min(n_new, 4))
            rows = []
            for c in levels:
                log(f"HTTP: {c} concurrent client(s) x {per_client} request(s)")
                row = http_round(url, model, prompts, c, per_client, n_new)
                log(f"HTTP: {c} client(s): {row['tok_s']:.1f} tok/s")
                rows.append(row)
            return rows
        except BaseException:
            lf.flush()
            lf.seek(0)
            tail = lf.read()[-3000:]
            if tail.strip():
                print("---- server log (tail) ----\n" + tail, file=sys.stderr)
            raise
        finally:
            if srv is not None:
                srv.stop(15)
            log("server stopped")


# ---- report ----------------------------------------------------------------------------------
def fmt(x: float | None, spec: str = ".1f") -> str:
    return "n/a" if x is None else format(x, spec)


def render(info: dict, args: argparse.Namespace, res: dict[str, Any]) -> str:
    lines = [
        f"Machine: {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), "
        f"torch {info['torch']}, transformers {info['transformers']}, "
        f"torch threads {info['torch_threads']}, load avg at start {info['load_avg_at_start']}",
        f"Settings: SmolLM2-135M-Instruct fp32, greedy, {args.new_tokens} new tokens/request "
        f"(EOS ignored), {args.prompts} test prompts (chat template), "
        f"{args.requests_per_client} request(s) per HTTP client",
        "",
        "| Measurement | Requests | New tokens | Wall (s) | Tokens/s | p50 latency (s) | Ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def row(name: str, r: dict, ratio: str) -> None:
        lines.append(f"| {name} | {r['requests']} | {r['tokens']} | {fmt(r['wall_s'], '.2f')} | "
                     f"{fmt(r['tok_s'])} | {fmt(r.get('latency_p50_s'), '.2f')} | {ratio} |")

    b1 = res.get("batch1", {})
    hf1 = b1.get("hf")
    if hf1:
        row("HF generate(), batch 1", hf1, "1.00 (ref)")
    ours1 = b1.get("ours")
    if ours1:
        ratio = f"{ours1['tok_s'] / hf1['tok_s']:.2f}x HF b1" if hf1 else "n/a"
        row("alignserve engine in-process, batch 1", ours1, ratio)
    hfb = res.get("hf_batched")
    if hfb:
        ratio = f"{hfb['tok_s'] / hf1['tok_s']:.2f}x HF b1" if hf1 else "n/a"
        row(f"HF generate(), batch {hfb['batch']} (left padding)", hfb, ratio)
    http_rows = res.get("http", [])
    base = next((r for r in http_rows if r["clients"] == 1), None)
    for r in http_rows:
        if base is None:
            ratio = "n/a"
        elif r is base:
            ratio = "1.00 (ref)"
        else:
            ratio = f"{r['tok_s'] / base['tok_s']:.2f}x 1 client"
        row(f"HTTP server, {r['clients']} concurrent client(s)", r, ratio)
    lines.append("")
    if "greedy_identical" in b1:
        lines.append(f"Greedy outputs identical to HF: {b1['greedy_identical']}/{hf1['requests']}"
                     " prompts (informational; fp32 rounding can flip a near-tie)")
    g1 = res["goals"]["batch1_vs_hf"]
    g2 = res["goals"]["conc8_vs_1"]
    lines.append(goal_line(f"batch-1 tokens/s >= {GOAL_BATCH1:.2f}x HF generate()", g1))
    lines.append(goal_line(f"8 concurrent clients >= {GOAL_CONC8:.1f}x 1 client", g2))
    return "\n".join(lines)


def goal_line(name: str, g: dict) -> str:
    if g["ratio"] is None:
        return f"Goal: {name}: not measured"
    return f"Goal: {name}: {g['ratio']:.2f}x -> {'MET' if g['met'] else 'NOT MET'}"


def compute_goals(res: dict[str, Any]) -> dict[str, Any]:
    b1 = res.get("batch1", {})
    r1 = b1["ours"]["tok_s"] / b1["hf"]["tok_s"] if "hf" in b1 and "ours" in b1 else None
    by_c = {r["clients"]: r["tok_s"] for r in res.get("http", [])}
    r2 = by_c[8] / by_c[1] if 1 in by_c and 8 in by_c else None
    return {"batch1_vs_hf": {"ratio": r1, "target": GOAL_BATCH1,
                             "met": None if r1 is None else r1 >= GOAL_BATCH1},
            "conc8_vs_1": {"ratio": r2, "target": GOAL_CONC8,
                           "met": None if r2 is None else r2 >= GOAL_CONC8}}


# ---- main ------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new-tokens", type=int, default=32,
                    help="new tokens per request, exactly (default 32)")
    ap.add_argument("--prompts", type=int, default=8,
                    help="test prompts for the batch-1 and batch-8 runs (default 8)")
    ap.add_argument("--concurrency", default="1,4,8,16",
                    help="comma-separated HTTP client counts (default 1,4,8,16)")
    ap.add_argument("--requests-per-client", type=int, default=2,
                    help="requests each HTTP client sends back to back (default 2)")
    ap.add_argument("--hf-batch", type=int, default=8, help="HF batched run size (default 8)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--skip-hf", action="store_true", help="skip the HF generate() runs")
    ap.add_argument("--skip-http", action="store_true", help="skip the HTTP server runs")
    ap.add_argument("--json", metavar="PATH", help="also write the raw numbers to PATH")
    args = ap.parse_args(argv)
    try:
        args.levels = sorted({int(x) for x in args.concurrency.split(",") if x.strip()})
    except ValueError:
        ap.error("--concurrency takes comma-separated integers, e.g. 1,4,8,16")
    if (not args.levels or min(args.levels) < 1 or args.new_tokens < 1 or args.prompts < 1
            or args.requests_per_client < 1 or args.threads < 1 or args.hf_batch < 1):
        ap.error("counts must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from alignserve.engine.model_store import resolve_model

    info = machine_info(args.threads)
    model_dir = resolve_model(None)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    prompts = load_chat_prompts(tok, args.prompts)
    log(f"model {model_dir}; {len(prompts)} prompts, "
        f"{min(len(p['ids']) for p in prompts)}-{max(len(p['ids']) for p in prompts)} tokens")
    res: dict[str, Any] = {}

    hf = None if args.skip_hf else HFRunner(model_dir, tok)
    log("loading our engine")
    ours = EngineRunner(model_dir, args.threads)
    try:
        res["batch1"] = bench_batch1(prompts, args.new_tokens, hf, ours)
    finally:
        ours.close()
    del ours
    if hf is not None:
        res["hf_batched"] = bench_hf_batched(prompts, args.new_tokens, hf, args.hf_batch)
    del hf
    gc.collect()

    if not args.skip_http:
        res["http"] = bench_http(prompts, args.new_tokens, args.levels,
                                 args.requests_per_client, args.threads)
    res["goals"] = compute_goals(res)
    log(f"done in {time.perf_counter() - T0:.0f} s")

    print(render(info, args, res))
    if args.json:
        out = {"machine": info, "settings": {k: v for k, v in vars(args).items()},
               "results": res, "total_s": time.perf_counter() - T0}
        Path(args.json).write_text(json.dumps(out, indent=2))
        log(f"raw numbers written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
