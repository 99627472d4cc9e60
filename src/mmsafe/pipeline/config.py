"""The pipeline's YAML: one dataclass per section, and the loader that checks it whole.

The nested option mappings (``train.options``, ``train.dpo``, ``train.bpo``,
``teach.options``, ``build``, ``judge.options``, ``generate.vllm``) are checked by
building every stage's resolved config (:func:`mmsafe.pipeline.stages.stage_configs`) as
soon as the file is read, so a typo fails before the first stage runs, naming the key as
written and whether it came from the file or from a ``key=value`` override.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mmsafe.config import apply_overrides, error_key, from_dict, option, override_key, read_yaml, value_source
from mmsafe.errors import ConfigError

logger = logging.getLogger(__name__)

STAGES = ("prepare", "build-data", "teach", "blind", "train", "generate", "judge", "report")
TINY_MODEL = "tiny"
METHODS = ("dpo", "bpo")


@dataclass
class DataSection:
    train: str | None = option(
        None, help="preference data to train on (any format mmsafe reads); null with sample: true or a build section"
    )
    eval: str | None = option(
        None, help="preference data to evaluate on (default: the training data, filtered by eval_split)"
    )
    image_root: str | None = option(None, help="image folder of the training data (default: the data file's folder)")
    eval_image_root: str | None = option(
        None, help="image folder of the evaluation data (default: the eval file's folder)"
    )
    train_split: str | None = option(
        "train", help="train on records whose meta.split is this (records without a split are kept); null: all"
    )
    eval_split: str | None = option("test", help="evaluate on records whose meta.split is this; null: all")
    sample: bool = option(
        False,
        help="write the bundled synthetic sample set into out/data and use it for training and evaluation (training adds harmless picture questions as preference pairs, evaluation benign prompts that expect help: both against over-refusal)",
    )


@dataclass
class TeachSection:
    """A supervised warm-up of the base model before preference training (the demo uses it
    to teach the tiny model whole sentences, so that it starts partly safe and helpful)."""

    enabled: bool = option(False, help="run the warm-up; the warmed-up model becomes the base and the reference")
    options: dict[str, Any] = option(
        default_factory=dict,
        help="TrainConfig options of the warm-up (loss: sft is set; sft_target, learning_rate, num_train_epochs, ...)",
    )
    data: Literal["train", "sample-warmup"] = option(
        "train",
        help="what the warm-up imitates: train: the training data; sample-warmup (data.sample only): the sample's warm-up set "
        "(data/warmup.jsonl: the refusal for some kinds of request, the compliant answer for the rest, and helpful answers to harmless picture questions)",
    )


@dataclass
class BlindSection:
    enabled: bool = option(
        True, help="generate blind responses (the base model without the image) as extra rejected responses"
    )
    mode: Literal["remove", "blank", "text"] = option(
        "remove",
        help="remove: the image and <image> dropped (the paper); blank: a grey image; text: the original text_prompt",
    )
    max_new_tokens: int = option(256, help="longest blind answer in tokens")
    batch_size: int = option(16, help="prompts per generation batch")


@dataclass
class TrainSection:
    methods: list[str] = option(
        default_factory=lambda: ["dpo", "bpo"],
        help="which to train, each from the base model: dpo (human rejected only) and/or bpo (human + blind)",
    )
    options: dict[str, Any] = option(
        default_factory=dict, help="TrainConfig options shared by every method (learning_rate, finetune, beta, ...)"
    )
    dpo: dict[str, Any] = option(default_factory=dict, help="TrainConfig options for DPO only")
    bpo: dict[str, Any] = option(default_factory=dict, help="TrainConfig options for BPO only")

    def __post_init__(self) -> None:
        unknown = [method for method in self.methods if method not in METHODS]
        if unknown:
            raise ConfigError(f"train.methods: expected a list of {', '.join(METHODS)}, got {self.methods!r}")


@dataclass
class GenerateSection:
    max_new_tokens: int = option(256, help="longest answer in tokens (greedy decoding, as in the paper)")
    batch_size: int | Literal["auto"] = option(
        16,
        help="prompts per batch; auto: as large as memory allows (hf: from 64 on CUDA, halved on out-of-memory; vllm: 256 per call)",
    )
    engine: Literal["hf", "vllm"] = option(
        "hf",
        help='in-process engine for generation: hf (transformers) or vllm (pip install "mmsafe[serve]"; models must be merged, not adapters)',
    )
    vllm: dict[str, Any] = option(
        default_factory=dict,
        help="vllm engine options: max_model_len, tensor_parallel_size, gpu_memory_utilization, or other vllm.LLM keywords",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = option(
        None,
        help="weights dtype for generation and blind responses (null: each model's training recipe, mmsafe_recipe.json, else auto)",
    )
    prompt_style: Literal["chat-template", "llava-v1"] | None = option(
        None,
        help="prompt form for generation and blind responses (null: each model's training recipe, else chat-template)",
    )
    image_mode: Literal["pad", "resize", "none"] | None = option(
        None, help="image preparation for generation and blind responses (null: each model's training recipe, else pad)"
    )
    device: str = option("auto", help="auto, cpu, cuda, ...")
    base: bool = option(True, help="also evaluate the base model")


@dataclass
class JudgeSection:
    judges: list[str] = option(
        default_factory=lambda: ["refusal"],
        help="judge names: refusal (measures refusal), llama-guard, llm, or a plugin's",
    )
    options: dict[str, dict[str, Any]] = option(
        default_factory=dict,
        help="options per judge, e.g. {llm: {base_url: ..., model: ...}} (keys come from the environment)",
    )


@dataclass
class PipelineConfig:
    """One experiment: data, base model, training methods, evaluation."""

    out: str = option(help="folder every stage writes into")
    model: str = option(help="base model: checkpoint folder, Hub id, or 'tiny' for the built-in tiny model")
    seed: int = option(0, help="seed of the tiny model and the training runs")
    build: dict[str, Any] | None = option(
        None, help="a build-data config (see configs/build/); its records become the training data"
    )
    data: DataSection = option(default_factory=DataSection, help="training and evaluation data")
    teach: TeachSection = option(default_factory=TeachSection, help="supervised warm-up of the base model")
    blind: BlindSection = option(default_factory=BlindSection, help="blind responses")
    train: TrainSection = option(default_factory=TrainSection, help="preference training")
    generate: GenerateSection = option(default_factory=GenerateSection, help="generation on the evaluation data")
    judge: JudgeSection = option(default_factory=JudgeSection, help="judging")

    def __post_init__(self) -> None:
        sources = sum([self.data.train is not None, self.data.sample, self.build is not None])
        if sources != 1:
            raise ConfigError(
                "data: give exactly one source of training data: data.train, data.sample: true, or a build section"
            )
        if self.teach.data == "sample-warmup" and not self.data.sample:
            raise ConfigError(
                "teach.data: sample-warmup needs data.sample: true (it is the bundled sample's warm-up set)"
            )
        if "bpo" in self.train.methods and not self.blind.enabled:
            logger.warning(
                "train.methods has bpo but blind.enabled is false: BPO then trains on the human rejected responses only"
            )


# ---------------------------------------------------------------- loading


def load_pipeline_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a pipeline YAML; relative paths in it are relative to the current folder.

    Every stage's resolved config is built once here (validation only: no file is read
    but the YAML), so a wrong key anywhere fails now, as
    ``configs/x.yaml: train.options.lerning_rate: unknown option (did you mean
    train.options.learning_rate?)`` or ``override 'train.options.lerning_rate=1e-4': ...``.
    """
    from mmsafe.pipeline.paths import Paths
    from mmsafe.pipeline.stages import stage_configs

    overrides = list(overrides or [])
    file_data = read_yaml(path)
    data = apply_overrides(file_data, overrides)  # their own errors name the file or override
    try:
        config = from_dict(PipelineConfig, data)
        stage_configs(config, Paths(Path(config.out)))
    except ConfigError as error:
        layers = [(override_key(text), f"override {text!r}") for text in overrides]
        source = value_source(error_key(error), layers, file=str(path), file_data=file_data)
        raise ConfigError(f"{source}: {error}") from None
    return config


@dataclass(kw_only=True)
class DemoConfig:
    """mmsafe demo: the whole loop on the tiny built-in model and bundled data (CPU, a few minutes)."""

    out: str = option("mmsafe-demo", help="output folder; a rerun reuses what is done")
