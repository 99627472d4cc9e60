"""The format registry: detection, names, writers, plug-in formats, the convert command."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from mmsafe.cli import main
from mmsafe.data.formats import FORMATS, Format, convert, detect_format, read_records, register_format, write_records
from mmsafe.data.records import PreferenceRecord
from mmsafe.errors import DataError


def test_builtin_formats_and_writers():
    assert {"jsonl", "mmsafe-po", "hf", "hh-rlhf"} <= set(FORMATS)
    assert FORMATS["jsonl"].writer is not None and FORMATS["mmsafe-po"].writer is not None
    assert FORMATS["hf"].writer is None and FORMATS["hh-rlhf"].writer is None


def test_detection(tmp_path, record_dict):
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps(record_dict("a")) + "\n", encoding="utf-8")
    dialogues = tmp_path / "dialogues.jsonl"
    dialogues.write_text(
        json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}) + "\n",
        encoding="utf-8",
    )
    assert detect_format(records) == "jsonl"
    packed = tmp_path / "records.jsonl.gz"
    packed.write_bytes(gzip.compress(records.read_bytes()))
    assert detect_format(packed) == "jsonl"
    assert [record.id for record in read_records(packed)] == ["a"]
    assert detect_format(dialogues) == "hh-rlhf"
    assert detect_format("Downton/MMSafe-PO") == "hf"  # a Hub id, not a local file
    with pytest.raises(DataError, match="file not found"):
        detect_format(tmp_path / "missing.json")
    other = tmp_path / "data.csv"
    other.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"cannot tell the data format.*--format, one of hf, mmsafe-po, hh-rlhf, jsonl"):
        detect_format(other)


def test_unknown_and_read_only_formats_are_clear(tmp_path, released_file):
    with pytest.raises(DataError, match="unknown data format 'csv'; expected one of"):
        list(read_records(released_file, "csv"))
    with pytest.raises(DataError, match=r"'hh-rlhf' format can be read but not written; write one of mmsafe-po, jsonl"):
        write_records(tmp_path / "out.jsonl", [], "hh-rlhf")
    with pytest.raises(DataError, match="cannot tell the output format"):
        convert(released_file, tmp_path / "out.txt")
    assert not (tmp_path / "out.txt").exists()


def test_a_plugin_format_plugs_in(tmp_path, record_dict, monkeypatch):
    monkeypatch.setattr("mmsafe.data.formats.FORMATS", FORMATS.copy())

    def read_items(path, *, image_dir=None):
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        for line_number, line in enumerate(lines, start=1):
            yield PreferenceRecord.from_dict(record_dict(f"tsv-{line_number}", image=None, chosen=line.split("\t")[0]))

    register_format(
        Format(
            name="tsv",
            description="tab-separated",
            detect=lambda path: str(path).endswith(".tsv"),
            read_items=read_items,
        )
    )
    source = tmp_path / "pairs.tsv"
    source.write_text("No.\tYes.\n", encoding="utf-8")
    assert detect_format(source) == "tsv"
    (record,) = read_records(source)
    assert (record.id, record.chosen) == ("tsv-1", "No.")
    with pytest.raises(ValueError, match="already registered"):
        register_format(Format(name="tsv", description="again", detect=lambda path: False, read_items=read_items))


def test_convert_command(released_file, tmp_path, capsys):
    output = tmp_path / "records.jsonl"
    assert main(["data", "convert", str(released_file), str(output)]) == 0
    assert "converted 3 records (mmsafe-po)" in capsys.readouterr().out
    back = tmp_path / "back.dat"
    assert main(["data", "convert", str(output), str(back), "--to", "mmsafe-po"]) == 0
    assert json.loads(back.read_text(encoding="utf-8")) == json.loads(released_file.read_text(encoding="utf-8"))


def test_convert_error_is_one_line_and_leaves_no_output(tmp_path, capsys):
    source = tmp_path / "bad.json"
    source.write_text('[{"id": 1, "question": "no turns", "chosen": "a", "rejected": "b"}]', encoding="utf-8")
    output = tmp_path / "out.jsonl"
    assert main(["data", "convert", str(source), str(output)]) == 1
    err = capsys.readouterr().err
    assert (
        err.strip()
        == f"error: {source}:1:question: expected a LLaVA-v1 prompt 'USER: ... ASSISTANT:', found no USER: turn"
    )
    assert not output.exists()
