"""The one typed configuration of a training run: YAML files and ``key=value`` overrides.

Every field is documented here once; ``mmsafe train --help`` lists them. The resolved
config is written beside the checkpoint (``train_config.yaml``).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass
from typing import Any, Literal

from mmsafe.config import option
from mmsafe.errors import ConfigError
from mmsafe.models.recipe import DEFAULT_DTYPE, DEFAULT_IMAGE_MODE, DEFAULT_MAX_LENGTH, DEFAULT_PROMPT_STYLE
from mmsafe.progress import progress_enabled

ReferenceMode = Literal["precomputed", "copy", "adapters-disabled"]

#: TrainingArguments set from typed fields of TrainConfig (not allowed in ``trainer_args``).
TYPED_TRAINING_ARGUMENTS = (
    "output_dir",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "bf16",
    "gradient_checkpointing",
    "activation_checkpointing",
    "logging_steps",
    "save_steps",
    "save_total_limit",
    "seed",
    "report_to",
    "remove_unused_columns",
)


#: report_to loggers: the modules any of which transformers uses, and mmsafe's extra that installs one.
LOGGER_PACKAGES: dict[str, tuple[tuple[str, ...], str | None]] = {
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
    "wandb": (("wandb",), "wandb"),
    "mlflow": (("mlflow",), None),
    "comet_ml": (("comet_ml",), None),
    "clearml": (("clearml",), None),
    "dvclive": (("dvclive",), None),
    "trackio": (("trackio",), None),
}


@dataclass
class TrainConfig:
    """Preference training of an image-text-to-text model with DPO or BPO."""

    model: str = option(help="base model: a local checkpoint directory or a Hub id (llava-hf/llava-1.5-7b-hf)")
    data: str = option(
        help="preference data in any format `mmsafe data convert` reads (records .jsonl, released .json, .parquet), detected from the file"
    )
    output_dir: str = option(help="where checkpoints, the final model and train_config.yaml are written", flag="out")
    revision: str | None = option(
        None,
        help="Hub id only: the branch, tag or commit to load (null: main); the reference cache is keyed by the commit it resolves to",
    )
    image_root: str | None = option(None, help="folder image paths are relative to (default: the data file's folder)")
    split: str | None = option(
        None, help="train only on records whose meta.split equals this (records without one are kept); null: all"
    )
    limit: int | None = option(None, help="train on the first N records (after the split); null: all")

    loss: Literal["bpo", "dpo", "sft"] = option(
        "bpo",
        help="bpo: chosen against every rejected response (sum of K DPO terms); dpo: against the first one only; sft: plain supervised warm-up on one response",
    )
    sft_target: Literal["chosen", "rejected"] = option(
        "chosen",
        help="loss sft only: imitate the chosen response, or the first rejected one (a deliberately unsafe starting model for demos)",
    )
    sft_chosen_share: float = option(
        0.0,
        help="loss sft with sft_target rejected only: this share of the records (picked by a hash of the id) imitate the chosen response instead, giving a partly safe starting model",
    )
    rejected_sources: list[str] | None = option(
        None, help="rejected sources to use, e.g. [human] or [human, blind]; null: all", comma=True
    )
    source_weights: dict[str, float] = option(
        default_factory=dict,
        help="BPO weight per rejected source (missing sources weigh 1.0), e.g. {blind: 0.5}",
        pairs=True,
    )
    allow_partial_sources: bool = option(
        False,
        help="train even when a source named in rejected_sources is missing from some records (they train without it), or when loss bpo finds "
        "no record with more than one rejected response (BPO is then plain DPO); false: such runs are refused before the model loads",
    )
    loss_type: Literal["sigmoid", "ipo"] = option("sigmoid", help="sigmoid (DPO) or ipo")
    beta: float = option(0.1, help="strength of the KL penalty: reward = beta * log(pi / pi_ref)")
    label_smoothing: float = option(
        0.0, help="conservative DPO: assumed probability that a preference label is flipped (sigmoid only)"
    )
    average_logprobs: bool = option(False, help="use the mean instead of the sum of token log-probs per response")

    forward_mode: Literal["auto", "shared-prefix", "prompt-cache", "per-response", "separate"] = option(
        "auto",
        help="auto: the first of shared-prefix, prompt-cache, per-response that this architecture allows and that is exact on this model; "
        "shared-prefix: image and prompt computed once per example in one packed row (plain causal decoders only); "
        "prompt-cache: the prompt and image once per example, its responses scored against the prompt's key/value cache "
        "(every attention architecture; not with gradient checkpointing); "
        "per-response: one row per response through the model's own forward (exact on every architecture); "
        "separate: the release's one-row-per-pair baseline",
    )
    exactness_check_examples: int = option(
        4,
        help="before training, score this many examples with the chosen path and one sequence at a time; a path that differs is refused (0: no check)",
    )
    reference: ReferenceMode = option(
        "precomputed",
        help="precomputed: reference log-probs computed once before training and cached on disk; copy: a frozen copy of the model; adapters-disabled: LoRA only, the same model with adapters off",
    )
    reference_cache_dir: str | None = option(
        None,
        help="folder of the reference log-prob cache (default: $MMSAFE_CACHE/reference or ~/.cache/mmsafe/reference)",
    )

    max_length: int = option(
        DEFAULT_MAX_LENGTH,
        help="most tokens of prompt + one response (image tokens included); longer responses are cut, longer prompts skipped",
    )
    length_rule: Literal["cut", "release"] = option(
        "cut",
        help="cut: responses longer than max_length allows are cut; release: as the public release, a record whose prompt + chosen does not fit is skipped (and counted), a rejected one cut",
    )
    image_mode: Literal["pad", "resize", "none"] = option(
        DEFAULT_IMAGE_MODE, help="pad: square on the processor's mean colour (the release); resize; none"
    )
    prompt_style: Literal["chat-template", "llava-v1"] = option(
        DEFAULT_PROMPT_STYLE, help="how prompts are rendered: the processor's chat template or the raw LLaVA-v1 form"
    )
    skip_bad_images: bool = option(
        False, help="skip (and count) records whose image is missing or unreadable instead of stopping with an error"
    )

    finetune: Literal["full", "lora"] = option(
        "full", help="full: every language-model weight trains; lora: PEFT adapters on target_modules"
    )
    freeze_vision_tower: bool = option(True, help="keep the vision encoder frozen (the release does)")
    train_projector: bool = option(True, help="train the vision-to-language projector (the release does)")
    lora_r: int = option(16, help="LoRA rank")
    lora_alpha: int = option(32, help="LoRA scaling numerator (scale = alpha / r)")
    lora_dropout: float = option(0.05, help="dropout on the LoRA input")
    lora_target_modules: list[str] = option(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        help="names of language-model linear layers that get adapters",
        comma=True,
    )
    quantization: Literal["none", "4bit", "8bit"] = option(
        "none", help="QLoRA: load the base model quantized with bitsandbytes (GPU and the gpu extra needed)"
    )
    merge_lora: bool = option(
        False, help="after LoRA training, also merge the adapters and save full weights in output_dir/merged"
    )

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        DEFAULT_DTYPE,
        help="weights dtype (auto: bf16 on a GPU that supports it, fp16 on one that does not, fp32 on CPU; resolved for the device the model trains on)",
    )
    attn_implementation: str | None = option(
        None, help="attention kernel (sdpa, eager); shared-prefix needs one that takes a 4-D mask"
    )
    trust_remote_code: bool = option(False, help="run model code shipped with the checkpoint")

    learning_rate: float = option(1e-6, help="peak learning rate")
    lr_scheduler_type: str = option("cosine", help="transformers scheduler name: cosine, linear, constant, ...")
    warmup_steps: int = option(10, help="linear warm-up steps")
    num_train_epochs: float = option(1.0, help="epochs over the data (ignored when max_steps > 0)")
    max_steps: int = option(-1, help="stop after this many optimizer steps (-1: use num_train_epochs)")
    per_device_train_batch_size: int = option(1, help="examples per device per micro-batch")
    gradient_accumulation_steps: int = option(1, help="micro-batches per optimizer step")
    group_by_length: bool = option(
        True,
        help="batch examples of similar length together (random groups, fixed per epoch by the seed), for little padding; the share of padding is logged as batch/padding_share",
    )
    bf16: bool = option(False, help="bf16 mixed precision (autocast; the reference is scored under the same autocast)")
    disable_dropout: bool = option(
        True,
        help="set every dropout of the model to 0, as TRL does for preference training (lora_dropout still applies)",
    )
    gradient_checkpointing: bool = option(False, help="recompute activations in the backward pass to save memory")
    logging_steps: int = option(1, help="log every N optimizer steps")
    save_steps: int = option(500, help="save a resumable checkpoint every N steps")
    save_total_limit: int | None = option(2, help="keep at most this many checkpoints")
    seed: int = option(42, help="random seed (data order, adapter initialisation)")
    report_to: list[str] = option(
        default_factory=list, help="logging integrations: tensorboard, wandb, ... (none by default)", comma=True
    )
    resume: str | bool = option(
        "auto",
        help="auto (or true): continue the newest complete checkpoint in output_dir if the data and settings are those the run started with "
        "(run_fingerprint.json), else refuse, listing what changed; force: continue even so (the changes are logged and kept beside "
        "train_config.yaml); never (or false): start fresh, refused where output_dir already holds checkpoints (use a new output_dir)",
    )
    trainer_args: dict[str, Any] = option(
        default_factory=dict,
        help="any other transformers.TrainingArguments, by name (deepspeed, fsdp, optim, weight_decay, ...)",
        pairs=True,
    )

    def __post_init__(self) -> None:
        if isinstance(self.resume, bool):  # YAML true / false, as before resume took a mode
            self.resume = "auto" if self.resume else "never"
        if not isinstance(self.resume, str) or self.resume not in ("auto", "never", "force"):
            raise ConfigError(f"resume: expected auto, never, force, true or false, got {self.resume!r}")
        self.check_numbers()
        if self.beta <= 0:
            raise ConfigError(f"beta: expected a positive number, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing: expected a number in [0, 0.5), got {self.label_smoothing}")
        if self.loss_type == "ipo" and self.label_smoothing:
            raise ConfigError("label_smoothing: applies to loss_type sigmoid only")
        if not 0.0 <= self.sft_chosen_share <= 1.0:
            raise ConfigError(f"sft_chosen_share: expected a number in [0, 1], got {self.sft_chosen_share}")
        if self.max_length < 2:
            raise ConfigError(f"max_length: expected at least 2, got {self.max_length}")
        if self.reference == "adapters-disabled" and self.finetune != "lora":
            raise ConfigError(
                "reference: adapters-disabled needs finetune: lora (a full fine-tune has no adapters to turn off)"
            )
        if self.quantization != "none" and self.finetune != "lora":
            raise ConfigError(
                f"quantization: {self.quantization} weights cannot be trained directly; use finetune: lora (QLoRA)"
            )
        if self.merge_lora and self.finetune != "lora":
            raise ConfigError("merge_lora: only meaningful with finetune: lora")
        if self.attn_implementation and "flash" in self.attn_implementation and self.forward_mode == "shared-prefix":
            raise ConfigError(
                "attn_implementation: shared-prefix scoring needs a 4-D attention mask (sdpa or eager), not flash attention"
            )
        if self.forward_mode == "prompt-cache" and self.gradient_checkpointing:
            raise ConfigError(
                "forward_mode: prompt-cache scores against the prompt's key/value cache, which gradient checkpointing turns off; use auto or per-response"
            )
        if self.source_weights and not self.objective().weighs_sources:
            raise ConfigError(
                f"source_weights: only loss bpo weighs rejected sources; loss {self.loss} would ignore them (remove source_weights or use loss: bpo)"
            )
        for source, weight in self.source_weights.items():
            if weight < 0:
                raise ConfigError(f"source_weights.{source}: expected a weight >= 0, got {weight}")
        self.check_loggers()
        self.check_trainer_args()

    def objective(self) -> Any:
        """The :class:`mmsafe.train.objectives.Objective` that ``loss`` names, with this config's settings."""
        from mmsafe.train.objectives import OBJECTIVES, objective_for

        if self.loss not in OBJECTIVES:
            raise ConfigError(f"loss: expected one of {', '.join(OBJECTIVES)}, got {self.loss!r}")
        return objective_for(self)

    def check_loggers(self) -> None:
        """Each ``report_to`` logger is installed: one line naming the extra, before any model loads."""
        import importlib.util

        names = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to)
        for name in names:
            if name in ("none", "all"):
                continue
            modules, extra = LOGGER_PACKAGES.get(name, ((name,), None))
            if not any(importlib.util.find_spec(module) is not None for module in modules):
                how = f'pip install "mmsafe[{extra}]"' if extra else f"pip install {modules[0]}"
                raise ConfigError(f"report_to: {name} is not installed; install it ({how}) or remove it from report_to")

    def check_numbers(self) -> None:
        """Every float option finite, the step and size options in range: before any model loads."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{field.name}: expected a finite number, got {value}")
            if isinstance(value, dict):
                for key, item in value.items():
                    if isinstance(item, float) and not math.isfinite(item):
                        raise ConfigError(f"{field.name}.{key}: expected a finite number, got {item}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate: expected a positive number, got {self.learning_rate}")
        for name, least in (
            ("per_device_train_batch_size", 1),
            ("gradient_accumulation_steps", 1),
            ("logging_steps", 1),
            ("save_steps", 1),
            ("warmup_steps", 0),
        ):
            if getattr(self, name) < least:
                raise ConfigError(f"{name}: expected an integer >= {least}, got {getattr(self, name)}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(
                f"max_steps: expected a positive number of steps, or -1 to train num_train_epochs, got {self.max_steps}"
            )
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ConfigError(
                f"num_train_epochs: expected a positive number (max_steps is -1), got {self.num_train_epochs}"
            )

    def check_trainer_args(self) -> None:
        from transformers import TrainingArguments

        known = set(inspect.signature(TrainingArguments).parameters)
        for name in self.trainer_args:
            if name in TYPED_TRAINING_ARGUMENTS:
                raise ConfigError(f"trainer_args.{name}: set it as the top-level option {name} instead")
            if name not in known:
                raise ConfigError(f"trainer_args.{name}: not a transformers.TrainingArguments parameter")

    def training_arguments(self) -> Any:
        """The ``transformers.TrainingArguments`` of this run."""
        from transformers import TrainingArguments

        values = {name: getattr(self, name) for name in TYPED_TRAINING_ARGUMENTS if hasattr(self, name)}
        values["remove_unused_columns"] = False  # the collator's keys are not forward() arguments
        values["report_to"] = list(self.report_to) or "none"
        parameters = inspect.signature(TrainingArguments).parameters
        # transformers 5 renamed gradient_checkpointing to activation_checkpointing (the old name warns).
        if "activation_checkpointing" in parameters:
            values["activation_checkpointing"] = values.pop("gradient_checkpointing")
        values["disable_tqdm"] = not progress_enabled()  # MMSAFE_PROGRESS, as every other stage
        values["dataloader_pin_memory"] = _has_accelerator()  # pinning helps host-to-GPU copies only
        values.update(self.trainer_args)
        if _launched_processes() > 1 and not _has_accelerator():
            # Several processes on a machine without GPUs: DDP over gloo. Without use_cpu the
            # processes would not join one group and each would train alone.
            values.setdefault("use_cpu", True)
        try:
            return TrainingArguments(**values)
        except (ValueError, TypeError) as error:
            raise ConfigError(f"training arguments: {error}") from None


def _launched_processes() -> int:
    """How many processes the launcher (accelerate launch, torchrun) started."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
