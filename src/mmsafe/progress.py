"""Progress: one place that decides how progress is shown.

On a terminal, a tqdm bar (rate and ETA) on stderr. Elsewhere (a log file, nohup, SLURM,
``tee``) a bar would print nothing readable until it ends, so a plain line is written to
stderr every ``MMSAFE_PROGRESS_EVERY`` seconds (default 30) instead::

    probe text (hf): 120/480 (25%), 1.9 responses/s, about 3 min left

``MMSAFE_PROGRESS=0`` turns both off; ``MMSAFE_PROGRESS=1`` forces the bar. The last
progress shown is remembered (:func:`last_progress`), so an interrupted command can say
how far it got.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from tqdm.auto import tqdm

from mmsafe.errors import ConfigError

T = TypeVar("T")

#: Seconds between two progress lines when stderr is not a terminal.
DEFAULT_EVERY_S = 30.0
_OFF = ("0", "false", "no", "off")


def progress_mode() -> str:
    """``bar`` (a terminal, or MMSAFE_PROGRESS=1), ``lines`` (not a terminal) or ``off`` (MMSAFE_PROGRESS=0)."""
    setting = os.environ.get("MMSAFE_PROGRESS")
    if setting is not None and setting.strip() != "":
        return "off" if setting.strip().lower() in _OFF else "bar"
    return "bar" if sys.stderr.isatty() else "lines"


def progress_enabled() -> bool:
    """Are bars drawn (a terminal, or MMSAFE_PROGRESS=1)? Other libraries' bars follow this."""
    return progress_mode() == "bar"


def progress_every() -> float:
    """Seconds between progress lines: ``MMSAFE_PROGRESS_EVERY`` (default 30)."""
    text = os.environ.get("MMSAFE_PROGRESS_EVERY")
    if text is None or text.strip() == "":
        return DEFAULT_EVERY_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(f"MMSAFE_PROGRESS_EVERY: expected a number of seconds (0 or more), got {text!r}")
    return seconds


@dataclass(frozen=True)
class ProgressState:
    """How far one progress display got: ``done`` of ``total`` (None: unknown) ``unit``."""

    desc: str
    done: int
    total: int | None
    unit: str
    finished: bool


_last: ProgressState | None = None
_last_lock = threading.Lock()


def last_progress() -> ProgressState | None:
    """The state of the progress display updated or closed last (None: none yet)."""
    return _last


def _remember(desc: str, done: int, total: int | None, unit: str, finished: bool) -> None:
    global _last
    with _last_lock:
        _last = ProgressState(desc=desc, done=done, total=total, unit=unit, finished=finished)


def describe_duration(seconds: float) -> str:
    """``40 s``, ``3 min``, ``2 h 5 min``: rounded the way a person reads an estimate."""
    if seconds < 60:
        return f"{max(1, round(seconds))} s"
    if seconds < 3600:
        return f"{round(seconds / 60)} min"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def progress_line(desc: str, done: int, total: int | None, unit: str, elapsed: float) -> str:
    """``desc: 120/480 (25%), 1.9 responses/s, about 3 min left`` (the parts that are known)."""
    name = "item" if unit == "it" else unit
    rate = done / elapsed if elapsed > 0 else 0.0
    parts = [f"{done}/{total} ({100 * done / total:.0f}%)" if total else f"{done} {name}{'' if done == 1 else 's'}"]
    if done:
        parts.append(f"{rate:.1f} {name}s/s" if rate >= 0.1 else f"{1 / rate:.0f} s/{name}")
    if total and done and done < total:
        parts.append(f"about {describe_duration((total - done) / rate)} left")
    return f"{desc or 'progress'}: " + ", ".join(parts)


class LogProgress:
    """A stand-in for a tqdm bar that writes a plain line to stderr every ``every`` seconds.

    The same calls as the bars mmsafe uses: iteration, ``update``, ``close``, ``with``.
    The last line, on close, says how far it got.
    """

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        *,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        every: float = DEFAULT_EVERY_S,
    ) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable = iterable
        self.total = total
        self.desc = desc
        self.unit = unit
        self.every = every
        self.n = 0
        self.start = time.monotonic()
        self.last_print = self.start
        self.closed = False
        _remember(desc, 0, total, unit, False)

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return self.total or 0

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        _remember(self.desc, self.n, self.total, self.unit, False)
        now = time.monotonic()
        if now - self.last_print >= self.every:
            self.last_print = now
            self._print(now)

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def set_description(self, desc: str = "", refresh: bool = True) -> None:
        self.desc = desc

    def _print(self, now: float) -> None:
        print(progress_line(self.desc, self.n, self.total, self.unit, now - self.start), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        finished = self.total is not None and self.n >= self.total
        _remember(self.desc, self.n, self.total, self.unit, finished)
        now = time.monotonic()
        if self.n and now - self.start >= self.every:  # a run that printed lines says where it ended
            self._print(now)


class _Bar(tqdm):
    """tqdm that remembers how far it got (for the message of an interrupted command)."""

    def count_total(self) -> int | None:
        """The total as a count: tqdm types it as a float, but the totals given here are counts."""
        return None if self.total is None else int(self.total)

    def update(self, n: float | None = 1) -> bool | None:
        shown = super().update(n)
        _remember(self.desc, int(self.n), self.count_total(), self.unit, False)
        return shown

    def close(self) -> None:
        if not getattr(self, "_mmsafe_closed", False):
            self._mmsafe_closed = True
            _remember(
                self.desc, int(self.n), self.count_total(), self.unit, self.total is not None and self.n >= self.total
            )
        super().close()


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "", unit: str = "it") -> Any:
    """A bar on a terminal, periodic lines elsewhere, nothing with MMSAFE_PROGRESS=0."""
    mode = progress_mode()
    if mode != "bar":  # "off" still counts, for the message of an interrupted command
        return LogProgress(
            iterable, total=total, desc=desc, unit=unit, every=progress_every() if mode == "lines" else math.inf
        )
    bar = _Bar(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False)
    _remember(desc, 0, bar.count_total(), unit, False)
    return bar


def track(iterable: Iterable[T], *, total: int | None = None, desc: str = "", unit: str = "it") -> Iterator[T]:
    yield from progress(iterable, total=total, desc=desc, unit=unit)
