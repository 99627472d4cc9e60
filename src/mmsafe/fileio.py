"""Atomic file writes that keep the user's umask.

A file written through a temporary file and ``os.replace`` is never seen half-written.
``tempfile`` creates that temporary file with mode 0600, which would leave every output
readable by its owner alone, whatever the umask (bad on a shared cluster, where a group
reads the results). Here the temporary file gets the mode a plain ``open(path, "w")``
would give a new file, ``0o666 & ~umask``, before it is renamed into place.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def current_umask() -> int:
    """The process's umask (from /proc on Linux, else read by setting and restoring it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The permission bits a new file gets from ``open(path, "w")``: ``0o666 & ~umask``."""
    return 0o666 & ~current_umask()


@contextmanager
def atomic_open(
    path: str | Path, mode: str = "w", *, encoding: str | None = "utf-8", fsync: bool = True
) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on a clean exit it replaces ``path``.

    On an exception (a kill, a full disk) the temporary file is removed and ``path`` is
    left as it was. The new file has the mode of a plain new file under the umask.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, mode, encoding=None if mode == "wb" else encoding) as handle:
            yield handle
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        os.chmod(temporary, new_file_mode())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str, *, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` whole or not at all, with the user's umask."""
    with atomic_open(path, "w", encoding=encoding) as handle:
        handle.write(text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all, with the user's umask."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)
