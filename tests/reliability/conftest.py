"""The reliability suite: the corpus and stage helpers are importable from its tests."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def pytest_terminal_summary(terminalreporter) -> None:
    """The kill matrix's figures (kills survived, records lost and duplicated), one line per stage."""
    rows = [
        value
        for report in terminalreporter.stats.get("passed", []) + terminalreporter.stats.get("failed", [])
        for name, value in getattr(report, "user_properties", [])
        if name == "kill_figures"
    ]
    if not rows:
        return
    terminalreporter.section("crash-and-resume matrix")
    for row in rows:
        terminalreporter.write_line(
            f"{row['stage']:<28} kills survived {row['kills']:>2}   records {row['expected']:>5}   lost {row['lost']}   duplicated {row['duplicated']}"
        )
    terminalreporter.write_line(
        f"{'total':<28} kills survived {sum(row['kills'] for row in rows):>2}   lost {sum(row['lost'] for row in rows)}   duplicated {sum(row['duplicated'] for row in rows)}"
    )
