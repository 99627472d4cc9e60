"""Every stage that reads input, run through the CLI on every case of the adversarial corpus.

For each (case, stage): a bad input exits 1 with one line naming the file, record and field
(or the reason) and no traceback; a legal oddity (animated GIF, 16-bit PNG, CMYK JPEG, huge
strings) is handled and exits 0; a bad HH-RLHF line in build-data is a counted skip.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.reliability.corpus import CASES, CONFIG, HH_RLHF, RECORDS, RELEASED, RESPONSES, VERDICTS, Case
from tests.reliability.stages import Outcome, config_argv, run_cli, stage_argv

#: Which stages read each kind of input.
STAGES_BY_KIND = {
    RECORDS: ("validate", "convert", "stats", "generate", "blind", "probe", "pairwise", "train", "run"),
    RELEASED: ("validate", "convert", "stats", "generate", "blind"),
    HH_RLHF: ("validate", "convert", "stats", "build-data"),
    RESPONSES: ("judge",),
    VERDICTS: ("report",),
    CONFIG: ("train", "build-data", "run"),
}
#: Stages that never open an image file: they pass image paths through untouched
#: (``blind`` in its default ``remove`` mode asks the prompt without the image).
IMAGE_BLIND_STAGES = ("convert", "stats", "blind")
#: Stages that do not key outputs by record id and copy or count records as they are.
ID_BLIND_STAGES = ("convert", "stats")


def expected(case: Case, stage: str) -> str:
    """``error``, ``ok`` or ``skip`` (a counted skip) for ``case`` read by ``stage``."""
    if case.kind == RECORDS and stage in IMAGE_BLIND_STAGES and case.reads_image:
        return "ok"
    if case.name == "huge-strings" and stage == "pairwise":
        return "error"  # the asked form puts both responses in one prompt: more than the model reads
    if case.name in ("duplicate-ids", "empty-file") and stage in ID_BLIND_STAGES:
        return "ok"  # convert writes what it read, stats counts it (0 records is shown as such)
    if case.name == "huge-prompt" and stage in ("validate", "convert", "stats"):
        return "ok"  # a long prompt is legal data; what a model can read is up to the model
    if case.name == "huge-prompt" and stage == "probe":
        return "ok"  # a text-only record cannot be probed: skipped and counted in probe.json
    if case.name == "huge-prompt" and stage == "train":
        return "ok"  # a prompt longer than max_length is skipped, logged and counted (train_summary.json)
    if case.name == "hh-not-alternating" and stage == "build-data":
        return "ok"  # consecutive turns of one speaker are real HH-RLHF data: build-data merges them
    if case.kind == HH_RLHF and stage == "build-data" and case.name != "hh-non-utf8":
        return "skip"  # on_bad_line: skip (the default) logs the line and counts it in the summary
    return case.outcome


def matrix() -> list:
    pairs = []
    for case in CASES:
        for stage in STAGES_BY_KIND[case.kind]:
            if stage == "run" and not case.is_error:
                continue  # a whole pipeline per legal case would only repeat generate and train
            pairs.append(pytest.param(case, stage, id=f"{case.name}-{stage}"))
    return pairs


def run_case(case: Case, stage: str, work: Path, model: Path) -> Outcome:
    data = case.write(work / "in")
    argv = config_argv(stage, data, work) if case.kind == CONFIG else stage_argv(stage, data, work, model)
    return run_cli(argv)


@pytest.mark.parametrize(("case", "stage"), matrix())
def test_stage_handles_corpus_case(case, stage, tmp_path, tiny_model_dir):
    outcome = run_case(case, stage, tmp_path, tiny_model_dir)
    assert "Traceback" not in outcome.stderr, outcome.describe()
    want = expected(case, stage)
    if want == "error":
        assert outcome.code == 1, outcome.describe()
        expect = case.expect or "positions"
        matching = [line for line in outcome.error_lines if expect in line]
        assert matching, f"no error line mentions {expect!r}\n{outcome.describe()}"
        assert all(len(line) < 2000 for line in matching), "an error line should be one readable line"
    elif want == "skip":
        assert outcome.code == 0, outcome.describe()
        assert any(
            line.startswith("skipping bad input line: ") and case.expect in line for line in outcome.stderr.splitlines()
        ), outcome.describe()
        assert "bad input lines              1" in outcome.stdout, outcome.describe()
    else:
        assert outcome.code == 0, outcome.describe()


def test_corpus_is_large_and_covers_every_kind():
    assert len(CASES) >= 30
    assert {case.kind for case in CASES} == set(STAGES_BY_KIND)
    assert len({case.name for case in CASES}) == len(CASES)
    print(f"\ncorpus: {len(CASES)} cases, {len(matrix())} (case, stage) runs")


@pytest.mark.parametrize("stage", ["convert", "generate", "judge"])
def test_an_output_path_that_cannot_be_made_is_one_clear_line(stage, tmp_path, tiny_model_dir):
    """The file system refusing an output (here: a folder under /proc) names the path, no traceback."""
    data = CASES[0].write(tmp_path / "in")
    data.write_text(data.read_text(encoding="utf-8").splitlines()[0] + "\n", encoding="utf-8")  # one good record
    bad = Path("/proc/mmsafe-no-such-folder/out.jsonl")
    argv = {
        "convert": ["data", "convert", data, bad],
        "generate": [
            "generate",
            "--model",
            tiny_model_dir,
            "--data",
            data,
            "--out",
            bad,
            "--max-new-tokens",
            2,
            "--device",
            "cpu",
        ],
        "judge": ["judge", "--responses", _one_response(tmp_path), "--out", bad, "--judge", "refusal"],
    }[stage]
    outcome = run_cli(argv)
    assert outcome.code == 1 and "Traceback" not in outcome.stderr, outcome.describe()
    assert any("/proc/mmsafe-no-such-folder" in line for line in outcome.error_lines), outcome.describe()


def _one_response(folder: Path) -> Path:
    from tests.reliability.corpus import response_row

    path = folder / "responses.jsonl"
    path.write_text(json.dumps(response_row("r0")) + "\n", encoding="utf-8")
    return path


SUBPROCESS_CASES = [
    ("malformed-json", "generate"),
    ("image-dotdot-path", "validate"),
    ("config-non-utf8", "build-data"),
]


@pytest.mark.parametrize(
    ("name", "stage"), SUBPROCESS_CASES, ids=[f"{name}-{stage}" for name, stage in SUBPROCESS_CASES]
)
def test_the_installed_command_prints_one_line_and_exits_1(name, stage, tmp_path, tiny_model_dir):
    """The same through a real ``python -m mmsafe`` process: stderr is what a user sees."""
    import os
    import subprocess
    import sys

    case = next(case for case in CASES if case.name == name)
    data = case.write(tmp_path / "in")
    argv = (
        config_argv(stage, data, tmp_path) if case.kind == CONFIG else stage_argv(stage, data, tmp_path, tiny_model_dir)
    )
    env = {**os.environ, "MMSAFE_PROGRESS": "0"}
    finished = subprocess.run(
        [sys.executable, "-m", "mmsafe", *map(str, argv)], capture_output=True, text=True, env=env, timeout=120
    )
    assert finished.returncode == 1, finished.stderr
    assert "Traceback" not in finished.stderr
    assert any(
        case.expect in line
        for line in finished.stderr.splitlines()
        if line.startswith("error: ") or line.count(":") >= 3
    ), finished.stderr
