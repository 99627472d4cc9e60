"""``mmsafe-po``: the released MMSafe-PO JSON array, read and written losslessly.

A released row::

    {"id": 12, "question": "USER: Hi ASSISTANT: Hello! USER: <image>\\nWhat is this? ASSISTANT:",
     "image": "500px-Some_File.jpg", "chosen": "ASSISTANT: I can't help ...",
     "rejected": "ASSISTANT: Sure ...", "type": "harmless", "entity": ..., ...}

becomes a record whose ``messages`` are the parsed ``question``, whose responses have the
``"ASSISTANT: "`` prefix removed, and whose ``meta`` holds every other field in order.
What the record cannot say by itself (an integer id, a prefix or question spelled
unusually, a different key order) is kept under ``meta["released_format"]`` so that
writing the record back gives the same row, field for field. Record ids are unique: a
released id used again by a different prompt gets a suffix (``17#2``), and the original
id is written back.

Rows that repeat the same prompt with different rejected responses (the release's
duplicated-row form of BPO data) are read as one record with K rejected responses, and a
record with K rejected responses is written back as K such rows.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from mmsafe.data.conversations import parse_llava_v1, render_llava_v1, strip_response_prefix
from mmsafe.data.formats.base import FileReadError, Format, Item
from mmsafe.data.jsonl import open_text
from mmsafe.data.reading import guarded, parse_each
from mmsafe.data.records import PreferenceRecord
from mmsafe.errors import DataError

RESPONSE_PREFIX = "ASSISTANT: "
#: Meta key holding what is needed to write a record back exactly as it was released.
RESTORE_KEY = "released_format"
#: Per-row source of the rejected response; written only when it is not "human".
SOURCE_KEY = "rejected_source"
#: Separates a repeated released id from its count: the second row with id 17 is "17#2".
ID_SUFFIX = "#"
CORE_KEYS = ("id", "question", "image", "chosen", "rejected")


def _require(row: dict[str, Any], name: str, label: str, kinds: tuple[type, ...], expected: str) -> Any:
    if name not in row:
        raise DataError(f"missing field {name!r} (expected {expected})", record=label, field=name)
    value = row[name]
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise DataError(f"expected {expected}, got {type(value).__name__}", record=label, field=name)
    return value


def record_from_row(row: Any, *, label: str, question_key: str = "question") -> PreferenceRecord:
    """One released row (a dict) as a :class:`PreferenceRecord`; DataError naming the field.

    ``question_key`` is ``"prompt"`` for the Hugging Face columns.
    """
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object, got {type(row).__name__}", record=label, field="-")
    restore: dict[str, Any] = {}
    raw_id = _require(row, "id", label, (int, str), "an integer or string id")
    if isinstance(raw_id, int):
        restore["id"] = raw_id
    label = str(raw_id)
    question = _require(row, question_key, label, (str,), "a LLaVA-v1 prompt string")
    system_text, messages = parse_llava_v1(question, record=label, field=question_key)
    if system_text or render_llava_v1(messages) != question:
        restore["question"] = question
    responses = {}
    for name in ("chosen", "rejected"):
        prefix, body = strip_response_prefix(
            _require(row, name, label, (str,), 'a response string starting with "ASSISTANT: "')
        )
        if prefix != RESPONSE_PREFIX:
            restore[f"{name}_prefix"] = prefix
        responses[name] = body
    image = row.get("image")
    if image is not None and not isinstance(image, str):
        raise DataError(f"expected an image file name or null, got {type(image).__name__}", record=label, field="image")
    source = row.get(SOURCE_KEY, "human")
    if not isinstance(source, str) or not source:
        raise DataError(f"expected a non-empty string, got {source!r}", record=label, field=SOURCE_KEY)
    core = {*CORE_KEYS, question_key, SOURCE_KEY}
    meta = {key: value for key, value in row.items() if key not in core}
    if question_key == "question":
        written_order = [*CORE_KEYS, *meta]
        actual_order = [key for key in row if key != SOURCE_KEY]
        if actual_order != written_order:
            restore["keys"] = actual_order
    if restore:
        meta[RESTORE_KEY] = restore
    data = {
        "id": label,
        "messages": [message.to_dict() for message in messages],
        "image": image,
        "chosen": responses["chosen"],
        "rejected": [responses["rejected"]],
        "rejected_sources": [source],
        "meta": meta,
    }
    try:
        return PreferenceRecord.from_dict(data, record=label)
    except DataError as error:
        # The record's field names mean nothing to someone editing the released file.
        field = error.location.field or "-"
        if field.startswith("messages"):
            field = question_key
        elif field.startswith("rejected"):
            field = "rejected"
        raise DataError(error.message, record=label, field=field) from None


def _unique_id(record: PreferenceRecord, taken: set[str]) -> None:
    """Give a repeated id a suffix (``17`` -> ``17#2``), keeping the original for writing.

    Every later stage keys its outputs by record id, so two different prompts under one
    id would silently share one answer; the released id is restored when writing back.
    """
    if record.id not in taken:
        taken.add(record.id)
        return
    restore = record.meta.setdefault(RESTORE_KEY, {})
    restore.setdefault("id", record.id)
    number = 2
    while f"{record.id}{ID_SUFFIX}{number}" in taken:
        number += 1
    record.id = f"{record.id}{ID_SUFFIX}{number}"
    taken.add(record.id)


def _original_id(record: PreferenceRecord, restore: dict[str, Any]) -> Any:
    """The released id: the stored one while the record id still derives from it."""
    if "id" not in restore:
        return record.id
    original = str(restore["id"])
    if record.id == original or (
        record.id.startswith(original + ID_SUFFIX) and record.id[len(original) + 1 :].isdigit()
    ):
        return restore["id"]
    return record.id


def _merge_signature(row: dict[str, Any]) -> str | None:
    """Rows with the same signature differ only in the rejected response."""
    rejected = row.get("rejected")
    if not isinstance(rejected, str) or strip_response_prefix(rejected)[0] != RESPONSE_PREFIX:
        return None
    kept = [(key, value) for key, value in row.items() if key not in ("rejected", SOURCE_KEY)]
    return json.dumps(kept, ensure_ascii=False, sort_keys=False)


def load_rows(path: str | Path) -> list[Any]:
    """The JSON array of a released file; DataError naming the line of a syntax error."""
    file = str(path)
    with open_text(path) as handle:
        try:
            rows = json.load(handle)
        except json.JSONDecodeError as error:
            raise FileReadError(
                f"malformed JSON ({error.msg} at column {error.colno})", file=file, record=f"line {error.lineno}"
            ) from None
        except UnicodeDecodeError as error:
            raise FileReadError(f"not valid UTF-8 ({error.reason})", file=file) from None
        except RecursionError:
            raise FileReadError(
                "nesting too deep for JSON (expected an array of flat row objects)", file=file
            ) from None
    if not isinstance(rows, list):
        raise FileReadError(
            f"expected a JSON array of objects (the released MMSafe-PO format), got a {type(rows).__name__}", file=file
        )
    return rows


def read_items(path: str | Path, *, image_dir: str | Path | None = None) -> Iterator[Item]:
    """Records of a released JSON file, merging duplicated rows of one prompt."""
    del image_dir  # released image names are already relative to the image folder
    file = str(path)
    rows = guarded(lambda: enumerate(load_rows(path)), file=file)
    pending: PreferenceRecord | None = None
    pending_signature: str | None = None
    taken: set[str] = set()
    for item in parse_each(
        rows, lambda index, row: (record_from_row(row, label=f"item {index}"), _merge_signature(row)), file=file
    ):
        if isinstance(item, DataError):
            yield item
            continue
        record, signature = item
        if pending is not None and signature is not None and signature == pending_signature:
            pending.rejected.extend(record.rejected)
            pending.rejected_sources.extend(record.rejected_sources)
            continue
        if pending is not None:
            yield pending
        _unique_id(record, taken)
        pending, pending_signature = record, signature
    if pending is not None:
        yield pending


def rows_from_record(record: PreferenceRecord) -> list[dict[str, Any]]:
    """The released rows of one record: one row per rejected response."""
    restore = record.meta.get(RESTORE_KEY) or {}
    meta = {key: value for key, value in record.meta.items() if key != RESTORE_KEY}
    record_id = _original_id(record, restore)
    question = restore.get("question")
    # A stored question is only used while it still says what the messages say.
    if question is None or parse_llava_v1(question)[1] != record.messages:
        question = render_llava_v1(record.messages)
    chosen_prefix = restore.get("chosen_prefix", RESPONSE_PREFIX)
    rejected_prefix = restore.get("rejected_prefix", RESPONSE_PREFIX)
    rows = []
    for text, source in zip(record.rejected, record.rejected_sources, strict=True):
        values = {
            "id": record_id,
            "question": question,
            "image": record.image,
            "chosen": chosen_prefix + record.chosen,
            "rejected": rejected_prefix + text,
            **meta,
        }
        order = restore.get("keys") or list(values)
        row = {key: values[key] for key in order if key in values}
        row.update((key, value) for key, value in values.items() if key not in row)
        if source != "human":
            row[SOURCE_KEY] = source
        rows.append(row)
    return rows


def write(path: Path, records: Iterable[PreferenceRecord]) -> int:
    """Write a JSON array (UTF-8, one row per line) atomically; returns the row count."""
    from mmsafe.fileio import atomic_open

    count = 0
    with atomic_open(path, "w", fsync=False) as handle:  # the new file gets the user's umask, not 0600
        handle.write("[")
        for record in records:
            for row in rows_from_record(record):
                handle.write(("\n" if count == 0 else ",\n") + json.dumps(row, ensure_ascii=False))
                count += 1
        handle.write("\n]\n")
    return count


def detect(path: str | Path) -> bool:
    path = Path(path)
    return path.suffix == ".json" and path.is_file()


FORMAT = Format(
    name="mmsafe-po",
    description="the released MMSafe-PO JSON array (id, question, image, chosen, rejected, type, entity, ...)",
    detect=detect,
    read_items=read_items,
    writer=write,
    suffixes=(".json",),
)
