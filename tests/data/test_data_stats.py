"""``mmsafe data stats``: counts by entity type, user turns, rejected source and split."""

from __future__ import annotations

import json

from mmsafe.cli import main
from mmsafe.data.records import Message, PreferenceRecord, write_records
from mmsafe.data.stats import compute_stats, turn_bucket


def record(record_id, *, turns, entity_type=None, image=True, sources=("human",), split=None):
    messages = []
    for turn in range(turns - 1):
        messages += [Message("user", f"q{turn}"), Message("assistant", f"a{turn}")]
    messages.append(Message("user", "<image>\nlast" if image else "last"))
    meta = {}
    if entity_type:
        meta["entity_type"] = entity_type
    if split:
        meta["split"] = split
    return PreferenceRecord(
        id=record_id,
        messages=messages,
        image="x.png" if image else None,
        chosen="No.",
        rejected=["Yes."] * len(sources),
        rejected_sources=list(sources),
        meta=meta,
    )


def test_turn_buckets_follow_the_paper():
    assert [turn_bucket(turns) for turns in (1, 2, 3, 4, 5, 9)] == ["1", "2", "3", "4", "5+", "5+"]


def test_counts(tmp_path, capsys):
    path = tmp_path / "records.jsonl"
    write_records(
        path,
        [
            record("a", turns=1, entity_type="PER", split="train"),
            record("b", turns=2, entity_type="LOC", split="train", sources=("human", "blind")),
            record("c", turns=6, entity_type="LOC", split="test"),
            record("d", turns=1, entity_type="GPE", image=False),
        ],
    )
    stats = compute_stats(path)
    assert (stats.records, stats.with_image, stats.without_image, stats.rejected_responses) == (4, 3, 1, 5)
    # The four CoNLL types first (zeros kept), then others alphabetically.
    assert stats.by_entity_type == {"PER": 1, "ORG": 0, "LOC": 2, "MISC": 0, "GPE": 1}
    assert stats.by_user_turns == {"1": 2, "2": 1, "3": 0, "4": 0, "5+": 1}
    assert stats.by_rejected_source == {"blind": 1, "human": 4}
    assert stats.by_split == {"test": 1, "train": 2}
    table = stats.table()
    assert "LOC" in table and " 50.0%" in table  # 2 of 4 records
    assert main(["data", "stats", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["by_user_turns"]["5+"] == 1


def test_stats_of_the_released_format(released_file):
    stats = compute_stats(released_file)
    assert stats.format_name == "mmsafe-po"
    assert stats.by_user_turns == {"1": 1, "2": 1, "3": 1, "4": 0, "5+": 0}
    assert stats.by_entity_type == {"PER": 1, "ORG": 1, "LOC": 1, "MISC": 0}
    assert stats.by_split == {}


def test_bad_data_is_one_error_line(tmp_path, capsys):
    path = tmp_path / "records.jsonl"
    path.write_text('{"id": "x"}\n', encoding="utf-8")
    assert main(["data", "stats", str(path)]) == 1
    assert (
        capsys.readouterr().err.strip()
        == f"error: {path}:x:messages: missing field 'messages' (expected a list of {{role, content}})"
    )
