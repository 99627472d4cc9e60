"""``hh-rlhf``: Anthropic HH-RLHF dialogues (``.jsonl`` or ``.jsonl.gz``).

Each line holds ``chosen`` and ``rejected`` dialogue strings built from
``"\\n\\nHuman: "`` and ``"\\n\\nAssistant: "`` turns. Both share the same history and
differ only in the last assistant turn, so a line becomes one :class:`TextPreference`:
the history (ending with the last user turn) and the two final answers. A history that
differs between ``chosen`` and ``rejected`` is an error naming the line, never a drop.

A few real HH-RLHF dialogues have two consecutive turns of the same speaker (9 of the
2,312 harmless-base test dialogues). By default that is an error naming the turn; with
``merge_repeated=True`` (what ``build-data`` reads with) the consecutive texts are joined
into one turn (separated by a blank line, as in the source) and counted in
``TextPreference.merged_turns``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mmsafe.data.formats.base import Format, Item, first_object
from mmsafe.data.reading import read_json_lines, strict
from mmsafe.data.records import Message, PreferenceRecord, Role
from mmsafe.errors import DataError

HUMAN = "\n\nHuman: "
ASSISTANT = "\n\nAssistant: "
# The space after the colon is missing when a turn is empty (a dialogue ending "Assistant:").
_TURN = re.compile(r"\n\n(Human|Assistant):(?: |(?=\n)|$)")
_ROLES: dict[str, Role] = {"Human": "user", "Assistant": "assistant"}
#: What joins two consecutive turns of one speaker when they are merged.
MERGE_SEPARATOR = "\n\n"


@dataclass
class TextPreference:
    """One HH-RLHF line: shared history (ending with the user), chosen and rejected answers."""

    id: str
    messages: list[Message]
    chosen: str
    rejected: str
    line: int
    #: Turns joined to the turn before them (same speaker twice in a row; merge_repeated).
    merged_turns: int = 0


def dataset_stem(path: str | Path) -> str:
    """``train.jsonl.gz`` -> ``train``: the file name without its data suffixes."""
    name = Path(path).name
    for suffix in (".gz", ".jsonl", ".json"):
        name = name.removesuffix(suffix)
    return name


def split_turns(
    text: str,
    *,
    file: str | None = None,
    record: str | None = None,
    field: str = "chosen",
    merge_repeated: bool = False,
) -> list[tuple[Message, int]]:
    """Split ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` into alternating messages, each
    with the number of source turns merged into it (0 unless ``merge_repeated``).

    The dialogue must start with a Human turn and end with an Assistant turn. Two
    consecutive turns of one speaker are an error, or with ``merge_repeated`` one message
    (the non-empty texts joined by :data:`MERGE_SEPARATOR`).
    """
    if text.startswith(("Human:", "Assistant:")):
        text = "\n\n" + text
    matches = list(_TURN.finditer(text))
    if not matches or matches[0].start() != 0:
        raise DataError('expected a dialogue starting with "\\n\\nHuman: "', file=file, record=record, field=field)
    turns: list[tuple[Message, int]] = []
    for index, match in enumerate(matches):
        end = matches[index + 1].start() if index + 1 < len(matches) else len(text)
        role = _ROLES[match.group(1)]
        content = text[match.end() : end]
        if merge_repeated and turns and turns[-1][0].role == role:
            previous, merged = turns[-1]
            parts = [part for part in (previous.content, content) if part.strip()]
            turns[-1] = (Message(role, MERGE_SEPARATOR.join(parts) if parts else previous.content), merged + 1)
            continue
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            raise DataError(
                f"turn {index + 1} is {match.group(1)!r} but the turns must alternate Human/Assistant starting with Human",
                file=file,
                record=record,
                field=field,
            )
        turns.append((Message(role, content), 0))
    if turns[-1][0].role != "assistant":
        raise DataError("expected the dialogue to end with an Assistant turn", file=file, record=record, field=field)
    return turns


def parse_dialogue(
    text: str,
    *,
    file: str | None = None,
    record: str | None = None,
    field: str = "chosen",
    merge_repeated: bool = False,
) -> list[Message]:
    """Split ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` into alternating messages.

    The dialogue must start with a Human turn and end with an Assistant turn; see
    :func:`split_turns` for ``merge_repeated``.
    """
    return [
        message
        for message, _ in split_turns(text, file=file, record=record, field=field, merge_repeated=merge_repeated)
    ]


def parse_line(data: object, *, file: str, line: int, record_id: str, merge_repeated: bool = False) -> TextPreference:
    """One decoded JSONL line as a :class:`TextPreference`; DataError naming the line.

    With ``merge_repeated``, ``merged_turns`` counts the merges of the shared history
    once and those of each final answer.
    """
    record = f"line {line}"
    if not isinstance(data, dict):
        raise DataError(
            f"expected a JSON object with 'chosen' and 'rejected', got {type(data).__name__}",
            file=file,
            record=record,
            field="-",
        )
    dialogues = {}
    for name in ("chosen", "rejected"):
        if name not in data:
            raise DataError(
                f"missing field {name!r} (expected a dialogue string)", file=file, record=record, field=name
            )
        if not isinstance(data[name], str):
            raise DataError(
                f"expected a dialogue string, got {type(data[name]).__name__}", file=file, record=record, field=name
            )
        dialogues[name] = split_turns(data[name], file=file, record=record, field=name, merge_repeated=merge_repeated)
    merged_turns = sum(merged for _, merged in dialogues["chosen"]) + dialogues["rejected"][-1][1]
    chosen = [message for message, _ in dialogues["chosen"]]
    rejected = [message for message, _ in dialogues["rejected"]]
    if len(chosen) != len(rejected):
        raise DataError(
            f"'rejected' has {len(rejected)} turns but 'chosen' has {len(chosen)}; expected the same history and a different last answer",
            file=file,
            record=record,
            field="rejected",
        )
    for index, (left, right) in enumerate(zip(chosen[:-1], rejected[:-1], strict=True)):
        if left != right:
            raise DataError(
                f"turn {index + 1} ({left.role}) differs from 'chosen'; expected the same history and a different last answer",
                file=file,
                record=record,
                field="rejected",
            )
    return TextPreference(
        id=record_id,
        messages=chosen[:-1],
        chosen=chosen[-1].content,
        rejected=rejected[-1].content,
        line=line,
        merged_turns=merged_turns,
    )


def iter_hh_rlhf(path: str | Path, *, merge_repeated: bool = False) -> Iterator[TextPreference | DataError]:
    """Every line as a TextPreference, or the DataError of a bad line (then the next).

    ``merge_repeated``: join two consecutive turns of one speaker instead of an error.
    """
    file, stem = str(path), dataset_stem(path)
    return read_json_lines(
        path,
        lambda line, data: parse_line(
            data, file=file, line=line, record_id=f"{stem}-{line}", merge_repeated=merge_repeated
        ),
    )


def read_hh_rlhf(path: str | Path) -> Iterator[TextPreference]:
    """Stream the dialogues of an HH-RLHF file; the first bad line raises its DataError."""
    return strict(iter_hh_rlhf(path))


def to_record(preference: TextPreference, *, file: str) -> PreferenceRecord:
    """A text-only preference record (``image`` None) for the dialogue."""
    data = {
        "id": preference.id,
        "messages": [message.to_dict() for message in preference.messages],
        "image": None,
        "chosen": preference.chosen,
        "rejected": [preference.rejected],
        "rejected_sources": ["human"],
        "meta": {"source": "hh-rlhf", "line": preference.line},
    }
    try:
        return PreferenceRecord.from_dict(data, record=preference.id)
    except DataError as error:
        field = error.location.field or "-"
        if field.startswith("messages"):
            field = "chosen"
        raise DataError(error.message, file=file, record=f"line {preference.line}", field=field) from None


def read_items(path: str | Path, *, image_dir: str | Path | None = None) -> Iterator[Item]:
    del image_dir  # text only
    file, stem = str(path), dataset_stem(path)
    return read_json_lines(
        path,
        lambda line, data: to_record(parse_line(data, file=file, line=line, record_id=f"{stem}-{line}"), file=file),
    )


def detect(path: str | Path) -> bool:
    path = Path(path)
    if not path.is_file() or not path.name.endswith((".jsonl", ".jsonl.gz")):
        return False
    first = first_object(path)
    return first is not None and isinstance(first.get("chosen"), str) and "messages" not in first


FORMAT = Format(
    name="hh-rlhf",
    description='HH-RLHF dialogues: JSONL[.gz] lines with "chosen" and "rejected" Human/Assistant strings (read only)',
    detect=detect,
    read_items=read_items,
    writer=None,
    suffixes=(),
)
