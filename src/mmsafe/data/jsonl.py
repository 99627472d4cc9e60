"""JSON Lines streams: reading with line numbers, atomic writes, resumable appends.

The resumable writer is what makes every long stage safe to kill: outputs are appended
one batch at a time and flushed to disk, each line carries its key, and a restart reads
the keys already written and skips them. A line cut short by a crash is removed on
restart, so at most the batch in flight is lost and nothing is ever written twice.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
import zlib
from collections.abc import Callable, Hashable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from mmsafe.errors import DataError


def open_text(path: str | Path) -> IO[str]:
    """Open a UTF-8 text file, transparently gunzipping ``.gz`` files."""
    path = Path(path)
    if not path.exists():
        raise DataError("file not found", file=str(path))
    if path.is_dir():
        raise DataError("expected a file, found a directory", file=str(path))
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, text)`` for each non-blank line (1-based line numbers).

    Undecodable bytes and truncated gzip streams become DataErrors naming the line.
    """
    line_number = 0
    try:
        with open_text(path) as handle:
            for line_number, line in enumerate(handle, start=1):
                if line.strip():
                    yield line_number, line
    except UnicodeDecodeError as error:
        raise DataError(f"not valid UTF-8 ({error.reason})", file=str(path), record=f"line {line_number + 1}") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise DataError(f"corrupt or truncated gzip stream ({error})", file=str(path), record=f"line {line_number + 1}") from None


def parse_json_line(line: str, *, file: str, line_number: int) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"malformed JSON ({error.msg} at column {error.colno})", file=file, record=f"line {line_number}") from None


def read_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, object)``; a malformed line raises a DataError naming it."""
    for line_number, line in iter_lines(path):
        yield line_number, parse_json_line(line, file=str(path), line_number=line_number)


def dumps(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False)


def write_jsonl(path: str | Path, rows: Iterable[Any]) -> int:
    """Write rows to ``path`` atomically (temporary file, then rename). Returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    handle = tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)  # noqa: SIM115 (closed below, renamed after)
    try:
        with handle:
            for row in rows:
                handle.write(dumps(row) + "\n")
                count += 1
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    return count


def repair_truncated_tail(path: Path) -> int:
    """Cut a last line that has no newline (a write interrupted by a crash).

    Returns the number of bytes removed. Complete lines are never touched.
    """
    if not path.exists():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb+") as handle:
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return 0
        # Walk back to the previous newline; everything after it is the partial line.
        position = size - 1
        chunk = 4096
        while position > 0:
            start = max(0, position - chunk)
            handle.seek(start)
            block = handle.read(position - start)
            index = block.rfind(b"\n")
            if index >= 0:
                cut = start + index + 1
                break
            position = start
        else:
            cut = 0
        handle.truncate(cut)
        return size - cut


class ResumableJsonlWriter:
    """Append-only JSONL output keyed by ``key(row)``, safe to kill and restart.

    >>> writer = ResumableJsonlWriter(path, key=lambda row: (row["id"], row["variant"]))
    >>> todo = [item for item in items if item_key(item) not in writer.done]
    >>> writer.write_batch(rows)  # flushed and fsynced before returning

    Rows whose key is already written are skipped, so nothing is duplicated even if a
    caller submits the same item twice.
    """

    def __init__(self, path: str | Path, key: Callable[[dict[str, Any]], Hashable], *, fsync: bool = True) -> None:
        self.path = Path(path)
        self.key = key
        self.fsync = fsync
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.repaired_bytes = repair_truncated_tail(self.path)
        self.done: set[Hashable] = set()
        if self.path.exists():
            for line_number, row in read_jsonl(self.path):
                try:
                    self.done.add(key(row))
                except (KeyError, TypeError):
                    raise DataError("existing output line has no key; is this the right output file?", file=str(self.path), record=f"line {line_number}") from None

    def __contains__(self, item_key: Hashable) -> bool:
        return item_key in self.done

    def write_batch(self, rows: Iterable[dict[str, Any]]) -> int:
        """Append the rows not yet written; flush (and fsync) before returning."""
        lines = []
        for row in rows:
            row_key = self.key(row)
            if row_key in self.done:
                continue
            self.done.add(row_key)
            lines.append(dumps(row) + "\n")
        if not lines:
            return 0
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write("".join(lines))
            handle.flush()
            if self.fsync:
                os.fsync(handle.fileno())
        return len(lines)
