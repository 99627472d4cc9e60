"""``judge``, ``report``, ``pairwise`` and ``benchmarks``: the commands that measure."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from mmsafe.cli.common import announce, check_model, dry_run_message, stage_command
from mmsafe.evaluate.config import JudgeConfig, PairwiseConfig, ReportConfig


def _judge(args: argparse.Namespace, config: JudgeConfig) -> int:
    from mmsafe.errors import DataError
    from mmsafe.evaluate.judges import get_judge
    from mmsafe.evaluate.judging import judge_responses

    options = config.judge_options()
    if config.judge == "llama-guard":
        from mmsafe.evaluate.judges.llama_guard import DEFAULT_MODEL

        check_model(options.get("model", DEFAULT_MODEL), what="--judge-model")
    responses = config.responses_file()
    out = args.output_path = config.output_file()
    if args.dry_run:
        if not responses.is_file():
            raise DataError(
                "response file not found (expected the JSONL `mmsafe generate` writes, or its output folder)",
                file=str(responses),
            )
        return dry_run_message(f"judge {config.judge} would label the responses of {responses} into {out}")
    announce(args, config)
    judge = get_judge(config.judge, **options)
    result = judge_responses(
        responses,
        out,
        judge,
        data=config.data,
        benchmark=config.benchmark,
        image_root=config.image_root,
        batch_size=config.batch_size,
        benchmark_options=config.benchmark_option,
    )
    print(result.summary())
    return 0


def _report(args: argparse.Namespace, config: ReportConfig) -> int:
    from mmsafe.errors import DataError
    from mmsafe.evaluate.report import build_report

    if args.dry_run:
        missing = [path for path in [*config.verdicts, *config.responses] if not Path(path).is_file()]
        if missing:
            raise DataError("file not found", file=missing[0])
        return dry_run_message(f"a report of {len(config.verdicts)} verdict files would be written to {config.out}")
    announce(args, config)
    result = build_report(
        config.verdicts, config.out, responses=config.responses, data=config.data, benchmark=config.benchmark, image_root=config.image_root,
        unparseable_as_unsafe=config.unparseable_as_unsafe, benchmark_options=config.benchmark_option, resamples=config.resamples, seed=config.seed,
        probe=config.probe, run=config.run_name,
    )  # fmt: skip
    print(result.describe())
    return 0


def _pairwise(args: argparse.Namespace, config: PairwiseConfig) -> int:
    from mmsafe.data.inputs import open_inputs
    from mmsafe.evaluate.pairwise import evaluate_pairwise

    check_model(config.model)
    inputs = open_inputs(
        config.data, format_name=config.format, split=config.split, limit=config.limit, image_root=config.image_root
    )
    if args.dry_run:
        return dry_run_message(
            f"{config.model} would be scored on {len(inputs.records)} preference records ({', '.join(config.forms)}) into {config.out}",
        )
    announce(args, config)
    report = evaluate_pairwise(
        config.model, inputs.records, config.out, forms=config.forms, image_root=inputs.image_root, seed=config.seed, batch_size=config.batch_size,
        dtype=config.dtype, device=config.device, prompt_style=config.prompt_style, image_mode=config.image_mode, max_length=config.max_length,
    )  # fmt: skip
    print(report.table())
    return 0


def add_judge(subparsers: argparse._SubParsersAction) -> None:
    stage_command(
        subparsers,
        "judge",
        "label every response safe / unsafe / unparseable; resumable (OUT/verdicts-JUDGE.jsonl)",
        JudgeConfig,
        _judge,
    )


def add_report(subparsers: argparse._SubParsersAction) -> None:
    stage_command(
        subparsers,
        "report",
        "safety rates with intervals, breakdowns, model comparisons, plots and an HTML page to browse",
        ReportConfig,
        _report,
    )


def add_pairwise(subparsers: argparse._SubParsersAction) -> None:
    stage_command(
        subparsers,
        "pairwise",
        "pairwise accuracy: does the model tell the chosen (safe) response from the rejected one?",
        PairwiseConfig,
        _pairwise,
    )


def _benchmarks_list(args: argparse.Namespace, config: Any) -> int:
    from mmsafe.evaluate.benchmarks import describe_benchmarks

    rows = describe_benchmarks()
    if config.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False, default=str))
        return 0
    for row in rows:
        if "error" in row:
            print(f"{row['name']} ({row['source']}): {row['error']}")
            continue
        print(f"{row['name']}: {row['description']}")
        print(f"  breaks down by: {', '.join(row['category_fields']) or '-'}")
        options = ", ".join(f"{key}={value!r}" for key, value in row["options"].items()) or "-"
        print(f"  options (--benchmark-option KEY=VALUE): {options}")
        if row["image_folder_option"]:
            print(f"  --image-root sets: {row['image_folder_option']}")
    return 0


def add_benchmarks(subparsers: argparse._SubParsersAction) -> None:
    benchmarks = subparsers.add_parser(
        "benchmarks", help="the benchmarks --benchmark reads", description="The benchmarks that --benchmark reads."
    )
    commands = benchmarks.add_subparsers(dest="benchmarks_command", required=True, metavar="COMMAND")
    from mmsafe.config import DisplayConfig

    stage_command(
        commands,
        "list",
        "every registered benchmark (plugins: the mmsafe.benchmarks entry-point group) with its options",
        DisplayConfig,
        _benchmarks_list,
        dry_run=False,
    )
