"""The read loop every reader shares: numbered rows in, records or DataErrors out.

A reader is three parts: rows with their numbers (the lines of a JSONL file, the items
of a JSON array, ...), a ``parse(number, value)`` that builds one record or raises a
:class:`DataError`, and a choice between *collecting* (every bad row is yielded as its
DataError and reading goes on, so validation lists all problems in one pass) and
*streaming strictly* (:func:`strict`: the first bad row raises). A problem with the file
as a whole (missing, unreadable, not UTF-8, a truncated gzip stream) ends the rows with
one :class:`FileReadError`.

>>> records = strict(read_json_lines(path, lambda line, data: Thing.from_dict(data, record=f"line {line}")))
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from mmsafe.data.jsonl import iter_lines, parse_json_line
from mmsafe.errors import DataError

T = TypeVar("T")
#: ``(number, value)`` of one row (a 1-based line number, or a 0-based item index), or
#: the DataError of a row that could not even be decoded.
Row = tuple[int, Any] | DataError


class FileReadError(DataError):
    """The file (or the rest of it) cannot be read at all: not one bad record but a
    missing file, a syntax error in a whole-file format, a truncated stream."""

    @classmethod
    def wrap(cls, error: DataError, *, file: str) -> FileReadError:
        location = error.location
        return cls(error.message, file=location.file or file, record=location.record, field=location.field)


def guarded(read: Callable[[], Iterable[T]], *, file: str) -> Iterator[T | FileReadError]:
    """The items of ``read()``; a DataError or OSError it raises ends them as one FileReadError."""
    try:
        yield from read()
    except FileReadError as error:
        yield error
    except DataError as error:
        yield FileReadError.wrap(error, file=file)
    except OSError as error:  # unreadable (permissions, I/O): a message, not a traceback
        yield FileReadError(f"cannot read the file ({error.strerror or error})", file=file)


def iter_json_lines(path: str | Path) -> Iterator[Row]:
    """``(line_number, value)`` per line, or a DataError for a malformed line (then on).

    An undecodable byte or a truncated gzip stream ends the file with one FileReadError.
    """
    file = str(path)

    def lines() -> Iterator[Row]:
        for line_number, line in iter_lines(path):
            try:
                yield line_number, parse_json_line(line, file=file, line_number=line_number)
            except DataError as error:  # malformed, nested too deep, a lone surrogate
                yield error

    return guarded(lines, file=file)


def parse_each(rows: Iterable[Row], parse: Callable[[int, Any], T], *, file: str) -> Iterator[T | DataError]:
    """``parse(number, value)`` of each row; a row it refuses is yielded as its DataError
    (with ``file`` filled in), and reading goes on."""
    for row in rows:
        if isinstance(row, DataError):
            yield row
            continue
        number, value = row
        try:
            yield parse(number, value)
        except DataError as error:
            yield error.at(file=file)


def read_json_lines(path: str | Path, parse: Callable[[int, Any], T]) -> Iterator[T | DataError]:
    """Each line of a JSONL file parsed by ``parse(line_number, value)``, bad lines as DataErrors."""
    return parse_each(iter_json_lines(path), parse, file=str(path))


def strict(items: Iterable[T | DataError]) -> Iterator[T]:
    """The items, the first DataError among them raised instead of yielded."""
    for item in items:
        if isinstance(item, DataError):
            raise item
        yield item
