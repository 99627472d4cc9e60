"""DPO / BPO (and supervised warm-up) training on ``transformers.Trainer``.

:func:`train` reads top to bottom: load the records and the model, decide what trains,
tokenize, get reference log-probs, train (resuming from the last checkpoint), save the
model with its processor and the resolved config. Everything the Trainer offers through
``TrainingArguments`` (schedulers, accumulation, bf16, gradient checkpointing,
``report_to``, DeepSpeed, FSDP via ``accelerate launch``) works unchanged, because the
only thing :class:`PreferenceTrainer` changes is how the loss is computed and logged.
What the loss needs (a reference, how many rejected responses) is asked of the run's
objective (:mod:`mmsafe.train.objectives`).

The pieces live beside it: the checks made before the model loads in
:mod:`mmsafe.train.checks`, loading the policy and deciding what trains in
:mod:`mmsafe.train.model_setup`, precomputed reference log-probs in
:mod:`mmsafe.train.precompute`, resuming in :mod:`mmsafe.train.resume`, and the Trainer
subclass in :mod:`mmsafe.train.hf_trainer`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmsafe.data.inputs import EMBEDDED_IMAGE_FORMATS as EMBEDDED_IMAGE_FORMATS  # re-exported
from mmsafe.errors import ConfigError, DataError
from mmsafe.models.recipe import build_recipe, model_dtype, save_recipe
from mmsafe.train.checks import check_rejected_sources
from mmsafe.train.config import TrainConfig
from mmsafe.train.data import PreferenceCollator, PreferenceDataset, PreferenceEncoder, prepare_examples
from mmsafe.train.hf_trainer import (  # noqa: F401 (REFERENCE_KEYS, EpochLengthGroupedSampler, example_length: their home was here)
    REFERENCE_KEYS,
    EpochLengthGroupedSampler,
    JsonlLogCallback,
    PreferenceTrainer,
    example_length,
)
from mmsafe.train.model_setup import (  # noqa: F401 (the names not used here: their home was here)
    PROJECTOR_NAMES,
    VISION_TOWER_NAMES,
    choose_forward_mode,
    count_trainable,
    disable_dropout,
    load_policy,
    mixed_precision_context,
    set_trainable,
    training_dtype,
)
from mmsafe.train.precompute import attach_reference
from mmsafe.train.reference import DisabledAdapterReference, FrozenCopyReference, PrecomputeStats
from mmsafe.train.resume import CONFIG_FILE, last_complete_checkpoint, plan_resume, record_run_start, save_trainer_state  # noqa: F401 (last_complete_checkpoint, save_trainer_state: their home was here)
from mmsafe.train.scoring import padding_share  # noqa: F401 (its home was here)

logger = logging.getLogger(__name__)

SUMMARY_FILE = "train_summary.json"
LOG_FILE = "train_log.jsonl"


@dataclass
class TrainResult:
    """What a run did: where its model is, how far it got, what it skipped."""

    output_dir: Path
    global_step: int
    resumed_from: str | None
    examples: int
    skipped: dict[str, int]
    truncated: int
    reference_forwards: int
    reference_cache: str | None
    trainable_parameters: int
    forward_mode: str = "shared-prefix"
    #: Padding positions over all positions of the reference precompute's batches (None: nothing precomputed).
    reference_padding_share: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    resume_changes: list[str] = field(default_factory=list)  # settings changed at a resume: force

    def to_dict(self) -> dict[str, Any]:
        return {
            "output_dir": str(self.output_dir),
            "global_step": self.global_step,
            "resumed_from": self.resumed_from,
            "examples": self.examples,
            "skipped": self.skipped,
            "truncated": self.truncated,
            "reference_forwards": self.reference_forwards,
            "reference_cache": self.reference_cache,
            "reference_padding_share": self.reference_padding_share,
            "trainable_parameters": self.trainable_parameters,
            "forward_mode": self.forward_mode,
            "metrics": self.metrics,
            "resume_changes": self.resume_changes,
        }


def training_image_root(config: TrainConfig) -> str:
    """The folder record image paths are relative to: ``image_root``, else the data file's folder.

    Data whose images are embedded (``hf`` parquet) has them written once to ``images/``
    beside the file (inside a folder of shards), as :func:`mmsafe.evaluate.benchmarks.load_mmsafe_po` does.
    """
    from mmsafe.data.inputs import default_image_root

    return config.image_root if config.image_root is not None else str(default_image_root(config.data, None))


def load_training_records(config: TrainConfig) -> list[Any]:
    """The records of ``config.data`` in any format the registry reads (detected), filtered by split.

    Ids must be unique (reference log-probs are cached by id). Every problem is a
    DataError naming file, record and field.
    """
    from mmsafe.data.inputs import open_inputs

    # Reference log-probs are cached by id: open_inputs refuses two records under one id.
    return open_inputs(
        config.data,
        split=config.split,
        limit=config.limit,
        image_root=config.image_root,
        empty="no records to train on",
    ).records


def train(config: TrainConfig) -> TrainResult:
    """Run the objective ``config`` names (SFT, DPO or BPO); returns what happened (also in train_summary.json)."""
    from transformers import set_seed

    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    set_seed(config.seed)
    arguments = config.training_arguments()  # checks the trainer options before the slow part
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and arguments.world_size != launched:  # also sets up the process group, before anything else does
        raise ConfigError(
            f"{launched} processes were launched but they did not form one training group (world size {arguments.world_size}); check the accelerate config"
        )

    records = load_training_records(config)
    check_rejected_sources(config, records)  # before the model loads: a refused run costs seconds, not a 7B load
    # Resume or start fresh, also decided before the model loads (see mmsafe.train.resume).
    plan = plan_resume(config, output_dir, image_root=training_image_root(config))
    if arguments.should_save:
        record_run_start(config, output_dir, plan)
    objective = config.objective()
    records = objective.training_records(records)  # sft_target rejected: the rejected response as the target
    model, processor = load_policy(config, arguments.device)
    if config.disable_dropout:
        disable_dropout(model)
    # Taken before set_trainable: the starting weights, without adapters. None where the objective compares against no reference.
    reference_model = (
        FrozenCopyReference(model, average=objective.average_logprobs)
        if objective.needs_reference and config.reference == "copy"
        else None
    )
    model = set_trainable(model, config)
    trainable = count_trainable(model)
    if trainable == 0:
        raise ConfigError("nothing to train: every parameter is frozen (check finetune, train_projector)")

    image_root = training_image_root(config)
    encoder = PreferenceEncoder.for_model(
        model,
        processor,
        image_root,
        max_length=config.max_length,
        image_mode=config.image_mode,
        prompt_style=config.prompt_style,
        length_rule=config.length_rule,
    )
    recipe = build_recipe(
        processor,
        prompt_style=encoder.prompt_style,
        image_mode=encoder.image_mode,
        max_length=encoder.max_length,
        dtype=model_dtype(model),
    )
    prepared = prepare_examples(
        records,
        encoder,
        data_file=config.data,
        rejected_sources=config.rejected_sources,
        max_rejected=objective.max_rejected,
        skip_bad_images=config.skip_bad_images,
    )
    if not prepared.examples:
        raise DataError(f"every record was skipped ({prepared.skip_counts()})", file=config.data)
    unknown = sorted(set(config.source_weights) - set(prepared.sources))
    if unknown:
        raise ConfigError(
            f"source_weights: no rejected response comes from {', '.join(unknown)} (sources in the data: {', '.join(prepared.sources)})"
        )
    dataset = PreferenceDataset(prepared.examples, encoder)
    collator = PreferenceCollator(
        encoder.tokenizer.pad_token_id, prepared.sources, mode="per-response", encoder=encoder
    )
    forward_mode = choose_forward_mode(config, model, dataset, collator)
    collator = collator.with_mode(forward_mode)

    cache_path, precompute = None, PrecomputeStats()
    reference: Any = reference_model
    if objective.needs_reference and config.reference == "precomputed":
        cache_path, precompute = attach_reference(config, model, dataset, collator, encoder)
    elif objective.needs_reference and config.reference == "adapters-disabled":
        reference = DisabledAdapterReference(model, average=objective.average_logprobs)

    trainer = PreferenceTrainer(
        model=model,
        args=arguments,
        data_collator=collator,
        train_dataset=dataset,
        processing_class=processor,
        callbacks=[JsonlLogCallback(output_dir / LOG_FILE)],
        config=config,
        sources=prepared.sources,
        reference=reference,
        objective=objective,
    )
    trainer.input_recipe = recipe
    last_checkpoint = plan.checkpoint
    if last_checkpoint:
        logger.info("resuming from %s", last_checkpoint)
    outcome = trainer.train(resume_from_checkpoint=last_checkpoint)

    trainer.save_model(str(output_dir))
    if trainer.is_world_process_zero():
        processor.save_pretrained(str(output_dir))  # train_config.yaml was written when the run started
        if config.merge_lora:
            merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
            merged.save_pretrained(str(output_dir / "merged"), safe_serialization=True)
            processor.save_pretrained(str(output_dir / "merged"))
            save_recipe(recipe, output_dir / "merged")
    reference_forwards = precompute.forwards + (reference.forwards if reference is not None else 0)
    result = TrainResult(
        output_dir=output_dir,
        global_step=trainer.state.global_step,
        resumed_from=last_checkpoint,
        examples=len(prepared.examples),
        skipped=prepared.skip_counts(),
        truncated=prepared.truncated,
        reference_forwards=reference_forwards,
        reference_cache=cache_path,
        trainable_parameters=trainable,
        forward_mode=forward_mode,
        reference_padding_share=precompute.padding_share,
        metrics={key: value for key, value in outcome.metrics.items() if isinstance(value, int | float)},
        resume_changes=plan.changes,
    )
    # The last logged values of the preference metrics (rewards/accuracy, ...), for callers.
    for entry in trainer.state.log_history:
        result.metrics.update({key: value for key, value in entry.items() if key in trainer._metric_names})
    if trainer.is_world_process_zero():
        (output_dir / SUMMARY_FILE).write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    return result
