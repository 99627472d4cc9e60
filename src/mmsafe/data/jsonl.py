"""JSON Lines streams: reading with line numbers, atomic writes, resumable appends.

The resumable writer is what makes every long stage safe to kill: outputs are appended
one batch at a time and flushed to disk, each line carries its key, and a restart reads
the keys already written and skips them. A line cut short by a crash is removed on
restart, so at most the batch in flight is lost and nothing is ever written twice. One
process at a time writes an output: the writer holds its lock (``<out>.lock``).
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import zlib
from collections.abc import Callable, Hashable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from mmsafe.errors import DataError, MmsafeError

logger = logging.getLogger(__name__)

#: The deepest nesting of ``[`` and ``{`` accepted in one JSON value. Records are a few
#: levels deep; a line nested far deeper is hostile, and ``json.loads`` would meet
#: Python's recursion limit on it (a ``RecursionError``, not a message) near 1,000.
MAX_JSON_DEPTH = 200
#: A lone surrogate (U+D800 to U+DFFF) cannot be written as UTF-8. In a file read as strict
#: UTF-8 it can only come from a JSON escape such as ``\ud800``.
_SURROGATE = re.compile("[\ud800-\udfff]")


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
        raise DataError(
            f"corrupt or truncated gzip stream ({error})", file=str(path), record=f"line {line_number + 1}"
        ) from None


class _TooDeep(Exception):
    pass


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Does a parsed JSON value nest lists and objects deeper than ``limit``? (A loop over
    the containers only: strings are not read.)"""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def _loads(text: str) -> Any:
    """``json.loads``; :class:`_TooDeep` past :data:`MAX_JSON_DEPTH` levels of ``[``/``{``."""
    try:
        value = json.loads(text)
    except RecursionError:  # far deeper than the limit: json's C parser met Python's recursion limit
        raise _TooDeep from None
    # Text with at most MAX_JSON_DEPTH brackets cannot nest deeper: no walk for ordinary lines.
    if (
        isinstance(value, dict | list)
        and text.count("[") + text.count("{") > MAX_JSON_DEPTH
        and _depth_exceeds(value, MAX_JSON_DEPTH)
    ):
        raise _TooDeep
    return value


def depth_message(limit: int = MAX_JSON_DEPTH) -> str:
    return f"nesting deeper than {limit} levels (expected JSON nested at most {limit} levels of [ and {{)"


def loads_bounded(text: str | bytes, where: str) -> Any:
    """``json.loads`` that refuses nesting deeper than :data:`MAX_JSON_DEPTH` levels.

    Too deep: :class:`MmsafeError` ``"{where}: nesting deeper than N levels ..."`` (never a
    ``RecursionError``). Malformed JSON raises ``json.JSONDecodeError`` as ``json.loads``
    does, for the caller to report in its own words. Lone surrogates are not checked.
    """
    if isinstance(text, bytes | bytearray):  # decoded as json.loads decodes bytes
        text = bytes(text).decode(json.detect_encoding(text), "surrogatepass")
    try:
        return _loads(text)
    except _TooDeep:
        raise MmsafeError(f"{where}: {depth_message()}") from None


def _lone_surrogate(text: str) -> str | None:
    """The first lone surrogate of ``text``, or None (encoding is the fast test)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return text[error.start]
    return None


def find_lone_surrogate(value: Any) -> tuple[str, str] | None:
    """``(field, character)`` of the first lone surrogate in a JSON value, or None.

    ``field`` reads like ``messages[0].content`` (``-`` for a bare string). The walk is a
    loop, not recursion, so any depth is safe.
    """
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, str):
            character = _lone_surrogate(item)
            if character:
                return where or "-", character
        elif isinstance(item, dict):
            for key, child in reversed(list(item.items())):
                name = f"{where}.{key}" if where else str(key)
                character = _lone_surrogate(str(key))
                if character:
                    return f"{where or '-'} (a key)", character
                stack.append((name, child))
        elif isinstance(item, list):
            stack.extend((f"{where}[{index}]", child) for index, child in reversed(list(enumerate(item))))
    return None


def surrogate_message(character: str) -> str:
    return f"lone surrogate U+{ord(character):04X}: expected valid Unicode text"


def check_unicode(value: Any, *, file: str | None = None, record: str | None = None) -> None:
    """Refuse a JSON value holding a lone surrogate: DataError naming record and field."""
    found = find_lone_surrogate(value)
    if found is not None:
        field, character = found
        if (
            isinstance(value, dict)
            and isinstance(value.get("id"), str)
            and value["id"]
            and not _lone_surrogate(value["id"])
        ):
            record = value["id"]
        raise DataError(surrogate_message(character), file=file, record=record, field=field)


def replace_lone_surrogates(text: str) -> tuple[str, int]:
    """``text`` with each lone surrogate replaced by U+FFFD, and how many were replaced."""
    return _SURROGATE.subn("\ufffd", text)


def parse_json_line(line: str, *, file: str, line_number: int) -> Any:
    """One JSON line; DataError naming ``file:line N`` (or the record id and field) for
    malformed JSON, nesting deeper than :data:`MAX_JSON_DEPTH` or a lone surrogate."""
    record = f"line {line_number}"
    try:
        value = _loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"malformed JSON ({error.msg} at column {error.colno})", file=file, record=record) from None
    except _TooDeep:
        raise DataError(depth_message(), file=file, record=record) from None
    if "\\ud" in line or "\\uD" in line:  # a surrogate escape, maybe one of a valid pair: the walk tells
        check_unicode(value, file=file, record=record)
    return value


def read_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, object)``; a malformed line raises a DataError naming it."""
    for line_number, line in iter_lines(path):
        yield line_number, parse_json_line(line, file=str(path), line_number=line_number)


def dumps(data: Any) -> str:
    """One JSON line. A lone surrogate (which UTF-8 cannot hold) becomes U+FFFD, with a
    warning naming the row, so a write never fails on text a model produced; input data
    never gets here with one (every reader refuses it)."""
    text = json.dumps(data, ensure_ascii=False)
    if _lone_surrogate(text):
        text, count = replace_lone_surrogates(text)
        row = data.get("id") if isinstance(data, dict) else None
        logger.warning(
            "row %s: %d lone surrogate%s replaced by U+FFFD before writing",
            ascii(row),
            count,
            "" if count == 1 else "s",
        )
    return text


def write_jsonl(path: str | Path, rows: Iterable[Any]) -> int:
    """Write rows to ``path`` atomically (temporary file, then rename). Returns the count."""
    from mmsafe.fileio import atomic_open

    count = 0
    with atomic_open(path, "w", fsync=False) as handle:  # the new file gets the user's umask, not 0600
        for row in rows:
            handle.write(dumps(row) + "\n")
            count += 1
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

    One writer per output: opening takes the output's lock (``<out>.lock``, see
    :class:`~mmsafe.data.outputs.OutputLock`) and holds it until :meth:`close` (or until
    the writer is dropped), so a second process on the same output is refused with a
    message naming the first. The existing lines are checked (each has a key) before the
    file is changed at all; only then is a last line without its newline dealt with: a
    complete record gets its newline, a fragment cut short by a crash is removed.
    """

    def __init__(self, path: str | Path, key: Callable[[dict[str, Any]], Hashable], *, fsync: bool = True) -> None:
        from mmsafe.data.outputs import OutputLock

        self.path = Path(path)
        self.key = key
        self.fsync = fsync
        if self.path.is_dir():
            raise DataError("expected a file, found a directory", file=str(self.path))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = OutputLock(self.path).acquire()
        try:
            self.done: set[Hashable] = set()
            #: Bytes of a line cut short by a crash, removed (a last line that is a whole
            #: record without its newline is kept and counted in :attr:`terminated_lines`).
            self.repaired_bytes = 0
            self.terminated_lines = 0
            self._read_existing()
        except BaseException:
            self.lock.release()
            raise

    def _add_key(self, row: Any, line_number: int) -> None:
        try:
            self.done.add(self.key(row))
        except (KeyError, TypeError, AttributeError):
            raise DataError(
                "existing output line has no key; is this the right output file?",
                file=str(self.path),
                record=f"line {line_number}",
            ) from None

    def _read_existing(self) -> None:
        """Collect the keys of the complete lines, then settle the last line (see the class)."""
        if not self.path.exists():
            return
        complete_bytes, tail, line_number = 0, b"", 0
        with open(self.path, "rb") as handle:
            for line_number, raw in enumerate(handle, start=1):
                if not raw.endswith(b"\n"):
                    tail = raw
                    break
                complete_bytes += len(raw)
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise DataError(
                        f"not valid UTF-8 ({error.reason})", file=str(self.path), record=f"line {line_number}"
                    ) from None
                if text.strip():
                    self._add_key(parse_json_line(text, file=str(self.path), line_number=line_number), line_number)
        if not tail:
            return
        try:
            row = parse_json_line(tail.decode("utf-8"), file=str(self.path), line_number=line_number)
        except (UnicodeDecodeError, DataError):
            row = _FRAGMENT
        if row is not _FRAGMENT:  # a whole record whose newline is missing: keep it
            self._add_key(row, line_number)
            with open(self.path, "ab") as handle:
                handle.write(b"\n")
                self._sync(handle)
            self.terminated_lines = 1
            logger.info("%s: line %d had no newline; added one (the record is kept)", self.path, line_number)
            return
        with open(self.path, "rb+") as handle:
            handle.truncate(complete_bytes)
            self._sync(handle)
        self.repaired_bytes = len(tail)

    def _sync(self, handle: IO[Any]) -> None:
        handle.flush()
        if self.fsync:
            os.fsync(handle.fileno())

    def __contains__(self, item_key: Hashable) -> bool:
        return item_key in self.done

    def write_batch(self, rows: Iterable[dict[str, Any]]) -> int:
        """Append the rows not yet written; flush (and fsync) before returning."""
        if not self.lock.held:
            raise ValueError(f"{self.path}: write to a closed ResumableJsonlWriter")
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
            self._sync(handle)
        return len(lines)

    def close(self) -> None:
        """Release the output's lock (the file itself is always complete on disk)."""
        self.lock.release()

    def __enter__(self) -> ResumableJsonlWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


#: Stands for a last line that is not a whole JSON value (None is a JSON value).
_FRAGMENT = object()
