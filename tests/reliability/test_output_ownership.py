"""Outputs belong to whoever wrote them.

- ``mmsafe run --from STAGE`` removes exactly the files the stages wrote (their lists in
  ``OUT/.stages/<stage>.files.json``), never a user's file, never a folder they did not make.
- An output that is an input (same path, a symlink, another spelling, a hard link) is
  refused before anything is written: the input keeps every byte, its last line too.
- One writer per output: a second process is refused with a message naming the first.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from mmsafe import pipeline
from mmsafe.data.jsonl import ResumableJsonlWriter
from mmsafe.data.outputs import OutputBusyError, OutputLock, lock_path_for
from mmsafe.errors import DataError
from mmsafe.pipeline import DataSection, Paths, PipelineConfig, remove_stage_outputs, run_pipeline
from tests.reliability.corpus import good_record, response_row
from tests.reliability.stages import run_cli


def _tree(root: Path) -> dict[str, bytes]:
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


# ---------------------------------------------------------------- item 1: --from removes only what mmsafe wrote


def test_from_prepare_keeps_a_users_data_and_removes_only_what_prepare_wrote(tmp_path):
    out = tmp_path / "run"
    user_data = out / "data" / "train.jsonl"  # the user's own training data, inside OUT/data
    user_data.parent.mkdir(parents=True)
    user_data.write_text(json.dumps(good_record("u1")) + "\n", encoding="utf-8")
    (out / "data" / "images").mkdir()
    (out / "data" / "images" / "keep.png").write_bytes(b"not really a png")
    config = PipelineConfig(out=str(out), model="tiny", data=DataSection(train=str(user_data)))
    paths = Paths(out)
    mine_before = _tree(out / "data")

    run_pipeline(config, only="prepare", log=lambda line: None)
    written = json.loads(paths.manifest("prepare").read_text(encoding="utf-8"))
    assert written["complete"] and written["files"], "prepare lists what it wrote"
    assert all(name.startswith("models/tiny/") for name in written["files"])  # the sample is off: nothing in data/
    assert (paths.tiny_model / "config.json").exists()

    (paths.tiny_model / "NOTES.md").write_text(
        "my notes on the tiny model\n", encoding="utf-8"
    )  # a user's file in mmsafe's folder
    lines: list[str] = []
    removal = remove_stage_outputs(paths, "prepare", lines.append)
    assert not any((paths.tiny_model / name).exists() for name in ("config.json", "model.safetensors"))
    assert sorted(path.name for path in paths.tiny_model.iterdir()) == ["NOTES.md"]
    assert any("holds files mmsafe did not write" in line and str(paths.tiny_model) in line for line in lines), lines
    assert str(paths.tiny_model) not in removal.removed
    assert _tree(out / "data") == mine_before

    # The same through the command a user runs: --from prepare redoes it; the user's files stay.
    (paths.stages / "prepare.done.json").unlink()
    run_pipeline(config, only="prepare", log=lambda line: None)
    first_build = (paths.tiny_model / "config.json").stat().st_mtime_ns
    run_pipeline(config, from_stage="prepare", only="prepare", log=lines.append)
    assert _tree(out / "data") == mine_before
    assert (paths.tiny_model / "NOTES.md").read_text(encoding="utf-8") == "my notes on the tiny model\n"
    assert (paths.tiny_model / "config.json").stat().st_mtime_ns != first_build  # removed and written again
    assert json.loads(paths.manifest("prepare").read_text(encoding="utf-8"))["files"].keys() == written["files"].keys()


def _fake_stages(monkeypatch, fail_in: str | None = None) -> None:
    """Stages that write small known files, so the whole pipeline runs in milliseconds."""
    writes = {
        "generate": ["responses/base.jsonl", "responses/base.jsonl.config.yaml"],
        "judge": ["verdicts/base.refusal.jsonl"],
        "report": ["report/summary.md", "report/assets/chart.svg"],
    }

    def make(stage: str):
        def run(config: PipelineConfig, paths: Paths) -> str:
            for name in writes.get(stage, []):
                path = paths.out / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(f"{stage} wrote {name}\n", encoding="utf-8")
            if stage == fail_in:
                raise KeyboardInterrupt  # the process stops mid-stage, after writing
            return f"{stage} done"

        return run

    for stage in pipeline.STAGES:
        monkeypatch.setitem(pipeline.STAGE_FUNCTIONS, stage, make(stage))


def test_from_generate_and_judge_remove_their_files_and_nothing_else(tmp_path, monkeypatch):
    _fake_stages(monkeypatch)
    out = tmp_path / "run"
    (out / "responses").mkdir(parents=True)
    (out / "responses" / "mine.jsonl").write_text(json.dumps(response_row("m1")) + "\n", encoding="utf-8")
    config = PipelineConfig(out=str(out), model="tiny", data=DataSection(sample=True))
    run_pipeline(config, log=lambda line: None)
    (out / "verdicts" / "by-hand.jsonl").write_text("{}\n", encoding="utf-8")  # added after the run, in mmsafe's folder
    (out / "report" / "summary.md").write_text("edited by the user\n", encoding="utf-8")  # mmsafe's file, changed since

    lines: list[str] = []
    run_pipeline(
        config, from_stage="generate", only="generate", log=lines.append
    )  # removes generate, judge and report's files
    remaining = _tree(out)
    assert "responses/mine.jsonl" in remaining and "verdicts/by-hand.jsonl" in remaining
    assert not any(name in remaining for name in ("verdicts/base.refusal.jsonl", "report/assets/chart.svg"))
    assert remaining["report/summary.md"] == b"edited by the user\n"
    assert not (out / "report" / "assets").exists()  # a folder the stage made, empty now: removed
    assert any("summary.md (changed since mmsafe wrote it)" in line for line in lines), lines
    assert remaining["responses/base.jsonl"] == b"generate wrote responses/base.jsonl\n"  # generate ran again


def test_from_removes_what_an_interrupted_stage_wrote_but_not_what_was_there(tmp_path, monkeypatch):
    out = tmp_path / "run"
    (out / "responses").mkdir(parents=True)
    (out / "responses" / "mine.jsonl").write_text("{}\n", encoding="utf-8")
    config = PipelineConfig(out=str(out), model="tiny", data=DataSection(sample=True))
    _fake_stages(monkeypatch, fail_in="generate")
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(config, log=lambda line: None)
    assert (out / "responses" / "base.jsonl").exists()
    _fake_stages(monkeypatch)
    run_pipeline(config, log=lambda line: None)  # resumes generate: its first attempt's files stay its own
    listed = json.loads(Paths(out).manifest("generate").read_text(encoding="utf-8"))["files"]
    assert sorted(listed) == ["responses/base.jsonl", "responses/base.jsonl.config.yaml"]
    _fake_stages(monkeypatch, fail_in="judge")
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(config, from_stage="judge", log=lambda line: None)
    lines: list[str] = []
    remove_stage_outputs(Paths(out), "judge", lines.append)  # interrupted: no list yet, what appeared since it started
    assert not (out / "verdicts").exists()
    assert (out / "responses" / "mine.jsonl").read_text(encoding="utf-8") == "{}\n"


# ---------------------------------------------------------------- item 5: an output that is an input


def _unterminated_responses(path: Path, count: int = 3) -> bytes:
    rows = [json.dumps(response_row(f"r{index}")) for index in range(count)]
    data = ("\n".join(rows)).encode("utf-8")  # the last line has no newline: a "repair" would cut it
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def _spellings(tmp_path: Path, source: Path) -> list[Path]:
    link = tmp_path / "link.jsonl"
    link.symlink_to(source)
    hard = tmp_path / "hard.jsonl"
    os.link(source, hard)
    return [source, link, source.parent / ".." / source.parent.name / source.name, hard]


@pytest.mark.parametrize("spelling", range(4), ids=["same-path", "symlink", "dot-dot", "hard-link"])
def test_judge_into_its_own_responses_is_refused_untouched(tmp_path, spelling):
    responses = tmp_path / "data" / "responses.jsonl"
    data = _unterminated_responses(responses)
    out = _spellings(tmp_path, responses)[spelling]
    before = sorted(path.name for path in tmp_path.rglob("*"))
    outcome = run_cli(["judge", "--responses", responses, "--out", out, "--judge", "refusal"])
    assert outcome.code == 1, outcome.describe()
    assert len(outcome.error_lines) == 1 and "is the input file" in outcome.error_lines[0], outcome.describe()
    assert "Traceback" not in outcome.stderr
    assert responses.read_bytes() == data  # the last record too
    assert sorted(path.name for path in tmp_path.rglob("*")) == before  # no lock, no config beside it


@pytest.mark.parametrize("spelling", range(4), ids=["same-path", "symlink", "dot-dot", "hard-link"])
def test_generate_into_its_own_input_is_refused_untouched(tmp_path, tiny_model_dir, spelling):
    source = tmp_path / "data" / "records.jsonl"
    rows = [
        json.dumps(good_record(f"g{index}", image=None, messages=[{"role": "user", "content": f"hello {index}?"}]))
        for index in range(3)
    ]
    source.parent.mkdir(parents=True)
    source.write_bytes("\n".join(rows).encode("utf-8"))
    data = source.read_bytes()
    out = _spellings(tmp_path, source)[spelling]
    before = sorted(path.name for path in tmp_path.rglob("*"))
    outcome = run_cli(
        [
            "generate",
            "--model",
            tiny_model_dir,
            "--data",
            source,
            "--out",
            out,
            "--max-new-tokens",
            2,
            "--device",
            "cpu",
        ]
    )
    assert outcome.code == 1, outcome.describe()
    assert len(outcome.error_lines) == 1 and "is the input file" in outcome.error_lines[0], outcome.describe()
    assert source.read_bytes() == data
    assert sorted(path.name for path in tmp_path.rglob("*")) == before


def test_a_foreign_file_is_refused_before_its_last_line_is_touched(tmp_path):
    path = tmp_path / "notes.jsonl"
    data = b'{"note": 1}\n{"note": 2}'  # no key, and no newline at the end
    path.write_bytes(data)
    with pytest.raises(DataError, match="existing output line has no key"):
        ResumableJsonlWriter(path, key=lambda row: row["id"])
    assert path.read_bytes() == data
    assert not lock_path_for(path).exists()


def test_a_whole_last_record_without_its_newline_is_kept(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "b"}')
    writer = ResumableJsonlWriter(path, key=lambda row: row["id"], fsync=False)
    assert writer.done == {"a", "b"} and writer.repaired_bytes == 0
    assert writer.write_batch([{"id": "b"}, {"id": "c"}]) == 1
    writer.close()
    assert path.read_bytes() == b'{"id": "a"}\n{"id": "b"}\n{"id": "c"}\n'


# ---------------------------------------------------------------- item 7: one writer per output


def _hold_in_child(lock_target: Path, *, writer: bool) -> int:
    """Fork a child that opens a writer on (or locks) ``lock_target`` and waits; returns its pid."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        try:
            os.close(read_end)
            held = (
                ResumableJsonlWriter(lock_target, key=lambda row: row["id"])
                if writer
                else OutputLock(lock_target.parent, lock_file=lock_target).acquire()
            )
            os.write(write_end, b"ready")
            signal.pause()
            del held
        finally:
            os._exit(0)
    os.close(write_end)
    assert os.read(read_end, 5) == b"ready"
    os.close(read_end)
    return pid


def test_a_second_writer_is_refused_naming_the_first_and_a_killed_one_blocks_nothing(tmp_path):
    out = tmp_path / "verdicts.jsonl"
    out.write_text('{"id": "a"}\n', encoding="utf-8")
    pid = _hold_in_child(out, writer=True)
    try:
        with pytest.raises(OutputBusyError, match=rf"another mmsafe process is writing this output \(pid {pid}: "):
            ResumableJsonlWriter(out, key=lambda row: row["id"])
        assert out.read_text(encoding="utf-8") == '{"id": "a"}\n'
        holder = json.loads(lock_path_for(out).read_text(encoding="utf-8"))
        assert holder["pid"] == pid and holder["command"]
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert lock_path_for(out).exists()  # what a killed run leaves; the kernel has dropped its lock
    writer = ResumableJsonlWriter(out, key=lambda row: row["id"])
    assert writer.done == {"a"} and json.loads(lock_path_for(out).read_text(encoding="utf-8"))["pid"] == os.getpid()
    writer.close()
    assert not lock_path_for(out).exists()  # a run that ends removes its lock file


def test_a_second_run_on_one_out_folder_is_refused(tmp_path, monkeypatch):
    _fake_stages(monkeypatch)
    out = tmp_path / "run"
    config = PipelineConfig(out=str(out), model="tiny", data=DataSection(sample=True))
    pid = _hold_in_child(Paths(out).stages / "run.lock", writer=False)
    try:
        with pytest.raises(OutputBusyError, match=rf"pid {pid}: "):
            run_pipeline(config, log=lambda line: None)
        assert not (out / "responses").exists()
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    run_pipeline(config, log=lambda line: None)
    assert (out / "responses" / "base.jsonl").exists()
