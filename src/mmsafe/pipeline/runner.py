"""Running the stages in order: markers, hashes, the files each stage wrote, ``--from``."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mmsafe.config import save_config
from mmsafe.data.outputs import OutputLock, Removal, Snapshot, created_since, remove_created, snapshot
from mmsafe.errors import ConfigError, DataError
from mmsafe.pipeline.config import STAGES, PipelineConfig
from mmsafe.pipeline.paths import Paths
from mmsafe.pipeline.stages import STAGE_FUNCTIONS, stage_configs

#: Stages that may run in several processes (``accelerate launch ... run --only STAGE``).
PARALLEL_STAGES = ("blind", "train", "generate")

#: How stage hashes are computed, noted in every marker. 1 (markers without the note): a
#: hand-kept list of config sections per stage; 2: each stage's resolved config.
HASH_SCHEME = 2

_OUT = "<out>"


def _hashable(value: Any, out: str) -> Any:
    """``value`` as plain data for hashing: dataclass fields at their default left out (so
    an mmsafe that adds an option keeps finished runs valid), paths under ``out`` written
    relative to it (so a run folder that is moved stays valid)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        data = {}
        for item in dataclasses.fields(value):
            current = getattr(value, item.name)
            if item.default is not dataclasses.MISSING and current == item.default:
                continue
            if item.default_factory is not dataclasses.MISSING and current == item.default_factory():
                continue
            data[item.name] = _hashable(current, out)
        return data
    if isinstance(value, dict):
        return {str(key): _hashable(item, out) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_hashable(item, out) for item in value]
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str) and (value == out or value.startswith(out + os.sep)):
        return _OUT + value[len(out) :]
    return value


def stage_hashes(config: PipelineConfig) -> dict[str, str]:
    """A hash per stage of its resolved config, chained through the stages before it.

    What each stage's hash depends on is what the stage runs with (see
    :mod:`mmsafe.pipeline.stages`): prepare the sample folder and the tiny model's seed;
    build-data the BuildConfig; teach its TrainConfig; blind the base model, the training
    records, mode, decoding, and generate.dtype / device / prompt_style / image_mode; train
    a TrainConfig per method; generate each model's engine settings and the decoding; judge
    each judge's name and options; report the files it reads and the seed. A stage that is
    off hashes as None, so its options do not matter.
    """
    paths = Paths(Path(config.out))
    out = str(paths.out)
    hashes = {}
    previous = ""
    for stage, resolved in stage_configs(config, paths).items():
        payload = json.dumps(
            {"previous": previous, "stage": stage, "config": _hashable(resolved, out)}, sort_keys=True, default=str
        )
        previous = hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]
        hashes[stage] = previous
    return hashes


# ---------------------------------------------------------------- the runner


@dataclass
class StageOutcome:
    stage: str
    status: Literal["ran", "skipped"]
    seconds: float
    message: str


@dataclass
class PipelineResult:
    out: Path
    outcomes: list[StageOutcome] = field(default_factory=list)

    @property
    def ran(self) -> list[str]:
        return [outcome.stage for outcome in self.outcomes if outcome.status == "ran"]


@dataclass(frozen=True)
class Marker:
    """A stage's ``started`` or ``done`` marker: the hash it ran with, under which scheme."""

    hash: str
    scheme: int


def _marker(paths: Paths, stage: str, kind: str) -> Path:
    return paths.stages / f"{stage}.{kind}.json"


def _read_marker(path: Path) -> Marker | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        scheme = data.get("scheme", 1)
        if not isinstance(data["hash"], str) or not isinstance(scheme, int):
            raise TypeError
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise DataError("stage marker is corrupt; remove it to redo the stage", file=str(path)) from None
    return Marker(data["hash"], scheme)


def _write_marker(path: Path, stage_hash: str, message: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    data = {"hash": stage_hash, "scheme": HASH_SCHEME, "message": message, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    temporary.write_text(json.dumps(data) + "\n", encoding="utf-8")
    temporary.replace(path)


def _mismatch(stage: str, paths: Paths, markers: list[Marker | None]) -> str:
    """Why the outputs of ``stage`` cannot be used with this config, and what to do."""
    if any(marker is not None and marker.scheme < HASH_SCHEME for marker in markers):
        return (
            f"stage {stage!r}: {paths.out} holds outputs made by an older mmsafe, whose stage hashes are computed differently, "
            f"so whether they match this config cannot be told; rerun with --from {stage} to redo it and the stages after it, or use a new 'out' folder"
        )
    return (
        f"stage {stage!r}: {paths.out} holds outputs made with a different config (this stage or an earlier one changed); "
        f"use a new 'out' folder, or rerun with --from {stage} to redo it and the stages after it"
    )


def stage_status(config: PipelineConfig, stage: str) -> str:
    """What a run would do with ``stage`` now (for ``run --dry-run``); reads the markers, writes nothing."""
    paths = Paths(Path(config.out))
    stage_hash = stage_hashes(config)[stage]
    done = _read_marker(_marker(paths, stage, "done"))
    if done is not None and done.hash == stage_hash:
        return "up to date"
    started = _read_marker(_marker(paths, stage, "started"))
    if done is not None or (started is not None and started.hash != stage_hash):
        return f"would be refused: {_mismatch(stage, paths, [done, started])}"
    return "would resume" if started is not None else "would run"


# ---------------------------------------------------------------- what each stage wrote


def _relative(paths: Paths, locations: list[Path]) -> list[str]:
    return [location.relative_to(paths.out).as_posix() for location in locations]


def _in_scope(name: str, locations: list[str]) -> bool:
    """Is ``name`` at or under one of ``locations``, or a folder above one (``models`` of
    ``models/tiny``, which the stage may have made too)?"""
    return any(
        name == location or name.startswith(location + "/") or location.startswith(name + "/") for location in locations
    )


def _stage_snapshot(paths: Paths, stage: str, found: Snapshot | None = None) -> Snapshot:
    locations = _relative(paths, paths.stage_locations(stage))
    found = found if found is not None else snapshot(paths.out, exclude=(paths.stages.name,))
    return Snapshot(
        {name: stamp for name, stamp in found.files.items() if _in_scope(name, locations)},
        {name for name in found.dirs if _in_scope(name, locations)},
    )


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    temporary.replace(path)


def _read_manifest(paths: Paths, stage: str) -> dict[str, Any] | None:
    path = paths.manifest(stage)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        before = data["before"]
        if not (
            isinstance(before["files"], list)
            and isinstance(before["dirs"], list)
            and isinstance(data["complete"], bool)
        ):
            raise TypeError
        if data["complete"] and not (isinstance(data["files"], dict) and isinstance(data["dirs"], list)):
            raise TypeError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise DataError(
            f"the list of files stage {stage!r} wrote is corrupt; remove it (and that stage's outputs, if they are in the way) to redo the stage",
            file=str(path),
        ) from None
    return data


def _begin_manifest(paths: Paths, stage: str, *, resuming: bool) -> None:
    """Note what the stage's locations hold before it runs: none of that is the stage's.

    A resumed stage keeps the note of its first attempt, so files an interrupted attempt
    created still count as the stage's own.
    """
    if resuming and _read_manifest(paths, stage) is not None:
        return
    before = _stage_snapshot(paths, stage)
    _write_json(
        paths.manifest(stage),
        {"stage": stage, "complete": False, "before": {"files": sorted(before.files), "dirs": sorted(before.dirs)}},
    )


def _finish_manifest(paths: Paths, stage: str) -> None:
    """List the files (with size and modification time) and folders the stage created."""
    data = _read_manifest(paths, stage) or {"stage": stage, "before": {"files": [], "dirs": []}}
    created = _stage_created(paths, stage, data)
    _write_json(paths.manifest(stage), {**data, "complete": True, "files": created.files, "dirs": sorted(created.dirs)})


def _stage_created(paths: Paths, stage: str, data: dict[str, Any]) -> Snapshot:
    now = created_since(paths.out, data["before"]["files"], data["before"]["dirs"], exclude=(paths.stages.name,))
    return _stage_snapshot(paths, stage, now)


def remove_stage_outputs(paths: Paths, stage: str, log: Callable[[str], None] = print) -> Removal:
    """Remove what ``stage`` wrote (for ``--from``): exactly the files in its list that are
    still as it wrote them, then the folders it created once empty. Anything else stays,
    and each thing left in place that the stage had made is logged."""
    data = _read_manifest(paths, stage)
    if data is None:
        if any(_marker(paths, stage, kind).exists() for kind in ("done", "started")):
            locations = ", ".join(str(location) for location in paths.stage_locations(stage))
            log(
                f"[{stage}] no list of the files this stage wrote (made by an older mmsafe): nothing removed; remove its outputs in {locations} yourself if the redo should not resume them"
            )
        return Removal()
    if data["complete"]:
        files: dict[str, list[int] | None] = {name: stamp for name, stamp in data["files"].items()}
        dirs = list(data["dirs"])
    else:  # interrupted: what appeared in its locations since it started (no stamps were taken)
        created = _stage_created(paths, stage, data)
        files, dirs = dict.fromkeys(created.files), sorted(created.dirs)
    removal = remove_created(paths.out, files, dirs)
    for item in removal.left:
        log(f"[{stage}] left in place: {item}")
    if removal.removed:
        log(f"[{stage}] removed {len(removal.removed)} files and folders it wrote")
    paths.manifest(stage).unlink()
    return removal


def run_pipeline(
    config: PipelineConfig,
    *,
    from_stage: str | None = None,
    only: str | None = None,
    log: Callable[[str], None] = print,
) -> PipelineResult:
    """Run the stages of ``config`` in order, skipping those already done with the same config.

    Args:
        from_stage: redo this stage and every later one (the files they wrote are removed
            first; nothing else is).
        only: run just this stage (the stages before it must be done).

    Every stage's config is resolved (and so checked) before anything is written. One run
    at a time per ``out``: the first process holds ``out/.stages/run.lock`` until it ends,
    and a second is refused with a message naming it.
    """
    for name, value in (("--from", from_stage), ("--only", only)):
        if value is not None and value not in STAGES:
            raise ConfigError(f"{name}: expected one of {', '.join(STAGES)}, got {value!r}")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    main_process = int(os.environ.get("RANK", "0")) == 0
    if world_size > 1 and (only not in PARALLEL_STAGES or from_stage is not None):
        raise ConfigError(
            f"{world_size} processes were launched: run one of the stages {', '.join(PARALLEL_STAGES)} with --only under a launcher, and the others in one process"
        )
    hashes = stage_hashes(config)
    paths = Paths(Path(config.out))
    paths.out.mkdir(parents=True, exist_ok=True)
    # Under a launcher the ranks of one run share the folder: only the first holds the lock.
    lock = OutputLock(paths.out, lock_file=paths.stages / "run.lock") if main_process else None
    if lock is not None:
        lock.acquire()
    try:
        return _run_stages(config, paths, hashes, from_stage=from_stage, only=only, main_process=main_process, log=log)
    finally:
        if lock is not None:
            lock.release()


def _run_stages(
    config: PipelineConfig,
    paths: Paths,
    hashes: dict[str, str],
    *,
    from_stage: str | None,
    only: str | None,
    main_process: bool,
    log: Callable[[str], None],
) -> PipelineResult:
    if main_process:
        save_config(config, paths.out / "run_config.yaml")
    if from_stage is not None:
        for stage in STAGES[STAGES.index(from_stage) :]:
            remove_stage_outputs(paths, stage, log)
            for kind in ("done", "started"):
                _marker(paths, stage, kind).unlink(missing_ok=True)

    result = PipelineResult(paths.out)
    selected = [only] if only is not None else list(STAGES)
    for stage in STAGES:
        done = _read_marker(_marker(paths, stage, "done"))
        is_done = done is not None and done.hash == hashes[stage]
        if stage not in selected:
            if only is not None and STAGES.index(stage) < STAGES.index(only) and not is_done:
                if done is not None and done.scheme < HASH_SCHEME:
                    raise ConfigError(f"--only {only}: {_mismatch(stage, paths, [done])}")
                raise ConfigError(
                    f"--only {only}: the earlier stage {stage!r} is not done for this config; run without --only first"
                )
            continue
        if is_done:
            result.outcomes.append(StageOutcome(stage, "skipped", 0.0, "up to date"))
            log(f"[{stage}] up to date, skipped")
            continue
        started = _read_marker(_marker(paths, stage, "started"))
        if done is not None or (started is not None and started.hash != hashes[stage]):
            raise ConfigError(_mismatch(stage, paths, [done, started]))
        if main_process:
            _begin_manifest(paths, stage, resuming=started is not None)
            _write_marker(_marker(paths, stage, "started"), hashes[stage])
        log(f"[{stage}] running" + (" (resuming)" if started is not None else ""))
        began = time.perf_counter()
        message = STAGE_FUNCTIONS[stage](config, paths)
        seconds = time.perf_counter() - began
        if main_process:
            _finish_manifest(paths, stage)
            _write_marker(_marker(paths, stage, "done"), hashes[stage], message)
            _marker(paths, stage, "started").unlink(missing_ok=True)
        result.outcomes.append(StageOutcome(stage, "ran", seconds, message))
        log(f"[{stage}] done in {seconds:.1f}s: {message}")
    return result
