"""Prompts for a model: messages rendered through its processor's chat template.

Training and generation both build prompts here, so a model is trained on exactly the
text it is later asked with. The response follows the prompt after
:data:`RESPONSE_SEPARATOR` and ends with the tokenizer's end-of-sequence token.
"""

from __future__ import annotations

from typing import Any, Literal

from mmsafe.data.conversations import render_llava_v1, to_chat_messages, without_image
from mmsafe.data.records import Message

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
    """The text a response is tokenized from, placed right after the prompt."""
    return RESPONSE_SEPARATOR + response.strip()


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
