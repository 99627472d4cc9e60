"""The policy of a run: loaded (quantized for QLoRA when asked), what trains, and how it is scored.

:func:`load_policy` loads the model in the run's dtype on its device; :func:`set_trainable`
freezes the vision tower, trains the projector and puts LoRA adapters (or full training)
on the language model; :func:`choose_forward_mode` picks the scoring path, checked on a
few of the run's examples.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from mmsafe.errors import ConfigError, ModelError
from mmsafe.models.structure import prompt_cache_supported
from mmsafe.train.config import TrainConfig
from mmsafe.train.data import ForwardMode, PreferenceCollator, PreferenceDataset
from mmsafe.train.forward import packed_rows_allowed, select_forward_mode

logger = logging.getLogger(__name__)

#: Parameter-name fragments of the parts of a vision-language model, for quantization:
#: modules left in full precision.
VISION_TOWER_NAMES = ("vision_tower", "vision_model", "visual", "vision_encoder")
PROJECTOR_NAMES = ("multi_modal_projector", "mm_projector", "connector", "merger")


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
            config.model,
            dtype=dtype,
            device="cpu" if sharded else str(device),
            trust_remote_code=config.trust_remote_code,
            attn_implementation=config.attn_implementation,
            revision=config.revision,
        )
        if dtype != "float32" and config.finetune == "full" and not sharded:
            logger.warning(
                "full fine-tune with %s weights and no fp32 master copy: an update smaller than the weight's resolution (about 1/256 of it for "
                "bf16) is lost, as at learning_rate %g; use DeepSpeed or FSDP mixed precision, LoRA, or dtype: float32",
                dtype,
                config.learning_rate,
            )
        return loaded.model, loaded.processor
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"quantization: {config.quantization} needs bitsandbytes (pip install 'mmsafe[gpu]')"
        ) from None
    if not torch.cuda.is_available():
        raise ConfigError(f"quantization: {config.quantization} needs a CUDA GPU")
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    # Only the language model is quantized: the frozen vision tower is small next to it,
    # and the projector trains in full precision beside the adapters.
    keep = [*VISION_TOWER_NAMES, *PROJECTOR_NAMES, "lm_head"]
    if config.quantization == "4bit":
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
            llm_int8_skip_modules=keep,
        )
    else:
        quantization = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            config.model,
            quantization_config=quantization,
            use_safetensors=True,
            trust_remote_code=config.trust_remote_code,
            revision=config.revision,
            device_map={"": torch.cuda.current_device()},
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
        saved = [
            *(parts.projector if config.train_projector else ()),
            *(() if config.freeze_vision_tower else parts.vision_tower),
        ]
        modules = dict(model.named_modules())
        # PEFT saves modules, not containers: a ModuleList (Qwen3-VL's DeepStack mergers) by its members.
        saved = [
            member
            for name in saved
            if name in modules
            for member in (
                [f"{name}.{child}" for child, _ in modules[name].named_children()]
                if isinstance(modules[name], torch.nn.ModuleList | torch.nn.ModuleDict)
                else [name]
            )
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
            raise ConfigError(
                f"lora_target_modules: {', '.join(config.lora_target_modules)} match no linear layer of the language model {parts.language_model}"
            )
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


def choose_forward_mode(
    config: TrainConfig, model: Any, dataset: PreferenceDataset, collator: PreferenceCollator
) -> ForwardMode:
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
    mode, _ = select_forward_mode(
        model,
        collator,
        [dataset[index] for index in chosen],
        config.forward_mode,
        gradient_checkpointing=config.gradient_checkpointing,
    )
    return mode
