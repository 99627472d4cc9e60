"""Open sets found by name: data formats, benchmarks, judges.

A :class:`Registry` maps names to objects. Built-ins (and any caller) add theirs with
:meth:`Registry.register`; installed packages add theirs through an entry-point group
(``mmsafe.formats``, ``mmsafe.benchmarks``, ``mmsafe.judges``). The group is read when
names are listed, so a package installed a moment ago is seen, and an entry point is
imported only when its object is asked for: listing names never imports a plugin, and a
broken plugin is one clear error (or one warning when every entry is wanted), never a
traceback and never a reason for the built-ins to stop working.

A registered name always wins over an entry point of the same name.
"""

from __future__ import annotations

import difflib
import inspect
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Generic, TypeVar

from mmsafe.errors import ConfigError, MmsafeError

logger = logging.getLogger(__name__)

T = TypeVar("T")
_MISSING: Any = object()

#: ``adapt(name, loaded)``: the registry's object for what an entry point named ``name``
#: loaded; raises :class:`TypeError` (with the expected kind of object) when it is no such thing.
Adapt = Callable[[str, Any], T]


def first_doc_line(value: Any) -> str:
    """The first line of ``value``'s docstring, or ``""``."""
    return (inspect.getdoc(value) or "").split("\n", 1)[0]


@dataclass(frozen=True)
class Entry:
    """One name of a registry as listed: where it comes from and what it is.

    ``source`` is ``"built-in or registered"`` or ``"plugin"``; ``error`` says why a
    plugin could not be loaded (then ``description`` is empty).
    """

    name: str
    description: str
    source: str
    error: str | None = None


class Registry(Mapping[str, T], Generic[T]):
    """Objects of one kind by name, in registration order, then entry points by name.

    ``kind`` names the things in messages (``"judge"``: ``unknown judge 'x'``).
    ``describe(obj)`` is the one-line description listings show; ``adapt`` turns what
    an entry point loads into the registry's type. ``unknown_error`` is the error
    class raised for a name that is neither registered nor a plugin.
    ``find_entry_points(group)`` lists a group's entry points (a parameter so that a
    module can route it through its own import, which tests may replace).
    """

    def __init__(
        self,
        kind: str,
        *,
        group: str | None = None,
        describe: Callable[[T], str] = first_doc_line,
        adapt: Adapt[T] | None = None,
        unknown_error: Callable[[str], MmsafeError] = ConfigError,
        find_entry_points: Callable[[str], Iterable[EntryPoint]] | None = None,
    ) -> None:
        self.kind = kind
        self.group = group
        self._describe = describe
        self._adapt = adapt
        self._unknown_error = unknown_error
        self._find_entry_points = find_entry_points
        self._entries: dict[str, T] = {}

    # ------------------------------------------------------------ registering

    def register(self, name: str, value: Any = _MISSING, *, replace: bool = False) -> Any:
        """Add ``value`` under ``name`` and return it; without ``value``, a decorator.

        A name already registered is refused (``ValueError``) unless ``replace``.

        >>> @JUDGES.register("always-safe")
        ... class AlwaysSafe: ...
        """
        if value is _MISSING:
            return lambda target: self.register(name, target, replace=replace)
        if name in self._entries and not replace:
            raise ValueError(f"a {self.kind} named {name!r} is already registered")
        self._entries[name] = value
        return value

    def copy(self) -> Registry[T]:
        """An independent registry with the same entries and settings."""
        other: Registry[T] = Registry(
            self.kind,
            group=self.group,
            describe=self._describe,
            adapt=self._adapt,
            unknown_error=self._unknown_error,
            find_entry_points=self._find_entry_points,
        )
        other._entries = dict(self._entries)
        return other

    # ------------------------------------------------------------ entry points

    def plugins(self) -> dict[str, EntryPoint]:
        """The group's entry points by name, leaving out names registered in code."""
        if self.group is None:
            return {}
        find = self._find_entry_points or (lambda group: entry_points(group=group))
        return {point.name: point for point in find(self.group) if point.name not in self._entries}

    def load(self, point: EntryPoint) -> T:
        """What the entry point names, as the registry's type; ConfigError if it cannot be."""
        try:
            target = point.load()
        except Exception as error:  # a broken plugin is named, not a traceback
            raise ConfigError(
                f"{self.kind} plugin {point.name!r} ({point.value}) could not be loaded: {error}"
            ) from None
        if self._adapt is None:
            return target
        try:
            return self._adapt(point.name, target)
        except TypeError as error:
            raise ConfigError(
                f"{self.kind} plugin {point.name!r} ({point.value}) is a {type(target).__name__}, expected {error}"
            ) from None

    # ------------------------------------------------------------ lookup

    def names(self) -> list[str]:
        """Registered names in order, then plugin names sorted; no plugin is imported."""
        return [*self._entries, *sorted(self.plugins())]

    def unknown_message(self, name: str) -> str:
        """``unknown judge 'refusl'; expected one of llm, refusal (did you mean 'refusal'?)``."""
        names = self.names()
        close = difflib.get_close_matches(str(name), names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown {self.kind} {name!r}; expected one of {', '.join(names)}{hint}"

    def lookup(self, name: str) -> T:
        """The object called ``name``, loading its plugin if need be.

        An unknown name raises ``unknown_error`` with a did-you-mean hint; a broken
        plugin raises a ConfigError naming it.
        """
        if name in self._entries:
            return self._entries[name]
        point = self.plugins().get(name)
        if point is None:
            raise self._unknown_error(self.unknown_message(name))
        return self.load(point)

    def available(self) -> dict[str, T]:
        """Every object that loads, by name; a broken plugin is logged and left out."""
        found = dict(self._entries)
        for name, point in sorted(self.plugins().items()):
            try:
                found[name] = self.load(point)
            except ConfigError as error:
                logger.warning("%s", error)
        return found

    def describe(self) -> list[Entry]:
        """Every name with its description; a broken plugin with its error instead."""
        rows = [Entry(name, self._describe(value), "built-in or registered") for name, value in self._entries.items()]
        for name, point in sorted(self.plugins().items()):
            try:
                rows.append(Entry(name, self._describe(self.load(point)), "plugin"))
            except ConfigError as error:
                rows.append(Entry(name, "", "plugin", str(error)))
        return rows

    def is_registered(self, name: str) -> bool:
        """Registered in code (not only offered by a plugin)."""
        return name in self._entries

    # ------------------------------------------------------------ Mapping

    def __getitem__(self, name: str) -> T:
        if name not in self._entries and name not in self.plugins():
            raise KeyError(name)
        return self.lookup(name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries or (isinstance(name, str) and name in self.plugins())

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, group={self.group!r}, names={self.names()!r})"
