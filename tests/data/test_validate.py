"""``mmsafe data validate``: every problem listed as file:record:field, good records counted."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mmsafe.cli import main
from mmsafe.data.validate import validate_file


@pytest.fixture
def mixed_file(tmp_path, save_png, record_dict):
    """Four good records and one of each problem, with images under ``tmp_path``."""
    save_png(tmp_path / "images" / "a.png")
    save_png(tmp_path / "images" / "b.png")
    (tmp_path / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    save_png(tmp_path / "outside.png")
    lines = [
        json.dumps(record_dict("good-1")),
        json.dumps(record_dict("good-2", image="images/b.png")),
        '{"id": "broken", "messages": [',  # line 3: malformed JSON
        json.dumps({key: value for key, value in record_dict("no-chosen").items() if key != "chosen"}),
        json.dumps(record_dict("bad-type", rejected="Sure, climb.")),
        json.dumps(record_dict("no-image", image="images/missing.png")),
        json.dumps(record_dict("corrupt", image="images/corrupt.png")),
        json.dumps(record_dict("escape", image="../outside.png")),
        json.dumps(record_dict("good-3", image=None)),
        json.dumps(record_dict("good-1", image="images/a.png")),  # line 10: duplicate id
        json.dumps(record_dict("good-4", image="images/a.png")),
    ]
    path = tmp_path / "records.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


EXPECTED = [
    ("line 3", "-", "malformed JSON"),
    ("no-chosen", "chosen", "missing field 'chosen'"),
    ("bad-type", "rejected", "expected a list of strings, got str"),
    ("no-image", "image", "image not found: 'images/missing.png'"),
    ("corrupt", "image", "'images/corrupt.png'"),
    ("escape", "image", "contains '..'"),
    ("good-1", "id", "duplicate id"),
]


def test_report_lists_every_problem_and_counts_good_records(mixed_file):
    report = validate_file(mixed_file, image_root=mixed_file.parent)
    assert (report.total, report.good, report.ok) == (11, 4, False)
    assert len(report.problems) == len(EXPECTED)
    for problem, (record, field, message) in zip(report.problems, EXPECTED, strict=True):
        assert str(problem.location) == f"{mixed_file}:{record}:{field}"
        assert message in problem.message
    assert report.summary() == f"{mixed_file} (jsonl): 4 of 11 records good; 7 problems"


def test_image_root_defaults_to_the_data_files_folder(mixed_file):
    assert len(validate_file(mixed_file).problems) == len(EXPECTED)


def test_cli_prints_one_line_per_problem_and_exits_1(mixed_file, capsys):
    code = main(["data", "validate", str(mixed_file), "--image-root", str(mixed_file.parent)])
    captured = capsys.readouterr()
    assert code == 1
    problem_lines = captured.err.strip().splitlines()
    assert len(problem_lines) == len(EXPECTED)
    for line, (record, field, message) in zip(problem_lines, EXPECTED, strict=True):
        assert line.startswith(f"{mixed_file}:{record}:{field}: ")
        assert message in line
    assert "4 of 11 records good" in captured.out
    assert "Traceback" not in captured.out + captured.err


def test_cli_in_a_subprocess_has_no_traceback(mixed_file):
    environment = {**os.environ, "MMSAFE_PROGRESS": "0"}
    result = subprocess.run(
        [sys.executable, "-m", "mmsafe", "data", "validate", str(mixed_file), "--image-root", str(mixed_file.parent)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=60,
    )
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == len(EXPECTED)
    assert "Traceback" not in result.stdout + result.stderr
    assert "4 of 11 records good" in result.stdout


def test_clean_file_exits_0(tmp_path, save_png, record_dict, capsys):
    save_png(tmp_path / "images" / "a.png")
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps(record_dict("only")) + "\n", encoding="utf-8")
    assert main(["data", "validate", str(path)]) == 0
    assert "1 of 1 records good; ok" in capsys.readouterr().out


def test_released_file_is_validated_against_its_image_folder(released_file, tmp_path, save_png):
    images = tmp_path / "imgs"
    save_png(images / "500px-Café_de_Flore.jpg")  # URL-decoded name on disk
    save_png(images / "330px-José_Example_(2019).png")
    report = validate_file(released_file, image_root=images)
    assert report.format_name == "mmsafe-po"
    assert (report.total, report.good) == (3, 2)
    (problem,) = report.problems
    assert (problem.location.record, problem.location.field) == ("42", "image")
    assert "500px-Acme_logo.svg.png" in problem.message


def test_unreadable_input_is_one_problem_not_a_crash(tmp_path, capsys):
    missing = tmp_path / "nothing.jsonl"
    assert main(["data", "validate", str(missing)]) == 1
    err = capsys.readouterr().err
    assert f"{missing}:-:-: file not found" in err
    broken = tmp_path / "broken.json"
    broken.write_text("[{", encoding="utf-8")
    report = validate_file(broken)
    assert (report.total, report.good, len(report.problems)) == (0, 0, 1)
    assert "malformed JSON" in str(report.problems[0])


def test_too_many_problems_are_cut_short(tmp_path, capsys):
    path = tmp_path / "records.jsonl"
    path.write_text("{\n" * 5, encoding="utf-8")
    assert main(["data", "validate", str(path), "--max-problems", "2"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and err[-1] == "... and 3 more problems"


def test_an_unreadable_file_is_a_problem_not_a_traceback(tmp_path, record_dict, monkeypatch):
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps(record_dict("a", image=None)) + "\n", encoding="utf-8")

    def refuse(path):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("mmsafe.data.jsonl.open_text", refuse)
    report = validate_file(path)
    assert (report.total, len(report.problems)) == (0, 1)
    assert str(report.problems[0]) == f"{path}:-:-: cannot read the file (Permission denied)"
