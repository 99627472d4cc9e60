"""Text preference sources and the parse stage: dialogues in, (history, instruction) out.

Every source yields :class:`~mmsafe.data.formats.hh_rlhf.TextPreference` items (the
dialogue's messages ending with the last user turn, the chosen and the rejected answer,
the line number), or the :class:`~mmsafe.errors.DataError` of a line it could not read,
so that the builder reports each bad line with its number and carries on.

==================  ==================================================================
name                lines look like
==================  ==================================================================
``hh-rlhf``         ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}``
``pku-saferlhf``    ``{"prompt", "response_0", "response_1", "safer_response_id"}``
``jsonl``           ``{"prompt", "chosen", "rejected"}`` (an ``id`` is used when present)
==================  ==================================================================

HH-RLHF dialogues with two consecutive turns of one speaker (real data: 9 of the 2,312
harmless-base test dialogues) are kept: the two texts become one turn, and
``Dialogue.merged_turns`` counts the merges for the build summary.

:data:`SAMPLE_INPUT` and :data:`SAMPLE_IMAGE_INDEX` are a bundled synthetic HH-RLHF
snippet and its entity image index (``mmsafe build-data --sample``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmsafe.data.formats.base import first_object
from mmsafe.data.formats.hh_rlhf import TextPreference, dataset_stem, iter_hh_rlhf
from mmsafe.data.jsonl import iter_lines
from mmsafe.data.reading import read_json_lines
from mmsafe.data.records import Message
from mmsafe.errors import ConfigError, DataError

SourceItem = TextPreference | DataError
SourceReader = Callable[[Path], Iterator[SourceItem]]

#: The bundled sample: a few synthetic HH-RLHF dialogues and a JSON index of entity images.
SAMPLE_DIR = Path(__file__).resolve().parent / "sample_data"
SAMPLE_INPUT = SAMPLE_DIR / "hh_rlhf_sample.jsonl"
SAMPLE_IMAGE_INDEX = SAMPLE_DIR / "entity_images.json"


@dataclass
class Dialogue:
    """The parse stage's output: one text dialogue split around its last user turn.

    ``history`` holds the earlier turns (empty, or alternating and ending with the
    assistant); ``instruction`` is the last user turn, the one the image will belong to.
    """

    id: str
    history: list[Message]
    instruction: str
    chosen: str
    rejected: str
    file: str
    line: int
    #: Source turns joined to the turn before them (same speaker twice in a row).
    merged_turns: int = 0

    @property
    def num_turns(self) -> int:
        """User turns, the last one included (1 = no history)."""
        return len(self.history) // 2 + 1


def parse_dialogue(preference: TextPreference, *, file: str) -> Dialogue:
    """Split a text preference into shared history and last user instruction."""
    messages = preference.messages
    if not messages or messages[-1].role != "user":
        raise DataError(
            "expected the dialogue to end with a user turn before the answers",
            file=file,
            record=f"line {preference.line}",
            field="messages",
        )
    if not messages[-1].content.strip():
        raise DataError(
            "the last user turn is empty; expected an instruction",
            file=file,
            record=f"line {preference.line}",
            field="messages",
        )
    return Dialogue(
        id=preference.id,
        history=list(messages[:-1]),
        instruction=messages[-1].content,
        chosen=preference.chosen,
        rejected=preference.rejected,
        file=file,
        line=preference.line,
        merged_turns=getattr(preference, "merged_turns", 0),
    )


def _string_field(data: dict[str, Any], name: str, *, file: str, line: int) -> str:
    if name not in data:
        raise DataError(f"missing field {name!r} (expected a string)", file=file, record=f"line {line}", field=name)
    value = data[name]
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"expected a non-empty string, got {value!r:.60}", file=file, record=f"line {line}", field=name)
    return value


def _object(value: Any, *, file: str, line: int, expected: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DataError(
            f"expected a JSON object with {expected}, got {type(value).__name__}",
            file=file,
            record=f"line {line}",
            field="-",
        )
    return value


def _line_id(data: dict[str, Any], stem: str, line: int) -> str:
    value = data.get("id")
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return f"{stem}-{line}"


def read_pku_saferlhf(path: Path) -> Iterator[SourceItem]:
    """PKU-SafeRLHF lines: the safer response is chosen, the other rejected."""
    file, stem = str(path), dataset_stem(path)

    def parse(line: int, value: Any) -> TextPreference:
        data = _object(value, file=file, line=line, expected="prompt, response_0, response_1, safer_response_id")
        prompt = _string_field(data, "prompt", file=file, line=line)
        responses = [_string_field(data, f"response_{index}", file=file, line=line) for index in (0, 1)]
        safer = data.get("safer_response_id")
        if safer not in (0, 1) or isinstance(safer, bool):
            raise DataError(
                f"expected 0 or 1, got {safer!r}", file=file, record=f"line {line}", field="safer_response_id"
            )
        return TextPreference(
            id=_line_id(data, stem, line),
            messages=[Message("user", prompt)],
            chosen=responses[safer],
            rejected=responses[1 - safer],
            line=line,
        )

    return read_json_lines(path, parse)


def read_prompt_jsonl(path: Path) -> Iterator[SourceItem]:
    """Any JSONL whose lines hold ``prompt``, ``chosen`` and ``rejected`` strings."""
    file, stem = str(path), dataset_stem(path)

    def parse(line: int, value: Any) -> TextPreference:
        data = _object(value, file=file, line=line, expected="prompt, chosen, rejected")
        prompt, chosen, rejected = (
            _string_field(data, name, file=file, line=line) for name in ("prompt", "chosen", "rejected")
        )
        return TextPreference(
            id=_line_id(data, stem, line),
            messages=[Message("user", prompt)],
            chosen=chosen,
            rejected=rejected,
            line=line,
        )

    return read_json_lines(path, parse)


def read_hh_rlhf_merged(path: Path) -> Iterator[SourceItem]:
    """HH-RLHF lines; two consecutive turns of one speaker are merged, not an error."""
    return iter_hh_rlhf(path, merge_repeated=True)


#: Source readers by name; an open set (add one with :func:`register_source`).
SOURCES: dict[str, SourceReader] = {
    "hh-rlhf": read_hh_rlhf_merged,
    "pku-saferlhf": read_pku_saferlhf,
    "jsonl": read_prompt_jsonl,
}


def register_source(name: str, reader: SourceReader) -> None:
    SOURCES[name] = reader


def detect_source(path: Path) -> str:
    """The source format of ``path`` from the keys of its first JSON object."""
    first = first_object(path)
    if first is None:
        for _ in iter_lines(path):  # an unreadable file says why (bad UTF-8, truncated gzip)
            break
        raise DataError(
            "cannot detect the input format: no JSON object among the first lines; set format explicitly",
            file=str(path),
        )
    if "safer_response_id" in first:
        return "pku-saferlhf"
    if "prompt" in first:
        return "jsonl"
    if isinstance(first.get("chosen"), str) and "Human:" in first["chosen"]:
        return "hh-rlhf"
    raise DataError(
        f"cannot detect the input format from the keys {sorted(first)}; expected HH-RLHF (chosen/rejected dialogues), "
        "PKU-SafeRLHF (prompt, response_0, response_1, safer_response_id) or prompt/chosen/rejected",
        file=str(path),
        record="line 1",
    )


def read_dialogues(path: str | Path, format_name: str = "auto") -> Iterator[Dialogue | DataError]:
    """Parse stage over a source file: a :class:`Dialogue` per good line, a DataError per bad one."""
    path = Path(path)
    if not path.is_file():
        raise DataError("input file not found", file=str(path))
    if format_name == "auto":
        format_name = detect_source(path)
    if format_name not in SOURCES:
        raise ConfigError(f"format: unknown source format {format_name!r}; known: auto, {', '.join(SOURCES)}")
    file = str(path)
    for item in SOURCES[format_name](path):
        if isinstance(item, DataError):
            yield item.at(file=file)
            continue
        try:
            yield parse_dialogue(item, file=file)
        except DataError as error:
            yield error
