"""Data formats, found by name: read any of them as preference records, write some.

=============  ==========================================================  ======
name           what                                                        writes
=============  ==========================================================  ======
``jsonl``      our preference records (one JSON object per line)           yes
``mmsafe-po``  the released MMSafe-PO JSON array (lossless round trip)     yes
``hf``         Hugging Face parquet: file, folder of shards or Hub id      no
``hh-rlhf``    HH-RLHF ``chosen``/``rejected`` dialogues, ``.jsonl[.gz]``  no
=============  ==========================================================  ======

Formats are an open set: :func:`register_format` adds one, and packages can provide
:class:`Format` objects through the ``mmsafe.formats`` entry-point group (an entry point
``tsv = "package.module:FORMAT"``; its name is the format's name).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmsafe.data.formats import hf, hh_rlhf, mmsafe_po, records_jsonl
from mmsafe.data.formats.base import Format, Item
from mmsafe.data.records import PreferenceRecord
from mmsafe.errors import DataError
from mmsafe.progress import track
from mmsafe.registry import Registry

__all__ = [
    "FORMATS",
    "ConvertResult",
    "Format",
    "Item",
    "convert",
    "detect_format",
    "get_format",
    "read_items",
    "read_records",
    "register_format",
    "write_records",
]

ENTRY_POINT_GROUP = "mmsafe.formats"


def _as_format(name: str, target: Any) -> Format:
    if not isinstance(target, Format):
        raise TypeError("a mmsafe.data.formats.Format")
    return target if target.name == name else dataclasses.replace(target, name=name)


#: Every known format by name, in the order detection tries them (plugins last).
FORMATS: Registry[Format] = Registry(
    "data format",
    group=ENTRY_POINT_GROUP,
    describe=lambda data_format: data_format.description,
    adapt=_as_format,
    unknown_error=DataError,
)


def register_format(data_format: Format, *, replace: bool = False) -> Format:
    """Make ``data_format`` available by name (to the CLI's ``--format`` too)."""
    return FORMATS.register(data_format.name, data_format, replace=replace)


for _builtin in (hf.FORMAT, mmsafe_po.FORMAT, hh_rlhf.FORMAT, records_jsonl.FORMAT):
    register_format(_builtin)


def _names() -> str:
    return ", ".join(FORMATS)


def get_format(name: str) -> Format:
    """The format called ``name``; a DataError lists the known names otherwise."""
    return FORMATS.lookup(name)


def detect_format(path: str | Path) -> str:
    """The name of the format ``path`` looks like (by suffix and first record)."""
    for name, data_format in FORMATS.available().items():
        if data_format.detect(path):
            return name
    if not Path(path).exists():
        raise DataError("file not found", file=str(path))
    raise DataError(
        "cannot tell the data format (expected records .jsonl, released .json, .parquet or a folder of them, "
        f"or HH-RLHF .jsonl[.gz]); name it with --format, one of {_names()}",
        file=str(path),
    )


def read_items(
    path: str | Path, format_name: str | None = None, *, image_dir: str | Path | None = None
) -> Iterator[Item]:
    """Records of ``path``, with a DataError in place of each record that could not be read."""
    data_format = get_format(format_name or detect_format(path))
    return data_format.read_items(path, image_dir=image_dir)


def read_records(
    path: str | Path, format_name: str | None = None, *, image_dir: str | Path | None = None
) -> Iterator[PreferenceRecord]:
    """Stream the preference records of ``path`` in any format (detected unless named).

    ``image_dir``: where the ``hf`` format writes embedded images (record ``image`` names
    are relative to it); other formats ignore it. The first bad record raises its
    DataError; use :func:`mmsafe.data.validate.validate_file` to list every problem.
    """
    data_format = get_format(format_name or detect_format(path))
    return data_format.reader(path, image_dir=image_dir)


def _writable(formats: dict[str, Format]) -> str:
    return ", ".join(name for name, data_format in formats.items() if data_format.writer is not None)


def _output_format(path: str | Path) -> str:
    name = Path(path).name
    formats = FORMATS.available()
    for format_name, data_format in formats.items():
        if data_format.writer is not None and name.endswith(data_format.suffixes):
            return format_name
    writable = _writable(formats)
    raise DataError(
        f"cannot tell the output format from the file name; name it with --to, one of {writable}", file=str(path)
    )


def write_records(path: str | Path, records: Iterable[PreferenceRecord], format_name: str | None = None) -> int:
    """Write records in a format (from the file name unless named); returns rows written."""
    data_format = get_format(format_name or _output_format(path))
    if data_format.writer is None:
        raise DataError(
            f"the {data_format.name!r} format can be read but not written; write one of {_writable(FORMATS.available())}",
            file=str(path),
        )
    return data_format.writer(Path(path), records)


@dataclass
class ConvertResult:
    """What :func:`convert` did."""

    input: str
    output: str
    from_format: str
    to_format: str
    records: int
    rows: int
    images_written: int = 0
    image_dir: str | None = None

    def summary(self) -> str:
        text = f"converted {self.records} records ({self.from_format}) from {self.input} to {self.rows} rows ({self.to_format}) in {self.output}"
        if self.image_dir is not None:
            text += f"; {self.images_written} images written to {self.image_dir}"
        return text


def convert(
    input: str | Path,
    output: str | Path,
    *,
    from_format: str | None = None,
    to_format: str | None = None,
    image_dir: str | Path | None = None,
) -> ConvertResult:
    """Convert a data file between formats.

    Embedded images (``hf`` input) go to ``image_dir``, by default ``images/`` beside the
    output; record image paths are then written relative to the output's folder when
    ``image_dir`` lies inside it, so that folder is the image root.
    """
    source = get_format(from_format or detect_format(input))
    target = get_format(to_format or _output_format(output))
    if target.writer is None:
        write_records(output, [], target.name)  # raises the "cannot be written" error
    output = Path(output)
    writer = None
    prefix = ""
    if source.name == hf.FORMAT.name:
        image_dir = Path(image_dir) if image_dir is not None else output.parent / "images"
        relative = os.path.relpath(Path(image_dir).resolve(), output.parent.resolve())
        if not relative.startswith(".."):
            prefix = "" if relative == "." else Path(relative).as_posix() + "/"
        writer = hf.ImageWriter(image_dir)
    counted = 0

    def records() -> Iterator[PreferenceRecord]:
        nonlocal counted
        items = hf.iter_items(input, writer) if writer is not None else source.read_items(input, image_dir=image_dir)
        for item in track(items, desc=f"convert {source.name} -> {target.name}", unit="record"):
            if isinstance(item, DataError):
                raise item
            if prefix and item.image is not None:
                item.image = prefix + item.image
            counted += 1
            yield item

    rows = write_records(output, records(), target.name)
    return ConvertResult(
        input=str(input),
        output=str(output),
        from_format=source.name,
        to_format=target.name,
        records=counted,
        rows=rows,
        images_written=writer.written if writer is not None else 0,
        image_dir=None if writer is None else str(image_dir),
    )
