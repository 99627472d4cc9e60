"""Command-line flags made from a stage's typed config, and the config made back from them.

Every stage command (``generate``, ``blind``, ``probe``, ``judge``, ``report``,
``pairwise``, ``build-data``, ``train``) has one dataclass (:mod:`mmsafe.config` fields with
a ``help``); its flags, their help texts and defaults come from that dataclass, so the
command line, a ``--config`` YAML file and ``KEY=VALUE`` overrides set the same fields and
are checked by the same code (:func:`mmsafe.config.from_dict`). Later sources win: the
file, then the overrides, then the flags.

argparse (the standard library's parser) reads the command line; the typed values come
from :func:`mmsafe.config.from_dict`, whose errors are one line naming the key, and here
also the flag, override or file the value came from.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable
from typing import Any

import yaml

from mmsafe.config import (
    _NotYaml,
    apply_overrides,
    error_key,
    from_dict,
    load_yaml,
    override_key,
    read_yaml,
    to_dict,
    value_source,
)
from mmsafe.errors import ConfigError

#: Where a flag's value is kept in the parsed namespace (apart from the command's own arguments).
PREFIX = "config."


def flag_name(config_field: dataclasses.Field) -> str:
    return "--" + str(config_field.metadata.get("flag", config_field.name)).replace("_", "-")


def _is_str_like(annotation: Any) -> bool:
    """A field whose command-line text is taken as it is (never read as YAML: ``--variant no`` stays 'no')."""
    if annotation is str:
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return all(isinstance(value, str) for value in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        options = [option for option in typing.get_args(annotation) if option is not type(None)]
        return all(_is_str_like(option) for option in options)
    return False


def _choices(annotation: Any) -> list[Any] | None:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return list(typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        options = [option for option in typing.get_args(annotation) if option is not type(None)]
        if len(options) == 1:
            return _choices(options[0])
    return None


def _base(annotation: Any) -> Any:
    """The annotation without ``| None``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = [option for option in typing.get_args(annotation) if option is not type(None)]
        if len(options) == 1:
            return options[0]
    return annotation


def _default_text(config_field: dataclasses.Field) -> str:
    if "default_text" in config_field.metadata:
        return str(config_field.metadata["default_text"])
    if config_field.default is not dataclasses.MISSING:
        value = config_field.default
    elif config_field.default_factory is not dataclasses.MISSING:
        value = config_field.default_factory()
    else:
        return "required"
    if value is None or value == "" or value == [] or value == {}:
        return ""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(str(item) for item in value)
    return str(value)


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, *, groups: dict[str, str] | None = None) -> None:
    """A flag per field of dataclass ``cls`` (its ``help`` and default in the flag's help).

    Fields with ``group`` metadata go into that ``--help`` section (``groups`` maps a group
    to its title); ``cli=False`` fields are YAML only. Every flag defaults to "not given",
    so a value from ``--config`` or an override is not replaced by a default.
    """
    hints = typing.get_type_hints(cls)
    # The sections in the order ``groups`` gives them, then the command's own options.
    sections: dict[str, Any] = {name: parser.add_argument_group(title) for name, title in (groups or {}).items()}
    for config_field in dataclasses.fields(cls):
        meta = config_field.metadata
        if not meta.get("cli", True) or not config_field.init:
            continue
        group_name = meta.get("group")
        target: Any = parser
        if group_name is not None:
            if group_name not in sections:
                sections[group_name] = parser.add_argument_group((groups or {}).get(group_name, group_name))
            target = sections[group_name]
        annotation = hints[config_field.name]
        if dataclasses.is_dataclass(_base(annotation)):
            continue  # a nested section: set in --config or by dotted overrides (images.index=...)
        default = _default_text(config_field)
        help_text = meta.get("help", "")
        if default == "required":
            help_text += " (required)"
        elif default:
            help_text += f" (default: {default})"
        help_text = help_text.replace("%", "%%")
        options: dict[str, Any] = {"dest": PREFIX + config_field.name, "default": argparse.SUPPRESS, "help": help_text}
        base = _base(annotation)
        if base is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif meta.get("pairs"):
            options.update(action="append", metavar=meta.get("metavar", "KEY=VALUE"))
        elif typing.get_origin(base) in (list, tuple):
            options.update(nargs="+", metavar=meta.get("metavar", config_field.name.upper()))
        else:
            choices = _choices(annotation)
            if choices is not None and all(isinstance(choice, str) for choice in choices):
                options["choices"] = choices
            options["metavar"] = meta.get(
                "metavar", "{" + ",".join(choices) + "}" if choices else config_field.name.upper()
            )
        target.add_argument(flag_name(config_field), *meta.get("aliases", ()), **options)


def add_config_source_arguments(
    parser: argparse.ArgumentParser, *, overrides: bool = True, dry_run: bool = True
) -> None:
    """``--config FILE``, trailing ``KEY=VALUE`` overrides, ``--print-config`` and ``--dry-run``."""
    parser.add_argument(
        "--config",
        dest="config_file",
        metavar="FILE",
        help="YAML file of this command's options, keyed as --print-config prints them (mostly the flag names with _ for -); overrides and flags win over it",
    )
    if overrides:
        parser.add_argument(
            "overrides",
            nargs="*",
            metavar="KEY=VALUE",
            help="set any option, dotted for nested ones (they win over --config, flags win over them)",
        )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved options as YAML (a --config file) and exit"
    )
    if not dry_run:
        return
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="resolve the options and check the inputs, then say what would run, without loading a model or writing anything",
    )


def _flag_value(config_field: dataclasses.Field, annotation: Any, raw: Any) -> Any:
    """A flag's command-line text as the value ``from_dict`` checks."""
    meta = config_field.metadata
    if isinstance(raw, bool):
        return raw
    if meta.get("pairs"):
        for text in raw:
            if "=" not in text:
                raise ConfigError(f"{flag_name(config_field)}: expected KEY=VALUE, got {text!r}")
        return apply_overrides({}, raw)
    if isinstance(raw, list):
        items: list[str] = []
        for text in raw:
            items += [part.strip() for part in text.split(",") if part.strip()] if meta.get("comma") else [text]
        return items
    if _is_str_like(annotation):
        return raw
    try:
        value = load_yaml(raw, source=f"{flag_name(config_field)} {raw!r}") if raw.strip() else raw
    except _NotYaml:
        return raw
    return value


def resolve_config(
    cls: type,
    args: argparse.Namespace,
    *,
    fixed: dict[str, Any] | None = None,
    before: list[tuple[str, str]] | None = None,
    after: list[tuple[str, str]] | None = None,
) -> Any:
    """The stage config of a parsed command line: ``--config`` file, then overrides, then flags.

    ``before`` and ``after`` are ``(KEY=VALUE, source)`` pairs a command adds before or
    after the user's overrides (``build-data --sample``, ``--image-index``); ``fixed`` values
    (set by the command itself, not the user) go in last. Errors are one line naming the
    key and where it was set (the flag, the override or the file: :func:`mmsafe.config.value_source`).
    """
    path = getattr(args, "config_file", None)
    file_data = read_yaml(path) if path else {}
    overrides = [(text, f"override {text!r}") for text in getattr(args, "overrides", None) or []]
    texts = [*(before or []), *overrides, *(after or [])]
    data = apply_overrides(file_data, [text for text, _ in texts])
    layers = [(override_key(text), source) for text, source in texts]
    hints = typing.get_type_hints(cls)
    fields = {config_field.name: config_field for config_field in dataclasses.fields(cls)}
    for name, config_field in fields.items():
        raw = getattr(args, PREFIX + name, argparse.SUPPRESS)
        if raw is argparse.SUPPRESS:
            continue
        data[name] = _flag_value(config_field, hints[name], raw)
        layers.append((name, flag_name(config_field)))
    data.update(fixed or {})
    try:
        return from_dict(cls, data)
    except ConfigError as error:
        message = str(error)
        key = error_key(error)
        top = key[0] if key else None
        if message.endswith("required option is missing") and top in fields:
            flag = flag_name(fields[top]) if fields[top].metadata.get("cli", True) else None
            raise ConfigError(f"{flag or top} is required" + (f" (or {top}: in --config)" if flag else "")) from None
        found = value_source(key, layers, file=str(path) if path else None, file_data=file_data)
        raise ConfigError(f"{found}: {message}" if found else message) from None


def config_yaml(config: Any) -> str:
    """The resolved options as a YAML document that ``--config`` reads back."""
    return yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True)


def config_line(config: Any, *, skip: Iterable[str] = ()) -> str:
    """The resolved options on one line (logged at the start of a command)."""
    skipped = set(skip)
    parts = []
    for key, value in to_dict(config).items():
        if key in skipped or value is None or value == {} or value == []:
            continue
        parts.append(f"{key}={value}")
    return " ".join(parts)
