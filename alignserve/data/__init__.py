"""Prompt sets used to evaluate and tune decoding-time alignment strategies.

The written prompts live next to this file in ``prompts.jsonl`` so that they ship with the
package; see :mod:`alignserve.data.prompts` for loading and the fixed train/validation/test
splits.
"""

from alignserve.data.prompts import (
    CATEGORIES,
    SPLITS,
    SUITES,
    Prompt,
    assign_split,
    load_prompts,
    split_counts,
)

__all__ = [
    "CATEGORIES",
    "SPLITS",
    "SUITES",
    "Prompt",
    "assign_split",
    "load_prompts",
    "split_counts",
]
