"""Benchmark the fused guided-sampling kernel against the torch chains it replaces.

For each (B, V) with H=2 dense guidance sources it times

* ``triton``  - :func:`guided_sample` with ``backend="triton"`` (wrapper included, as the
  engine calls it),
* ``eager``   - the torch reference :func:`guided_sample_torch`,
* ``compile`` - ``torch.compile`` of that reference,

and prints a Markdown table: microseconds per call, speed-ups over eager and compiled torch,
and the Triton path's achieved bandwidth against the HBM floor. The floor counts every input
byte read once and every output byte written once: a sampler cannot do better than streaming
its logits and guidance scores, so "% of peak" says how much headroom is left.

Usage::

    python bench/kernels.py                       # CUDA; --peak-gbps 3350 (H100 SXM)
    python bench/kernels.py --cpu --vocab 32000   # no GPU: time the torch reference only
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignserve.kernels.guided_sample import (  # noqa: E402
    SampleOut,
    guided_sample,
    guided_sample_torch,
)

Inputs = dict[str, "torch.Tensor | None"]


def make_inputs(b: int, v: int, h: int, device: torch.device, seed: int = 0) -> Inputs:
    """Decoding-like inputs: every row samples with T=0.8, top-k=50, top-p=0.9."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return {
        "logits": (torch.randn(b, v, generator=gen) * 4).to(device),
        "weights": torch.rand(b, h, generator=gen).to(device),
        "dense": torch.randn(b, h, v, generator=gen).to(device),
        "cand_scores": None,
        "cand_ids": None,
        "temperature": torch.full((b,), 0.8, device=device),
        "top_k": torch.full((b,), 50, dtype=torch.int64, device=device),
        "top_p": torch.full((b,), 0.9, device=device),
        "noise_seed": torch.randint(0, 2**31, (b,), generator=gen).to(device),
    }


def floor_bytes(b: int, v: int, h: int, n_top: int) -> int:
    """Each input read once, each output written once (float32 / int64 as in SPEC)."""
    reads = b * v * 4 + b * h * v * 4 + b * h * 4 + b * (4 + 8 + 4 + 8)
    writes = b * (8 + 4 + 4) + b * n_top * (8 + 4)
    return reads + writes


def time_cuda(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Microseconds per call from CUDA events (host launch overhead included, as in serving)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000.0 / iters


def time_cpu(fn: Callable[[], object], warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) * 1e6 / iters


def _fmt(us: float | None) -> str:
    return "n/a" if us is None else f"{us:,.1f}"


def _ratio(num: float | None, den: float | None) -> str:
    return "n/a" if num is None or den is None else f"{num / den:.2f}x"


def run_cuda(args: argparse.Namespace) -> None:
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    print(
        f"device: {name}; peak {args.peak_gbps:.0f} GB/s; H={args.heads} dense; "
        f"n_top={args.n_top}; T=0.8, top_k=50, top_p=0.9\n"
    )
    compiled = torch.compile(guided_sample_torch, dynamic=False)
    print(
        "| B | V | triton us | eager us | compile us | vs eager | vs compile "
        "| triton GB/s | % of peak | floor us | tokens == eager |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|")
    for v in args.vocab:
        for b in args.batch:
            x = make_inputs(b, v, args.heads, dev)

            def tri(x: Inputs = x) -> SampleOut:
                return guided_sample(**x, n_top=args.n_top, backend="triton")

            def eager(x: Inputs = x) -> SampleOut:
                return guided_sample_torch(**x, n_top=args.n_top)

            def comp(x: Inputs = x) -> SampleOut:
                return compiled(**x, n_top=args.n_top)

            same = bool(torch.equal(tri().tokens, eager().tokens))
            t_tri = time_cuda(tri, args.warmup, args.iters)
            t_eager = time_cuda(eager, args.warmup, args.iters)
            try:
                t_comp: float | None = time_cuda(comp, args.warmup, args.iters)
            except Exception as exc:  # compile support varies across torch versions
                print(f"<!-- torch.compile failed for B={b} V={v}: {exc!r} -->")
                t_comp = None
            nbytes = floor_bytes(b, v, args.heads, args.n_top)
            gbps = nbytes / (t_tri * 1e-6) / 1e9
            floor_us = nbytes / (args.peak_gbps * 1e9) * 1e6
            print(
                f"| {b} | {v} | {_fmt(t_tri)} | {_fmt(t_eager)} | {_fmt(t_comp)} "
                f"| {_ratio(t_eager, t_tri)} | {_ratio(t_comp, t_tri)} | {gbps:,.0f} "
                f"| {100 * gbps / args.peak_gbps:.1f}% | {floor_us:,.1f} "
                f"| {'yes' if same else 'NO'} |"
            )


def run_cpu(args: argparse.Namespace) -> None:
    dev = torch.device("cpu")
    print(f"CPU timing of the torch reference only (eager); H={args.heads}, n_top={args.n_top}\n")
    print("| B | V | eager us |")
    print("|---:|---:|---:|")
    for v in args.vocab:
        for b in args.batch:
            x = make_inputs(b, v, args.heads, dev)
            t = time_cpu(
                lambda x=x: guided_sample_torch(**x, n_top=args.n_top),
                min(args.warmup, 2),
                max(1, min(args.iters, 5)),
            )
            print(f"| {b} | {v} | {_fmt(t)} |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 49152, 128256])
    ap.add_argument("--heads", type=int, default=2, help="dense guidance sources H")
    ap.add_argument("--n-top", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument(
        "--peak-gbps",
        type=float,
        default=3350.0,
        help="HBM peak for the floor (3350 = H100 SXM, 4800 = H200)",
    )
    ap.add_argument(
        "--cpu",
        action="store_true",
        help="without CUDA: time the torch reference on CPU instead of exiting",
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if torch.cuda.is_available():
        run_cuda(args)
    elif args.cpu:
        run_cpu(args)
    else:
        print(
            "bench/kernels.py: no CUDA device found; the Triton kernel needs a GPU. "
            "Nothing to time (pass --cpu to time the torch reference on CPU)."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
