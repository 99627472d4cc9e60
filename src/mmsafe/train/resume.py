"""Resuming a training run: which checkpoint, and whether it is still the same run.

A checkpoint is only worth continuing under the settings it was made with. When a run
starts fresh it writes ``run_fingerprint.json`` in its output folder: a hash of the data
file and every setting that decides what is optimised and how (objective, schedule, model,
what trains). A later run in that folder compares its own fingerprint with it before the
model loads, and ``resume`` decides:

``auto`` (``true``)
    continue from the newest complete checkpoint when the settings match; refuse with a
    :class:`~mmsafe.errors.ConfigError` listing every changed field when they do not. With
    no complete checkpoint the run starts fresh.
``force``
    continue even though settings changed; the changes are logged as a warning, kept in
    ``run_fingerprint.json`` (``history``) and ``train_summary.json`` (``resume_changes``),
    and the new config is written beside the original as ``train_config.resume-<step>.yaml``.
``never`` (``false``)
    start fresh, in an output folder without checkpoints only: a fresh run among another
    run's ``checkpoint-N`` folders would overwrite some of them, and ``save_total_limit``
    would delete others, so it is refused (nothing is ever deleted).

``train_config.yaml`` is the record of the run: written when it starts fresh, never
rewritten by a resume. An output folder of an older mmsafe (no fingerprint) resumes with
a warning, and the fingerprint of the resuming run is recorded from then on.

A checkpoint counts as complete when its ``trainer_state.json`` (which the Trainer writes
last, and mmsafe writes atomically) reads as JSON with a ``global_step`` and its weights are
there; a newer one that is not is passed over with a warning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmsafe.errors import ConfigError
from mmsafe.fileio import atomic_write_text

logger = logging.getLogger(__name__)

FINGERPRINT_FILE = "run_fingerprint.json"
CONFIG_FILE = "train_config.yaml"
TRAINER_STATE_FILE = "trainer_state.json"
CHECKPOINT_PREFIX = "checkpoint"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR
RESUME_MODES = ("auto", "never", "force")

#: TrainConfig fields a checkpoint is only valid under: the data as read, the objective,
#: the model and what of it trains, the optimizer and its schedule. Operational options
#: (output and cache folders, logging and saving, dtype, forward mode, ...) may change.
FINGERPRINT_FIELDS = (
    "model",
    "revision",
    "split",
    "image_mode",
    "prompt_style",
    "max_length",
    "length_rule",
    "rejected_sources",
    "loss",
    "beta",
    "label_smoothing",
    "loss_type",
    "source_weights",
    "average_logprobs",
    "sft_target",
    "sft_chosen_share",
    "reference",
    "finetune",
    "freeze_vision_tower",
    "train_projector",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "quantization",
    "disable_dropout",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "group_by_length",
    "seed",
    "trainer_args",
)
#: ``trainer_args`` that say how a run is operated, not what it computes (not fingerprinted).
OPERATIONAL_TRAINER_ARGS = (
    "dataloader_",
    "logging_",
    "save_",
    "hub_",
    "push_to_hub",
    "run_name",
    "disable_tqdm",
    "ddp_timeout",
)
#: Names in a checkpoint folder that hold its weights: full (safetensors or bin, sharded or
#: not), a PEFT adapter, FSDP shards, or DeepSpeed's global_step folder.
WEIGHT_PREFIXES = ("model.safetensors", "adapter_model.", "pytorch_model", "global_step")


# ---------------------------------------------------------------- atomic writes


def write_text_atomically(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``.

    A kill or a full disk mid-write leaves the old file (or none), never half of one.
    """
    atomic_write_text(path, text)


def save_trainer_state(state: Any, path: str | Path) -> None:
    """``TrainerState.save_to_json``, written atomically (the same text)."""
    write_text_atomically(path, json.dumps(dataclasses.asdict(state), indent=2, sort_keys=True) + "\n")


def _save_config_atomically(config: Any, path: Path) -> None:
    import yaml

    from mmsafe.config import to_dict

    write_text_atomically(path, yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True))


# ---------------------------------------------------------------- checkpoints


def checkpoint_folders(output_dir: Path) -> list[tuple[int, Path]]:
    """Every ``checkpoint-N`` folder in ``output_dir``, oldest step first."""
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.glob(f"{CHECKPOINT_PREFIX}-*"):
        suffix = path.name[len(CHECKPOINT_PREFIX) + 1 :]
        if path.is_dir() and suffix.isdigit():
            found.append((int(suffix), path))
    return sorted(found)


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint folder ``path`` cannot be resumed from, or None when it can."""
    state_file = path / TRAINER_STATE_FILE
    if not state_file.is_file():
        return f"no {TRAINER_STATE_FILE} (the run stopped while saving it)"
    try:
        text = state_file.read_text(encoding="utf-8")
        if not text.strip():
            return f"{TRAINER_STATE_FILE} is empty (was the disk full?)"
        state = json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        return f"{TRAINER_STATE_FILE} is unreadable ({error})"
    step = state.get("global_step") if isinstance(state, dict) else None
    if not isinstance(step, int) or isinstance(step, bool):
        return f"{TRAINER_STATE_FILE} has no global_step"
    if not any(entry.name.startswith(WEIGHT_PREFIXES) for entry in path.iterdir()):
        return "no model or adapter weights in it"
    return None


def last_complete_checkpoint(output_dir: Path) -> str | None:
    """The newest ``checkpoint-N`` that can be resumed from (see :func:`checkpoint_problem`).

    Newer folders that are incomplete (a kill while saving) or unreadable (an empty
    ``trainer_state.json`` after a full disk) are passed over with a warning.
    """
    for _, path in reversed(checkpoint_folders(Path(output_dir))):
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path)
        logger.warning("ignoring %s: %s", path, problem)
    return None


# ---------------------------------------------------------------- fingerprints


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_hash(data: str, image_root: str | None = None) -> str:
    """What the data is: the sha256 of the file's bytes (streamed), or of a folder's files.

    A folder (parquet shards) is hashed over its files' relative paths and bytes, except
    the images a run writes into it (``image_root``); a Hugging Face Hub id is named as is.
    """
    path = Path(data)
    if path.is_file():
        return f"sha256:{file_sha256(path)}"
    if not path.is_dir():
        return f"hub:{data}"
    skip = Path(image_root).resolve() if image_root is not None else None
    digest = hashlib.sha256()
    for member in sorted(item for item in path.rglob("*") if item.is_file()):
        if skip is not None and member.resolve().is_relative_to(skip):
            continue
        digest.update(member.relative_to(path).as_posix().encode("utf-8") + b"\0")
        digest.update(file_sha256(member).encode("ascii"))
    return f"sha256:{digest.hexdigest()}"


def run_fingerprint(config: Any, image_root: str) -> dict[str, Any]:
    """The settings of ``config`` a checkpoint depends on, as plain JSON values."""
    settings: dict[str, Any] = {
        "data": data_hash(config.data, image_root),
        "image_root": str(Path(image_root).resolve()),
    }
    for name in FINGERPRINT_FIELDS:
        if hasattr(config, name):
            settings[name] = getattr(config, name)
    settings["trainer_args"] = {
        key: value for key, value in sorted(config.trainer_args.items()) if not key.startswith(OPERATIONAL_TRAINER_ARGS)
    }
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def read_fingerprint(output_dir: Path) -> dict[str, Any] | None:
    path = output_dir / FINGERPRINT_FILE
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        logger.warning("ignoring %s: unreadable (%s)", path, error)
        return None
    if not isinstance(saved, dict) or not isinstance(saved.get("settings"), dict):
        logger.warning("ignoring %s: no settings in it", path)
        return None
    return saved


def _show(name: str, value: Any) -> str:
    if name == "data" and isinstance(value, str) and value.startswith("sha256:"):
        return value[: len("sha256:") + 12]  # enough to tell two files apart
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def fingerprint_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``field: old -> new`` for every setting recorded in both that differs."""
    return [
        f"{name}: {_show(name, saved[name])} -> {_show(name, value)}"
        for name, value in current.items()
        if name in saved and saved[name] != value
    ]


# ---------------------------------------------------------------- the decision


@dataclass
class ResumePlan:
    """What a run does with its output folder: start fresh, or continue ``checkpoint``."""

    checkpoint: str | None
    fingerprint: dict[str, Any]
    changes: list[str] = field(default_factory=list)  # settings changed since the run started (force)
    previous: dict[str, Any] | None = None  # the run_fingerprint.json found, if any


def plan_resume(config: Any, output_dir: Path, *, image_root: str) -> ResumePlan:
    """Decide, before the model loads, whether this run continues a checkpoint (see the module docstring).

    ``image_root``: the folder the run reads images from (part of the fingerprint).
    """
    current = run_fingerprint(config, image_root)
    mode = config.resume
    if mode not in RESUME_MODES:  # TrainConfig normalises true / false
        raise ConfigError(f"resume: expected one of {', '.join(RESUME_MODES)}, true or false, got {mode!r}")
    if mode == "never":
        folders = checkpoint_folders(output_dir)
        if folders:
            names = ", ".join(path.name for _, path in folders)
            raise ConfigError(
                f"resume: never: {output_dir} already holds checkpoints ({names}); a fresh run there would overwrite some of them "
                "and its save_total_limit would delete others. Use a new output_dir (or resume: auto to continue them)"
            )
        return ResumePlan(None, current)
    checkpoint = last_complete_checkpoint(output_dir)
    saved = read_fingerprint(output_dir)
    if checkpoint is None:
        if saved is not None and fingerprint_changes(saved["settings"], current):
            logger.warning(
                "%s: no complete checkpoint to continue; starting fresh with other settings than the run recorded there",
                output_dir,
            )
        return ResumePlan(None, current)
    if saved is None:
        logger.warning(
            "%s has no readable %s (a run of an older mmsafe): resuming from %s without checking that the data and settings are the same",
            output_dir, FINGERPRINT_FILE, checkpoint,
        )  # fmt: skip
        return ResumePlan(checkpoint, current)
    changes = fingerprint_changes(saved["settings"], current)
    if changes and mode == "auto":
        listed = "\n".join(f"  {change}" for change in changes)
        raise ConfigError(
            f"resume: {output_dir} holds checkpoints of a run made with other settings ({checkpoint} is the newest); changed since it started:\n{listed}\n"
            "use a new output_dir to start over, or resume=force to continue that checkpoint with the new settings"
        )
    if changes:
        logger.warning(
            "resume: force: continuing %s although these settings changed since the run started: %s",
            checkpoint,
            "; ".join(changes),
        )
    return ResumePlan(checkpoint, current, changes, saved)


def record_run_start(config: Any, output_dir: Path, plan: ResumePlan) -> None:
    """Write the record of the run (main process only): fingerprint and config, see the module docstring."""
    config_file = output_dir / CONFIG_FILE
    if plan.checkpoint is None:
        fingerprint = {"format": 1, "data_file": str(config.data), "settings": plan.fingerprint, "history": []}
        write_text_atomically(output_dir / FINGERPRINT_FILE, json.dumps(fingerprint, indent=2) + "\n")
        _save_config_atomically(config, config_file)
        return
    name = Path(plan.checkpoint).name
    if plan.previous is None or plan.changes:
        # The checkpoints from now on are made with these settings: a later resume is checked against them.
        history = list((plan.previous or {}).get("history", []))
        history.append(
            {"resumed_from": name, "changes": plan.changes}
            if plan.previous is not None
            else {"resumed_from": name, "note": "no fingerprint before"}
        )
        fingerprint = {"format": 1, "data_file": str(config.data), "settings": plan.fingerprint, "history": history}
        write_text_atomically(output_dir / FINGERPRINT_FILE, json.dumps(fingerprint, indent=2) + "\n")
    if not config_file.is_file():
        _save_config_atomically(config, config_file)  # a run of an older mmsafe, killed before its end wrote it
    elif _config_differs(config_file, config):
        _save_config_atomically(config, output_dir / f"train_config.resume-{name.rsplit('-', 1)[-1]}.yaml")


def _config_differs(path: Path, config: Any) -> bool:
    import yaml

    from mmsafe.config import load_yaml, to_dict

    try:
        saved = load_yaml(path.read_text(encoding="utf-8"), source=str(path))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ConfigError):
        return True
    return saved != yaml.safe_load(yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True))
