"""Who owns an output: one writer at a time, never an input, and the files a stage wrote.

Three promises keep a user's files safe from mmsafe itself:

- **One writer per output.** :class:`OutputLock` holds an advisory lock
  (``fcntl.flock``, non-blocking) on ``<out>.lock`` for as long as a run writes ``out``.
  A second process asking for the same output is refused at once with a message naming
  the first (its pid and command are written into the lock file). The kernel drops the
  lock when its holder dies, so a killed run never blocks its restart; a lock file left
  by a killed run is reused, and removed by the next run that finishes.
- **An output is never an input.** :func:`check_output_is_not_an_input` compares resolved
  paths and ``os.path.samefile`` (symlinks, hard links, ``./a/../b`` spellings), before
  anything is opened for writing.
- **Only what a stage wrote is removed.** :func:`snapshot` and :func:`created_since`
  list the files a stage created under a folder (everything there before it ran is not
  its own); :func:`remove_created` removes exactly those, and only while they are still
  what was written (same size and modification time), plus the folders the stage made
  once they are empty.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmsafe.errors import ConfigError, MmsafeError

LOCK_SUFFIX = ".lock"
#: How long a refused process waits for the holder to finish writing its name (it writes
#: it right after taking the lock, so this only matters in that instant).
_NAME_WAIT_SECONDS = 0.5


class OutputBusyError(MmsafeError):
    """Another process is writing the same output."""


def lock_path_for(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + LOCK_SUFFIX)


def _holder_text(lock_file: Path) -> str:
    """``pid N: command`` of the lock's holder, read back from the lock file."""
    deadline = time.monotonic() + _NAME_WAIT_SECONDS
    while True:
        try:
            holder = json.loads(lock_file.read_text(encoding="utf-8"))
            return f"pid {int(holder['pid'])}: {holder.get('command') or '?'}"
        except (OSError, ValueError, KeyError, TypeError):
            if time.monotonic() >= deadline:
                return "pid unknown"
            time.sleep(0.01)


@dataclass
class _Held:
    pid: int
    descriptor: int
    count: int


class OutputLock:
    """An exclusive, non-blocking advisory lock on ``<output>.lock`` (or ``lock_file``).

    >>> with OutputLock(out_path):
    ...     write(out_path)

    Re-entrant within one process (two writers of one process on one output share it);
    a process forked from the holder does not hold it.
    """

    _held: dict[str, _Held] = {}  # noqa: RUF012 (one table per process, by design)

    def __init__(self, output: str | Path, *, lock_file: str | Path | None = None) -> None:
        self.output = Path(output)
        self.lock_file = Path(lock_file) if lock_file is not None else lock_path_for(self.output)
        self._key = str(self.lock_file.parent.resolve() / self.lock_file.name)
        self.held = False

    def acquire(self) -> OutputLock:
        if self.held:
            return self
        held = self._held.get(self._key)
        if held is not None and held.pid == os.getpid():
            held.count += 1
            self.held = True
            return self
        if held is not None:  # inherited through a fork: the parent's lock, not ours
            del self._held[self._key]
            os.close(held.descriptor)
        self.lock_file.parent.mkdir(parents=True, exist_ok=True)
        while True:
            descriptor = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                os.close(descriptor)
                if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise OutputBusyError(
                    f"{self.output}: another mmsafe process is writing this output ({_holder_text(self.lock_file)}); "
                    f"wait for it to finish, or write to another output (lock file {self.lock_file})"
                ) from None
            # The holder before us may have removed the file between our open and our lock:
            # then we locked a file nobody else will look at, so open the path again.
            try:
                same = os.path.samestat(os.fstat(descriptor), os.stat(self.lock_file))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(descriptor)
        holder = {
            "pid": os.getpid(),
            "command": " ".join(sys.argv) or sys.executable,
            "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, (json.dumps(holder) + "\n").encode("utf-8"), 0)
        self._held[self._key] = _Held(os.getpid(), descriptor, 1)
        self.held = True
        return self

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        held = self._held.get(self._key)
        if held is None or held.pid != os.getpid():
            return
        held.count -= 1
        if held.count > 0:
            return
        del self._held[self._key]
        # Removed while still locked, so nobody can lock the old file after this (see acquire).
        try:
            if os.path.samestat(os.fstat(held.descriptor), os.stat(self.lock_file)):
                self.lock_file.unlink()
        except OSError:
            pass
        os.close(held.descriptor)

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: the kernel drops the lock anyway
            self.release()


# ---------------------------------------------------------------- outputs are not inputs


def same_file(first: str | Path, second: str | Path) -> bool:
    """Whether two paths name one file: equal once resolved, or ``os.path.samefile``."""
    first, second = Path(first), Path(second)
    if first.resolve() == second.resolve():
        return True
    try:
        return os.path.samefile(first, second)
    except OSError:  # one of them does not exist (yet): not the same file
        return False


def check_output_is_not_an_input(output: str | Path, inputs: Iterable[Any], *, what: str = "output") -> None:
    """Refuse ``output`` if it is one of ``inputs`` (paths; anything else is skipped).

    Called before the output is opened, so a refused run leaves the input untouched.
    """
    for source in inputs:
        if isinstance(source, str | Path) and same_file(output, source):
            raise ConfigError(
                f"{output}: this {what} is the input file {source}; writing it would change the input, so nothing was written: choose another output file"
            )


# ---------------------------------------------------------------- what a stage wrote


@dataclass
class Snapshot:
    """Files (relative path -> ``[size, mtime_ns]``) and folders under a root."""

    files: dict[str, list[int]] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=set)


def snapshot(root: Path, *, exclude: Iterable[str] = ()) -> Snapshot:
    """Every file and folder under ``root`` (symlinks are listed, never followed);
    ``exclude`` names top-level entries to leave out."""
    excluded = set(exclude)
    result = Snapshot()
    if not root.is_dir():
        return result
    for folder, dirnames, filenames in os.walk(root):
        relative_folder = Path(folder).relative_to(root)
        if relative_folder == Path("."):
            dirnames[:] = [name for name in dirnames if name not in excluded]
            filenames = [name for name in filenames if name not in excluded]
        for name in dirnames:
            path = Path(folder) / name
            if path.is_symlink():
                filenames.append(name)  # a link to a folder is an entry, not a folder to enter
            else:
                result.dirs.add((relative_folder / name).as_posix())
        dirnames[:] = [name for name in dirnames if not (Path(folder) / name).is_symlink()]
        for name in filenames:
            try:
                stat = os.lstat(Path(folder) / name)
            except FileNotFoundError:  # removed while we looked
                continue
            result.files[(relative_folder / name).as_posix()] = [stat.st_size, stat.st_mtime_ns]
    return result


def created_since(
    root: Path, before_files: Iterable[str], before_dirs: Iterable[str], *, exclude: Iterable[str] = ()
) -> Snapshot:
    """What is under ``root`` now and was not before."""
    now = snapshot(root, exclude=exclude)
    old_files, old_dirs = set(before_files), set(before_dirs)
    return Snapshot(
        {name: stamp for name, stamp in now.files.items() if name not in old_files},
        {name for name in now.dirs if name not in old_dirs},
    )


@dataclass
class Removal:
    removed: list[str] = field(default_factory=list)
    #: ``path (why)`` of each file or folder left in place.
    left: list[str] = field(default_factory=list)


def remove_created(root: Path, files: dict[str, list[int] | None], dirs: Iterable[str]) -> Removal:
    """Remove ``files`` (relative to ``root``) and then the empty ones of ``dirs``.

    A file with a stamp is removed only while its size and modification time still are
    the stamp's (what was written); one without a stamp only while it exists. Anything
    else is left in place and named in :attr:`Removal.left`.
    """
    result = Removal()
    for name, stamp in sorted(files.items()):
        path = root / name
        try:
            stat = os.lstat(path)
        except FileNotFoundError:
            continue
        if stamp is not None and [stat.st_size, stat.st_mtime_ns] != list(stamp):
            result.left.append(f"{path} (changed since mmsafe wrote it)")
            continue
        if path.is_dir() and not path.is_symlink():
            result.left.append(f"{path} (now a folder)")
            continue
        path.unlink()
        result.removed.append(str(path))
    for name in sorted(dirs, key=lambda item: item.count("/"), reverse=True):  # deepest first
        path = root / name
        if not path.is_dir() or path.is_symlink():
            continue
        try:
            path.rmdir()
        except OSError:
            result.left.append(f"{path} (holds files mmsafe did not write)")
            continue
        result.removed.append(str(path))
    return result
