"""The one generation interface: requests (messages, optional image) in, texts out.

Every stage that makes a model answer prompts (evaluation, probes, blind responses, the
data builder) talks to an :class:`Engine`. Two implementations exist: the in-process
Hugging Face engine (:mod:`mmsafe.generate.hf_engine`) and the OpenAI-compatible HTTP
engine (:mod:`mmsafe.generate.openai_engine`) that drives a vLLM or SGLang server.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from PIL import Image

from mmsafe.data.records import IMAGE_TOKEN, Message, PreferenceRecord
from mmsafe.errors import ConfigError, DataError, MmsafeError


@dataclass
class DecodingParams:
    """How responses are decoded. The defaults are the paper's: greedy, up to 256 tokens."""

    max_new_tokens: int = 256
    """Most tokens generated per response; generation also stops at end-of-sequence."""
    do_sample: bool = False
    """False: greedy decoding (deterministic). True: sample with ``temperature`` and ``top_p``."""
    temperature: float = 1.0
    """Softmax temperature when sampling (ignored when greedy)."""
    top_p: float = 1.0
    """Nucleus sampling mass when sampling (1.0 keeps the whole distribution)."""
    seed: int = 0
    """Random seed for sampling."""
    min_new_tokens: int = 0
    """End-of-sequence is suppressed until this many tokens are generated (0: never)."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens: expected a positive integer, got {self.max_new_tokens!r}")
        if not isinstance(self.min_new_tokens, int) or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ConfigError(
                f"min_new_tokens: expected an integer from 0 to max_new_tokens ({self.max_new_tokens}), got {self.min_new_tokens!r}"
            )
        if not self.temperature > 0:
            raise ConfigError(f"temperature: expected a number > 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p: expected a number in (0, 1], got {self.top_p!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GenerationRequest:
    """One prompt to answer.

    ``messages`` mark the image's place with ``<image>`` in the last user turn; ``image``
    is the picture itself, or None for a text-only prompt (then any ``<image>`` token is
    dropped when the prompt is rendered).
    """

    id: str
    messages: list[Message]
    image: Image.Image | None = None
    variant: str = "default"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def has_image(self) -> bool:
        return self.image is not None

    def check(self) -> None:
        """An image needs a place in the prompt; raise naming the request otherwise."""
        if not self.messages or self.messages[-1].role != "user":
            raise DataError("expected messages ending with a user turn", record=self.id, field="messages")
        if self.image is not None and IMAGE_TOKEN not in self.messages[-1].content:
            raise DataError(
                f"an image is given but the last user message has no {IMAGE_TOKEN}", record=self.id, field="messages"
            )
        for index, message in enumerate(self.messages):
            count = message.content.count(IMAGE_TOKEN)
            if count > (1 if index == len(self.messages) - 1 else 0):
                # Would reach the processor as more image places than images (or a stray token).
                raise DataError(
                    f"expected {IMAGE_TOKEN} at most once, in the last user message; found {count} in message {index}",
                    record=self.id,
                    field=f"messages[{index}]",
                )


@dataclass(frozen=True)
class FailedResponse:
    """What an engine returns in place of a text when one request could not be answered.

    For a per-record failure that retrying did not cure (a reply with no text, a reply
    that cannot be read). The run writes no response for the record, lists it as failed,
    and a rerun asks it again. A failure of the whole server still raises.
    """

    id: str
    reason: str


@runtime_checkable
class Engine(Protocol):
    """Anything that answers a list of requests, in order, one text per request.

    An engine may return a :class:`FailedResponse` in place of a text for a request it
    could not answer; stages that take texts directly use :func:`texts_or_raise`.
    """

    name: str
    """The model name written into response records."""

    def generate(self, requests: list[GenerationRequest], params: DecodingParams) -> list[str | FailedResponse]: ...


def check_engine_options(*, prompt_style: str | None, image_mode: str | None, batch_size: int | str) -> None:
    """The options the in-process engines share, checked before anything loads (one clear line each)."""
    from mmsafe.models.recipe import IMAGE_MODES, PROMPT_STYLES

    if prompt_style is not None and prompt_style not in PROMPT_STYLES:
        raise ConfigError(f"prompt_style: expected one of {', '.join(PROMPT_STYLES)}, got {prompt_style!r}")
    if image_mode is not None and image_mode not in IMAGE_MODES:
        raise ConfigError(f"image_mode: expected one of {', '.join(IMAGE_MODES)}, got {image_mode!r}")
    if batch_size != "auto" and (not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1):
        raise ConfigError(f"batch_size: expected a positive integer or auto, got {batch_size!r}")


def describe_engine(engine: Engine) -> dict[str, Any]:
    """The engine's settings for the run's config file (never a secret)."""
    describe = getattr(engine, "describe", None)
    if callable(describe):
        return dict(describe())
    return {"type": type(engine).__name__, "name": engine.name}


def request_from_record(
    record: PreferenceRecord, image_root: str | Path | None, *, variant: str = "default"
) -> GenerationRequest:
    """The request that asks ``record``'s prompt, with its image loaded from ``image_root``."""
    from mmsafe.data.images import load_image

    image = None
    if record.image is not None:
        if image_root is None:
            raise DataError("the record names an image but no image root was given", record=record.id, field="image")
        try:
            image = load_image(image_root, record.image)
        except DataError as error:
            raise error.at(record=record.id) from None
    return GenerationRequest(
        id=record.id, messages=list(record.messages), image=image, variant=variant, meta=dict(record.meta)
    )


def requests_from_records(
    records: Iterable[PreferenceRecord], image_root: str | Path | None, *, variant: str = "default"
) -> list[GenerationRequest]:
    """One request per preference record (images loaded now; keep the list short)."""
    return [request_from_record(record, image_root, variant=variant) for record in records]


def check_responses(requests: list[GenerationRequest], responses: list[str | FailedResponse], engine_name: str) -> None:
    """An engine must return exactly one string (or :class:`FailedResponse`) per request."""
    if len(responses) != len(requests):
        raise MmsafeError(f"engine {engine_name!r} returned {len(responses)} responses for {len(requests)} requests")
    for request, response in zip(requests, responses, strict=True):
        if not isinstance(response, str | FailedResponse):
            raise MmsafeError(
                f"engine {engine_name!r} returned {type(response).__name__} for request {request.id!r}; expected a string"
            )


def texts_or_raise(responses: list[str | FailedResponse], engine_name: str) -> list[str]:
    """The texts, for callers that cannot skip a record: the first failure raises, naming it."""
    for response in responses:
        if isinstance(response, FailedResponse):
            raise MmsafeError(f"engine {engine_name!r}: request {response.id!r} failed: {response.reason}")
    return [response for response in responses if isinstance(response, str)]
