"""Prompts for a model: messages rendered through its processor's chat template.

Training and generation both build prompts here, so a model is trained on exactly the
text it is later asked with. A response's token ids are the span the model's own chat
template gives the assistant turn: the whole conversation is tokenized and the prompt's
ids are checked to be its prefix (:func:`response_token_ids`), so no tokenizer quirk at
the boundary (the legacy Llama form's lone ``▁`` before a string that starts with a
space, a second BOS) reaches training, and the answer ends with the template's own
end-of-turn token.

A chat template is code that comes with the model's files. It runs in transformers'
jinja sandbox, which stops it from reaching Python's internals but not from looping for
hours or writing gigabytes; :func:`apply_chat_template` renders it under a time and size
limit (:class:`TemplateLimits`), and a template that fails, breaks out of the sandbox's
rules or passes a limit is one :class:`~mmsafe.errors.ModelError` line naming the model
and the record.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from mmsafe.data.conversations import render_llava_v1, to_chat_messages, without_image
from mmsafe.data.records import Message
from mmsafe.errors import ModelError

logger = logging.getLogger(__name__)

PromptStyle = Literal["chat-template", "llava-v1"]
#: LLaVA-style templates end the prompt with "ASSISTANT:"; the answer starts after a space.
RESPONSE_SEPARATOR = " "


@dataclass(frozen=True)
class TemplateLimits:
    """Bounds on rendering a chat template once; a real template takes milliseconds and
    writes a few kilobytes, so these only stop a hostile or broken one.

    Args:
        seconds: most wall-clock time for one rendering. Between output chunks the clock
            is read in any thread; in the main thread a timer also interrupts a template
            that loops without writing anything.
        max_chars: most characters of rendered text beyond twice the conversation's own
            text (a template writes each message once, plus its markup; a very long
            prompt is the model's context limit to refuse, not the template's).
    """

    seconds: float = 10.0
    max_chars: int = 1_000_000

    def __post_init__(self) -> None:
        if not self.seconds > 0:
            raise ValueError(f"seconds: expected a positive number, got {self.seconds!r}")
        if not self.max_chars > 0:
            raise ValueError(f"max_chars: expected a positive integer, got {self.max_chars!r}")


#: The limits used wherever none are given.
DEFAULT_TEMPLATE_LIMITS = TemplateLimits()


class _TemplateTimeout(Exception):
    """Raised inside the rendering when its time is up."""


def _chat_template_owner(processor: Any) -> Any:
    """The object whose ``chat_template`` is rendered: the processor's own, else its tokenizer's."""
    if getattr(processor, "chat_template", None):
        return processor
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer
    return processor


def has_chat_template(processor: Any) -> bool:
    return bool(getattr(_chat_template_owner(processor), "chat_template", None))


def _model_name(processor: Any) -> str:
    tokenizer = getattr(processor, "tokenizer", processor)
    return str(
        getattr(tokenizer, "name_or_path", None) or getattr(processor, "name_or_path", None) or type(processor).__name__
    )


@contextlib.contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    """Raise :class:`_TemplateTimeout` in the rendering after ``seconds`` (main thread only).

    Signals reach only the main thread, and a timer someone else set is left alone: there
    the clock is read between output chunks only.
    """
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable or signal.getitimer(signal.ITIMER_REAL)[0] > 0:
        yield
        return
    armed = [True]

    def on_alarm(signum: int, frame: Any) -> None:
        if armed[0]:
            raise _TemplateTimeout

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        armed[0] = False  # a signal arriving from here on does nothing
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous if previous is not None else signal.SIG_DFL)


def _template_chunks(owner: Any, chat: list[dict[str, Any]], add_generation_prompt: bool) -> Iterator[str] | None:
    """The rendering as a stream of chunks, compiled and fed as transformers'
    ``apply_chat_template`` does (same sandbox, same variables); None where this version of
    transformers does not expose the pieces (then the whole text is rendered at once)."""
    try:
        from transformers.utils import chat_template_utils as utils

        compile_template = utils._compile_jinja_template
        plain = utils._plain_template_data
        normalize = utils._normalize_chat_messages
        alias = utils._alias_reasoning_fields
    except (ImportError, AttributeError):
        return None
    if hasattr(owner, "_resolve_chat_template"):  # a processor
        template = owner._resolve_chat_template(None)
        tokenizer = owner.tokenizer
    elif hasattr(owner, "get_chat_template"):
        template = owner.get_chat_template()
        tokenizer = owner
    else:
        return None
    messages = alias(plain(normalize(chat)))
    variables = plain(dict(tokenizer.special_tokens_map))
    compiled = compile_template(template)
    return compiled.generate(
        messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **variables
    )


def _text_size(value: Any) -> int:
    """Characters of text in a chat (strings inside dicts and lists)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_text_size(item) for item in value.values())
    if isinstance(value, list | tuple):
        return sum(_text_size(item) for item in value)
    return 0


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    line = getattr(error, "lineno", None)
    return f"{text[:300]}{' (template line ' + str(line) + ')' if line else ''}"


def apply_chat_template(
    processor: Any,
    chat: list[dict[str, Any]],
    *,
    add_generation_prompt: bool,
    limits: TemplateLimits | None = None,
    record: str | None = None,
) -> str:
    """Render ``chat`` with the processor's chat template within ``limits``.

    The text is what ``processor.apply_chat_template(chat, tokenize=False)`` gives. A
    template that raises (a syntax error, ``raise_exception``, a ``SecurityError`` from
    the sandbox), runs past ``limits.seconds`` or writes more than ``limits.max_chars``
    characters beyond twice the chat's own text raises :class:`~mmsafe.errors.ModelError` naming the model and ``record``.
    """
    import jinja2

    limits = limits or DEFAULT_TEMPLATE_LIMITS
    where = f"{_model_name(processor)}: chat template" + (f" (record {record})" if record is not None else "")
    owner = _chat_template_owner(processor)
    deadline = time.monotonic() + limits.seconds
    chat_chars = _text_size(chat)
    max_chars = limits.max_chars + 2 * chat_chars
    too_long = f"rendered more than {max_chars:,} characters (the limit of {limits.max_chars:,} (max_chars) beyond twice the conversation's {chat_chars:,})"
    try:
        with _alarm(limits.seconds):
            chunks = _template_chunks(owner, chat, add_generation_prompt)
            if chunks is None:
                text = owner.apply_chat_template(chat, add_generation_prompt=add_generation_prompt, tokenize=False)
                if len(text) > max_chars:
                    raise ModelError(f"{where}: {too_long}")
                return text
            parts: list[str] = []
            size = 0
            for chunk in chunks:
                parts.append(chunk)
                size += len(chunk)
                if size > max_chars:
                    raise ModelError(f"{where}: {too_long}; a template that writes without end?")
                if time.monotonic() > deadline:
                    raise _TemplateTimeout
            return "".join(parts)
    except _TemplateTimeout:
        raise ModelError(
            f"{where}: rendering took longer than the limit of {limits.seconds:g} s (seconds); a template that loops without end?"
        ) from None
    except jinja2.exceptions.SecurityError as error:
        raise ModelError(f"{where}: the template did something the sandbox forbids: {_one_line(error)}") from None
    except jinja2.exceptions.TemplateSyntaxError as error:
        raise ModelError(f"{where}: the template is not valid jinja: {_one_line(error)}") from None
    except jinja2.exceptions.TemplateError as error:
        raise ModelError(f"{where}: the template raised an error: {_one_line(error)}") from None
    except (ArithmeticError, LookupError, TypeError, ValueError, AttributeError, RecursionError, MemoryError) as error:
        # The template is foreign code: whatever it raises is its failure, not a traceback.
        raise ModelError(f"{where}: rendering failed: {type(error).__name__}: {_one_line(error)}") from None


def render_prompt(
    processor: Any,
    messages: list[Message],
    *,
    with_image: bool = True,
    style: PromptStyle = "chat-template",
    system_text: str = "",
    limits: TemplateLimits | None = None,
    record: str | None = None,
) -> str:
    """The text of the prompt, ending where the assistant's answer begins.

    ``with_image=False`` gives the blind prompt (the image and its token removed).
    ``style="llava-v1"`` writes the raw ``USER: ... ASSISTANT:`` form of the LLaVA
    release instead of the processor's chat template; a processor without a chat template
    falls back to it. The template renders within ``limits`` (see
    :func:`apply_chat_template`); ``record`` names the record in its errors.
    """
    if style == "llava-v1" or not has_chat_template(processor):
        shown = messages if with_image else without_image(messages)
        return render_llava_v1(shown, system_text=system_text)
    chat = to_chat_messages(messages, with_image=with_image)
    if system_text:
        chat = [{"role": "system", "content": [{"type": "text", "text": system_text}]}, *chat]
    return apply_chat_template(processor, chat, add_generation_prompt=True, limits=limits, record=record)


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


def render_conversation(
    processor: Any,
    messages: list[Message],
    answer: str,
    *,
    with_image: bool,
    style: PromptStyle,
    limits: TemplateLimits | None = None,
    record: str | None = None,
) -> str | None:
    """The whole conversation with ``answer`` as the assistant's turn, as the template renders it.

    None when the processor has no chat template (or the raw LLaVA-v1 form is asked for).
    """
    if style == "llava-v1" or not has_chat_template(processor):
        return None
    chat = [
        *to_chat_messages(messages, with_image=with_image),
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]
    return apply_chat_template(processor, chat, add_generation_prompt=False, limits=limits, record=record)


def response_token_ids(
    processor: Any,
    messages: list[Message],
    prompt_text: str,
    response: str,
    *,
    with_image: bool,
    style: PromptStyle,
    stop_token_ids: Sequence[int],
    limits: TemplateLimits | None = None,
    record: str | None = None,
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
        full = render_conversation(
            processor, messages, answer, with_image=with_image, style=style, limits=limits, record=record
        )
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
