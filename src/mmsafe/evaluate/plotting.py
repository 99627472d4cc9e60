"""Shared drawing for report plots: percent axes, interval bars, a forest plot of differences.

Every plot is written twice, as a 200 dpi PNG and as an SVG beside it (same stem). Text is
never read as mathtext or TeX, so a ``$`` in a model name is drawn as it is. Bars of 0%
stay visible (a thin marker at the axis with the value printed); the axis runs to 110% so
a bar at 100% with its label is not clipped; each bar's label says its n.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.typing import RcKeyType

DPI = 200
#: Text is drawn as paths in the SVG (no font needed to view it, and no name lands in markup).
_STYLE: dict[RcKeyType, Any] = {
    "text.parse_math": False,
    "text.usetex": False,
    "svg.fonttype": "path",
    "svg.hashsalt": "mmsafe",
    "axes.spines.top": False,
    "axes.spines.right": False,
}
PALETTE = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#eeca3b", "#9d755d")


@dataclass(frozen=True)
class Bar:
    """One bar: a rate in [0, 1] (None: no items), its interval and n."""

    label: str
    rate: float | None
    low: float | None
    high: float | None
    n: int


LABEL_LIMIT = 40


def short(text: str, limit: int = LABEL_LIMIT) -> str:
    """A label of at most ``limit`` characters per line (a long name ends in an ellipsis)."""
    return "\n".join(line if len(line) <= limit else line[: limit - 1] + "…" for line in str(text).splitlines() or [""])


def bar_from_rate(label: str, rate: Mapping[str, Any]) -> Bar:
    value = rate.get("rate")
    if value is None or not rate.get("total") or (isinstance(value, float) and math.isnan(value)):
        return Bar(label, None, None, None, int(rate.get("total") or 0))
    return Bar(label, float(value), float(rate["low"]), float(rate["high"]), int(rate["total"]))


@contextlib.contextmanager
def figure_style() -> Iterator[Any]:
    """``matplotlib.pyplot`` (Agg) under the report style; text is plain text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with matplotlib.rc_context(_STYLE):
        yield plt


def save_figure(plt: Any, figure: Any, png_path: Path) -> list[Path]:
    """Write ``png_path`` (200 dpi) and the SVG beside it; return both paths."""
    svg_path = png_path.with_suffix(".svg")
    figure.tight_layout()
    figure.savefig(png_path, dpi=DPI)
    figure.savefig(svg_path, metadata={"Date": None})
    plt.close(figure)
    return [png_path, svg_path]


def percent_axis(axis: Any, which: str = "y") -> None:
    """0-100% ticks with headroom to 110% (room for a label over a 100% bar)."""
    from matplotlib.ticker import FixedLocator, PercentFormatter

    target = axis.yaxis if which == "y" else axis.xaxis
    (axis.set_ylim if which == "y" else axis.set_xlim)(0, 1.12)
    target.set_major_locator(FixedLocator([0, 0.25, 0.5, 0.75, 1.0]))
    target.set_major_formatter(PercentFormatter(1.0, decimals=0))
    axis.grid(axis=which, alpha=0.3)


def draw_bars(
    axis: Any, bars: Sequence[Bar], positions: Sequence[float], width: float, color: str, label: str | None = None
) -> None:
    """Bars with Wilson interval whiskers; 0% as a thin marker; the value and n printed above."""
    for bar, x in zip(bars, positions, strict=True):
        if bar.rate is None or bar.low is None or bar.high is None:
            axis.text(x, 0.02, "n/a\n(no items)", ha="center", va="bottom", fontsize=6, color="#666")
            continue
        axis.bar(x, bar.rate, width, color=color, label=label)
        label = None  # one legend entry per series
        if bar.rate == 0:
            axis.plot([x - width / 2, x + width / 2], [0.004, 0.004], color=color, linewidth=2.5, solid_capstyle="butt")
        axis.errorbar(
            x,
            bar.rate,
            yerr=[[max(0.0, bar.rate - bar.low)], [max(0.0, bar.high - bar.rate)]],
            fmt="none",
            ecolor="#222",
            elinewidth=0.8,
            capsize=2.5,
        )
        axis.text(
            x, min(bar.high, 1.0) + 0.015, f"{100 * bar.rate:.1f}%\nn={bar.n}", ha="center", va="bottom", fontsize=6
        )


@dataclass(frozen=True)
class Difference:
    """One paired difference (B - A) in [-1, 1] with its bootstrap interval."""

    label: str
    value: float | None
    low: float | None
    high: float | None
    n: int
    p: float | None


def forest_plot(plt: Any, differences: Sequence[Difference], title: str, xlabel: str) -> Any:
    """Each difference as a point with its interval, one row each, and the zero line."""
    figure, axis = plt.subplots(figsize=(7.0, 1.2 + 0.45 * len(differences)))
    for row, difference in enumerate(reversed(differences)):
        if difference.value is None or difference.low is None or difference.high is None:
            axis.text(0, row, "n/a (no items)", ha="center", va="center", fontsize=7, color="#666")
            continue
        axis.errorbar(
            100 * difference.value, row,
            xerr=[[100 * max(0.0, difference.value - difference.low)], [100 * max(0.0, difference.high - difference.value)]],
            fmt="o", color=PALETTE[0], capsize=3, markersize=5,
        )  # fmt: skip
        p = "n/a" if difference.p is None else ("< 0.001" if difference.p < 0.001 else f"{difference.p:.3f}")
        axis.annotate(
            f"{100 * difference.value:+.1f} pts, n={difference.n}, p={p}",
            (1.0, row),
            xycoords=("axes fraction", "data"),
            xytext=(4, 0),
            textcoords="offset points",
            va="center",
            fontsize=7,
        )
    axis.axvline(0, color="#444", linewidth=0.8, linestyle="--")
    axis.set_yticks(
        range(len(differences)), [short(difference.label) for difference in reversed(differences)], fontsize=7
    )
    axis.set_ylim(-0.7, len(differences) - 0.3)
    axis.set_xlim(-105, 105)
    axis.set_xlabel(xlabel)
    axis.set_title(title, fontsize=9)
    axis.grid(axis="x", alpha=0.3)
    return figure
