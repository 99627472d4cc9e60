"""The resumable-output scaffold on its own: settings, content keys, crashes, the lock, parts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mmsafe.data.outputs import lock_path_for
from mmsafe.data.resumable import Launch, ResumableOutput, failed_path_for, part_path_for, stamp
from mmsafe.errors import ConfigError


def key(row: dict) -> tuple[str, str]:
    return (row["id"], row.get("variant", "default"))


def row(record_id: str, sha: str | None = None, variant: str = "v") -> dict:
    data = {"id": record_id, "variant": variant, "response": f"answer {record_id}"}
    if sha is not None:
        data["input_sha"] = sha
    return data


def output(path: Path, settings: dict | None = None, **options) -> ResumableOutput:
    return ResumableOutput(
        path,
        key=key,
        scope=lambda row: row.get("variant") == "v",
        settings=settings,
        sidecar=path.with_name(path.name + ".config.yaml"),
        settings_at=("resume", "v"),
        what="responses for variant 'v'",
        content_field="input_sha",
        **options,
    )


def write_lines(path: Path, rows: list[dict], tail: str = "") -> None:
    path.write_text("".join(json.dumps(item) + "\n" for item in rows) + tail, encoding="utf-8")


def ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text(encoding="utf-8").splitlines()]


def first_run(path: Path, settings: dict) -> None:
    with output(path, settings).open() as out:
        out.compare_inputs({("a", "v"): "1", ("b", "v"): "2"})
        out.write_sidecar(stamp({"resume": {"v": settings}}))
        out.append([row("a", "1"), row("b", "2")])
        out.close()


def test_other_settings_are_refused_with_every_change_before_the_output_is_touched(tmp_path):
    path = tmp_path / "out.jsonl"
    first_run(path, {"model": "tiny", "max_new_tokens": 8})
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"id": "c", "vari')  # a crash remnant: a check must not repair it
    before = path.read_bytes()

    with pytest.raises(ConfigError) as refused:
        output(path, {"model": "tiny", "max_new_tokens": 9, "seed": 1}).open()
    message = str(refused.value)
    assert message.startswith(f"{path}: already holds responses for variant 'v' made with other settings (")
    assert "max_new_tokens: 8 -> 9; seed: (none) -> 1" in message and "model" not in message
    assert message.endswith("rerun with the same settings to resume, or write to a new output file")
    assert path.read_bytes() == before  # not even the cut-short line was removed
    assert not lock_path_for(path).exists()


def test_the_same_settings_resume_and_other_scopes_are_not_checked(tmp_path):
    path = tmp_path / "out.jsonl"
    first_run(path, {"model": "tiny"})
    with output(path, {"model": "tiny"}).open() as out:
        assert out.done == {("a", "v"), ("b", "v")}
    other = ResumableOutput(
        path,
        key=key,
        scope=lambda row: row.get("variant") == "w",
        settings={"model": "big"},
        sidecar=path.with_name(path.name + ".config.yaml"),
        settings_at=("resume", "w"),
    )
    with other.open() as out:  # variant w has no rows yet: nothing to compare
        assert out.rows == []


def test_stale_rows_are_dropped_and_redone_removed_inputs_kept_and_counted(tmp_path):
    path = tmp_path / "out.jsonl"
    write_lines(path, [row("a", "1"), row("b", "2"), row("gone", "3"), row("old"), row("b", "9", variant="w")])
    path.chmod(0o640)
    with output(path).open() as out:
        out.compare_inputs({("a", "v"): "1", ("b", "v"): "2-edited", ("old", "v"): "4", ("new", "v"): "5"})
        assert out.stale == {("b", "v")}
        assert out.removed == [("gone", "v")]
        # The edited input is asked again and the new one asked; "old" has no hash (trusted).
        todo = out.todo(["a", "b", "old", "new"], lambda record_id: (record_id, "v"))
        assert todo == ["b", "new"]
        assert ids(path) == ["a", "gone", "old", "b"]  # the stale row left; the other variant's b stays
        out.append([row("b", "2-edited"), row("new", "5")])
        out.close()
    assert ids(path) == ["a", "gone", "old", "b", "b", "new"]
    assert [json.loads(line).get("input_sha") for line in path.read_text().splitlines()][3:] == ["9", "2-edited", "5"]
    assert path.stat().st_mode & 0o777 == 0o640  # the rewrite kept the file's permissions


def test_a_cut_short_last_line_is_ignored_and_written_again(tmp_path):
    path = tmp_path / "out.jsonl"
    write_lines(path, [row("a"), row("b")], tail='{"id": "c", "variant": "v", "resp')
    with output(path).open() as out:
        assert out.done == {("a", "v"), ("b", "v")}
        assert out.todo(["a", "b", "c"], lambda record_id: (record_id, "v")) == ["c"]
        assert out.append([row("c"), row("a")]) == 1  # a is written already: never twice
        out.close()
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and [json.loads(line) for line in lines[:-1]] == [row("a"), row("b"), row("c")]


def test_the_output_is_locked_while_open_and_released_by_close(tmp_path):
    path = tmp_path / "out.jsonl"
    second = (
        "import sys\n"
        "from mmsafe.data.resumable import ResumableOutput\n"
        "from mmsafe.data.outputs import OutputBusyError\n"
        "try:\n"
        "    ResumableOutput(sys.argv[1], key=lambda row: row['id']).open().close()\n"
        "except OutputBusyError as error:\n"
        "    print(error); sys.exit(3)\n"
    )
    out = output(path).open()
    try:
        refused = subprocess.run([sys.executable, "-c", second, str(path)], capture_output=True, text=True, timeout=120)
        assert refused.returncode == 3, refused.stdout + refused.stderr
        assert (
            f"pid {os.getpid()}" in refused.stdout and "another mmsafe process is writing this output" in refused.stdout
        )
    finally:
        out.close()
    assert not lock_path_for(path).exists()
    after = subprocess.run([sys.executable, "-c", second, str(path)], capture_output=True, text=True, timeout=120)
    assert after.returncode == 0, after.stdout + after.stderr


def test_failed_inputs_are_listed_beside_other_scopes_and_the_list_goes_once_all_are_answered(tmp_path):
    path = tmp_path / "out.jsonl"
    failed = failed_path_for(path)
    write_lines(
        failed,
        [{"id": "x", "variant": "w", "reason": "other variant"}, {"id": "old", "variant": "v", "reason": "last run"}],
    )
    with output(path).open() as out:
        out.fail([{"id": "b", "variant": "v", "reason": "the reply has no text"}])
        assert out.write_failed() == failed
        out.close()
    assert [(entry["id"], entry["reason"]) for entry in map(json.loads, failed.read_text().splitlines())] == [
        ("x", "other variant"),
        ("b", "the reply has no text"),
    ]

    with output(path).open() as out:  # this variant's failures all answered: only the other's stay
        assert out.write_failed() is None
        out.close()
    assert ids(failed) == ["x"]
    failed.write_text(json.dumps({"id": "b", "variant": "v", "reason": "r"}) + "\n")
    with output(path).open() as out:
        out.write_failed()
        out.close()
    assert not failed.exists()


def test_close_puts_this_scopes_rows_in_input_order_once_all_are_there(tmp_path):
    path = tmp_path / "out.jsonl"
    write_lines(path, [row("c"), row("z", variant="w"), row("a")])
    with output(path).open() as out:
        out.append([row("b")])
        out.close(order=[("a", "v"), ("b", "v"), ("c", "v"), ("d", "v")])  # d missing: order left alone
    assert ids(path) == ["c", "z", "a", "b"]
    with output(path).open() as out:
        out.close(order=[("a", "v"), ("b", "v"), ("c", "v")])
    assert ids(path) == ["a", "z", "b", "c"]  # the other variant's row keeps its line


def test_parts_of_each_rank_are_merged_by_the_first_and_removed(tmp_path):
    path = tmp_path / "out.jsonl"
    write_lines(path, [row("a", "1")])
    dead = part_path_for(path, 5)  # a part of a launch with more processes, killed
    write_lines(dead, [row("b", "2"), row("c", "old")])
    first, second = (output(path, launch=Launch(rank, 2)).open() for rank in (0, 1))
    hashes = {(record_id, "v"): sha for record_id, sha in [("a", "1"), ("b", "2"), ("c", "3"), ("d", "4"), ("e", "5")]}
    for out in (first, second):
        out.compare_inputs(hashes)
        assert out.stale == {("c", "v")}
    todo = first.todo("abcde", lambda record_id: (record_id, "v"))
    assert todo == second.todo("abcde", lambda record_id: (record_id, "v")) == ["c", "d", "e"]
    assert first.shard(todo) == ["c", "e"] and second.shard(todo) == ["d"]
    assert ids(dead) == ["b"]  # the first process dropped the stale row of the dead rank's part
    first.append([row("c", "3"), row("e", "5")])
    second.append([row("d", "4")])
    assert ids(part_path_for(path, 1)) == ["d"] and ids(path) == ["a"]
    second.close()
    first.close(order=[(record_id, "v") for record_id in "abcde"])
    assert ids(path) == ["a", "b", "c", "d", "e"]
    assert list(tmp_path.glob(".out.jsonl.part-*")) == []


def test_the_sidecar_is_written_with_a_checksum_and_read_back_as_previous(tmp_path):
    path = tmp_path / "out.jsonl"
    first_run(path, {"model": "tiny"})
    saved = yaml.safe_load(path.with_name("out.jsonl.config.yaml").read_text())
    assert list(saved)[-1] == "checksum" and saved["resume"] == {"v": {"model": "tiny"}}
    with output(path, {"model": "tiny"}).open() as out:
        assert (
            out.previous is not None
            and out.previous["resume"] == {"v": {"model": "tiny"}}
            and "checksum" not in out.previous
        )
