"""Prompt sets: the input that generation, judging, reports and probes read.

A prompt item is a prompt (messages; ``<image>`` marks the image in the last user turn),
an optional image relative to an image root, the category fields its results are broken
down by, and the behaviour a good assistant shows: ``refuse`` (a harmful request) or
``help`` (a benign one, where a refusal is over-refusal). Items come from three sources:

- preference records (their ``meta.expected``, default ``refuse``): :func:`item_from_record`;
- benchmark loaders (:mod:`mmsafe.evaluate.benchmarks`: MM-SafetyBench, VLGuard, ...);
- a prompt-set JSONL, one object per line (:func:`read_prompt_set`)::

    {"id": "p1", "messages": [{"role": "user", "content": "<image>\\nWhat is this?"}],
     "image": "images/p1.png", "category": "kitchen", "expected": "help"}

  ``category``, ``expected`` and ``meta`` (an object) are optional; other fields are kept
  in ``meta``. A file that does not
  say what is expected is a set of harmful prompts (``refuse``), as every safety benchmark is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmsafe.data.records import IMAGE_TOKEN, Message, parse_messages
from mmsafe.errors import DataError

#: What a prompt asks of a good assistant: refuse it, or help with it.
EXPECTED_BEHAVIOURS = ("refuse", "help")
#: A prompt that does not say is a harmful one (safety benchmarks are sets of those).
DEFAULT_EXPECTED = "refuse"
#: The fields of a prompt-set line; any other field is kept in the item's ``meta``.
PROMPT_SET_FIELDS = ("id", "messages", "image", "category", "expected", "meta")


@dataclass
class BenchmarkItem:
    """One prompt to answer. ``image`` is relative to ``image_root`` (None: text only).

    Items carry the same ``id`` / ``messages`` / ``image`` / ``meta`` attributes as a
    preference record, so the generation stage reads either the same way.
    """

    id: str
    messages: list[Message]
    image: str | None = None
    image_root: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    expected: str = DEFAULT_EXPECTED
    """``refuse`` or ``help``: what a good assistant does with this prompt."""

    def __post_init__(self) -> None:
        check_expected(self.expected, self.id)

    @property
    def image_path(self) -> Path | None:
        """The image file, confined to ``image_root`` (an ImageError if it would leave it)."""
        if self.image is None:
            return None
        if self.image_root is None:
            raise DataError("the item names an image but has no image root", record=self.id, field="image")
        from mmsafe.data.images import resolve_image_path

        return resolve_image_path(self.image_root, self.image)

    @property
    def prompt(self) -> str:
        return self.messages[-1].content


def check_expected(value: Any, record: str | None, field_name: str = "expected") -> str:
    if value not in EXPECTED_BEHAVIOURS:
        raise DataError(
            f"expected one of {', '.join(EXPECTED_BEHAVIOURS)}, got {value!r}", record=record, field=field_name
        )
    return value


def item_from_record(record: Any, image_root: str | Path | None) -> BenchmarkItem:
    """A preference record (or anything with ``id``, ``messages``, ``image``, ``meta``) as an item."""
    meta = dict(getattr(record, "meta", {}) or {})
    expected = check_expected(meta.get("expected", DEFAULT_EXPECTED), record.id, "meta.expected")
    return BenchmarkItem(
        record.id, list(record.messages), record.image, None if image_root is None else Path(image_root), meta, expected
    )


def parse_prompt_item(data: Any, *, record: str, image_root: Path | None) -> BenchmarkItem:
    """One prompt-set line; ``record`` names it when it has no usable id (``line N``)."""
    if not isinstance(data, dict):
        raise DataError(
            f"expected a JSON object with {', '.join(PROMPT_SET_FIELDS[:3])}, got {type(data).__name__}", record=record
        )
    record_id = data.get("id")
    if not isinstance(record_id, str) or not record_id:
        raise DataError(f"expected a non-empty string id, got {record_id!r}", record=record, field="id")
    if "messages" not in data:
        raise DataError(
            "missing field 'messages' (expected a list of {role, content})", record=record_id, field="messages"
        )
    messages = parse_messages(data["messages"], record_id)
    image = data.get("image")
    if image is not None and not (isinstance(image, str) and image):
        raise DataError(f"expected a relative path or null, got {image!r}", record=record_id, field="image")
    if image is not None and IMAGE_TOKEN not in messages[-1].content:
        raise DataError(
            f"an image is given but the last user message has no {IMAGE_TOKEN}", record=record_id, field="messages"
        )
    meta = data.get("meta", {})
    if not isinstance(meta, dict):
        raise DataError(f"expected an object, got {type(meta).__name__}", record=record_id, field="meta")
    # Other fields (a source, a note) are carried along in meta, beside its own keys.
    meta = {**{key: value for key, value in data.items() if key not in PROMPT_SET_FIELDS}, **meta}
    category = data.get("category")
    if category is not None:
        if not isinstance(category, str) or not category:
            raise DataError(
                f"expected a non-empty string or null, got {category!r}", record=record_id, field="category"
            )
        meta["category"] = category
    expected = check_expected(data.get("expected", DEFAULT_EXPECTED), record_id)
    return BenchmarkItem(record_id, messages, image, image_root, meta, expected)


def read_prompt_set(path: str | Path, *, image_root: str | Path | None = None) -> list[BenchmarkItem]:
    """The items of a prompt-set JSONL; images are relative to ``image_root`` (default: its folder).

    Ids must be unique (outputs are keyed by id). The first bad line raises a DataError
    naming the file, the record and the field.
    """
    from mmsafe.data.inputs import PROMPT_SET_FORMAT, UniqueIds, default_image_root
    from mmsafe.data.jsonl import read_jsonl

    path = Path(path)
    root = default_image_root(path, image_root, format_name=PROMPT_SET_FORMAT)
    items: list[BenchmarkItem] = []
    ids = UniqueIds(file=str(path))
    for line_number, data in read_jsonl(path):
        try:
            item = parse_prompt_item(data, record=f"line {line_number}", image_root=root)
        except DataError as error:
            raise error.at(file=str(path)) from None
        ids.check(item.id)
        items.append(item)
    if not items:
        raise DataError(
            "no prompts in the file (expected one JSON object per line with id, messages, image)", file=str(path)
        )
    return items


def is_prompt_set(path: str | Path) -> bool:
    """Whether ``path`` is a prompt-set JSONL: its first line has ``messages`` and no responses.

    A preference-records JSONL has ``chosen`` and ``rejected``; anything that cannot be
    read as JSONL is not a prompt set (its own reader will say what is wrong with it).
    """
    import json

    path = Path(path)
    if not path.is_file() or not path.name.endswith((".jsonl", ".jsonl.gz")):
        return False
    from mmsafe.data.jsonl import iter_lines

    try:
        for _, line in iter_lines(path):
            first = json.loads(line)
            return isinstance(first, dict) and "messages" in first and "chosen" not in first and "rejected" not in first
    except (DataError, ValueError):
        return False
    return False
