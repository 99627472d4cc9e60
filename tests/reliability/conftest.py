"""The reliability suite: the kill matrix's figures at the end of the run.

Its corpus and stage helpers are modules of the ``tests.reliability`` package.
"""

from __future__ import annotations


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
