"""Crash-and-resume matrix: SIGKILL at seeded moments, restart, compare with an uninterrupted run.

Every stage that runs long (generate, judge, blind, build-data, train, run) is killed at
least five times within one growing run: each restart resumes the same output folder and
is killed again further on, then a last restart finishes. The outputs must equal those of
an uninterrupted run (greedy decoding), with no record lost and none duplicated.

The stages run in forked children of the test process (``os.fork`` then ``mmsafe.cli.main``),
so a restart costs no interpreter start and no import; a SIGKILL is as abrupt as for any
process. Children use one thread (OpenMP state is not inherited safely across a fork), and
so do the reference runs, so both sides compute the same floating point.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import yaml
from PIL import Image

from mmsafe.synthesis.pipeline import RECORDS_FILE, STATE_FILE
from tests.reliability.corpus import GOOD_DIALOGUE, good_record, response_row

KILLS = 5
SEED = 20261128
pytestmark = pytest.mark.slow


@dataclass
class KillFigures:
    """What one stage's matrix row measured (also reported in the terminal summary)."""

    stage: str
    kills: int
    expected: int
    lost: int
    duplicated: int


def _child(argv: list, log: Path) -> int:
    """Fork; the child runs ``mmsafe`` with ``argv`` (output appended to ``log``) and exits with its code."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        code = 70
        try:
            import torch

            torch.set_num_threads(1)
            output = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(output, 1)
            os.dup2(output, 2)
            # pytest's capture replaced sys.stdout/sys.stderr with its own files: write to the log instead
            sys.stdout = open(1, "w", buffering=1, encoding="utf-8", closefd=False)  # noqa: SIM115
            sys.stderr = open(2, "w", buffering=1, encoding="utf-8", closefd=False)  # noqa: SIM115
            from mmsafe.cli import main

            code = main([str(part) for part in argv])
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid


def _wait(pid: int, timeout: float = 300) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"{pid} did not finish within {timeout} s")


def run_to_end(argv: list, log: Path) -> None:
    code = _wait(_child(argv, log))
    assert code == 0, f"mmsafe {' '.join(map(str, argv))} exited {code}:\n{log.read_text(errors='replace')[-3000:]}"


def kill_repeatedly(
    argv: list, progress: Callable[[], int], targets: list[int], rng: random.Random, log: Path, *, timeout: float = 120
) -> int:
    """Start ``argv`` once per target, SIGKILL it once ``progress()`` reaches the target
    (plus a random fraction of a batch's time); then run it to the end. Returns the kills."""
    kills = 0
    for target in targets:
        pid = _child(argv, log)
        deadline = time.monotonic() + timeout
        ended = False
        while progress() < target:
            if os.waitpid(pid, os.WNOHANG)[0]:
                ended = True  # finished before this moment came: no kill to count
                break
            assert time.monotonic() < deadline, f"no progress to {target} within {timeout} s"
            time.sleep(0.002)
        if ended:
            break
        time.sleep(rng.uniform(0.0, 0.03))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            kills += 1
    run_to_end(argv, log)
    return kills


def complete_rows(path: Path) -> list[dict]:
    """The rows of a JSONL file as a reader sees it now (a last line cut short is not a row)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n")[:-1] if line]


def line_count(path: Path) -> Callable[[], int]:
    def count() -> int:
        try:
            return path.read_bytes().count(b"\n")
        except FileNotFoundError:
            return 0

    return count


def spread_targets(rng: random.Random, total: int, count: int = KILLS) -> list[int]:
    """``count`` increasing seeded progress targets spread over the first three quarters of
    ``1..total``: a quarter of the work is left after the last one, so the process is still
    running when the kill (a fraction of a batch's time later) arrives, even on a fast machine."""
    span = max(count + 1, (3 * total) // 4)
    edges = [round(span * index / (count + 1)) for index in range(count + 2)]
    return [rng.randint(max(1, edges[index]), max(1, edges[index + 1] - 1)) for index in range(count)]


def tally(stage: str, kills: int, keys: list, expected: set, record_property) -> KillFigures:
    counts = Counter(keys)
    figures = KillFigures(
        stage, kills, len(expected), len(expected - set(counts)), sum(count - 1 for count in counts.values())
    )
    record_property("kill_figures", asdict(figures))
    print(
        f"\n{stage}: {figures.kills} kills survived, {figures.expected} records, {figures.lost} lost, {figures.duplicated} duplicated"
    )
    return figures


def write_dataset(folder: Path, count: int) -> Path:
    """``count`` records (every other with an image) of varied prompts."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    rows = []
    for index in range(count):
        image = f"images/{index}.png" if index % 2 else None
        if image:
            Image.new("RGB", (12 + index % 9, 10), ((index * 37) % 256, 90, 30)).save(folder / image)
        words = " ".join(["how", "do", "I", "get", "into", "the", "stadium", "tonight"][: 3 + index % 6])
        messages = [{"role": "user", "content": ("<image>\n" if image else "") + f"{words} {index}?"}]
        rows.append(
            good_record(
                f"rec-{index:03d}",
                image=image,
                messages=messages,
                chosen=f"I cannot help with {index}.",
                rejected=[f"Sure, step {index}."],
            )
        )
    path = folder / "records.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("kill-data"), 40)


ENGINE = ["--max-new-tokens", 3, "--batch-size", 2, "--device", "cpu"]


def test_generate_killed_five_times(tmp_path, tiny_model_dir, dataset, record_property):
    rng = random.Random(SEED)
    out, reference = tmp_path / "killed.jsonl", tmp_path / "reference.jsonl"
    argv = ["generate", "--model", tiny_model_dir, "--data", dataset, "--out", out, *ENGINE]
    kills = kill_repeatedly(argv, line_count(out), spread_targets(rng, 40), rng, tmp_path / "killed.log")
    run_to_end(
        ["generate", "--model", tiny_model_dir, "--data", dataset, "--out", reference, *ENGINE],
        tmp_path / "reference.log",
    )
    rows = complete_rows(out)
    figures = tally(
        "generate", kills, [row["id"] for row in rows], {f"rec-{index:03d}" for index in range(40)}, record_property
    )
    assert (figures.kills, figures.lost, figures.duplicated) == (KILLS, 0, 0)
    assert out.read_text(encoding="utf-8") == reference.read_text(encoding="utf-8")


def test_blind_killed_five_times(tmp_path, tiny_model_dir, dataset, record_property):
    rng = random.Random(SEED + 1)
    out, reference = tmp_path / "killed" / "records.jsonl", tmp_path / "reference" / "records.jsonl"
    argv = [
        "blind",
        "--model",
        tiny_model_dir,
        "--data",
        dataset,
        "--out",
        out,
        "--image-root",
        dataset.parent,
        *ENGINE,
    ]
    side = out.with_name(out.name + ".blind-responses.jsonl")
    kills = kill_repeatedly(argv, line_count(side), spread_targets(rng, 40), rng, tmp_path / "killed.log")
    run_to_end(
        [
            "blind",
            "--model",
            tiny_model_dir,
            "--data",
            dataset,
            "--out",
            reference,
            "--image-root",
            dataset.parent,
            *ENGINE,
        ],
        tmp_path / "reference.log",
    )
    rows = complete_rows(out)
    answers = [row["id"] for row in complete_rows(side)]
    figures = tally("blind", kills, answers, {f"rec-{index:03d}" for index in range(40)}, record_property)
    assert (figures.kills, figures.lost, figures.duplicated) == (KILLS, 0, 0)
    assert [row["id"] for row in rows] == [f"rec-{index:03d}" for index in range(40)]
    assert rows == complete_rows(reference)


def test_judge_killed_five_times(tmp_path, record_property):
    rng = random.Random(SEED + 2)
    total = 3000
    responses = tmp_path / "responses.jsonl"
    answers = ["I cannot help with that.", "Sure, here is how.", "I'm sorry, but no.", "Step one: buy a crowbar."]
    responses.write_text(
        "".join(
            json.dumps(response_row(f"r{index:05d}", response=answers[index % 4])) + "\n" for index in range(total)
        ),
        encoding="utf-8",
    )
    out, reference = tmp_path / "killed.jsonl", tmp_path / "reference.jsonl"
    kills = kill_repeatedly(
        ["judge", "--responses", responses, "--out", out, "--judge", "refusal", "--batch-size", 1],
        line_count(out),
        spread_targets(rng, total),
        rng,
        tmp_path / "killed.log",
    )
    run_to_end(
        ["judge", "--responses", responses, "--out", reference, "--judge", "refusal", "--batch-size", 64],
        tmp_path / "reference.log",
    )
    rows = complete_rows(out)
    figures = tally(
        "judge", kills, [row["id"] for row in rows], {f"r{index:05d}" for index in range(total)}, record_property
    )
    assert (figures.kills, figures.lost, figures.duplicated) == (KILLS, 0, 0)
    assert rows == complete_rows(reference)


def test_build_data_killed_five_times(tmp_path, record_property):
    rng = random.Random(SEED + 3)
    total = 400
    index = tmp_path / "index"
    for kind, name, colour in (
        ("LOC", "Paris", (0, 0, 200)),
        ("ORG", "Google", (0, 200, 0)),
        ("PER", "Barack Obama", (200, 0, 0)),
    ):
        (index / kind).mkdir(parents=True)
        Image.new("RGB", (4, 3), colour).save(index / kind / f"{name}.png")
    places = ["Paris", "Google", "Barack Obama"]
    lines = []
    for number in range(total):
        prompt = f"How do I sneak into {places[number % 3]} number {number}?"
        lines.append(
            json.dumps(
                {
                    "chosen": f"\n\nHuman: {prompt}\n\nAssistant: No {number}.",
                    "rejected": f"\n\nHuman: {prompt}\n\nAssistant: Yes {number}.",
                }
            )
            + "\n"
        )
    lines.append(json.dumps(GOOD_DIALOGUE) + "\n")  # no entity: read, counted, no record
    source = tmp_path / "dialogues.jsonl"
    source.write_text("".join(lines), encoding="utf-8")

    def argv(out: Path) -> list:
        return [
            "build-data",
            "--input",
            source,
            "--out",
            out,
            "--image-index",
            index,
            "--entities",
            "gazetteer",
            "--images",
            "local",
            "batch_size=4",
        ]

    killed, reference = tmp_path / "killed", tmp_path / "reference"
    kills = kill_repeatedly(
        argv(killed), line_count(killed / STATE_FILE), spread_targets(rng, total), rng, tmp_path / "killed.log"
    )
    run_to_end(argv(reference), tmp_path / "reference.log")
    rows = complete_rows(killed / RECORDS_FILE)
    expected = complete_rows(reference / RECORDS_FILE)
    figures = tally("build-data", kills, [row["id"] for row in rows], {row["id"] for row in expected}, record_property)
    assert figures.expected == total
    assert (figures.kills, figures.lost, figures.duplicated) == (KILLS, 0, 0)
    assert sorted(rows, key=lambda row: row["id"]) == sorted(expected, key=lambda row: row["id"])


def _train_config(tmp_path: Path, name: str, model: Path, data: Path, steps: int, finetune: str = "full") -> Path:
    options = {
        "finetune": finetune,
        "model": str(model),
        "data": str(data),
        "output_dir": str(tmp_path / name),
        "loss": "dpo",  # one rejected response per record: BPO would be refused as plain DPO
        "learning_rate": 1e-3,
        "warmup_steps": 0,
        "max_steps": steps,
        "save_steps": 2,
        "save_total_limit": 2,
        "per_device_train_batch_size": 2,
        "dtype": "float32",
        "max_length": 64,
        "logging_steps": 1,
        "reference_cache_dir": str(tmp_path / f"{name}-cache"),
        "trainer_args": {"dataloader_pin_memory": False},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(options), encoding="utf-8")
    return path


def trained_lineage(output_dir: Path) -> dict[int, list[float]]:
    """Losses of the steps the final model descends from, by step.

    Each restart logs ``train_begin`` at the checkpoint it resumed from; steps a killed
    run logged after its last checkpoint were redone, so they are not in the lineage.
    """
    entries = [
        json.loads(line)
        for line in (output_dir / "train_log.jsonl").read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    segments: list[tuple[int, list[dict]]] = []
    for entry in entries:
        if entry.get("event") == "train_begin":
            segments.append((entry["step"], []))
        elif "loss" in entry and segments:
            segments[-1][1].append(entry)
    lineage: dict[int, list[float]] = {}
    for position, (_, steps) in enumerate(segments):
        until = segments[position + 1][0] if position + 1 < len(segments) else None
        for entry in steps:
            if until is None or entry["step"] <= until:
                lineage.setdefault(entry["step"], []).append(entry["loss"])
    return lineage


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_train_killed_five_times(finetune, tmp_path, tiny_model_dir, dataset, record_property):
    rng = random.Random(SEED + 4)
    steps = 14

    def checkpoint_step() -> int:
        done = [
            int(path.parent.name.split("-")[1])
            for path in (tmp_path / "killed").glob("checkpoint-*/trainer_state.json")
        ]
        return max(done, default=0)

    targets = sorted(rng.sample(range(2, steps, 2), KILLS))
    kills = kill_repeatedly(
        ["train", "--config", _train_config(tmp_path, "killed", tiny_model_dir, dataset, steps, finetune)],
        checkpoint_step,
        targets,
        rng,
        tmp_path / "killed.log",
    )
    run_to_end(
        ["train", "--config", _train_config(tmp_path, "reference", tiny_model_dir, dataset, steps, finetune)],
        tmp_path / "reference.log",
    )
    lineage, reference = trained_lineage(tmp_path / "killed"), trained_lineage(tmp_path / "reference")
    keys = [step for step, losses in lineage.items() for _ in losses]
    figures = tally(f"train {finetune} (steps)", kills, keys, set(range(1, steps + 1)), record_property)
    assert (figures.kills, figures.lost, figures.duplicated) == (KILLS, 0, 0)
    assert {step: losses[0] for step, losses in lineage.items()} == pytest.approx(
        {step: losses[0] for step, losses in reference.items()}, abs=1e-5
    )
    summary = json.loads((tmp_path / "killed" / "train_summary.json").read_text(encoding="utf-8"))
    assert summary["global_step"] == steps


def run_progress(out: Path) -> int:
    lines = sum(line_count(path)() for path in out.rglob("*.jsonl") if path.is_file())
    return lines + sum(1 for _ in out.rglob("checkpoint-*/trainer_state.json"))


RUN = {
    "model": "tiny",
    "data": {"sample": True},
    "blind": {"max_new_tokens": 3, "batch_size": 4},
    "train": {
        "methods": ["bpo"],
        "options": {
            "max_steps": 8,
            "save_steps": 2,
            "save_total_limit": 2,
            "per_device_train_batch_size": 4,
            "dtype": "float32",
            "max_length": 96,
            "learning_rate": 1e-4,
        },
    },
    "generate": {"max_new_tokens": 3, "batch_size": 4, "dtype": "float32", "device": "cpu"},
}


def test_run_killed_five_times(tmp_path, record_property):
    rng = random.Random(SEED + 5)

    def config(name: str) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"out": str(tmp_path / name), **RUN}), encoding="utf-8")
        return path

    # Progress is every line written under the output folder plus every complete checkpoint,
    # so the kills fall at seeded places across all stages of the uninterrupted run's work.
    run_to_end(["run", config("reference")], tmp_path / "reference.log")
    total = run_progress(tmp_path / "reference")
    kills = kill_repeatedly(
        ["run", config("killed")],
        lambda: run_progress(tmp_path / "killed"),
        spread_targets(rng, total),
        rng,
        tmp_path / "killed.log",
    )
    keys, expected = [], set()
    for name in ("base", "bpo"):
        for kind, path in (
            ("response", Path("responses") / f"{name}.jsonl"),
            ("verdict", Path("verdicts") / f"{name}.refusal.jsonl"),
        ):
            killed_rows, reference_rows = (
                complete_rows(tmp_path / "killed" / path),
                complete_rows(tmp_path / "reference" / path),
            )
            keys += [(kind, name, row["id"], row["variant"]) for row in killed_rows]
            expected |= {(kind, name, row["id"], row["variant"]) for row in reference_rows}
            assert sorted(killed_rows, key=lambda row: row["id"]) == sorted(
                reference_rows, key=lambda row: row["id"]
            ), path
    figures = tally("run (responses + verdicts)", kills, keys, expected, record_property)
    assert (figures.kills, figures.lost, figures.duplicated) == (KILLS, 0, 0)
    summary = json.loads((tmp_path / "killed" / "report" / "summary.json").read_text(encoding="utf-8"))
    assert (
        summary["results"]
        == json.loads((tmp_path / "reference" / "report" / "summary.json").read_text(encoding="utf-8"))["results"]
    )


def test_generate_killed_five_times_while_the_input_changes(tmp_path, tiny_model_dir, record_property):
    """Between restarts the input gains records, loses records and has prompts and images edited
    (records already answered among them); the end equals an uninterrupted run on the final input,
    and responses of removed records are kept once each (never deleted, never duplicated)."""
    rng = random.Random(SEED + 6)
    folder = tmp_path / "data"
    data = write_dataset(folder, 40)
    out, reference = tmp_path / "killed.jsonl", tmp_path / "reference.jsonl"
    argv = ["generate", "--model", tiny_model_dir, "--data", data, "--out", out, *ENGINE]
    progress = line_count(out)
    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()]
    removed: set[str] = set()
    added = 0

    def change_input(step: int) -> None:
        nonlocal added
        answered = [row["id"] for row in complete_rows(out)]
        present = [row["id"] for row in rows]
        if step % 3 == 1:  # gains records, at random places
            for _ in range(3):
                record_id = f"new-{added:03d}"
                added += 1
                rows.insert(
                    rng.randrange(len(rows) + 1),
                    good_record(
                        record_id, image=None, messages=[{"role": "user", "content": f"what about {record_id}?"}]
                    ),
                )
        elif step % 3 == 2:  # loses records, answered ones among them
            for record_id in rng.sample([i for i in present if i in answered][:10] or present, 2):
                removed.add(record_id)
                rows[:] = [row for row in rows if row["id"] != record_id]
        else:  # edits: a prompt (same id) and an image file (same path), answered ones
            candidates = [row for row in rows if row["id"] in answered] or rows
            for row in rng.sample(candidates, 2):
                row["messages"][-1]["content"] += f" (edited {step})"
            pictured = [row for row in rows if row["image"] and row["id"] in answered] or [
                row for row in rows if row["image"]
            ]
            Image.new("RGB", (7, 7), (step * 40 % 256, 0, 0)).save(folder / rng.choice(pictured)["image"])
        data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")

    kills = 0
    for step in range(KILLS + 1):
        if step:
            change_input(step)
        pid = _child(argv, tmp_path / "killed.log")
        if step == KILLS:  # the last run goes to the end
            assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0, (tmp_path / "killed.log").read_text()[-3000:]
            break
        target = progress() + rng.randint(2, 6)
        deadline = time.monotonic() + 120
        while progress() < target and not os.waitpid(pid, os.WNOHANG)[0]:
            assert time.monotonic() < deadline, f"no progress to {target} within 120 s"
            time.sleep(0.002)
        else:
            time.sleep(rng.uniform(0.0, 0.03))
            os.kill(pid, signal.SIGKILL)
            kills += os.WIFSIGNALED(os.waitpid(pid, 0)[1])
    run_to_end(
        ["generate", "--model", tiny_model_dir, "--data", data, "--out", reference, *ENGINE], tmp_path / "reference.log"
    )

    final_ids = [row["id"] for row in rows]
    killed_rows = complete_rows(out)
    figures = tally(
        "generate (input changing)", kills, [row["id"] for row in killed_rows], set(final_ids), record_property
    )
    assert (figures.kills, figures.lost, figures.duplicated) == (KILLS, 0, 0)
    assert [row for row in killed_rows if row["id"] in set(final_ids)] == complete_rows(reference)
    kept = {row["id"] for row in killed_rows} - set(final_ids)
    assert kept <= removed  # only responses of removed records are extra, and kept


def _overlapping_writers(argv: list, out: Path, log_dir: Path, *, start_after: int) -> tuple[int, int, int, str]:
    """Start ``argv`` twice on one output, the second once the first has written
    ``start_after`` lines. Returns (first pid, first exit code, second exit code, second's log)."""
    first = _child(argv, log_dir / "first.log")
    deadline = time.monotonic() + 120
    while line_count(out)() < start_after:
        assert not os.waitpid(first, os.WNOHANG)[0], "the first writer ended before the second could start"
        assert time.monotonic() < deadline, f"no progress to {start_after} lines within 120 s"
        time.sleep(0.002)
    second_code = _wait(_child(argv, log_dir / "second.log"))
    # The premise of the case: the first was still writing when the second was refused.
    assert not os.waitpid(first, os.WNOHANG)[0], "the first writer finished before the second asked: no overlap tested"
    return first, _wait(first), second_code, (log_dir / "second.log").read_text(encoding="utf-8", errors="replace")


def test_two_writers_on_one_output_one_refuses_naming_the_other(tmp_path, tiny_model_dir, record_property):
    """Two ``generate`` (then two ``judge``) on one output at once: the second is refused
    at once with a message naming the first (pid and command), the first finishes, and the
    output holds every id once."""
    from mmsafe.generate.hf_engine import HFEngine  # noqa: F401 (imported here, so a forked child starts at once)

    total = 300
    data = write_dataset(tmp_path / "data", total)
    out = tmp_path / "responses.jsonl"
    argv = [
        "generate",
        "--model",
        tiny_model_dir,
        "--data",
        data,
        "--out",
        out,
        "--max-new-tokens",
        3,
        "--batch-size",
        1,
        "--device",
        "cpu",
    ]
    first, first_code, second_code, second_log = _overlapping_writers(argv, out, tmp_path, start_after=5)
    assert (first_code, second_code) == (0, 1), second_log
    refusals = [line for line in second_log.splitlines() if line.startswith("error: ")]
    assert len(refusals) == 1 and f"another mmsafe process is writing this output (pid {first}: " in refusals[0], (
        second_log
    )
    assert "Traceback" not in second_log
    figures = tally(
        "generate (2 writers at once)",
        0,
        [row["id"] for row in complete_rows(out)],
        {f"rec-{index:03d}" for index in range(total)},
        record_property,
    )
    assert (figures.lost, figures.duplicated) == (0, 0)

    verdict_total = 3000
    responses = tmp_path / "to-judge.jsonl"
    responses.write_text(
        "".join(json.dumps(response_row(f"r{index:05d}")) + "\n" for index in range(verdict_total)), encoding="utf-8"
    )
    verdicts = tmp_path / "verdicts.jsonl"
    judge = ["judge", "--responses", responses, "--out", verdicts, "--judge", "refusal", "--batch-size", 1]
    (tmp_path / "judge").mkdir()
    first, first_code, second_code, second_log = _overlapping_writers(
        judge, verdicts, tmp_path / "judge", start_after=50
    )
    assert (first_code, second_code) == (0, 1), second_log
    assert f"another mmsafe process is writing this output (pid {first}: " in second_log
    figures = tally(
        "judge (2 writers at once)",
        0,
        [row["id"] for row in complete_rows(verdicts)],
        {f"r{index:05d}" for index in range(verdict_total)},
        record_property,
    )
    assert (figures.lost, figures.duplicated) == (0, 0)
    assert not (tmp_path / "responses.jsonl.lock").exists() and not (tmp_path / "verdicts.jsonl.lock").exists()
