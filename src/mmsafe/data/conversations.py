"""Conversations: the LLaVA-v1 text form, chat-template messages, image removal.

The released MMSafe-PO data writes a whole dialogue as one string::

    USER: <turn> ASSISTANT: <turn> USER: <image>\\n<instruction> ASSISTANT:

:func:`parse_llava_v1` turns it into :class:`~mmsafe.data.records.Message` objects and
:func:`render_llava_v1` writes them back; for well-formed strings the round trip is exact.
:func:`to_chat_messages` gives the structured form that Hugging Face chat templates take.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

from mmsafe.data.records import IMAGE_TOKEN, Message
from mmsafe.errors import DataError

USER_TAG = "USER:"
ASSISTANT_TAG = "ASSISTANT:"
_TAG = re.compile(r"(?:(?<=\s)|^)(USER|ASSISTANT):(?= |$)")
_RESPONSE_PREFIX = re.compile(r"^\s*ASSISTANT:\s?")


def parse_llava_v1(text: str, *, record: str | None = None, field: str = "question") -> tuple[str, list[Message]]:
    """Parse a LLaVA-v1 prompt into ``(system_text, messages)``.

    ``system_text`` is whatever precedes the first ``USER:`` (usually empty). The prompt
    must end with an open ``ASSISTANT:`` turn (the generation prompt), and the turns
    alternate user/assistant; a tag that would break the alternation is kept as text.
    """
    if not isinstance(text, str):
        raise DataError(f"expected a string, got {type(text).__name__}", record=record, field=field)
    expected = "USER"
    cuts: list[tuple[int, int, str]] = []
    for match in _TAG.finditer(text):
        if match.group(1) != expected:
            continue
        cuts.append((match.start(), match.end(), expected))
        expected = "ASSISTANT" if expected == "USER" else "USER"
    if not cuts:
        raise DataError("expected a LLaVA-v1 prompt 'USER: ... ASSISTANT:', found no USER: turn", record=record, field=field)
    if cuts[-1][2] != "ASSISTANT" or text[cuts[-1][1]:].strip():
        raise DataError("expected the prompt to end with an open 'ASSISTANT:' turn", record=record, field=field)
    system_text = text[: cuts[0][0]]
    messages = []
    for (_, content_start, tag), (next_start, _, _) in itertools.pairwise(cuts):
        content = text[content_start:next_start]
        if content.startswith(" "):
            content = content[1:]
        if content.endswith(" "):
            content = content[:-1]
        messages.append(Message("user" if tag == "USER" else "assistant", content))
    return system_text, messages


def render_llava_v1(messages: list[Message], *, system_text: str = "", add_generation_prompt: bool = True) -> str:
    """Render messages as a LLaVA-v1 prompt (the inverse of :func:`parse_llava_v1`)."""
    parts = [f"{USER_TAG if message.role == 'user' else ASSISTANT_TAG} {message.content}" for message in messages]
    if add_generation_prompt:
        parts.append(ASSISTANT_TAG)
    return system_text + " ".join(parts)


def strip_response_prefix(text: str) -> tuple[str, str]:
    """Split a released response into ``(prefix, body)``: ``"ASSISTANT: Hi"`` -> ``("ASSISTANT: ", "Hi")``."""
    match = _RESPONSE_PREFIX.match(text)
    if not match:
        return "", text
    return match.group(0), text[match.end():]


def remove_image_token(text: str) -> str:
    """Drop ``<image>`` and the newline the LLaVA form puts after it (blind prompts)."""
    if IMAGE_TOKEN not in text:
        return text
    before, after = text.split(IMAGE_TOKEN, 1)
    if after.startswith("\n"):
        after = after[1:]
    if not before.strip():
        return after
    if not after.strip():
        return before.rstrip()
    return before + after


def without_image(messages: list[Message]) -> list[Message]:
    """The same conversation with the image token removed from the last user turn."""
    if not messages:
        return []
    return [*messages[:-1], Message(messages[-1].role, remove_image_token(messages[-1].content))]


def to_chat_messages(messages: list[Message], *, with_image: bool = True) -> list[dict[str, Any]]:
    """Structured messages for ``processor.apply_chat_template``.

    The ``<image>`` token becomes an ``{"type": "image"}`` part at the same position;
    ``with_image=False`` drops it (the blind prompt).
    """
    chat = []
    for message in messages:
        content: list[dict[str, Any]] = []
        text = message.content
        if IMAGE_TOKEN in text:
            before, after = text.split(IMAGE_TOKEN, 1)
            if after.startswith("\n"):
                after = after[1:]
            if before.strip():
                content.append({"type": "text", "text": before.rstrip("\n")})
            if with_image:
                content.append({"type": "image"})
            if after.strip():
                content.append({"type": "text", "text": after})
        else:
            content.append({"type": "text", "text": text})
        chat.append({"role": message.role, "content": content})
    return chat
