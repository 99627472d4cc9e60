"""A trained model's input recipe: how its inputs were built, saved beside its weights.

A model answers best in the form it was trained on: the same prompt text (the
processor's chat template or the raw LLaVA-v1 ``USER: ... ASSISTANT:`` form), the same
image preparation, the same token limit and the same weights dtype. Training writes these
into ``mmsafe_recipe.json`` in every ``checkpoint-N`` folder, in the final model's folder
and in the LoRA-merged one; generation, blind responses, pairwise accuracy, probes and
the pipeline read it (:func:`resolve_inputs`) for every setting they are not given.

An explicit setting (a CLI flag, a config value, a keyword argument) always wins. A
model without a recipe (a Hub id, a checkpoint made elsewhere) gets :data:`DEFAULTS`,
the one place these defaults are defined (training's own defaults included).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from mmsafe.errors import ModelError

logger = logging.getLogger(__name__)

RECIPE_FILE = "mmsafe_recipe.json"
#: The recipe file's own format version (a newer mmsafe may add keys; unknown ones are ignored).
RECIPE_FORMAT = 1

PROMPT_STYLES = ("chat-template", "llava-v1")
IMAGE_MODES = ("pad", "resize", "none")
DTYPES = ("auto", "float32", "bfloat16", "float16")

#: Final: its type is the literal, so it is a valid PromptStyle default.
DEFAULT_PROMPT_STYLE: Final = "chat-template"
DEFAULT_IMAGE_MODE = "pad"
DEFAULT_MAX_LENGTH = 768
DEFAULT_DTYPE = "auto"
#: The input settings of a model without a recipe, everywhere (training's defaults too).
DEFAULTS: dict[str, Any] = {
    "prompt_style": DEFAULT_PROMPT_STYLE,
    "image_mode": DEFAULT_IMAGE_MODE,
    "max_length": DEFAULT_MAX_LENGTH,
    "dtype": DEFAULT_DTYPE,
}
#: The settings a recipe gives, in the order they are logged.
SETTINGS = tuple(DEFAULTS)


@dataclass(frozen=True)
class Recipe:
    """How a model's inputs were built when it was trained.

    ``template`` is the prompt form actually rendered: ``chat-template`` (the processor's
    template, whose text hashes to ``template_sha256``) or ``llava-v1`` (asked for, or the
    fallback of a processor without a template).
    """

    prompt_style: str
    image_mode: str
    max_length: int
    dtype: str
    template: str
    template_sha256: str | None = None
    mmsafe_version: str | None = None
    format: int = RECIPE_FORMAT
    #: Where it was read from (not saved).
    path: str | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("path")
        return data

    @classmethod
    def from_dict(cls, data: Any, *, path: str | None = None) -> Recipe:
        where = path or "recipe"
        if not isinstance(data, dict):
            raise ModelError(f"{where}: expected a JSON object")

        def get(name: str, choices: Sequence[str] | None = None) -> Any:
            value = data.get(name)
            if value is None:
                raise ModelError(f"{where}: no {name}")
            if choices is not None and value not in choices:
                raise ModelError(f"{where}: {name} must be one of {', '.join(choices)}, got {value!r}")
            return value

        max_length = get("max_length")
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
            raise ModelError(f"{where}: max_length must be an integer of at least 2, got {max_length!r}")
        return cls(
            prompt_style=get("prompt_style", PROMPT_STYLES),
            image_mode=get("image_mode", IMAGE_MODES),
            max_length=max_length,
            dtype=get("dtype", DTYPES),
            template=data["template"] if data.get("template") in PROMPT_STYLES else get("prompt_style"),
            template_sha256=data.get("template_sha256"),
            mmsafe_version=data.get("mmsafe_version"),
            format=data.get("format", RECIPE_FORMAT),
            path=path,
        )


def chat_template_text(processor: Any) -> str | None:
    """The processor's chat template (its tokenizer's where it has none itself), as text."""
    template = getattr(processor, "chat_template", None)
    if not template:
        template = getattr(getattr(processor, "tokenizer", None), "chat_template", None)
    if not template:
        return None
    return template if isinstance(template, str) else json.dumps(template, sort_keys=True)


def template_sha256(processor: Any) -> str | None:
    text = chat_template_text(processor)
    return None if text is None else hashlib.sha256(text.encode("utf-8")).hexdigest()


def rendered_template(processor: Any, prompt_style: str) -> str:
    """The prompt form :func:`mmsafe.models.prompts.render_prompt` writes for this processor."""
    return (
        "chat-template" if prompt_style == "chat-template" and chat_template_text(processor) is not None else "llava-v1"
    )


def model_dtype(model: Any) -> str:
    """The dtype most of the model's floating-point weights are in (``float32``, ``bfloat16``, ...)."""
    counts: dict[str, int] = {}
    for parameter in model.parameters():
        if parameter.is_floating_point():
            name = str(parameter.dtype).removeprefix("torch.")
            counts[name] = counts.get(name, 0) + parameter.numel()
    if not counts:
        return DEFAULT_DTYPE
    dtype = max(counts, key=lambda name: counts[name])
    return dtype if dtype in DTYPES else DEFAULT_DTYPE


def build_recipe(processor: Any, *, prompt_style: str, image_mode: str, max_length: int, dtype: str) -> Recipe:
    """The recipe of a model trained with these settings and this processor."""
    from mmsafe import __version__

    template = rendered_template(processor, prompt_style)
    return Recipe(
        prompt_style=prompt_style,
        image_mode=image_mode,
        max_length=max_length,
        dtype=dtype,
        template=template,
        template_sha256=template_sha256(processor) if template == "chat-template" else None,
        mmsafe_version=__version__,
    )


def save_recipe(recipe: Recipe, directory: str | Path) -> Path:
    """Write ``directory/mmsafe_recipe.json`` (whole or not at all)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / RECIPE_FILE
    temporary = path.with_name(f".{RECIPE_FILE}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(recipe.to_dict(), indent=2) + "\n", encoding="utf-8")
    temporary.replace(path)
    return path


def load_recipe(model_path: str | Path | None) -> Recipe | None:
    """The recipe saved with a local model folder; None for a Hub id or a folder without one.

    A recipe file that cannot be read is an error naming it (it is never silently ignored).
    """
    if model_path is None:
        return None
    folder = Path(model_path)
    path = folder / RECIPE_FILE
    if not folder.is_dir() or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelError(f"{path}: cannot read the model's input recipe ({error}); fix or remove the file") from None
    return Recipe.from_dict(data, path=str(path))


def find_recipe(model_path: str | Path | None, adapter: str | Path | None = None) -> Recipe | None:
    """The recipe of a model given as a folder, or of the adapter put on it (which wins)."""
    if adapter is not None:
        recipe = load_recipe(adapter)
        if recipe is not None:
            return recipe
    return load_recipe(model_path)


@dataclass(frozen=True)
class InputSettings:
    """The settings a command uses, and where each came from (``given``, ``recipe`` or ``default``)."""

    prompt_style: str
    image_mode: str
    max_length: int
    dtype: str
    recipe: Recipe | None
    origins: dict[str, str]

    def describe(self, names: Sequence[str] = SETTINGS) -> str:
        return ", ".join(f"{name}={getattr(self, name)} ({self.origins[name]})" for name in names)


def resolve_inputs(
    model: str | Path | None,
    *,
    adapter: str | Path | None = None,
    recipe: Recipe | None = None,
    used: Sequence[str] = SETTINGS,
    **given: Any,
) -> InputSettings:
    """Each setting: the value given (not None), else the model's recipe's, else :data:`DEFAULTS`.

    ``given`` holds ``prompt_style``, ``image_mode``, ``max_length`` and ``dtype`` (None:
    not given). ``recipe`` is used instead of looking one up for ``model``. The outcome is
    logged for the settings in ``used``.
    """
    unknown = sorted(set(given) - set(SETTINGS))
    if unknown:
        raise TypeError(f"resolve_inputs: unknown settings {', '.join(unknown)}")
    if recipe is None:
        recipe = find_recipe(model, adapter)
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for name in SETTINGS:
        if given.get(name) is not None:
            values[name], origins[name] = given[name], "given"
        elif recipe is not None:
            values[name], origins[name] = getattr(recipe, name), "recipe"
        else:
            values[name], origins[name] = DEFAULTS[name], "default"
    settings = InputSettings(**values, recipe=recipe, origins=origins)
    shown = model if model is not None else adapter
    if recipe is not None:
        applied = [name for name in used if origins[name] == "recipe"]
        overridden = [name for name in used if origins[name] == "given" and values[name] != getattr(recipe, name)]
        logger.info(
            "%s: input recipe %s: %s%s",
            shown,
            recipe.path or RECIPE_FILE,
            ("applied " + ", ".join(f"{name}={values[name]}" for name in applied))
            if applied
            else "nothing applied (every setting given)",
            (
                "; given instead of the recipe's: "
                + ", ".join(f"{name}={values[name]} (recipe: {getattr(recipe, name)})" for name in overridden)
            )
            if overridden
            else "",
        )
        for name in (name for name in overridden if name in ("prompt_style", "image_mode")):
            logger.warning(
                "%s was trained with %s=%s; it runs with %s=%s as asked",
                shown,
                name,
                getattr(recipe, name),
                name,
                values[name],
            )
    else:
        logger.info("%s: no input recipe (%s); %s", shown, RECIPE_FILE, settings.describe(used))
    return settings


def check_template(recipe: Recipe | None, processor: Any, name: Any = "the model") -> bool:
    """Warn when the processor's chat template is not the one the model was trained with.

    Returns whether they match (True when there is nothing to compare).
    """
    if recipe is None or recipe.template != "chat-template" or recipe.template_sha256 is None:
        return True
    current = template_sha256(processor)
    if current == recipe.template_sha256:
        return True
    logger.warning(
        "%s: the processor's chat template %s the one the model was trained with (%s); prompts may not be in the form it learned",
        name,
        "is missing, unlike" if current is None else "differs from",
        recipe.path or RECIPE_FILE,
    )
    return False
