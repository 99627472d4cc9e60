"""What a new user meets first: fast clear failures, progress in logs, interrupts, set-up.

Each test runs what the user ran (the real CLI, often as a subprocess, so that stderr is
not a terminal) and checks what they would read.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmsafe.cli import main
from mmsafe.data.sample import write_sample

#: The promise of a path-like or offline --model: one line, exit 1, within this (seconds).
FAST_FAILURE_S = 2.0


def _mmsafe(
    args: list[str], *, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60
) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "mmsafe", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    return result, time.perf_counter() - started


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    return Path(write_sample(tmp_path / "sample"))


def _records(sample: Path) -> Path:
    return sample / "records.jsonl" if sample.is_dir() else sample


# ---------------------------------------------------------------- 4: fast, clear failures


@pytest.mark.parametrize("model", ["./nope", "models/tinyy"])
def test_a_path_like_model_that_does_not_exist_fails_at_once_with_one_line(model, sample, tmp_path):
    # models/ exists (it holds tiny/), so models/tinyy is a typo of a local folder, not a Hub id:
    # before, it was asked of the Hub (52 s of retries and 44 warnings on a machine offline).
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    result, seconds = _mmsafe(
        ["generate", "--model", model, "--data", str(_records(sample)), "--out", "out.jsonl"], cwd=tmp_path, timeout=30
    )
    lines = _error_lines(result.stderr)
    assert result.returncode == 1
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: --model {model}: no such model directory ({(tmp_path / model).resolve()})")
    assert seconds < FAST_FAILURE_S, f"took {seconds:.2f}s"
    if model == "models/tinyy":
        assert "models holds tiny" in lines[0]  # the near name in that folder


def test_a_hub_id_under_hf_hub_offline_gives_one_line_quickly(sample, tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}  # an empty cache
    result, seconds = _mmsafe(
        ["generate", "--model", "some-org/some-model", "--data", str(_records(sample)), "--out", "out.jsonl"],
        cwd=tmp_path,
        env=env,
        timeout=30,
    )
    lines = _error_lines(result.stderr)
    assert result.returncode == 1
    assert len(lines) == 1, result.stderr
    assert (
        "some-org/some-model" in lines[0]
        and "not in the Hugging Face cache" in lines[0]
        and "HF_HUB_OFFLINE" in lines[0]
    )
    assert seconds < FAST_FAILURE_S, f"took {seconds:.2f}s"


def test_a_name_that_is_neither_a_path_nor_a_hub_id_is_refused_without_a_request(tmp_path):
    from mmsafe.errors import ModelError
    from mmsafe.models.loading import check_model_name

    with pytest.raises(ModelError, match="neither a local folder nor a Hub id"):
        check_model_name("my model!", what="--model")


def test_missing_images_are_one_error_naming_the_folder_before_any_model_loads(sample, tmp_path):
    # An empty folder as the model: were it loaded, the error would be about its weights.
    (tmp_path / "model").mkdir()
    (tmp_path / "elsewhere").mkdir()
    result, _ = _mmsafe(
        [
            "generate",
            "--model",
            "model",
            "--data",
            str(_records(sample)),
            "--image-root",
            "elsewhere",
            "--out",
            "out.jsonl",
        ],
        cwd=tmp_path,
        timeout=120,
    )
    lines = _error_lines(result.stderr)
    assert result.returncode == 1
    assert len(lines) == 1, result.stderr
    count = sum(1 for line in _records(sample).read_text().splitlines() if line.strip())
    assert f"{count} of {count} records: image not found under {(tmp_path / 'elsewhere').resolve()}" in lines[0]
    assert "set --image-root" in lines[0]


def test_validate_reports_missing_images_once_per_folder_with_a_count(sample, tmp_path, capsys):
    (tmp_path / "elsewhere").mkdir()
    records = _records(sample)
    count = sum(1 for line in records.read_text().splitlines() if line.strip())
    assert main(["data", "validate", str(records), "--image-root", str(tmp_path / "elsewhere")]) == 1
    problems = _error_lines(capsys.readouterr().err)
    assert len(problems) == 1, problems
    first = json.loads(records.read_text().splitlines()[0])
    assert (
        f"{count} records: image not found under {(tmp_path / 'elsewhere').resolve()} (first: {first['id']} {first['image']})"
        in problems[0]
    )
    assert "set --image-root" in problems[0]


def test_a_missing_report_to_logger_is_one_line_before_the_model_loads(monkeypatch, tmp_path, capsys):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *rest: None if name in ("tensorboard", "tensorboardX") else real_find_spec(name, *rest),
    )
    # The model does not exist either: the logger is checked with the config, before it.
    code = main(
        [
            "train",
            f"model={tmp_path / 'no-model'}",
            f"data={tmp_path / 'no-data.jsonl'}",
            f"output_dir={tmp_path / 'run'}",
            "report_to=[tensorboard]",
        ]
    )
    lines = _error_lines(capsys.readouterr().err)
    assert code == 1
    # The message names where the value came from: the override on the command line.
    assert lines == [
        "error: override 'report_to=[tensorboard]': report_to: tensorboard is not installed; install it (pip install \"mmsafe[tensorboard]\") or remove it from report_to"
    ]


# ---------------------------------------------------------------- 5: progress and interrupts


def test_progress_line_reads_count_share_rate_and_time_left():
    from mmsafe.progress import progress_line

    # 120 of 480 in 120/1.9 s: 1.9 items/s; 360 left / 1.9 = 189 s, about 3 min.
    assert (
        progress_line("probe", 120, 480, "it", elapsed=120 / 1.9)
        == "probe: 120/480 (25%), 1.9 items/s, about 3 min left"
    )
    assert progress_line("build-data", 7, None, "dialogue", elapsed=2.0) == "build-data: 7 dialogues, 3.5 dialogues/s"


def test_probe_writes_progress_lines_to_a_log_that_is_not_a_terminal(tiny_model_dir, sample, tmp_path):
    log = tmp_path / "probe.log"
    env = {**os.environ, "MMSAFE_PROGRESS_EVERY": "0"}  # a line at every update
    env.pop("MMSAFE_PROGRESS", None)
    command = [
        sys.executable,
        "-m",
        "mmsafe",
        "probe",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(_records(sample)),
        "--out",
        str(tmp_path / "probe"),
    ]
    command += ["--limit", "3", "--variants", "text", "--batch-size", "1", "--max-new-tokens", "4"]
    with log.open("w") as handle:  # `mmsafe probe ... > log 2>&1`
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env, timeout=600)
    text = log.read_text()
    assert result.returncode == 0, text[-2000:]
    counts = [line.split(": ", 1)[1].split("/")[0] for line in text.splitlines() if line.startswith("probe text (")]
    assert counts[:3] == ["1", "2", "3"], text[-2000:]  # one line per answered record, in order
    assert any(line.startswith("probe text (") and "1/3 (33%)" in line and "left" in line for line in text.splitlines())


@pytest.mark.parametrize(
    "signal_number, name, code", [(signal.SIGINT, "Ctrl-C", 130), (signal.SIGTERM, "SIGTERM", 143)]
)
def test_an_interrupted_generate_says_what_was_saved_and_how_to_resume(
    signal_number, name, code, tiny_model_dir, sample, tmp_path
):
    out = tmp_path / "out dir" / "responses.jsonl"  # a space: the resume command must quote it
    args = [
        "generate",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(_records(sample)),
        "--out",
        str(out),
        "--batch-size",
        "1",
        "--max-new-tokens",
        "128",
        "--min-new-tokens",
        "128",
    ]
    # As from a terminal: SIGINT at its default. (A test run started in the background by a
    # non-interactive shell ignores SIGINT, children inherit that, and Python then never turns
    # Ctrl-C into KeyboardInterrupt.)
    process = subprocess.Popen(
        [sys.executable, "-m", "mmsafe", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "MMSAFE_PROGRESS": "0"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            if out.exists() and out.read_text().count("\n") >= 2:
                break
            time.sleep(0.05)
        assert process.poll() is None, "finished before it could be interrupted"
        process.send_signal(signal_number)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    saved = out.read_text().count("\n")
    total = sum(1 for line in _records(sample).read_text().splitlines() if line.strip())
    assert process.returncode == code, stderr[-2000:]
    assert 2 <= saved < total
    said = [line for line in stderr.splitlines() if line.startswith("interrupted")]
    assert said == [
        f"interrupted ({name}): {saved} of {total} responses saved in {out}; rerun the same command to resume:"
    ], stderr[-3000:]
    resume = stderr.rstrip().splitlines()[-1].strip()
    assert resume.split(" ", 3)[:3] == [sys.executable, "-m", "mmsafe"] and shlex.split(resume)[3:] == args


# ---------------------------------------------------------------- 7: small things


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_files_written_through_temporary_files_follow_the_umask(umask, mode, tmp_path):
    from mmsafe.data.formats.mmsafe_po import write as write_released
    from mmsafe.data.jsonl import write_jsonl
    from mmsafe.data.records import read_preference_records
    from mmsafe.fileio import atomic_write_bytes, atomic_write_text

    records = list(read_preference_records(_records(Path(write_sample(tmp_path / "sample")))))[:2]
    previous = os.umask(umask)
    try:
        write_jsonl(tmp_path / "rows.jsonl", [{"id": "a"}])
        write_released(tmp_path / "released.json", records)
        atomic_write_text(tmp_path / "text.txt", "hello\n")
        atomic_write_bytes(tmp_path / "bytes.bin", b"\x00\x01")
    finally:
        os.umask(previous)
    for name in ("rows.jsonl", "released.json", "text.txt", "bytes.bin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
    assert (tmp_path / "text.txt").read_text() == "hello\n"
    assert not [path.name for path in tmp_path.iterdir() if path.name.endswith(".tmp")]


def test_an_interrupted_atomic_write_leaves_the_old_file(tmp_path):
    from mmsafe.fileio import atomic_open

    target = tmp_path / "kept.txt"
    target.write_text("old\n")
    with pytest.raises(RuntimeError), atomic_open(target) as handle:
        handle.write("half of the new")
        raise RuntimeError("killed")
    assert target.read_text() == "old\n"
    assert [path.name for path in tmp_path.iterdir()] == ["kept.txt"]


def test_build_data_output_validates_with_the_default_image_root(tmp_path, capsys):
    out = tmp_path / "built"
    assert main(["build-data", "--sample", "--out", str(out)]) == 0
    records = out / "records.jsonl"
    built = [json.loads(line) for line in records.read_text().splitlines() if line.strip()]
    assert built and all((out / row["image"]).is_file() for row in built)
    capsys.readouterr()
    assert main(["data", "validate", str(records)]) == 0
    assert capsys.readouterr().out.strip().endswith(f"{len(built)} of {len(built)} records good; ok")


def test_env_prints_versions_devices_and_extras(capsys):
    import torch

    assert main(["env", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for package in ("torch", "transformers", "peft", "accelerate", "datasets"):
        assert report[package] == importlib.metadata.version(package)
    assert report["python"] == ".".join(str(part) for part in sys.version_info[:3])
    assert report["devices"]["cuda"] == torch.cuda.is_available()
    assert len(report["devices"]["cuda_devices"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert set(report["extras"]) >= {"gpu", "serve", "tensorboard"}
    assert main(["env"]) == 0
    text = capsys.readouterr().out
    assert f"- transformers: {importlib.metadata.version('transformers')}" in text and "- CUDA GPUs: " in text


def test_tiny_configs_write_under_an_ignored_folder_and_the_paper_config_cites_no_missing_file():
    root = Path(__file__).resolve().parents[1]
    ignored = [line.strip().strip("/") for line in (root / ".gitignore").read_text().splitlines()]
    import yaml

    for name in ("tiny_dpo.yaml", "tiny_bpo.yaml"):
        config = yaml.safe_load((root / "configs" / "train" / name).read_text())
        for key in ("model", "data", "output_dir", "reference_cache_dir"):
            assert Path(config[key]).parts[0] in ignored, (name, key, config[key])
    paper = (root / "configs" / "paper" / "llava15_7b.yaml").read_text()
    assert "METHOD.md" not in paper
    config = yaml.safe_load(paper)
    hints = [line.split() for line in paper.splitlines() if "mmsafe data convert" in line]
    converted = [words[words.index("convert") + 2] for words in hints]  # convert INPUT OUTPUT
    overrides = {
        part.split("=", 1)[0]: part.split("=", 1)[1]
        for line in paper.splitlines()
        if "mmsafe run" in line and "data.train=" in line
        for part in line.split()
        if "=" in part
    }
    # What the convert hint writes is what the config (or the override shown with it) reads.
    assert converted and all(path in (config["data"]["train"], overrides.get("data.train")) for path in converted)
