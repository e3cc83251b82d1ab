"""Report figures: reward vs KL (the alignment frontier), reward vs compute, and a grid of
reward-vs-cost panels with a reference curve and a target region (``bench/frontier.py``).

The figures are drawn with matplotlib's object-oriented API on an Agg canvas, never through
``pyplot``: that needs no display, does not change the process-wide backend, and keeps no
global figure state, so plotting is safe inside the server or from several threads.

The first two take ``results``: a list of dicts, one per (strategy, setting), with keys
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


def plot_reward_vs_cost_grid(
    panels: Sequence[Sequence[Mapping[str, Any]]],
    path: str | Path,
    xlabel: str = "Wall time per answer ÷ plain sampling's (log scale)",
    reference_label: str = "Best-of-N",
) -> Path:
    """A grid of reward-vs-cost panels, each with a reference curve and a target region.

    ``panels[i][j]`` is the panel in row i, column j (e.g. rows = concurrency levels, columns =
    objectives), a mapping with

    * ``title``: the panel's title;
    * ``results``: rows with ``strategy``, ``label`` (short text next to the point), ``x`` (> 0,
      the cost), ``reward``, ``reward_lo``, ``reward_hi`` (95% CI); drawn as points with error
      bars, one colour and marker per strategy, the same in every panel;
    * ``reference``: points of the reference curve with ``label``, ``x``, ``reward`` (drawn as a
      dashed line joining them in the order given, e.g. Best-of-N for N = 1..16, each point
      labelled);
    * ``target`` (optional): ``{"x": x_max, "y": y_min, "label": str}``, shaded as the region
      x <= x_max, y >= y_min (e.g. Best-of-8's reward at half its cost), always in view;
    * ``ylim`` (optional): ``(lo, hi)`` the y axis never goes beyond (e.g. the reward's range).

    The x axis is logarithmic with plain-number ticks. One legend for the whole figure.

    Returns:
        The path written.

    Raises:
        ValueError: on an empty grid, a missing key or a non-positive x.
    """
    if not panels or not all(panels):
        raise ValueError("panels must be a non-empty grid")
    n_rows, n_cols = len(panels), max(len(r) for r in panels)
    colours: dict[str, int] = {}
    for row in panels:
        for p in row:
            for r in p["results"]:
                for k in ("strategy", "label", "x", "reward", "reward_lo", "reward_hi"):
                    if k not in r:
                        raise ValueError(f"panel {p.get('title')!r}: a result lacks {k!r}")
                if float(r["x"]) <= 0:
                    raise ValueError(f"panel {p.get('title')!r}: x must be > 0 for a log axis")
                colours.setdefault(str(r["strategy"]), len(colours))
    fig = Figure(figsize=(5.2 * n_cols, 4.4 * n_rows + 0.9), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    plain = FuncFormatter(lambda v, _pos: f"{v:g}")
    handles: dict[str, Any] = {}
    for i, row in enumerate(panels):
        for j in range(n_cols):
            ax = axes[i][j]
            if j >= len(row):
                ax.set_visible(False)
                continue
            p = row[j]
            ref = list(p.get("reference", []))  # joined in the order given (N = 1, 2, 4...)
            if ref:
                (line,) = ax.plot([float(r["x"]) for r in ref], [float(r["reward"]) for r in ref],
                                  "--", color="0.35", marker=".", zorder=1)
                handles.setdefault(reference_label, line)
                for r in ref:
                    ax.annotate(str(r["label"]), (float(r["x"]), float(r["reward"])),
                                textcoords="offset points", xytext=(4, -11), fontsize=7,
                                color="0.35")
            tgt = p.get("target")
            for strategy, rows in _by_strategy(p["results"]).items():
                c = colours[strategy]
                h = ax.errorbar([float(r["x"]) for r in rows], [float(r["reward"]) for r in rows],
                                yerr=_yerr(rows), fmt=_MARKERS[c % len(_MARKERS)],
                                color=f"C{c % 10}", capsize=2, markersize=6, zorder=2)
                handles.setdefault(strategy, h)
                for r in rows:
                    if r["label"]:
                        ax.annotate(str(r["label"]), (float(r["x"]), float(r["reward"])),
                                    textcoords="offset points", xytext=(4, 4), fontsize=7,
                                    color=f"C{c % 10}")
            ax.set_xscale("log")
            ax.margins(x=0.12, y=0.1)
            if p.get("ylim"):  # e.g. the reward's range, so one wide interval cannot squash all
                lo, hi = (float(v) for v in p["ylim"])
                y0, y1 = ax.get_ylim()
                ax.set_ylim(max(y0, lo), min(y1, hi))
            if tgt:  # shade after autoscaling so the region reaches the panel's edges
                x_max, y_min = float(tgt["x"]), float(tgt["y"])
                x0, _ = ax.get_xlim()
                x0 = min(x0, x_max / 1.25)  # the region is always in view
                _, y1 = ax.get_ylim()
                patch = ax.fill_between([x0, x_max], y_min, max(y1, y_min), color="tab:green",
                                        alpha=0.15, zorder=0, linewidth=0)
                handles.setdefault(str(tgt.get("label", "target")), patch)
                ax.set_xlim(left=x0)
                ax.set_ylim(top=max(y1, y_min))
            ax.xaxis.set_major_formatter(plain)
            lo_x, hi_x = ax.get_xlim()
            wide = hi_x / lo_x > 10  # over a decade: label minor ticks 2 and 5 only
            ax.xaxis.set_minor_formatter(FuncFormatter(
                lambda v, _pos, wide=wide: f"{v:g}" if not wide
                or f"{v:.0e}"[0] in "25" else ""))
            ax.tick_params(axis="x", which="both", labelsize=7)
            ax.set_title(str(p["title"]), fontsize=10)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_ylabel("Mean reward (95% CI)", fontsize=8)
            ax.grid(True, which="both", alpha=0.3)
    if handles:
        ncol = max(1, min(len(handles), int(5.2 * n_cols // 2.6)))
        fig.legend(list(handles.values()), list(handles), loc="outside lower center",
                   ncol=ncol, fontsize=8)
    return _save(fig, path)
