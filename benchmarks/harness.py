"""The measuring harness shared by every benchmark.

Contenders run alternately in one process (A, B, C, A, B, C, ...) after a warm-up, so
slow drifts of the machine (thermal, other load) spread over all of them alike; each
reports the median and the min-max of its repetitions. Peak resident memory is read per
contender in a fresh subprocess when asked, since a process's peak never goes down.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


@dataclass
class Measurement:
    """Repeated timings of one contender; ``items`` is the work done per repetition."""

    name: str
    items: float
    seconds: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.seconds)

    @property
    def rates(self) -> list[float]:
        return [self.items / s for s in self.seconds]

    def summary(self, unit: str) -> dict[str, Any]:
        rates = self.rates
        return {
            "name": self.name,
            f"{unit}_per_s": statistics.median(rates),
            f"{unit}_per_s_min": min(rates),
            f"{unit}_per_s_max": max(rates),
            "median_seconds": self.median_seconds,
            "repetitions": len(self.seconds),
            **self.extra,
        }


def run_alternating(
    contenders: dict[str, Callable[[], float]], *, repetitions: int, warmup: int = 1
) -> dict[str, Measurement]:
    """Time each contender ``repetitions`` times, interleaved, after ``warmup`` untimed rounds.

    Each callable does one repetition of work and returns how many items it processed.
    """
    for _ in range(warmup):
        for run in contenders.values():
            run()
    results: dict[str, Measurement] = {}
    for _ in range(repetitions):
        for name, run in contenders.items():
            start = time.perf_counter()
            items = run()
            elapsed = time.perf_counter() - start
            measurement = results.setdefault(name, Measurement(name=name, items=items))
            measurement.seconds.append(elapsed)
    return results


def _status_mb(field: str) -> float | None:
    """A memory line of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in MiB; None where /proc is missing."""
    try:
        with open("/proc/self/status", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def current_rss_mb() -> float:
    """Resident set size of this process now, in MiB (``VmRSS``; 0 where /proc is missing)."""
    return _status_mb("VmRSS") or 0.0


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current resident size (Linux: ``clear_refs`` 5); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB.

    On Linux this is ``VmHWM`` of ``/proc/self/status``: ``getrusage``'s ``ru_maxrss``
    survives ``fork`` + ``exec``, so a child started by a large parent would report the
    parent's peak.
    """
    peak = _status_mb("VmHWM")
    if peak is not None:
        return peak
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / (1024 * 1024)


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    try:
        with open("/proc/meminfo", encoding="utf-8") as handle:
            total_kb = int(handle.readline().split()[1])
        info["memory_gib"] = round(total_kb / 1024 / 1024, 1)
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return info


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a short run (a minute or two) with fewer repetitions")
    parser.add_argument("--json", type=Path, help="write the results as JSON to this path")
    parser.add_argument("--repetitions", type=int, help="measured repetitions per contender (default 5, quick 5)")
    return parser


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain-text table of ``rows`` (dicts) with the given columns."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    widths = [max(len(column), *(len(cell(row.get(column, ""))) for row in rows)) for column in columns]
    lines = ["  ".join(column.ljust(width) for column, width in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * width for width in widths))
    for row in rows:
        lines.append(
            "  ".join(cell(row.get(column, "")).ljust(width) for column, width in zip(columns, widths, strict=True))
        )
    return "\n".join(lines)


def write_results(path: Path | None, payload: dict[str, Any]) -> None:
    payload = {"machine": machine_info(), **payload}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json.dumps(payload, indent=2, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o))
            + "\n",
            encoding="utf-8",
        )
        print(f"results written to {path}")
