"""One resumable output: what every stage that answers records one by one has in common.

Generation, blind answers, probes and judging all write an append-only JSONL output
keyed by row, and all keep the same promises (see ``RELIABILITY.md``):

- **Settings first.** The settings that change a row are saved in a sidecar
  (``<out>.config.yaml``, :mod:`mmsafe.data.sidecar`); a rerun whose settings differ from
  those of the rows already written is refused with the list of changes
  (``field: old -> new``) before the output is touched, not even its last line.
- **One writer.** The output is locked (:class:`~mmsafe.data.outputs.OutputLock`, through
  :class:`~mmsafe.data.jsonl.ResumableJsonlWriter`) until :meth:`ResumableOutput.close`.
- **A crash loses at most the batch in flight.** A last line cut short is removed, rows
  are appended a batch at a time and flushed; a key already written is never written again.
- **Resume by content.** Each row may carry a hash of the input it answers
  (``content_field``). A row whose input changed is *stale*: it is removed (the file is
  rewritten atomically) and its input is asked again. Rows of inputs that are gone are
  *removed from the input*: kept in the output, and counted.
- **Failures are listed, not written.** Inputs that could not be answered are listed in
  ``<out>.failed.jsonl`` (rewritten atomically; removed once none is left) and no row is
  written for them, so a rerun asks them again.
- **Data parallel.** Under a launcher (:class:`Launch` with ``world_size > 1``) each
  process writes its own part file (``.<out>.part-<rank>.jsonl``, resumable and locked
  the same way); the first process owns the output and the parts of ranks no longer
  running, and merges every part into the output at the end.

A stage reads like this::

    output = ResumableOutput(out, key=row_key, scope=is_mine, settings=current,
                             sidecar=config, settings_at=("resume", variant), what="responses").open()
    with output:
        output.compare_inputs(hashes)          # stale rows dropped, removed inputs counted
        output.write_sidecar(stamp(config))    # before the first new row
        for batch in batches(output.todo(items, key_of)):
            output.append(rows_of(batch))
        output.close(order=input_keys)         # merge parts, input order, lock released

Which rows are the stage's own (``scope``: one variant, one judge) matters because one
output may hold several: only those rows are checked, compared, dropped and reordered;
every other row keeps its line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Generic, TypeVar

from mmsafe.data.jsonl import ResumableJsonlWriter, parse_json_line, write_jsonl
from mmsafe.data.sidecar import read_sidecar, settings_changes, write_yaml_atomic
from mmsafe.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

Item = TypeVar("Item")
Key = TypeVar("Key", bound=Hashable)


def _no_barrier() -> None:
    return None


@dataclass(frozen=True)
class Launch:
    """This process's place among data-parallel workers, and how to wait for the others."""

    rank: int = 0
    world_size: int = 1
    barrier: Callable[[], None] = field(default=_no_barrier, compare=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def failed_path_for(out_path: str | Path, rank: int | None = None) -> Path:
    """``<out>.failed.jsonl`` (``<out>.failed-rank<N>.jsonl`` per process under data parallelism)."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + (".failed.jsonl" if rank is None else f".failed-rank{rank}.jsonl"))


def part_path_for(out_path: Path, rank: int) -> Path:
    """The part file one process writes under a launcher: ``.<out>.part-<rank>.jsonl``."""
    return out_path.with_name(f".{out_path.name}.part-{rank}.jsonl")


def part_paths(out_path: Path) -> list[Path]:
    """Every part file beside ``out_path``, of this launch or an earlier one."""
    return sorted(out_path.parent.glob(f".{out_path.name}.part-*.jsonl"))


def rank_of_part(path: Path) -> int | None:
    try:
        return int(path.name.rsplit("part-", 1)[1].removesuffix(".jsonl"))
    except (IndexError, ValueError):
        return None


def complete_rows(path: Path) -> list[tuple[int, Any]]:
    """``(line number, row)`` of every complete line, without repairing the file.

    A last line without its newline (cut short by a crash, or not) is not read: this is
    what a check may look at before anything is changed.
    """
    if not path.exists():
        return []
    with open(path, "rb") as handle:
        data = handle.read()
    rows = []
    for number, raw in enumerate(data.split(b"\n")[:-1], start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise DataError(f"not valid UTF-8 ({error.reason})", file=str(path), record=f"line {number}") from None
        if text.strip():
            rows.append((number, parse_json_line(text, file=str(path), line_number=number)))
    return rows


def drop_rows(path: Path, drop: Callable[[Any], bool]) -> int:
    """Rewrite ``path`` (atomically, keeping its permissions) without the rows ``drop`` picks; how many went."""
    if not path.exists():
        return 0
    rows = [row for _, row in complete_rows(path)]
    kept = [row for row in rows if not drop(row)]
    if len(kept) != len(rows):
        mode = path.stat().st_mode & 0o777
        write_jsonl(path, kept)
        path.chmod(mode)  # the rewrite goes through a temporary file with the umask's mode; keep the file's own
    return len(rows) - len(kept)


def nested(mapping: Mapping[str, Any] | None, keys: Sequence[str]) -> Any:
    """``mapping[k1][k2]...``, or None where a level is missing or not a mapping."""
    value: Any = mapping
    for name in keys:
        if not isinstance(value, Mapping):
            return None
        value = value.get(name)
    return value


def stamp(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` with the mmsafe version and the time, as every sidecar entry ends."""
    from mmsafe import __version__

    return {
        **settings,
        "mmsafe_version": __version__,
        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _sort_key(key: Hashable) -> Any:
    return tuple(str(part) for part in key) if isinstance(key, tuple) else str(key)


class ResumableOutput(Generic[Key]):
    """An append-only JSONL output keyed by ``key(row)``, resumed by settings and by content.

    Args:
        path: the output file.
        key: the key of a row (``(id, variant)``; ``(id, variant, judge)``). Inputs are
            named by the key their row will have.
        scope: which rows are this run's own (default: every row that is a mapping).
        settings: the settings that change a row, flat; None checks nothing.
        sidecar: the settings file beside the output; None when there is none.
        settings_at: where ``settings`` of this scope are kept inside the sidecar.
        what: what the rows are, for messages (``responses for variant 'default'``).
        advice: the end of the refusal message.
        content_field: the row field holding its input's hash (rows without it are trusted).
        launch: this process's place under a launcher (default: a single process).
        fsync: whether each appended batch is fsynced.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        key: Callable[[dict[str, Any]], Key],
        scope: Callable[[dict[str, Any]], bool] | None = None,
        settings: Mapping[str, Any] | None = None,
        sidecar: str | Path | None = None,
        settings_at: Sequence[str] = ("resume",),
        what: str = "rows",
        advice: str = "write to a new output file",
        content_field: str | None = None,
        launch: Launch | None = None,
        fsync: bool = True,
    ) -> None:
        self.path = Path(path)
        self.key = key
        self._scope = scope
        self.settings = None if settings is None else dict(settings)
        self.sidecar = None if sidecar is None else Path(sidecar)
        self.settings_at = tuple(settings_at)
        self.what = what
        self.advice = advice
        self.content_field = content_field
        self.launch = launch or Launch()
        self.fsync = fsync
        #: The sidecar as it was before this run (None when there was none).
        self.previous: dict[str, Any] | None = None
        #: This scope's rows in the output (and every part, under a launcher), once opened.
        self.rows: list[dict[str, Any]] = []
        #: Keys of every row written (any scope), once opened; grows with :meth:`append`.
        self.done: set[Key] = set()
        #: Keys whose row answered another input than the current one (dropped, to redo).
        self.stale: set[Key] = set()
        #: Keys of this scope's rows whose input is gone (kept in the output), sorted.
        self.removed: list[Key] = []
        #: Entries for :meth:`write_failed`: inputs this run could not answer.
        self.failed: list[dict[str, Any]] = []
        self._main: ResumableJsonlWriter | None = None
        self._part: ResumableJsonlWriter | None = None

    # ------------------------------------------------------------ opening

    def ours(self, row: Any) -> bool:
        return isinstance(row, dict) and (self._scope is None or self._scope(row))

    def _parts(self) -> list[Path]:
        return part_paths(self.path) if self.launch.distributed else []

    def _own_part(self) -> Path:
        return part_path_for(self.path, self.launch.rank)

    def _check_settings(self) -> None:
        old = nested(self.previous, self.settings_at)
        if not isinstance(old, dict) or self.settings is None:
            return  # no saved settings (an output from before sidecars): nothing to compare
        changes = settings_changes(old, self.settings)
        if changes:
            raise ConfigError(
                f"{self.path}: already holds {self.what} made with other settings ({'; '.join(changes)}); "
                f"rerun with the same settings to resume, or {self.advice}"
            )

    def _key_of(self, row: Any, path: Path, line: int) -> Key:
        try:
            return self.key(row)
        except (KeyError, TypeError, AttributeError):
            raise DataError(
                "existing output line has no key; is this the right output file?", file=str(path), record=f"line {line}"
            ) from None

    def open(self) -> ResumableOutput[Key]:
        """Check the settings, take the lock, repair a line cut short, read what is written.

        The settings are compared with the sidecar before the output is touched at all;
        a change raises :class:`~mmsafe.errors.ConfigError` listing every ``field: old -> new``.
        """
        paths = [self.path, *self._parts()]
        if self.sidecar is not None:
            self.previous = read_sidecar(self.sidecar, output=self.path)
        if any(self.ours(row) for path in paths for _, row in complete_rows(path)):
            self._check_settings()
        try:
            if self.launch.is_main:
                self._main = ResumableJsonlWriter(self.path, key=self.key, fsync=self.fsync)
            if self.launch.distributed:
                self._part = ResumableJsonlWriter(self._own_part(), key=self.key, fsync=self.fsync)
            for writer in (self._main, self._part):
                if writer is not None and writer.repaired_bytes:
                    logger.warning(
                        "%s: removed a line cut short by an earlier crash (%d bytes)",
                        writer.path,
                        writer.repaired_bytes,
                    )
            # Every process reads the same rows (once each owner has repaired its file), so
            # under a launcher they agree on what is left to do and on the shards.
            self.launch.barrier()
            self.rows, self.done = [], set()
            for path in paths:
                for line, row in complete_rows(path):
                    self.done.add(self._key_of(row, path, line))
                    if self.ours(row):
                        self.rows.append(row)
        except BaseException:
            self.release()
            raise
        return self

    def compare_inputs(self, hashes: Mapping[Key, str | None]) -> None:
        """Compare this scope's rows with the inputs' content hashes (by key).

        A row whose stored hash differs from its input's is dropped from the output, so
        the input is asked again (:attr:`stale`); rows of keys not in ``hashes`` stay and
        are listed in :attr:`removed`. Rows without a stored hash predate content keys
        and are trusted.
        """
        written = {self.key(row): row.get(self.content_field) if self.content_field else None for row in self.rows}
        self.stale = {key for key, sha in written.items() if key in hashes and sha is not None and sha != hashes[key]}
        self.removed = sorted((key for key in written if key not in hashes), key=_sort_key)
        if self.stale:
            self._drop(self.stale)

    def _drop(self, keys: set[Key]) -> None:
        """Remove this scope's rows of ``keys``; each process rewrites only files it owns.

        The first process owns the output and the parts of ranks no longer running, every
        process its own part. A kill in between leaves the input unanswered, which the next
        run asks.
        """

        def picked(row: Any) -> bool:
            return self.ours(row) and self.key(row) in keys

        self.launch.barrier()
        if self.launch.is_main:
            drop_rows(self.path, picked)
            for path in self._parts():
                rank = rank_of_part(path)
                if rank is None or rank >= self.launch.world_size:
                    drop_rows(path, picked)
        if self.launch.distributed:
            drop_rows(self._own_part(), picked)
        self.launch.barrier()
        for writer in (self._main, self._part):
            if writer is not None:
                writer.done.difference_update(keys)
        self.done.difference_update(keys)
        self.rows = [row for row in self.rows if self.key(row) not in keys]

    def write_sidecar(self, data: Mapping[str, Any]) -> None:
        """Save the settings file (atomically, with its checksum), then wait for the others.

        Written before the first new row, not at the end: a run killed midway must still
        leave the settings its rows were made with.
        """
        if self.launch.is_main and self.sidecar is not None:
            write_yaml_atomic(self.sidecar, data)
        self.launch.barrier()

    # ------------------------------------------------------------ writing

    def todo(self, items: Iterable[Item], key_of: Callable[[Item], Key]) -> list[Item]:
        """The items without a row yet, in their order (every process gets the same list)."""
        return [item for item in items if key_of(item) not in self.done]

    def shard(self, items: Sequence[Item]) -> list[Item]:
        """This process's share of ``items``: every ``world_size``-th, from its rank."""
        return list(items[self.launch.rank :: self.launch.world_size])

    def append(self, rows: Iterable[dict[str, Any]]) -> int:
        """Append the rows not yet written (to this process's part under a launcher); flushed before it returns."""
        writer = self._part if self._part is not None else self._main
        if writer is None:
            raise ValueError(f"{self.path}: append to an output that is not open")
        rows = list(rows)
        written = writer.write_batch(rows)
        self.done.update(self.key(row) for row in rows)
        return written

    def fail(self, entries: Iterable[dict[str, Any]]) -> None:
        """Note inputs this run could not answer (listed by :meth:`write_failed`; no row is written)."""
        self.failed.extend(entries)

    @property
    def failed_path(self) -> Path:
        return failed_path_for(self.path, self.launch.rank if self.launch.distributed else None)

    def write_failed(self) -> Path | None:
        """Rewrite the failed list: other scopes' entries kept, this scope's replaced by this run's.

        Returns the list's path while this run has failures; with none left in any scope
        the list (a file this stage wrote) is removed.
        """
        path = self.failed_path
        entries = []
        if path.exists():
            try:
                entries = [row for _, row in complete_rows(path) if isinstance(row, dict) and not self.ours(row)]
            except DataError:
                entries = []  # our own list, damaged: this run's entries replace it
        entries += self.failed
        if entries:
            write_jsonl(path, entries)  # atomic, with the user's umask
            return path if self.failed else None
        if path.exists():
            path.unlink()
        return None

    # ------------------------------------------------------------ closing

    def close(self, order: Sequence[Key] | None = None) -> None:
        """Merge the parts into the output (first process), put rows in input order, release the lock.

        ``order`` lists keys in input order: once each has a row, this scope's rows are
        sorted among the lines they occupy (batches are written in order of size, not of
        input); every other row keeps its line.
        """
        try:
            self.launch.barrier()
            main = self._main
            if main is not None and self.launch.distributed:
                for path in self._parts():
                    main.write_batch(row for _, row in complete_rows(path))
                for path in self._parts():
                    path.unlink()
            if main is not None and order is not None and all(key in main.done for key in order):
                self._reorder(order)
        finally:
            self.release()

    def _reorder(self, order: Sequence[Key]) -> None:
        position = {key: index for index, key in enumerate(order)}
        rows = [row for _, row in complete_rows(self.path)]

        def placed(row: Any) -> bool:
            return self.ours(row) and self.key(row) in position

        in_order = iter(sorted((row for row in rows if placed(row)), key=lambda row: position[self.key(row)]))
        ordered = [next(in_order) if placed(row) else row for row in rows]
        if ordered != rows:
            mode = self.path.stat().st_mode & 0o777
            write_jsonl(self.path, ordered)
            self.path.chmod(mode)

    def release(self) -> None:
        """Release the locks (idempotent); the files are complete on disk at every moment."""
        for writer in (self._part, self._main):
            if writer is not None:
                writer.close()

    def __enter__(self) -> ResumableOutput[Key]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
