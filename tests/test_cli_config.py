"""The command line is made from the stage configs: flags, help, sources and precedence.

The oracle is the config dataclass itself: every field it declares for the command line
must be a flag of its command with the field's own help text, and the value a field ends
up with is checked against which of file, override and flag set it last.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest
import yaml

from mmsafe.cli import build_parser, main
from mmsafe.config import DisplayConfig
from mmsafe.data.config import ConvertConfig, SampleConfig, StatsConfig, ValidateConfig
from mmsafe.evaluate.config import JudgeConfig, PairwiseConfig, ProbeConfig, ReportConfig
from mmsafe.generate.config import BlindConfig, GenerateConfig
from mmsafe.models.config import TinyModelConfig
from mmsafe.pipeline.config import DemoConfig
from mmsafe.synthesis import BuildConfig
from mmsafe.train.config import TrainConfig
from tests.generate.generate_data import make_records, write_dataset

COMMANDS = {
    "generate": GenerateConfig,
    "blind": BlindConfig,
    "probe": ProbeConfig,
    "judge": JudgeConfig,
    "report": ReportConfig,
    "pairwise": PairwiseConfig,
    "train": TrainConfig,
    "build-data": BuildConfig,
    "data validate": ValidateConfig,
    "data convert": ConvertConfig,
    "data stats": StatsConfig,
    "data sample": SampleConfig,
    "models tiny": TinyModelConfig,
    "demo": DemoConfig,
    "env": DisplayConfig,
    "benchmarks list": DisplayConfig,
}


def _help(command: str, capsys) -> str:
    with pytest.raises(SystemExit):
        build_parser().parse_args([*command.split(), "--help"])
    # argparse wraps lines, also after a hyphen: the text is compared without whitespace.
    return "".join(capsys.readouterr().out.split())


def _command_line_fields(config_class: type) -> list[dataclasses.Field]:
    hints = typing.get_type_hints(config_class)
    return [
        config_field
        for config_field in dataclasses.fields(config_class)
        if config_field.metadata.get("cli", True) and not dataclasses.is_dataclass(hints[config_field.name])
    ]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_of_the_config_is_a_flag_with_its_own_help(command, capsys):
    text = _help(command, capsys)
    fields = _command_line_fields(COMMANDS[command])
    assert fields
    for config_field in fields:
        flag = "--" + config_field.metadata.get("flag", config_field.name).replace("_", "-")
        assert flag in text, f"{command}: {flag} missing from --help"
        # The flag's help is the field's help (the first words, argparse re-wraps lines).
        words = "".join(config_field.metadata["help"].split()[:6])
        assert words in text, f"{command} {flag}: help {words!r} not in --help"
    for common in ("--config", "--print-config"):
        assert common in text
    if COMMANDS[command] not in (
        ValidateConfig,
        ConvertConfig,
        StatsConfig,
        SampleConfig,
        TinyModelConfig,
        DemoConfig,
        DisplayConfig,
    ):
        assert "--dry-run" in text  # every stage that loads a model or writes much checks first


def test_run_help_lists_every_key_of_the_pipeline_config(capsys):
    from mmsafe.config import describe
    from mmsafe.pipeline.config import BlindSection, GenerateSection, JudgeSection, PipelineConfig, TrainSection

    text = _help("run", capsys)
    for name, _, _ in describe(PipelineConfig):
        assert name in text
    for section, cls in (
        ("blind", BlindSection),
        ("train", TrainSection),
        ("generate", GenerateSection),
        ("judge", JudgeSection),
    ):
        for key, _, _ in describe(cls):
            assert f"{section}.{key}" in text


def test_the_bare_forms_of_the_data_commands_still_work(tmp_path, capsys):
    assert main(["data", "sample", str(tmp_path / "a")]) == 0
    assert main(["data", "sample", "--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    assert (tmp_path / "a" / "records.jsonl").read_bytes() == (tmp_path / "b" / "records.jsonl").read_bytes()
    records = str(tmp_path / "a" / "records.jsonl")
    assert main(["data", "convert", records, str(tmp_path / "a.json"), "--to", "mmsafe-po"]) == 0
    assert main(["data", "convert", "--data", records, "--out", str(tmp_path / "b.json"), "--to", "mmsafe-po"]) == 0
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    capsys.readouterr()
    assert main(["data", "stats", records, "--data", records]) == 1
    assert _one_error(capsys) == "error: --data is given twice (as the flag and as a bare argument)"
    assert main(["data", "validate", records, "extra"]) == 1
    assert "unexpected argument 'extra'" in _one_error(capsys)


def _print_config(argv: list[str], capsys) -> dict:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return yaml.safe_load(captured.out)


def test_file_then_overrides_then_flags(tmp_path, capsys):
    config_file = tmp_path / "generate.yaml"
    config_file.write_text(
        "model: from-file\ndata: d.jsonl\nout: o\nmax_new_tokens: 11\nbatch_size: 3\ntemperature: 0.5\n",
        encoding="utf-8",
    )
    resolved = _print_config(
        [
            "generate",
            "--config",
            str(config_file),
            "max_new_tokens=22",
            "batch_size=4",
            "--batch-size",
            "5",
            "--print-config",
        ],
        capsys,
    )
    assert resolved["model"] == "from-file"  # only the file set it
    assert resolved["temperature"] == 0.5
    assert resolved["max_new_tokens"] == 22  # the override beats the file
    assert resolved["batch_size"] == 5  # the flag beats both
    assert resolved["dtype"] is None and resolved["limit"] is None  # defaults where nothing set them


def test_printed_config_reads_back_as_the_same_config(tmp_path, capsys):
    argv = [
        "probe",
        "--model",
        "m",
        "--data",
        "d.jsonl",
        "--out",
        "o",
        "--judge",
        "refusal,llm",
        "--variants",
        "text",
        "blind",
        "--limit",
        "3",
        "--split",
        "test",
    ]
    first = _print_config([*argv, "--print-config"], capsys)
    assert (
        first["judges"] == ["refusal", "llm"]
        and first["variants"] == ["text", "blind"]
        and first["limit"] == 3
        and first["split"] == "test"
    )
    saved = tmp_path / "probe.yaml"
    saved.write_text(yaml.safe_dump(first), encoding="utf-8")
    assert _print_config(["probe", "--config", str(saved), "--print-config"], capsys) == first


def test_string_options_are_taken_as_written(capsys):
    # A YAML reading would turn these into false, a number and null.
    resolved = _print_config(
        [
            "generate",
            "--model",
            "m",
            "--data",
            "d",
            "--out",
            "o",
            "--variant",
            "no",
            "--split",
            "2024",
            "--device",
            "null",
            "--print-config",
        ],
        capsys,
    )
    assert (resolved["variant"], resolved["split"], resolved["device"]) == ("no", "2024", "null")


def test_pairs_and_switches(capsys):
    resolved = _print_config(
        [
            "judge",
            "--responses",
            "r",
            "--out",
            "o",
            "--judge",
            "llm",
            "--base-url",
            "http://x/v1",
            "--option",
            "max_new_tokens=32",
            "--option",
            "rubric.version=2",
            "--no-image",
            "--print-config",
        ],
        capsys,
    )
    assert resolved["option"] == {"max_new_tokens": 32, "rubric": {"version": 2}}
    assert resolved["image"] is False
    config = JudgeConfig(**{key: value for key, value in resolved.items()})
    assert config.judge_options()["send_image"] is False and config.judge_options()["max_new_tokens"] == 32


def _one_error(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


def test_errors_name_the_flag_the_override_or_the_file(tmp_path, capsys):
    base = ["generate", "--model", "m", "--data", "d", "--out", "o", "--print-config"]
    assert main([*base, "--batch-size", "lots"]) == 1
    assert _one_error(capsys).startswith("error: --batch-size: batch_size: expected")
    assert main([*base, "max_new_tokns=3"]) == 1
    assert _one_error(capsys) == (
        "error: override 'max_new_tokns=3': max_new_tokns: unknown option (did you mean max_new_tokens?); known: "
        + ", ".join(sorted(field.name for field in dataclasses.fields(GenerateConfig)))
    )
    config_file = tmp_path / "typo.yaml"
    config_file.write_text("temprature: 0.3\n", encoding="utf-8")
    assert main([*base, "--config", str(config_file)]) == 1
    line = _one_error(capsys)
    assert line.startswith(f"error: {config_file}: temprature: unknown option (did you mean temperature?)")


def test_a_missing_required_option_names_its_flag(capsys):
    assert main(["generate", "--data", "d", "--out", "o"]) == 1
    assert _one_error(capsys) == "error: --model is required (or model: in --config)"
    assert main(["train", "--data", "d", "--model", "m"]) == 1
    assert _one_error(capsys) == "error: --out is required (or output_dir: in --config)"


def test_every_command_shares_the_input_and_output_flags(capsys):
    for command in ("generate", "blind", "probe", "pairwise", "train", "build-data"):
        text = _help(command, capsys)
        for flag in ("--data", "--out", "--limit" if command != "train" else "--split"):
            assert flag in text, (command, flag)
    for command in ("generate", "blind", "probe", "pairwise"):
        text = _help(command, capsys)
        assert "--split" in text and "--limit" in text and "--dtype" in text


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    records = make_records(6)
    for index, record in enumerate(records):
        record.setdefault("meta", {})["split"] = "test" if index % 2 else "train"
    return write_dataset(tmp_path / "data", records)


def test_dry_run_checks_inputs_and_writes_nothing(dataset, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "generate",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(dataset),
            "--out",
            str(out),
            "--split",
            "test",
            "--dry-run",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"would answer 3 prompts into {out / 'responses.jsonl'}" in captured.out
    assert not out.exists()
    # Bad input still fails in a dry run, before anything loads.
    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny_model_dir),
                "--data",
                str(tmp_path / "missing.jsonl"),
                "--out",
                str(out),
                "--dry-run",
            ]
        )
        == 1
    )
    assert "missing.jsonl" in _one_error(capsys)


def test_output_folders_name_their_files_and_the_next_stage_reads_the_folder(dataset, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "base"
    code = main(
        [
            "generate",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(dataset),
            "--out",
            str(out),
            "--split",
            "test",
            "--limit",
            "2",
            "--max-new-tokens",
            "4",
            "--dtype",
            "float32",
            "--device",
            "cpu",
        ]
    )
    assert code == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (out / "responses.jsonl").read_text(encoding="utf-8").splitlines()]
    records = [json.loads(line) for line in dataset.read_text(encoding="utf-8").splitlines()]
    expected = [record["id"] for record in records if record["meta"]["split"] == "test"][:2]
    assert [row["id"] for row in rows] == expected
    assert main(["judge", "--responses", str(out), "--out", str(out), "--judge", "refusal"]) == 0, (
        capsys.readouterr().err
    )
    verdicts = (out / "verdicts-refusal.jsonl").read_text(encoding="utf-8").splitlines()
    assert sorted(json.loads(line)["id"] for line in verdicts) == sorted(expected)
