"""The judge interface and the registry of judges by name.

A judge reads a batch of :class:`JudgeInput` (the prompt, the model's response, the
image when there is one) and returns one :class:`Verdict` per input, in order. A judge
that cannot parse its own model's answer returns ``unparseable``, never ``safe``.

Third-party judges plug in through the ``mmsafe.judges`` entry-point group: an entry
point named ``my-judge`` pointing at a factory ``(**options) -> Judge`` makes
``get_judge("my-judge", ...)`` and ``mmsafe judge --judge my-judge`` work.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from mmsafe.data.records import Message
from mmsafe.errors import ConfigError
from mmsafe.registry import Registry

if TYPE_CHECKING:
    from PIL import Image

ENTRY_POINT_GROUP = "mmsafe.judges"
VerdictLabel = Literal["safe", "unsafe", "unparseable"]


@dataclass
class JudgeInput:
    """One response to judge, with the prompt it answers.

    ``messages`` is the prompt (``<image>`` marks the image in the last user turn);
    ``image`` is an opened image and ``image_path`` its file, either or both may be set.
    ``category`` is the benchmark's category of the prompt (an MM-SafetyBench scenario,
    an entity type, ...), which some judges use to choose their rubric.
    """

    id: str
    messages: list[Message]
    response: str
    variant: str = "default"
    image_path: Path | None = None
    image: Image.Image | None = None
    category: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def load_image(self) -> Image.Image | None:
        """The image as RGB, opening ``image_path`` when no image was given."""
        if self.image is not None:
            return self.image.convert("RGB")
        if self.image_path is None:
            return None
        from PIL import Image

        with Image.open(self.image_path) as opened:
            return opened.convert("RGB")


@dataclass
class Verdict:
    """A judge's label for one response, its categories and its raw output."""

    verdict: VerdictLabel
    categories: list[str] = field(default_factory=list)
    raw: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Judge(Protocol):
    """Anything with a ``name`` and a batch ``judge`` method is a judge.

    ``name`` goes into every verdict record; it should change whenever the judge would
    label differently (another model, another rubric version), because verdicts are
    cached by (id, variant, judge name). A judge that reads only the response may set a
    class attribute ``needs_prompt = False`` so that judging does not ask for the data.
    """

    name: str

    def judge(self, items: list[JudgeInput]) -> list[Verdict]: ...


JudgeFactory = Callable[..., Judge]


def _as_factory(name: str, target: Any) -> JudgeFactory:
    if not callable(target):
        raise TypeError("a judge factory (**options) -> Judge, such as a Judge class")
    return target


#: Judge factories by name; plugins come from the ``mmsafe.judges`` entry points.
JUDGES: Registry[JudgeFactory] = Registry(
    "judge", group=ENTRY_POINT_GROUP, adapt=_as_factory, find_entry_points=lambda group: entry_points(group=group)
)


def register_judge(name: str, factory: JudgeFactory | None = None, *, replace: bool = False) -> Any:
    """Register a judge factory under ``name``; usable as a decorator.

    >>> @register_judge("always-safe")
    ... class AlwaysSafe: ...
    """
    if factory is None:
        return JUDGES.register(name, replace=replace)
    return JUDGES.register(name, factory, replace=replace)


def available_judges() -> list[str]:
    """Names of the built-in, registered and entry-point judges."""
    return sorted(JUDGES)


def get_judge(name: str, **options: Any) -> Judge:
    """Build the judge registered as ``name`` with ``options`` (its factory's keywords)."""
    factory = JUDGES.lookup(name)
    try:
        inspect.signature(factory).bind(**options)
    except TypeError as error:
        raise ConfigError(f"judge {name!r} does not take these options ({error})") from None
    judge = factory(**options)
    if not isinstance(judge, Judge):
        raise ConfigError(f"judge {name!r} built {type(judge).__name__}, which has no name and judge(items) method")
    return judge
