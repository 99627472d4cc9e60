"""``generate``, ``blind`` and ``probe``: the commands where a model answers prompts."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from mmsafe.cli.common import announce, check_images_exist, check_model, dry_run_message, stage_command
from mmsafe.evaluate.config import ProbeConfig
from mmsafe.generate.config import ENGINE_GROUPS, BlindConfig, EngineOptions, GenerateConfig


def batch_size_of(engine: Any, config: EngineOptions) -> Any:
    """Requests per call: the local engines' choice (``batch_size: auto`` resolved), else the config's."""
    return getattr(engine, "preferred_batch_size", config.batch_size)


def engine_from_config(config: EngineOptions) -> Any:
    """The engine of ``config``; ``batch_size: auto`` is resolved by the engine (its ``preferred_batch_size``)."""
    if config.engine == "openai":
        from mmsafe.generate.openai_engine import OpenAIEngine

        assert config.base_url is not None and isinstance(config.batch_size, int)  # checked by the config
        return OpenAIEngine(
            config.base_url, config.model, api_key_env=config.api_key_env, timeout=config.timeout, max_retries=config.max_retries,
            concurrency=config.concurrency, deadline=config.deadline, max_body_bytes=config.max_body_bytes,
        )  # fmt: skip
    from mmsafe.generate import local_engine

    vllm_options = None
    if config.engine == "vllm":
        vllm_options = {
            "max_model_len": config.max_model_len,
            "tensor_parallel_size": config.tensor_parallel_size,
            "gpu_memory_utilization": config.gpu_memory_utilization,
        }
    return local_engine(
        config.engine, config.model, dtype=config.dtype, device=config.device, adapter=config.adapter, batch_size=config.batch_size,
        trust_remote_code=config.trust_remote_code, prompt_style=config.prompt_style, image_mode=config.image_mode, vllm_options=vllm_options,
    )  # fmt: skip


def read_inputs(config: EngineOptions, *, prompt_sets: bool = False) -> Any:
    """The input set of a stage config (read and checked before any model loads)."""
    from mmsafe.data.inputs import open_inputs

    return open_inputs(
        config.data,
        format_name=config.format,
        split=config.split,
        limit=config.limit,
        image_root=config.image_root,
        prompt_sets=prompt_sets,
    )


def _benchmark_inputs(config: GenerateConfig) -> tuple[list, Path | None]:
    """Benchmark items (they carry their own image folder) and that folder."""
    from mmsafe.data.inputs import open_inputs
    from mmsafe.errors import ConfigError
    from mmsafe.evaluate.benchmarks import load_prompts

    try:
        # --image-root goes to the loader where it takes one (VLGuard checks its images there).
        items = list(
            load_prompts(
                config.data, benchmark=config.benchmark, image_root=config.image_root, **config.benchmark_option
            ).values()
        )
    except TypeError as error:  # an option the loader does not take
        raise ConfigError(f"--benchmark-option: {error}") from None
    items = open_inputs(
        items, split=config.split, limit=config.limit
    ).records  # the same id checks as for preference data
    roots = {item.image_root for item in items if item.image is not None}
    if len(roots) > 1:
        raise ConfigError(f"benchmark {config.benchmark}: items come from several image folders; pass --image-root")
    image_root = Path(config.image_root) if config.image_root else (roots.pop() if roots else None)
    return items, image_root


def _generate(args: argparse.Namespace, config: GenerateConfig) -> int:
    from mmsafe.generate.runs import generate_responses

    check_model(config.model, engine=config.engine, adapter=config.adapter)
    # The data is read (and checked) before the model is loaded, so bad input fails in seconds.
    if config.benchmark:
        records, image_root = _benchmark_inputs(config)
    else:
        inputs = read_inputs(config, prompt_sets=True)
        records, image_root = inputs.records, inputs.image_root
    check_images_exist(records, image_root, config.data)
    out = args.output_path = config.output_file("responses.jsonl")
    if args.dry_run:
        return dry_run_message(f"{config.model} would answer {len(records)} prompts into {out}")
    announce(args, config)
    engine = engine_from_config(config)
    summary = generate_responses(
        engine,
        records,
        out,
        image_root=image_root,
        params=config.decoding(),
        batch_size=batch_size_of(engine, config),
        variant=config.variant,
        limit=config.limit,
        source=config.data,
    )
    print(summary.summary())
    failure = summary.failure_line()
    if failure is not None:
        print(f"error: {failure}", file=sys.stderr)
        return 1
    return 0


def _blind(args: argparse.Namespace, config: BlindConfig) -> int:
    from mmsafe.generate.blind import check_records, make_blind

    check_model(config.model, engine=config.engine, adapter=config.adapter)
    inputs = read_inputs(config)
    check_records(inputs.records, config.mode, file=config.data)
    if config.mode == "blank":
        check_images_exist(inputs.records, inputs.image_root, config.data)
    out = args.output_path = config.output_file("records.jsonl")
    release = out.parent / "mmsafe-po.json" if config.release_rows else None
    if args.dry_run:
        return dry_run_message(
            f"{config.model} would answer {len(inputs.records)} prompts blind ({config.mode}) into {out}"
        )
    announce(args, config)
    engine = engine_from_config(config)
    summary = make_blind(
        engine, inputs, out, mode=config.mode, image_root=config.image_root, params=config.decoding(), batch_size=batch_size_of(engine, config),
        write_release_rows=release, limit=config.limit, source=config.data,
    )  # fmt: skip
    print(summary.summary())
    return 0


def _probe(args: argparse.Namespace, config: ProbeConfig) -> int:
    from mmsafe.errors import DataError
    from mmsafe.evaluate.probe import probe_applicable, render_probe_markdown, run_probe

    check_model(config.model, engine=config.engine, adapter=config.adapter)
    # The data is read (and its images checked) before the model is loaded, so bad input fails in seconds.
    inputs = read_inputs(config, prompt_sets=True)
    usable = [record for record in inputs.records if probe_applicable(record) is None]
    if not usable:
        raise DataError(
            "no record can be probed: each needs an image, meta.text_prompt and meta.mid_prompt", file=config.data
        )
    check_images_exist(usable, inputs.image_root, config.data)
    out = Path(config.out)
    if args.dry_run:
        return dry_run_message(
            f"{config.model} would be probed on {len(usable)} records ({', '.join(config.variants)}) into {out}"
        )
    announce(args, config)
    engine = engine_from_config(config)
    result = run_probe(
        engine, inputs.records, out, image_root=inputs.image_root, variants=config.variants, judges=config.judges, swap_pool=config.swap_pool,
        params=config.decoding(), batch_size=batch_size_of(engine, config), limit=config.limit, seed=config.seed,
    )  # fmt: skip
    print(render_probe_markdown(result))
    print(
        f"probe written to {out} (probe.md, probe.json, probe.png, responses.jsonl, verdicts-*.jsonl)", file=sys.stderr
    )
    return 0


def add_generate(subparsers: argparse._SubParsersAction) -> None:
    stage_command(
        subparsers,
        "generate",
        "answer every prompt of a data file or benchmark; resumable (OUT/responses.jsonl)",
        GenerateConfig,
        _generate,
        groups=ENGINE_GROUPS,
    )


def add_blind(subparsers: argparse._SubParsersAction) -> None:
    stage_command(
        subparsers, "blind", "add a blind rejected response (the reference model answering without the image) to every record; resumable (OUT/records.jsonl)",
        BlindConfig, _blind, groups=ENGINE_GROUPS,
    )  # fmt: skip


def add_probe(subparsers: argparse._SubParsersAction) -> None:
    stage_command(
        subparsers, "probe", "modality co-defense and cheating: answer and judge each record as text, multimodal, blind, blank, swap and mid variants",
        ProbeConfig, _probe, groups=ENGINE_GROUPS,
    )  # fmt: skip
