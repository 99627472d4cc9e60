"""The ``mmsafe`` command line: parse arguments, call one library function, report.

Each subcommand is a small ``add_<name>`` function that declares its arguments and a
handler; handlers import the library lazily so ``mmsafe --help`` stays fast. Errors a
user can cause (:class:`~mmsafe.errors.MmsafeError`) are printed as one line and exit 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from mmsafe import __version__
from mmsafe.errors import MmsafeError

Handler = Callable[[argparse.Namespace], int]


def _command(subparsers: argparse._SubParsersAction, name: str, help_text: str, handler: Handler) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    parser.set_defaults(handler=handler)
    return parser


# ---------------------------------------------------------------- data


def add_data(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="validate, convert and describe preference data", description="Validate, convert and describe preference data.")
    commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")

    validate = _command(commands, "validate", "check a data file; one line per problem (file:record:field), exit 1 if any", _data_validate)
    validate.add_argument("path", help="data file (records JSONL, released JSON, HF parquet or HH-RLHF JSONL[.gz])")
    validate.add_argument("--image-root", help="folder that image paths are relative to (checks that every image opens)")
    validate.add_argument("--format", dest="format_name", help="input format (default: detected from the file)")
    validate.add_argument("--max-problems", type=int, default=1000, help="stop listing problems after this many (default 1000)")

    convert = _command(commands, "convert", "convert between data formats", _data_convert)
    convert.add_argument("input", help="input file")
    convert.add_argument("output", help="output file")
    convert.add_argument("--from", dest="from_format", help="input format (default: detected)")
    convert.add_argument("--to", dest="to_format", help="output format (default: from the output file name)")
    convert.add_argument("--image-dir", help="where to write embedded images (hf input; default: OUTPUT's folder/images)")

    stats = _command(commands, "stats", "counts by entity type, turns and rejected sources", _data_stats)
    stats.add_argument("path", help="data file")
    stats.add_argument("--format", dest="format_name", help="input format (default: detected)")
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")

    sample = _command(commands, "sample", "write the bundled synthetic sample set (records + images)", _data_sample)
    sample.add_argument("out_dir", help="output folder (records.jsonl and images/ are written there)")


def _data_validate(args: argparse.Namespace) -> int:
    from mmsafe.data.validate import validate_file

    report = validate_file(args.path, image_root=args.image_root, format_name=args.format_name)
    for problem in report.problems[: args.max_problems]:
        print(problem, file=sys.stderr)
    if len(report.problems) > args.max_problems:
        print(f"... and {len(report.problems) - args.max_problems} more problems", file=sys.stderr)
    print(report.summary())
    return 0 if report.ok else 1


def _data_convert(args: argparse.Namespace) -> int:
    from mmsafe.data.formats import convert

    result = convert(args.input, args.output, from_format=args.from_format, to_format=args.to_format, image_dir=args.image_dir)
    print(result.summary())
    return 0


def _data_stats(args: argparse.Namespace) -> int:
    import json

    from mmsafe.data.stats import compute_stats

    stats = compute_stats(args.path, format_name=args.format_name)
    print(json.dumps(stats.to_dict(), indent=2) if args.json else stats.table())
    return 0


def _data_sample(args: argparse.Namespace) -> int:
    from mmsafe.data.sample import write_sample

    path = write_sample(args.out_dir)
    print(f"wrote the sample set to {path}")
    return 0


# ---------------------------------------------------------------- models


def add_models(subparsers: argparse._SubParsersAction) -> None:
    models = subparsers.add_parser("models", help="model utilities", description="Model utilities.")
    commands = models.add_subparsers(dest="models_command", required=True, metavar="COMMAND")
    tiny = _command(commands, "tiny", "build the tiny offline LLaVA-architecture checkpoint", _models_tiny)
    tiny.add_argument("out_dir", help="folder to write the checkpoint to")
    tiny.add_argument("--seed", type=int, default=0, help="random seed for weights (default 0)")


def _models_tiny(args: argparse.Namespace) -> int:
    from mmsafe.models.tiny import build_tiny_model

    path = build_tiny_model(args.out_dir, seed=args.seed)
    print(f"wrote the tiny model to {path}")
    return 0


# ---------------------------------------------------------------- main

COMMANDS = [add_data, add_models]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmsafe",
        description="Make vision-language assistants harmless with preference optimization (DPO, BPO), and measure how harmless they are.",
    )
    parser.add_argument("--version", action="version", version=f"mmsafe {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more (INFO and debug details)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except MmsafeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
