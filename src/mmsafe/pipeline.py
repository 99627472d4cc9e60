"""``mmsafe run``: every stage from one YAML config, in order, each resumable.

Stages: ``prepare`` (bundled sample data, tiny model) -> ``build-data`` -> ``teach``
(optional supervised warm-up) -> ``blind`` -> ``train`` (DPO and/or BPO) -> ``generate``
(base and trained models) -> ``judge`` -> ``report``. Every stage writes plain files under
``out/`` and, when it finishes, a marker ``out/.stages/<stage>.json`` holding a hash of
the config it ran with (chained through the stages before it). A stage whose marker
matches the current config is skipped; an interrupted stage resumes (generation and
judging are append-only streams, training continues from its last checkpoint). A stage
whose outputs were made with a different config is refused with a clear message rather
than silently mixed: use another ``out`` or ``--from STAGE`` to redo it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mmsafe.config import from_dict, option, save_config, to_dict
from mmsafe.data.outputs import OutputLock, Removal, Snapshot, created_since, remove_created, snapshot
from mmsafe.errors import ConfigError, DataError, MmsafeError

logger = logging.getLogger(__name__)

STAGES = ("prepare", "build-data", "teach", "blind", "train", "generate", "judge", "report")
TINY_MODEL = "tiny"
METHODS = ("dpo", "bpo")
#: Stages that may run in several processes (``accelerate launch ... run --only STAGE``).
PARALLEL_STAGES = ("blind", "train", "generate")


@dataclass
class DataSection:
    train: str | None = option(None, help="preference data to train on (any format mmsafe reads); null with sample: true or a build section")
    eval: str | None = option(None, help="preference data to evaluate on (default: the training data, filtered by eval_split)")
    image_root: str | None = option(None, help="image folder of the training data (default: the data file's folder)")
    eval_image_root: str | None = option(None, help="image folder of the evaluation data (default: the eval file's folder)")
    train_split: str | None = option("train", help="train on records whose meta.split is this (records without a split are kept); null: all")
    eval_split: str | None = option("test", help="evaluate on records whose meta.split is this; null: all")
    sample: bool = option(
        False, help="write the bundled synthetic sample set into out/data and use it for training and evaluation (training adds harmless picture questions as preference pairs, evaluation benign prompts that expect help: both against over-refusal)"
    )


@dataclass
class TeachSection:
    """A supervised warm-up of the base model before preference training (the demo uses it
    to teach the tiny model whole sentences, so that it starts partly safe and helpful)."""

    enabled: bool = option(False, help="run the warm-up; the warmed-up model becomes the base and the reference")
    options: dict[str, Any] = option(default_factory=dict, help="TrainConfig options of the warm-up (loss: sft is set; sft_target, learning_rate, num_train_epochs, ...)")
    data: Literal["train", "sample-warmup"] = option(
        "train",
        help="what the warm-up imitates: train: the training data; sample-warmup (data.sample only): the sample's warm-up set "
        "(data/warmup.jsonl: the refusal for some kinds of request, the compliant answer for the rest, and helpful answers to harmless picture questions)",
    )


@dataclass
class BlindSection:
    enabled: bool = option(True, help="generate blind responses (the base model without the image) as extra rejected responses")
    mode: Literal["remove", "blank", "text"] = option("remove", help="remove: the image and <image> dropped (the paper); blank: a grey image; text: the original text_prompt")
    max_new_tokens: int = option(256, help="longest blind answer in tokens")
    batch_size: int = option(16, help="prompts per generation batch")


@dataclass
class TrainSection:
    methods: list[str] = option(default_factory=lambda: ["dpo", "bpo"], help="which to train, each from the base model: dpo (human rejected only) and/or bpo (human + blind)")
    options: dict[str, Any] = option(default_factory=dict, help="TrainConfig options shared by every method (learning_rate, finetune, beta, ...)")
    dpo: dict[str, Any] = option(default_factory=dict, help="TrainConfig options for DPO only")
    bpo: dict[str, Any] = option(default_factory=dict, help="TrainConfig options for BPO only")

    def __post_init__(self) -> None:
        unknown = [method for method in self.methods if method not in METHODS]
        if unknown:
            raise ConfigError(f"train.methods: expected a list of {', '.join(METHODS)}, got {self.methods!r}")


@dataclass
class GenerateSection:
    max_new_tokens: int = option(256, help="longest answer in tokens (greedy decoding, as in the paper)")
    batch_size: int | Literal["auto"] = option(16, help="prompts per batch; auto: as large as memory allows (hf: from 64 on CUDA, halved on out-of-memory; vllm: 256 per call)")
    engine: Literal["hf", "vllm"] = option("hf", help='in-process engine for generation: hf (transformers) or vllm (pip install "mmsafe[serve]"; models must be merged, not adapters)')
    vllm: dict[str, Any] = option(default_factory=dict, help="vllm engine options: max_model_len, tensor_parallel_size, gpu_memory_utilization, or other vllm.LLM keywords")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = option(
        None, help="weights dtype for generation and blind responses (null: each model's training recipe, mmsafe_recipe.json, else auto)"
    )
    prompt_style: Literal["chat-template", "llava-v1"] | None = option(
        None, help="prompt form for generation and blind responses (null: each model's training recipe, else chat-template)"
    )
    image_mode: Literal["pad", "resize", "none"] | None = option(None, help="image preparation for generation and blind responses (null: each model's training recipe, else pad)")
    device: str = option("auto", help="auto, cpu, cuda, ...")
    base: bool = option(True, help="also evaluate the base model")


@dataclass
class JudgeSection:
    judges: list[str] = option(default_factory=lambda: ["refusal"], help="judge names: refusal (measures refusal), llama-guard, llm, or a plugin's")
    options: dict[str, dict[str, Any]] = option(default_factory=dict, help="options per judge, e.g. {llm: {base_url: ..., model: ...}} (keys come from the environment)")


@dataclass
class PipelineConfig:
    """One experiment: data, base model, training methods, evaluation."""

    out: str = option(help="folder every stage writes into")
    model: str = option(help="base model: checkpoint folder, Hub id, or 'tiny' for the built-in tiny model")
    seed: int = option(0, help="seed of the tiny model and the training runs")
    build: dict[str, Any] | None = option(None, help="a build-data config (see configs/build/); its records become the training data")
    data: DataSection = option(default_factory=DataSection, help="training and evaluation data")
    teach: TeachSection = option(default_factory=TeachSection, help="supervised warm-up of the base model")
    blind: BlindSection = option(default_factory=BlindSection, help="blind responses")
    train: TrainSection = option(default_factory=TrainSection, help="preference training")
    generate: GenerateSection = option(default_factory=GenerateSection, help="generation on the evaluation data")
    judge: JudgeSection = option(default_factory=JudgeSection, help="judging")

    def __post_init__(self) -> None:
        sources = sum([self.data.train is not None, self.data.sample, self.build is not None])
        if sources != 1:
            raise ConfigError("data: give exactly one source of training data: data.train, data.sample: true, or a build section")
        if self.teach.data == "sample-warmup" and not self.data.sample:
            raise ConfigError("teach.data: sample-warmup needs data.sample: true (it is the bundled sample's warm-up set)")
        if "bpo" in self.train.methods and not self.blind.enabled:
            logger.warning("train.methods has bpo but blind.enabled is false: BPO then trains on the human rejected responses only")


# ---------------------------------------------------------------- paths


@dataclass
class Paths:
    """Where each stage reads and writes, all under ``out``."""

    out: Path

    @property
    def stages(self) -> Path:
        return self.out / ".stages"

    @property
    def tiny_model(self) -> Path:
        return self.out / "models" / "tiny"

    @property
    def sample(self) -> Path:
        return self.out / "data"

    @property
    def built(self) -> Path:
        return self.out / "build"

    @property
    def teach(self) -> Path:
        return self.out / "models" / "teach"

    @property
    def blind(self) -> Path:
        return self.out / "blind" / "records.jsonl"

    def trained(self, method: str) -> Path:
        return self.out / "models" / method

    def responses(self, model_name: str) -> Path:
        return self.out / "responses" / f"{model_name}.jsonl"

    def verdicts(self, model_name: str, judge: str) -> Path:
        return self.out / "verdicts" / f"{model_name}.{judge}.jsonl"

    @property
    def report(self) -> Path:
        return self.out / "report"

    @property
    def reference_cache(self) -> Path:
        return self.out / "cache" / "reference"

    def stage_locations(self, stage: str) -> list[Path]:
        """Where a stage writes. ``--from`` removes only the files the stage itself created
        there (its list in :meth:`manifest`), never a folder it did not create."""
        return {
            "prepare": [self.tiny_model, self.sample],
            "build-data": [self.built],
            "teach": [self.teach, self.reference_cache],
            "blind": [self.blind.parent],
            "train": [*(self.trained(method) for method in METHODS), self.reference_cache],
            "generate": [self.out / "responses"],
            "judge": [self.out / "verdicts"],
            "report": [self.report],
        }[stage]

    def manifest(self, stage: str) -> Path:
        """The files ``stage`` created (with size and time), and what was there before it."""
        return self.stages / f"{stage}.files.json"


# ---------------------------------------------------------------- resolved inputs of each stage


def base_model_path(config: PipelineConfig, paths: Paths) -> str:
    """The model the preference stages start from (after the warm-up, if any)."""
    if config.teach.enabled:
        return str(paths.teach)
    return str(paths.tiny_model) if config.model == TINY_MODEL else config.model


def _with_root(data: str, image_root: str | None) -> tuple[str, str]:
    """Image paths are relative to the data file's folder unless a root is given."""
    return data, image_root if image_root is not None else str(Path(data).parent)


def train_data(config: PipelineConfig, paths: Paths) -> tuple[str, str]:
    """(records file, image root) of the training data, before blind responses."""
    if config.data.sample:  # the sample records and pairs of harmless picture questions
        from mmsafe.data.sample import TRAINING_FILE, write_training

        if not (paths.sample / TRAINING_FILE).exists():  # a sample written by an older version
            write_training(paths.sample)
        return str(paths.sample / TRAINING_FILE), str(paths.sample)
    if config.build is not None:
        return str(paths.built / "records.jsonl"), str(paths.built)
    assert config.data.train is not None
    return _with_root(config.data.train, config.data.image_root)


def eval_data(config: PipelineConfig, paths: Paths) -> tuple[str, str]:
    if config.data.eval is not None:
        return _with_root(config.data.eval, config.data.eval_image_root)
    if config.data.sample:  # the sample records (their test split), without the benign pairs
        return str(paths.sample / "records.jsonl"), str(paths.sample)
    return train_data(config, paths)


def models_to_evaluate(config: PipelineConfig, paths: Paths) -> dict[str, str]:
    models = {"base": base_model_path(config, paths)} if config.generate.base else {}
    for method in config.train.methods:
        models[method] = str(paths.trained(method))
    return models


# ---------------------------------------------------------------- the stages


def _records_of_split(path: str, split: str | None) -> list[Any]:
    from mmsafe.data.formats import read_records

    records = list(read_records(path))
    if split is None:
        return records
    return [record for record in records if record.meta.get("split", split) == split]


def _eval_items(config: PipelineConfig, paths: Paths) -> tuple[list[Any], str]:
    """(prompts, image root) to evaluate on: the eval split, and with the bundled sample
    its benign prompts too (they expect help, so the report measures over-refusal)."""
    data, root = eval_data(config, paths)
    records = _records_of_split(data, config.data.eval_split)
    if not records:
        raise DataError(f"no evaluation records (split {config.data.eval_split!r})", file=data)
    if config.data.sample and config.data.eval is None:
        from mmsafe.data.benign_sample import BENIGN_FILE, benign_items, write_benign_sample

        if not (paths.sample / BENIGN_FILE).exists():  # a sample written by an older version
            write_benign_sample(paths.sample)
        records += benign_items(paths.sample)
    return records, root


def stage_prepare(config: PipelineConfig, paths: Paths) -> str:
    done = []
    if config.data.sample:
        from mmsafe.data.benign_sample import write_benign_sample
        from mmsafe.data.sample import write_sample, write_training, write_warmup

        write_sample(paths.sample)
        write_benign_sample(paths.sample)
        write_warmup(paths.sample)
        write_training(paths.sample)
        done.append(f"sample data in {paths.sample}")
    if config.model == TINY_MODEL:
        from mmsafe.data.sample import corpus_texts
        from mmsafe.models.tiny import build_tiny_model

        # The tokenizer learns the sample's words, so the tiny model's answers are short.
        corpus = corpus_texts()
        build_tiny_model(paths.tiny_model, seed=config.seed, corpus=corpus)
        done.append(f"tiny model in {paths.tiny_model}")
    return "; ".join(done) or "nothing to prepare"


def stage_build_data(config: PipelineConfig, paths: Paths) -> str:
    if config.build is None:
        return "no build section: skipped"
    from mmsafe.synthesis import BuildConfig, build_data

    build_config = from_dict(BuildConfig, {**config.build, "out": str(paths.built)}, prefix="build.")
    summary = build_data(build_config)
    return f"{summary.records_written} records in {paths.built}"


def _train_config(config: PipelineConfig, paths: Paths, options: dict[str, Any], *, output_dir: Path, model: str, data: str, image_root: str | None, split: str | None) -> Any:
    from mmsafe.train.config import TrainConfig

    values = {"seed": config.seed, **options, "model": model, "data": data, "image_root": image_root, "output_dir": str(output_dir), "split": split}
    values.setdefault("reference_cache_dir", str(paths.reference_cache))
    return from_dict(TrainConfig, values, prefix="train.")


def stage_teach(config: PipelineConfig, paths: Paths) -> str:
    if not config.teach.enabled:
        return "teach.enabled is false: skipped"
    from mmsafe.train.trainer import train

    data, image_root = train_data(config, paths)
    if config.teach.data == "sample-warmup":
        from mmsafe.data.sample import WARMUP_FILE, write_warmup

        data = str(paths.sample / WARMUP_FILE)
        if not Path(data).exists():  # a sample written by an older version
            write_warmup(paths.sample)
    model = str(paths.tiny_model) if config.model == TINY_MODEL else config.model
    options = {**config.teach.options, "loss": "sft"}  # sft needs no reference: none is built or precomputed
    result = train(_train_config(config, paths, options, output_dir=paths.teach, model=model, data=data, image_root=image_root, split=config.data.train_split))
    return f"warm-up: {result.global_step} steps -> {paths.teach}"


def stage_blind(config: PipelineConfig, paths: Paths) -> str:
    if not config.blind.enabled:
        return "blind.enabled is false: skipped"
    from mmsafe.generate.blind import make_blind
    from mmsafe.generate.engine import DecodingParams
    from mmsafe.generate.hf_engine import HFEngine

    data, image_root = train_data(config, paths)
    records = _records_of_split(data, config.data.train_split)
    engine = HFEngine(
        base_model_path(config, paths), dtype=config.generate.dtype, device=config.generate.device, batch_size=config.blind.batch_size,
        prompt_style=config.generate.prompt_style, image_mode=config.generate.image_mode,
    )  # fmt: skip
    summary = make_blind(
        engine,
        records,
        paths.blind,
        mode=config.blind.mode,
        image_root=image_root,
        params=DecodingParams(max_new_tokens=config.blind.max_new_tokens),
        batch_size=config.blind.batch_size,
    )
    return summary.summary()


def stage_train(config: PipelineConfig, paths: Paths) -> str:
    from mmsafe.train.trainer import train

    data, image_root = train_data(config, paths)
    if config.blind.enabled:  # the blind records keep the training data's image paths
        data = str(paths.blind)
    lines = []
    for method in config.train.methods:
        options = {**config.train.options, **getattr(config.train, method)}
        options["loss"] = method
        if method == "dpo":
            options.setdefault("rejected_sources", ["human"])
        if method == "bpo":
            # Records whose blind answer came out empty keep their human response only (the
            # blind stage counts them), and with blind disabled the config has warned that
            # BPO trains on human responses alone: neither refuses the run here.
            options.setdefault("allow_partial_sources", True)
        result = train(
            _train_config(config, paths, options, output_dir=paths.trained(method), model=base_model_path(config, paths), data=data, image_root=image_root, split=config.data.train_split)
        )
        accuracy = result.metrics.get("rewards/accuracy")
        lines.append(f"{method}: {result.global_step} steps" + (f", final reward accuracy {accuracy:.2f}" if accuracy is not None else ""))
    return "; ".join(lines)


def stage_generate(config: PipelineConfig, paths: Paths) -> str:
    from mmsafe.generate import local_engine
    from mmsafe.generate.engine import DecodingParams
    from mmsafe.generate.runs import generate_responses

    records, root = _eval_items(config, paths)
    lines = []
    for name, model in models_to_evaluate(config, paths).items():
        engine = local_engine(
            config.generate.engine, model, dtype=config.generate.dtype, device=config.generate.device, batch_size=config.generate.batch_size,
            prompt_style=config.generate.prompt_style, image_mode=config.generate.image_mode, vllm_options=config.generate.vllm or None,
        )  # fmt: skip
        engine.name = name  # the report shows base / dpo / bpo
        summary = generate_responses(
            engine, records, paths.responses(name), image_root=root, params=DecodingParams(max_new_tokens=config.generate.max_new_tokens), batch_size=engine.preferred_batch_size
        )
        failure = summary.failure_line()
        if failure is not None:  # judging a run with holes would count the missing answers as nothing
            raise MmsafeError(f"generate ({name}): {failure}")
        lines.append(f"{name}: {summary.total} responses")
    return "; ".join(lines)


def stage_judge(config: PipelineConfig, paths: Paths) -> str:
    from mmsafe.evaluate.judges import get_judge
    from mmsafe.evaluate.judging import judge_responses

    records, root = _eval_items(config, paths)
    lines = []
    for judge_name in config.judge.judges:
        judge = get_judge(judge_name, **config.judge.options.get(judge_name, {}))
        for name in models_to_evaluate(config, paths):
            result = judge_responses(paths.responses(name), paths.verdicts(name, judge_name), judge, data=records, image_root=root)
            lines.append(f"{name}/{judge_name}: {result.total} verdicts")
    return "; ".join(lines)


def stage_report(config: PipelineConfig, paths: Paths) -> str:
    from mmsafe.evaluate.report import build_report

    records, root = _eval_items(config, paths)
    names = list(models_to_evaluate(config, paths))
    verdicts = [paths.verdicts(name, judge) for judge in config.judge.judges for name in names]
    build_report(verdicts, paths.report, responses=[paths.responses(name) for name in names], data=records, image_root=root, seed=config.seed)
    return f"report in {paths.report} (summary.md, report.html)"


STAGE_FUNCTIONS: dict[str, Callable[[PipelineConfig, Paths], str]] = {
    "prepare": stage_prepare,
    "build-data": stage_build_data,
    "teach": stage_teach,
    "blind": stage_blind,
    "train": stage_train,
    "generate": stage_generate,
    "judge": stage_judge,
    "report": stage_report,
}

#: The config sections each stage depends on (besides every stage before it).
STAGE_SECTIONS = {
    "prepare": ("model", "seed", "data"),
    "build-data": ("build",),
    "teach": ("teach",),
    "blind": ("blind",),
    "train": ("train",),
    "generate": ("generate",),
    "judge": ("judge",),
    "report": (),
}


def stage_hashes(config: PipelineConfig) -> dict[str, str]:
    """A hash per stage of the config it depends on, chained through the stages before it."""
    data = to_dict(config)
    hashes = {}
    previous = ""
    for stage in STAGES:
        payload = json.dumps({"previous": previous, "stage": stage, **{name: data[name] for name in STAGE_SECTIONS[stage]}}, sort_keys=True, default=str)
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


def _marker(paths: Paths, stage: str, kind: str) -> Path:
    return paths.stages / f"{stage}.{kind}.json"


def _read_hash(path: Path) -> str | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))["hash"]
    except (ValueError, KeyError, TypeError):
        raise DataError("stage marker is corrupt; remove it to redo the stage", file=str(path)) from None


def _write_marker(path: Path, stage_hash: str, message: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"hash": stage_hash, "message": message, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n", encoding="utf-8")
    temporary.replace(path)


# ---------------------------------------------------------------- what each stage wrote


def _relative(paths: Paths, locations: list[Path]) -> list[str]:
    return [location.relative_to(paths.out).as_posix() for location in locations]


def _in_scope(name: str, locations: list[str]) -> bool:
    """Is ``name`` at or under one of ``locations``, or a folder above one (``models`` of
    ``models/tiny``, which the stage may have made too)?"""
    return any(name == location or name.startswith(location + "/") or location.startswith(name + "/") for location in locations)


def _stage_snapshot(paths: Paths, stage: str, found: Snapshot | None = None) -> Snapshot:
    locations = _relative(paths, paths.stage_locations(stage))
    found = found if found is not None else snapshot(paths.out, exclude=(paths.stages.name,))
    return Snapshot({name: stamp for name, stamp in found.files.items() if _in_scope(name, locations)}, {name for name in found.dirs if _in_scope(name, locations)})


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
        if not (isinstance(before["files"], list) and isinstance(before["dirs"], list) and isinstance(data["complete"], bool)):
            raise TypeError
        if data["complete"] and not (isinstance(data["files"], dict) and isinstance(data["dirs"], list)):
            raise TypeError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise DataError(f"the list of files stage {stage!r} wrote is corrupt; remove it (and that stage's outputs, if they are in the way) to redo the stage", file=str(path)) from None
    return data


def _begin_manifest(paths: Paths, stage: str, *, resuming: bool) -> None:
    """Note what the stage's locations hold before it runs: none of that is the stage's.

    A resumed stage keeps the note of its first attempt, so files an interrupted attempt
    created still count as the stage's own.
    """
    if resuming and _read_manifest(paths, stage) is not None:
        return
    before = _stage_snapshot(paths, stage)
    _write_json(paths.manifest(stage), {"stage": stage, "complete": False, "before": {"files": sorted(before.files), "dirs": sorted(before.dirs)}})


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
            log(f"[{stage}] no list of the files this stage wrote (made by an older mmsafe): nothing removed; remove its outputs in {locations} yourself if the redo should not resume them")
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


def run_pipeline(config: PipelineConfig, *, from_stage: str | None = None, only: str | None = None, log: Callable[[str], None] = print) -> PipelineResult:
    """Run the stages of ``config`` in order, skipping those already done with the same config.

    Args:
        from_stage: redo this stage and every later one (the files they wrote are removed
            first; nothing else is).
        only: run just this stage (the stages before it must be done).

    One run at a time per ``out``: the first process holds ``out/.stages/run.lock`` until
    it ends, and a second is refused with a message naming it.
    """
    for name, value in (("--from", from_stage), ("--only", only)):
        if value is not None and value not in STAGES:
            raise ConfigError(f"{name}: expected one of {', '.join(STAGES)}, got {value!r}")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    main_process = int(os.environ.get("RANK", "0")) == 0
    if world_size > 1 and (only not in PARALLEL_STAGES or from_stage is not None):
        raise ConfigError(f"{world_size} processes were launched: run one of the stages {', '.join(PARALLEL_STAGES)} with --only under a launcher, and the others in one process")
    paths = Paths(Path(config.out))
    paths.out.mkdir(parents=True, exist_ok=True)
    # Under a launcher the ranks of one run share the folder: only the first holds the lock.
    lock = OutputLock(paths.out, lock_file=paths.stages / "run.lock") if main_process else None
    if lock is not None:
        lock.acquire()
    try:
        return _run_stages(config, paths, from_stage=from_stage, only=only, main_process=main_process, log=log)
    finally:
        if lock is not None:
            lock.release()


def _run_stages(config: PipelineConfig, paths: Paths, *, from_stage: str | None, only: str | None, main_process: bool, log: Callable[[str], None]) -> PipelineResult:
    if main_process:
        save_config(config, paths.out / "run_config.yaml")
    hashes = stage_hashes(config)
    if from_stage is not None:
        for stage in STAGES[STAGES.index(from_stage) :]:
            remove_stage_outputs(paths, stage, log)
            for kind in ("done", "started"):
                _marker(paths, stage, kind).unlink(missing_ok=True)

    result = PipelineResult(paths.out)
    selected = [only] if only is not None else list(STAGES)
    for stage in STAGES:
        done = _read_hash(_marker(paths, stage, "done"))
        if stage not in selected:
            if only is not None and STAGES.index(stage) < STAGES.index(only) and done != hashes[stage]:
                raise ConfigError(f"--only {only}: the earlier stage {stage!r} is not done for this config; run without --only first")
            continue
        if done == hashes[stage]:
            result.outcomes.append(StageOutcome(stage, "skipped", 0.0, "up to date"))
            log(f"[{stage}] up to date, skipped")
            continue
        started = _read_hash(_marker(paths, stage, "started"))
        if (done is not None and done != hashes[stage]) or (started is not None and started != hashes[stage]):
            raise ConfigError(
                f"stage {stage!r}: {paths.out} holds outputs made with a different config (this stage or an earlier one changed); "
                f"use a new 'out' folder, or rerun with --from {stage} to redo it and the stages after it"
            )
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


def load_pipeline_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a pipeline YAML; relative paths in it are relative to the current folder."""
    from mmsafe.config import load_config

    return load_config(PipelineConfig, path, overrides)


# ---------------------------------------------------------------- results table


def safety_table(config: PipelineConfig) -> str:
    """The report's rates per model (over-refusal beside them), and each trained model against the base, as text."""
    summary_path = Paths(Path(config.out)).report / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8"))

    from mmsafe.evaluate.formatting import difference_text, p_text, rate_text

    def cell(rate: dict[str, Any] | None) -> str:
        if rate is None:
            return f"{'-':<24}  {'':<7}"
        count = f"{rate['successes']}/{rate['total']}" if rate.get("total") else ""
        return f"{rate_text(rate):<24}  {count:<7}"

    lines = [f"{'model':<8} {'judge':<10} {'metric':<13} {'rate [95% interval]':<24}  {'n':<7}  {'over-refusal [95% interval]':<28}  n"]
    for entry in summary.get("results", []):
        over = entry.get("over_refusal")
        over_cell = cell(over["over_refusal_rate"] if over else None)
        lines.append(f"{entry['model']:<8} {entry['judge']:<10} {entry['metric']:<13} {cell(entry['summary']['safe_rate'])}  {over_cell}".rstrip())
    # Each trained model against the base, and BPO against DPO (the paper's comparison).
    comparisons = [row for row in summary.get("comparisons", []) if row.get("model_a") == "base" or (row.get("model_a"), row.get("model_b")) == ("dpo", "bpo")]
    if comparisons:
        lines.append("")
        for row in comparisons:
            if row.get("difference") is None:
                continue
            lines.append(f"{row['model_b']} - {row['model_a']} ({row['judge']}): {difference_text(row)} (paired bootstrap 95%), McNemar p = {p_text(row['mcnemar_p'], row['n'])}")
    return "\n".join(lines)
