"""``build-data``, ``train``, ``run`` and ``demo``: the commands that build data and models."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mmsafe.cli.arguments import (
    add_config_arguments,
    add_config_source_arguments,
    config_line,
    config_yaml,
    resolve_config,
)
from mmsafe.cli.common import announce, dry_run_message, logger, run_stage, stage_command

# ---------------------------------------------------------------- build-data


def add_build_data(subparsers: argparse._SubParsersAction) -> None:
    from mmsafe.synthesis import BuildConfig

    build = subparsers.add_parser(
        "build-data",
        help="modality interpretation: text preference data -> multimodal preference records + images",
        description=(BuildConfig.__doc__ or "").strip()
        + " Nested options (entities.*, images.*, rewrite.*: see configs/build/) are set in --config or as KEY=VALUE.",
    )
    add_config_source_arguments(build)
    add_config_arguments(build, BuildConfig)
    build.add_argument(
        "--input", dest="config.input", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )  # the earlier name of --data
    shortcuts = build.add_argument_group("shortcuts for nested options")
    shortcuts.add_argument(
        "--image-index", help="images.index: folder or CSV/JSON index of entity images (local source, gazetteer names)"
    )
    shortcuts.add_argument("--entities", help="entities.method: gazetteer, hf-ner or llm")
    shortcuts.add_argument(
        "--images", help="images.sources: image sources in fallback order, comma-separated: local,wikipedia"
    )
    shortcuts.add_argument("--rewrite", help="rewrite.method: template or model")
    shortcuts.add_argument(
        "--sample",
        action="store_true",
        help="use the bundled sample: 13 synthetic HH-RLHF dialogues and their entity image index (offline; --data / --image-index still win)",
    )
    build.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    build.set_defaults(handler=_build_data)


def build_data_config(args: argparse.Namespace) -> Any:
    """The BuildConfig of a ``build-data`` command line (loaded, not run)."""
    from mmsafe.synthesis import BuildConfig

    before = []
    if getattr(args, "sample", False):
        from mmsafe.synthesis.sources import SAMPLE_IMAGE_INDEX, SAMPLE_INPUT

        before += [
            (f"input={json.dumps(str(SAMPLE_INPUT))}", "--sample"),
            (f"images.index={json.dumps(str(SAMPLE_IMAGE_INDEX))}", "--sample"),
        ]
    after = []
    for flag, key in (("image_index", "images.index"), ("entities", "entities.method"), ("rewrite", "rewrite.method")):
        value = getattr(args, flag, None)
        if value is not None:
            after.append((f"{key}={json.dumps(value)}", "--" + flag.replace("_", "-")))
    if getattr(args, "images", None) is not None:
        after.append(
            (
                f"images.sources={json.dumps([name.strip() for name in args.images.split(',') if name.strip()])}",
                "--images",
            )
        )
    return resolve_config(BuildConfig, args, before=before, after=after)


def _build_data(args: argparse.Namespace) -> int:
    from mmsafe.synthesis import build_data

    config = build_data_config(args)
    if args.print_config:
        print(config_yaml(config), end="")
        return 0
    if args.dry_run:
        config.check_paths()
        if not Path(config.input).is_file():
            from mmsafe.errors import DataError

            raise DataError("input file not found", file=config.input)
        return dry_run_message(f"records would be built from {config.input} into {config.out}")
    logger.info("build-data: %s", config_line(config))
    summary = build_data(config)
    print(json.dumps(summary.to_dict(), indent=2, ensure_ascii=False) if args.json else summary.table())
    print(
        f"records: {config.out}/records.jsonl, images: {config.out}/images, summary: {config.out}/summary.json",
        file=sys.stderr,
    )
    return 0


# ---------------------------------------------------------------- train


def _train(args: argparse.Namespace, config: Any) -> int:
    from mmsafe.models.loading import check_model_name
    from mmsafe.train.trainer import train

    check_model_name(config.model, revision=getattr(config, "revision", None), what="model")
    if args.dry_run:
        from mmsafe.train.trainer import check_rejected_sources, load_training_records

        records = load_training_records(config)
        check_rejected_sources(config, records)
        return dry_run_message(
            f"{config.loss} would train {config.model} on {len(records)} records into {config.output_dir}"
        )
    announce(args, config)
    result = train(config)
    print(
        json.dumps({"output_dir": str(result.output_dir), "global_step": result.global_step, "skipped": result.skipped})
    )
    return 0


def add_train(subparsers: argparse._SubParsersAction) -> None:
    from mmsafe.train.config import TrainConfig

    stage_command(
        subparsers,
        "train",
        "DPO / BPO preference training of a vision-language model (also under accelerate launch)",
        TrainConfig,
        _train,
    )


# ---------------------------------------------------------------- run and demo


def pipeline_keys_text() -> str:
    """The keys of a pipeline config, from its dataclasses (the epilog of ``run --help``)."""
    import dataclasses
    import typing

    from mmsafe.config import describe
    from mmsafe.pipeline.config import PipelineConfig

    hints = typing.get_type_hints(PipelineConfig)
    lines = ["config keys (YAML, or KEY=VALUE overrides):"]
    for name, default, text in describe(PipelineConfig):
        section = hints[name]
        if isinstance(section, type) and dataclasses.is_dataclass(section):
            lines.append(f"  {name}: {text}")
            lines += [f"    {name}.{key} (default {value}): {help_text}" for key, value, help_text in describe(section)]
        else:
            lines.append(f"  {name} (default {default}): {text}")
    lines.append("train.options, train.dpo, train.bpo and teach.options take the keys of `mmsafe train --help`;")
    lines.append("build takes those of `mmsafe build-data --help`; judge.options.JUDGE the options of that judge.")
    return "\n".join(lines)


def add_run(subparsers: argparse._SubParsersAction) -> None:
    from mmsafe.pipeline import STAGES

    run = subparsers.add_parser(
        "run",
        help="run every stage of a pipeline config in order (build-data, blind, train, generate, judge, report); resumable",
        description="Run every stage of a pipeline config in order; every key is checked before the first stage starts.",
        epilog=pipeline_keys_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.set_defaults(handler=_run)
    run.add_argument("config", help="pipeline YAML (see configs/paper/llava15_7b.yaml)")
    run.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. out=runs/try2 train.options.beta=0.2"
    )
    run.add_argument(
        "--from",
        dest="from_stage",
        choices=STAGES,
        help="redo this stage and every later one (the files they wrote are removed first)",
    )
    run.add_argument("--only", choices=STAGES, help="run just this stage (the earlier ones must be done)")
    run.add_argument("--print-config", action="store_true", help="print the resolved pipeline config as YAML and exit")
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="check the whole config and say which stages would run, without running any",
    )


def _run(args: argparse.Namespace) -> int:
    from mmsafe.models.loading import check_model_name
    from mmsafe.pipeline import TINY_MODEL, load_pipeline_config, run_pipeline, safety_table

    config = load_pipeline_config(args.config, args.overrides)
    if args.print_config:
        print(config_yaml(config), end="")
        return 0
    if config.model != TINY_MODEL:
        check_model_name(config.model, what="model")
    if args.dry_run:
        return _plan(config, from_stage=args.from_stage, only=args.only)
    logger.info(
        "run: every key checked; the resolved config is written to %s (--print-config prints it)",
        Path(config.out) / "run_config.yaml",
    )
    result = run_pipeline(config, from_stage=args.from_stage, only=args.only)
    if not result.ran:
        print("nothing to do: every stage is up to date for this config")
    report = Path(config.out) / "report" / "summary.json"
    if report.exists() and args.only in (None, "report"):
        print(safety_table(config))
        print(f"HTML report: {report.parent / 'report.html'}")
        print(f"summary: {report.parent / 'summary.md'}")
    return 0


def _plan(config: Any, *, from_stage: str | None, only: str | None) -> int:
    """``run --dry-run``: each stage and whether it would run."""
    from mmsafe.pipeline import STAGES, stage_status

    for stage in STAGES:
        if only is not None and stage != only:
            continue
        status = stage_status(config, stage)
        if from_stage is not None and STAGES.index(stage) >= STAGES.index(from_stage):
            status = "would be redone (--from)"
        print(f"{stage:<11} {status}")
    return dry_run_message("the whole config was checked")


def add_demo(subparsers: argparse._SubParsersAction) -> None:
    from mmsafe.pipeline.config import DemoConfig

    stage_command(
        subparsers,
        "demo",
        "the whole loop on the tiny built-in model and bundled data (CPU, a few minutes)",
        DemoConfig,
        _demo,
        dry_run=False,
    )


def _demo(args: argparse.Namespace, demo: Any) -> int:
    import time
    from importlib import resources

    from mmsafe.pipeline import load_pipeline_config, run_pipeline, safety_table

    started = time.perf_counter()
    with resources.as_file(resources.files("mmsafe") / "configs" / "demo.yaml") as path:
        config = load_pipeline_config(path, [f"out={json.dumps(demo.out)}"])
    run_pipeline(config)
    print()
    print("Safety on the held-out sample records (refusal judge: refusing is the safe answer here),")
    print("and over-refusal on the benign sample prompts (refusing them is the failure):")
    print(safety_table(config))
    print()
    print(f"HTML report: {Path(config.out) / 'report' / 'report.html'}")
    print(f"summary: {Path(config.out) / 'report' / 'summary.md'}")
    print(f"demo finished in {time.perf_counter() - started:.0f}s; everything it wrote is in {config.out}")
    return 0


__all__ = ["add_build_data", "add_demo", "add_run", "add_train", "build_data_config", "run_stage"]
