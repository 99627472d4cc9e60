"""DPO / BPO training on ``transformers.Trainer``.

:func:`train` reads top to bottom: load the records and the model, decide what trains,
tokenize, get reference log-probs, train (resuming from the last checkpoint), save the
model with its processor and the resolved config. Everything the Trainer offers through
``TrainingArguments`` (schedulers, accumulation, bf16, gradient checkpointing,
``report_to``, DeepSpeed, FSDP via ``accelerate launch``) works unchanged, because the
only thing :class:`PreferenceTrainer` changes is how the loss is computed and logged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from mmsafe.config import save_config
from mmsafe.errors import ConfigError, DataError, ModelError
from mmsafe.models.structure import prompt_cache_supported
from mmsafe.train.config import TrainConfig
from mmsafe.train.data import PreferenceCollator, PreferenceDataset, PreferenceEncoder, prepare_examples
from mmsafe.train.forward import ResponseLogProbs, packed_rows_allowed, score_batch, select_forward_mode
from mmsafe.train.losses import PreferenceLoss, bpo_loss, dpo_loss, sft_loss
from mmsafe.train.reference import (
    DisabledAdapterReference,
    FrozenCopyReference,
    PrecomputeStats,
    ReferenceCache,
    examples_fingerprint,
    model_fingerprint,
    precompute_reference,
)

logger = logging.getLogger(__name__)

#: Parameter-name fragments of the parts of a vision-language model, for quantization:
#: modules left in full precision.
VISION_TOWER_NAMES = ("vision_tower", "vision_model", "visual", "vision_encoder")
PROJECTOR_NAMES = ("multi_modal_projector", "mm_projector", "connector", "merger")
REFERENCE_KEYS = ("reference_chosen_logps", "reference_rejected_logps")
CONFIG_FILE = "train_config.yaml"
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
    metrics: dict[str, float] = field(default_factory=dict)

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
            "trainable_parameters": self.trainable_parameters,
            "forward_mode": self.forward_mode,
            "metrics": self.metrics,
        }


class PreferenceTrainer(Trainer):
    """A Trainer whose loss is DPO or BPO over log-probs from :func:`score_batch`.

    ``reference`` is called for batches that carry no precomputed reference log-probs.
    ``sources`` names the rejected sources, for the per-source logs.
    """

    def __init__(self, *args: Any, config: TrainConfig, sources: Sequence[str], reference: Any | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.preference_config = config
        self.sources = list(sources)
        self.reference = reference
        # The loss is a mean over examples, not over tokens: let the Trainer divide it by
        # the accumulation steps itself (it would not, for a model whose forward takes **kwargs).
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        weights = [config.source_weights.get(source, 1.0) for source in self.sources] + [1.0]
        self.source_weights = torch.tensor(weights)
        self._metric_names = self._make_metric_names()
        self._metric_sums = torch.zeros(len(self._metric_names), dtype=torch.float64)
        self._metric_counts = torch.zeros(len(self._metric_names), dtype=torch.float64)

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

    def _make_metric_names(self) -> list[str]:
        names = ["logps/chosen", "rewards/chosen", "rewards/accuracy", "rewards/margin"]
        for source in self.sources:
            names += [f"logps/rejected_{source}", f"rewards/rejected_{source}", f"rewards/margin_{source}", f"rewards/accuracy_{source}"]
        return names

    def preference_loss(self, policy: ResponseLogProbs, reference: ResponseLogProbs, source_ids: torch.Tensor) -> PreferenceLoss:
        config = self.preference_config
        if config.loss == "dpo":
            return dpo_loss(
                policy.chosen, policy.rejected[:, 0], reference.chosen, reference.rejected[:, 0],
                beta=config.beta, label_smoothing=config.label_smoothing, loss_type=config.loss_type,
            )  # fmt: skip
        weights = self.source_weights.to(source_ids.device)[source_ids.clamp(min=0)]
        return bpo_loss(
            policy.chosen, policy.rejected, reference.chosen, reference.rejected, beta=config.beta, weights=weights,
            label_smoothing=config.label_smoothing, loss_type=config.loss_type, rejected_mask=policy.rejected_mask,
        )  # fmt: skip

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        # Under DeepSpeed the Trainer casts every float input to the model's dtype; bf16
        # would round a reference log-prob of -250.1 to -250, so these travel uncast.
        exact = {key: inputs[key] for key in REFERENCE_KEYS if key in inputs}
        inputs = super()._prepare_inputs({key: value for key, value in inputs.items() if key not in exact})
        inputs.update({key: value.to(self.args.device) for key, value in exact.items()})
        return inputs

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
        if self.preference_config.loss == "sft":
            policy = score_batch(model, inputs, average=True)
            loss = sft_loss(policy.chosen)
            self._record({"logps/chosen": (policy.chosen.detach().sum().item(), policy.chosen.numel())})
            return (loss, {}) if return_outputs else loss
        average = self.preference_config.average_logprobs
        policy = score_batch(model, inputs, average=average)
        if "reference_chosen_logps" in inputs:
            reference = ResponseLogProbs(inputs["reference_chosen_logps"], inputs["reference_rejected_logps"], inputs["rejected_mask"])
        elif self.reference is not None:
            reference = self.reference(inputs)
        else:
            raise RuntimeError("no reference log-probs: the batch has none and no reference model is set")
        result = self.preference_loss(policy, reference, inputs["rejected_source_ids"])
        self._record_metrics(policy, result, inputs["rejected_source_ids"])
        return (result.loss, {"chosen_rewards": result.chosen_rewards}) if return_outputs else result.loss

    @torch.no_grad()
    def _record_metrics(self, policy: ResponseLogProbs, result: PreferenceLoss, source_ids: torch.Tensor) -> None:
        """Running sums for the logs: overall and per rejected source (human, blind, ...)."""

        def columns(tensor: torch.Tensor) -> torch.Tensor:
            return tensor if tensor.dim() == 2 else tensor.unsqueeze(1)  # DPO gives [B], BPO [B, K]

        margins, rejected_rewards, mask = columns(result.margins), columns(result.rejected_rewards), columns(result.rejected_mask)
        width = margins.shape[1]  # DPO uses only the first rejected slot
        source_ids = source_ids[:, :width]
        rejected_logps = policy.rejected[:, :width]
        values: dict[str, tuple[float, float]] = {}
        values["logps/chosen"] = (policy.chosen.sum().item(), policy.chosen.numel())
        values["rewards/chosen"] = (result.chosen_rewards.sum().item(), result.chosen_rewards.numel())
        values["rewards/accuracy"] = ((margins > 0)[mask].float().sum().item(), mask.sum().item())
        values["rewards/margin"] = (margins[mask].sum().item(), mask.sum().item())
        for index, source in enumerate(self.sources):
            selected = mask & (source_ids == index)
            count = selected.sum().item()
            values[f"logps/rejected_{source}"] = (rejected_logps[selected].sum().item(), count)
            values[f"rewards/rejected_{source}"] = (rejected_rewards[selected].sum().item(), count)
            values[f"rewards/margin_{source}"] = (margins[selected].sum().item(), count)
            values[f"rewards/accuracy_{source}"] = ((margins[selected] > 0).float().sum().item(), count)
        self._record(values)

    def _record(self, values: dict[str, tuple[float, float]]) -> None:
        """Add (sum, count) pairs to the running metrics, averaged at the next log."""
        for position, name in enumerate(self._metric_names):
            if name in values:
                total, count = values[name]
                self._metric_sums[position] += total
                self._metric_counts[position] += count

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # the same on every process, so the reduction below is matched
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


def last_complete_checkpoint(output_dir: Path) -> str | None:
    """The newest ``checkpoint-N`` that was saved to the end.

    The Trainer writes ``trainer_state.json`` last; a run killed while saving leaves a
    folder without it, which is passed over (with a warning) instead of failing the resume.
    """
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    if not output_dir.is_dir():
        return None
    found = []
    for path in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        suffix = path.name[len(PREFIX_CHECKPOINT_DIR) + 1 :]
        if path.is_dir() and suffix.isdigit():
            found.append((int(suffix), path))
    for _, path in sorted(found, reverse=True):
        if (path / "trainer_state.json").is_file():
            return str(path)
        logger.warning("ignoring %s: incomplete (the run stopped while saving it)", path)
    return None


def keeps_chosen(record_id: str, share: float) -> bool:
    """Whether a record is among the ``share`` that keep their chosen response (a fixed hash of the id)."""
    digest = hashlib.sha256(record_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def load_training_records(config: TrainConfig) -> list[Any]:
    from mmsafe.data.records import read_preference_records

    path = Path(config.data)
    if not path.is_file():
        raise DataError("data file not found (expected preference records as JSONL)", file=str(path))
    records = list(read_preference_records(path))
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


def load_policy(config: TrainConfig) -> tuple[Any, Any]:
    """The model and processor, quantized for QLoRA when asked."""
    from mmsafe.models.loading import load_model, load_processor

    if config.quantization == "none":
        loaded = load_model(
            config.model, dtype=config.dtype, device="cpu", trust_remote_code=config.trust_remote_code, attn_implementation=config.attn_implementation
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
            config.model, quantization_config=quantization, use_safetensors=True, trust_remote_code=config.trust_remote_code, device_map={"": torch.cuda.current_device()}
        )
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load {config.model} quantized: {error}") from None
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    return model, load_processor(config.model, trust_remote_code=config.trust_remote_code)


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
) -> tuple[str | None, int]:
    """Precompute (or read from the cache) reference log-probs into the examples.

    Returns the cache file and the number of reference forwards run. The main process
    computes and writes; the others then read the same file.
    """
    from accelerate import PartialState

    key = {
        "model": model_fingerprint(config.model),
        "dtype": config.dtype,
        "quantization": config.quantization,
        "attn_implementation": config.attn_implementation,
        "average_logprobs": config.average_logprobs,
        "tokenization": encoder.settings(),
        "examples": examples_fingerprint(dataset.examples, encoder.image_root),
    }
    cache = ReferenceCache(config.reference_cache_dir, key)
    stats = PrecomputeStats()
    state = PartialState()
    with state.main_process_first():
        logps = cache.load()
        if logps is None or any(example.id not in logps for example in dataset.examples):
            logger.info("computing reference log-probs for %d examples (cache %s)", len(dataset), cache.path)
            device = state.device
            model.to(device)
            logps = precompute_reference(
                model, dataset, collator.with_mode("per-response" if collator.mode == "separate" else collator.mode), batch_size=max(1, config.per_device_train_batch_size), average=config.average_logprobs, stats=stats
            )
            if state.is_main_process:
                cache.save(logps)
        else:
            logger.info("reference log-probs read from %s", cache.path)
    for example in dataset.examples:
        example.reference_logps = logps[example.id]
    return str(cache.path), stats.forwards


def choose_forward_mode(config: TrainConfig, model: Any, dataset: PreferenceDataset, collator: PreferenceCollator) -> str:
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
    """Run DPO or BPO as ``config`` says; returns what happened (also in train_summary.json)."""
    from transformers import set_seed

    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    set_seed(config.seed)
    arguments = config.training_arguments()  # checks the trainer options before the slow part
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and arguments.world_size != launched:  # also sets up the process group, before anything else does
        raise ConfigError(f"{launched} processes were launched but they did not form one training group (world size {arguments.world_size}); check the accelerate config")

    records = load_training_records(config)
    supervised = config.loss == "sft"
    if supervised and config.sft_target == "rejected":
        records = [record if keeps_chosen(record.id, config.sft_chosen_share) else dataclasses.replace(record, chosen=record.rejected[0]) for record in records]
    model, processor = load_policy(config)
    reference_model = FrozenCopyReference(model, average=config.average_logprobs) if config.reference == "copy" and not supervised else None
    model = set_trainable(model, config)
    trainable = count_trainable(model)
    if trainable == 0:
        raise ConfigError("nothing to train: every parameter is frozen (check finetune, train_projector)")

    image_root = config.image_root if config.image_root is not None else str(Path(config.data).parent)
    encoder = PreferenceEncoder.for_model(
        model, processor, image_root, max_length=config.max_length, image_mode=config.image_mode, prompt_style=config.prompt_style
    )
    prepared = prepare_examples(
        records,
        encoder,
        data_file=config.data,
        rejected_sources=config.rejected_sources,
        max_rejected={"dpo": 1, "sft": 0}.get(config.loss),
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

    cache_path, reference_forwards = None, 0
    reference: Any = reference_model
    if supervised:
        pass  # supervised warm-up: no reference model
    elif config.reference == "precomputed":
        cache_path, reference_forwards = attach_reference(config, model, dataset, collator, encoder)
    elif config.reference == "adapters-disabled":
        reference = DisabledAdapterReference(model, average=config.average_logprobs)

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
    )
    last_checkpoint = last_complete_checkpoint(output_dir) if config.resume else None
    if last_checkpoint:
        logger.info("resuming from %s", last_checkpoint)
    outcome = trainer.train(resume_from_checkpoint=last_checkpoint)

    trainer.save_model(str(output_dir))
    if trainer.is_world_process_zero():
        processor.save_pretrained(str(output_dir))
        save_config(config, output_dir / CONFIG_FILE)
        if config.merge_lora:
            merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
            merged.save_pretrained(str(output_dir / "merged"), safe_serialization=True)
            processor.save_pretrained(str(output_dir / "merged"))
    if reference is not None:
        reference_forwards += reference.forwards
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
        metrics={key: value for key, value in outcome.metrics.items() if isinstance(value, int | float)},
    )
    # The last logged values of the preference metrics (rewards/accuracy, ...), for callers.
    for entry in trainer.state.log_history:
        result.metrics.update({key: value for key, value in entry.items() if key in trainer._metric_names})
    if trainer.is_world_process_zero():
        (output_dir / SUMMARY_FILE).write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    return result
