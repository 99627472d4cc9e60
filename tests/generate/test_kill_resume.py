"""A generation killed with SIGKILL three times and restarted ends exactly like an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmsafe.generate.engine import DecodingParams
from mmsafe.generate.runs import generate_responses
from tests.generate.generate_data import make_records, write_dataset

RECORDS = 200
MAX_NEW_TOKENS = 4


def _complete_lines(path: Path) -> list[dict]:
    """Rows of the output as a reader sees it now (a last line cut short is not a row)."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    return [json.loads(line) for line in text.split("\n")[:-1] if line]


def _start(command: list[str]) -> subprocess.Popen:
    env = {**os.environ, "MMSAFE_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_sigkill_three_times_then_finish(tiny_model_dir, tiny_engine, tmp_path):
    data = write_dataset(tmp_path / "data", make_records(RECORDS))
    out = tmp_path / "responses.jsonl"
    command = [sys.executable, "-m", "mmsafe.cli", "generate", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out),
               "--batch-size", "4", "--max-new-tokens", str(MAX_NEW_TOKENS), "--device", "cpu"]  # fmt: skip
    rng = random.Random(1234)
    for _ in range(3):
        before = len(_complete_lines(out))
        # A seeded random moment after the output has started growing: once this run has
        # written a random number of rows, plus a random fraction of a batch's time.
        target = before + rng.randint(1, 24)
        process = _start(command)
        deadline = time.monotonic() + 120
        while len(_complete_lines(out)) < target:
            assert process.poll() is None, process.stdout.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.05))
        assert process.poll() is None, "the run finished before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        rows = _complete_lines(out)
        ids = [row["id"] for row in rows]
        assert before < len(rows) < RECORDS and len(ids) == len(set(ids))

    finished = subprocess.run(
        command,
        env={**os.environ, "MMSAFE_PROGRESS": "0", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert finished.returncode == 0, finished.stderr
    assert "already done" in finished.stdout

    reference = tmp_path / "uninterrupted.jsonl"
    generate_responses(
        tiny_engine, data, reference, params=DecodingParams(max_new_tokens=MAX_NEW_TOKENS), batch_size=16
    )
    rows = _complete_lines(out)
    assert sorted(row["id"] for row in rows) == [f"rec-{index:04d}" for index in range(RECORDS)]
    assert out.read_text(encoding="utf-8") == reference.read_text(encoding="utf-8")
