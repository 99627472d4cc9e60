"""``hf``: the Hugging Face parquet form of MMSafe-PO (``Downton/MMSafe-PO``).

Columns are those of the released JSON with ``prompt`` for ``question`` and the image
embedded (a ``{"bytes", "path"}`` struct, or raw bytes); there is no ``id``. Input is a
``.parquet`` file, a folder of them (a downloaded dataset), or a Hub id read through
``datasets.load_dataset``.

Ids are derived so that they are the same on every read: ``<split>-<row index>``, where
the split comes from the shard name (``test-00000-of-00001.parquet`` -> ``test``) or
the Hub split, and the row index counts rows of that split across its shards in order.
Embedded images are written to ``image_dir`` under sanitised names (never a path taken
from the file), and each record's ``image`` is that name.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from mmsafe.data.formats.base import FileReadError, Format, Item
from mmsafe.data.formats.mmsafe_po import record_from_row
from mmsafe.errors import DataError

_SHARD = re.compile(r"^(?P<split>.+?)-\d+-of-\d+$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_UNSAFE_CHARACTERS = re.compile(r"[^A-Za-z0-9._%+-]+")
_DATA_SUFFIXES = (".json", ".jsonl", ".gz", ".parquet", ".csv")
_EXTENSIONS = {"PNG": ".png", "JPEG": ".jpg", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif"}


def split_of(parquet_file: Path) -> str:
    """``test-00000-of-00001.parquet`` -> ``test``; otherwise the file stem."""
    match = _SHARD.match(parquet_file.stem)
    return match.group("split") if match else parquet_file.stem


def safe_file_name(name: str) -> str:
    """A flat file name: no folders, no leading dots, only ``[A-Za-z0-9._%+-]``.

    ``"../x/Caf\u00e9 de Flore.jpg"`` -> ``"Caf_de_Flore.jpg"``.
    """
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    return _UNSAFE_CHARACTERS.sub("_", base).lstrip(".")


def is_hub_id(path: str | Path) -> bool:
    text = str(path)
    return not Path(text).exists() and bool(_HUB_ID.match(text)) and not text.endswith(_DATA_SUFFIXES)


def _image_bytes(value: Any) -> tuple[bytes | None, str | None]:
    """``(bytes, original name)`` from the forms an image column takes."""
    if value is None:
        return None, None
    if isinstance(value, bytes | bytearray):
        return bytes(value), None
    if isinstance(value, dict):
        data = value.get("bytes")
        name = value.get("path")
        if data is None and name is None:
            return None, None
        if data is not None and not isinstance(data, bytes | bytearray):
            raise TypeError(f"expected image bytes, got {type(data).__name__}")
        return (bytes(data) if data is not None else None), (name if isinstance(name, str) and name else None)
    raise TypeError(f"expected an embedded image (bytes or {{bytes, path}}), got {type(value).__name__}")


class ImageWriter:
    """Writes embedded images under safe, stable names; identical bytes are written once."""

    def __init__(self, image_dir: str | Path | None) -> None:
        self.image_dir = None if image_dir is None else Path(image_dir)
        self.written = 0

    def name_for(self, data: bytes, original: str | None, record_id: str) -> str:
        try:
            with Image.open(io.BytesIO(data)) as image:
                extension = _EXTENSIONS.get(image.format or "", ".img")
        except (UnidentifiedImageError, OSError):
            raise ValueError("embedded image bytes are not a readable image") from None
        name = safe_file_name(original) if original else ""
        if not name or "." not in name:
            name = f"{safe_file_name(record_id)}{extension}"
        if self.image_dir is None:
            return name
        target = self.image_dir / name
        if target.exists() and target.read_bytes() != data:
            # Two different images share a name: keep both, the second under its record id.
            name = f"{safe_file_name(record_id)}-{name}"
            target = self.image_dir / name
        if not target.exists():
            self.image_dir.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            self.written += 1
        return name


def _record(row: dict[str, Any], record_id: str, split: str, images: ImageWriter, file: str) -> Item:
    try:
        data, original = _image_bytes(row.get("image"))
        image_name = images.name_for(data, original, record_id) if data is not None else None
    except (TypeError, ValueError) as error:
        return DataError(str(error), file=file, record=record_id, field="image")
    released = {key: value for key, value in row.items() if key not in ("image", "id")}
    released = {"id": record_id, "image": image_name, **released}
    if "id" in row:  # not in the published columns; kept rather than dropped if a copy adds one
        released["source_id"] = row["id"]
    try:
        record = record_from_row(released, label=record_id, question_key="prompt")
    except DataError as error:
        return error.at(file=file)
    record.meta["split"] = split
    return record


def _parquet_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
        if not files:
            raise FileReadError("expected .parquet files in this folder, found none", file=str(path))
        return files
    return [path]


def _iter_parquet(path: Path, images: ImageWriter) -> Iterator[Item]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    counts: dict[str, int] = {}
    try:
        files = _parquet_files(path)
    except DataError as error:
        yield error
        return
    for parquet_file in files:
        split = split_of(parquet_file)
        try:
            batches = pq.ParquetFile(parquet_file).iter_batches(batch_size=64)
            for batch in batches:
                for row in batch.to_pylist():
                    index = counts.get(split, 0)
                    counts[split] = index + 1
                    yield _record(row, f"{split}-{index}", split, images, str(parquet_file))
        except (pa.ArrowException, OSError) as error:
            yield FileReadError(f"not a readable parquet file ({error})", file=str(parquet_file))


def _iter_hub(hub_id: str, images: ImageWriter) -> Iterator[Item]:
    import datasets

    try:
        dataset_dict = datasets.load_dataset(hub_id)
    except Exception as error:  # the Hub raises many types; all mean "could not load"
        yield FileReadError(
            f"no such local file, and could not load it as a Hugging Face dataset ({type(error).__name__}: {error})",
            file=hub_id,
        )
        return
    for split, dataset in dataset_dict.items():
        if "image" in dataset.column_names:
            # Keep the original bytes instead of decoding every image to pixels.
            dataset = dataset.cast_column("image", datasets.Image(decode=False))
        for index, row in enumerate(dataset):
            yield _record(row, f"{split}-{index}", split, images, hub_id)


def read_items(path: str | Path, *, image_dir: str | Path | None = None) -> Iterator[Item]:
    """Records of a parquet file, a folder of them, or a Hub id.

    Without ``image_dir`` the image names are derived but nothing is written.
    """
    yield from iter_items(path, ImageWriter(image_dir))


def iter_items(path: str | Path, images: ImageWriter) -> Iterator[Item]:
    """Like :func:`read_items` with a given image writer (which counts what it writes)."""
    if is_hub_id(path):
        yield from _iter_hub(str(path), images)
        return
    path = Path(path)
    if not path.exists():
        yield FileReadError(
            "file not found (expected a .parquet file, a folder of them or a Hub id like owner/name)", file=str(path)
        )
        return
    yield from _iter_parquet(path, images)


def detect(path: str | Path) -> bool:
    if is_hub_id(path):
        return True
    path = Path(path)
    if path.is_dir():
        return any(path.rglob("*.parquet"))
    return path.suffix == ".parquet" and path.is_file()


FORMAT = Format(
    name="hf",
    description="Hugging Face parquet (prompt column, embedded images): a .parquet file, a folder of them, or a Hub id (read only)",
    detect=detect,
    read_items=read_items,
    writer=None,
    suffixes=(),
)
