"""``mmsafe blind``: a blind rejected response per record, resumable, and the output trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mmsafe.cli import main
from mmsafe.data.conversations import without_image
from mmsafe.data.records import PreferenceRecord, read_preference_records
from mmsafe.errors import DataError
from mmsafe.generate.blind import BLANK_COLOUR, BLANK_SIZE, make_blind, responses_path_for
from mmsafe.generate.engine import DecodingParams, GenerationRequest
from tests.generate.generate_data import make_records, write_dataset


class RecordingEngine:
    """Answers ``blind answer to <id>``; keeps the requests; can fail on a given call or answer nothing."""

    name = "recorder"

    def __init__(self, fail_on_call: int | None = None, empty_for: tuple[str, ...] = ()) -> None:
        self.calls = 0
        self.fail_on_call = fail_on_call
        self.empty_for = empty_for
        self.requests: list[GenerationRequest] = []

    def generate(self, requests: list[GenerationRequest], params: DecodingParams) -> list[str]:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("killed")
        self.requests.extend(requests)
        return ["" if request.id in self.empty_for else f"blind answer to {request.id}" for request in requests]


def test_remove_mode_with_the_tiny_model(dataset, tiny_engine, tmp_path):
    out = tmp_path / "blind.jsonl"
    params = DecodingParams(max_new_tokens=8)
    summary = make_blind(tiny_engine, dataset, out, params=params, batch_size=5)
    records = list(read_preference_records(out))
    originals = list(read_preference_records(dataset))
    assert [r.id for r in records] == [r.id for r in originals]
    assert summary.generated == 24 and summary.records == 24
    nonempty = [r for r in records if r.id not in summary.empty]
    assert len(nonempty) >= 20
    for record, original in zip(records, originals, strict=True):
        assert record.messages == original.messages and record.chosen == original.chosen
        # The output lies above the data folder: image paths are rewritten to resolve from it.
        assert record.image == (None if original.image is None else f"data/{original.image}")
        expected_sources = ["human"] if record.id in summary.empty else ["human", "blind"]
        assert record.rejected_sources == expected_sources and record.rejected[0] == original.rejected[0]
    # The blind answer is the model's answer to the prompt with the image and its token removed.
    record = originals[1]
    assert record.image is not None
    blind = GenerationRequest(record.id, without_image(record.messages), None)
    assert "<image>" not in blind.messages[-1].content
    assert records[1].rejected[-1] == tiny_engine.generate([blind], params)[0]


def test_blank_and_text_modes_ask_what_they_say(dataset, tmp_path):
    blank = RecordingEngine()
    make_blind(blank, dataset, tmp_path / "blank.jsonl", mode="blank")
    with_image = next(r for r in blank.requests if r.id == "rec-0001")
    assert with_image.image.size == BLANK_SIZE and with_image.image.getpixel((0, 0)) == BLANK_COLOUR
    assert with_image.messages[-1].content.startswith("<image>\n")
    assert next(r for r in blank.requests if r.id == "rec-0000").image is None  # a text-only record stays text-only

    text = RecordingEngine()
    make_blind(text, dataset, tmp_path / "text.jsonl", mode="text")
    request = next(r for r in text.requests if r.id == "rec-0004")
    assert (
        request.image is None
        and request.messages[-1].content.startswith("Tell me about")
        and request.messages[-1].content.endswith("in Paris?")
    )
    assert [m.content for m in request.messages[:-1]] == ["Hello there", "Hi, how can I help?"]  # the history is kept
    records = list(read_preference_records(tmp_path / "text.jsonl"))
    assert records[4].rejected[-1] == "blind answer to rec-0004"


def test_text_mode_without_text_prompt_fails_before_generating(tmp_path):
    rows = make_records(4)
    del rows[2]["meta"]["text_prompt"]
    data = write_dataset(tmp_path / "data", rows)
    engine = RecordingEngine()
    with pytest.raises(DataError, match=r"records.jsonl:rec-0002:meta.text_prompt: blind mode 'text' needs"):
        make_blind(engine, data, tmp_path / "out.jsonl", mode="text")
    assert engine.calls == 0


def test_killed_run_resumes_and_writes_the_records_only_at_the_end(dataset, tmp_path):
    out = tmp_path / "blind.jsonl"
    with pytest.raises(RuntimeError):
        make_blind(RecordingEngine(fail_on_call=3), dataset, out, batch_size=5)
    assert not out.exists()
    assert len(responses_path_for(out).read_text().splitlines()) == 10
    engine = RecordingEngine()
    summary = make_blind(engine, dataset, out, batch_size=5)
    assert len(engine.requests) == 14 and summary.already_done == 10
    records = list(read_preference_records(out))
    assert [r.rejected[-1] for r in records] == [f"blind answer to rec-{index:04d}" for index in range(24)]


def test_empty_answers_are_reported_not_added(dataset, tmp_path):
    summary = make_blind(RecordingEngine(empty_for=("rec-0003",)), dataset, tmp_path / "blind.jsonl")
    assert summary.empty == ["rec-0003"] and "1 empty blind answers" in summary.summary()
    assert f"image paths rewritten relative to {tmp_path}" in summary.summary()  # the output is not beside the images
    records = {r.id: r for r in read_preference_records(tmp_path / "blind.jsonl")}
    assert records["rec-0003"].rejected_sources == ["human"] and records["rec-0002"].rejected_sources == [
        "human",
        "blind",
    ]


def test_release_rows_repeat_the_prompt_per_rejected(dataset, tmp_path):
    from mmsafe.data.formats import read_records

    release = tmp_path / "release.json"
    summary = make_blind(RecordingEngine(), dataset, tmp_path / "blind.jsonl", write_release_rows=release)
    rows = json.loads(release.read_text())
    assert summary.release_rows == len(rows) == 48
    first = [row for row in rows if row["rejected"].endswith("blind answer to rec-0001")]
    assert len(first) == 1 and first[0]["question"].startswith("USER: <image>\n")
    merged = {r.id: r for r in read_records(release)}
    assert len(merged) == 24 and all(len(r.rejected) == 2 for r in merged.values())


@pytest.mark.slow
def test_blind_cli_output_trains_with_bpo(tiny_model_dir, tmp_path, capsys):
    data = write_dataset(tmp_path / "data", make_records(6))
    out = data.parent / "blind.jsonl"
    code = main(
        [
            "blind",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(data),
            "--out",
            str(out),
            "--max-new-tokens",
            "6",
            "--device",
            "cpu",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert "6 records with a blind rejected response" in capsys.readouterr().out
    records = list(read_preference_records(out))
    assert all(r.rejected_sources[-1] == "blind" for r in records if r.rejected_sources != ["human"])
    assert sum(r.rejected_sources == ["human", "blind"] for r in records) >= 4
    assert isinstance(records[0], PreferenceRecord)

    config = tmp_path / "bpo.yaml"
    options = {"model": str(tiny_model_dir), "data": str(out), "output_dir": str(tmp_path / "trained"), "loss": "bpo", "max_steps": 1,
               "per_device_train_batch_size": 2, "learning_rate": 1e-3, "warmup_steps": 0, "finetune": "lora", "lora_r": 4, "lora_alpha": 8,
               "lora_dropout": 0.0, "dtype": "float32", "reference_cache_dir": str(tmp_path / "cache"), "save_steps": 1000}  # fmt: skip
    config.write_text(yaml.safe_dump(options), encoding="utf-8")
    assert main(["train", "--config", str(config)]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["global_step"] == 1


def test_blind_config_and_bad_mode(dataset, tmp_path):
    from mmsafe.errors import ConfigError

    out = tmp_path / "blind.jsonl"
    make_blind(RecordingEngine(), dataset, out, mode="remove", limit=3)
    config = yaml.safe_load(Path(str(out) + ".config.yaml").read_text())
    assert config["command"] == "blind" and config["mode"] == "remove" and config["variant"] == "blind-remove"
    with pytest.raises(ConfigError, match="mode"):
        make_blind(RecordingEngine(), dataset, out, mode="erase")
