"""DPO / BPO (and supervised warm-up) training on ``transformers.Trainer``.

:func:`train` reads top to bottom: load the records and the model, decide what trains,
tokenize, get reference log-probs, train (resuming from the last checkpoint), save the
model with its processor and the resolved config. Everything the Trainer offers through
``TrainingArguments`` (schedulers, accumulation, bf16, gradient checkpointing,
``report_to``, DeepSpeed, FSDP via ``accelerate launch``) works unchanged, because the
only thing :class:`PreferenceTrainer` changes is how the loss is computed and logged.
What the loss needs (a reference, how many rejected responses) is asked of the run's
objective (:mod:`mmsafe.train.objectives`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from transformers import Trainer, TrainerCallback

from mmsafe.errors import ConfigError, DataError, ModelError
from mmsafe.models.recipe import build_recipe, model_dtype, save_recipe
from mmsafe.models.structure import prompt_cache_supported
from mmsafe.train.config import TrainConfig
from mmsafe.train.data import (
    ForwardMode,
    PreferenceCollator,
    PreferenceDataset,
    PreferenceEncoder,
    prepare_examples,
    select_rejected,
)
from mmsafe.train.forward import ResponseLogProbs, packed_rows_allowed, score_batch, select_forward_mode
from mmsafe.train.objectives import Objective
from mmsafe.train.reference import (
    DisabledAdapterReference,
    FrozenCopyReference,
    PrecomputeStats,
    ReferenceCache,
    examples_fingerprint,
    file_hash_memo,
    model_fingerprint,
    precompute_reference,
    weights_dtype,
)
from mmsafe.train.resume import last_complete_checkpoint, plan_resume, record_run_start, save_trainer_state  # noqa: F401 (last_complete_checkpoint: its home was here)
from mmsafe.train.scoring import padding_share

logger = logging.getLogger(__name__)

#: Parameter-name fragments of the parts of a vision-language model, for quantization:
#: modules left in full precision.
VISION_TOWER_NAMES = ("vision_tower", "vision_model", "visual", "vision_encoder")
PROJECTOR_NAMES = ("multi_modal_projector", "mm_projector", "connector", "merger")
REFERENCE_KEYS = ("reference_chosen_logps", "reference_rejected_logps")
CONFIG_FILE = "train_config.yaml"
SUMMARY_FILE = "train_summary.json"
LOG_FILE = "train_log.jsonl"
#: Data formats whose images are inside the data file; they are written out under the image root.
EMBEDDED_IMAGE_FORMATS = ("hf",)


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


class PreferenceTrainer(Trainer):
    """A Trainer whose loss is its objective's (SFT, DPO or BPO) over log-probs from :func:`score_batch`.

    ``objective`` (default: the one ``config.loss`` names) says whether reference
    log-probs are needed and computes the loss and its metrics. ``reference`` is called
    for batches that carry no precomputed reference log-probs. ``sources`` names the
    rejected sources, for the per-source logs.
    """

    def __init__(
        self, *args: Any, config: TrainConfig, sources: Sequence[str], reference: Any | None = None, objective: Objective | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.preference_config = config
        self.objective: Objective = objective if objective is not None else config.objective()
        self.sources = list(sources)
        self.reference = reference
        # The loss is a mean over examples, not over tokens: let the Trainer divide it by
        # the accumulation steps itself (it would not, for a model whose forward takes **kwargs).
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self._metric_names = ["batch/padding_share", *self.objective.metric_names(self.sources)]
        self._metric_sums = torch.zeros(len(self._metric_names), dtype=torch.float64)
        self._metric_counts = torch.zeros(len(self._metric_names), dtype=torch.float64)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """The Trainer's checkpoint, with ``trainer_state.json`` written atomically.

        That file is written last and marks the checkpoint complete: written in place, a full
        disk left it empty and every later resume failed on it.
        """
        state = self.state
        state.save_to_json = functools.partial(save_trainer_state, state)  # type: ignore[method-assign]  # an instance attribute, not a field: not saved
        try:
            super()._save_checkpoint(model, trial)
        finally:
            vars(state).pop("save_to_json", None)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        """Resume full weights through ``from_pretrained``, which maps saved key names back.

        In transformers 5, ``save_pretrained`` writes some architectures (LLaVA among them)
        under their legacy key names, and the Trainer's own loader reads the file with
        ``load_state_dict(strict=False)``: every key was reported missing and a resumed run
        silently went on from the base weights. Adapters, FSDP and DeepSpeed keep the
        Trainer's own path.
        """
        from transformers import PreTrainedModel

        target = self.model if model is None else model
        folder = Path(resume_from_checkpoint)
        has_weights = (folder / "model.safetensors").exists() or (folder / "model.safetensors.index.json").exists()
        if not has_weights or not isinstance(target, PreTrainedModel) or hasattr(target, "peft_config") or self.is_fsdp_enabled or self.is_deepspeed_enabled:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        saved = type(target).from_pretrained(str(folder), dtype=next(target.parameters()).dtype, use_safetensors=True)
        try:
            target.load_state_dict(saved.state_dict(), strict=True)
        except RuntimeError as error:
            raise ModelError(f"{folder}: the checkpoint's weights do not fit the model being trained ({str(error).splitlines()[0]})") from None
        finally:
            del saved

    #: The model's input recipe (:mod:`mmsafe.models.recipe`), written beside every save.
    input_recipe: Any = None

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save as the Trainer does, then the input recipe beside the weights.

        Checkpoints are saved through here too (before ``trainer_state.json``, which marks
        a checkpoint complete), so every complete ``checkpoint-N`` holds the recipe.
        """
        super().save_model(output_dir, _internal_call)
        if self.input_recipe is not None and self.args.should_save:
            # TrainingArguments fills in output_dir when it is not given
            save_recipe(self.input_recipe, output_dir if output_dir is not None else cast(str, self.args.output_dir))

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        """Examples of similar length batched together (``group_by_length``), in an order fixed per epoch by the seed."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self.preference_config.group_by_length or not isinstance(dataset, PreferenceDataset):
            return super()._get_train_sampler(train_dataset)
        lengths = [example_length(example) for example in dataset.examples]
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        # Grouped by the global batch (every process, every accumulation step), so the order does
        # not depend on how a batch is split over processes: 2 processes x 1 = 1 process x 2.
        global_batch = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        return EpochLengthGroupedSampler(global_batch, lengths, seed)

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        # Under DeepSpeed the Trainer casts every float input to the model's dtype; bf16
        # would round a reference log-prob of -250.1 to -250, so these travel uncast.
        exact = {key: inputs[key] for key in REFERENCE_KEYS if key in inputs}
        inputs = super()._prepare_inputs({key: value for key, value in inputs.items() if key not in exact})
        inputs.update({key: value.to(self.args.device) for key, value in exact.items()})
        return inputs

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
        objective = self.objective
        policy = score_batch(model, inputs, average=objective.average_logprobs)
        if model.training:  # the positions the forwards ran where the path reports them (prompt-cache), else the layout's
            self.record_metrics({"batch/padding_share": policy.positions or padding_share(inputs)})
        reference = self.reference_logprobs(inputs) if objective.needs_reference else None
        output = objective.compute(policy, reference, inputs["rejected_source_ids"], self.sources)
        self.record_metrics(output.metrics)
        return (output.loss, output.outputs) if return_outputs else output.loss

    def reference_logprobs(self, inputs: dict[str, Any]) -> ResponseLogProbs:
        """The batch's precomputed reference log-probs, else the reference model's."""
        if "reference_chosen_logps" in inputs:
            return ResponseLogProbs(inputs["reference_chosen_logps"], inputs["reference_rejected_logps"], inputs["rejected_mask"])
        if self.reference is None:
            raise RuntimeError("no reference log-probs: the batch has none and no reference model is set")
        with self.accelerator.autocast():  # the precision of the policy's own (prepared) forward
            return self.reference(inputs)

    def record_metrics(self, values: dict[str, tuple[float, float]]) -> None:
        """Add (sum, count) pairs to the running metrics, averaged at the next log."""
        for position, name in enumerate(self._metric_names):
            if name in values:
                total, count = values[name]
                self._metric_sums[position] += total
                self._metric_counts[position] += count

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # A step's log, or the end-of-training summary (which flushes the steps after the
        # last logging step); both come on every process, so the reduction below is matched.
        if "loss" in logs or "train_runtime" in logs:
            sums, counts = self._metric_sums, self._metric_counts
            if self.args.world_size > 1:
                stacked = self.accelerator.reduce(torch.stack([sums, counts]).to(self.args.device), reduction="sum").cpu()
                sums, counts = stacked[0], stacked[1]
            for name, total, count in zip(self._metric_names, sums.tolist(), counts.tolist(), strict=True):
                if count > 0:
                    logs[name] = total / count
            self._metric_sums.zero_()
            self._metric_counts.zero_()
        super().log(logs, start_time)


def example_length(example: Any) -> int:
    """Tokens of an encoded example (prompt once, every response): what length grouping sorts by."""
    return len(example.prompt_ids) + sum(len(ids) for ids in example.responses)


class EpochLengthGroupedSampler(torch.utils.data.Sampler):
    """transformers' length-grouped order (random groups of similar length, the longest batch first), seeded per epoch.

    The order of epoch ``e`` depends on ``seed`` and ``e`` only, so a resumed run (which
    skips the batches already seen) gets the same order as the run it continues.
    """

    def __init__(self, batch_size: int, lengths: list[int], seed: int) -> None:
        self.batch_size, self.lengths, self.seed, self.epoch = batch_size, lengths, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Any:
        from transformers.trainer_pt_utils import get_length_grouped_indices

        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


class JsonlLogCallback(TrainerCallback):
    """Appends every log event, with its step, to ``output_dir/train_log.jsonl``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _write(self, state: Any, entry: dict[str, Any]) -> None:
        if state.is_world_process_zero:
            with self.path.open("a", encoding="utf-8") as stream:
                stream.write(json.dumps({"step": state.global_step, **entry}) + "\n")

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._write(state, {"event": "train_begin"})  # after a resume, step is the checkpoint's

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs:
            self._write(state, logs)


def training_image_root(config: TrainConfig) -> str:
    """The folder record image paths are relative to: ``image_root``, else the data file's folder.

    Data whose images are embedded (``hf`` parquet) has them written once to ``images/``
    beside the file (inside a folder of shards), as :func:`mmsafe.evaluate.benchmarks.load_mmsafe_po` does.
    """
    if config.image_root is not None:
        return config.image_root
    from mmsafe.data.formats import detect_format
    from mmsafe.data.formats.hf import is_hub_id

    path = Path(config.data)
    if is_hub_id(config.data):
        raise ConfigError(f"image_root: data {config.data} is a Hugging Face Hub id whose images are embedded; set image_root to the folder to write them to")
    if path.exists() and detect_format(path) in EMBEDDED_IMAGE_FORMATS:
        return str((path if path.is_dir() else path.parent) / "images")
    return str(path.parent)


def load_training_records(config: TrainConfig) -> list[Any]:
    """The records of ``config.data`` in any format the registry reads (detected), filtered by split.

    Ids must be unique (reference log-probs are cached by id). Every problem is a
    DataError naming file, record and field.
    """
    from mmsafe.data.formats import detect_format, read_records

    path = Path(config.data)
    format_name = detect_format(config.data)  # a DataError for a missing file or an unknown format
    image_dir = training_image_root(config) if format_name in EMBEDDED_IMAGE_FORMATS else None
    records = list(read_records(config.data, format_name, image_dir=image_dir))
    seen: set[str] = set()
    for record in records:
        # Reference log-probs are cached by id: two records under one id would share one.
        if record.id in seen:
            raise DataError("duplicate record id (ids must be unique)", file=str(path), record=record.id, field="id")
        seen.add(record.id)
    if config.split is not None:
        records = [record for record in records if record.meta.get("split", config.split) == config.split]
    if not records:
        raise DataError(f"no records to train on (split: {config.split})", file=str(path))
    return records


def _ordered_sources(sources: Any) -> list[str]:
    return sorted(sources, key=lambda source: (source != "human", source))  # as PreparedData.sources


def check_rejected_sources(config: TrainConfig, records: Sequence[Any]) -> None:
    """Refuse, before any model loads, rejected responses that cannot train what ``config`` asks.

    * a source in ``rejected_sources`` that no record has is refused; one that only some
      records have is refused unless ``allow_partial_sources`` (those without it train
      on the other sources, or are skipped);
    * ``loss: bpo`` (an objective that ``needs_several_rejected``) where no record keeps
      more than one rejected response would train exactly as DPO: refused unless
      ``allow_partial_sources``;
    * ``source_weights`` naming a source that no kept rejected response comes from (it
      would weigh nothing) is refused.

    Errors name the data file and give the number of records with each source.
    """
    objective = config.objective()
    if objective.max_rejected == 0:
        return  # supervised: no rejected response is trained against
    file, total = config.data, len(records)
    having = Counter(source for record in records for source in set(record.rejected_sources))
    counts = ", ".join(f"{source} {having[source]}" for source in _ordered_sources(having))
    summary = f"records with a rejected response from each source, of {total}: {counts}"
    for source in config.rejected_sources or ():
        if having[source] == 0:
            hint = "generate them with `mmsafe blind`, or " if source == "blind" else ""
            raise DataError(f"no record has a rejected response from {source!r} ({summary}); {hint}remove {source} from rejected_sources", file=file, field="rejected_sources")
        if having[source] < total:
            if not config.allow_partial_sources:
                raise DataError(
                    f"only {having[source]} of {total} records have a rejected response from {source!r} ({summary}); "
                    "set allow_partial_sources: true to train anyway (the others train without it)",
                    file=file,
                    field="rejected_sources",
                )
            logger.warning("%s: only %d of %d records have a rejected response from %s; the others train without it", file, having[source], total, source)
    kept = [select_rejected(record, config.rejected_sources, objective.max_rejected) for record in records]
    if objective.needs_several_rejected and max(map(len, kept)) <= 1:
        if not config.allow_partial_sources:
            selected = f" from {', '.join(config.rejected_sources)}" if config.rejected_sources else ""
            raise DataError(
                f"loss: {objective.name}, but no record has more than one rejected response{selected} ({summary}), so BPO would train exactly as DPO; "
                "use loss: dpo, add blind rejected responses with `mmsafe blind`, or set allow_partial_sources: true to train anyway",
                file=file,
                field="rejected",
            )
        logger.warning("%s: no record has more than one rejected response: BPO trains exactly as DPO", file)
    trained = _ordered_sources({source for pairs in kept for _, source in pairs})
    unknown = sorted(set(config.source_weights) - set(trained))
    if unknown:
        raise ConfigError(f"source_weights: no rejected response comes from {', '.join(unknown)} (sources in the data: {', '.join(trained)})")


def training_dtype(config: TrainConfig, device: Any) -> str:
    """The weights dtype of the run: ``dtype: auto`` resolved against the device the model trains on."""
    from mmsafe.models.loading import resolve_dtype

    return str(resolve_dtype(config.dtype, str(device))).removeprefix("torch.")


def load_policy(config: TrainConfig, device: Any = "cpu") -> tuple[Any, Any]:
    """The model and processor, quantized for QLoRA when asked.

    Weights are loaded in :func:`training_dtype` (bf16 on a bf16-capable GPU under
    ``dtype: auto``) and on the training ``device``; under DeepSpeed or FSDP on the CPU,
    which then shards them.
    """
    from mmsafe.models.loading import load_model, load_processor

    if config.quantization == "none":
        sharded = any(key in config.trainer_args for key in ("deepspeed", "fsdp"))
        dtype = training_dtype(config, device)
        loaded = load_model(
            config.model, dtype=dtype, device="cpu" if sharded else str(device), trust_remote_code=config.trust_remote_code, attn_implementation=config.attn_implementation, revision=config.revision
        )
        if dtype != "float32" and config.finetune == "full" and not sharded:
            logger.warning(
                "full fine-tune with %s weights and no fp32 master copy: an update smaller than the weight's resolution (about 1/256 of it for "
                "bf16) is lost, as at learning_rate %g; use DeepSpeed or FSDP mixed precision, LoRA, or dtype: float32", dtype, config.learning_rate,
            )
        return loaded.model, loaded.processor
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(f"quantization: {config.quantization} needs bitsandbytes (pip install 'mmsafe[gpu]')") from None
    if not torch.cuda.is_available():
        raise ConfigError(f"quantization: {config.quantization} needs a CUDA GPU")
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    # Only the language model is quantized: the frozen vision tower is small next to it,
    # and the projector trains in full precision beside the adapters.
    keep = [*VISION_TOWER_NAMES, *PROJECTOR_NAMES, "lm_head"]
    if config.quantization == "4bit":
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True, llm_int8_skip_modules=keep
        )
    else:
        quantization = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            config.model, quantization_config=quantization, use_safetensors=True, trust_remote_code=config.trust_remote_code, revision=config.revision, device_map={"": torch.cuda.current_device()}
        )
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load {config.model} quantized: {error}") from None
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    return model, load_processor(config.model, trust_remote_code=config.trust_remote_code, revision=config.revision)


def disable_dropout(model: Any) -> int:
    """Every dropout of the model set to 0 (modules and the attention's own rate), as TRL does for preference training.

    With dropout, the policy at step 0 is not the reference, and two reference passes
    over one batch differ. LoRA's own dropout (``lora_dropout``) is added afterwards and
    kept. Returns the number of rates changed.
    """
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p:
            module.p = 0.0
            changed += 1
        for name in ("attention_dropout", "attn_dropout", "dropout"):
            value = getattr(module, name, None)
            if isinstance(value, float) and value:
                setattr(module, name, 0.0)
                changed += 1
    if changed:
        logger.info("dropout off: %d dropout rates of the model set to 0 (disable_dropout: false keeps them)", changed)
    return changed


def mixed_precision_context(config: TrainConfig, device: Any) -> Any:
    """The autocast the Trainer's policy forward runs under (``bf16``/``fp16`` mixed precision), for reference scoring."""
    import contextlib

    if config.bf16:
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    if config.trainer_args.get("fp16"):
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.float16)
    return contextlib.nullcontext()


def set_trainable(model: Any, config: TrainConfig) -> Any:
    """Freeze the vision tower (by default), train the projector, full or LoRA language model.

    The parts are found by structure (:func:`mmsafe.models.structure.model_parts`): the
    vision tower is everything the model runs to make image features except the
    projector, whatever its modules are called. LoRA adapters go on the language model's
    layers only; a trainable projector (and a tower that is not frozen) is trained in
    full beside them and saved with the adapter, so turning the adapters off still gives
    the starting model.
    """
    import re

    from mmsafe.models.structure import model_parts

    parts = model_parts(model)
    if config.finetune == "lora":
        from peft import LoraConfig, get_peft_model

        names = "|".join(re.escape(name) for name in config.lora_target_modules)
        saved = [*(parts.projector if config.train_projector else ()), *(() if config.freeze_vision_tower else parts.vision_tower)]
        modules = dict(model.named_modules())
        # PEFT saves modules, not containers: a ModuleList (Qwen3-VL's DeepStack mergers) by its members.
        saved = [
            member
            for name in saved
            if name in modules
            for member in ([f"{name}.{child}" for child, _ in modules[name].named_children()] if isinstance(modules[name], torch.nn.ModuleList | torch.nn.ModuleDict) else [name])
        ]
        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            # A regex: adapters on the language model's layers only, not the vision tower's.
            target_modules=rf"{re.escape(parts.language_model)}\..*\.({names})",
            # Trained in full beside the adapters and saved with them (a bare parameter such
            # as LLaVA-NeXT's image_newline is not a module: with LoRA it stays frozen).
            modules_to_save=[name for name in saved if name in modules] or None,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
        if config.gradient_checkpointing:
            model.enable_input_require_grads()
        if not any("lora_" in name for name, _ in model.named_parameters()):
            raise ConfigError(f"lora_target_modules: {', '.join(config.lora_target_modules)} match no linear layer of the language model {parts.language_model}")
    for name, parameter in model.named_parameters():
        plain = _plain_name(name)
        if parts.is_vision_tower(plain):
            trainable = not config.freeze_vision_tower and (config.finetune == "full" or "modules_to_save" in name)
        elif parts.is_projector(plain):
            trainable = config.train_projector and (config.finetune == "full" or "modules_to_save" in name)
        elif config.finetune == "full":
            trainable = True
        else:
            continue  # LoRA: PEFT has decided (adapters train, base weights stay)
        parameter.requires_grad_(trainable)
    if not parts.vision_tower:
        logger.warning("%s: found no vision tower; nothing frozen", type(model).__name__)
    return model


def _plain_name(name: str) -> str:
    """A parameter name without PEFT's wrapping (base_model.model., modules_to_save.default., original_module.)."""
    name = name.removeprefix("base_model.model.")
    for wrapper in (".modules_to_save.default", ".original_module"):
        name = name.replace(wrapper, "")
    return name


def count_trainable(model: Any) -> int:
    return sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)


def attach_reference(
    config: TrainConfig, model: Any, dataset: PreferenceDataset, collator: PreferenceCollator, encoder: PreferenceEncoder
) -> tuple[str | None, PrecomputeStats]:
    """Precompute (or read from the cache) reference log-probs into the examples.

    Returns the cache file and the precompute's stats: the reference forwards this
    process ran, and the padding of the batches every process ran (its share goes into
    the run summary as ``reference_padding_share``; None when everything came from the cache).
    Precompute is sharded: each process scores an equal share of the examples missing
    from the cache and the shares are exchanged (an object all-gather, so nodes need no
    shared file system); the local main process of each node writes the merged cache.
    """
    from accelerate import PartialState

    stats = PrecomputeStats()
    state = PartialState()
    with state.main_process_first():  # the main process hashes the weights first; the others read its memo
        key = {
            "model": model_fingerprint(config.model, revision=config.revision, memo=file_hash_memo(config.reference_cache_dir)),
            "dtype": weights_dtype(model),  # what the weights were loaded as, not the option (auto)
            "quantization": config.quantization,
            "attn_implementation": config.attn_implementation,
            "average_logprobs": config.average_logprobs,
            "tokenization": encoder.settings(),
            "examples": examples_fingerprint(dataset.examples, encoder.image_root),
        }
        cache = ReferenceCache(config.reference_cache_dir, key)
    logps = cache.load() or {}
    missing = [index for index, example in enumerate(dataset.examples) if example.id not in logps]
    if state.num_processes > 1:
        # Every rank takes part: a rank whose node has the cache still scores its share of
        # what another node lacks, so no rank waits for another to score everything.
        missing = sorted(set().union(*_gather(missing)))
    if missing:
        share = missing[state.process_index :: state.num_processes]
        logger.info(
            "computing reference log-probs for %d of %d examples on this process (%d missing from cache %s, %d process(es))",
            len(share), len(dataset), len(missing), cache.path, state.num_processes,
        )  # fmt: skip
        device = state.device
        model.to(device)
        with mixed_precision_context(config, device):  # as the policy's training forward
            scored = precompute_reference(
                model, _Subset(dataset, share), collator.with_mode("per-response" if collator.mode == "separate" else collator.mode),
                batch_size=max(1, config.per_device_train_batch_size), average=config.average_logprobs, stats=stats,
            )  # fmt: skip
        for part in _gather(scored) if state.num_processes > 1 else [scored]:
            logps.update(part)
        if state.num_processes > 1:  # the padding of the whole precompute, not of this process's share
            counts = _gather((stats.padded_positions, stats.positions))
            stats.padded_positions, stats.positions = sum(padded for padded, _ in counts), sum(total for _, total in counts)
        if state.is_local_main_process:  # one writer per node: nodes without a shared file system each keep a copy
            cache.save(logps)
    else:
        logger.info("reference log-probs read from %s", cache.path)
    for example in dataset.examples:
        example.reference_logps = logps[example.id]
    return str(cache.path), stats


class _Subset:
    """The items of ``dataset`` at ``indices``."""

    def __init__(self, dataset: Any, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[self.indices[index]]


def _gather(value: Any) -> list[Any]:
    """``value`` of every process, in rank order (torch.distributed object all-gather)."""
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def choose_forward_mode(config: TrainConfig, model: Any, dataset: PreferenceDataset, collator: PreferenceCollator) -> ForwardMode:
    """The scoring path for this run, checked on a few of its examples (see :func:`select_forward_mode`).

    The examples checked are the first ones of different prompt lengths, so padding is
    exercised; with ``exactness_check_examples: 0`` the mode is taken unchecked (``auto``
    then picks by architecture alone).
    """
    count = min(config.exactness_check_examples, len(dataset))
    if count == 0:
        if config.forward_mode != "auto":
            return config.forward_mode
        if packed_rows_allowed(model, collator, [dataset[0]])[0]:
            return "shared-prefix"
        cache_allowed = prompt_cache_supported(model)[0] and not config.gradient_checkpointing
        return "prompt-cache" if cache_allowed else "per-response"
    by_length: dict[int, int] = {}
    for index, example in enumerate(dataset.examples):
        by_length.setdefault(len(example.prompt_ids), index)
        if len(by_length) >= count:
            break
    chosen = list(by_length.values())
    chosen += [index for index in range(len(dataset)) if index not in chosen][: count - len(chosen)]
    mode, _ = select_forward_mode(model, collator, [dataset[index] for index in chosen], config.forward_mode, gradient_checkpointing=config.gradient_checkpointing)
    return mode


def train(config: TrainConfig) -> TrainResult:
    """Run the objective ``config`` names (SFT, DPO or BPO); returns what happened (also in train_summary.json)."""
    from transformers import set_seed

    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    set_seed(config.seed)
    arguments = config.training_arguments()  # checks the trainer options before the slow part
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and arguments.world_size != launched:  # also sets up the process group, before anything else does
        raise ConfigError(f"{launched} processes were launched but they did not form one training group (world size {arguments.world_size}); check the accelerate config")

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
    reference_model = FrozenCopyReference(model, average=objective.average_logprobs) if objective.needs_reference and config.reference == "copy" else None
    model = set_trainable(model, config)
    trainable = count_trainable(model)
    if trainable == 0:
        raise ConfigError("nothing to train: every parameter is frozen (check finetune, train_projector)")

    image_root = training_image_root(config)
    encoder = PreferenceEncoder.for_model(
        model, processor, image_root, max_length=config.max_length, image_mode=config.image_mode, prompt_style=config.prompt_style,
        length_rule=config.length_rule,
    )
    recipe = build_recipe(processor, prompt_style=encoder.prompt_style, image_mode=encoder.image_mode, max_length=encoder.max_length, dtype=model_dtype(model))
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
        raise ConfigError(f"source_weights: no rejected response comes from {', '.join(unknown)} (sources in the data: {', '.join(prepared.sources)})")
    dataset = PreferenceDataset(prepared.examples, encoder)
    collator = PreferenceCollator(encoder.tokenizer.pad_token_id, prepared.sources, mode="per-response", encoder=encoder)
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
