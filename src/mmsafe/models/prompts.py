"""Prompts for a model: messages rendered through its processor's chat template.

Training and generation both build prompts here, so a model is trained on exactly the
text it is later asked with. A response's token ids are the span the model's own chat
template gives the assistant turn: the whole conversation is tokenized and the prompt's
ids are checked to be its prefix (:func:`response_token_ids`), so no tokenizer quirk at
the boundary (the legacy Llama form's lone ``▁`` before a string that starts with a
space, a second BOS) reaches training, and the answer ends with the template's own
end-of-turn token.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

from mmsafe.data.conversations import render_llava_v1, to_chat_messages, without_image
from mmsafe.data.records import Message

logger = logging.getLogger(__name__)

PromptStyle = Literal["chat-template", "llava-v1"]
#: LLaVA-style templates end the prompt with "ASSISTANT:"; the answer starts after a space.
RESPONSE_SEPARATOR = " "


def has_chat_template(processor: Any) -> bool:
    template = getattr(processor, "chat_template", None)
    if template is None:
        template = getattr(getattr(processor, "tokenizer", None), "chat_template", None)
    return bool(template)


def render_prompt(
    processor: Any,
    messages: list[Message],
    *,
    with_image: bool = True,
    style: PromptStyle = "chat-template",
    system_text: str = "",
) -> str:
    """The text of the prompt, ending where the assistant's answer begins.

    ``with_image=False`` gives the blind prompt (the image and its token removed).
    ``style="llava-v1"`` writes the raw ``USER: ... ASSISTANT:`` form of the LLaVA
    release instead of the processor's chat template; a processor without a chat template
    falls back to it.
    """
    if style == "llava-v1" or not has_chat_template(processor):
        shown = messages if with_image else without_image(messages)
        return render_llava_v1(shown, system_text=system_text)
    chat = to_chat_messages(messages, with_image=with_image)
    if system_text:
        chat = [{"role": "system", "content": [{"type": "text", "text": system_text}]}, *chat]
    return processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)


def response_text(response: str) -> str:
    """The text a response is placed as after a raw ``USER: ... ASSISTANT:`` prompt."""
    return RESPONSE_SEPARATOR + response.strip()


def builds_own_prompt(processor: Any) -> bool:
    """A processor without a chat template that writes the prompt format itself (PaliGemma:
    image tokens, BOS, the prompt and a newline; the answer follows as a separate segment)."""
    return type(processor).__name__.startswith("PaliGemma")


def tokenize_options(tokenizer: Any, text: str) -> dict[str, Any]:
    """Keyword arguments for tokenizing ``text``: no second BOS where the template wrote one."""
    bos = getattr(tokenizer, "bos_token", None)
    return {"add_special_tokens": not (bos and text.startswith(bos))}


def render_conversation(processor: Any, messages: list[Message], answer: str, *, with_image: bool, style: PromptStyle) -> str | None:
    """The whole conversation with ``answer`` as the assistant's turn, as the template renders it.

    None when the processor has no chat template (or the raw LLaVA-v1 form is asked for).
    """
    if style == "llava-v1" or not has_chat_template(processor):
        return None
    chat = [*to_chat_messages(messages, with_image=with_image), {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    return processor.apply_chat_template(chat, add_generation_prompt=False, tokenize=False)


def response_token_ids(
    processor: Any,
    messages: list[Message],
    prompt_text: str,
    response: str,
    *,
    with_image: bool,
    style: PromptStyle,
    stop_token_ids: Sequence[int],
) -> list[int]:
    """The token ids of ``response`` as the assistant's turn after ``prompt_text``.

    The conversation with the answer is tokenized whole (chat template, or the raw
    ``USER: ... ASSISTANT: answer`` form) and the prompt's ids must be its prefix; the
    rest, up to and including the first stop token (the template's end of turn), is the
    response. Where the template writes no end-of-turn marker, the first stop token (the
    end-of-sequence token) is appended: generation must learn to stop.
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    answer = response.strip()
    stops = list(stop_token_ids)
    if builds_own_prompt(processor):
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    else:
        full = render_conversation(processor, messages, answer, with_image=with_image, style=style)
        if full is None or not full.startswith(prompt_text):
            full = prompt_text + (RESPONSE_SEPARATOR if prompt_text.endswith(":") else "") + answer
        options = tokenize_options(tokenizer, prompt_text)
        prompt_ids = tokenizer(prompt_text, **options)["input_ids"]
        full_ids = tokenizer(full, **options)["input_ids"]
        if full_ids[: len(prompt_ids)] == prompt_ids:
            ids = full_ids[len(prompt_ids) :]
        else:  # the prompt's last token merged into the answer: tokenize the answer alone
            logger.warning("the prompt's tokens are not a prefix of the conversation's; the answer is tokenized alone")
            ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    for index, token in enumerate(ids):
        if token in stops:
            return ids[: index + 1]
    return [*ids, stops[0]]


def stop_token_ids(tokenizer: Any, generation_config: Any = None) -> list[int]:
    """Ids that end an answer: the tokenizer's end-of-sequence token, then the model's
    generation end tokens (Gemma's ``<end_of_turn>``, Llama 3's ``<|eot_id|>``)."""
    ids: list[int] = []
    candidates: list[Any] = [getattr(tokenizer, "eos_token_id", None)]
    eos = getattr(generation_config, "eos_token_id", None)
    candidates.extend(eos if isinstance(eos, list | tuple) else [eos])
    for token in candidates:
        if isinstance(token, int) and token not in ids:
            ids.append(token)
    return ids


def image_token_count(processor: Any) -> int | None:
    """How many tokens one image expands to in the prompt, derived from the processor."""
    count = getattr(processor, "num_image_tokens", None)
    if isinstance(count, int):
        return count
    image_processor = getattr(processor, "image_processor", None)
    patch_size = getattr(processor, "patch_size", None)
    if image_processor is None or not patch_size:
        return None
    crop = getattr(image_processor, "crop_size", None) or getattr(image_processor, "size", None) or {}
    height = crop.get("height") or crop.get("shortest_edge")
    width = crop.get("width") or crop.get("shortest_edge")
    if not height or not width:
        return None
    count = (height // patch_size) * (width // patch_size)
    count += getattr(processor, "num_additional_image_tokens", 0)
    if getattr(processor, "vision_feature_select_strategy", "default") == "default":
        count -= 1
    return count


def accepts_text_only(processor: Any) -> bool:
    """Does the processor take a prompt without an image? (PaliGemma's refuses one.)"""
    if not hasattr(processor, "image_processor"):
        return True
    try:
        processor(text=["a"], return_tensors="pt")
    except (ValueError, TypeError, KeyError, IndexError):
        return False
    return True
