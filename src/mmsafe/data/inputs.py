"""One resolved input set: the records a stage reads, where they came from, where their images are.

Every stage that reads records (generation, blind responses, training, probes, pairwise
accuracy) opens them with :func:`open_inputs`, so the same rules hold everywhere:

- the source is a data file in any known format (detected unless named), a Hugging Face
  Hub id, records in memory, or an :class:`InputSet` already opened; a prompt-set JSONL
  (prompts without responses) is read only with ``prompt_sets=True``, for stages that
  only ask the prompts;
- ``split`` keeps the records whose ``meta.split`` is that split; records that do not say
  are kept;
- ``limit`` keeps the first ``limit`` records (a negative limit is refused);
- ids are unique (:func:`check_unique_ids`): outputs, cached reference log-probs and
  verdicts are keyed by id, so a repeated id would silently lose one of its records;
- an empty file is refused, naming the file;
- the image root is worked out once, by :func:`default_image_root`.

Image root, in order: an explicit root; for formats whose images are embedded in the
data (:data:`EMBEDDED_IMAGE_FORMATS`: HF parquet), ``images/`` beside the file (or inside
a folder of shards), where the images are written once and read from (a Hub id has no
folder, so it needs an explicit root); the root named by an image-root sidecar
(``<data>.image-root.yaml``, written by :func:`write_image_root_sidecar` for an output
whose records keep image paths relative to a folder elsewhere); else the data file's
folder. Image paths stay confined to the root
(:func:`mmsafe.data.images.resolve_image_path`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmsafe.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

#: Data formats whose images are inside the data file; they are written out under the image root.
EMBEDDED_IMAGE_FORMATS = ("hf",)
#: The name a prompt-set JSONL is read under (it is not a preference-record format).
PROMPT_SET_FORMAT = "prompts"
#: What :func:`open_inputs` says of a file with no records (the corpus and tests look for "no record").
NO_RECORDS = "no records in the file (expected at least one preference record)"
#: Beside a data file, the sidecar that names the folder its image paths are relative to.
IMAGE_ROOT_SIDECAR_SUFFIX = ".image-root.yaml"


@dataclass
class InputSet:
    """Records ready for a stage, with where they came from and where their images are."""

    records: list[Any]
    source: str | None = None
    """The data file or Hub id read (None for records in memory, unless the caller named them)."""
    image_root: Path | None = None
    """The folder record image paths are relative to (None: in-memory records with no root given)."""
    format_name: str | None = None
    """The format the file was read as (``prompts`` for a prompt set; None for records in memory)."""
    split: str | None = None
    images_written_to: Path | None = field(default=None, repr=False)
    """Where embedded images were written (embedded formats only)."""

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.records)


def source_name(data: Any, fallback: str | None = None) -> str | None:
    """What errors and sidecars call ``data``: the file or Hub id, an InputSet's source, else ``fallback``."""
    if isinstance(data, str | Path):
        return str(data)
    if isinstance(data, InputSet) and data.source is not None:
        return data.source
    return fallback


# ---------------------------------------------------------------- ids


class UniqueIds:
    """The ids seen so far; :meth:`problem` is the DataError of an id seen before.

    ``what`` names the id in the message (``record id`` for preference records, ``id`` for
    prompt items); the record named is the repeated id, the field ``id``.
    """

    def __init__(self, *, file: str | None = None, what: str = "id") -> None:
        self.file = file
        self.what = what
        self.first_seen: dict[str, int] = {}

    def problem(self, record_id: str, number: int | None = None) -> DataError | None:
        """None for a new id (remembered as record ``number``, default: the next); else the error."""
        if record_id in self.first_seen:
            return DataError(
                f"duplicate {self.what} (first used by record number {self.first_seen[record_id]}); "
                "ids must be unique: outputs, cached log-probs and verdicts are keyed by id",
                file=self.file,
                record=record_id,
                field="id",
            )
        self.first_seen[record_id] = number if number is not None else len(self.first_seen) + 1
        return None

    def check(self, record_id: str, number: int | None = None) -> None:
        """Raise the DataError of a repeated id."""
        problem = self.problem(record_id, number)
        if problem is not None:
            raise problem


def check_unique_ids(records: Iterable[Any], *, file: str | None = None, what: str = "id") -> None:
    """Raise a DataError naming the file, the first repeated id and the field ``id``."""
    ids = UniqueIds(file=file, what=what)
    for record in records:
        ids.check(record.id)


# ---------------------------------------------------------------- the image root


def image_root_sidecar_path(data: str | Path) -> Path:
    """``<data>.image-root.yaml``: where a data file's image root is named, when it is not its folder."""
    data = Path(data)
    return data.with_name(data.name + IMAGE_ROOT_SIDECAR_SUFFIX)


def write_image_root_sidecar(data: str | Path, image_root: str | Path, *, written_by: str) -> Path:
    """Name ``image_root`` as the folder the image paths of ``data`` are relative to.

    The root is stored relative to the sidecar's folder where it can be (so moving both
    folders together keeps it right), else absolute. Written atomically.
    """
    from mmsafe.data.sidecar import write_yaml_atomic

    sidecar = image_root_sidecar_path(data)
    root = Path(image_root).resolve()
    try:
        stored = Path(os.path.relpath(root, sidecar.parent.resolve())).as_posix()
    except ValueError:  # another drive (Windows): no relative path exists
        stored = str(root)
    write_yaml_atomic(sidecar, {"image_root": stored, "records": Path(data).name, "written_by": written_by})
    return sidecar


def read_image_root_sidecar(data: str | Path) -> Path | None:
    """The image root named beside ``data`` (None when there is no sidecar); a ConfigError names a bad one."""
    from mmsafe.data.sidecar import read_sidecar

    sidecar = image_root_sidecar_path(data)
    if not sidecar.is_file():
        return None
    content = read_sidecar(sidecar, output=data) or {}
    stored = content.get("image_root")
    if not isinstance(stored, str) or not stored:
        raise ConfigError(
            f"{sidecar}: image_root: expected the folder the image paths of {Path(data).name} are relative to, got {stored!r}"
        )
    root = (sidecar.parent / stored).resolve()
    if not root.is_dir():
        raise ConfigError(
            f"{sidecar}: image_root: {root} is not a folder (moved?); give image_root, or restore the folder"
        )
    return root


def _embeds_images(path: Path, format_name: str | None) -> bool:
    if format_name is not None:
        return format_name in EMBEDDED_IMAGE_FORMATS
    if not path.exists():
        return False
    from mmsafe.data.formats import detect_format

    try:
        return detect_format(path) in EMBEDDED_IMAGE_FORMATS
    except DataError:  # not a known format: its reader says so
        return False


def default_image_root(data: Any, image_root: str | Path | None, *, format_name: str | None = None) -> Path | None:
    """The folder record image paths are relative to (see the module docstring for the order).

    ``data`` is a path, a Hub id, an :class:`InputSet` (its root) or records in memory
    (None unless ``image_root`` is given). A Hub id whose images are embedded needs
    ``image_root`` (a ConfigError otherwise): there is no folder to write them beside.
    """
    if image_root is not None:
        return Path(image_root)
    if isinstance(data, InputSet):
        return data.image_root
    if not isinstance(data, str | Path):
        return None
    from mmsafe.data.formats.hf import is_hub_id

    path = Path(data)
    if (format_name is None or format_name in EMBEDDED_IMAGE_FORMATS) and is_hub_id(data):
        raise ConfigError(
            f"image_root: data {data} is a Hugging Face Hub id whose images are embedded; set image_root to the folder to write them to"
        )
    if _embeds_images(path, format_name):
        return (path if path.is_dir() else path.parent) / "images"
    named = read_image_root_sidecar(path)
    if named is not None:
        logger.info("%s: image paths are relative to %s (named in %s)", path, named, image_root_sidecar_path(path).name)
        return named
    return path.parent


# ---------------------------------------------------------------- reading


def open_inputs(
    data: Any,
    *,
    format_name: str | None = None,
    split: str | None = None,
    limit: int | None = None,
    image_root: str | Path | None = None,
    prompt_sets: bool = False,
    image_dir: str | Path | None = None,
    source: str | None = None,
    empty: str = NO_RECORDS,
) -> InputSet:
    """Open ``data`` as an :class:`InputSet` (the rules are in the module docstring).

    Args:
        data: a data file (any known format), a Hub id, records in memory or an InputSet.
        format_name: the file's format (default: detected).
        split: keep records whose ``meta.split`` is this (records without one are kept).
        limit: keep the first ``limit`` records.
        image_root: the folder image paths are relative to (default: :func:`default_image_root`).
        prompt_sets: read a prompt-set JSONL too (prompts only; for stages that only ask them).
        image_dir: where embedded images (``hf``) are written (default: the image root,
            which then defaults to this folder).
        source: names records passed in memory, for errors (a file name).
        empty: the message for a file with no records (a split in use is added to it).
    """
    if limit is not None and limit < 0:
        raise ConfigError(f"limit: expected a non-negative integer, got {limit!r}")
    file: str | None = None
    written_to: Path | None = None
    items: Iterable[Any]
    if isinstance(data, InputSet):
        items, name, fmt = data.records, data.source, data.format_name
        root = Path(image_root) if image_root is not None else data.image_root
    elif isinstance(data, str | Path):
        file = name = str(data)
        if prompt_sets and format_name is None and _is_prompt_set(data):
            from mmsafe.data.prompts import read_prompt_set

            fmt = PROMPT_SET_FORMAT
            root = default_image_root(data, image_root, format_name=fmt)
            items = read_prompt_set(data, image_root=root)
        else:
            from mmsafe.data.formats import detect_format, read_records

            fmt = format_name or detect_format(data)  # a DataError for a missing file or an unknown format
            if fmt in EMBEDDED_IMAGE_FORMATS:
                root = default_image_root(data, image_root if image_root is not None else image_dir, format_name=fmt)
                written_to = Path(image_dir) if image_dir is not None else root
            else:
                root = default_image_root(data, image_root, format_name=fmt)
            items = read_records(data, fmt, image_dir=written_to)
    else:
        items, name, fmt = data, source, None
        root = Path(image_root) if image_root is not None else None
    ids = UniqueIds(file=file or source, what="record id")
    records: list[Any] = []
    for record in items:
        if limit is not None and len(records) >= limit:
            break
        ids.check(record.id)  # before the split filter: one id is one record across splits
        if split is not None and record.meta.get("split", split) != split:
            continue
        records.append(record)
    if file is not None and not records and limit != 0:
        raise DataError(empty if split is None else f"{empty} (split: {split})", file=file)
    return InputSet(records, source=name, image_root=root, format_name=fmt, split=split, images_written_to=written_to)


def _is_prompt_set(data: str | Path) -> bool:
    from mmsafe.data.prompts import is_prompt_set

    return is_prompt_set(data)


def load_records(
    data: Any,
    *,
    limit: int | None = None,
    format_name: str | None = None,
    prompt_sets: bool = False,
    image_root: str | Path | None = None,
) -> list[Any]:
    """The records of :func:`open_inputs` alone (for callers that resolve the image root apart)."""
    return open_inputs(
        data, limit=limit, format_name=format_name, prompt_sets=prompt_sets, image_root=image_root
    ).records
