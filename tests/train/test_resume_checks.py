"""Resuming only the same run: the run fingerprint, ``resume`` modes, unreadable checkpoints, atomic trainer state."""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import pytest
import yaml

from mmsafe.cli import main
from mmsafe.config import from_dict
from mmsafe.errors import ConfigError
from mmsafe.train.config import TrainConfig
from mmsafe.train.resume import (
    FINGERPRINT_FILE,
    last_complete_checkpoint,
    plan_resume,
    record_run_start,
    run_fingerprint,
    save_trainer_state,
)
from mmsafe.train.trainer import CONFIG_FILE, SUMMARY_FILE, train


def options(tmp_path: Path, model: Path, data: Path, image_root: Path, **extra) -> dict:
    """Two quick steps, a checkpoint after each."""
    values = {
        "model": str(model),
        "data": str(data),
        "image_root": str(image_root),
        "output_dir": str(tmp_path / "out"),
        "split": "train",
        "learning_rate": 1e-3,
        "warmup_steps": 0,
        "max_steps": 2,
        "save_steps": 1,
        "per_device_train_batch_size": 2,
        "exactness_check_examples": 0,
        "reference_cache_dir": str(tmp_path / "cache"),
        "dtype": "float32",
        "trainer_args": {"dataloader_pin_memory": False},
    }
    values.update(extra)
    return values


def fake_checkpoint(
    output_dir: Path, step: int, *, state: str | None = None, weights: str | None = "model.safetensors"
) -> Path:
    """A checkpoint folder as the Trainer leaves it (the weights' bytes do not matter here)."""
    folder = output_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    if weights is not None:
        (folder / weights).write_bytes(b"weights")
    (folder / "trainer_state.json").write_text(
        json.dumps({"global_step": step}) if state is None else state, encoding="utf-8"
    )
    return folder


def test_resume_refuses_changed_settings_and_force_continues(
    tmp_path, tiny_model_dir, small_records, monkeypatch, caplog, capsys
):
    data = tmp_path / "records.jsonl"
    data.write_bytes(small_records.read_bytes())
    values = options(tmp_path, tiny_model_dir, data, small_records.parent)
    out = tmp_path / "out"

    # A fresh run records its fingerprint and config; every trainer_state.json goes through
    # the atomic writer (the Trainer's in-place one would fail the run).
    atomic = []

    def in_place(self, path):
        raise AssertionError(f"trainer_state.json written in place: {path}")

    def recording(state, path):
        atomic.append(Path(path))
        save_trainer_state(state, path)

    with monkeypatch.context() as patch:
        patch.setattr("transformers.TrainerState.save_to_json", in_place)
        patch.setattr("mmsafe.train.hf_trainer.save_trainer_state", recording)
        first = train(TrainConfig(**values))
    assert first.global_step == 2 and first.resumed_from is None
    assert atomic == [out / "checkpoint-1" / "trainer_state.json", out / "checkpoint-2" / "trainer_state.json"]
    assert not list(out.rglob(".*.tmp"))
    recorded = json.loads((out / FINGERPRINT_FILE).read_text(encoding="utf-8"))
    assert recorded["settings"]["beta"] == 0.1 and recorded["settings"]["data"].startswith("sha256:")
    original_config = (out / CONFIG_FILE).read_bytes()

    # Refused before the model loads: a changed beta (through the CLI: a message, no traceback) ...
    with monkeypatch.context() as patch:
        patch.setattr(
            "mmsafe.train.trainer.load_policy",
            lambda *args, **kwargs: pytest.fail("the model loaded before the resume was refused"),
        )
        config_file = tmp_path / "run.yaml"
        config_file.write_text(yaml.safe_dump(values), encoding="utf-8")
        assert main(["train", "--config", str(config_file), "beta=0.2", "lr_scheduler_type=linear"]) == 1
        error = capsys.readouterr().err
        assert "beta: 0.1 -> 0.2" in error and "lr_scheduler_type: cosine -> linear" in error
        assert "resume=force" in error and "Traceback" not in error
        # ... changed data ...
        data.write_text("".join(data.read_text(encoding="utf-8").splitlines(keepends=True)[:-1]), encoding="utf-8")
        with pytest.raises(ConfigError, match=r"data: sha256:\w{12} -> sha256:\w{12}"):
            train(TrainConfig(**values))
        data.write_bytes(small_records.read_bytes())
        # ... and a fresh start among the run's checkpoints.
        with pytest.raises(ConfigError, match=r"already holds checkpoints .*new output_dir"):
            train(TrainConfig(**{**values, "resume": False}))
    assert (out / CONFIG_FILE).read_bytes() == original_config  # the record of the run is untouched
    assert not list(out.glob("train_config.resume-*.yaml"))

    # The same settings resume, past a newest checkpoint whose trainer_state.json a full disk left empty.
    (out / "checkpoint-2" / "trainer_state.json").write_text("", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="mmsafe"):
        again = train(TrainConfig(**values))
    assert again.resumed_from == str(out / "checkpoint-1") and again.global_step == 2
    assert "checkpoint-2: trainer_state.json is empty" in caplog.text
    assert (
        json.loads((out / "checkpoint-2" / "trainer_state.json").read_text(encoding="utf-8"))["global_step"] == 2
    )  # saved anew
    assert (out / CONFIG_FILE).read_bytes() == original_config and not list(out.glob("train_config.resume-*.yaml"))

    # resume: force continues with the new settings, keeps the original config and records the changes.
    forced = train(TrainConfig(**{**values, "beta": 0.2, "max_steps": 3, "resume": "force"}))
    assert forced.resumed_from == str(out / "checkpoint-2") and forced.global_step == 3
    assert set(forced.resume_changes) == {"beta: 0.1 -> 0.2", "max_steps: 2 -> 3"}
    assert json.loads((out / SUMMARY_FILE).read_text(encoding="utf-8"))["resume_changes"] == forced.resume_changes
    assert (out / CONFIG_FILE).read_bytes() == original_config
    beside = yaml.safe_load((out / "train_config.resume-2.yaml").read_text(encoding="utf-8"))
    assert (beside["beta"], beside["max_steps"], beside["resume"]) == (0.2, 3, "force")
    recorded = json.loads((out / FINGERPRINT_FILE).read_text(encoding="utf-8"))
    assert recorded["settings"]["beta"] == 0.2  # later checkpoints are checked against the new settings
    assert recorded["history"] == [{"resumed_from": "checkpoint-2", "changes": forced.resume_changes}]


def test_last_complete_checkpoint_passes_over_unreadable_newer_ones(tmp_path, caplog):
    out = tmp_path / "out"
    fake_checkpoint(out, 2)
    fake_checkpoint(out, 3, weights="adapter_model.safetensors")
    fake_checkpoint(out, 4, weights=None)
    fake_checkpoint(out, 5, state=json.dumps({"epoch": 1.0}))
    fake_checkpoint(out, 6, state='{"global_step": 6, "log_hist')
    fake_checkpoint(out, 7, state="")
    (fake_checkpoint(out, 8) / "trainer_state.json").unlink()
    (out / "checkpoint-last").mkdir()
    with caplog.at_level(logging.WARNING, logger="mmsafe"):
        assert last_complete_checkpoint(out) == str(out / "checkpoint-3")
    for step, problem in [
        (8, "no trainer_state.json"),
        (7, "is empty"),
        (6, "unreadable"),
        (5, "no global_step"),
        (4, "no model or adapter weights"),
    ]:
        assert f"checkpoint-{step}: " in caplog.text and problem in caplog.text
    assert last_complete_checkpoint(tmp_path / "missing") is None


def test_plan_resume_checks_the_fingerprint_before_anything_loads(tmp_path, small_records, caplog):
    out = tmp_path / "out"
    values = {"model": "some/model", "data": str(small_records), "output_dir": str(out)}
    config = TrainConfig(**values)
    root = str(small_records.parent)
    # No checkpoint: a fresh run, which records its fingerprint and config.
    plan = plan_resume(config, out, image_root=root)
    assert plan.checkpoint is None
    out.mkdir()
    record_run_start(config, out, plan)
    assert json.loads((out / FINGERPRINT_FILE).read_text())["settings"] == run_fingerprint(config, root)
    fake_checkpoint(out, 4)
    assert plan_resume(config, out, image_root=root).checkpoint == str(out / "checkpoint-4")
    # Every changed field is listed, one per line; operational options are not compared.
    changed = TrainConfig(
        **values,
        beta=0.3,
        learning_rate=2e-6,
        rejected_sources=["human"],
        save_steps=7,
        trainer_args={"weight_decay": 0.1, "dataloader_num_workers": 2},
    )
    with pytest.raises(ConfigError) as refused:
        plan_resume(changed, out, image_root=root)
    lines = str(refused.value).splitlines()
    assert {
        "  beta: 0.1 -> 0.3",
        "  learning_rate: 1e-06 -> 2e-06",
        '  rejected_sources: null -> ["human"]',
        '  trainer_args: {} -> {"weight_decay": 0.1}',
    } <= set(lines)
    assert not any("save_steps" in line or "image_root" in line for line in lines)
    assert plan_resume(TrainConfig(**values, save_steps=7), out, image_root=root).changes == []
    # An output folder of an older mmsafe (no fingerprint) resumes, with a warning.
    (out / FINGERPRINT_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="mmsafe"):
        legacy = plan_resume(changed, out, image_root=root)
    assert legacy.checkpoint == str(out / "checkpoint-4") and "without checking" in caplog.text


def test_resume_option_takes_modes_and_the_old_booleans():
    base = {"model": "m", "data": "d", "output_dir": "o"}
    assert [
        from_dict(TrainConfig, {**base, "resume": value}).resume for value in (True, False, "auto", "never", "force")
    ] == ["auto", "never", "auto", "never", "force"]
    assert TrainConfig(**base).resume == "auto"
    with pytest.raises(ConfigError, match="resume: expected auto, never, force, true or false, got 'always'"):
        from_dict(TrainConfig, {**base, "resume": "always"})


def test_trainer_state_write_that_fails_leaves_the_previous_file(tmp_path, monkeypatch):
    from transformers import TrainerState

    path = tmp_path / "trainer_state.json"
    save_trainer_state(TrainerState(global_step=3), path)
    assert json.loads(path.read_text())["global_step"] == 3
    before = path.read_bytes()

    def full_disk(descriptor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("mmsafe.fileio.os.fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_trainer_state(TrainerState(global_step=4), path)
    assert path.read_bytes() == before
    assert [item.name for item in tmp_path.iterdir()] == ["trainer_state.json"]  # no temporary file left
