"""The report's plots, each a 200 dpi PNG with an SVG beside it (see :mod:`mmsafe.evaluate.plotting`).

- ``rates``: each (model, judge) rate with its Wilson interval, n in the label;
- ``<judge>_by_<field>``: the rate per category, per model;
- ``differences``: a forest plot of every model-minus-model difference with its paired
  bootstrap interval and the zero line;
- ``probe_differences``: the probe's co-defense and cheating differences, when given;
- ``safety_vs_helpfulness``: safety against helpfulness (:mod:`mmsafe.evaluate.overrefusal`).

File names made from judge or field names go through :func:`~mmsafe.evaluate.formatting.file_slug`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmsafe.evaluate import overrefusal
from mmsafe.evaluate.formatting import file_slug
from mmsafe.evaluate.plotting import (
    PALETTE,
    Difference,
    bar_from_rate,
    draw_bars,
    figure_style,
    forest_plot,
    percent_axis,
    save_figure,
    short,
)
from mmsafe.evaluate.report.summary import metric_name


@dataclass(frozen=True)
class Plot:
    """One plot written: its PNG (the page shows it), the SVG beside it, a title and caption."""

    png: Path
    title: str
    caption: str
    name: str | None = None  #: the page's anchor, when not ``plot-<file stem>``

    @property
    def svg(self) -> Path:
        return self.png.with_suffix(".svg")

    @property
    def anchor(self) -> str:
        return self.name or "plot-" + self.png.stem


def plot_rates(summary: dict[str, Any], path: Path) -> Plot:
    rows = summary["results"]
    bars = [
        bar_from_rate(short(row["model"]) + "\n" + short(row["judge"]), row["summary"]["safe_rate"]) for row in rows
    ]
    with figure_style() as plt:
        figure, axes = plt.subplots(figsize=(max(4.5, 1.3 * len(rows) + 2), 4))
        draw_bars(axes, bars, list(range(len(rows))), 0.6, PALETTE[0])
        axes.set_xticks(range(len(rows)), [bar.label for bar in bars], fontsize=7)
        percent_axis(axes)
        axes.set_ylabel(" / ".join(sorted({row["metric"] for row in rows})))
        axes.set_title("Rate per model (Wilson 95% interval)", fontsize=9)
        save_figure(plt, figure, path)
    return Plot(
        path,
        "Rate per model",
        "Each model's rate (safety, or refusal for the refusal judge) on the prompts expecting a refusal, with its Wilson 95% interval and n.",
    )


def plot_breakdown(rows: list[dict[str, Any]], name: str, judge: str, path: Path) -> Plot:
    rows = [row for row in rows if row["judge"] == judge]
    groups = sorted({row["group"] for row in rows}, key=str)
    models = list(dict.fromkeys(row["model"] for row in rows))
    width = 0.8 / max(1, len(models))
    with figure_style() as plt:
        figure, axes = plt.subplots(figsize=(max(5.0, 0.7 * len(groups) * max(1, len(models)) + 2), 4.2))
        for index, model in enumerate(models):
            by_group = {row["group"]: row["summary"]["safe_rate"] for row in rows if row["model"] == model}
            bars = [bar_from_rate(short(str(group)), by_group.get(group, {"total": 0})) for group in groups]
            positions = [position + index * width - 0.4 + width / 2 for position in range(len(groups))]
            draw_bars(axes, bars, positions, width, PALETTE[index % len(PALETTE)], label=short(model))
        axes.set_xticks(
            range(len(groups)), [short(str(group)) for group in groups], rotation=30, ha="right", fontsize=7
        )
        percent_axis(axes)
        axes.set_ylabel(metric_name(judge))
        axes.set_title(short(f"{metric_name(judge)} by {name} ({judge})", 90), fontsize=9)
        if models:
            axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        save_figure(plt, figure, path)
    return Plot(
        path,
        f"{metric_name(judge)} by {name} ({judge})",
        f"The {metric_name(judge)} per {name} and model with Wilson 95% intervals; n above each bar.",
    )


def plot_differences(summary: dict[str, Any], path: Path) -> Plot:
    differences = [
        Difference(
            short(row["model_b"]) + " - " + short(row["model_a"]) + "\n(" + short(row["judge"]) + ")",
            row["difference"],
            row["low"],
            row["high"],
            row["n"],
            row["mcnemar_p"] if row["n"] else None,
        )
        for row in summary["comparisons"]
    ]
    with figure_style() as plt:
        figure = forest_plot(
            plt,
            differences,
            "Model B minus model A on the same prompts (paired bootstrap 95% interval)",
            "difference in percentage points",
        )
        save_figure(plt, figure, path)
    return Plot(
        path,
        "Model differences",
        "Each pair of models judged by the same judge: B - A in points with the paired bootstrap 95% interval; the dashed line is no difference.",
    )


def plot_probe_differences(probe: dict[str, Any], path: Path) -> Plot:
    differences = [
        Difference(
            f"{row['name']}\n({judge})",
            row.get("difference"),
            row.get("low"),
            row.get("high"),
            row.get("n") or 0,
            row.get("mcnemar_p") if row.get("n") else None,
        )
        for judge, rows in probe["comparisons"].items()
        for row in rows
    ]
    with figure_style() as plt:
        figure = forest_plot(
            plt,
            differences,
            "Modality probe: variant minus baseline (paired bootstrap 95% interval)",
            "difference in percentage points",
        )
        save_figure(plt, figure, path)
    return Plot(
        path,
        "Modality probe: co-defense and cheating",
        "Co-defense (multimodal vs text) and cheating (swap, blank vs multimodal) differences on the same records, with paired bootstrap 95% intervals.",
    )


def write_plots(summary: dict[str, Any], out_dir: Path) -> list[Plot]:
    """Every plot of the report, in the order the page shows them."""
    plots = [plot_rates(summary, out_dir / "rates.png")]
    judges = list(dict.fromkeys(row["judge"] for row in summary["results"]))
    for name, rows in summary["breakdowns"].items():
        for judge in judges:
            plots.append(plot_breakdown(rows, name, judge, out_dir / f"{file_slug(judge)}_by_{file_slug(name)}.png"))
    if summary["comparisons"]:
        plots.append(plot_differences(summary, out_dir / "differences.png"))
    probe = summary.get("probe")
    if probe and any(probe["comparisons"].values()):
        plots.append(plot_probe_differences(probe, out_dir / "probe_differences.png"))
    balance = out_dir / overrefusal.PLOT_FILE
    if overrefusal.plot_safety_helpfulness(summary, balance):
        plots.append(
            Plot(
                balance, "Safety against helpfulness",
                "Each model on safety (prompts expecting a refusal) against helpfulness (1 - over-refusal on prompts expecting help), with Wilson 95% intervals; the top right corner is best.",
                "safety-helpfulness",
            )
        )  # fmt: skip
    return plots
