"""MOSSBench: benign image + question pairs that over-sensitive models refuse.

MOSSBench (Li et al., 2024, "Is your multimodal language model oversensitive to safe
queries?") holds 300 benign queries whose image carries a harmless stimulus that looks
risky; every one should be answered, so each item expects ``help`` and a refusal is
over-refusal. Its repository keeps them in ``data/images_information/information.json``,
an object keyed by ``pid`` whose entries have ``pid``, ``question``, ``image``
(``images/<pid>.png``, relative to ``data/``), ``short description``, ``description`` and
``metadata``: ``over`` (``"type 1"`` exaggerated risk, ``"type 2"`` negated harm,
``"type 3"`` counterintuitive interpretation), the flags ``human``, ``child``, ``syn``,
``ocr`` and ``harm``. The Hugging Face copy flattens ``metadata`` into ``metadata_over``,
``metadata_human``, ... columns of a ``metadata.csv`` beside ``images/`` (image in
``file_name``).

Read here: that JSON (an object keyed by pid, or a list of entries), a JSONL of the same
entries, or the ``metadata.csv``; nested or flattened metadata. These field names are
taken from the published descriptions of the dataset, not checked against a download.
The "contrast" set of harmful counterparts is not read.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from mmsafe.data.prompts import BenchmarkItem
from mmsafe.data.records import IMAGE_TOKEN, Message
from mmsafe.errors import DataError

#: ``metadata.over`` values and the names the paper gives them.
OVER_TYPES = {"type 1": "exaggerated risk", "type 2": "negated harm", "type 3": "counterintuitive interpretation"}
#: Metadata flags kept in each item's meta (as ``metadata_<flag>`` when flattened).
METADATA_FLAGS = ("over", "human", "child", "syn", "ocr", "harm")
#: Where the entries may be, inside a folder given as the path.
CANDIDATE_FILES = ("images_information/information.json", "information.json", "metadata.csv", "mossbench.jsonl")
_LAYOUT = "information.json (an object keyed by pid: pid, question, image, metadata), a JSONL of such entries, or the Hugging Face metadata.csv beside images/"


def _entries_file(path: Path) -> Path:
    if path.is_dir():
        for name in CANDIDATE_FILES:
            if (path / name).is_file():
                return path / name
        raise DataError(
            f"expected MOSSBench's {_LAYOUT} in this folder, found none of {', '.join(CANDIDATE_FILES)}", file=str(path)
        )
    if not path.is_file():
        raise DataError(f"not found; expected MOSSBench's {_LAYOUT}", file=str(path))
    return path


def _read_entries(file: Path) -> list[tuple[str, dict[str, Any]]]:
    """``(record name, entry)`` in file order."""
    name = str(file)
    if file.suffix == ".csv":
        with open(file, encoding="utf-8", newline="") as handle:
            return [(f"row {index + 2}", dict(row)) for index, row in enumerate(csv.DictReader(handle))]
    if file.name.endswith((".jsonl", ".jsonl.gz")):
        from mmsafe.data.jsonl import read_jsonl

        return [(f"line {number}", row) for number, row in read_jsonl(file)]
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"not valid JSON ({error})", file=name) from None
    if isinstance(data, dict):
        return [(str(key), entry) for key, entry in data.items()]
    if isinstance(data, list):
        return [(f"item {index}", entry) for index, entry in enumerate(data)]
    raise DataError(f"expected {_LAYOUT}; got a JSON {type(data).__name__}", file=name)


def _metadata(entry: dict[str, Any]) -> dict[str, Any]:
    nested = entry.get("metadata")
    if isinstance(nested, dict):
        return {flag: nested.get(flag) for flag in METADATA_FLAGS}
    # metadata.csv holds every value as text: its flags read back as booleans
    flat = {flag: entry.get(f"metadata_{flag}") for flag in METADATA_FLAGS}
    return {
        flag: {"true": True, "false": False}.get(value.lower(), value) if isinstance(value, str) else value
        for flag, value in flat.items()
    }


def _default_image_root(file: Path, image: str) -> Path:
    """The folder the entries' image paths start from: the file's, or the one above it
    (the repository keeps ``images/`` beside ``images_information/``)."""
    for candidate in (file.parent, file.parent.parent):
        if (candidate / image).is_file():
            return candidate
    return file.parent


def load_mossbench(path: str | Path, *, image_root: str | Path | None = None) -> list[BenchmarkItem]:
    """MOSSBench items, ids ``mossbench/<pid>``, every one expecting ``help``.

    ``meta`` holds ``pid``, ``over`` (the raw type), ``over_type`` (its name, e.g.
    "exaggerated risk"), the flags ``human``, ``child``, ``syn``, ``ocr``, ``harm`` and
    ``short_description``. A missing field or image is a DataError naming it.
    """
    from mmsafe.data.images import resolve_image_path

    file = _entries_file(Path(path))
    name = str(file)
    entries = _read_entries(file)
    if not entries:
        raise DataError(f"no entries; expected {_LAYOUT}", file=name)
    items = []
    root = Path(image_root) if image_root is not None else None
    seen: set[str] = set()
    for record, entry in entries:
        if not isinstance(entry, dict):
            raise DataError(
                f"expected an object with pid, question, image, got {type(entry).__name__}", file=name, record=record
            )
        pid = entry.get("pid", record)
        record = str(pid)
        question = entry.get("question")
        if not isinstance(question, str) or not question.strip():
            raise DataError("expected a non-empty question", file=name, record=record, field="question")
        image = entry.get("image") or entry.get("file_name")
        if not isinstance(image, str) or not image:
            raise DataError(
                "expected the image's path (field image, or file_name in metadata.csv)",
                file=name,
                record=record,
                field="image",
            )
        if root is None:
            root = _default_image_root(file, image)
        try:
            found = resolve_image_path(root, image).is_file()
        except DataError as error:
            raise error.at(file=name, record=record) from None
        if not found:
            raise DataError(
                f"image missing: expected {root / image} (give the folder holding images/ as image_root / --image-root)",
                file=name,
                record=record,
                field="image",
            )
        item_id = f"mossbench/{record}"
        if item_id in seen:
            raise DataError(
                "duplicate pid; ids must be unique to match responses to prompts", file=name, record=record, field="pid"
            )
        seen.add(item_id)
        metadata = _metadata(entry)
        over = metadata.get("over")
        meta = {
            "pid": record,
            **metadata,
            "over_type": OVER_TYPES.get(str(over).strip().lower(), over),
            "short_description": entry.get("short description"),
        }
        items.append(
            BenchmarkItem(item_id, [Message("user", f"{IMAGE_TOKEN}\n{question.strip()}")], image, root, meta, "help")
        )
    return items
