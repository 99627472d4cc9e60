"""JSONL streams: line numbers, atomic writes, truncated tails, resumable keyed output."""

from __future__ import annotations

import gzip
import json

import pytest

from mmsafe.data.jsonl import ResumableJsonlWriter, read_jsonl, repair_truncated_tail, write_jsonl
from mmsafe.errors import DataError


def key(row):
    return (row["id"], row["variant"])


def test_read_gives_line_numbers_and_skips_blank_lines(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n', encoding="utf-8")
    assert list(read_jsonl(path)) == [(1, {"a": 1}), (3, {"a": 2})]
    packed = tmp_path / "rows.jsonl.gz"
    with gzip.open(packed, "wt", encoding="utf-8") as handle:
        handle.write('{"é": "“q”"}\n')
    assert list(read_jsonl(packed)) == [(1, {"é": "“q”"})]


def test_malformed_line_and_bad_bytes_are_named(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n{"a": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"rows\.jsonl:line 2:-: malformed JSON"):
        list(read_jsonl(path))
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b'{"a": 1}\n\xff\xfe\n')
    with pytest.raises(DataError, match="not valid UTF-8"):
        list(read_jsonl(binary))


def test_write_is_atomic_and_utf8(tmp_path):
    path = tmp_path / "out" / "rows.jsonl"
    assert write_jsonl(path, [{"text": "café “quoted”"}]) == 1
    assert path.read_text(encoding="utf-8") == '{"text": "café “quoted”"}\n'

    def failing_rows():
        yield {"ok": 1}
        raise RuntimeError("crash in the middle")

    with pytest.raises(RuntimeError):
        write_jsonl(path, failing_rows())
    assert path.read_text(encoding="utf-8") == '{"text": "café “quoted”"}\n'  # the old file survives
    assert [entry.name for entry in path.parent.iterdir()] == ["rows.jsonl"]  # no temporary left


def test_truncated_tail_is_repaired(tmp_path):
    path = tmp_path / "rows.jsonl"
    complete = '{"id": "a", "variant": "default"}\n'
    path.write_text(complete + '{"id": "b", "vari', encoding="utf-8")
    assert repair_truncated_tail(path) == len('{"id": "b", "vari')
    assert path.read_text(encoding="utf-8") == complete
    assert repair_truncated_tail(path) == 0  # complete files are left alone


def test_resumable_writer_skips_done_keys_after_a_crash(tmp_path):
    path = tmp_path / "responses.jsonl"
    first = ResumableJsonlWriter(path, key=key, fsync=False)
    assert first.write_batch([{"id": "a", "variant": "default"}, {"id": "b", "variant": "default"}]) == 2
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"id": "c", "vari')  # killed mid-line
    resumed = ResumableJsonlWriter(path, key=key, fsync=False)
    assert resumed.repaired_bytes == len('{"id": "c", "vari')
    assert ("a", "default") in resumed and ("c", "default") not in resumed
    rows = [{"id": name, "variant": "default"} for name in ("a", "b", "c")] + [{"id": "a", "variant": "blind"}]
    assert resumed.write_batch(rows) == 2  # only c/default and a/blind are new
    assert resumed.write_batch(rows) == 0
    written = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [key(row) for row in written] == [("a", "default"), ("b", "default"), ("c", "default"), ("a", "blind")]


def test_resumable_writer_refuses_a_foreign_file(tmp_path):
    path = tmp_path / "other.jsonl"
    path.write_text('{"something": 1}\n', encoding="utf-8")
    with pytest.raises(DataError, match="line 1:-: existing output line has no key"):
        ResumableJsonlWriter(path, key=key)
