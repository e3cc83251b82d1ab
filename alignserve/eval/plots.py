"""Report figures: reward vs KL (the alignment frontier) and reward vs compute.

The figures are drawn with matplotlib's object-oriented API on an Agg canvas, never through
``pyplot``: that needs no display, does not change the process-wide backend, and keeps no
global figure state, so plotting is safe inside the server or from several threads.

Both functions take ``results``: a list of dicts, one per (strategy, setting), with keys
``strategy``, ``setting``, ``reward``, ``reward_lo``, ``reward_hi`` (95% CI), ``kl`` and
``tokens_per_returned``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
_REQUIRED = ("strategy", "setting", "reward", "reward_lo", "reward_hi", "kl")


def _check(results: Sequence[Mapping[str, Any]], extra: tuple[str, ...] = ()) -> None:
    """Fail early with the missing key's name instead of a KeyError deep inside matplotlib."""
    for i, row in enumerate(results):
        missing = [k for k in (*_REQUIRED, *extra) if k not in row]
        if missing:
            raise ValueError(f"results[{i}] is missing keys {missing}")


def _by_strategy(results: Iterable[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Group rows by strategy, keeping first-seen order so colours are stable across runs."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in results:
        groups.setdefault(str(row["strategy"]), []).append(row)
    return groups


def _yerr(rows: Sequence[Mapping[str, Any]]) -> list[list[float]]:
    """Asymmetric error-bar lengths [below, above] from the CI bounds (clipped at 0)."""
    below = [max(float(r["reward"]) - float(r["reward_lo"]), 0.0) for r in rows]
    above = [max(float(r["reward_hi"]) - float(r["reward"]), 0.0) for r in rows]
    return [below, above]


def _bon_points(bon_curve: Iterable[Any]) -> list[tuple[int, float, float]]:
    """Normalise Best-of-N points to (n, kl, reward).

    Each point may be a mapping with keys ``n``, ``kl``, ``reward`` or an ``(n, kl, reward)``
    tuple; the KL is typically :func:`alignserve.eval.metrics.bon_kl_bound` of n.
    """
    points: list[tuple[int, float, float]] = []
    for p in bon_curve:
        if isinstance(p, Mapping):
            points.append((int(p["n"]), float(p["kl"]), float(p["reward"])))
        else:
            n, kl, reward = p
            points.append((int(n), float(kl), float(reward)))
    return sorted(points, key=lambda t: t[0])


def _save(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as PNG, creating parent folders."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out, format="png", dpi=150)
    return out


def plot_reward_vs_kl(
    results: Sequence[Mapping[str, Any]],
    bon_curve: Iterable[Any],
    path: str | Path,
    xlabel: str = "KL(policy || base) per response [nats]",
) -> Path:
    """Plot mean reward against KL(pi || base), one labelled point per strategy/setting.

    Points further up and to the left buy more reward for less drift from the base model.
    Best-of-N is drawn as a line (each point annotated with its N) because it is the usual
    reference frontier: a decoder below it is dominated by simply sampling N and reranking.

    Args:
        results: rows as described in the module docstring (``tokens_per_returned`` unused).
        bon_curve: Best-of-N points, mappings ``{"n", "kl", "reward"}`` or ``(n, kl, reward)``
            tuples; may be empty.
        path: where to write the PNG.
        xlabel: axis label, so callers can say how the KL was estimated.

    Returns:
        The path written.
    """
    _check(results)
    fig = Figure(figsize=(8, 5.5), layout="constrained")
    ax = fig.add_subplot()
    bon = _bon_points(bon_curve)
    if bon:
        ax.plot(
            [p[1] for p in bon], [p[2] for p in bon], "--", color="0.35", marker=".",
            label="Best-of-N", zorder=1,
        )
        for n, kl, reward in bon:
            ax.annotate(
                f"N={n}", (kl, reward), textcoords="offset points", xytext=(4, -11),
                fontsize=8, color="0.35",
            )
    for i, (strategy, rows) in enumerate(_by_strategy(results).items()):
        ax.errorbar(
            [float(r["kl"]) for r in rows], [float(r["reward"]) for r in rows],
            yerr=_yerr(rows), fmt=_MARKERS[i % len(_MARKERS)], color=f"C{i % 10}",
            capsize=3, markersize=7, label=strategy, zorder=2,
        )
        for r in rows:
            ax.annotate(
                str(r["setting"]), (float(r["kl"]), float(r["reward"])),
                textcoords="offset points", xytext=(5, 5), fontsize=8, color=f"C{i % 10}",
            )
    ax.margins(x=0.08, y=0.08)  # room for the point labels at the edges
    ax.set_title("Reward vs KL from the base model (error bars: 95% CI)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("Mean reward")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(title="Strategy", fontsize=9)
    return _save(fig, path)


def plot_reward_vs_compute(
    results: Sequence[Mapping[str, Any]],
    path: str | Path,
    xlabel: str = "Tokens generated per returned token (log scale)",
) -> Path:
    """Plot mean reward against compute per returned token, on a log x axis.

    Strategies differ by orders of magnitude in cost (Best-of-16 generates 16x the tokens,
    token-level guidance adds value-model forwards per token), so the x axis is logarithmic.
    Each strategy's settings are joined in order of compute to show its reward/compute curve.

    Args:
        results: rows as described in the module docstring; ``tokens_per_returned`` is the x
            value (total tokens, or guidance forwards, per token returned to the user) and
            must be > 0 for the log scale. ``kl`` is unused.
        path: where to write the PNG.
        xlabel: axis label, so callers can say which compute measure they passed.

    Returns:
        The path written.
    """
    _check(results, extra=("tokens_per_returned",))
    for i, row in enumerate(results):
        if float(row["tokens_per_returned"]) <= 0:
            raise ValueError(f"results[{i}]['tokens_per_returned'] must be > 0 for a log axis")
    fig = Figure(figsize=(8, 5.5), layout="constrained")
    ax = fig.add_subplot()
    for i, (strategy, rows) in enumerate(_by_strategy(results).items()):
        rows = sorted(rows, key=lambda r: float(r["tokens_per_returned"]))
        xs = [float(r["tokens_per_returned"]) for r in rows]
        ys = [float(r["reward"]) for r in rows]
        ax.errorbar(
            xs, ys, yerr=_yerr(rows), fmt=_MARKERS[i % len(_MARKERS)] + "-",
            color=f"C{i % 10}", capsize=3, markersize=7, label=strategy,
        )
        for r, x, y in zip(rows, xs, ys, strict=True):
            ax.annotate(
                str(r["setting"]), (x, y), textcoords="offset points", xytext=(5, 5),
                fontsize=8, color=f"C{i % 10}",
            )
    ax.set_xscale("log")
    ax.margins(x=0.08, y=0.08)
    # Plain numbers ("2", "16") read better than "10^0"; label minor ticks too when the data
    # span less than two decades, otherwise the axis would show at most one or two labels.
    plain = FuncFormatter(lambda v, _pos: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    xs_all = [float(r["tokens_per_returned"]) for r in results]
    narrow = bool(xs_all) and max(xs_all) / min(xs_all) < 100
    ax.xaxis.set_minor_formatter(plain if narrow else NullFormatter())
    ax.set_title("Reward vs compute (error bars: 95% CI)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("Mean reward")
    ax.grid(True, which="both", alpha=0.3)
    if results:
        ax.legend(title="Strategy", fontsize=9)
    return _save(fig, path)
