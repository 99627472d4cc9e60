"""What a data format is: a detector, an item reader and an optional writer."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmsafe.data.jsonl import iter_lines, loads_bounded, parse_json_line
from mmsafe.data.records import PreferenceRecord
from mmsafe.errors import DataError, MmsafeError

#: A reader yields records, or the DataError of a record it could not read and skipped,
#: so that validation can list every problem in one pass.
Item = PreferenceRecord | DataError
ItemReader = Callable[..., Iterator[Item]]
Writer = Callable[[Path, Iterable[PreferenceRecord]], int]


class FileReadError(DataError):
    """The file (or the rest of it) cannot be read at all: not one bad record but a
    missing file, a syntax error in a whole-file format, a truncated stream."""

    @classmethod
    def wrap(cls, error: DataError, *, file: str) -> FileReadError:
        location = error.location
        return cls(error.message, file=location.file or file, record=location.record, field=location.field)


@dataclass(frozen=True)
class Format:
    """One data format, found by name in :data:`mmsafe.data.formats.FORMATS`.

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
        for item in self.read_items(path, image_dir=image_dir):
            if isinstance(item, DataError):
                raise item
            yield item


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


def iter_json_lines(path: str | Path) -> Iterator[tuple[int, Any] | DataError]:
    """``(line_number, value)`` per line, or a DataError for a malformed line (then on).

    An undecodable byte or a truncated gzip stream ends the file with one DataError.
    """
    file = str(path)
    try:
        for line_number, line in iter_lines(path):
            try:
                value = parse_json_line(line, file=file, line_number=line_number)
            except DataError as error:  # malformed, nested too deep, a lone surrogate
                yield error
                continue
            yield line_number, value
    except DataError as error:
        yield FileReadError.wrap(error, file=file)
    except OSError as error:  # unreadable (permissions, I/O): a message, not a traceback
        yield FileReadError(f"cannot read the file ({error.strerror or error})", file=file)
