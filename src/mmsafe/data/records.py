"""Typed records for the three file contracts: preference, response and verdict.

Each record class converts to and from a plain dict (one JSONL line). ``from_dict``
validates every field and raises :class:`~mmsafe.errors.DataError` naming the record id
and the field, so a reader can report a problem and carry on with the next line.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mmsafe.data.jsonl import check_unicode
from mmsafe.data.reading import read_json_lines, strict
from mmsafe.errors import DataError

IMAGE_TOKEN = "<image>"
ROLES = ("user", "assistant")
VERDICTS = ("safe", "unsafe", "unparseable")
#: Meta keys that the released MMSafe-PO format carries for each record.
RELEASED_META_KEYS = ("type", "entity", "entity_type", "replacement", "text_prompt", "mid_prompt")

Role = Literal["user", "assistant"]


@dataclass
class Message:
    """One turn of a conversation. ``<image>`` in ``content`` marks the image."""

    role: Role
    content: str

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


def _expect(condition: bool, message: str, record: str | None, field_name: str) -> None:
    if not condition:
        raise DataError(message, record=record, field=field_name)


def _record_id(data: dict[str, Any]) -> str | None:
    value = data.get("id")
    return value if isinstance(value, str) and value else None


def _string(data: dict[str, Any], name: str, record: str | None, *, allow_empty: bool = True) -> str:
    _expect(name in data, f"missing field {name!r} (expected a string)", record, name)
    value = data[name]
    _expect(isinstance(value, str), f"expected a string, got {type(value).__name__}", record, name)
    if not allow_empty:
        _expect(bool(value.strip()), "expected a non-empty string", record, name)
    return value


def parse_messages(value: Any, record: str | None, *, field_name: str = "messages") -> list[Message]:
    """Validate a ``messages`` list: alternating turns ending with the user, ``<image>`` at
    most once and only in the last user message."""
    _expect(isinstance(value, list), f"expected a list of messages, got {type(value).__name__}", record, field_name)
    _expect(len(value) > 0, "expected at least one message", record, field_name)
    messages = []
    for index, item in enumerate(value):
        where = f"{field_name}[{index}]"
        _expect(
            isinstance(item, dict),
            f"expected an object with role and content, got {type(item).__name__}",
            record,
            where,
        )
        _expect(
            item.get("role") in ROLES,
            f"expected role 'user' or 'assistant', got {item.get('role')!r}",
            record,
            f"{where}.role",
        )
        _expect(isinstance(item.get("content"), str), "expected string content", record, f"{where}.content")
        expected_role = ROLES[index % 2]
        _expect(
            item["role"] == expected_role,
            f"expected role {expected_role!r} (turns alternate, starting with the user)",
            record,
            f"{where}.role",
        )
        messages.append(Message(item["role"], item["content"]))
    _expect(messages[-1].role == "user", "expected the last message to be from the user", record, field_name)
    for index, message in enumerate(messages):
        count = message.content.count(IMAGE_TOKEN)
        where = f"{field_name}[{index}].content"
        if index == len(messages) - 1:
            _expect(count <= 1, f"expected {IMAGE_TOKEN} at most once, found {count} times", record, where)
        else:
            _expect(count == 0, f"expected {IMAGE_TOKEN} only in the last user message", record, where)
    return messages


@dataclass
class PreferenceRecord:
    """A prompt (with an optional image), one chosen and K >= 1 rejected responses.

    ``rejected_sources[k]`` says where ``rejected[k]`` came from (``"human"``,
    ``"blind"``, ...). ``image`` is relative to the image root, or None.
    """

    id: str
    messages: list[Message]
    chosen: str
    rejected: list[str]
    image: str | None = None
    rejected_sources: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.rejected_sources:
            self.rejected_sources = ["human"] * len(self.rejected)

    @property
    def prompt(self) -> str:
        """The last user message, the one the image belongs to."""
        return self.messages[-1].content

    @property
    def has_image_token(self) -> bool:
        return IMAGE_TOKEN in self.messages[-1].content

    @property
    def num_turns(self) -> int:
        """Number of user turns, the last one included."""
        return sum(1 for message in self.messages if message.role == "user")

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "messages": [message.to_dict() for message in self.messages],
            "image": self.image,
            "chosen": self.chosen,
            "rejected": list(self.rejected),
            "rejected_sources": list(self.rejected_sources),
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, data: Any, *, record: str | None = None) -> PreferenceRecord:
        """Validate and build; ``record`` names the record when it has no usable id."""
        _expect(isinstance(data, dict), f"expected a JSON object, got {type(data).__name__}", record, "-")
        record = _record_id(data) or record
        check_unicode(data, record=record)  # UTF-8 cannot hold a lone surrogate: refused, not written
        _expect("id" in data, "missing field 'id' (expected a non-empty string)", record, "id")
        _expect(
            isinstance(data["id"], str) and data["id"] != "",
            f"expected a non-empty string, got {data['id']!r}",
            record,
            "id",
        )
        _expect("messages" in data, "missing field 'messages' (expected a list of {role, content})", record, "messages")
        messages = parse_messages(data["messages"], record)
        image = data.get("image")
        _expect(
            image is None or (isinstance(image, str) and image != ""),
            f"expected a relative path or null, got {image!r}",
            record,
            "image",
        )
        if image is not None:
            _expect(
                IMAGE_TOKEN in messages[-1].content,
                f"an image is given but the last user message has no {IMAGE_TOKEN}",
                record,
                "messages",
            )
        chosen = _string(data, "chosen", record, allow_empty=False)
        _expect("rejected" in data, "missing field 'rejected' (expected a list of strings)", record, "rejected")
        rejected = data["rejected"]
        _expect(
            isinstance(rejected, list), f"expected a list of strings, got {type(rejected).__name__}", record, "rejected"
        )
        _expect(len(rejected) >= 1, "expected at least one rejected response", record, "rejected")
        for index, text in enumerate(rejected):
            _expect(
                isinstance(text, str), f"expected a string, got {type(text).__name__}", record, f"rejected[{index}]"
            )
            _expect(bool(text.strip()), "expected a non-empty response", record, f"rejected[{index}]")
        sources = data.get("rejected_sources")
        if sources is None:
            sources = ["human"] * len(rejected)
        _expect(
            isinstance(sources, list) and all(isinstance(s, str) and s for s in sources),
            "expected a list of non-empty strings",
            record,
            "rejected_sources",
        )
        _expect(
            len(sources) == len(rejected),
            f"expected {len(rejected)} sources (one per rejected response), got {len(sources)}",
            record,
            "rejected_sources",
        )
        meta = data.get("meta", {})
        _expect(isinstance(meta, dict), f"expected an object, got {type(meta).__name__}", record, "meta")
        return cls(
            id=data["id"],
            messages=messages,
            image=image,
            chosen=chosen,
            rejected=list(rejected),
            rejected_sources=list(sources),
            meta=dict(meta),
        )


@dataclass
class ResponseRecord:
    """A model's answer to one prompt under one variant (``"default"`` unless probing)."""

    id: str
    response: str
    model: str
    variant: str = "default"
    params: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        return (self.id, self.variant)

    def to_dict(self) -> dict[str, Any]:
        data = {
            "id": self.id,
            "variant": self.variant,
            "response": self.response,
            "model": self.model,
            "params": dict(self.params),
        }
        data.update(self.extra)
        return data

    @classmethod
    def from_dict(cls, data: Any, *, record: str | None = None) -> ResponseRecord:
        _expect(isinstance(data, dict), f"expected a JSON object, got {type(data).__name__}", record, "-")
        record = _record_id(data) or record
        check_unicode(data, record=record)  # UTF-8 cannot hold a lone surrogate: refused, not written
        _expect(isinstance(data.get("id"), str) and data["id"] != "", "expected a non-empty string id", record, "id")
        variant = data.get("variant", "default")
        _expect(isinstance(variant, str) and variant != "", "expected a non-empty string", record, "variant")
        response = _string(data, "response", record)
        model = data.get("model", "")
        _expect(isinstance(model, str), "expected a string", record, "model")
        params = data.get("params", {})
        _expect(isinstance(params, dict), "expected an object", record, "params")
        known = {"id", "variant", "response", "model", "params"}
        extra = {key: value for key, value in data.items() if key not in known}
        return cls(id=data["id"], response=response, model=model, variant=variant, params=dict(params), extra=extra)


@dataclass
class VerdictRecord:
    """A judge's label for one response. ``unparseable`` is never counted as safe."""

    id: str
    judge: str
    verdict: Literal["safe", "unsafe", "unparseable"]
    variant: str = "default"
    categories: list[str] = field(default_factory=list)
    raw: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        return (self.id, self.variant)

    def to_dict(self) -> dict[str, Any]:
        data = {
            "id": self.id,
            "variant": self.variant,
            "judge": self.judge,
            "verdict": self.verdict,
            "categories": list(self.categories),
            "raw": self.raw,
        }
        data.update(self.extra)
        return data

    @classmethod
    def from_dict(cls, data: Any, *, record: str | None = None) -> VerdictRecord:
        _expect(isinstance(data, dict), f"expected a JSON object, got {type(data).__name__}", record, "-")
        record = _record_id(data) or record
        check_unicode(data, record=record)  # UTF-8 cannot hold a lone surrogate: refused, not written
        _expect(isinstance(data.get("id"), str) and data["id"] != "", "expected a non-empty string id", record, "id")
        judge = _string(data, "judge", record, allow_empty=False)
        verdict = data.get("verdict")
        _expect(verdict in VERDICTS, f"expected one of {', '.join(VERDICTS)}, got {verdict!r}", record, "verdict")
        variant = data.get("variant", "default")
        _expect(isinstance(variant, str) and variant != "", "expected a non-empty string", record, "variant")
        categories = data.get("categories", [])
        _expect(
            isinstance(categories, list) and all(isinstance(c, str) for c in categories),
            "expected a list of strings",
            record,
            "categories",
        )
        raw = data.get("raw", "")
        _expect(isinstance(raw, str), "expected a string", record, "raw")
        known = {"id", "variant", "judge", "verdict", "categories", "raw"}
        extra = {key: value for key, value in data.items() if key not in known}
        return cls(
            id=data["id"],
            judge=judge,
            verdict=verdict,
            variant=variant,
            categories=list(categories),
            raw=raw,
            extra=extra,
        )


def parse_preference_line(line_number: int, data: Any) -> PreferenceRecord:
    return PreferenceRecord.from_dict(data, record=f"line {line_number}")


def parse_response_line(line_number: int, data: Any) -> ResponseRecord:
    return ResponseRecord.from_dict(data, record=f"line {line_number}")


def parse_verdict_line(line_number: int, data: Any) -> VerdictRecord:
    return VerdictRecord.from_dict(data, record=f"line {line_number}")


def read_preference_records(path: str | Path) -> Iterator[PreferenceRecord]:
    """Stream preference records from JSONL; the first bad line raises a DataError."""
    return strict(read_json_lines(path, parse_preference_line))


def read_response_records(path: str | Path) -> Iterator[ResponseRecord]:
    """Stream response records from JSONL; the first bad line raises a DataError."""
    return strict(read_json_lines(path, parse_response_line))


def read_verdict_records(path: str | Path) -> Iterator[VerdictRecord]:
    """Stream verdict records from JSONL; the first bad line raises a DataError."""
    return strict(read_json_lines(path, parse_verdict_line))


def write_records(path: str | Path, records: Iterable[PreferenceRecord | ResponseRecord | VerdictRecord]) -> int:
    """Write records as JSONL (atomically: a temporary file renamed at the end)."""
    from mmsafe.data.jsonl import write_jsonl

    return write_jsonl(path, (record.to_dict() for record in records))
