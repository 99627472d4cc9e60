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
        raise DataError(
            "expected a LLaVA-v1 prompt 'USER: ... ASSISTANT:', found no USER: turn", record=record, field=field
        )
    if cuts[-1][2] != "ASSISTANT" or text[cuts[-1][1] :].strip():
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


def is_llava_v1(text: str) -> bool:
    """Whether ``text`` is written as a whole LLaVA-v1 conversation (``USER: ... ASSISTANT:``)
    rather than a bare instruction: it opens with ``USER:`` or ends with an open ``ASSISTANT:``."""
    stripped = text.strip()
    return stripped.startswith(USER_TAG) or stripped.endswith(ASSISTANT_TAG)


def prompt_messages(
    text: str, *, history: list[Message] | None = None, record: str | None = None, field: str = "prompt"
) -> list[Message]:
    """A prompt string as messages, in either of the forms data files write it.

    A whole LLaVA-v1 conversation (the released MMSafe-PO ``text_prompt`` and
    ``mid_prompt``: ``"USER: <turn> ASSISTANT: <turn> USER: <instruction> ASSISTANT:"``)
    is parsed with :func:`parse_llava_v1`, earlier turns included, and ``history`` is not
    used. A bare instruction (older files, ``build-data`` output) is one user message after
    ``history``. A DataError names ``record`` and ``field`` when the conversation is
    malformed or its last instruction is empty.
    """
    if not isinstance(text, str):
        raise DataError(f"expected a string, got {type(text).__name__}", record=record, field=field)
    if is_llava_v1(text):
        _, messages = parse_llava_v1(text, record=record, field=field)
    else:
        messages = [*(history or []), Message("user", text.strip())]
    if not messages[-1].content.strip():
        raise DataError("expected a non-empty last user instruction", record=record, field=field)
    return messages


def without_image_tokens(messages: list[Message]) -> list[Message]:
    """The conversation with every ``<image>`` (and the newline after it) removed, in every turn."""
    result = []
    for message in messages:
        content = message.content
        while IMAGE_TOKEN in content:
            content = remove_image_token(content)
        result.append(Message(message.role, content))
    return result


def with_one_image(messages: list[Message]) -> list[Message]:
    """The conversation with exactly one ``<image>``, in the last user turn.

    A last turn that holds it once keeps it where it is; otherwise every ``<image>`` is
    removed and one is put before the last instruction (``"<image>\\n..."``, the LLaVA form).
    """
    if not messages:
        return []
    *earlier, last = messages
    earlier = without_image_tokens(earlier)
    if last.content.count(IMAGE_TOKEN) == 1:
        return [*earlier, last]
    (bare,) = without_image_tokens([last])
    return [*earlier, Message(last.role, f"{IMAGE_TOKEN}\n{bare.content.strip()}")]


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
    return match.group(0), text[match.end() :]


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
