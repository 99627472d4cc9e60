"""Typed configuration: dataclasses loaded from YAML, with dotted ``key=value`` overrides.

Each stage declares one dataclass whose fields (with a ``help`` in their metadata) are
the single source of truth for its options; the same fields are set from YAML files and
from the command line (``train.beta=0.2``). Unknown keys and wrong types are errors that
name the key and what was expected; the resolved config is written next to outputs.

Every YAML mmsafe reads goes through :func:`load_yaml`, which counts what a document
expands to before building it: an alias (``*name``) is counted each time it is used, so
a few hundred bytes of nested aliases ("billion laughs") that would expand to 10^9
values are refused at once, while a config that reuses a block now and then is fine.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

from mmsafe.errors import ConfigError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")

#: Most values (mappings, lists, scalars, keys) a YAML document may expand to, counting an
#: alias at each use; a large config has a few hundred.
MAX_YAML_NODES = 100_000


class _NotYaml(ConfigError):
    """Text that does not parse as YAML (an override then keeps it as a plain string)."""


def _expanded_size(root: yaml.Node, limit: int) -> int:
    """How many nodes ``root`` stands for once every alias is expanded, stopping past ``limit``.

    Aliases share their node, so the composed graph is as small as the text: each distinct
    node is counted once, its size being 1 + its children's sizes. A node that contains
    itself (``&a [*a]``) raises :class:`ValueError`.
    """
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]

    def children(node: yaml.Node) -> list[yaml.Node]:
        if isinstance(node, yaml.MappingNode):
            return [part for pair in node.value for part in pair]
        if isinstance(node, yaml.SequenceNode):
            return list(node.value)
        return []

    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            on_path.discard(key)
            sizes[key] = 1 + sum(sizes[id(child)] for child in children(node))
            if sizes[key] > limit:
                return sizes[key]
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise ValueError("an alias refers to a node that contains it (a recursive structure)")
        on_path.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in children(node) if id(child) not in sizes)
    return sizes[id(root)]


def load_yaml(text: str, *, source: str, max_nodes: int = MAX_YAML_NODES) -> Any:
    """Parse one YAML document safely (plain data only), within ``max_nodes`` expanded nodes.

    ``source`` names the text in errors (a file path, ``override 'a.b=...'``). Errors are
    one-line :class:`~mmsafe.errors.ConfigError` messages.
    """
    try:
        loader = yaml.SafeLoader(text)  # checks the characters at once
    except yaml.YAMLError as error:
        raise _NotYaml(f"{source}: not valid YAML ({' '.join(str(error).split())})") from None
    loader.name = source  # marks in parse errors name the file, not "<unicode string>"
    try:
        try:
            node = loader.get_single_node()
        except yaml.YAMLError as error:
            raise _NotYaml(f"{source}: not valid YAML ({' '.join(str(error).split())})") from None
        if node is None:
            return None
        try:
            size = _expanded_size(node, max_nodes)
        except ValueError as error:
            raise ConfigError(f"{source}: {error}; expected plain data") from None
        if size > max_nodes:
            raise ConfigError(
                f"{source}: the YAML expands to more than {max_nodes:,} values (aliases counted at each use); "
                "expected a plain config, not nested aliases that multiply"
            )
        try:
            return loader.construct_document(node)
        except yaml.YAMLError as error:
            raise _NotYaml(f"{source}: not valid YAML ({' '.join(str(error).split())})") from None
    finally:
        loader.dispose()


def option(
    default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING, **cli: Any
) -> Any:
    """A dataclass field with its documentation attached.

    ``cli`` holds how the field appears on the command line (:mod:`mmsafe.cli.arguments`):
    ``flag`` (a flag name other than the field's), ``group`` (the ``--help`` section),
    ``comma`` (a list also given comma-separated), ``pairs`` (a mapping given as repeated
    ``KEY=VALUE``), ``metavar``, ``cli=False`` (YAML only).
    """
    metadata = {"help": help, **cli}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a field's type annotation, converting where it is lossless."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option_type in args:
            if option_type is type(None):
                continue
            try:
                return _coerce(value, option_type, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {', '.join(repr(a) for a in args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item_type = args[0] if args else Any
        return [_coerce(item, item_type, f"{key}[{index}]") for index, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        value_type = args[1] if len(args) == 2 else Any
        return {name: _coerce(item, value_type, f"{key}.{name}") for name, item in value.items()}
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {annotation.__name__} options, got {value!r}")
        return from_dict(annotation, value, prefix=f"{key}.")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 (PyYAML) reads an exponent without a dot (1e-6, 2E3) as a string,
            # both in files and in key=value overrides: a float option takes it as the number.
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def checked_options(
    cls: type, data: dict[str, Any], *, prefix: str = "", exclude: Iterable[str] = ()
) -> dict[str, Any]:
    """``data``'s options of dataclass ``cls``, each key known (did-you-mean otherwise) and
    each value checked against its field's type; ``exclude``: fields not to be set here."""
    hints = typing.get_type_hints(cls)
    excluded = set(exclude)
    fields = [field.name for field in dataclasses.fields(cls) if field.init and field.name not in excluded]
    values = {}
    for key, value in data.items():
        if key not in fields:
            raise unknown_option(key, fields, prefix=prefix)
        values[key] = _coerce(value, hints[key], f"{prefix}{key}")
    return values


def unknown_option(key: Any, known: Iterable[str], *, prefix: str = "") -> ConfigError:
    """``prefix.key: unknown option (did you mean prefix.close?); known: ...``."""
    names = sorted(known)
    close = difflib.get_close_matches(str(key), names, n=1)
    hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
    return ConfigError(f"{prefix}{key}: unknown option{hint}; known: {', '.join(names)}")


def from_dict(cls: type[T], data: dict[str, Any], *, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, checking keys and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    fields = {field.name: field for field in dataclasses.fields(cls) if field.init}
    values = checked_options(cls, data, prefix=prefix)
    try:
        return cls(**values)
    except TypeError as error:
        missing = [
            name
            for name, field in fields.items()
            if name not in values
            and field.default is dataclasses.MISSING
            and field.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ConfigError(f"{prefix}{missing[0]}: required option is missing") from None
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {error}") from None
    except ValueError as error:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {error}") from None


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.beta=0.2"`` -> ``(["train", "beta"], 0.2)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value (for example train.beta=0.2)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: expected a dotted key such as train.beta")
    try:
        value = load_yaml(raw, source=f"override {text!r}") if raw.strip() else ""
    except _NotYaml:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    # deepcopy keeps shared values shared (its memo), so an aliased block is copied once.
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


#: The dotted key an error message starts with (``train.options.lerning_rate: ...``).
_LEADING_KEY = re.compile(r"^([\w\-]+(?:\[\d+\])?(?:\.[\w\-]+(?:\[\d+\])?)*): ")


def error_key(error: ConfigError) -> list[str] | None:
    """The parts of the dotted key ``error`` names first, without list indexes; None if it names none."""
    match = _LEADING_KEY.match(str(error))
    if match is None:
        return None
    return re.sub(r"\[\d+\]", "", match.group(1)).split(".")


def _in_file(data: Any, key: list[str]) -> bool:
    for part in key:
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


def value_source(
    key: list[str] | None, layers: list[tuple[str, str]], *, file: str | None = None, file_data: Any = None
) -> str | None:
    """Where the value at ``key`` came from, to name it in an error.

    ``layers`` are ``(dotted key, name)`` pairs in the order they were applied over the
    ``file`` (overrides, flags): the last that set ``key`` or a section above it wins; one
    that set only a part of it names it, beside the file when the file has the key too;
    else the file (None without one).
    """
    if key is not None:
        inside = None
        for dotted, name in reversed(layers):
            parts = dotted.split(".")
            if parts == key[: len(parts)]:
                return name
            if inside is None and key == parts[: len(key)]:
                inside = name
        if inside is not None:
            return f"{file} (with {inside})" if file is not None and _in_file(file_data, key) else inside
    return file


def override_key(text: str) -> str:
    """The dotted key of a ``key=value`` override as written (``train.beta=0.2`` -> ``train.beta``)."""
    return text.split("=", 1)[0].strip()


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not valid UTF-8 ({error.reason} at byte {error.start})") from None
    data = load_yaml(text, source=str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None, *, section: str | None = None
) -> T:
    """Load ``cls`` from a YAML file (optionally one top-level ``section`` of it) plus overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml(path)
        if section is not None:
            data = data.get(section, {}) or {}
    data = apply_overrides(data, overrides or [])
    try:
        return from_dict(cls, data)
    except ConfigError as error:
        if path is not None:
            raise ConfigError(f"{path}: {error}") from None
        raise


def save_config(config: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (secrets are never config fields: keys come from the environment)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def config_hash(config: Any) -> str:
    """A short stable digest of a config, for deciding whether outputs are up to date."""
    text = json.dumps(to_dict(config) if dataclasses.is_dataclass(config) else config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def describe(cls: type) -> list[tuple[str, str, str]]:
    """``(name, default, help)`` for each field: used by ``--help`` texts and docs."""
    rows = []
    for field in dataclasses.fields(cls):
        if field.default is not dataclasses.MISSING:
            default = repr(field.default)
        elif field.default_factory is not dataclasses.MISSING:
            default = repr(field.default_factory())
        else:
            default = "(required)"
        rows.append((field.name, default, field.metadata.get("help", "")))
    return rows


@dataclasses.dataclass(kw_only=True)
class DisplayConfig:
    """The options of a command that only prints (``mmsafe env``, ``mmsafe benchmarks list``)."""

    json: bool = option(False, help="print JSON instead of text")
