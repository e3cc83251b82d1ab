"""The GPU check: correctness and speed on one CUDA device, downloading nothing.

    python bench/gpu_check.py --model-dir DIR        # a CUDA machine: every section
    python bench/gpu_check.py --device cpu --tiny    # a smoke run of the same code on a CPU

Sections (``--sections`` picks some; each reports its own failure with a traceback and the
script goes on; the exit code is 0 only if every section that ran passed):
- ``contract``: the compiled Triton sampler against the torch reference on the device, 288
  rows at V = 128k with guidance, candidates, penalties and restriction (tokens and top-5 ids
  identical, log-probabilities within 1e-4). Not with ``--tiny``.
- ``kernel``: the sampler's microseconds per call and GB/s against the traffic floor and the
  HBM peak, V = 128k (4096 with ``--tiny``), B = 1 / 8 / 64 / 256 (1 / 8), the torch reference
  beside it.
- ``engine`` (needs ``--model-dir``): ``alignserve serve --device cuda``'s path: every strategy
  with the shipped ``concise`` heads (value, Q-head, ARM; that reward needs no download), 14
  requests in parallel on the model of DIR; weight 0 must reproduce plain sampling token for
  token.
- ``train`` (needs ``--model-dir``): ``alignserve train`` on the device, tiny sizes: a pooled
  value head, one on an 8-layer backbone, a Q-head and an ARM, in a fresh temporary folder.
- ``decode``: our runner's decode tokens/s against Hugging Face ``generate()`` on random Llama
  shapes of about 1B and 8B parameters in bf16 at batch 1 / 32 / 128 (a 2-layer model at batch
  1 / 4 with ``--tiny``), with the per-token cost of a VAS step (20-candidate tree forward) and
  a GenARM step (one low-rank ARM matmul over the vocabulary) against a plain step.

DIR holds a SmolLM2-style ``config.json`` and tokenizer files; when it has no
``*.safetensors``, seeded random weights are written into it (throughput and these checks do
not depend on the weights). On an H200 every section but ``train`` took 82 s together.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
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


def profile(name: str, fn: Callable[[], object], dev: torch.device, calls: int = 5) -> None:
    """torch.profiler over ``calls`` calls of ``fn``: the top operators by device time and by
    host time, to tell kernel time from launch and Python overhead."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    fn()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with torch_profile(activities=acts) as prof:
        for _ in range(calls):
            fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    ka = prof.key_averages()
    print(f"\n### Profile: {name}, {calls} calls\n\n```")
    if dev.type == "cuda":
        print(ka.table(sort_by="self_cuda_time_total", row_limit=8, max_name_column_width=50))
    print(ka.table(sort_by="self_cpu_time_total", row_limit=8, max_name_column_width=50))
    print("```")


def kernel_table(dev: torch.device, v: int, batches: list[int], prof: bool = False) -> None:
    from alignserve.kernels.guided_sample import guided_sample

    backend = "triton" if dev.type == "cuda" else "torch"
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    peak = next((p for k, p in HBM_PEAK.items() if k in name), None)
    print(f"\n## Fused guided sampler, V={v}, backend {backend}, {name} (HBM peak "
          f"{peak or '?'} GB/s); the torch reference on the same device beside it\n\n"
          "| B | µs/call | GB/s | of peak | torch reference µs/call |\n|---|---|---|---|---|")
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
        s_ref = timed(lambda x=x: guided_sample(**x, backend="torch"), dev, 20)
        gbs = (2 * b * v * 4) / s / 1e9  # logits + dense read once: the traffic floor
        print(f"| {b} | {s * 1e6:.0f} | {gbs:.3g} | "
              f"{f'{gbs / peak:.2%}' if peak else '?'} | {s_ref * 1e6:.0f} |")
        if prof and b == batches[0]:
            profile(f"guided_sample B={b} V={v}",
                    lambda x=x: guided_sample(**x, backend=backend), dev)


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
                  prompt: int, new: int, prof: bool = False) -> None:
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
        if prof and b == batches[0]:
            profile(f"{shape} decode step, batch {b}", step, dev)
            profile(f"{shape} VAS tree step (20 candidates), batch {b}", vas, dev)
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


def sampler_contract(dev: torch.device, v: int, seeds: int) -> bool:
    """Triton (compiled) vs torch reference on ``dev``: identical tokens, logprobs to 1e-4."""
    from alignserve.kernels.guided_sample import LogitAdjust, guided_sample

    print(f"\n## Triton sampler vs torch reference on {dev}, V={v}\n\n"
          "| case | rows | token mismatches | max abs logprob diff |\n|---|---|---|---|")
    ok = True
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        b, h, k = 48, 2, 9
        logits = torch.randn(b, v, generator=g) * 3
        logits[torch.rand(b, v, generator=g) < 0.05] = float("-inf")
        temp = torch.rand(b, generator=g) * 1.3 + 0.2
        temp[::4] = 0.0  # greedy rows mixed in
        cand = torch.randint(0, v, (b, k), generator=g)
        cand[:, -2:] = -1
        j = 6
        adjust = LogitAdjust(ids=torch.randperm(v, generator=g)[: b * j].view(b, j),
                             counts=torch.randint(0, 3, (b, j), generator=g).float(),
                             seen=torch.rand(b, j, generator=g) < 0.5,
                             bias=torch.randn(b, j, generator=g),
                             presence=torch.rand(b, generator=g),
                             frequency=torch.rand(b, generator=g),
                             repetition=torch.rand(b, generator=g) + 0.8)
        restrict = torch.rand(b, generator=g) < 0.3
        half = torch.rand(b, generator=g) < 0.5
        case = dict(logits=logits, weights=torch.rand(b, h, generator=g) * 2 - 0.5,
                    dense=torch.randn(b, h, v, generator=g),
                    cand_scores=torch.randn(b, h, k, generator=g),
                    cand_ids=cand, temperature=temp,
                    top_k=torch.where(half, torch.randint(2, 200, (b,), generator=g),
                                      torch.zeros(b, dtype=torch.long)),
                    top_p=torch.where(~half, torch.rand(b, generator=g) * 0.7 + 0.25,
                                      torch.ones(b)),
                    noise_seed=torch.randint(0, 2**31, (b,), generator=g))
        variants = {"dense+cands": {}, "+adjust+restrict": {"adjust": adjust, "restrict": restrict}}
        for name, extra in variants.items():
            moved = {key: (val.to(dev) if isinstance(val, torch.Tensor) else val)
                     for key, val in {**case, **extra}.items()}
            if "adjust" in moved:
                a = moved["adjust"]
                moved["adjust"] = LogitAdjust(**{f: getattr(a, f).to(dev) for f in (
                    "ids", "counts", "seen", "bias", "presence", "frequency", "repetition")})
            ref = guided_sample(**moved, n_top=5, backend="torch")
            out = guided_sample(**moved, n_top=5, backend="triton")
            bad = int((ref.tokens != out.tokens).sum()) + int((ref.top_ids != out.top_ids).sum())
            diff = max(float((ref.logprobs - out.logprobs).abs().max()),
                       float((ref.base_logprobs - out.base_logprobs).abs().max()))
            ok &= bad == 0 and diff <= 1e-4
            print(f"| seed {seed} {name} | {b} | {bad} | {diff:.1e} |")
    print(f"\ncontract {'HOLDS' if ok else 'BROKEN'}")
    return ok


def ensure_weights(model_dir: Path) -> None:
    """Write seeded random weights in the model's own shapes when ``model_dir`` has none."""
    from safetensors.torch import save_file

    if any(model_dir.glob("*.safetensors")):
        return
    cfg = ModelConfig.from_hf(json.loads((model_dir / "config.json").read_text()))
    torch.manual_seed(0)
    m = CausalLM(cfg, rope_len=16)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    tmp = model_dir / "model.safetensors.partial"  # renamed when complete: never half a file
    save_file({k: t.contiguous() for k, t in m.state_dict().items()}, str(tmp))
    tmp.replace(model_dir / "model.safetensors")


def engine_check(dev: torch.device, model_dir: Path, tokens: int) -> bool:
    """Every strategy through the real Engine on ``dev`` with the package's default heads."""
    from alignserve.decoders import build_decoder
    from alignserve.engine.sampling import SamplingParams
    from alignserve.engine.scheduler import Engine, EngineConfig, EngineRequest
    from alignserve.value_models.heads import tokenizer_fingerprint
    from alignserve.value_models.registry import Registry

    ensure_weights(model_dir)
    t0 = time.perf_counter()
    eng = Engine(EngineConfig(model_dir=model_dir, slots=96, max_len=256, device=str(dev)))
    reg = Registry.build(None, tokenizer_fingerprint(eng.tokenizer),
                         eng.base.config.hidden_size, default_heads=True)
    print(f"\n## Engine on {dev}: {model_dir.name}, heads {sorted(reg.heads)}, "
          f"loaded in {time.perf_counter() - t0:.1f} s\n\n"
          "| request | tokens | s | ok |\n|---|---|---|---|")
    specs: dict[str, dict | None] = {
        "plain": None,
        "best_of_n concise n4": {"strategy": "best_of_n", "n": 4, "weights": {"concise": 1}},
        "args concise": {"strategy": "args", "top_k": 5, "weights": {"concise": 1}},
        "vas tree concise": {"strategy": "vas", "top_k": 8, "values": "tree",
                             "weights": {"concise": 3}},
        "vas q concise": {"strategy": "vas", "values": "q", "weights": {"concise": 3}},
        "cd q concise": {"strategy": "cd", "values": "q", "weights": {"concise": 3}},
        "cd tree concise": {"strategy": "cd", "top_k": 8, "values": "tree",
                            "weights": {"concise": 3}},
        "cd_block concise": {"strategy": "cd_block", "weights": {"concise": 1}},
        "genarm concise": {"strategy": "genarm", "weights": {"concise": 1}},
        "genarm concise unnormalised": {"strategy": "genarm", "weights": {"concise": 1},
                                        "normalize": False},
        "transfer_qstar concise": {"strategy": "transfer_qstar", "weights": {"concise": 1}},
        "deal concise": {"strategy": "deal", "weights": {"concise": 1}},
        "vas weight 0": {"strategy": "vas", "top_k": 8, "values": "tree",
                         "weights": {"concise": 0}},
        "genarm weight 0": {"strategy": "genarm", "weights": {"concise": 0}},
    }
    text = eng.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Describe a kitchen table in one sentence."}],
        add_generation_prompt=True, tokenize=False)
    ids = eng.tokenizer(text, add_special_tokens=False).input_ids

    def one(item: tuple[str, dict | None]) -> tuple[str, dict | str, float]:
        name, spec = item
        t1 = time.perf_counter()
        try:
            res = eng.generate(EngineRequest(
                prompt_ids=ids, prompt_text=text, resources=reg,
                decoder=build_decoder(spec, registry=reg),
                params=SamplingParams(temperature=1.0, max_tokens=tokens, seed=7,
                                      ignore_eos=True)), timeout=300)
            return name, res, time.perf_counter() - t1
        except Exception:  # noqa: BLE001 - reported in the table, traceback below it
            return name, traceback.format_exc(), time.perf_counter() - t1

    ok = True
    with cf.ThreadPoolExecutor(len(specs)) as ex:
        results = list(ex.map(one, specs.items()))
    texts = {}
    for name, res, secs in results:
        good = isinstance(res, dict)
        ok &= good
        n_tok = res["completion_tokens"] if good else 0
        texts[name] = res["choices"][0]["tokens"] if good else None
        print(f"| {name} | {n_tok} | {secs:.1f} | {'yes' if good else 'FAILED'} |")
    for name, res, _ in results:
        if not isinstance(res, dict):
            print(f"\n{name} failed:\n{res}")
    for zero in ("vas weight 0", "genarm weight 0"):
        same = texts[zero] is not None and texts[zero] == texts["plain"]
        ok &= same
        print(f"{zero} reproduces plain: {'yes' if same else 'NO'}")
    eng.shutdown()
    print(f"\nengine check {'PASSED' if ok else 'FAILED'}")
    return ok


def train_check(dev: torch.device, model_dir: Path) -> bool:
    """``alignserve train`` value (pooled), value on an 8-layer backbone, Q-head and ARM for
    ``concise`` on ``dev``, tiny sizes, through the CLI; each must exit 0 and write a head.
    Samples and heads go to a fresh temporary folder, so nothing cached by an earlier run (on
    another device) is reused."""
    ensure_weights(model_dir)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_train_"))
    try:
        return _train_runs(dev, model_dir, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _train_runs(dev: torch.device, model_dir: Path, work: Path) -> bool:
    common = ["--reward", "concise", "--model", str(model_dir), "--prompts", "16",
              "--val-prompts", "8", "--samples", "4", "--max-new-tokens", "12", "--epochs", "2",
              "--run-dir", str(work / "run"), "--device", dev.type, "--slots", "16",
              "--no-progress"]
    runs = {
        "value pooled": ["value", "--pool", "mean", "--out", str(work / "concise_value")],
        "value backbone 8": ["value", "--backbone-layers", "8",
                             "--out", str(work / "concise_bb_value")],
        "q": ["q", "--value-head", str(work / "concise_value"), "--out", str(work / "concise_q")],
        "arm": ["arm", "--out", str(work / "concise_arm")],
    }
    print(f"\n## alignserve train on {dev}\n\n| head | s | result |\n|---|---|---|")
    ok = True
    for name, argv in runs.items():
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "alignserve.cli", "train", *argv, *common],
                             capture_output=True, text=True)
        lines = (out.stdout + out.stderr).strip().splitlines()
        good = out.returncode == 0 and (Path(argv[-1]) / "manifest.json").is_file()
        ok &= good
        last = next((x for x in reversed(lines) if "saved" in x), lines[-1] if lines else "")
        print(f"| {name} | {time.perf_counter() - t0:.0f} | "
              f"{last[:160] if good else 'FAILED rc=' + str(out.returncode)} |")
        if not good:
            print("\n```\n" + "\n".join(lines[-25:]) + "\n```\n")
    return ok


def section(name: str, fn: Callable[[], object]) -> bool:
    """Run one table; a failure prints its traceback and the script goes on."""
    t0 = time.perf_counter()
    try:
        res = fn()
    except Exception:  # noqa: BLE001 - the other sections still run
        print(f"\n## {name}: FAILED\n\n```\n{traceback.format_exc()}```")
        return False
    print(f"({name}: {time.perf_counter() - t0:.0f} s)", flush=True)
    return res is not False


SECTIONS = ("contract", "kernel", "engine", "train", "decode")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda",
                    help="torch device (default cuda; cpu for a smoke run with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, for a CPU smoke run")
    ap.add_argument("--model-dir", type=Path, default=None,
                    help="model folder for the engine and train sections (config.json + "
                         "tokenizer; random weights are written there when it has no "
                         "*.safetensors); default: skip those sections")
    ap.add_argument("--profile", action="store_true",
                    help="also print torch.profiler tables for the sampler at B=1 and the 1B "
                         "model's decode and VAS steps at batch 1")
    ap.add_argument("--sections", default="",
                    help=f"comma-separated subset to run, of {', '.join(SECTIONS)} (default: "
                         "all that apply)")
    args = ap.parse_args(argv)
    want = {x.strip() for x in args.sections.split(",") if x.strip()} or None
    if want and want - set(SECTIONS):
        ap.error(f"--sections: unknown {sorted(want - set(SECTIONS))}; known: {list(SECTIONS)}")
    if want and {"engine", "train"} & want and args.model_dir is None:
        ap.error("--sections engine / train need --model-dir")
    if want == {"contract"} and args.tiny:
        ap.error("--sections contract does not run with --tiny (it needs the compiled kernel)")
    if args.model_dir is not None:
        md = args.model_dir
        if not (md / "config.json").is_file():
            ap.error(f"--model-dir {md}: no config.json there")
        if not any((md / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            ap.error(f"--model-dir {md}: no tokenizer.json / tokenizer_config.json there")
    try:
        dev = torch.device(args.device)
    except RuntimeError as exc:
        ap.error(f"--device {args.device!r}: {exc}")
    if dev.type != "cuda" and not args.tiny and (want is None or want & {"contract", "decode"}):
        ap.error(f"--device {args.device}: the contract and decode sections need CUDA (the "
                 "compiled kernel, 1B/8B shapes); on a CPU use --tiny, or --sections kernel, "
                 "engine or train")
    if dev.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here (for a CPU smoke run: --device cpu --tiny)")
    t0 = time.perf_counter()

    def run(name: str, fn: Callable[[], object]) -> None:
        if want is None or name.split()[0] in want:
            ok.append(section(name, fn))

    ok: list[bool] = []
    if args.tiny:
        run("kernel", lambda: kernel_table(dev, 4096, [1, 8], prof=args.profile))
        run("decode tiny", lambda: decode_tables("tiny", dev, torch.float32, [1, 4], prompt=16,
                                                 new=6, prof=args.profile))
    else:
        run("contract", lambda: sampler_contract(dev, 128256, 3))
        run("kernel", lambda: kernel_table(dev, 128256, [1, 8, 64, 256], prof=args.profile))
    if args.model_dir:
        run("engine", lambda: engine_check(dev, args.model_dir, 8 if args.tiny else 24))
        run("train", lambda: train_check(dev, args.model_dir))
    if not args.tiny:
        for shape in ("1b", "8b"):
            run(f"decode {shape}", lambda shape=shape: decode_tables(
                shape, dev, torch.bfloat16, [1, 32, 128], prompt=128, new=48,
                prof=args.profile and shape == "1b"))
    print(f"\n(total {time.perf_counter() - t0:.0f} s; {sum(ok)} of {len(ok)} sections passed)")
    return 0 if ok and all(ok) else 1


if __name__ == "__main__":
    raise SystemExit(main())
