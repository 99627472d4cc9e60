import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from mmsafe.config import from_dict
from mmsafe.errors import ConfigError
from mmsafe.pipeline import STAGES, PipelineConfig, load_pipeline_config, run_pipeline, stage_hashes


def _config(out, **changes):
    data = {"out": str(out), "model": "tiny", "data": {"sample": True}}
    data.update(changes)
    return from_dict(PipelineConfig, data)


def test_stage_hashes_chain_through_later_stages_only(tmp_path):
    first = stage_hashes(_config(tmp_path))
    changed = stage_hashes(_config(tmp_path, train={"options": {"beta": 0.2}}))
    before = STAGES[: STAGES.index("train")]
    after = STAGES[STAGES.index("train") :]
    assert all(first[stage] == changed[stage] for stage in before)
    assert all(first[stage] != changed[stage] for stage in after)


def test_exactly_one_source_of_training_data(tmp_path):
    with pytest.raises(ConfigError, match="exactly one source"):
        from_dict(PipelineConfig, {"out": str(tmp_path), "model": "tiny"})
    with pytest.raises(ConfigError, match="exactly one source"):
        from_dict(PipelineConfig, {"out": str(tmp_path), "model": "tiny", "data": {"sample": True, "train": "x.jsonl"}})


def test_unknown_method_and_stage_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.methods"):
        _config(tmp_path, train={"methods": ["ppo"]})
    with pytest.raises(ConfigError, match="--only: expected one of"):
        run_pipeline(_config(tmp_path), only="deploy")


def test_only_needs_the_earlier_stages_done(tmp_path):
    with pytest.raises(ConfigError, match="not done for this config"):
        run_pipeline(_config(tmp_path), only="train", log=lambda _: None)


# A small pipeline: no warm-up, BPO only, few steps, checkpoints every 2 steps.
SMALL = {
    "model": "tiny",
    "data": {"sample": True},
    "blind": {"max_new_tokens": 4, "batch_size": 32},
    "train": {
        "methods": ["bpo"],
        "options": {
            "max_steps": 16,
            "save_steps": 2,
            "save_total_limit": 2,
            "learning_rate": 1.0e-4,
            "per_device_train_batch_size": 4,
            "dtype": "float32",
            "max_length": 128,
        },
    },
    "generate": {"max_new_tokens": 4, "batch_size": 32, "dtype": "float32", "device": "cpu"},
}


def _run_cli(config_path, *extra, timeout=300):
    env = {**os.environ, "MMSAFE_PROGRESS": "0"}
    return subprocess.run(
        [sys.executable, "-m", "mmsafe.cli", "run", str(config_path), *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


@pytest.mark.slow
def test_run_killed_in_training_resumes_from_checkpoint_and_a_finished_run_does_nothing(tmp_path):
    out = tmp_path / "run"
    config_path = tmp_path / "small.yaml"
    config_path.write_text(yaml.safe_dump({"out": str(out), **SMALL}))
    env = {**os.environ, "MMSAFE_PROGRESS": "0"}
    process = subprocess.Popen(
        [sys.executable, "-m", "mmsafe.cli", "run", str(config_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    model_dir = out / "models" / "bpo"
    deadline = time.time() + 240
    try:
        # Kill once a checkpoint is complete (trainer_state.json is written last).
        while time.time() < deadline and not list(model_dir.glob("checkpoint-*/trainer_state.json")):
            assert process.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
    assert not (out / ".stages" / "train.done.json").exists()
    assert (out / ".stages" / "train.started.json").exists()

    resumed = _run_cli(config_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "[prepare] up to date" in resumed.stdout and "[blind] up to date" in resumed.stdout
    assert "[train] running (resuming)" in resumed.stdout
    events = [json.loads(line) for line in (model_dir / "train_log.jsonl").read_text().splitlines()]
    begins = [event["step"] for event in events if event.get("event") == "train_begin"]
    assert len(begins) == 2 and begins[0] == 0 and begins[1] > 0  # the second start is at a checkpoint
    summary = json.loads((model_dir / "train_summary.json").read_text())
    assert summary["global_step"] == 16
    # After the restart only steps past the checkpoint are trained (steps the kill cut
    # off after the checkpoint are redone, the checkpointed ones never).
    second_start = max(index for index, event in enumerate(events) if event.get("event") == "train_begin")
    after_restart = [event["step"] for event in events[second_start:] if "loss" in event]
    assert after_restart and min(after_restart) == begins[1] + 1
    assert after_restart == list(range(begins[1] + 1, 17))
    assert (out / "report" / "summary.json").exists()

    again = _run_cli(config_path)
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stdout
    assert "running" not in again.stdout

    changed = _run_cli(config_path, "generate.max_new_tokens=5")
    assert changed.returncode == 1
    assert "different config" in changed.stderr and "--from generate" in changed.stderr
    assert "Traceback" not in changed.stderr


@pytest.mark.slow
def test_demo_trains_dpo_and_bpo_above_the_base_on_held_out_records(demo_run):
    out, printed = demo_run  # the session's one demo run, shared with tests/test_demo_behaviour.py
    summary = json.loads((out / "report" / "summary.json").read_text())
    rates = {row["model"]: row["summary"]["safe_rate"] for row in summary["results"]}
    assert set(rates) == {"base", "dpo", "bpo"}
    assert all(rate["total"] == 24 for rate in rates.values())  # the held-out test split
    # beside it, over-refusal on the 8 bundled benign prompts, and the plot of one against the other
    over = {row["model"]: row["over_refusal"] for row in summary["results"]}
    assert all(row is not None and row["over_refusal_rate"]["total"] == 8 for row in over.values())
    assert "safety_vs_helpfulness.png" in summary["plots"]
    assert "over-refusal" in printed
    assert rates["dpo"]["rate"] > rates["base"]["rate"]
    assert rates["bpo"]["rate"] > rates["base"]["rate"]
    for model in ("base", "dpo", "bpo"):
        assert f"\n{model} " in printed
    assert "95% interval" in printed and "report.html" in printed
    assert (out / "report" / "report.html").exists()
    config = load_pipeline_config(out / "run_config.yaml")
    assert config.teach.enabled and config.train.methods == ["dpo", "bpo"]
