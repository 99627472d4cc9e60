"""Run one stage of the ``mmsafe`` CLI on one input, in-process, and capture what a user sees.

:func:`run_cli` calls :func:`mmsafe.cli.main` with stdout and stderr captured. An exception
that escapes ``main`` is what a user would see as a traceback, so it is written into the
captured stderr the way Python prints it (with ``Traceback``) and the exit code is 1.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import traceback
from dataclasses import dataclass
from pathlib import Path

import yaml

from mmsafe.cli import main


@dataclass(frozen=True)
class Outcome:
    code: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        """Lines of stderr that report a problem (``error: ...`` or ``file:record:field: ...``)."""
        return [
            line
            for line in self.stderr.splitlines()
            if line.startswith("error: ") or (line.startswith(("/", ".")) and line.count(":") >= 3)
        ]

    def describe(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.stdout[-2000:]}\n--- stderr\n{self.stderr[-4000:]}"


def run_cli(argv: list[str]) -> Outcome:
    stdout, stderr = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(stderr)  # log lines are part of what a user sees
    logging.getLogger().addHandler(handler)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                code = main([str(part) for part in argv])
            except SystemExit as exit_:  # argparse usage errors
                code = exit_.code if isinstance(exit_.code, int) else 1
            except Exception:  # this is the traceback a user would see
                stderr.write(traceback.format_exc())
                code = 1
    finally:
        logging.getLogger().removeHandler(handler)
    return Outcome(code, stdout.getvalue(), stderr.getvalue())


def _write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def train_options(model: Path, data: Path, out: Path) -> dict:
    """A one-step training run of the tiny model (DPO: the records have one rejected response each)."""
    return {
        "model": str(model),
        "data": str(data),
        "output_dir": str(out),
        "loss": "dpo",
        "max_steps": 1,
        "per_device_train_batch_size": 2,
        "save_steps": 1000,
        "dtype": "float32",
        "max_length": 96,
        "reference_cache_dir": str(out / "cache"),
        "trainer_args": {"dataloader_pin_memory": False},
    }


def pipeline_options(model: Path, data: Path, out: Path) -> dict:
    """A pipeline that trains and evaluates on ``data`` itself (no split filters)."""
    return {
        "out": str(out),
        "model": str(model),
        "data": {"train": str(data), "train_split": None, "eval_split": None},
        "blind": {"max_new_tokens": 2, "batch_size": 8},
        "train": {
            "methods": ["bpo"],
            "options": {
                "max_steps": 1,
                "per_device_train_batch_size": 2,
                "dtype": "float32",
                "max_length": 96,
                "save_steps": 1000,
            },
        },
        "generate": {"max_new_tokens": 2, "batch_size": 8, "dtype": "float32", "device": "cpu", "base": False},
    }


def stage_argv(stage: str, data: Path, work: Path, model: Path) -> list:
    """The command line of ``stage`` reading ``data`` (outputs under ``work``)."""
    engine = ["--model", model, "--data", data, "--max-new-tokens", 2, "--batch-size", 4, "--device", "cpu"]
    if stage == "validate":
        return ["data", "validate", data]
    if stage == "convert":
        return ["data", "convert", data, work / "converted.jsonl"]
    if stage == "stats":
        return ["data", "stats", data]
    if stage == "generate":
        return ["generate", *engine, "--out", work / "responses.jsonl"]
    if stage == "blind":
        return ["blind", *engine, "--out", work / "blind.jsonl"]
    if stage == "probe":
        return ["probe", *engine, "--out", work / "probe", "--variants", "multimodal"]
    if stage == "pairwise":
        return [
            "pairwise",
            "--model",
            model,
            "--data",
            data,
            "--out",
            work / "pairwise",
            "--device",
            "cpu",
            "--batch-size",
            4,
        ]
    if stage == "train":
        return ["train", "--config", _write_yaml(work / "train.yaml", train_options(model, data, work / "train"))]
    if stage == "run":
        return ["run", _write_yaml(work / "run.yaml", pipeline_options(model, data, work / "run"))]
    if stage == "build-data":
        return [
            "build-data",
            "--input",
            data,
            "--out",
            work / "built",
            "--images",
            "local",
            "--image-index",
            _image_index(work),
        ]
    if stage == "judge":
        return ["judge", "--responses", data, "--out", work / "verdicts.jsonl", "--judge", "refusal"]
    if stage == "report":
        return ["report", "--verdicts", data, "--out", work / "report", "--resamples", 50]
    raise ValueError(stage)


def config_argv(stage: str, config: Path, work: Path) -> list:
    """``stage`` reading the YAML ``config``."""
    if stage == "train":
        return ["train", "--config", config]
    if stage == "build-data":
        return ["build-data", "--config", config, f"out={json.dumps(str(work / 'built'))}"]
    if stage == "run":
        return ["run", config, f"out={json.dumps(str(work / 'run'))}"]
    raise ValueError(stage)


def _image_index(work: Path) -> Path:
    """An empty local image folder: build-data then finds no image and keeps the dialogue open."""
    folder = work / "index"
    folder.mkdir(parents=True, exist_ok=True)
    return folder
