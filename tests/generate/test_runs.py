"""Resumable generation runs: skip what is done, lose at most a batch, never duplicate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mmsafe.data.records import PreferenceRecord, read_response_records
from mmsafe.errors import ConfigError, DataError, MmsafeError
from mmsafe.generate.engine import DecodingParams, GenerationRequest, requests_from_records
from mmsafe.generate.runs import config_path_for, generate_responses
from tests.generate.generate_data import make_records, write_dataset


class EchoEngine:
    """A fake engine: answers with the request id and whether it saw an image; can fail on a given call."""

    name = "echo"

    def __init__(self, fail_on_call: int | None = None, short: bool = False) -> None:
        self.calls = 0
        self.fail_on_call = fail_on_call
        self.short = short
        self.seen: list[str] = []

    def generate(self, requests: list[GenerationRequest], params: DecodingParams) -> list[str]:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("engine died")
        self.seen.extend(request.id for request in requests)
        answers = [f"{request.id} image={request.image is not None}" for request in requests]
        return answers[:-1] if self.short else answers


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_requests_from_records_loads_images(dataset):
    records = [PreferenceRecord.from_dict(json.loads(line)) for line in dataset.read_text().splitlines()[:3]]
    requests = requests_from_records(records, dataset.parent)
    assert [r.id for r in requests] == ["rec-0000", "rec-0001", "rec-0002"]
    assert requests[0].image is None and requests[1].image.mode == "RGB"
    assert requests[1].image.size == (25, 33)  # written by write_dataset for index 1
    with pytest.raises(DataError, match=r"-:rec-0001:image: image not found"):
        requests_from_records(records, dataset.parent / "elsewhere")
    with pytest.raises(DataError, match="no image root"):
        requests_from_records(records, None)


def test_rerun_skips_done_and_matches_uninterrupted_run(dataset, tiny_engine, tmp_path):
    params = DecodingParams(max_new_tokens=4)
    resumed = tmp_path / "resumed.jsonl"
    first = generate_responses(tiny_engine, dataset, resumed, params=params, batch_size=4, limit=10)
    assert (first.generated, first.already_done, first.total) == (10, 0, 10)
    second = generate_responses(tiny_engine, dataset, resumed, params=params, batch_size=4)
    assert (second.generated, second.already_done, second.total) == (14, 10, 24)
    third = generate_responses(tiny_engine, dataset, resumed, params=params, batch_size=4)
    assert third.generated == 0 and third.already_done == 24

    straight = tmp_path / "straight.jsonl"
    generate_responses(tiny_engine, dataset, straight, params=params, batch_size=24)
    assert resumed.read_text() == straight.read_text()
    rows = _lines(straight)
    assert [row["id"] for row in rows] == [f"rec-{index:04d}" for index in range(24)]  # input order
    assert (
        rows[0]["model"] == tiny_engine.name
        and rows[0]["params"] == params.to_dict()
        and rows[0]["variant"] == "default"
    )


def test_crash_loses_at_most_the_batch_in_flight(dataset, tmp_path):
    out = tmp_path / "out.jsonl"
    with pytest.raises(RuntimeError, match="engine died"):
        generate_responses(EchoEngine(fail_on_call=3), dataset, out, batch_size=5)
    assert len(_lines(out)) == 10  # two batches written, the third lost
    # A line cut short by a kill is removed on restart, and only the missing records are asked.
    with open(out, "a", encoding="utf-8") as handle:
        handle.write('{"id": "rec-00')
    engine = EchoEngine()
    summary = generate_responses(engine, dataset, out, batch_size=5)
    assert summary.generated == 14 and len(engine.seen) == 14
    ids = [row["id"] for row in _lines(out)]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 24
    assert all(row["response"].startswith(row["id"]) for row in _lines(out))


def test_variants_share_an_output_and_images_reach_the_engine(dataset, tmp_path):
    out = tmp_path / "out.jsonl"
    generate_responses(EchoEngine(), dataset, out, batch_size=7)
    generate_responses(EchoEngine(), dataset, out, batch_size=7, variant="probe")
    keys = [(r.id, r.variant) for r in read_response_records(out)]
    assert len(keys) == len(set(keys)) == 48
    ids = [f"rec-{index:04d}" for index in range(24)]
    assert keys == [(i, "default") for i in ids] + [(i, "probe") for i in ids]  # each variant in input order, in place
    responses = {r.id: r.response for r in read_response_records(out)}
    assert responses["rec-0000"].endswith("image=False") and responses["rec-0001"].endswith("image=True")


def test_config_is_saved_beside_the_output(dataset, tmp_path):
    out = tmp_path / "out.jsonl"
    generate_responses(EchoEngine(), dataset, out, params=DecodingParams(max_new_tokens=7), batch_size=3, limit=4)
    config = yaml.safe_load(config_path_for(out).read_text())
    assert config["params"]["max_new_tokens"] == 7 and config["batch_size"] == 3 and config["limit"] == 4
    assert config["data"] == str(dataset) and config["image_root"] == str(dataset.parent)
    assert config["engine"] == {"type": "EchoEngine", "name": "echo"}


def test_mixing_settings_in_one_output_is_refused(dataset, tmp_path):
    out = tmp_path / "out.jsonl"
    generate_responses(EchoEngine(), dataset, out, params=DecodingParams(max_new_tokens=5), limit=3)
    with pytest.raises(ConfigError, match="already holds responses"):
        generate_responses(EchoEngine(), dataset, out, params=DecodingParams(max_new_tokens=6))


def test_bad_input_is_named(tmp_path):
    records = make_records(3)
    records[2]["id"] = records[0]["id"]
    data = write_dataset(tmp_path / "dup", records)
    with pytest.raises(DataError, match=r"records.jsonl:rec-0000:id: duplicate record id"):
        generate_responses(EchoEngine(), data, tmp_path / "out.jsonl")

    data = write_dataset(tmp_path / "missing", make_records(3))
    (data.parent / "images" / "rec-0001.png").unlink()
    with pytest.raises(DataError, match=r"records.jsonl:rec-0001:image: image not found"):
        generate_responses(EchoEngine(), data, tmp_path / "out2.jsonl")

    with pytest.raises(MmsafeError, match="returned 2 responses for 3 requests"):
        generate_responses(
            EchoEngine(short=True), write_dataset(tmp_path / "ok", make_records(3)), tmp_path / "out3.jsonl"
        )


def test_response_extra_fields_are_written(dataset, tmp_path):
    from mmsafe.generate.runs import load_records, run_requests

    records = load_records(dataset, limit=3)
    out = tmp_path / "out.jsonl"
    run_requests(
        EchoEngine(),
        records,
        out,
        build_request=lambda record: GenerationRequest(record.id, record.messages, None),
        params=DecodingParams(max_new_tokens=3),
        response_extra=lambda request: {"asked": request.messages[-1].content},
    )
    rows = _lines(out)
    assert [row["asked"] for row in rows] == [record.prompt for record in records]
