"""Count answers that glue words together without a space, per setting of a frontier run.

A whitespace word count (the ``concise`` reward) does not see words joined by punctuation, so
a concise-guided answer can reach "30 words" by writing ``…whensaying,talking,…``. This script
counts, per setting of ``bench/frontier.py``'s ``answers.jsonl``, the answers in which a
lowercase letter, one of ``, . ; : ! ?`` and a letter follow each other with no space (a
heuristic: "e.g." counts too).

Usage: ``python bench/glued_words.py runs/frontier_concise_endpairs/answers.jsonl``
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict

GLUED = re.compile(r"[a-z][,.;:!?][A-Za-z]")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("answers", help="answers.jsonl written by bench/frontier.py")
    args = ap.parse_args()
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    try:
        f = open(args.answers)
    except OSError as exc:
        raise SystemExit(f"error: {exc}") from None
    with f:
        for line in f:
            row = json.loads(line)
            c = counts[f"{row['objective']} | {row['setting']}"]
            text = row.get("text") or ""
            c[0] += 1
            c[1] += bool(GLUED.search(text))
            c[2] += len(text.split())
    print("| objective / setting | answers | with a glued word | words (mean) |")
    print("|---|---|---|---|")
    for name, (n, glued, words) in counts.items():
        print(f"| {name} | {n} | {glued} ({glued / n:.0%}) | {words / n:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
