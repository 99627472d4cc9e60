"""Progress bars: one place that decides how progress is shown."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress_enabled() -> bool:
    """Bars go to stderr when it is a terminal, unless MMSAFE_PROGRESS=0 (or 1 to force)."""
    setting = os.environ.get("MMSAFE_PROGRESS")
    if setting is not None:
        return setting not in ("0", "false", "no")
    return sys.stderr.isatty()


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "", unit: str = "it") -> tqdm:
    """A tqdm bar (rate and ETA), silent when progress is disabled."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not progress_enabled(), dynamic_ncols=True, leave=False)


def track(iterable: Iterable[T], *, total: int | None = None, desc: str = "", unit: str = "it") -> Iterator[T]:
    yield from progress(iterable, total=total, desc=desc, unit=unit)
