"""What a data format is: a detector, an item reader and an optional writer."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmsafe.data.jsonl import iter_lines, loads_bounded
from mmsafe.data.reading import FileReadError, iter_json_lines, strict
from mmsafe.data.records import PreferenceRecord
from mmsafe.errors import DataError, MmsafeError

__all__ = ["FileReadError", "Format", "Item", "ItemReader", "Writer", "first_object", "iter_json_lines"]

#: A reader yields records, or the DataError of a record it could not read and skipped,
#: so that validation can list every problem in one pass.
Item = PreferenceRecord | DataError
ItemReader = Callable[..., Iterator[Item]]
Writer = Callable[[Path, Iterable[PreferenceRecord]], int]


@dataclass(frozen=True)
class Format:
    """One data format, found by name in the registry :data:`mmsafe.data.formats.FORMATS`.

    ``read_items(path, image_dir=None)`` yields a :class:`PreferenceRecord` per record, or
    a :class:`DataError` (naming file, record and field) for one it could not read, and
    carries on where the file allows. ``writer(path, records)`` returns the number of
    rows written. ``detect(path)`` says whether ``path`` looks like this format.
    ``suffixes`` are the output file endings that select this format for writing.
    """

    name: str
    description: str
    detect: Callable[[str | Path], bool]
    read_items: ItemReader
    writer: Writer | None = None
    suffixes: tuple[str, ...] = ()

    def reader(self, path: str | Path, *, image_dir: str | Path | None = None) -> Iterator[PreferenceRecord]:
        """Records of ``path``; the first unreadable record raises its DataError."""
        return strict(self.read_items(path, image_dir=image_dir))


def first_object(path: str | Path, *, max_lines: int = 20) -> dict[str, Any] | None:
    """The first JSON object among the first lines of a JSONL file (for detection only)."""
    try:
        for count, (_, line) in enumerate(iter_lines(path)):
            if count >= max_lines:
                return None
            try:
                value = loads_bounded(line, str(path))
            except (json.JSONDecodeError, MmsafeError):
                continue
            return value if isinstance(value, dict) else None
    except (DataError, OSError):
        return None
    return None
