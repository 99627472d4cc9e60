"""The stages of ``mmsafe run`` and the resolved config of each.

Each stage has a function ``<stage>_stage(config, paths)`` that turns the pipeline config
into exactly what the stage runs with (a :class:`~mmsafe.train.config.TrainConfig` per
method, a :class:`~mmsafe.synthesis.BuildConfig`, the blind settings, ...), and a
function ``stage_<stage>(config, paths)`` that runs it from that object alone. The same
objects are built when the YAML is loaded (so a wrong key fails before any stage runs)
and hashed by the runner (so a stage is redone exactly when what it runs with changes).
Building them reads no file: what an earlier stage writes is named by its path under
``out``. A stage that is switched off resolves to None.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmsafe.config import checked_options, error_key, from_dict, unknown_option
from mmsafe.errors import ConfigError, MmsafeError
from mmsafe.models.prompts import PromptStyle
from mmsafe.pipeline.config import STAGES, TINY_MODEL, PipelineConfig
from mmsafe.pipeline.paths import Paths

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from mmsafe.generate.engine import DecodingParams
    from mmsafe.synthesis import BuildConfig
    from mmsafe.train.config import TrainConfig


# ---------------------------------------------------------------- inputs of the stages


def base_model_path(config: PipelineConfig, paths: Paths) -> str:
    """The model the preference stages start from (after the warm-up, if any)."""
    if config.teach.enabled:
        return str(paths.teach)
    return _given_model(config, paths)


def _given_model(config: PipelineConfig, paths: Paths) -> str:
    return str(paths.tiny_model) if config.model == TINY_MODEL else config.model


def _with_root(data: str, image_root: str | None) -> tuple[str, str]:
    """The data file and its image root (the one default: :func:`mmsafe.data.inputs.default_image_root`)."""
    from mmsafe.data.inputs import default_image_root

    return data, str(default_image_root(data, image_root))


def train_data(config: PipelineConfig, paths: Paths) -> tuple[str, str]:
    """(records file, image root) of the training data, before blind responses."""
    if config.data.sample:  # the sample records and pairs of harmless picture questions
        from mmsafe.data.sample import TRAINING_FILE

        return str(paths.sample / TRAINING_FILE), str(paths.sample)
    if config.build is not None:
        return str(paths.built / "records.jsonl"), str(paths.built)
    assert config.data.train is not None
    return _with_root(config.data.train, config.data.image_root)


def eval_data(config: PipelineConfig, paths: Paths) -> tuple[str, str]:
    """(records file, image root) of the evaluation data."""
    if config.data.eval is not None:
        return _with_root(config.data.eval, config.data.eval_image_root)
    if config.data.sample:  # the sample records (their test split), without the benign pairs
        return str(paths.sample / "records.jsonl"), str(paths.sample)
    return train_data(config, paths)


def models_to_evaluate(config: PipelineConfig, paths: Paths) -> dict[str, str]:
    """Model name in the report (base, dpo, bpo) -> the model."""
    models = {"base": base_model_path(config, paths)} if config.generate.base else {}
    for method in config.train.methods:
        models[method] = str(paths.trained(method))
    return models


#: What the evaluating stages say of an evaluation split with no records.
NO_EVALUATION_RECORDS = "no evaluation records"


@dataclass(frozen=True)
class RecordSet:
    """Records a stage reads: a file, the folder its image paths are relative to, the split kept."""

    data: str
    image_root: str
    split: str | None
    benign: str | None = None
    """A sample folder whose benign prompts are added (they expect help: over-refusal)."""

    def read(self, *, empty: str | None = None) -> list[Any]:
        """The records of the split (then the benign prompts); none is an error, worded ``empty``."""
        from mmsafe.data.inputs import NO_RECORDS, open_inputs

        records = open_inputs(self.data, split=self.split, empty=empty or NO_RECORDS).records
        if self.benign is not None:
            from mmsafe.data.benign_sample import benign_items

            records += benign_items(self.benign)
        return records


def _eval_set(config: PipelineConfig, paths: Paths) -> RecordSet:
    """The eval split, and with the bundled sample its benign prompts too."""
    data, root = eval_data(config, paths)
    benign = str(paths.sample) if config.data.sample and config.data.eval is None else None
    return RecordSet(data, root, config.data.eval_split, benign)


def _decoding(section: str, max_new_tokens: int) -> DecodingParams:
    from mmsafe.generate.engine import DecodingParams

    try:
        return DecodingParams(max_new_tokens=max_new_tokens)
    except ConfigError as error:
        raise ConfigError(f"{section}.{error}") from None


# ---------------------------------------------------------------- resolved stage configs


@dataclass(frozen=True)
class PrepareStage:
    sample: str | None
    """Folder the bundled sample set is written into (None: no sample)."""
    tiny_model: str | None
    """Folder the built-in tiny model is built in (None: the model is given)."""
    seed: int | None
    """Seed of the tiny model."""


@dataclass(frozen=True)
class BlindStage:
    model: str
    records: RecordSet
    out: str
    mode: str
    decoding: DecodingParams
    dtype: str | None
    device: str
    prompt_style: PromptStyle | None
    image_mode: str | None
    batch_size: int


@dataclass(frozen=True)
class ModelGeneration:
    """One model's generation run: the model, its engine settings and where its answers go."""

    name: str
    model: str
    responses: str
    engine: str
    dtype: str | None
    device: str
    batch_size: int | str
    prompt_style: PromptStyle | None
    image_mode: str | None
    vllm: dict[str, Any]


@dataclass(frozen=True)
class GenerateStage:
    records: RecordSet
    decoding: DecodingParams
    models: list[ModelGeneration]


@dataclass(frozen=True)
class JudgeSpec:
    name: str
    options: dict[str, Any]


@dataclass(frozen=True)
class JudgeStage:
    records: RecordSet
    judges: list[JudgeSpec]
    models: list[str]
    """Names of the models whose responses are judged."""


@dataclass(frozen=True)
class ReportStage:
    records: RecordSet
    responses: list[str]
    verdicts: list[str]
    out: str
    seed: int


def prepare_stage(config: PipelineConfig, paths: Paths) -> PrepareStage:
    tiny = config.model == TINY_MODEL
    return PrepareStage(
        str(paths.sample) if config.data.sample else None,
        str(paths.tiny_model) if tiny else None,
        config.seed if tiny else None,
    )


def build_stage(config: PipelineConfig, paths: Paths) -> BuildConfig | None:
    if config.build is None:
        return None
    from mmsafe.synthesis import BuildConfig

    if "out" in config.build:
        raise ConfigError(f"build.out: set by the pipeline ({paths.built}); remove it")
    try:
        build_config = from_dict(BuildConfig, {**config.build, "out": str(paths.built)}, prefix="build.")
        build_config.check_paths()
    except ConfigError as error:
        raise ConfigError(str(error) if str(error).startswith("build.") else f"build.{error}") from None
    return build_config


#: TrainConfig options the pipeline sets itself, and from what: a value for one of them
#: in train.options / teach.options would otherwise be silently replaced.
_SET_BY_PIPELINE = {
    "model": "model, or the warm-up's model",
    "data": "the data section",
    "image_root": "the data section",
    "split": "data.train_split",
    "output_dir": "a folder under out",
    "loss": "the method",
}


def _train_config(
    layers: list[tuple[str, dict[str, Any]]], *, fixed: dict[str, Any], defaults: dict[str, Any], what: str
) -> TrainConfig:
    """A TrainConfig from option ``layers`` (``(prefix, options)`` as written, later ones
    winning) over ``defaults``, with ``fixed`` set by the pipeline. An error names the
    key as written in the layer that set it (``train.dpo.beta``)."""
    from mmsafe.train.config import TrainConfig

    values = dict(defaults)
    set_by: dict[str, str] = {}
    for prefix, options in layers:
        for key in options:
            if key in fixed:
                raise ConfigError(
                    f"{prefix}{key}: set by the pipeline (from {_SET_BY_PIPELINE.get(key, 'the pipeline config')}); remove it"
                )
        values.update(checked_options(TrainConfig, options, prefix=prefix, exclude=fixed))
        set_by.update(dict.fromkeys(options, prefix))
    try:
        return from_dict(TrainConfig, {**values, **fixed})
    except ConfigError as error:  # a check across options (beta > 0, lora with adapters-disabled, ...)
        error_path = error_key(error)
        layer = set_by.get(error_path[0]) if error_path is not None else None
        raise ConfigError(f"{layer}{error}" if layer is not None else f"{what}: {error}") from None


def teach_stage(config: PipelineConfig, paths: Paths) -> TrainConfig | None:
    """The warm-up's TrainConfig (loss sft: it needs no reference), None when it is off.
    Built either way, so that a wrong option fails when the config is loaded."""
    if config.teach.data == "sample-warmup":
        from mmsafe.data.sample import WARMUP_FILE

        data, image_root = str(paths.sample / WARMUP_FILE), str(paths.sample)
    else:
        data, image_root = train_data(config, paths)
    fixed = {
        "model": _given_model(config, paths),
        "data": data,
        "image_root": image_root,
        "split": config.data.train_split,
        "output_dir": str(paths.teach),
        "loss": "sft",
    }
    defaults = {"seed": config.seed, "reference_cache_dir": str(paths.reference_cache)}
    train_config = _train_config(
        [("teach.options.", config.teach.options)], fixed=fixed, defaults=defaults, what="teach.options"
    )
    return train_config if config.teach.enabled else None


def blind_stage(config: PipelineConfig, paths: Paths) -> BlindStage | None:
    data, image_root = train_data(config, paths)
    stage = BlindStage(
        model=base_model_path(config, paths),
        records=RecordSet(data, image_root, config.data.train_split),
        out=str(paths.blind),
        mode=config.blind.mode,
        decoding=_decoding("blind", config.blind.max_new_tokens),
        dtype=config.generate.dtype,
        device=config.generate.device,
        prompt_style=config.generate.prompt_style,
        image_mode=config.generate.image_mode,
        batch_size=config.blind.batch_size,
    )
    return stage if config.blind.enabled else None


def train_stage(config: PipelineConfig, paths: Paths) -> list[TrainConfig]:
    """One TrainConfig per method, each from the base model: train.options, then train.<method>."""
    data, image_root = train_data(config, paths)
    if config.blind.enabled:  # the blind records keep the training data's image paths
        data = str(paths.blind)
    configs = []
    for method in config.train.methods:
        defaults: dict[str, Any] = {"seed": config.seed, "reference_cache_dir": str(paths.reference_cache)}
        if method == "dpo":
            defaults["rejected_sources"] = ["human"]
        if method == "bpo":
            # Records whose blind answer came out empty keep their human response only (the
            # blind stage counts them), and with blind disabled the config has warned that
            # BPO trains on human responses alone: neither refuses the run here.
            defaults["allow_partial_sources"] = True
        fixed = {
            "model": base_model_path(config, paths), "data": data, "image_root": image_root, "split": config.data.train_split,
            "output_dir": str(paths.trained(method)), "loss": method,
        }  # fmt: skip
        layers = [("train.options.", config.train.options), (f"train.{method}.", getattr(config.train, method))]
        configs.append(_train_config(layers, fixed=fixed, defaults=defaults, what=f"train ({method})"))
    return configs


#: generate.vllm keys the pipeline passes itself, and the key that sets each.
_VLLM_SET_BY = {
    "model": "the stage",
    "name": "the stage",
    "dtype": "generate.dtype",
    "batch_size": "generate.batch_size",
    "prompt_style": "generate.prompt_style",
    "image_mode": "generate.image_mode",
    "trust_remote_code": "the stage",
}


def generate_stage(config: PipelineConfig, paths: Paths) -> GenerateStage:
    # Other vllm.LLM keywords are passed through: they can only be checked where vLLM is installed.
    section = config.generate
    if section.vllm and section.engine != "vllm":
        raise ConfigError(
            f"generate.vllm.{next(iter(section.vllm))}: an option of the vllm engine, but generate.engine is {section.engine} (set generate.engine: vllm, or remove generate.vllm)"
        )
    for key in section.vllm:
        if key in _VLLM_SET_BY:
            raise ConfigError(f"generate.vllm.{key}: set by {_VLLM_SET_BY[key]}; remove it")
    models = [
        ModelGeneration(
            name,
            model,
            str(paths.responses(name)),
            section.engine,
            section.dtype,
            section.device,
            section.batch_size,
            section.prompt_style,
            section.image_mode,
            dict(section.vllm),
        )
        for name, model in models_to_evaluate(config, paths).items()
    ]
    return GenerateStage(_eval_set(config, paths), _decoding("generate", section.max_new_tokens), models)


#: mmsafe's own judges: their options are their dataclass fields, and building one loads no model.
_OWN_JUDGES = {
    "refusal": ("mmsafe.evaluate.judges.refusal", "RefusalJudge"),
    "llama-guard": ("mmsafe.evaluate.judges.llama_guard", "LlamaGuardJudge"),
    "llm": ("mmsafe.evaluate.judges.llm", "LlmJudge"),
}


def _judge_options(name: str, factory: Any) -> list[str] | None:
    """The options judge ``name`` takes, where they can be told without building it."""
    import importlib

    if name in _OWN_JUDGES and getattr(factory, "__module__", None) == "mmsafe.evaluate.judges":
        module, class_name = _OWN_JUDGES[name]
        cls = getattr(importlib.import_module(module), class_name)
        return [field.name for field in dataclasses.fields(cls) if field.init and not field.name.startswith("_")]
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters):
        return None  # a plugin taking **options: checked when it is built, in the judge stage
    return [
        parameter.name
        for parameter in parameters
        if parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]


def judge_stage(config: PipelineConfig, paths: Paths) -> JudgeStage:
    from mmsafe.evaluate.judges import JUDGES, get_judge

    section = config.judge
    for name in section.options:
        if name not in section.judges:
            logger.warning(
                "judge.options.%s: options of a judge that judge.judges does not list (%s): not used",
                name,
                ", ".join(section.judges),
            )
    specs = []
    for index, name in enumerate(section.judges):
        try:
            factory = JUDGES.lookup(name)
        except ConfigError as error:
            raise ConfigError(f"judge.judges[{index}]: {error}") from None
        options = dict(section.options.get(name, {}))
        known = _judge_options(name, factory)
        for key in options:
            if known is not None and key not in known:
                raise unknown_option(key, known, prefix=f"judge.options.{name}.")
        if name in _OWN_JUDGES and known is not None:
            try:  # checks the values too; mmsafe's judges load their model on first use, not here
                get_judge(name, **options)
            except ConfigError as error:
                raise ConfigError(f"judge.options.{name}: {error}") from None
        specs.append(JudgeSpec(name, options))
    return JudgeStage(_eval_set(config, paths), specs, list(models_to_evaluate(config, paths)))


def report_stage(config: PipelineConfig, paths: Paths) -> ReportStage:
    names = list(models_to_evaluate(config, paths))
    verdicts = [str(paths.verdicts(name, judge)) for judge in config.judge.judges for name in names]
    return ReportStage(
        _eval_set(config, paths),
        [str(paths.responses(name)) for name in names],
        verdicts,
        str(paths.report),
        config.seed,
    )


#: The resolved config of each stage.
STAGE_CONFIGS: dict[str, Callable[[PipelineConfig, Paths], Any]] = {
    "prepare": prepare_stage,
    "build-data": build_stage,
    "teach": teach_stage,
    "blind": blind_stage,
    "train": train_stage,
    "generate": generate_stage,
    "judge": judge_stage,
    "report": report_stage,
}


def stage_configs(config: PipelineConfig, paths: Paths) -> dict[str, Any]:
    """Every stage's resolved config, in order (None for a stage that is off); reads no file."""
    return {stage: STAGE_CONFIGS[stage](config, paths) for stage in STAGES}


# ---------------------------------------------------------------- the stages


def stage_prepare(config: PipelineConfig, paths: Paths) -> str:
    stage = prepare_stage(config, paths)
    done = []
    if stage.sample is not None:
        from mmsafe.data.benign_sample import write_benign_sample
        from mmsafe.data.sample import write_sample, write_training, write_warmup

        write_sample(stage.sample)
        write_benign_sample(stage.sample)
        write_warmup(stage.sample)
        write_training(stage.sample)
        done.append(f"sample data in {stage.sample}")
    if stage.tiny_model is not None:
        from mmsafe.data.sample import corpus_texts
        from mmsafe.models.tiny import build_tiny_model

        # The tokenizer learns the sample's words, so the tiny model's answers are short.
        build_tiny_model(Path(stage.tiny_model), seed=stage.seed or 0, corpus=corpus_texts())
        done.append(f"tiny model in {stage.tiny_model}")
    return "; ".join(done) or "nothing to prepare"


def stage_build_data(config: PipelineConfig, paths: Paths) -> str:
    build_config = build_stage(config, paths)
    if build_config is None:
        return "no build section: skipped"
    from mmsafe.synthesis import build_data

    summary = build_data(build_config)
    return f"{summary.records_written} records in {build_config.out}"


def stage_teach(config: PipelineConfig, paths: Paths) -> str:
    train_config = teach_stage(config, paths)
    if train_config is None:
        return "teach.enabled is false: skipped"
    from mmsafe.train.trainer import train

    result = train(train_config)
    return f"warm-up: {result.global_step} steps -> {train_config.output_dir}"


def stage_blind(config: PipelineConfig, paths: Paths) -> str:
    stage = blind_stage(config, paths)
    if stage is None:
        return "blind.enabled is false: skipped"
    from mmsafe.generate.blind import make_blind
    from mmsafe.generate.hf_engine import HFEngine

    engine = HFEngine(
        stage.model,
        dtype=stage.dtype,
        device=stage.device,
        batch_size=stage.batch_size,
        prompt_style=stage.prompt_style,
        image_mode=stage.image_mode,
    )
    records = stage.records.read()
    summary = make_blind(
        engine,
        records,
        stage.out,
        mode=stage.mode,
        image_root=stage.records.image_root,
        params=stage.decoding,
        batch_size=stage.batch_size,
    )
    return summary.summary()


def stage_train(config: PipelineConfig, paths: Paths) -> str:
    from mmsafe.train.trainer import train

    lines = []
    for train_config in train_stage(config, paths):
        result = train(train_config)
        accuracy = result.metrics.get("rewards/accuracy")
        lines.append(
            f"{train_config.loss}: {result.global_step} steps"
            + (f", final reward accuracy {accuracy:.2f}" if accuracy is not None else "")
        )
    return "; ".join(lines)


def stage_generate(config: PipelineConfig, paths: Paths) -> str:
    from mmsafe.generate import local_engine
    from mmsafe.generate.runs import generate_responses

    stage = generate_stage(config, paths)
    records = stage.records.read(empty=NO_EVALUATION_RECORDS)
    lines = []
    for run in stage.models:
        engine = local_engine(
            run.engine, run.model, dtype=run.dtype, device=run.device, batch_size=run.batch_size,
            prompt_style=run.prompt_style, image_mode=run.image_mode, vllm_options=run.vllm or None,
        )  # fmt: skip
        engine.name = run.name  # the report shows base / dpo / bpo
        summary = generate_responses(
            engine,
            records,
            run.responses,
            image_root=stage.records.image_root,
            params=stage.decoding,
            batch_size=engine.preferred_batch_size,
        )
        failure = summary.failure_line()
        if failure is not None:  # judging a run with holes would count the missing answers as nothing
            raise MmsafeError(f"generate ({run.name}): {failure}")
        lines.append(f"{run.name}: {summary.total} responses")
    return "; ".join(lines)


def stage_judge(config: PipelineConfig, paths: Paths) -> str:
    from mmsafe.evaluate.judges import get_judge
    from mmsafe.evaluate.judging import judge_responses

    stage = judge_stage(config, paths)
    records = stage.records.read(empty=NO_EVALUATION_RECORDS)
    lines = []
    for spec in stage.judges:
        judge = get_judge(spec.name, **spec.options)
        for name in stage.models:
            result = judge_responses(
                paths.responses(name),
                paths.verdicts(name, spec.name),
                judge,
                data=records,
                image_root=stage.records.image_root,
            )
            lines.append(f"{name}/{spec.name}: {result.total} verdicts")
    return "; ".join(lines)


def stage_report(config: PipelineConfig, paths: Paths) -> str:
    from mmsafe.evaluate.report import build_report

    stage = report_stage(config, paths)
    records = stage.records.read(empty=NO_EVALUATION_RECORDS)
    build_report(
        stage.verdicts,
        stage.out,
        responses=stage.responses,
        data=records,
        image_root=stage.records.image_root,
        seed=stage.seed,
    )
    return f"report in {stage.out} (summary.md, report.html)"


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
