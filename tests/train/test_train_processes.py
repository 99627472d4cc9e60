"""Training as separate processes: DDP over gloo with accelerate, and SIGKILL then resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mmsafe.train.trainer import LOG_FILE, SUMMARY_FILE

REPO = Path(__file__).resolve().parents[2]
CPU_DDP_CONFIG = REPO / "configs" / "accelerate" / "cpu_ddp.yaml"


def write_config(path: Path, **options) -> Path:
    path.write_text(yaml.safe_dump(options), encoding="utf-8")
    return path


def base_options(tmp_path: Path, model: Path, data: Path, output: str, **extra) -> dict:
    values = {
        "model": str(model),
        "data": str(data),
        "output_dir": str(tmp_path / output),
        "loss": "bpo",
        "learning_rate": 1e-3,
        "warmup_steps": 0,
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "save_steps": 1000,
        "dtype": "float32",
        "reference_cache_dir": str(tmp_path / "cache"),
        "trainer_args": {"dataloader_pin_memory": False},
    }
    values.update(extra)
    return values


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"MMSAFE_PROGRESS": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    return env


def logged(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / LOG_FILE).read_text(encoding="utf-8").splitlines()]


def step_logs(output_dir: Path) -> list[dict]:
    return [entry for entry in logged(output_dir) if "loss" in entry]


@pytest.mark.slow
@pytest.mark.parametrize("forward_mode", ["auto", "prompt-cache"])
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(
    tmp_path, tiny_model_dir, small_records, forward_mode
):
    """prompt-cache runs two forwards per example before one backward: DDP must still average every gradient."""
    single = write_config(
        tmp_path / "single.yaml",
        **base_options(tmp_path, tiny_model_dir, small_records, "single", forward_mode=forward_mode),
    )
    # Two processes x 1 example = the single run's batch of 2 (the sampler deals the same order).
    ddp = write_config(
        tmp_path / "ddp.yaml",
        **base_options(
            tmp_path, tiny_model_dir, small_records, "ddp", per_device_train_batch_size=1, forward_mode=forward_mode
        ),
    )
    subprocess.run(
        [sys.executable, "-m", "mmsafe", "train", "--config", str(single)],
        check=True,
        env=environment(),
        cwd=tmp_path,
        capture_output=True,
        timeout=300,
    )
    # Port 0: the launcher picks a free port, so a port still held by an earlier run cannot abort this one.
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CPU_DDP_CONFIG),
        "--main_process_port",
        "0",
        "-m",
        "mmsafe",
        "train",
        "--config",
        str(ddp),
    ]
    finished = subprocess.run(launch, env=environment(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    one, two = step_logs(tmp_path / "single"), step_logs(tmp_path / "ddp")
    assert [entry["step"] for entry in two] == [1, 2]
    assert two[0]["loss"] == pytest.approx(one[0]["loss"], abs=1e-5)
    # The loss at step 1 is log 2 whatever the data (policy = reference); the gradient norm
    # and the loss after the first update show that the two processes averaged their gradients.
    assert two[0]["grad_norm"] == pytest.approx(one[0]["grad_norm"], rel=1e-4)
    assert two[1]["loss"] == pytest.approx(one[1]["loss"], abs=1e-5)
    summary = json.loads((tmp_path / "ddp" / SUMMARY_FILE).read_text())
    assert summary["global_step"] == 2
    if forward_mode != "auto":
        assert summary["forward_mode"] == forward_mode


@pytest.mark.slow
def test_killed_run_resumes_from_its_last_checkpoint(tmp_path, tiny_model_dir, small_records):
    total_steps = 40
    config = write_config(
        tmp_path / "run.yaml",
        **base_options(
            tmp_path, tiny_model_dir, small_records, "out", max_steps=total_steps, save_steps=4, save_total_limit=3
        ),
    )
    output = tmp_path / "out"
    command = [sys.executable, "-m", "mmsafe", "train", "--config", str(config)]
    process = subprocess.Popen(
        command, env=environment(), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 240
        while not (output / "checkpoint-8" / "trainer_state.json").exists():
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint-8 within 240 s"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not (output / SUMMARY_FILE).exists()
    completed = sorted(
        int(path.name.split("-")[1]) for path in output.glob("checkpoint-*") if (path / "trainer_state.json").exists()
    )
    last = completed[-1]
    assert 8 <= last < total_steps

    finished = subprocess.run(command, env=environment(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    summary = json.loads((output / SUMMARY_FILE).read_text())
    assert summary["global_step"] == total_steps
    assert summary["resumed_from"].endswith(f"checkpoint-{last}")
    assert summary["reference_forwards"] == 0  # the first run cached them
    entries = logged(output)
    begins = [index for index, entry in enumerate(entries) if entry.get("event") == "train_begin"]
    assert len(begins) == 2 and entries[begins[1]]["step"] == last
    resumed_steps = [entry["step"] for entry in entries[begins[1] :] if "loss" in entry]
    assert resumed_steps == list(range(last + 1, total_steps + 1))  # nothing repeated, nothing missed


@pytest.mark.slow
def test_two_process_reference_precompute_is_sharded_and_equals_one_process(tmp_path, tiny_model_dir, small_records):
    """Each rank scores half the examples; the merged cache equals the one-process cache."""
    single = write_config(
        tmp_path / "single.yaml",
        **base_options(
            tmp_path,
            tiny_model_dir,
            small_records,
            "single",
            max_steps=1,
            reference_cache_dir=str(tmp_path / "cache-1"),
        ),
    )
    ddp = write_config(
        tmp_path / "ddp.yaml",
        **base_options(
            tmp_path,
            tiny_model_dir,
            small_records,
            "ddp",
            max_steps=1,
            per_device_train_batch_size=1,
            reference_cache_dir=str(tmp_path / "cache-2"),
        ),
    )
    subprocess.run(
        [sys.executable, "-m", "mmsafe", "train", "--config", str(single)],
        check=True,
        env=environment(),
        cwd=tmp_path,
        capture_output=True,
        timeout=300,
    )
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CPU_DDP_CONFIG),
        "--main_process_port",
        "0",
        "-m",
        "mmsafe",
        "train",
        "--config",
        str(ddp),
    ]
    finished = subprocess.run(launch, env=environment(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]

    def cached(folder: Path) -> dict:
        caches = [
            data
            for data in (json.loads(path.read_text()) for path in folder.rglob("*.json"))
            if isinstance(data, dict) and "logps" in data
        ]
        assert len(caches) == 1
        return caches[0]["logps"]

    one, two = cached(tmp_path / "cache-1"), cached(tmp_path / "cache-2")
    assert one.keys() == two.keys() and len(one) == 12
    for record_id, values in one.items():
        assert two[record_id] == pytest.approx(values, abs=1e-4), record_id
    # Rank 0 ran the reference over its half only: 6 examples at batch 1 (one process: 12 at batch 2).
    assert json.loads((tmp_path / "ddp" / SUMMARY_FILE).read_text())["reference_forwards"] == 6
    assert json.loads((tmp_path / "single" / SUMMARY_FILE).read_text())["reference_forwards"] == 6
    assert "computing reference log-probs for 6 of 12 examples on this process" in finished.stderr
