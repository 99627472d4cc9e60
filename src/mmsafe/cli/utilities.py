"""``data``, ``models`` and ``env``: file and model utilities."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from mmsafe import __version__
from mmsafe.cli.common import group_missing_images, stage_command

# ---------------------------------------------------------------- data


def add_data(subparsers: argparse._SubParsersAction) -> None:
    from mmsafe.data.config import ConvertConfig, SampleConfig, StatsConfig, ValidateConfig

    data = subparsers.add_parser(
        "data",
        help="validate, convert and describe preference data",
        description="Validate, convert and describe preference data.",
    )
    commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    # The bare forms (`data validate FILE`, `data convert IN OUT`) of before the flags still work.
    stage_command(
        commands,
        "validate",
        "check a data file; one line per problem (file:record:field), exit 1 if any",
        ValidateConfig,
        _data_validate,
        positionals=("data",),
        dry_run=False,
    )
    stage_command(
        commands,
        "convert",
        "convert between data formats",
        ConvertConfig,
        _data_convert,
        positionals=("data", "out"),
        dry_run=False,
    )
    stage_command(
        commands,
        "stats",
        "counts by entity type, turns and rejected sources",
        StatsConfig,
        _data_stats,
        positionals=("data",),
        dry_run=False,
    )
    stage_command(
        commands,
        "sample",
        "write the bundled synthetic sample set (records + images)",
        SampleConfig,
        _data_sample,
        positionals=("out",),
        dry_run=False,
    )


def _data_validate(args: argparse.Namespace, config: Any) -> int:
    from mmsafe.data.validate import validate_file

    report = validate_file(config.data, image_root=config.image_root, format_name=config.format)
    lines = group_missing_images(report.problems, report.image_root, config.data)
    for line in lines[: config.max_problems]:
        print(line, file=sys.stderr)
    if len(lines) > config.max_problems:
        print(f"... and {len(lines) - config.max_problems} more problems", file=sys.stderr)
    print(report.summary())
    return 0 if report.ok else 1


def _data_convert(args: argparse.Namespace, config: Any) -> int:
    from mmsafe.data.formats import convert

    args.output_path = config.out
    result = convert(
        config.data, config.out, from_format=config.format, to_format=config.to, image_dir=config.image_dir
    )
    print(result.summary())
    return 0


def _data_stats(args: argparse.Namespace, config: Any) -> int:
    from mmsafe.data.stats import compute_stats

    stats = compute_stats(config.data, format_name=config.format)
    print(json.dumps(stats.to_dict(), indent=2) if config.json else stats.table())
    return 0


def _data_sample(args: argparse.Namespace, config: Any) -> int:
    from mmsafe.data.sample import write_sample

    path = write_sample(config.out)
    print(f"wrote the sample set to {path}")
    return 0


# ---------------------------------------------------------------- models


def add_models(subparsers: argparse._SubParsersAction) -> None:
    from mmsafe.models.config import TinyModelConfig

    models = subparsers.add_parser("models", help="model utilities", description="Model utilities.")
    commands = models.add_subparsers(dest="models_command", required=True, metavar="COMMAND")
    stage_command(
        commands,
        "tiny",
        "build a tiny offline checkpoint (the byte-level LLaVA, or an architecture of the conformance matrix)",
        TinyModelConfig,
        _models_tiny,
        positionals=("out",),
        dry_run=False,
    )


def _models_tiny(args: argparse.Namespace, config: Any) -> int:
    if config.arch is not None:
        from mmsafe.models.zoo import build

        path = build(config.arch, config.out, seed=config.seed)
        print(f"wrote the tiny {config.arch} model to {path}")
        return 0
    from mmsafe.models.tiny import build_tiny_model

    path = build_tiny_model(config.out, seed=config.seed)
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
    from mmsafe.config import DisplayConfig

    stage_command(
        subparsers,
        "env",
        "versions, devices and installed extras, to paste into a bug report",
        DisplayConfig,
        _env,
        dry_run=False,
    )


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


def _env(args: argparse.Namespace, config: Any) -> int:
    report = environment_report()
    if config.json:
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
