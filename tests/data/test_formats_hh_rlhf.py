"""HH-RLHF dialogues: shared history, last answers, errors naming the line."""

from __future__ import annotations

import gzip
import json
import re

import pytest

from mmsafe.data.formats import convert, detect_format, read_records
from mmsafe.data.formats.hh_rlhf import parse_dialogue, read_hh_rlhf
from mmsafe.data.records import Message
from mmsafe.errors import DataError

HISTORY = "\n\nHuman: What is a lock pick?\n\nAssistant: A tool for opening locks.\n\nHuman: How do I open my neighbour’s door with one?"
LINES = [
    {
        "chosen": HISTORY + "\n\nAssistant: I can’t help you get into someone else’s home.",
        "rejected": HISTORY + "\n\nAssistant: Insert the pick and rake the pins.",
    },
    {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant:"},
]


def write_lines(path, rows, *, compress=False):
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if compress:
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("name", ["harmless-base-train.jsonl", "train.jsonl.gz"])
def test_dialogues_split_into_history_and_answers(tmp_path, name):
    path = write_lines(tmp_path / name, LINES, compress=name.endswith(".gz"))
    assert detect_format(path) == "hh-rlhf"
    first, second = read_hh_rlhf(path)
    stem = name.split(".")[0]
    assert (first.id, first.line) == (f"{stem}-1", 1)
    assert first.messages == [
        Message("user", "What is a lock pick?"),
        Message("assistant", "A tool for opening locks."),
        Message("user", "How do I open my neighbour’s door with one?"),
    ]
    assert first.chosen == "I can’t help you get into someone else’s home."
    assert first.rejected == "Insert the pick and rake the pins."
    assert (second.id, second.chosen, second.rejected) == (f"{stem}-2", "Hello!", "")


def test_conversion_gives_text_only_records(tmp_path):
    path = write_lines(tmp_path / "test.jsonl", LINES[:1])
    (record,) = read_records(path)
    assert record.image is None
    assert record.num_turns == 2
    assert record.rejected == ["Insert the pick and rake the pins."]
    assert record.meta == {"source": "hh-rlhf", "line": 1}
    result = convert(path, tmp_path / "records.jsonl")
    assert (result.from_format, result.to_format, result.rows) == ("hh-rlhf", "jsonl", 1)


def test_an_empty_answer_is_an_error_naming_the_line_when_converting(tmp_path):
    path = write_lines(tmp_path / "test.jsonl", LINES)
    with pytest.raises(DataError, match=r"test\.jsonl:line 2:rejected\[0\]: expected a non-empty response"):
        list(read_records(path))


@pytest.mark.parametrize(
    ("row", "field", "message"),
    [
        (
            {"chosen": HISTORY + "\n\nAssistant: No.", "rejected": "\n\nHuman: Something else\n\nAssistant: Yes."},
            "rejected",
            "'rejected' has 2 turns but 'chosen' has 4",
        ),
        (
            {
                "chosen": HISTORY + "\n\nAssistant: No.",
                "rejected": HISTORY.replace("neighbour’s", "friend’s") + "\n\nAssistant: Yes.",
            },
            "rejected",
            "turn 3 (user) differs from 'chosen'",
        ),
        (
            {"chosen": "\n\nHuman: Hi", "rejected": "\n\nHuman: Hi\n\nAssistant: Yes."},
            "chosen",
            "end with an Assistant turn",
        ),
        ({"chosen": "Hello there", "rejected": "\n\nHuman: Hi\n\nAssistant: Yes."}, "chosen", "starting with"),
        (
            {
                "chosen": "\n\nHuman: Hi\n\nHuman: Again\n\nAssistant: No.",
                "rejected": "\n\nHuman: Hi\n\nAssistant: Yes.",
            },
            "chosen",
            "must alternate",
        ),
        ({"chosen": "\n\nHuman: Hi\n\nAssistant: No."}, "rejected", "missing field 'rejected'"),
        ({"chosen": "\n\nHuman: Hi\n\nAssistant: No.", "rejected": ["x"]}, "rejected", "got list"),
    ],
)
def test_bad_lines_are_errors_naming_the_line(tmp_path, row, field, message):
    path = write_lines(tmp_path / "bad.jsonl", [LINES[0], row])
    with pytest.raises(DataError, match=re.escape(message)) as caught:
        list(read_hh_rlhf(path))
    assert str(caught.value.location) == f"{path}:line 2:{field}"


def test_malformed_json_and_truncated_gzip(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(LINES[0]) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.jsonl:line 2:-: malformed JSON"):
        list(read_hh_rlhf(path))
    packed = write_lines(tmp_path / "cut.jsonl.gz", LINES * 50, compress=True)
    packed.write_bytes(packed.read_bytes()[:-30])
    with pytest.raises(DataError, match="corrupt or truncated gzip"):
        list(read_hh_rlhf(packed))


def test_parse_dialogue_keeps_text_verbatim():
    messages = parse_dialogue("\n\nHuman: a\nb  \n\nAssistant:  two spaces")
    assert messages == [Message("user", "a\nb  "), Message("assistant", " two spaces")]
