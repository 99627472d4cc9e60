"""The results of a finished run as a text table (``mmsafe run`` and ``mmsafe demo`` print it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmsafe.pipeline.config import PipelineConfig
from mmsafe.pipeline.paths import Paths


def safety_table(config: PipelineConfig) -> str:
    """The report's rates per model (over-refusal beside them), and each trained model against the base, as text."""
    summary_path = Paths(Path(config.out)).report / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8"))

    from mmsafe.evaluate.formatting import difference_text, p_text, rate_text

    def cell(rate: dict[str, Any] | None) -> str:
        if rate is None:
            return f"{'-':<24}  {'':<7}"
        count = f"{rate['successes']}/{rate['total']}" if rate.get("total") else ""
        return f"{rate_text(rate):<24}  {count:<7}"

    lines = [
        f"{'model':<8} {'judge':<10} {'metric':<13} {'rate [95% interval]':<24}  {'n':<7}  {'over-refusal [95% interval]':<28}  n"
    ]
    for entry in summary.get("results", []):
        over = entry.get("over_refusal")
        over_cell = cell(over["over_refusal_rate"] if over else None)
        lines.append(
            f"{entry['model']:<8} {entry['judge']:<10} {entry['metric']:<13} {cell(entry['summary']['safe_rate'])}  {over_cell}".rstrip()
        )
    # Each trained model against the base, and BPO against DPO (the paper's comparison).
    comparisons = [
        row
        for row in summary.get("comparisons", [])
        if row.get("model_a") == "base" or (row.get("model_a"), row.get("model_b")) == ("dpo", "bpo")
    ]
    if comparisons:
        lines.append("")
        for row in comparisons:
            if row.get("difference") is None:
                continue
            lines.append(
                f"{row['model_b']} - {row['model_a']} ({row['judge']}): {difference_text(row)} (paired bootstrap 95%), McNemar p = {p_text(row['mcnemar_p'], row['n'])}"
            )
    return "\n".join(lines)
