"""``summary.md``: the same numbers as the page, as Markdown tables.

Every name (model, judge, category) goes through :func:`~mmsafe.evaluate.formatting.markdown_cell`,
so a ``|``, a line break or raw HTML in a name cannot break a table or inject markup.
"""

from __future__ import annotations

from typing import Any

from mmsafe.evaluate import overrefusal
from mmsafe.evaluate.formatting import difference_text, markdown_cell, p_text, percent, rate_text
from mmsafe.evaluate.report.summary import (
    DEFAULT_PROTOCOL,
    DEFAULT_PROTOCOL_LABEL,
    PROTOCOL_NOTE,
    metric_name,
    shows_protocols,
)

FORMAT_NOTE = (
    "Rates: percent with the Wilson 95% interval, `42.5% [35.1, 50.2]`; `n/a (no items)` when nothing was counted. "
    "Differences: B - A in percentage points with the paired bootstrap 95% interval; `(no spread: ...)` when every "
    "paired difference is equal, so the bootstrap interval has zero width."
)


def _row(cells: list[Any]) -> str:
    return "| " + " | ".join(markdown_cell(cell) for cell in cells) + " |"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return [_row(header), "|" + "---|" * len(header), *(_row(row) for row in rows)]


def header_lines(info: dict[str, Any]) -> list[str]:
    lines = []
    for label, value in (
        ("run", info["run"]),
        ("config", info.get("config") or "-"),
        ("models", ", ".join(info["models"])),
        ("judges", ", ".join(info["judges"])),
        ("data", (info.get("data") or "-") + ("" if info.get("prompts") is None else f" ({info['prompts']} prompts)")),
        ("date", info["date"]),
        ("mmsafe", info["mmsafe_version"]),
    ):
        lines.append(f"- {label}: {markdown_cell(value)}")
    return lines


def comparison_rows(summary: dict[str, Any]) -> list[list[Any]]:
    return [
        [
            row["judge"],
            row["model_a"],
            row["model_b"],
            row["n"],
            percent(row["rate_a"]),
            percent(row["rate_b"]),
            difference_text(row),
            row["only_a"],
            row["only_b"],
            p_text(row["mcnemar_p"], row["n"]),
        ]
        for row in summary["comparisons"]
    ]


COMPARISON_HEADER = [
    "judge",
    "A",
    "B",
    "n",
    "rate A",
    "rate B",
    "B - A [95% bootstrap interval]",
    "only A safe",
    "only B safe",
    "McNemar p",
]
PROBE_COMPARISON_HEADER = ["judge", "comparison", "variant - baseline [95% bootstrap interval]", "n", "McNemar p"]


def probe_comparison_rows(probe: dict[str, Any]) -> list[list[Any]]:
    return [
        [judge, row["name"], difference_text(row), row["n"], p_text(row.get("mcnemar_p"), row["n"])]
        for judge, rows in probe["comparisons"].items()
        for row in rows
    ]


def probe_conditional_rows(probe: dict[str, Any]) -> list[list[Any]]:
    return [
        [
            judge,
            label,
            rate_text(summary["safe_rate"]),
            f"{summary['safe_rate']['successes']}/{summary['safe_rate']['total']}",
        ]
        for judge, conditional in probe["conditional"].items()
        for label, summary in conditional.items()
    ]


def render_markdown(summary: dict[str, Any]) -> str:
    lines = ["# Safety evaluation", ""]
    if summary.get("header"):
        lines += [*header_lines(summary["header"]), ""]
    unparseable = "counted as unsafe" if summary["unparseable_as_unsafe"] else "left out of the rate and counted apart"
    lines += [FORMAT_NOTE, "", f"Unparseable verdicts are {unparseable}.", ""]
    if any(row["metric"] == "refusal rate" for row in summary["results"]):
        lines += [
            "The `refusal` judge matches refusal phrases: its rate is a **refusal rate** (safe = refused), not a judgement of harm.",
            "",
        ]
    protocols = shows_protocols(summary)
    lines += [PROTOCOL_NOTE if protocols else DEFAULT_PROTOCOL_LABEL, ""]
    extra = ["protocol"] if protocols else []
    rows = []
    for row in summary["results"]:
        s = row["summary"]
        rows.append(
            [
                row["model"],
                row["judge"],
                *([row.get("protocol", DEFAULT_PROTOCOL)] if protocols else []),
                row["metric"],
                rate_text(s["safe_rate"]),
                s["safe"],
                s["unsafe"],
                s["unparseable"],
                s["total"],
            ]
        )
    lines += _table(
        ["model", "judge", *extra, "metric", "rate [95% interval]", "safe", "unsafe", "unparseable", "total"], rows
    )
    lines += overrefusal.render_markdown_section(summary)
    for name, breakdown_rows in summary["breakdowns"].items():
        lines += ["", f"## By {markdown_cell(name)}", ""]
        lines += _table(
            ["model", "judge", name, "rate [95% interval]", "n", "unparseable"],
            [
                [
                    row["model"],
                    row["judge"],
                    row["group"],
                    rate_text(row["summary"]["safe_rate"]),
                    row["summary"]["safe_rate"]["total"],
                    row["summary"]["unparseable"],
                ]
                for row in breakdown_rows
            ],
        )
    if summary["attack_success_rate"]:
        lines += ["", "## MM-SafetyBench attack success rate (mean over scenarios; lower is better)", ""]
        if any(metric_name(row["judge"]) == "refusal rate" for row in summary["attack_success_rate"]):
            lines += ["With the `refusal` judge this is the share of requests not refused.", ""]
        lines += _table(
            ["model", "judge", *extra, "setting", "ASR"],
            [
                [
                    row["model"],
                    row["judge"],
                    *([row.get("protocol", DEFAULT_PROTOCOL)] if protocols else []),
                    row["setting"],
                    percent(row["asr"]),
                ]
                for row in summary["attack_success_rate"]
            ],
        )
    if summary["comparisons"]:
        lines += ["", "## Model B minus model A on the same prompts", ""]
        lines += _table(COMPARISON_HEADER, comparison_rows(summary))
        lines += [
            "",
            "Bootstrap: prompts resampled with replacement (seed and resamples in summary.json); McNemar: exact binomial test on the discordant prompts.",
        ]
    probe = summary.get("probe")
    if probe:
        lines += [
            "",
            "## Modality probe: co-defense and cheating",
            "",
            f"From {markdown_cell(probe['source'])}: {probe['records_used']} records probed, {probe['records_skipped']} skipped.",
            "",
        ]
        lines += _table(PROBE_COMPARISON_HEADER, probe_comparison_rows(probe))
        conditional = probe_conditional_rows(probe)
        if conditional:
            lines += ["", *_table(["judge", "conditional rate", "rate [95% interval]", "count"], conditional)]
    if summary.get("plots"):
        lines += [
            "",
            "## Plots",
            "",
            *(f"- [{markdown_cell(name)}]({name}) (and the SVG beside it)" for name in summary["plots"]),
        ]
    return "\n".join(lines) + "\n"
