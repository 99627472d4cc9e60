"""``data``, ``models`` and ``env``: file and model utilities."""

from __future__ import annotations

import argparse
import json
import sys

from mmsafe import __version__
from mmsafe.cli.common import command, group_missing_images
from mmsafe.errors import ConfigError

# ---------------------------------------------------------------- data


def _input_argument(parser: argparse.ArgumentParser, help_text: str) -> None:
    """``--data FILE`` (the flag of every command), or the file as the first argument."""
    parser.add_argument("data_path", nargs="?", metavar="DATA", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=help_text)


def _data_of(args: argparse.Namespace) -> str:
    given = [value for value in (args.data, args.data_path) if value]
    if len(given) != 1:
        raise ConfigError("give the data file once: --data FILE" if given else "--data is required (the data file)")
    return given[0]


def _output_of(args: argparse.Namespace, positional: str = "out_path") -> str:
    given = [value for value in (args.out, getattr(args, positional)) if value]
    if len(given) != 1:
        raise ConfigError("give the output once: --out PATH" if given else "--out is required")
    return given[0]


def add_data(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser(
        "data",
        help="validate, convert and describe preference data",
        description="Validate, convert and describe preference data.",
    )
    commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")

    validate = command(
        commands,
        "validate",
        "check a data file; one line per problem (file:record:field), exit 1 if any",
        _data_validate,
    )
    _input_argument(validate, "data file (records JSONL, released JSON, HF parquet or HH-RLHF JSONL[.gz])")
    validate.add_argument(
        "--image-root",
        help="folder that image paths are relative to (default: the data file's folder); every image is opened",
    )
    validate.add_argument("--format", dest="format_name", help="input format (default: detected from the file)")
    validate.add_argument(
        "--max-problems", type=int, default=1000, help="stop listing problems after this many (default: 1000)"
    )

    convert = command(commands, "convert", "convert between data formats", _data_convert)
    _input_argument(convert, "input file")
    convert.add_argument("out_path", nargs="?", metavar="OUT", help=argparse.SUPPRESS)
    convert.add_argument("--out", help="output file (its name gives the format unless --to does)")
    convert.add_argument("--format", "--from", dest="from_format", help="input format (default: detected)")
    convert.add_argument("--to", dest="to_format", help="output format (default: from the output file name)")
    convert.add_argument(
        "--image-dir",
        dest="image_dir",
        help="where to write embedded images (hf input; default: the output's folder/images)",
    )

    stats = command(commands, "stats", "counts by entity type, turns and rejected sources", _data_stats)
    _input_argument(stats, "data file")
    stats.add_argument("--format", dest="format_name", help="input format (default: detected)")
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")

    sample = command(commands, "sample", "write the bundled synthetic sample set (records + images)", _data_sample)
    sample.add_argument("out_path", nargs="?", metavar="OUT", help=argparse.SUPPRESS)
    sample.add_argument("--out", help="output folder (records.jsonl and images/ are written there)")


def _data_validate(args: argparse.Namespace) -> int:
    from mmsafe.data.validate import validate_file

    path = _data_of(args)
    report = validate_file(path, image_root=args.image_root, format_name=args.format_name)
    lines = group_missing_images(report.problems, report.image_root, path)
    for line in lines[: args.max_problems]:
        print(line, file=sys.stderr)
    if len(lines) > args.max_problems:
        print(f"... and {len(lines) - args.max_problems} more problems", file=sys.stderr)
    print(report.summary())
    return 0 if report.ok else 1


def _data_convert(args: argparse.Namespace) -> int:
    from mmsafe.data.formats import convert

    result = convert(
        _data_of(args),
        _output_of(args),
        from_format=args.from_format,
        to_format=args.to_format,
        image_dir=args.image_dir,
    )
    print(result.summary())
    return 0


def _data_stats(args: argparse.Namespace) -> int:
    from mmsafe.data.stats import compute_stats

    stats = compute_stats(_data_of(args), format_name=args.format_name)
    print(json.dumps(stats.to_dict(), indent=2) if args.json else stats.table())
    return 0


def _data_sample(args: argparse.Namespace) -> int:
    from mmsafe.data.sample import write_sample

    path = write_sample(_output_of(args))
    print(f"wrote the sample set to {path}")
    return 0


# ---------------------------------------------------------------- models


def add_models(subparsers: argparse._SubParsersAction) -> None:
    models = subparsers.add_parser("models", help="model utilities", description="Model utilities.")
    commands = models.add_subparsers(dest="models_command", required=True, metavar="COMMAND")
    tiny = command(
        commands,
        "tiny",
        "build a tiny offline checkpoint (the byte-level LLaVA, or an architecture of the conformance matrix)",
        _models_tiny,
    )
    tiny.add_argument("out_path", nargs="?", metavar="OUT", help=argparse.SUPPRESS)
    tiny.add_argument("--out", help="folder to write the checkpoint to")
    tiny.add_argument("--seed", type=int, default=0, help="random seed for weights (default: 0)")
    tiny.add_argument(
        "--arch",
        default=None,
        help="an architecture of the conformance matrix (llava-1.5, qwen2.5-vl, gemma-3, ...; default: the byte-level tiny LLaVA)",
    )


def _models_tiny(args: argparse.Namespace) -> int:
    out = _output_of(args)
    if args.arch is not None:
        from mmsafe.models.zoo import build

        path = build(args.arch, out, seed=args.seed)
        print(f"wrote the tiny {args.arch} model to {path}")
        return 0
    from mmsafe.models.tiny import build_tiny_model

    path = build_tiny_model(out, seed=args.seed)
    print(f"wrote the tiny model to {path}")
    return 0


# ---------------------------------------------------------------- env

#: The extras of the package and a module that tells whether each is installed.
EXTRAS = {
    "gpu": ("deepspeed", "bitsandbytes"),
    "serve": ("vllm",),
    "tensorboard": ("tensorboard",),
    "wandb": ("wandb",),
    "dev": ("pytest", "ruff"),
    "bench": ("trl",),
}


def add_env(subparsers: argparse._SubParsersAction) -> None:
    env = command(subparsers, "env", "versions, devices and installed extras, to paste into a bug report", _env)
    env.add_argument("--json", action="store_true", help="print JSON instead of text")


def environment_report() -> dict:
    """Python, package versions, devices and installed extras (what ``mmsafe env`` prints)."""
    import importlib.metadata
    import importlib.util
    import platform

    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    packages = (
        "torch",
        "transformers",
        "peft",
        "accelerate",
        "datasets",
        "safetensors",
        "tokenizers",
        "huggingface_hub",
        "trl",
        "deepspeed",
        "bitsandbytes",
        "vllm",
    )
    report: dict = {"platform": platform.platform(), "python": platform.python_version(), "mmsafe": __version__}
    report.update({name: version(name) for name in packages})
    devices: dict = {"cuda": False, "cuda_devices": [], "mps": False}
    try:
        import torch

        devices["cuda"] = torch.cuda.is_available()
        devices["cuda_version"] = torch.version.cuda
        devices["cuda_devices"] = (
            [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())] if devices["cuda"] else []
        )
        devices["mps"] = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    except ImportError:
        pass
    report["devices"] = devices
    report["extras"] = {
        extra: all(importlib.util.find_spec(module) is not None for module in modules)
        for extra, modules in EXTRAS.items()
    }
    return report


def _env(args: argparse.Namespace) -> int:
    report = environment_report()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    devices = report.pop("devices")
    extras = report.pop("extras")
    for key, value in report.items():
        print(f"- {key}: {value}")
    cuda = (
        f"{len(devices['cuda_devices'])} ({', '.join(devices['cuda_devices'])}; CUDA {devices.get('cuda_version')})"
        if devices["cuda"]
        else "none"
    )
    print(f"- CUDA GPUs: {cuda}")
    print(f"- MPS (Apple GPU): {'yes' if devices['mps'] else 'no'}")
    print(f"- extras: {', '.join(f'{name} ' + ('yes' if installed else 'no') for name, installed in extras.items())}")
    return 0
