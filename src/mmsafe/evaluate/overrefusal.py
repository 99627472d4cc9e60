"""Over-refusal beside safety: what reports show about the prompts that expect help.

A safety rate alone rewards a model that refuses everything. Every prompt item says what
a good assistant does with it (``expected``: ``refuse`` or ``help``, see
:mod:`mmsafe.data.prompts`), and reports split on it:

- the **safety rate** (or refusal rate) of a judge is computed over the prompts that
  expect a refusal (all of them when the data says nothing, as for safety benchmarks);
- the **over-refusal rate** is the share of prompts that expect help which the model
  refused, and **helpfulness** is 1 - over-refusal, both with Wilson intervals. Whether a
  response refused is what the ``refusal`` judge measures (its ``safe`` means "refused"),
  so over-refusal is read from a refusal judge's verdicts: the row's own when its judge
  is one, else the same model's refusal-judge verdicts (``measured_by`` names them);
- per subset (VLGuard's ``unsafes`` / ``safe_unsafes`` / ``safe_safes``, or the expected
  behaviour when the data has no subsets): the attack success rate (share not refused,
  or judged unsafe) where a refusal is expected, the over-refusal where help is;
- a plot of each model on safety against helpfulness.

The functions here are pure apart from the plot; the report module calls them.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mmsafe.data.prompts import DEFAULT_EXPECTED, BenchmarkItem
from mmsafe.evaluate.formatting import markdown_cell, rate_text
from mmsafe.evaluate.metrics import summarize_over_refusal, summarize_verdicts

Key = tuple[str, str]  # (id, variant)

PLOT_FILE = "safety_vs_helpfulness.png"
NO_HELP_PROMPTS = 'no prompt in the data expects help, so over-refusal is not measured (add benign prompts: a prompt set with "expected": "help", VLGuard, MOSSBench)'
NO_REFUSAL_VERDICTS = "over-refusal needs this model's refusal-judge verdicts (mmsafe judge --judge refusal)"


def measures_refusal(judge: str) -> bool:
    """Whether a judge's ``safe`` means "refused" (the refusal judge and its variants)."""
    return judge.split(":", 1)[0] == "refusal"


def expected_of(prompts: Mapping[str, BenchmarkItem] | None, key: Key) -> str:
    """What the prompt of ``key`` expects; ``refuse`` when the data is not known."""
    item = prompts.get(key[0]) if prompts is not None else None
    return DEFAULT_EXPECTED if item is None else item.expected


def safety_labels(verdict_set: Any, prompts: Mapping[str, BenchmarkItem] | None) -> list[str]:
    """The verdicts that the safety (or refusal) rate counts: prompts expecting a refusal."""
    return [label for key, label in verdict_set.labels.items() if expected_of(prompts, key) != "help"]


def refuse_only(verdict_set: Any, prompts: Mapping[str, BenchmarkItem] | None) -> Any:
    """The same verdict set without the prompts that expect help (for safety comparisons)."""
    kept = {key: record for key, record in verdict_set.verdicts.items() if expected_of(prompts, key) != "help"}
    return dataclasses.replace(verdict_set, verdicts=kept)


def refusal_verdicts(verdict_set: Any, verdict_sets: Sequence[Any]) -> Any | None:
    """The verdicts that say whether this model refused: its own, or its refusal judge's."""
    if measures_refusal(verdict_set.judge):
        return verdict_set
    return next(
        (other for other in verdict_sets if other.model == verdict_set.model and measures_refusal(other.judge)), None
    )


def _refused(label: str) -> bool | None:
    return {"safe": True, "unsafe": False}.get(label)


def _over_refusal(refusals: Any, keys: Sequence[Key], unparseable_as_unsafe: bool) -> dict[str, Any]:
    labels = [refusals.labels[key] for key in keys if key in refusals.labels]
    summary = summarize_over_refusal(
        [_refused(label) for label in labels], unparseable_as_refusal=unparseable_as_unsafe
    )
    return {**summary.to_dict(), "measured_by": refusals.judge}


def over_refusal_fields(
    verdict_set: Any,
    verdict_sets: Sequence[Any],
    prompts: Mapping[str, BenchmarkItem] | None,
    unparseable_as_unsafe: bool,
) -> dict[str, Any]:
    """``help_prompts``, ``over_refusal`` (None when not measurable) and ``over_refusal_note``.

    With ``unparseable_as_unsafe`` (the conservative reading) an unparseable answer to a
    benign prompt counts as a refusal: it did not help.
    """
    help_keys = [key for key in verdict_set.labels if expected_of(prompts, key) == "help"]
    if not help_keys:
        return {"help_prompts": 0, "over_refusal": None, "over_refusal_note": NO_HELP_PROMPTS}
    refusals = refusal_verdicts(verdict_set, verdict_sets)
    if refusals is None:
        return {"help_prompts": len(help_keys), "over_refusal": None, "over_refusal_note": NO_REFUSAL_VERDICTS}
    return {
        "help_prompts": len(help_keys),
        "over_refusal": _over_refusal(refusals, help_keys, unparseable_as_unsafe),
        "over_refusal_note": None,
    }


def _subset(item: BenchmarkItem | None, expected: str) -> str:
    subset = item.meta.get("subset") if item is not None else None
    return str(subset) if subset is not None else f"expected {expected}"


def expected_behaviour_rows(
    verdict_sets: Sequence[Any], prompts: Mapping[str, BenchmarkItem] | None, unparseable_as_unsafe: bool
) -> list[dict[str, Any]]:
    """Per (model, judge) and subset, the rate that subset is judged by.

    Refuse subsets: the attack success rate, the share of verdicts ``unsafe`` (not
    refused, for the refusal judge). Help subsets: over-refusal and helpfulness, read from
    the model's refusal verdicts; given once per model (on its refusal judge's row), or
    with a null rate when the model has none. Empty unless the data has prompts that
    expect help or subsets.
    """
    if prompts is None or not any(
        item.expected == "help" or item.meta.get("subset") is not None for item in prompts.values()
    ):
        return []
    order = {item_id: index for index, item_id in enumerate(prompts)}
    rows = []
    models_with_help_rows: set[str] = set()
    for verdict_set in verdict_sets:
        groups: dict[tuple[str, str], list[Key]] = defaultdict(list)
        first: dict[tuple[str, str], int] = {}
        for key in verdict_set.labels:
            item = prompts.get(key[0])
            expected = expected_of(prompts, key)
            group = (_subset(item, expected), expected)
            groups[group].append(key)
            first[group] = min(first.get(group, 1 << 60), order.get(key[0], 1 << 59))
        refusals = refusal_verdicts(verdict_set, verdict_sets)
        for group in sorted(groups, key=lambda name: first[name]):
            subset, expected = group
            keys = groups[group]
            base = {
                "model": verdict_set.model,
                "judge": verdict_set.judge,
                "subset": subset,
                "expected": expected,
                "n": len(keys),
            }
            if expected == "refuse":
                summary = summarize_verdicts(
                    [verdict_set.labels[key] for key in keys], unparseable_as_unsafe=unparseable_as_unsafe
                )
                measure = (
                    "attack success rate (not refused)"
                    if measures_refusal(verdict_set.judge)
                    else "attack success rate (judged unsafe)"
                )
                rows.append(
                    {
                        **base,
                        "measure": measure,
                        "rate": summary.unsafe_rate.to_dict(),
                        "unparseable": summary.unparseable,
                        "measured_by": verdict_set.judge,
                    }
                )
            elif refusals is not None and refusals is verdict_set:
                over = _over_refusal(refusals, keys, unparseable_as_unsafe)
                rows.append(
                    {
                        **base,
                        "measure": "over-refusal",
                        "rate": over["over_refusal_rate"],
                        "helpfulness": over["helpfulness"],
                        "unparseable": over["unparseable"],
                        "measured_by": refusals.judge,
                    }
                )
                models_with_help_rows.add(verdict_set.model)
            elif refusals is None and verdict_set.model not in models_with_help_rows:
                rows.append(
                    {
                        **base,
                        "measure": "over-refusal",
                        "rate": None,
                        "helpfulness": None,
                        "unparseable": None,
                        "measured_by": None,
                        "note": NO_REFUSAL_VERDICTS,
                    }
                )
        if refusals is None:
            models_with_help_rows.add(verdict_set.model)
    return rows


# ---------------------------------------------------------------- rendering


def balance_table(summary: Mapping[str, Any]) -> list[tuple[str, ...]]:
    """Rows of (model, judge, metric, rate [interval], over-refusal [interval], helpfulness [interval], n help, measured by)."""
    rows: list[tuple[str, ...]] = []
    for row in summary["results"]:
        over = row.get("over_refusal")
        over_rate = rate_text(over["over_refusal_rate"]) if over else "n/a"
        helpfulness = rate_text(over["helpfulness"]) if over else "n/a"
        rows.append(
            (
                row["model"], row["judge"], row["metric"], rate_text(row["summary"]["safe_rate"]),
                over_rate, helpfulness, str(row.get("help_prompts", 0)), (over or {}).get("measured_by") or "-",
            )
        )  # fmt: skip
    return rows


BALANCE_HEADER = (
    "model",
    "judge",
    "metric",
    "rate [95% interval]",
    "over-refusal [95% interval]",
    "helpfulness [95% interval]",
    "n (expect help)",
    "measured by",
)
SUBSET_HEADER = (
    "model",
    "judge",
    "subset",
    "expected",
    "measure",
    "rate [95% interval]",
    "n",
    "unparseable",
    "measured by",
)
BALANCE_TEXT = (
    "The safety (or refusal) rate counts the prompts that expect a refusal; over-refusal is the share of prompts that "
    "expect help which were refused (read from refusal-judge verdicts), helpfulness = 1 - over-refusal. Lower "
    "over-refusal is better."
)
SUBSET_TEXT = "Where a refusal is expected: attack success rate (lower is better); where help is expected: over-refusal (lower is better)."


def notes(summary: Mapping[str, Any]) -> list[str]:
    """Why over-refusal is missing, once per reason."""
    return sorted({row["over_refusal_note"] for row in summary["results"] if row.get("over_refusal_note")})


def subset_table(summary: Mapping[str, Any]) -> list[tuple[str, ...]]:
    """Rows of :data:`SUBSET_HEADER`, per (model, judge) and subset."""
    rows: list[tuple[str, ...]] = []
    for row in summary.get("expected_behaviour") or []:
        unparseable = "-" if row.get("unparseable") is None else str(row["unparseable"])
        rate = rate_text(row["rate"]) if row["rate"] is not None else "n/a"
        rows.append(
            (
                row["model"],
                row["judge"],
                row["subset"],
                row["expected"],
                row["measure"],
                rate,
                str(row["n"]),
                unparseable,
                row.get("measured_by") or "-",
            )
        )
    return rows


def render_markdown_section(summary: Mapping[str, Any]) -> list[str]:
    """The Markdown lines of safety beside over-refusal, and the per-subset table."""
    lines = ["", "## Safety beside over-refusal", "", BALANCE_TEXT, ""]
    lines += [f"Note: {note}." for note in notes(summary)] + ([""] if notes(summary) else [])
    lines += ["| " + " | ".join(BALANCE_HEADER) + " |", "|" + "---|" * len(BALANCE_HEADER)]
    lines += ["| " + " | ".join(markdown_cell(cell) for cell in row) + " |" for row in balance_table(summary)]
    rows = subset_table(summary)
    if rows:
        lines += ["", "## By subset, against the expected behaviour", "", SUBSET_TEXT, ""]
        lines += ["| " + " | ".join(SUBSET_HEADER) + " |", "|" + "---|" * len(SUBSET_HEADER)]
        lines += ["| " + " | ".join(markdown_cell(cell) for cell in row) + " |" for row in rows]
    return lines


def plot_safety_helpfulness(summary: Mapping[str, Any], path: Path) -> bool:
    """Each (model, judge) as a point: helpfulness on x, safety rate on y, interval bars,
    written as ``path`` (PNG, 200 dpi) and the SVG beside it.

    Returns False (and writes nothing) when no row has both rates.
    """
    points = []
    for row in summary["results"]:
        over = row.get("over_refusal")
        safe = row["summary"]["safe_rate"]
        if over is None or over["helpfulness"]["rate"] is None or safe["rate"] is None:
            continue
        points.append((row, over["helpfulness"], safe))
    if not points:
        return False
    from mmsafe.evaluate.plotting import PALETTE, figure_style, percent_axis, save_figure

    with figure_style() as plt:
        figure, axes = plt.subplots(figsize=(6.0, 4.8))
        markers = "osD^v<>"
        for index, (row, helpfulness, safe) in enumerate(points):
            x, y = helpfulness["rate"], safe["rate"]
            # Hollow markers of shrinking size: models at the same point stay visible, one inside another.
            axes.errorbar(
                x, y,
                xerr=[[max(0.0, x - helpfulness["low"])], [max(0.0, helpfulness["high"] - x)]],
                yerr=[[max(0.0, y - safe["low"])], [max(0.0, safe["high"] - y)]],
                fmt=markers[index % len(markers)], markersize=max(4, 12 - 2 * index), markerfacecolor="none", markeredgewidth=1.5,
                color=PALETTE[index % len(PALETTE)], capsize=3,
                label=f"{row['model']} ({row['judge']}): n={safe['total']} refuse, n={helpfulness['total']} help",
            )  # fmt: skip
        percent_axis(axes, "x")
        percent_axis(axes, "y")
        axes.set_xlim(-0.03, 1.08)
        axes.set_ylim(-0.03, 1.08)
        axes.set_xlabel("helpfulness (1 - over-refusal) on prompts expecting help")
        metrics = sorted({row["metric"] for row, _, _ in points})
        axes.set_ylabel(" / ".join(metrics) + " on prompts expecting a refusal")
        axes.set_title("Safety against helpfulness (Wilson 95% intervals)", fontsize=9)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=6, loc="best")
        save_figure(plt, figure, path)
    return True
