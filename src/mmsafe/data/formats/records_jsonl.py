"""``jsonl``: our preference records, one JSON object per line (the ARCHITECTURE contract)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from mmsafe.data.formats.base import Format, Item, first_object
from mmsafe.data.reading import read_json_lines
from mmsafe.data.records import PreferenceRecord, parse_preference_line, write_records


def read_items(path: str | Path, *, image_dir: str | Path | None = None) -> Iterator[Item]:
    """Records of a JSONL file; a bad line becomes a DataError and reading goes on."""
    del image_dir  # image paths in records are already relative to the image root
    return read_json_lines(path, parse_preference_line)


def detect(path: str | Path) -> bool:
    path = Path(path)
    if not path.name.endswith((".jsonl", ".jsonl.gz")) or not path.is_file():
        return False
    first = first_object(path)
    # Any .jsonl that does not look like HH-RLHF dialogues is taken as records, so that a
    # file of broken records is reported record by record instead of "unknown format".
    looks_like_dialogues = first is not None and isinstance(first.get("chosen"), str) and "messages" not in first
    return not looks_like_dialogues


def write(path: Path, records: Iterable[PreferenceRecord]) -> int:
    return write_records(path, records)


FORMAT = Format(
    name="jsonl",
    description="preference records, one JSON object per line (id, messages, image, chosen, rejected, rejected_sources, meta)",
    detect=detect,
    read_items=read_items,
    writer=write,
    suffixes=(".jsonl",),
)
