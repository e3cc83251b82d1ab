"""Word counts of GenARM answers to short prompts over seeds (README, Positional lexical ARMs).

A concise ARM trained toward 30 words shapes short answers too; this prints, for each prompt,
seed and weight, the answer's word count and its start, with the shipped heads in-process
(chat template, temperature 0.7, ``max_tokens`` 48, no repeat ban — as a plain chat request).

Usage: ``python bench/short_answers.py [--head concise_lex_arm] [--weights 0,0.2,0.3]
[--seeds 1,2,3,4,5] [PROMPT ...]`` (default prompts: "Hi", "Answer yes or no: is the sky
blue?").
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("prompts", nargs="*", default=["Hi", "Answer yes or no: is the sky blue?"])
    ap.add_argument("--head", default="concise_lex_arm", help="a GenARM head (an ARM)")
    ap.add_argument("--weights", default="0,0.2,0.3", help="alphas, comma-separated")
    ap.add_argument("--seeds", default="1,2,3,4,5", help="seeds, comma-separated")
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args()
    from alignserve.decoders import build_decoder
    from alignserve.engine.model_store import resolve_model
    from alignserve.engine.sampling import SamplingParams
    from alignserve.engine.scheduler import Engine, EngineConfig, EngineRequest
    from alignserve.value_models.heads import tokenizer_fingerprint
    from alignserve.value_models.registry import Registry

    weights = [float(w) for w in args.weights.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    eng = Engine(EngineConfig(model_dir=resolve_model(None, progress=False), slots=32,
                              max_len=512))
    try:
        tok = eng.tokenizer
        reg = Registry.build(None, tokenizer_fingerprint(tok), eng.base.config.hidden_size,
                             default_heads=True)
        jobs = [(p, w, s) for p in args.prompts for w in weights for s in seeds]

        def one(job: tuple[str, float, int]) -> str:
            p, w, s = job
            text = tok.apply_chat_template([{"role": "user", "content": p}],
                                           add_generation_prompt=True, tokenize=False)
            dec = build_decoder({"strategy": "genarm", "weights": {args.head: w}}, registry=reg)
            out = eng.generate(EngineRequest(
                prompt_ids=tok(text, add_special_tokens=False).input_ids, prompt_text=text,
                decoder=dec, resources=reg,
                params=SamplingParams(temperature=0.7, max_tokens=args.max_tokens, seed=s)))
            return out["choices"][0]["text"]

        with cf.ThreadPoolExecutor(16) as ex:
            texts = list(ex.map(one, jobs))
    finally:
        eng.shutdown()
    print(f"| prompt | {args.head} alpha | seed | words | answer (start) |")
    print("|---|---|---|---|---|")
    for (p, w, s), t in zip(jobs, texts):
        print(f"| {p} | {w:g} | {s} | {len(t.split())} | {t[:70]!r} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
