"""Evaluation helpers: figures of merit (``metrics``) and report figures (``plots``).

``plots`` is not imported here so that computing metrics never pulls in matplotlib.
"""

from alignserve.eval.metrics import (
    bon_kl_bound,
    coherence,
    degenerate_fraction,
    distinct_n,
    diversity,
    kl_from_logprobs,
    mean_ci95,
    win_rate,
)

__all__ = [
    "bon_kl_bound",
    "coherence",
    "degenerate_fraction",
    "distinct_n",
    "diversity",
    "kl_from_logprobs",
    "mean_ci95",
    "win_rate",
]
