"""``mmsafe generate`` through the command line, in process."""

from __future__ import annotations

import json

from mmsafe.cli import main


def test_generate_command_writes_responses_and_resumes(tiny_model_dir, dataset, tmp_path, capsys):
    out = tmp_path / "responses.jsonl"
    args = [
        "generate",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(dataset),
        "--out",
        str(out),
        "--max-new-tokens",
        "5",
        "--device",
        "cpu",
        "--batch-size",
        "8",
    ]
    assert main([*args, "--limit", "5"]) == 0
    assert "5 responses generated" in capsys.readouterr().out
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "19 responses generated" in printed and "5 already done" in printed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 24 and rows[0]["params"]["max_new_tokens"] == 5 and rows[0]["model"] == str(tiny_model_dir)


def test_generate_command_reports_bad_input_in_one_line(tiny_model_dir, dataset, tmp_path, capsys):
    out = tmp_path / "responses.jsonl"
    assert (
        main(["generate", "--model", str(tiny_model_dir), "--data", str(tmp_path / "missing.jsonl"), "--out", str(out)])
        == 1
    )
    error = capsys.readouterr().err
    assert (
        error.startswith("error: ") and "missing.jsonl" in error and "not found" in error and "Traceback" not in error
    )
    assert main(["generate", "--engine", "openai", "--model", "m", "--data", str(dataset), "--out", str(out)]) == 1
    assert "--base-url" in capsys.readouterr().err
    assert (
        main(
            [
                "blind",
                "--model",
                str(tmp_path / "no-model"),
                "--data",
                str(dataset),
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 1
    )
    assert "no-model" in capsys.readouterr().err


def test_blind_command_checks_the_data_before_loading_the_model(tmp_path, capsys):
    from tests.generate.generate_data import make_records, write_dataset

    rows = make_records(3)
    del rows[1]["meta"]["text_prompt"]
    data = write_dataset(tmp_path / "data", rows)
    (tmp_path / "empty-model").mkdir()  # exists, so the name check passes; loading it would fail
    code = main(
        [
            "blind",
            "--model",
            str(tmp_path / "empty-model"),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "out.jsonl"),
            "--mode",
            "text",
        ]
    )
    assert code == 1
    assert "rec-0001:meta.text_prompt" in capsys.readouterr().err  # not the unloadable model: the data is checked first
