"""Does a per-token lexical ARM's held-out accuracy come from a length preference?

A ``"token"`` lexical ARM's reward is sum_t b(y_t); its learned offset is a reward per token,
which ranks answers of different lengths but cancels in GenARM's per-step softmax. This prints
the shipped lexical ARMs' pairwise accuracy on the validation pairs of the shipped sample cache
(the manifest's: margin 0.1 reward standard deviations) over all pairs and over the pairs whose
answers have the same length, where the offset cancels as it does while decoding.

    python bench/arm_equal_length.py [--run-dir runs/train] [--heads DIR]

Needs the sample cache of ``alignserve train all`` (validation split); ~1 min on 2 cores.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from alignserve.value_models import training as T
from alignserve.value_models.heads import default_heads_dir, load_head


def accuracy(reward: torch.Tensor, pairs: list[tuple[int, int]]) -> float:
    """Fraction of (winner, loser) pairs the reward orders right."""
    return sum(float(reward[w] > reward[lo]) for w, lo in pairs) / max(len(pairs), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", default="runs/train", help="the sample cache (runs/train)")
    ap.add_argument("--heads", default=None, help="heads folder (default: the shipped ones)")
    a = ap.parse_args()
    heads = Path(a.heads) if a.heads else default_heads_dir()
    print("| ARM | pairs | accuracy | equal-length pairs | accuracy on them |")
    print("|---|---|---|---|---|")
    for name in ("sentiment_lex_arm", "non_toxic_lex_arm"):
        cfg = next(c for c in T.shipped_configs("/tmp/unused", run_dir=a.run_dir,
                                                progress=False) if c.name == name).resolved()
        base = T.BaseModel(cfg.model, cfg.device, cfg.slots, cfg.threads)
        val = T.load_split(base, cfg, "validation", cfg.val_prompts,
                           T.parse_reward_spec(cfg.reward))
        head = load_head(heads / name)
        stats = head.manifest["reward_stats"]  # standardised as in training: margin in stds
        val.rewards = (val.rewards - stats["mean"]) / stats["std"]
        head = head.module
        pairs = T.preference_pairs(val, cfg.margin)
        T.lexical_arm_features(val, head.table, head.lexicon)
        with torch.no_grad():
            r = T.lexical_token_rewards(head, val, range(val.num_samples))
        n = val.lengths - 1
        same = [p for p in pairs if n[p[0]] == n[p[1]]]
        print(f"| `{name}` ({head.reward_form}) | {len(pairs)} | {accuracy(r, pairs):.3f} | "
              f"{len(same)} | {accuracy(r, same):.3f} |")


if __name__ == "__main__":
    main()
