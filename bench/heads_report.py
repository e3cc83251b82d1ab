"""Print the held-out quality of every shipped head as a Markdown table (from the manifests).

Usage: ``python bench/heads_report.py [HEADS_DIR]`` (default: the package's shipped heads).
The numbers are the ones the training run
measured on the validation prompts and wrote into each head's ``manifest.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _num(value: float | None, spec: str = ".2f") -> str:
    """A metric for the table; a missing or null one (undefined, e.g. no pair) reads n/a."""
    return "n/a" if value is None else format(value, spec)


def main(root: str | None = None) -> int:
    if root is None:
        from alignserve.value_models.heads import default_heads_dir

        root = str(default_heads_dir())
    if not Path(root).is_dir():
        print(f"error: {root} is not a folder of heads", file=sys.stderr)
        return 2
    rows = []
    manifests = sorted(Path(root).glob("*/manifest.json"))
    if not manifests:
        print(f"error: no heads in {root} (no */manifest.json)", file=sys.stderr)
        return 2
    unreadable = 0
    for mf in manifests:
        try:
            m = json.loads(mf.read_text())
            m["name"], m["kind"]  # noqa: B018 - every manifest names its head and kind
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"error: {mf}: not a head manifest ({type(exc).__name__}: {exc})",
                  file=sys.stderr)
            unreadable += 1
            continue
        met, tr = m.get("metrics") or {}, m.get("training") or {}
        if m["kind"] == "value":
            quality = (f"Spearman@25/50/75% {_num(met.get('spearman_25'))} / "
                       f"**{_num(met.get('spearman_50'))}** / "
                       f"{_num(met.get('spearman_75'))}")
            target = "Spearman@50% >= 0.6"
            ok = None if met.get("spearman_50") is None else met["spearman_50"] >= 0.6
        elif m["kind"] == "q":
            quality = (f"first-token pairwise acc vs the value head "
                       f"**{_num(met.get('first_token_pairwise_accuracy'))}** "
                       f"({_num(met.get('first_token_pairs'), 'd')} pairs), advantage Spearman "
                       f"{_num(met.get('spearman'))}; scale "
                       f"{_num(tr.get('calibration_scale', 1.0))}")
            target, ok = "", None  # no quality target: a cost lever (VAS / CD values "q")
        else:
            arch = m.get("arch", {})
            form = arch.get("reward_form", "increment") if "lexical" in arch else None
            of = {None: "", "increment": " of the increment over the base",
                  "token": " of the per-token reward"}[form]
            inc = (f"; the increment's {_num(met['delta_pairwise_accuracy'])}"
                   if form == "token" and "delta_pairwise_accuracy" in met else "")
            if "end_pairwise_accuracy" in met:  # --end-pairs: answers vs their prefixes, ended
                acc = met["end_pairwise_accuracy"]  # null when no held-out pair could be cut
                inc += (f"; answers against their own prefixes ended early "
                        f"{_num(acc, '.3f')}, "
                        f"{_num(met.get('end_pair_count'), 'd')} pairs")
            quality = (f"pairwise acc{of} "
                       f"**{_num(met.get('pairwise_accuracy'))}** "
                       f"(base alone {_num(met.get('base_pairwise_accuracy'))}, "
                       f"{_num(met.get('pairs'), 'd')} pairs{inc})")
            target = "accuracy >= 0.75"
            ok = (None if met.get("pairwise_accuracy") is None
                  else met["pairwise_accuracy"] >= 0.75)
        verdict = ("—" if not target else f"{target}: n/a" if ok is None
                   else f"{target}: " + ("met" if ok else "not met"))
        pool = m.get("arch", {}).get("pool", "none")
        method = tr.get("method", "genarm") + (f", pool {pool}" if pool != "none" else "")
        lexical = m.get("arch", {}).get("lexical")
        if lexical:  # reads per-token features of the answer, not model states
            method += f", lexical ({lexical['featurizer']})"
        if m.get("arch", {}).get("positions"):  # also the answer's position and end of text
            method += f", {m['arch']['positions']} positions"
            if tr.get("end_pairs"):
                n = tr["end_pairs"]
                method += ", end pairs every " + ("token" if n == 1 else f"{n} tokens")
        size = sum(f.stat().st_size for f in mf.parent.iterdir()) / 1024
        rows.append(f"| `{m['name']}` | {m['kind']} | {m.get('reward')} | {tr.get('suite')} "
                    f"{tr.get('prompts')}x{tr.get('samples')}x{tr.get('max_new_tokens')} | "
                    f"{method} | {quality} | "
                    f"{verdict} | "
                    f"{size:.0f} KB |")
    print("| head | kind | reward | data (suite prompts x samples x tokens) | method | "
          "held-out quality | target | size |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 1 if unreadable else 0


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Held-out quality of guidance heads, as a Markdown "
                                             "table, from their manifests.")
    ap.add_argument("heads_dir", nargs="?", default=None,
                    help="folder of head folders (default: the package's shipped heads)")
    raise SystemExit(main(ap.parse_args().heads_dir))
