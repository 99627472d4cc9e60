"""Load any Hugging Face image-text-to-text model and its processor.

One loader for a local directory or a Hub id. Weights are read from safetensors only
(a pickle checkpoint can run code when loaded), and ``trust_remote_code`` stays off
unless the caller turns it on. A directory holding a PEFT adapter is loaded onto its
base model.
"""

from __future__ import annotations

import inspect
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmsafe.errors import ModelError

logger = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class LoadedModel:
    """A model ready to use, with the processor that prepares its inputs."""

    model: Any
    processor: Any
    name: str

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype not in DTYPES:
        raise ModelError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "auto":  # bf16 on a GPU that supports it, fp16 on one that does not, fp32 on CPU
        if not device.startswith("cuda"):
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, dtype)


def check_safetensors(directory: Path, *, weights_prefix: str = "model") -> None:
    """Refuse a local checkpoint whose weights exist only in a pickle format."""
    safetensors = list(directory.glob("*.safetensors"))
    if safetensors:
        return
    pickled = [path.name for path in directory.iterdir() if path.suffix in _PICKLE_SUFFIXES]
    if pickled:
        raise ModelError(
            f"{directory}: only pickle weights found ({', '.join(sorted(pickled))}); mmsafe loads safetensors only, "
            "because loading a pickle can run arbitrary code. Convert the checkpoint to safetensors first "
            "(load it once in a trusted environment and call save_pretrained(..., safe_serialization=True))."
        )
    raise ModelError(f"{directory}: no {weights_prefix} weights (*.safetensors) found")


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def adapter_base_model(path: str | Path) -> str:
    config = json.loads((Path(path) / "adapter_config.json").read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path")
    if not base:
        raise ModelError(f"{path}/adapter_config.json: no base_model_name_or_path; pass the base model explicitly")
    return base


def torchvision_available() -> bool:
    """Can torchvision be imported here? (Its wheels on PyPI do not load beside a CPU torch.)"""
    from transformers.utils import is_torchvision_available

    return is_torchvision_available()


def image_only_processor_class(processor_class: type) -> type:
    """``processor_class`` without its video processor (which needs torchvision).

    mmsafe never sends videos. Processors of the Qwen-VL family (and others) construct a
    video processor, whose classes exist only with torchvision; where torchvision cannot
    be loaded, the same processor class is used with its image processor and tokenizer
    alone, so these models still run (and save) on such a machine.
    """

    def get_attributes(cls: type) -> list[str]:
        return [name for name in processor_class.get_attributes() if "video" not in name]

    return type(processor_class.__name__, (processor_class,), {"get_attributes": classmethod(get_attributes), "__module__": processor_class.__module__})


def pixtral_processor_class() -> type:
    """The real ``PixtralProcessor`` class, also where torchvision cannot be imported.

    ``transformers.PixtralProcessor`` is declared to need torchvision, and its module imports
    one helper (``get_resize_output_image_size``, used only to count image tokens) from the
    torchvision image processor's module, which imports torchvision at its top. Without
    torchvision, that module is stood in for, during this one import, by one holding the PIL
    image processor module's identical helper; the processor itself uses the image
    processor it is given (``PixtralImageProcessorPil`` here) and nothing from torchvision.
    """
    import sys
    import types

    try:
        from transformers.models.pixtral.processing_pixtral import PixtralProcessor
    except ImportError:
        from transformers.models.pixtral import image_processing_pil_pixtral

        name = "transformers.models.pixtral.image_processing_pixtral"
        stand_in = types.ModuleType(name)
        stand_in.get_resize_output_image_size = image_processing_pil_pixtral.get_resize_output_image_size
        previous = sys.modules.get(name)
        sys.modules[name] = stand_in
        sys.modules.pop("transformers.models.pixtral.processing_pixtral", None)
        try:
            from transformers.models.pixtral.processing_pixtral import PixtralProcessor
        finally:
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
    return PixtralProcessor


def _load_processor_without_video(name: str, *, trust_remote_code: bool, revision: str | None) -> Any:
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING, processor_class_from_name

    local = Path(name)
    class_name = None
    config_file = local / "processor_config.json"
    if config_file.is_file():
        class_name = json.loads(config_file.read_text(encoding="utf-8")).get("processor_class")
    if class_name == "PixtralProcessor":
        return pixtral_processor_class().from_pretrained(name, trust_remote_code=trust_remote_code, revision=revision)
    if class_name:
        processor_class = processor_class_from_name(class_name)
    else:
        processor_class = PROCESSOR_MAPPING[type(AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code, revision=revision))]
    attributes = processor_class.get_attributes()
    if not any("video" in attribute for attribute in attributes):
        raise ModelError(f"{name}: the processor {processor_class.__name__} cannot be loaded")
    kwargs: dict[str, Any] = {}
    if config_file.is_file():
        settings = json.loads(config_file.read_text(encoding="utf-8"))
        init_arguments = set(inspect.signature(processor_class.__init__).parameters)
        kwargs = {key: value for key, value in settings.items() if key in init_arguments and key not in attributes}
    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code, revision=revision)
    image_processor = AutoImageProcessor.from_pretrained(name, trust_remote_code=trust_remote_code, revision=revision, backend="pil")
    if "chat_template" not in kwargs and getattr(tokenizer, "chat_template", None):
        kwargs["chat_template"] = tokenizer.chat_template
    template_file = local / "chat_template.jinja"
    if template_file.is_file():
        kwargs["chat_template"] = template_file.read_text(encoding="utf-8")
    image_only = image_only_processor_class(processor_class)
    logger.info("torchvision is not available: %s is built without its video processor (mmsafe sends no videos)", processor_class.__name__)
    return image_only(image_processor=image_processor, tokenizer=tokenizer, **kwargs)


def load_processor(name_or_path: str | Path, *, trust_remote_code: bool = False, revision: str | None = None) -> Any:
    from transformers import AutoProcessor

    name = str(name_or_path)
    try:
        return AutoProcessor.from_pretrained(name, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError, AttributeError, ImportError, TypeError) as error:
        if not torchvision_available():
            try:
                return _load_processor_without_video(name, trust_remote_code=trust_remote_code, revision=revision)
            except ModelError:
                pass
            except (OSError, ValueError, KeyError, TypeError) as second:
                raise ModelError(
                    f"cannot load a processor from {name}: {error}; without torchvision (not importable here) "
                    f"building it without its video processor failed too: {second}. Install a torchvision that "
                    "matches your torch build."
                ) from None
        raise ModelError(f"cannot load a processor from {name}: {error}") from None


def load_model(
    name_or_path: str | Path,
    *,
    dtype: str = "auto",
    device: str = "auto",
    adapter: str | Path | None = None,
    merge_adapter: bool = False,
    trust_remote_code: bool = False,
    revision: str | None = None,
    attn_implementation: str | None = None,
) -> LoadedModel:
    """Load an image-text-to-text model and its processor.

    Args:
        name_or_path: a local checkpoint directory or a Hub id. A directory with an
            ``adapter_config.json`` is a PEFT adapter: its base model is loaded and the
            adapter applied (the processor is taken from the adapter directory when it
            has one, else from the base).
        dtype: ``auto`` (bf16 on a GPU that supports it, else fp32), ``float32``,
            ``bfloat16`` or ``float16``.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``, ...
        adapter: a PEFT adapter directory to apply on top of ``name_or_path``.
        merge_adapter: merge the adapter into the weights (faster inference, no PEFT).
        trust_remote_code: run model code shipped with the checkpoint. Off by default.
    """
    from transformers import AutoModelForImageTextToText
    from transformers.utils import logging as transformers_logging

    from mmsafe.progress import progress_enabled

    if not progress_enabled():  # transformers' own bars follow mmsafe's setting
        transformers_logging.disable_progress_bar()
    name = str(name_or_path)
    if adapter is None and Path(name).is_dir() and is_adapter_dir(name):
        adapter, name = name, adapter_base_model(name)
    local = Path(name)
    if local.exists():
        if not local.is_dir():
            raise ModelError(f"{local}: expected a checkpoint directory")
        check_safetensors(local)
    elif name.startswith((".", "/")) or name.count("/") > 1:
        raise ModelError(f"{name}: no such model directory (and not a Hub id of the form owner/name)")
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "use_safetensors": True, "trust_remote_code": trust_remote_code, "revision": revision}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForImageTextToText.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load an image-text-to-text model from {name}: {error}") from None
    processor_source = adapter if adapter is not None and (Path(adapter) / "processor_config.json").exists() else name
    processor = load_processor(processor_source, trust_remote_code=trust_remote_code, revision=None if processor_source != name else revision)
    if adapter is not None:
        model = apply_adapter(model, adapter, merge=merge_adapter)
    model.to(device)
    model.eval()
    return LoadedModel(model=model, processor=processor, name=str(name_or_path))


def apply_adapter(model: Any, adapter: str | Path, *, merge: bool = False, trainable: bool = False) -> Any:
    """Put a PEFT adapter (safetensors weights only) on a loaded model."""
    from peft import PeftModel

    adapter_dir = Path(adapter)
    if not is_adapter_dir(adapter_dir):
        raise ModelError(f"{adapter_dir}: not a PEFT adapter directory (no adapter_config.json)")
    if not (adapter_dir / "adapter_model.safetensors").exists():
        check_safetensors(adapter_dir, weights_prefix="adapter")
    model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
    if merge:
        model = model.merge_and_unload()
    return model
