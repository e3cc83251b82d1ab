"""One GPU check for issue #13, in under 8 minutes on one H100/H200, downloading nothing.

    python bench/gpu_check.py                 # CUDA machine: everything below
    python bench/gpu_check.py --device cpu --tiny   # a smoke run of the same code on CPU

Prints three tables:
1. fused guided sampler (Triton) at V = 128k for B in {1, 64, 256}: microseconds per call and
   achieved GB/s against the memory-traffic floor, next to the device's HBM peak;
2. decode tokens/s of our model runner (``ModelRunner`` on its slot KV cache, the engine's
   forward path, random-weight Llama shapes of about 1B and 8B parameters in bf16) at batch
   1 / 32 / 128, against Hugging Face ``generate()`` on the same random model;
3. per-token cost of VAS (a 20-candidate tree forward) and GenARM (one extra low-rank ARM
   matmul over the vocabulary) relative to a plain decode step, at batch 1 and 32.
Random weights: throughput does not depend on them. Numbers go into the README's GPU table.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignserve.engine.model import CausalLM, ModelConfig  # noqa: E402
from alignserve.engine.primitives import Extend, Tree  # noqa: E402
from alignserve.engine.runner import ModelRunner  # noqa: E402

SHAPES = {  # Llama 3.2 1B and Llama 3.1 8B
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
               num_kv_heads=8, head_dim=64, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
               num_kv_heads=8, head_dim=128, tie_word_embeddings=False),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=32, tie_word_embeddings=True),
}
HBM_PEAK = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}  # GB/s


def timed(fn: Callable[[], object], dev: torch.device, iters: int) -> float:
    """Seconds per call (after one warm-up call), synchronised on CUDA."""
    fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def kernel_table(dev: torch.device, v: int, batches: list[int]) -> None:
    from alignserve.kernels.guided_sample import guided_sample

    backend = "triton" if dev.type == "cuda" else "torch"
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    peak = next((p for k, p in HBM_PEAK.items() if k in name), None)
    print(f"\n## Fused guided sampler, V={v}, backend {backend}, {name} (HBM peak "
          f"{peak or '?'} GB/s)\n\n| B | µs/call | GB/s | of peak |\n|---|---|---|---|")
    for b in batches:
        g = torch.Generator().manual_seed(b)
        x = dict(logits=(torch.randn(b, v, generator=g) * 4).to(dev),
                 weights=torch.rand(b, 1, generator=g).to(dev),
                 dense=torch.randn(b, 1, v, generator=g).to(dev), cand_scores=None,
                 cand_ids=None, temperature=torch.full((b,), 0.8, device=dev),
                 top_k=torch.full((b,), 50, dtype=torch.long, device=dev),
                 top_p=torch.full((b,), 0.9, device=dev),
                 noise_seed=torch.randint(0, 2**31, (b,), generator=g).to(dev))
        s = timed(lambda x=x: guided_sample(**x, backend=backend), dev, 20)
        gbs = (2 * b * v * 4) / s / 1e9  # logits + dense read once: the traffic floor
        print(f"| {b} | {s * 1e6:.0f} | {gbs:.0f} | "
              f"{f'{gbs / peak:.0%}' if peak else '?'} |")


def build(shape: str, dev: torch.device, dtype: torch.dtype, max_len: int) -> tuple:
    cfg = ModelConfig(vocab_size=128256 if shape != "tiny" else 4096, rms_norm_eps=1e-5,
                      rope_theta=500000.0, max_position_embeddings=max_len,
                      **SHAPES[shape])  # type: ignore[arg-type]
    with torch.device(dev):
        model = CausalLM(cfg, rope_len=max_len + 1)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
        p.requires_grad_(False)
    model = model.to(dtype).eval()
    model.rope_cos, model.rope_sin = model.rope_cos.float(), model.rope_sin.float()
    return model, cfg


def hf_model(cfg: ModelConfig, dev: torch.device, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig, LlamaForCausalLM

    hc = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                     intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                     num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                     head_dim=cfg.head_dim, tie_word_embeddings=cfg.tie_word_embeddings)
    with torch.device(dev):
        m = LlamaForCausalLM(hc)
    return m.to(dtype).eval()


def decode_tables(shape: str, dev: torch.device, dtype: torch.dtype, batches: list[int],
                  prompt: int, new: int) -> None:
    max_len = prompt + new + 32
    model, cfg = build(shape, dev, dtype, max_len)
    runner = ModelRunner("base", None, slots=max(batches), max_len=max_len, dtype=dtype,
                         device=str(dev), module=(model, cfg))
    g = torch.Generator().manual_seed(0)
    print(f"\n## Decode, random {shape} Llama, {dtype}, prompt {prompt}, {new} new tokens\n\n"
          "| batch | ours tok/s | HF generate tok/s | ratio | VAS k=20 cost | GenARM cost |\n"
          "|---|---|---|---|---|---|")
    hf = hf_model(cfg, dev, dtype)
    arm = (torch.randn(32, cfg.hidden_size, generator=g).to(dev, dtype),
           torch.randn(cfg.vocab_size, 32, generator=g).to(dev, dtype))
    for b in batches:
        seqs = [runner.new_seq() for _ in range(b)]
        ids = torch.randint(0, cfg.vocab_size, (b, prompt), generator=g)
        runner.run([Extend(s, ids[i].tolist()) for i, s in enumerate(seqs)])

        def step(seqs=seqs) -> None:
            runner.run([Extend(s, [7]) for s in seqs])

        def vas(seqs=seqs) -> None:
            runner.run([Tree(s, list(range(20)), hidden=True) for s in seqs])

        def genarm(seqs=seqs) -> None:
            outs = runner.run([Extend(s, [7], hidden=True) for s in seqs])
            h = torch.cat([o.hidden for o in outs])
            _ = (h @ arm[0].T) @ arm[1].T  # the ARM's low-rank logits over the vocabulary

        t_plain = timed(step, dev, new // 3)
        t_vas, t_arm = timed(vas, dev, new // 3), timed(genarm, dev, new // 3)
        for s in seqs:
            runner.free(s)
        inp = ids.to(dev)
        t0 = time.perf_counter()
        with torch.inference_mode():
            hf.generate(inp, attention_mask=torch.ones_like(inp), max_new_tokens=new,
                        min_new_tokens=new, do_sample=False, pad_token_id=0)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t_hf = time.perf_counter() - t0
        ours, theirs = b / t_plain, b * new / t_hf
        print(f"| {b} | {ours:.0f} | {theirs:.0f} | {ours / theirs:.2f}× | "
              f"{t_vas / t_plain:.2f}× | {t_arm / t_plain:.2f}× |")
    if dev.type == "cuda":  # the 8B shapes need the 1B's memory back
        hf.to("cpu")
        runner.cache.k = runner.cache.v = None  # type: ignore[assignment]
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, for a CPU smoke run")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    t0 = time.perf_counter()
    if args.tiny:
        kernel_table(dev, 4096, [1, 8])
        decode_tables("tiny", dev, torch.float32, [1, 4], prompt=16, new=6)
    else:
        kernel_table(dev, 128256, [1, 64, 256])
        for shape in ("1b", "8b"):
            decode_tables(shape, dev, torch.bfloat16, [1, 32, 128], prompt=128, new=48)
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
