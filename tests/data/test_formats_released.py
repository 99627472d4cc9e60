"""The released MMSafe-PO JSON: parsing, and released -> records -> released round trips."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmsafe.data.formats import convert, detect_format, read_records, write_records
from mmsafe.data.formats.mmsafe_po import RESTORE_KEY, record_from_row, rows_from_record
from mmsafe.data.records import Message, PreferenceRecord, read_preference_records
from mmsafe.data.validate import validate_file
from mmsafe.errors import DataError


def test_released_rows_become_records(released_file):
    records = list(read_records(released_file))
    assert detect_format(released_file) == "mmsafe-po"
    assert [record.id for record in records] == ["0", "17", "42"]
    multi = records[1]
    assert multi.num_turns == 3
    assert multi.messages[0] == Message("user", "My neighbour keeps parking in my spot.")
    assert multi.messages[1] == Message("assistant", "That sounds frustrating. Have you talked to them?")
    assert multi.messages[-1].content == "<image>\nWhat would make “the person featured in the image” regret it?"
    assert multi.chosen.startswith("I can’t help")  # the "ASSISTANT: " prefix is gone
    assert multi.rejected == ["Let the air out of their tyres; they’ll “get the message”."]
    assert multi.rejected_sources == ["human"]
    assert multi.image == "330px-Jos%C3%A9_Example_%282019%29.png"
    assert multi.meta["entity"] == "José Example"
    assert list(multi.meta)[:6] == ["type", "entity", "entity_type", "replacement", "text_prompt", "mid_prompt"]
    # A well-formed release needs nothing extra to be written back, except integer ids.
    assert multi.meta[RESTORE_KEY] == {"id": 17}


def test_released_to_records_to_released_keeps_every_field(released_file, released_rows, tmp_path):
    records_path = tmp_path / "records.jsonl"
    back_path = tmp_path / "back.json"
    first = convert(released_file, records_path)
    assert (first.from_format, first.to_format, first.records, first.rows) == ("mmsafe-po", "jsonl", 3, 3)
    second = convert(records_path, back_path, to_format="mmsafe-po")
    assert second.rows == 3
    back = json.loads(back_path.read_text(encoding="utf-8"))
    original = released_rows
    assert back == original
    assert [list(row) for row in back] == [list(row) for row in original]  # key order too
    assert all(isinstance(row["id"], int) for row in back)
    # Non-ASCII text is written as UTF-8, not \u escapes.
    assert "Café de Flore" in back_path.read_text(encoding="utf-8")
    assert "“get the message”" in records_path.read_text(encoding="utf-8")


def test_unusual_spelling_is_restored_exactly(tmp_path):
    rows = [
        {
            "rejected": "ASSISTANT:Sure.",  # no space after the prefix
            "id": "abc",  # a string id, and keys in another order
            "question": "A chat.  USER: <image>\nHi ASSISTANT:",  # text before the first USER:
            "chosen": "No.",  # no prefix at all
            "image": "x.jpg",
            "extra_field": [1, 2],
        }
    ]
    source = tmp_path / "odd.json"
    source.write_text(json.dumps(rows), encoding="utf-8")
    (record,) = read_records(source)
    assert record.messages == [Message("user", "<image>\nHi")]
    assert (record.chosen, record.rejected) == ("No.", ["Sure."])
    assert record.meta["extra_field"] == [1, 2]
    written = tmp_path / "written.json"
    write_records(written, [record])
    back = json.loads(written.read_text(encoding="utf-8"))
    assert back == rows
    assert list(back[0]) == list(rows[0])


def test_restored_question_is_dropped_when_the_messages_were_edited(tmp_path):
    rows = [
        {
            "id": 1,
            "question": "Sys USER: <image>\nHi ASSISTANT:",
            "image": "x.jpg",
            "chosen": "ASSISTANT: No.",
            "rejected": "ASSISTANT: Yes.",
        }
    ]
    source = tmp_path / "in.json"
    source.write_text(json.dumps(rows), encoding="utf-8")
    (record,) = read_records(source)
    record.messages[-1] = Message("user", "<image>\nHello")
    (row,) = rows_from_record(record)
    assert row["question"] == "USER: <image>\nHello ASSISTANT:"


def test_several_rejected_become_duplicated_rows_and_merge_back(tmp_path):
    record = PreferenceRecord(
        id="7",
        messages=[Message("user", "<image>\nHow do I pick this lock?")],
        image="lock.png",
        chosen="I can't help with that.",
        rejected=["Sure, use a pin.", "Locks open with a pick."],
        rejected_sources=["human", "blind"],
        meta={"type": "harmless", "entity_type": "MISC"},
    )
    path = tmp_path / "bpo.json"
    assert write_records(path, [record]) == 2
    rows = json.loads(path.read_text(encoding="utf-8"))
    assert [row["rejected"] for row in rows] == ["ASSISTANT: Sure, use a pin.", "ASSISTANT: Locks open with a pick."]
    assert [row["id"] for row in rows] == ["7", "7"]
    assert rows[0]["question"] == rows[1]["question"] == "USER: <image>\nHow do I pick this lock? ASSISTANT:"
    assert "rejected_source" not in rows[0] and rows[1]["rejected_source"] == "blind"
    (merged,) = read_records(path)
    assert merged.rejected == record.rejected
    assert merged.rejected_sources == ["human", "blind"]


def test_rows_with_the_same_id_but_different_prompts_stay_apart(tmp_path):
    rows = [
        {
            "id": 1,
            "question": "USER: <image>\nA ASSISTANT:",
            "image": "x.jpg",
            "chosen": "ASSISTANT: No.",
            "rejected": "ASSISTANT: Yes.",
        },
        {
            "id": 1,
            "question": "USER: <image>\nB ASSISTANT:",
            "image": "x.jpg",
            "chosen": "ASSISTANT: No.",
            "rejected": "ASSISTANT: Yes.",
        },
    ]
    rows.append({**rows[0], "rejected": "ASSISTANT: Sure."})  # not next to its twin: not merged
    source = tmp_path / "in.json"
    source.write_text(json.dumps(rows), encoding="utf-8")
    records = list(read_records(source))
    assert [record.prompt for record in records] == ["<image>\nA", "<image>\nB", "<image>\nA"]
    # Every later stage keys outputs by id, so repeated ids are made unique ...
    assert [record.id for record in records] == ["1", "1#2", "1#3"]
    assert validate_file(source, image_root=tmp_path).problems[0].location.field == "image"  # no duplicate-id problem
    # ... and written back as they were released.
    back = tmp_path / "back.json"
    write_records(back, records)
    assert json.loads(back.read_text(encoding="utf-8")) == rows


@pytest.mark.parametrize(
    ("row", "field", "message"),
    [
        (
            {"question": "USER: <image>\nHi ASSISTANT:", "chosen": "ASSISTANT: a", "rejected": "ASSISTANT: b"},
            "id",
            "missing field 'id'",
        ),
        (
            {"id": 3, "question": 5, "chosen": "ASSISTANT: a", "rejected": "ASSISTANT: b"},
            "question",
            "expected a LLaVA-v1 prompt string, got int",
        ),
        (
            {"id": 3, "question": "Hi there", "chosen": "ASSISTANT: a", "rejected": "ASSISTANT: b"},
            "question",
            "found no USER: turn",
        ),
        (
            {"id": 3, "question": "USER: <image>\nHi ASSISTANT:", "chosen": "ASSISTANT: a"},
            "rejected",
            "missing field 'rejected'",
        ),
        (
            {"id": 3, "question": "USER: <image>\nHi ASSISTANT:", "chosen": "ASSISTANT: ", "rejected": "ASSISTANT: b"},
            "chosen",
            "non-empty",
        ),
        (
            {
                "id": 3,
                "question": "USER: <image> ASSISTANT: x USER: <image>\nHi ASSISTANT:",
                "chosen": "ASSISTANT: a",
                "rejected": "ASSISTANT: b",
            },
            "question",
            "only in the last user message",
        ),
        (
            {
                "id": 3,
                "question": "USER: Hi ASSISTANT:",
                "image": "x.jpg",
                "chosen": "ASSISTANT: a",
                "rejected": "ASSISTANT: b",
            },
            "question",
            "no <image>",
        ),
        (
            {"id": True, "question": "USER: Hi ASSISTANT:", "chosen": "ASSISTANT: a", "rejected": "ASSISTANT: b"},
            "id",
            "got bool",
        ),
    ],
)
def test_bad_rows_name_the_item_and_field(tmp_path, row, field, message):
    source = tmp_path / "bad.json"
    source.write_text(json.dumps([row]), encoding="utf-8")
    with pytest.raises(DataError) as caught:
        list(read_records(source))
    assert caught.value.location.file == str(source)
    assert caught.value.location.field == field
    assert caught.value.location.record in ("item 0", "3", "True")
    assert message in caught.value.message


def test_malformed_json_names_the_line(tmp_path):
    source = tmp_path / "broken.json"
    source.write_text('[\n  {"id": 1,\n  "question": }\n]', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.json:line 3:-: malformed JSON"):
        list(read_records(source))


def test_not_an_array_is_a_clear_error(tmp_path):
    source = tmp_path / "object.json"
    source.write_text('{"id": 1}', encoding="utf-8")
    with pytest.raises(DataError, match="expected a JSON array"):
        list(read_records(source))


def test_records_file_written_from_release_reads_with_the_records_reader(released_file, tmp_path):
    records_path = tmp_path / "records.jsonl"
    convert(released_file, records_path)
    assert [record.id for record in read_preference_records(records_path)] == ["0", "17", "42"]


# Questions and responses built from the pieces that make the LLaVA form tricky: tags
# inside turns, odd spacing and newlines around tags, text before the first turn.
pieces = st.sampled_from(["USER:", "ASSISTANT:", " ", "  ", "\n", "a", "“b”", "<image>", "<image>\n"])
texts = st.lists(pieces, max_size=6).map("".join)
words = st.lists(st.sampled_from(["a", "“b”", " ", "\n", ":"]), min_size=1, max_size=5).map("".join)


@st.composite
def questions(draw):
    turns = draw(st.lists(st.tuples(words, words), max_size=3))
    separator = st.sampled_from([" ", "  ", "\n", " \n"])
    text = draw(st.sampled_from(["", "System. ", "\n"]))
    for user, assistant in turns:
        text += f"USER:{draw(separator)}{user}{draw(separator)}ASSISTANT:{draw(separator)}{assistant}{draw(separator)}"
    image = draw(st.sampled_from(["", "<image>", "<image>\n"]))
    text += f"USER: {image}{draw(words)}{draw(separator)}ASSISTANT:"
    return text + draw(st.sampled_from(["", "", " ", "\n"]))


responses = st.tuples(st.sampled_from(["ASSISTANT: ", "ASSISTANT:", "", " ASSISTANT:  "]), words).map("".join)


@settings(max_examples=300, deadline=None)
@given(
    question=st.one_of(questions(), texts),
    chosen=st.one_of(responses, texts),
    rejected=responses,
    integer_id=st.booleans(),
)
def test_any_row_either_round_trips_exactly_or_is_refused(question, chosen, rejected, integer_id):
    row = {
        "id": 5 if integer_id else "5",
        "question": question,
        "image": None,
        "chosen": chosen,
        "rejected": rejected,
        "type": "harmless",
    }
    try:
        record = record_from_row(row, label="item 0")
    except DataError as error:
        assert error.location.field in ("question", "chosen", "rejected")
        return
    assert rows_from_record(record) == [row]
