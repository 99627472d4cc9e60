"""``open_inputs``: one loader, one split rule, one id check, one image-root default."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from mmsafe.cli import main
from mmsafe.data.images import load_image
from mmsafe.data.inputs import (
    InputSet,
    check_unique_ids,
    default_image_root,
    image_root_sidecar_path,
    open_inputs,
    write_image_root_sidecar,
)
from mmsafe.data.records import Message, PreferenceRecord, read_preference_records
from mmsafe.data.validate import validate_file
from mmsafe.errors import ConfigError, DataError
from mmsafe.generate.blind import make_blind
from tests.generate.generate_data import make_records, write_dataset


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def record(record_id: str, split: str | None = None) -> PreferenceRecord:
    return PreferenceRecord(
        record_id, [Message("user", "Hi")], "No.", ["Yes."], meta={} if split is None else {"split": split}
    )


class AnswerEngine:
    """Answers every blind request with a fixed text (no model)."""

    name = "answer"

    def generate(self, requests, params):
        return [f"blind answer to {request.id}" for request in requests]


# ---------------------------------------------------------------- each kind of source


def test_records_jsonl_opens_with_its_folder_as_image_root(tmp_path, record_dict):
    data = write_jsonl(tmp_path / "data" / "records.jsonl", [record_dict("a"), record_dict("b", image=None)])
    inputs = open_inputs(data)
    assert isinstance(inputs, InputSet)
    assert [r.id for r in inputs] == ["a", "b"] and len(inputs) == 2
    assert (inputs.source, inputs.image_root, inputs.format_name, inputs.split) == (
        str(data),
        tmp_path / "data",
        "jsonl",
        None,
    )


def test_released_json_opens_as_mmsafe_po(released_file):
    inputs = open_inputs(released_file)
    assert inputs.format_name == "mmsafe-po" and inputs.image_root == released_file.parent
    assert [r.id for r in inputs] == ["0", "17", "42"]  # the released integer ids, as strings


def test_prompt_set_is_read_only_when_asked(tmp_path):
    rows = [
        {
            "id": "p1",
            "messages": [{"role": "user", "content": "<image>\nWhat is this?"}],
            "image": "images/p1.png",
            "expected": "help",
        }
    ]
    data = write_jsonl(tmp_path / "prompts.jsonl", rows)
    inputs = open_inputs(data, prompt_sets=True)
    assert inputs.format_name == "prompts" and [item.id for item in inputs] == ["p1"]
    assert inputs.records[0].image_root == tmp_path == inputs.image_root  # the items carry the same root
    with pytest.raises(DataError, match=r"prompts\.jsonl:p1:chosen: missing field 'chosen'"):
        open_inputs(data)  # a stage that needs responses does not take prompts


def test_records_in_memory_and_an_input_set():
    records = [record("a"), record("b")]
    inputs = open_inputs(records)
    assert (inputs.records, inputs.source, inputs.image_root, inputs.format_name) == (records, None, None, None)
    assert open_inputs(records, image_root="pictures").image_root == Path("pictures")
    again = open_inputs(open_inputs(records, image_root="pictures"), limit=1)
    assert [r.id for r in again] == ["a"] and again.image_root == Path("pictures")  # an InputSet keeps its root
    assert open_inputs([]).records == []  # records in memory may be none (no file to name)


# ---------------------------------------------------------------- split, limit, ids, empty


def test_split_keeps_that_split_and_records_without_one():
    records = [record("a", "train"), record("b", "test"), record("c"), record("d", "train")]
    assert [r.id for r in open_inputs(records, split="train")] == ["a", "c", "d"]
    assert [r.id for r in open_inputs(records, split="test")] == ["b", "c"]
    assert [r.id for r in open_inputs(records)] == ["a", "b", "c", "d"]


def test_limit_keeps_the_first_and_refuses_a_negative(tmp_path, record_dict):
    data = write_jsonl(tmp_path / "records.jsonl", [record_dict(f"r{index}", image=None) for index in range(5)])
    assert [r.id for r in open_inputs(data, limit=2)] == ["r0", "r1"]
    assert open_inputs(data, limit=0).records == []  # nothing asked for is not an empty file
    records = [record("a", "test"), record("b", "train"), record("c", "train"), record("d", "train")]
    assert [r.id for r in open_inputs(records, split="train", limit=2)] == ["b", "c"]  # the limit counts kept records
    with pytest.raises(ConfigError, match=r"^limit: expected a non-negative integer, got -1$"):
        open_inputs(data, limit=-1)


def test_duplicate_id_names_file_record_and_field(tmp_path, record_dict):
    data = write_jsonl(
        tmp_path / "records.jsonl",
        [record_dict("r0", image=None), record_dict("r1", image=None), record_dict("r0", image=None)],
    )
    with pytest.raises(DataError) as error:
        open_inputs(data)
    location = error.value.location
    assert (location.file, location.record, location.field) == (str(data), "r0", "id")
    assert str(error.value).startswith(f"{data}:r0:id: duplicate record id (first used by record number 1)")
    # One id is one record across splits: a repeat in a split not kept is refused too.
    with pytest.raises(DataError, match=r"source\.jsonl:a:id: duplicate record id"):
        open_inputs([record("a", "train"), record("a", "test")], split="train", source="source.jsonl")
    with pytest.raises(DataError, match=r"^given:x:id: duplicate id \(first used by record number 1\)"):
        check_unique_ids([record("x"), record("y"), record("x")], file="given")
    check_unique_ids([record("x"), record("y")], file="given")  # unique ids pass


def test_empty_file_and_empty_split_are_refused_naming_the_file(tmp_path, record_dict):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty\.jsonl:-:-: no records in the file"):
        open_inputs(empty)
    data = write_jsonl(tmp_path / "records.jsonl", [{**record_dict("a", image=None), "meta": {"split": "train"}}])
    with pytest.raises(DataError) as error:
        open_inputs(data, split="test", empty="no records to train on")
    assert str(error.value) == f"{data}:-:-: no records to train on (split: test)"


# ---------------------------------------------------------------- the image root


def test_image_root_explicit_then_the_file_folder(tmp_path, record_dict):
    data = write_jsonl(tmp_path / "data" / "records.jsonl", [record_dict("a")])
    assert default_image_root(data, None) == tmp_path / "data"
    assert default_image_root(data, tmp_path / "elsewhere") == tmp_path / "elsewhere"
    assert default_image_root([record("a")], None) is None
    assert default_image_root(open_inputs(data, image_root=tmp_path), None) == tmp_path
    assert open_inputs(data, image_root=tmp_path / "pictures").image_root == tmp_path / "pictures"


def test_embedded_images_go_to_images_beside_the_file(tmp_path):
    from tests.data.test_formats_hf import hf_rows, write_parquet

    source = write_parquet(tmp_path / "hf" / "test-00000-of-00001.parquet", hf_rows(2))
    assert default_image_root(source, None) == tmp_path / "hf" / "images"
    assert default_image_root(tmp_path / "hf", None) == tmp_path / "hf" / "images"  # a folder of shards: inside it
    inputs = open_inputs(source)
    assert inputs.image_root == tmp_path / "hf" / "images" and inputs.format_name == "hf"
    for item in inputs:  # written there once, and read from there
        assert load_image(inputs.image_root, item.image).size == (5, 4)
    given = open_inputs(source, image_root=tmp_path / "mine")
    assert all((tmp_path / "mine" / item.image).is_file() for item in given)
    with pytest.raises(
        ConfigError, match=r"^image_root: data someone/dataset is a Hugging Face Hub id whose images are embedded"
    ):
        default_image_root("someone/dataset", None)
    assert default_image_root("someone/dataset", tmp_path) == tmp_path


def test_a_sidecar_names_the_root_and_a_damaged_one_is_one_clear_error(tmp_path, record_dict, save_png):
    save_png(tmp_path / "data" / "images" / "a.png")
    data = write_jsonl(tmp_path / "out" / "records.jsonl", [record_dict("a")])
    sidecar = write_image_root_sidecar(data, tmp_path / "data", written_by="test")
    assert sidecar == image_root_sidecar_path(data) and yaml.safe_load(sidecar.read_text())["image_root"] == "../data"
    assert default_image_root(data, None) == (tmp_path / "data").resolve()
    assert default_image_root(data, tmp_path) == tmp_path  # an explicit root still wins
    assert validate_file(data).ok
    sidecar.write_text(sidecar.read_text().replace("../data", "../gone"), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"records\.jsonl\.image-root\.yaml: .*checksum"):
        default_image_root(data, None)
    report = validate_file(data)  # validate reports it, never raises
    assert not report.ok and "image-root.yaml" in report.problems[0].message


# ---------------------------------------------------------------- blind output needs no image root


@pytest.mark.parametrize("where", ["sibling", "above"])
def test_blind_output_validates_and_opens_with_no_image_root(tmp_path, capsys, where):
    data = write_dataset(tmp_path / "work" / "data", make_records(6))
    out = tmp_path / "work" / ("blind" if where == "sibling" else "") / "blind.jsonl"
    summary = make_blind(AnswerEngine(), data, out)
    originals = {r.id: r for r in read_preference_records(data)}
    written = list(read_preference_records(out))
    if where == "above":  # the images lie under the output's folder: paths rewritten, no sidecar
        assert summary.images_rebased and not image_root_sidecar_path(out).exists()
        assert all(
            r.image == (None if originals[r.id].image is None else f"data/{originals[r.id].image}") for r in written
        )
    else:  # they do not: paths kept, the old root named beside the output
        assert not summary.images_rebased and summary.image_root_sidecar == image_root_sidecar_path(out)
        assert all(r.image == originals[r.id].image for r in written)
    inputs = open_inputs(out)
    assert inputs.image_root.resolve() == (tmp_path / "work" / ("data" if where == "sibling" else "")).resolve()
    with_image = [r for r in inputs if r.image is not None]
    assert len(with_image) == 3
    for r in with_image:  # the very same image files, through the confined lookup
        assert (
            load_image(inputs.image_root, r.image).tobytes() == load_image(data.parent, originals[r.id].image).tobytes()
        )
    report = validate_file(out)
    assert report.ok and (report.total, report.good) == (6, 6), report.problems
    assert main(["data", "validate", str(out)]) == 0, capsys.readouterr().err


def test_blind_keeps_a_refused_path_refused(tmp_path, save_png):
    """A symlink that leaves the data folder stays refused: no rewrite widens what is read."""
    rows = make_records(4)
    data = write_dataset(tmp_path / "work" / "data", rows)
    secret = save_png(tmp_path / "work" / "secret.png")  # under the output's folder, outside the data's
    link = data.parent / "images" / "link.png"
    os.symlink(secret, link)
    rows[1]["image"] = "images/link.png"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    out = tmp_path / "work" / "blind.jsonl"
    summary = make_blind(AnswerEngine(), data, out)
    assert not summary.images_rebased and summary.image_root_sidecar is not None  # kept, with its old root
    assert next(r for r in read_preference_records(out) if r.id == "rec-0001").image == "images/link.png"
    problems = validate_file(out).problems
    assert [(p.location.record, p.location.field) for p in problems] == [("rec-0001", "image")]
    assert "outside the image root" in problems[0].message


def test_blind_with_a_given_root_keeps_paths_and_a_stale_sidecar_is_replaced(tmp_path):
    data = write_dataset(tmp_path / "data", make_records(4))
    out = tmp_path / "blind.jsonl"
    # A given root: the caller may pass it again to the next stage, so paths stay as they were.
    summary = make_blind(AnswerEngine(), data, out, image_root=data.parent)
    assert not summary.images_rebased and summary.image_root_sidecar is not None
    assert [r.image for r in read_preference_records(out)] == [r.image for r in read_preference_records(data)]
    assert default_image_root(out, None) == data.parent.resolve()
    # The same output later written from data beside it: the old sidecar would mislead, so it names the output's folder.
    beside = write_dataset(tmp_path / "beside", make_records(4))
    (tmp_path / "images").mkdir()
    for image in (beside.parent / "images").iterdir():
        (tmp_path / "images" / image.name).write_bytes(image.read_bytes())
    make_blind(AnswerEngine(), tmp_path / "beside" / "records.jsonl", out, image_root=tmp_path)
    assert default_image_root(out, None) == tmp_path.resolve()
    assert validate_file(out).ok
