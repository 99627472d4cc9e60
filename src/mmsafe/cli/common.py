"""What every command shares: declaring a command from its config, and the checks made
before anything slow (a model, a network call) starts."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmsafe.cli.arguments import (
    add_config_arguments,
    add_config_source_arguments,
    config_line,
    config_yaml,
    resolve_config,
)

logger = logging.getLogger("mmsafe.cli")

Handler = Callable[[argparse.Namespace], int]
#: A stage command's handler: the parsed arguments and the resolved config.
StageHandler = Callable[[argparse.Namespace, Any], int]


def command(
    subparsers: argparse._SubParsersAction, name: str, help_text: str, handler: Handler, **options: Any
) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help_text, description=options.pop("description", help_text), **options)
    parser.set_defaults(handler=handler)
    return parser


def stage_command(
    subparsers: argparse._SubParsersAction,
    name: str,
    help_text: str,
    config_class: type,
    handler: StageHandler,
    *,
    groups: dict[str, str] | None = None,
    positionals: tuple[str, ...] = (),
    dry_run: bool = True,
) -> argparse.ArgumentParser:
    """A command whose flags are the fields of ``config_class`` (plus ``--config``,
    ``KEY=VALUE`` overrides, ``--print-config`` and ``--dry-run``).

    ``positionals`` names fields that may also be given as bare arguments, in that order
    (``mmsafe data convert IN OUT``, the form before the flags); such a command takes no
    ``KEY=VALUE`` overrides.
    """
    doc = (config_class.__doc__ or help_text).strip().replace("``", "")
    parser = subparsers.add_parser(name, help=help_text, description=doc)
    add_config_source_arguments(parser, overrides=not positionals, dry_run=dry_run)
    add_config_arguments(parser, config_class, groups=groups)
    if positionals:
        parser.add_argument("positionals", nargs="*", help=argparse.SUPPRESS)

    def run(args: argparse.Namespace) -> int:
        return run_stage(args, config_class, handler, fixed=_positional_values(args, config_class, positionals))

    parser.set_defaults(handler=run)
    return parser


def _positional_values(args: argparse.Namespace, config_class: type, names: tuple[str, ...]) -> dict[str, Any]:
    """Bare arguments as the fields ``names`` (each given once: as a flag or bare)."""
    from mmsafe.cli.arguments import PREFIX, flag_name
    from mmsafe.errors import ConfigError

    given = list(getattr(args, "positionals", None) or [])
    fields = {config_field.name: config_field for config_field in dataclasses.fields(config_class)}
    if len(given) > len(names):
        expected = " ".join(flag_name(fields[name]) + " " + name.upper() for name in names)
        raise ConfigError(f"{args.command}: unexpected argument {given[len(names)]!r}; expected {expected}")
    values = {}
    for name, value in zip(names, given, strict=False):
        if getattr(args, PREFIX + name, argparse.SUPPRESS) is not argparse.SUPPRESS:
            raise ConfigError(f"{flag_name(fields[name])} is given twice (as the flag and as a bare argument)")
        values[name] = value
    return values


def run_stage(
    args: argparse.Namespace, config_class: type, handler: StageHandler, *, fixed: dict[str, Any] | None = None
) -> int:
    """Resolve the command's config, print it if asked, log it, and run the handler."""
    config = resolve_config(config_class, args, fixed=fixed)
    if getattr(args, "print_config", False):
        print(config_yaml(config), end="")
        return 0
    return handler(args, config)


def announce(args: argparse.Namespace, config: Any) -> None:
    """Log the resolved options once the inputs are checked, as the slow part starts."""
    logger.info("%s: %s", args.command, config_line(config))


def dry_run_message(what: str) -> int:
    """The plan of a ``--dry-run``: inputs checked, nothing loaded or written."""
    print(f"dry run: {what}; the inputs were checked, no model was loaded and nothing was written")
    return 0


# ---------------------------------------------------------------- checks before anything slow


def group_missing_images(problems: list, image_root: str | None, file: str) -> list[str]:
    """Problem lines, with every "image not found" of one folder folded into one line with a count."""
    from mmsafe.errors import ImageError

    missing = [
        problem
        for problem in problems
        if isinstance(problem, ImageError) and problem.message.startswith("image not found")
    ]
    if len(missing) < 2 or image_root is None:
        return [str(problem) for problem in problems]
    first = missing[0]
    name = re.match(r"image not found: (.*?) \(", first.message)
    where = f"{first.location.record} {name.group(1).strip(chr(39)) if name else ''}".strip()
    folded = (
        f"{file}:-:image: {len(missing)} records: image not found under {Path(image_root).absolute()} (first: {where}); "
        "set --image-root to the folder that holds the images"
    )
    lines = [str(problem) for problem in problems if problem not in missing]
    return [folded, *lines]


def check_images_exist(records: list, image_root: Path | None, file: str | None) -> None:
    """Every record's image exists under ``image_root``: checked (one stat each) before a model loads.

    All missing images are reported as one error with a count, not one per record.
    """
    from mmsafe.data.images import resolve_image_path
    from mmsafe.errors import DataError, ImageError

    with_image = [record for record in records if isinstance(getattr(record, "image", None), str)]
    if not with_image or image_root is None:
        return
    missing = []
    for record in with_image:
        try:
            path = resolve_image_path(image_root, record.image)
        except DataError as error:
            raise error.at(file=file, record=record.id) from None
        if not os.path.lexists(path) and not os.path.lexists(Path(image_root) / record.image):
            missing.append(record)
    if missing:
        first = missing[0]
        raise ImageError(
            f"{len(missing)} of {len(with_image)} records: image not found under {Path(image_root).absolute()} (first: {first.id} {first.image}); "
            "set --image-root to the folder that holds the images",
            file=file,
            field="image",
        )


def check_model(model: str | None, *, engine: str = "hf", adapter: str | None = None, what: str = "--model") -> None:
    """``--model`` and ``--adapter`` name something that exists, before data or a model loads."""
    from mmsafe.errors import ModelError
    from mmsafe.models.loading import check_model_name

    if model and engine != "openai":
        check_model_name(model, what=what)
    if adapter and not Path(adapter).expanduser().is_dir():
        raise ModelError(f"--adapter {adapter}: no such adapter folder ({Path(adapter).expanduser().absolute()})")


def print_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
