"""Load any Hugging Face image-text-to-text model and its processor.

One loader for a local directory or a Hub id. Weights are read from safetensors only
(a pickle checkpoint can run code when loaded), and ``trust_remote_code`` stays off
unless the caller turns it on. A directory holding a PEFT adapter is loaded onto its
base model.
"""

from __future__ import annotations

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
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
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


def load_processor(name_or_path: str | Path, *, trust_remote_code: bool = False, revision: str | None = None) -> Any:
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load a processor from {name_or_path}: {error}") from None


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
