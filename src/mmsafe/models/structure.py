"""What a vision-language model is made of, read from its structure rather than its name.

Every image-text-to-text model in transformers wraps an inner model whose children are
the language model (``language_model``, or ``text_model`` in Idefics3 and SmolVLM) and
the vision side: the tower that turns pixels into features, and the projector that maps
them into the language model's space (``multi_modal_projector``, Idefics3's
``connector``, Qwen-VL's ``visual.merger`` and Qwen3-VL's DeepStack mergers). The
language model is found as the model's decoder; everything else on the inner model is
the vision side, and within it the projector is what projects, the tower the rest.

Also here: which processor outputs continue over response tokens and how, and which
architectures the packed shared-prefix row is exact for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Module names that project vision features into the language model (never the tower).
PROJECTOR_PARTS = ("projector", "connector", "merger", "image_newline")


@dataclass(frozen=True)
class ModelParts:
    """Dotted module names (as in ``model.named_modules()``) of a model's parts."""

    language_model: str
    vision_tower: tuple[str, ...]
    projector: tuple[str, ...]

    def is_vision_tower(self, parameter_name: str) -> bool:
        return any(_under(parameter_name, name) for name in self.vision_tower)

    def is_projector(self, parameter_name: str) -> bool:
        return any(_under(parameter_name, name) for name in self.projector)


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _base(model: Any) -> Any:
    while hasattr(model, "module"):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def model_parts(model: Any) -> ModelParts:
    """The language model, vision tower and projector of ``model`` (a PEFT model too)."""
    base = _base(model)
    names = {id(module): name for name, module in base.named_modules()}
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if decoder is None or id(decoder) not in names:
        raise ValueError(f"{type(base).__name__}: cannot find the language model (get_decoder)")
    language_model = names[id(decoder)]
    parent_name = language_model.rpartition(".")[0]
    parent = base.get_submodule(parent_name) if parent_name else base
    tower: list[str] = []
    projector: list[str] = []
    for child_name, child in parent.named_children():
        full = f"{parent_name}.{child_name}" if parent_name else child_name
        if full == language_model:
            continue
        if any(part in child_name for part in PROJECTOR_PARTS):
            projector.append(full)
            continue
        inner_projectors = [
            f"{full}.{name}" for name, _ in child.named_children() if any(part in name for part in PROJECTOR_PARTS)
        ]
        if inner_projectors:  # Qwen-VL: the merger(s) live inside `visual`
            projector.extend(inner_projectors)
            tower.extend(
                f"{full}.{name}" for name, _ in child.named_children() if f"{full}.{name}" not in inner_projectors
            )
            tower.extend(f"{full}.{name}" for name, _ in child.named_parameters(recurse=False))
        else:
            tower.append(full)
    for name, _ in parent.named_parameters(recurse=False):  # LLaVA-NeXT's image_newline
        full = f"{parent_name}.{name}" if parent_name else name
        (projector if any(part in name for part in PROJECTOR_PARTS) else tower).append(full)
    return ModelParts(language_model=language_model, vision_tower=tuple(tower), projector=tuple(projector))


def text_config(model: Any) -> Any:
    config = _base(model).config
    return getattr(config, "text_config", None) or config


def uses_multimodal_rope(model: Any) -> bool:
    """3-D (M-RoPE) positions, as Qwen-VL: a 1-D position tensor is wrong for them."""
    config = text_config(model)
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return isinstance(rope, dict) and (
        "mrope_section" in rope or rope.get("type") == "mrope" or rope.get("rope_type") == "mrope"
    )


def is_hybrid(model: Any) -> bool:
    """A language model with layers that are not attention (convolution, linear attention):
    those ignore attention masks, so responses packed in one row would read each other."""
    layer_types = getattr(text_config(model), "layer_types", None) or []
    return any(kind not in ("full_attention", "sliding_attention", "attention") for kind in layer_types)


def has_cross_attention(model: Any) -> bool:
    return bool(getattr(text_config(model), "cross_attention_layers", None))


def packing_supported(model: Any, per_token_keys: set[str] | frozenset[str] = frozenset()) -> tuple[bool, str]:
    """Can responses share one row under a block attention mask for this model?

    Only a plain causal decoder with 1-D positions qualifies: M-RoPE positions, per-token
    processor outputs (token types for bidirectional image attention), cross-attention and
    mask-blind layers all break it. Returns (supported, reason when not).
    """
    if uses_multimodal_rope(model):
        return False, "3-D M-RoPE positions"
    if is_hybrid(model):
        return False, "layers that ignore the attention mask (convolution or linear attention)"
    if has_cross_attention(model):
        return False, "cross-attention to the image"
    if per_token_keys:
        return False, f"per-token processor outputs ({', '.join(sorted(per_token_keys))})"
    base = _base(model)
    if getattr(base.config, "model_type", "") in _BIDIRECTIONAL_IMAGE_MODELS:
        return False, "bidirectional attention inside the image"
    return True, ""


def prompt_cache_supported(model: Any) -> tuple[bool, str]:
    """Can responses be scored against the prompt's key/value cache, with gradients?

    Attention caches (full, sliding window, Mllama's cross-attention states) are plain
    tensors that can be repeated for the responses and carry gradients. The recurrent
    state of convolution and linear-attention layers is written in place (and cannot be
    repeated in this transformers), so hybrid models score per response. Gradient
    checkpointing turns the cache off. Returns (supported, reason when not).
    """
    if is_hybrid(model):
        return False, "recurrent layers whose cached state is written in place"
    base = _base(model)
    if getattr(base, "is_activation_checkpointing", None) or (
        not hasattr(base, "is_activation_checkpointing") and getattr(base, "is_gradient_checkpointing", False)
    ):
        return False, "gradient checkpointing (which turns the key/value cache off)"
    return True, ""


_BIDIRECTIONAL_IMAGE_MODELS = ("gemma3", "paligemma")

#: How a per-token processor output continues over response tokens, by (model type, key).
#: PaliGemma marks the answer (the suffix) with token type 1: the prefix attends both ways,
#: the answer causally. Everywhere else a response token is plain text (0), and Mllama's
#: cross-attention mask repeats the prompt's last row (as its generation does).
_TOKEN_TYPE_OF_RESPONSE = {"paligemma": 1}


def response_token_fill(model_type: str | None, key: str, prompt_part: Any) -> Any:
    """The value of per-token output ``key`` at a response position, given the prompt's [P, ...] values."""
    if key == "cross_attention_mask":
        return prompt_part[-1]
    if key == "token_type_ids":
        return _TOKEN_TYPE_OF_RESPONSE.get(model_type or "", 0)
    return 0
