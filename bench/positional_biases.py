"""Print a positional lexical ARM's logit bias per position bucket (README, Positional lexical
ARMs): for every bucket (for ``word_starts``, the words started so far), the bias of ending the
text, the median bias of a token that starts a word and of any other token.

Usage: ``python bench/positional_biases.py [HEAD_DIR]`` (default: the shipped
``concise_lex_arm``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main() -> int:
    from alignserve.value_models.heads import HeadError, default_heads_dir, load_head

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("head", nargs="?", default=str(default_heads_dir() / "concise_lex_arm"),
                    help="a positional lexical ARM's folder (default: the shipped "
                         "concise_lex_arm)")
    try:
        head = load_head(Path(ap.parse_args().head))
    except (HeadError, OSError) as exc:
        raise SystemExit(f"error: {exc}") from None
    arm = head.module.eval()
    if not getattr(arm, "positions", 0):
        raise SystemExit(f"error: {head.name} is not a positional lexical ARM")
    ends = torch.nonzero(arm.end)[:, 0]
    starts = arm.counted(torch.arange(arm.table.shape[0])) > 0.5  # the counted feature
    print(f"{head.name}: logit bias per bucket (alpha 1)")
    print("| bucket | end of text | a word start (median) | any other token (median) |")
    print("|---|---|---|---|")
    with torch.no_grad():
        for p in range(arm.positions):
            b = arm.position_bias(p)
            print(f"| {p} | {b[ends].max():+.1f} | {b[starts].median():+.1f} | "
                  f"{b[~starts & (arm.end == 0)].median():+.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
