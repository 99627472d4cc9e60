"""How reports write numbers and names: one format for every rate, difference and p-value.

- a rate: percent with one decimal and its 95% interval, ``42.5% [35.1, 50.2]``; with
  no items ``n/a (no items)`` (a Wilson interval of 0 items is the whole ``[0, 100]``:
  it says nothing, so it is not printed);
- a paired difference (B - A): signed points with its bootstrap interval,
  ``+12.5 pts [+2.5, +22.5]``; when every resample gives the same value (all paired
  differences are equal, e.g. the models agree on every prompt) the interval has zero
  width and says nothing about spread, so it is written
  ``+0.0 pts (no spread: all 4 paired differences equal)``; with no pairs
  ``n/a (no items)``;
- a p-value: three decimals, ``< 0.001`` below that, ``n/a`` without pairs.

Names (of models, judges, categories) go into Markdown cells and file names: cells escape
``|``, newlines and HTML; file names are a slug of at most :data:`SLUG_LIMIT` characters
plus a short hash of the name whenever the slug is not the name itself.
"""

from __future__ import annotations

import hashlib
import html
import math
import re
from collections.abc import Mapping
from typing import Any

NO_ITEMS = "n/a (no items)"
SLUG_LIMIT = 60
_SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")


def _number(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def percent(value: float | None) -> str:
    """``42.5%``; ``n/a`` when there is no value."""
    value = _number(value)
    return "n/a" if value is None else f"{100 * value:.1f}%"


def rate_text(rate: Mapping[str, Any] | None) -> str:
    """A rate dict (``rate``, ``low``, ``high``, ``total``) as ``42.5% [35.1, 50.2]``."""
    if rate is None or not rate.get("total") or _number(rate.get("rate")) is None:
        return NO_ITEMS
    return f"{100 * rate['rate']:.1f}% [{100 * rate['low']:.1f}, {100 * rate['high']:.1f}]"


def points(value: float | None) -> str:
    value = _number(value)
    return "n/a" if value is None else f"{100 * value:+.1f}"


def difference_text(row: Mapping[str, Any]) -> str:
    """A paired comparison (``difference``, ``low``, ``high``, ``n``) as ``+12.5 pts [+2.5, +22.5]``."""
    difference, low, high = (_number(row.get(name)) for name in ("difference", "low", "high"))
    if not row.get("n") or difference is None:
        return NO_ITEMS
    if low is None or high is None or math.isclose(low, high, abs_tol=1e-12):
        return f"{points(difference)} pts (no spread: all {row['n']} paired differences equal)"
    return f"{points(difference)} pts [{points(low)}, {points(high)}]"


def p_text(value: float | None, n: int | None = None) -> str:
    """``0.125``; ``< 0.001``; ``n/a`` when there is no value or no pair."""
    value = _number(value)
    if value is None or n == 0:
        return "n/a"
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def markdown_cell(value: Any) -> str:
    """Text for one Markdown table cell: HTML escaped, ``|`` escaped, line breaks as spaces."""
    text = html.escape(str(value), quote=False)
    text = re.sub(r"\s*[\r\n]+\s*", " ", text)
    return text.replace("|", "\\|")


def file_slug(name: str, limit: int = SLUG_LIMIT) -> str:
    """A file-name-safe form of ``name``: ASCII letters, digits, ``._-``, at most ``limit``
    characters, then ``-`` and 8 hex digits of the name's hash unless the slug is the name."""
    slug = "-".join(_SAFE_NAME.findall(name)).strip("-.")[:limit].strip("-.")
    if slug == name and slug:
        return slug
    return f"{slug or 'name'}-{hashlib.sha256(name.encode('utf-8')).hexdigest()[:8]}"
