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
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from mmsafe.errors import ModelError

if TYPE_CHECKING:
    from transformers import ProcessorMixin

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


def check_safetensors_file(path: Path) -> None:
    """Refuse a ``.safetensors`` file whose header cannot be read (truncated, not
    safetensors, bad JSON header, offsets past the end): one ModelError naming it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except Exception as error:  # safetensors raises its own SafetensorError, or OSError, ValueError
        raise ModelError(
            f"{path}: not a readable safetensors file ({str(error).strip() or type(error).__name__}); expected an 8-byte header length, "
            "a JSON header and the tensors it lists (re-save the checkpoint with save_pretrained)"
        ) from None


def check_safetensors(directory: Path, *, weights_prefix: str = "model") -> None:
    """Refuse a local checkpoint whose weights exist only in a pickle format, or whose
    safetensors files have a header that cannot be read."""
    safetensors = sorted(directory.glob("*.safetensors"))
    if safetensors:
        for path in safetensors:
            check_safetensors_file(path)
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


#: Fields of ``adapter_config.json`` checked before PEFT reads it: name, allowed types, what is expected.
_ADAPTER_FIELDS: tuple[tuple[str, tuple[type, ...], str], ...] = (
    ("peft_type", (str,), 'a string such as "LORA"'),
    ("base_model_name_or_path", (str, type(None)), "a model directory or Hub id"),
    ("r", (int,), "a positive integer"),
    ("lora_alpha", (int, float), "a number"),
    ("lora_dropout", (int, float), "a number"),
    ("target_modules", (str, list, type(None)), "a module name pattern or a list of module names"),
    ("modules_to_save", (list, type(None)), "a list of module names or null"),
)


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    """The checked ``adapter_config.json`` of an adapter directory.

    Invalid JSON, a value that is not an object, or a field of the wrong type is one
    ModelError naming the file, the field and what was expected.
    """
    from mmsafe.data.jsonl import loads_bounded
    from mmsafe.errors import MmsafeError

    file = Path(path) / "adapter_config.json"
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ModelError(f"{file}: not valid UTF-8 ({error.reason}); expected a PEFT adapter config (JSON)") from None
    try:
        config = loads_bounded(text, str(file))
    except MmsafeError as error:  # nested too deep
        raise ModelError(f"{error}; expected a PEFT adapter config (a JSON object)") from None
    except json.JSONDecodeError as error:
        raise ModelError(
            f"{file}: malformed JSON ({error.msg} at line {error.lineno} column {error.colno}); expected a PEFT adapter config (a JSON object)"
        ) from None
    if not isinstance(config, dict):
        raise ModelError(f"{file}: expected a JSON object (a PEFT adapter config), got {type(config).__name__}")
    for name, types, expected in _ADAPTER_FIELDS:
        if name not in config:
            continue
        value = config[name]
        wrong = not isinstance(value, types) or isinstance(value, bool)
        if not wrong and name == "r":
            wrong = value <= 0
        if not wrong and isinstance(value, list):
            wrong = not all(isinstance(item, str) for item in value)
        if wrong:
            raise ModelError(f"{file}: field {name!r}: expected {expected}, got {value!r:.80}")
    return config


def adapter_base_model(path: str | Path) -> str:
    base = read_adapter_config(path).get("base_model_name_or_path")
    if not base:
        raise ModelError(f"{path}/adapter_config.json: no base_model_name_or_path; pass the base model explicitly")
    return base


def torchvision_available() -> bool:
    """Can torchvision be imported here? (Its wheels on PyPI do not load beside a CPU torch.)"""
    from transformers.utils import is_torchvision_available

    return is_torchvision_available()


def image_only_processor_class(processor_class: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """``processor_class`` without its video processor (which needs torchvision).

    mmsafe never sends videos. Processors of the Qwen-VL family (and others) construct a
    video processor, whose classes exist only with torchvision; where torchvision cannot
    be loaded, the same processor class is used with its image processor and tokenizer
    alone, so these models still run (and save) on such a machine.
    """

    def get_attributes(cls: type) -> list[str]:
        return [name for name in processor_class.get_attributes() if "video" not in name]

    subclass = type(
        processor_class.__name__,
        (processor_class,),
        {"get_attributes": classmethod(get_attributes), "__module__": processor_class.__module__},
    )
    return cast("type[ProcessorMixin]", subclass)


def pixtral_processor_class() -> type[ProcessorMixin]:
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
        stand_in.get_resize_output_image_size = image_processing_pil_pixtral.get_resize_output_image_size  # type: ignore[attr-defined]  # a module built here
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
        # None is the default revision at run time; transformers annotates it as str
        return pixtral_processor_class().from_pretrained(name, trust_remote_code=trust_remote_code, revision=revision)  # type: ignore[arg-type]
    if class_name:
        processor_class = processor_class_from_name(class_name)
    else:
        processor_class = PROCESSOR_MAPPING[
            type(AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code, revision=revision))
        ]
    attributes = processor_class.get_attributes()
    if not any("video" in attribute for attribute in attributes):
        raise ModelError(f"{name}: the processor {processor_class.__name__} cannot be loaded")
    kwargs: dict[str, Any] = {}
    if config_file.is_file():
        settings = json.loads(config_file.read_text(encoding="utf-8"))
        init_arguments = set(inspect.signature(processor_class.__init__).parameters)
        kwargs = {key: value for key, value in settings.items() if key in init_arguments and key not in attributes}
    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code, revision=revision)
    image_processor = AutoImageProcessor.from_pretrained(
        name, trust_remote_code=trust_remote_code, revision=revision, backend="pil"
    )
    if "chat_template" not in kwargs and getattr(tokenizer, "chat_template", None):
        kwargs["chat_template"] = tokenizer.chat_template
    template_file = local / "chat_template.jinja"
    if template_file.is_file():
        kwargs["chat_template"] = template_file.read_text(encoding="utf-8")
    image_only = image_only_processor_class(processor_class)
    logger.info(
        "torchvision is not available: %s is built without its video processor (mmsafe sends no videos)",
        processor_class.__name__,
    )
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


#: A Hub repository id: ``name`` or ``owner/name``, letters, digits, ``-``, ``_`` and ``.``.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")


def looks_like_path(name: str) -> bool:
    """Does ``name`` read as a local path rather than a Hub id?

    It does when it starts with ``.``, ``/`` or ``~``, holds a backslash or more than one
    ``/``, or its first part (``models`` of ``models/tiny``) is a local folder.
    """
    if name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1:
        return True
    return "/" in name and Path(name.split("/", 1)[0]).is_dir()


def _missing_folder_message(name: str, what: str) -> str:
    import difflib

    path = Path(name).expanduser()
    parent = path.parent if str(path.parent) else Path(".")
    message = f"{what} {name}: no such model directory ({path.absolute()})"
    if parent.is_dir():
        near = difflib.get_close_matches(path.name, [child.name for child in parent.iterdir() if child.is_dir()], n=3)
        if near:
            message += f"; {parent} holds {', '.join(near)}"
    else:
        message += f"; the folder {parent.absolute()} does not exist either"
    return message


def check_model_name(name: str | Path, *, revision: str | None = None, what: str = "model") -> str:
    """Check a model reference before anything heavy is imported or loaded; return its kind.

    ``local``: an existing folder. ``hub``: a Hub id the Hub knows, or one in the local
    cache (when ``HF_HUB_OFFLINE`` is set, or the Hub cannot be reached: the rest of the
    load then stays offline rather than retrying each file). A path-like name that does
    not exist, a name that is neither a path nor a Hub id, an unknown repository or an
    unreachable Hub without a cached copy raise :class:`ModelError` (one line), in a second
    or so, with no retries.
    """
    name = str(name)
    if Path(name).expanduser().exists():
        return "local"
    if (name, revision) in _HUB_CHECKED:
        return "hub"
    if looks_like_path(name):
        raise ModelError(_missing_folder_message(name, what))
    if not _HUB_ID.fullmatch(name) or "--" in name or ".." in name or name.endswith(".git"):
        raise ModelError(
            f"{what} {name!r}: neither a local folder nor a Hub id (owner/name, letters, digits, '-', '_' and '.')"
        )
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    cached = isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str)
    if constants.is_offline_mode():
        if cached:
            _HUB_CHECKED.add((name, revision))
            return "hub"
        raise ModelError(
            f"{what} {name}: not a local folder, and not in the Hugging Face cache while HF_HUB_OFFLINE is set (download it first, or unset HF_HUB_OFFLINE)"
        )
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(name, revision=revision, timeout=_HUB_CHECK_TIMEOUT_S)  # one request: no retries
    except GatedRepoError:
        raise ModelError(
            f"{what} {name}: a gated repository on the Hub; accept its terms on huggingface.co and log in (hf auth login, or HF_TOKEN)"
        ) from None
    except RepositoryNotFoundError:
        raise ModelError(
            f"{what} {name}: not a local folder, and no such model on the Hugging Face Hub (or it is private: log in with hf auth login, or HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise ModelError(f"{what} {name}: the Hub has no revision {revision!r} of it") from None
    except HfHubHTTPError as error:
        if not cached:
            raise ModelError(
                f"{what} {name}: the Hugging Face Hub answered {error.response.status_code if error.response is not None else 'an error'} and no copy is cached"
            ) from None
        _go_offline(name)
    except Exception as error:  # the network (DNS, refused, timeout): httpx and OS errors
        if not cached:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ModelError(
                f"{what} {name}: not a local folder, and the Hugging Face Hub cannot be reached ({reason}) with no cached copy; "
                "check the network (or HF_ENDPOINT), or set HF_HUB_OFFLINE=1 to use cached models only"
            ) from None
        _go_offline(name)
    _HUB_CHECKED.add((name, revision))
    return "hub"


#: Hub ids already checked in this process (the check is one request; it is not repeated).
_HUB_CHECKED: set[tuple[str, str | None]] = set()


#: Seconds the one Hub request of :func:`check_model_name` may take.
_HUB_CHECK_TIMEOUT_S = 10.0


def _go_offline(name: str) -> None:
    """The Hub is unreachable but ``name`` is cached: load from the cache, without retrying each file."""
    import os

    from huggingface_hub import constants

    logger.warning(
        "the Hugging Face Hub cannot be reached: %s is loaded from the local cache (HF_HUB_OFFLINE=1 for the rest of this run)",
        name,
    )
    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"


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
    if not Path(str(name_or_path)).expanduser().exists():  # before transformers is imported: a typo fails at once
        check_model_name(name_or_path, revision=revision)
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
    else:
        check_model_name(name, revision=revision)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    kwargs: dict[str, Any] = {
        "dtype": torch_dtype,
        "use_safetensors": True,
        "trust_remote_code": trust_remote_code,
        "revision": revision,
    }
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForImageTextToText.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load an image-text-to-text model from {name}: {error}") from None
    processor_source = adapter if adapter is not None and (Path(adapter) / "processor_config.json").exists() else name
    processor = load_processor(
        processor_source, trust_remote_code=trust_remote_code, revision=None if processor_source != name else revision
    )
    if adapter is not None:
        model = apply_adapter(model, adapter, merge=merge_adapter)
    model.to(device)  # type: ignore[arg-type]  # transformers wraps .to in functools.wraps, which mypy does not bind to the instance
    model.eval()
    return LoadedModel(model=model, processor=processor, name=str(name_or_path))


def apply_adapter(model: Any, adapter: str | Path, *, merge: bool = False, trainable: bool = False) -> Any:
    """Put a PEFT adapter (safetensors weights only) on a loaded model."""
    from peft import PeftModel

    adapter_dir = Path(adapter)
    if not is_adapter_dir(adapter_dir):
        raise ModelError(f"{adapter_dir}: not a PEFT adapter directory (no adapter_config.json)")
    read_adapter_config(adapter_dir)
    check_safetensors(adapter_dir, weights_prefix="adapter")
    try:
        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
    except (
        OSError,
        ValueError,
        TypeError,
        KeyError,
        AttributeError,
        RuntimeError,
    ) as error:  # a config or weights PEFT cannot use
        raise ModelError(
            f"{adapter_dir}: cannot apply the PEFT adapter ({type(error).__name__}: {str(error)[:300]}); expected an adapter saved by PEFT for this base model"
        ) from None
    if merge:
        model = model.merge_and_unload()
    return model
