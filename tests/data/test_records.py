"""Preference, response and verdict records: round trips and errors naming record and field."""

from __future__ import annotations

import pytest

from mmsafe.data.records import (
    PreferenceRecord,
    ResponseRecord,
    VerdictRecord,
    read_preference_records,
    write_records,
)
from mmsafe.errors import DataError


def test_preference_record_round_trip(record_dict, tmp_path):
    data = record_dict("r1", rejected=["Sure.", "Fine, here."], rejected_sources=["human", "blind"])
    record = PreferenceRecord.from_dict(data)
    assert record.to_dict() == data
    assert record.num_turns == 1 and record.has_image_token
    path = tmp_path / "records.jsonl"
    assert write_records(path, [record]) == 1
    assert [read.to_dict() for read in read_preference_records(path)] == [data]


def test_sources_default_to_human(record_dict):
    data = record_dict("r1", rejected=["a", "b"])
    del data["rejected_sources"]
    assert PreferenceRecord.from_dict(data).rejected_sources == ["human", "human"]


@pytest.mark.parametrize(
    ("changes", "record", "field", "message"),
    [
        ({"id": ""}, "line 4", "id", "expected a non-empty string"),
        ({"messages": "hi"}, "r1", "messages", "expected a list of messages, got str"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, "r1", "messages[0].role", "expected role 'user'"),
        ({"messages": [{"role": "user", "content": 3}]}, "r1", "messages[0].content", "expected string content"),
        (
            {
                "messages": [
                    {"role": "user", "content": "<image> a"},
                    {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "<image>\nc"},
                ]
            },
            "r1",
            "messages[0].content",
            "only in the last user message",
        ),
        ({"messages": [{"role": "user", "content": "no token"}]}, "r1", "messages", "has no <image>"),
        ({"chosen": 5}, "r1", "chosen", "expected a string, got int"),
        ({"chosen": "  "}, "r1", "chosen", "non-empty"),
        ({"rejected": []}, "r1", "rejected", "at least one"),
        ({"rejected": ["ok", 3]}, "r1", "rejected[1]", "expected a string, got int"),
        ({"rejected_sources": ["human", "blind"]}, "r1", "rejected_sources", "expected 1 sources"),
        ({"meta": []}, "r1", "meta", "expected an object"),
        ({"image": ""}, "r1", "image", "expected a relative path or null"),
    ],
)
def test_errors_name_record_and_field(record_dict, changes, record, field, message):
    data = record_dict("r1", **changes)
    with pytest.raises(DataError, match=message) as caught:
        PreferenceRecord.from_dict(data, record="line 4")
    assert (caught.value.location.record, caught.value.location.field) == (record, field)


def test_missing_field_is_named(record_dict):
    data = record_dict("r1")
    del data["rejected"]
    with pytest.raises(DataError, match="missing field 'rejected'") as caught:
        PreferenceRecord.from_dict(data)
    assert str(caught.value).startswith("-:r1:rejected: ")


def test_reader_names_the_file_and_line(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('\n["not an object"]\n', encoding="utf-8")
    with pytest.raises(DataError) as caught:
        list(read_preference_records(path))
    assert str(caught.value) == f"{path}:line 2:-: expected a JSON object, got list"


def test_response_and_verdict_records():
    response = ResponseRecord.from_dict({"id": "a", "response": "No.", "model": "tiny", "latency_s": 0.5})
    assert response.key == ("a", "default") and response.extra == {"latency_s": 0.5}
    assert ResponseRecord.from_dict(response.to_dict()) == response
    verdict = VerdictRecord.from_dict({"id": "a", "judge": "refusal", "verdict": "unparseable", "variant": "blind"})
    assert verdict.key == ("a", "blind")
    assert VerdictRecord.from_dict(verdict.to_dict()) == verdict
    with pytest.raises(DataError, match="expected one of safe, unsafe, unparseable") as caught:
        VerdictRecord.from_dict({"id": "a", "judge": "j", "verdict": "maybe"})
    assert (caught.value.location.record, caught.value.location.field) == ("a", "verdict")
