"""The ``mmsafe`` command line: parse arguments, call one library function, report.

Each subcommand is a small ``add_<name>`` function that declares its arguments and a
handler; handlers import the library lazily so ``mmsafe --help`` stays fast. Errors a
user can cause (:class:`~mmsafe.errors.MmsafeError`) are printed as one line and exit 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from mmsafe import __version__
from mmsafe.errors import MmsafeError
from mmsafe.models.recipe import DEFAULTS, DTYPES, IMAGE_MODES, PROMPT_STYLES, RECIPE_FILE

Handler = Callable[[argparse.Namespace], int]
#: How judge and report name the ways of reading --data.
BENCHMARK_HELP = (
    "how to read --data: mmsafe-po, prompts, mm-safetybench, spa-vl-harmeval, vlguard, mossbench or a plugin's (`mmsafe benchmarks list`); "
    "default: a prompt-set JSONL (id, messages, image) or mmsafe-po"
)
#: How the help names a default taken from the model's input recipe.
RECIPE_DEFAULT = f"the model's training recipe ({RECIPE_FILE})"


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
    validate.add_argument("--image-root", help="folder that image paths are relative to (default: the data file's folder); every image is opened")
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
    lines = _group_missing_images(report.problems, report.image_root, args.path)
    for line in lines[: args.max_problems]:
        print(line, file=sys.stderr)
    if len(lines) > args.max_problems:
        print(f"... and {len(lines) - args.max_problems} more problems", file=sys.stderr)
    print(report.summary())
    return 0 if report.ok else 1


def _group_missing_images(problems: list, image_root: str | None, file: str) -> list[str]:
    """Problem lines, with every "image not found" of one folder folded into one line with a count."""
    import re

    from mmsafe.errors import ImageError

    missing = [problem for problem in problems if isinstance(problem, ImageError) and problem.message.startswith("image not found")]
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


def _check_images_exist(records: list, image_root: Path | None, file: str | None) -> None:
    """Every record's image exists under ``image_root``: checked (one stat each) before a model loads.

    All missing images are reported as one error with a count, not one per record.
    """
    import os

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


def _check_model_arguments(args: argparse.Namespace) -> None:
    """--model, --adapter and --judge-model name something that exists, before data or a model loads."""
    from mmsafe.errors import ModelError
    from mmsafe.models.loading import check_model_name

    if getattr(args, "model", None) and getattr(args, "engine", "hf") == "hf":
        check_model_name(args.model, what="--model")
    adapter = getattr(args, "adapter", None)
    if adapter and not Path(adapter).expanduser().is_dir():
        raise ModelError(f"--adapter {adapter}: no such adapter folder ({Path(adapter).expanduser().absolute()})")
    if getattr(args, "judge", None) == "llama-guard":
        from mmsafe.evaluate.judges.llama_guard import DEFAULT_MODEL

        check_model_name(args.judge_model or DEFAULT_MODEL, what="--judge-model")


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
    tiny.add_argument("--arch", default=None, help="an architecture of the conformance matrix (llava-1.5, qwen2.5-vl, gemma-3, ...; default: the byte-level tiny LLaVA)")


def _models_tiny(args: argparse.Namespace) -> int:
    if args.arch is not None:
        from mmsafe.models.zoo import build

        path = build(args.arch, args.out_dir, seed=args.seed)
        print(f"wrote the tiny {args.arch} model to {path}")
        return 0
    from mmsafe.models.tiny import build_tiny_model

    path = build_tiny_model(args.out_dir, seed=args.seed)
    print(f"wrote the tiny model to {path}")
    return 0


# ---------------------------------------------------------------- generate


def _add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory or Hub id (hf engine), or the served model name (openai engine)")
    parser.add_argument(
        "--data", required=True, help="preference data (records JSONL or any format `mmsafe data convert` reads); generate and probe also read a prompt-set JSONL (id, messages, image)"
    )
    parser.add_argument("--out", required=True, help="output file")
    parser.add_argument("--format", dest="format_name", help="input format (default: detected from the file)")
    parser.add_argument("--image-root", help="folder that image paths are relative to (default: the data file's folder)")
    parser.add_argument(
        "--engine", choices=["hf", "vllm", "openai"], default="hf",
        help='hf: in-process transformers (default); vllm: in-process vLLM (pip install "mmsafe[serve]"); openai: an OpenAI-compatible server (vLLM, SGLang)',
    )  # fmt: skip
    parser.add_argument(
        "--batch-size", type=_batch_size, default=16,
        help="prompts per batch; also how many answers are written at a time (default 16); auto: hf starts at 64 on CUDA (16 on CPU), "
        "halves on out-of-memory and grows back; vllm hands it 256 prompts at a time",
    )  # fmt: skip
    parser.add_argument("--limit", type=int, help="only the first N records")
    decoding = parser.add_argument_group("decoding (default: greedy, as in the paper)")
    decoding.add_argument("--max-new-tokens", type=int, default=256, help="most tokens per answer (default 256)")
    decoding.add_argument("--min-new-tokens", type=int, default=0, help="suppress end-of-sequence before this many tokens (default 0)")
    decoding.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    decoding.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    decoding.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    decoding.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    hf = parser.add_argument_group("hf engine (--dtype, --prompt-style, --image-mode, --trust-remote-code also for vllm)")
    hf.add_argument("--dtype", choices=DTYPES, help=f"weights dtype (default: {RECIPE_DEFAULT}, else {DEFAULTS['dtype']})")
    hf.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1, ...")
    hf.add_argument("--adapter", help="a LoRA adapter directory to apply on top of --model")
    hf.add_argument(
        "--prompt-style", choices=PROMPT_STYLES, help=f"chat-template (the processor's) or llava-v1 (the raw USER: ... ASSISTANT: form) (default: {RECIPE_DEFAULT}, else {DEFAULTS['prompt_style']})"
    )
    hf.add_argument(
        "--image-mode", choices=IMAGE_MODES, help=f"pad (to a square of the mean colour, like LLaVA-1.5), resize or none (default: {RECIPE_DEFAULT}, else {DEFAULTS['image_mode']})"
    )
    hf.add_argument("--trust-remote-code", action="store_true", help="run model code shipped with the checkpoint (off by default)")
    vllm = parser.add_argument_group("vllm engine")
    vllm.add_argument("--max-model-len", type=int, help="context length vLLM reserves memory for (default: the model's)")
    vllm.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs to split the model over (default 1)")
    vllm.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="share of GPU memory vLLM may use (default 0.9)")
    server = parser.add_argument_group("openai engine")
    server.add_argument("--base-url", help="server URL, e.g. http://localhost:8000/v1")
    server.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key (default OPENAI_API_KEY; unset: no key sent)")
    server.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    server.add_argument("--timeout", type=float, default=60.0, help="longest wait for one connect or read, in seconds (default 60)")
    server.add_argument("--deadline", type=float, default=300.0, help="total seconds per HTTP attempt, connect to the last byte of the reply (default 300)")
    server.add_argument("--max-body-bytes", type=int, default=64 * 2**20, help="largest reply read, in bytes (default 67108864, 64 MiB)")
    server.add_argument("--max-retries", type=int, default=6, help="retries on 429, 5xx, timeouts and connection errors (default 6)")


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or auto, got {text!r}")
    return value


def _engine_from_args(args: argparse.Namespace):
    """The engine; ``args.batch_size`` ``auto`` is replaced by the engine's choice (the run's chunk size)."""
    from mmsafe.errors import ConfigError

    if args.engine == "openai":
        from mmsafe.generate.openai_engine import OpenAIEngine

        if not args.base_url:
            raise ConfigError("--engine openai needs --base-url (e.g. http://localhost:8000/v1)")
        if args.batch_size == "auto":
            raise ConfigError("--batch-size auto is for the hf and vllm engines; give the openai engine a number (its concurrency is --concurrency)")
        return OpenAIEngine(args.base_url, args.model, api_key_env=args.api_key_env, timeout=args.timeout, max_retries=args.max_retries, concurrency=args.concurrency, deadline_s=args.deadline, max_body_bytes=args.max_body_bytes)
    from mmsafe.generate import local_engine

    vllm_options = None
    if args.engine == "vllm":
        vllm_options = {"max_model_len": args.max_model_len, "tensor_parallel_size": args.tensor_parallel_size, "gpu_memory_utilization": args.gpu_memory_utilization}
    engine = local_engine(
        args.engine,
        args.model,
        dtype=args.dtype,
        device=args.device,
        adapter=args.adapter,
        batch_size=args.batch_size,
        trust_remote_code=args.trust_remote_code,
        prompt_style=args.prompt_style,
        image_mode=args.image_mode,
        vllm_options=vllm_options,
    )
    args.batch_size = engine.preferred_batch_size
    return engine


def _decoding_from_args(args: argparse.Namespace):
    from mmsafe.generate.engine import DecodingParams

    return DecodingParams(
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens,
        do_sample=args.sample,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )


def add_generate(subparsers: argparse._SubParsersAction) -> None:
    generate = _command(subparsers, "generate", "answer every prompt of a data file; resumable JSONL of response records", _generate)
    _add_engine_arguments(generate)
    generate.add_argument("--variant", default="default", help="variant written into each response record (default 'default')")
    generate.add_argument(
        "--benchmark",
        help="read --data as a benchmark: mmsafe-po, prompts, mm-safetybench (its folder), spa-vl-harmeval (parquet or folder), vlguard (test.json), mossbench, "
        "or a plugin's (`mmsafe benchmarks list`); default: a prompt-set JSONL (id, messages, image) or preference data",
    )
    generate.add_argument(
        "--benchmark-option", action="append", default=[], metavar="KEY=VALUE", help="benchmark loader option (repeatable), e.g. settings=[TYPO,SD] scenarios=[01-Illegal_Activitiy]"
    )


def _benchmark_records(args: argparse.Namespace) -> tuple[list, Path | None]:
    """Benchmark items (they carry their own image folder) and that folder."""
    from mmsafe.config import parse_override
    from mmsafe.errors import ConfigError
    from mmsafe.evaluate.benchmarks import load_prompts

    options = {}
    for text in args.benchmark_option:
        key, value = parse_override(text)
        options[".".join(key)] = value
    try:
        # --image-root goes to the loader where it takes one (VLGuard checks its images there).
        items = list(load_prompts(args.data, benchmark=args.benchmark, image_root=args.image_root, **options).values())
    except TypeError as error:  # an option the loader does not take
        raise ConfigError(f"--benchmark-option: {error}") from None
    if args.limit is not None:
        items = items[: args.limit]
    roots = {item.image_root for item in items if item.image is not None}
    if len(roots) > 1:
        raise ConfigError(f"benchmark {args.benchmark}: items come from several image folders; pass --image-root")
    image_root = Path(args.image_root) if args.image_root else (roots.pop() if roots else None)
    return items, image_root


def _generate(args: argparse.Namespace) -> int:
    from mmsafe.generate.runs import default_image_root, generate_responses, load_records

    params = _decoding_from_args(args)
    # The data is read (and checked) before the model is loaded, so bad input fails in seconds.
    if args.benchmark:
        records, image_root = _benchmark_records(args)
        records = load_records(records)  # the same id checks as for preference data
    else:
        records = load_records(args.data, limit=args.limit, format_name=args.format_name, prompt_sets=True)
        image_root = default_image_root(args.data, args.image_root)
    _check_images_exist(records, image_root, args.data)
    engine = _engine_from_args(args)
    summary = generate_responses(
        engine, records, args.out, image_root=image_root, params=params, batch_size=args.batch_size, variant=args.variant, limit=args.limit, source=args.data
    )
    print(summary.summary())
    failure = summary.failure_line()
    if failure is not None:
        print(f"error: {failure}", file=sys.stderr)
        return 1
    return 0


def add_blind(subparsers: argparse._SubParsersAction) -> None:
    blind = _command(subparsers, "blind", "add a blind rejected response (the reference model answering without the image) to every record", _blind)
    _add_engine_arguments(blind)
    blind.add_argument("--mode", default="remove", choices=["remove", "blank", "text"], help="remove: drop the image (the paper's way, default); blank: a grey image; text: the original text_prompt")
    blind.add_argument("--release-rows", help="also write the released MMSafe-PO JSON form (one row per rejected response) to this file")


def _blind(args: argparse.Namespace) -> int:
    from mmsafe.generate.blind import check_records, make_blind
    from mmsafe.generate.runs import default_image_root, load_records

    params = _decoding_from_args(args)
    records = load_records(args.data, limit=args.limit, format_name=args.format_name)
    check_records(records, args.mode, file=args.data)
    if args.mode == "blank":
        _check_images_exist(records, default_image_root(args.data, args.image_root), args.data)
    engine = _engine_from_args(args)
    summary = make_blind(
        engine,
        records,
        args.out,
        mode=args.mode,
        image_root=default_image_root(args.data, args.image_root),
        params=params,
        batch_size=args.batch_size,
        write_release_rows=args.release_rows,
        limit=args.limit,
        source=args.data,
    )
    print(summary.summary())
    return 0


# ---------------------------------------------------------------- probe


def add_probe(subparsers: argparse._SubParsersAction) -> None:
    from mmsafe.evaluate.probe import VARIANTS

    probe = _command(subparsers, "probe", "modality co-defense and cheating: answer and judge each record as text, multimodal, blind, blank, swap and mid variants", _probe)
    _add_engine_arguments(probe)
    probe.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)} (default: all)")
    probe.add_argument("--judges", default="refusal", help="comma-separated judges; refusal always runs, for the refusal rate (default: refusal)")
    probe.add_argument("--swap-pool", help="folder of harmless images for the swap variant (default: built-in pictures); --seed chooses each record's swap image")


def _probe(args: argparse.Namespace) -> int:
    from mmsafe.errors import DataError
    from mmsafe.evaluate.probe import probe_applicable, render_probe_markdown, run_probe
    from mmsafe.generate.runs import default_image_root, load_records

    params = _decoding_from_args(args)
    # The data is read (and its images checked) before the model is loaded, so bad input fails in seconds.
    records = load_records(args.data, limit=args.limit, format_name=args.format_name, prompt_sets=True)
    usable = [record for record in records if probe_applicable(record) is None]
    if not usable:
        raise DataError("no record can be probed: each needs an image, meta.text_prompt and meta.mid_prompt", file=args.data)
    _check_images_exist(usable, default_image_root(args.data, args.image_root), args.data)
    engine = _engine_from_args(args)
    result = run_probe(
        engine,
        args.data,
        args.out,
        image_root=args.image_root,
        variants=[name.strip() for name in args.variants.split(",") if name.strip()],
        judges=[name.strip() for name in args.judges.split(",") if name.strip()],
        swap_pool=args.swap_pool,
        params=params,
        batch_size=args.batch_size,
        limit=args.limit,
        seed=args.seed,
    )
    print(render_probe_markdown(result))
    print(f"probe written to {args.out} (probe.md, probe.json, probe.png, responses.jsonl, verdicts-*.jsonl)", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- build-data


def add_build_data(subparsers: argparse._SubParsersAction) -> None:
    build = _command(subparsers, "build-data", "modality interpretation: text preference data -> multimodal preference records + images", _build_data)
    build.add_argument("--config", help="YAML config (see configs/build/); flags and key=value overrides win over it")
    build.add_argument("--input", help="text preference data: HH-RLHF .jsonl[.gz], PKU-SafeRLHF JSONL or prompt/chosen/rejected JSONL")
    build.add_argument("--out", help="output folder (records.jsonl, images/, summary.json); a rerun resumes there")
    build.add_argument("--image-index", help="folder or CSV/JSON index of entity images (local source, gazetteer names)")
    build.add_argument("--entities", help="entity recognizer: gazetteer, hf-ner or llm")
    build.add_argument("--images", help="image sources in fallback order, comma-separated: local,wikipedia")
    build.add_argument("--rewrite", help="rewriting: template or model")
    build.add_argument("--sample", action="store_true", help="use the bundled sample: 13 synthetic HH-RLHF dialogues and their entity image index (offline; --input / --image-index still win)")
    build.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    build.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. max_records_per_dialogue=2 images.wikipedia.min_interval_s=0.5")


def build_data_config(args: argparse.Namespace):
    """The BuildConfig of a ``build-data`` command line (loaded, not run)."""
    import json

    from mmsafe.config import load_config
    from mmsafe.synthesis import BuildConfig

    overrides = []
    if getattr(args, "sample", False):
        from mmsafe.synthesis.sources import SAMPLE_IMAGE_INDEX, SAMPLE_INPUT

        overrides += [f"input={json.dumps(str(SAMPLE_INPUT))}", f"images.index={json.dumps(str(SAMPLE_IMAGE_INDEX))}"]
    overrides += list(args.overrides)
    flags = {"input": args.input, "out": args.out, "images.index": args.image_index, "entities.method": args.entities, "rewrite.method": args.rewrite}
    overrides += [f"{key}={json.dumps(value)}" for key, value in flags.items() if value is not None]
    if args.images is not None:
        overrides.append(f"images.sources={json.dumps([name.strip() for name in args.images.split(',') if name.strip()])}")
    return load_config(BuildConfig, args.config, overrides)


def _build_data(args: argparse.Namespace) -> int:
    import json

    from mmsafe.synthesis import build_data

    config = build_data_config(args)
    summary = build_data(config)
    print(json.dumps(summary.to_dict(), indent=2, ensure_ascii=False) if args.json else summary.table())
    print(f"records: {config.out}/records.jsonl, images: {config.out}/images, summary: {config.out}/summary.json", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- judge and report


def _option_value(text: str):
    """``KEY=VALUE`` values: JSON when they parse (numbers, true/false), else the string."""
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text


def add_judge(subparsers: argparse._SubParsersAction) -> None:
    judge = _command(subparsers, "judge", "label every response safe / unsafe / unparseable; resumable JSONL of verdict records", _judge)
    judge.add_argument("--responses", required=True, help="response records (JSONL) written by `mmsafe generate`")
    judge.add_argument("--out", required=True, help="verdict records (JSONL); appended to, a rerun skips what is judged")
    judge.add_argument("--judge", required=True, help="refusal (keywords: measures refusal), llama-guard (Llama Guard 3 in-process), llm (OpenAI-compatible chat model), or a plugin's name")
    judge.add_argument("--data", help="the benchmark data the responses answer (prompts, images, categories); needed by llama-guard and llm")
    judge.add_argument("--benchmark", help=BENCHMARK_HELP)
    judge.add_argument("--image-root", help="image folder of --data (mmsafe-po default: the data file's folder)")
    judge.add_argument("--batch-size", type=int, default=16, help="responses per judge call and per written batch (default 16)")
    judge.add_argument("--judge-model", help="llama-guard: checkpoint or Hub id (default meta-llama/Llama-Guard-3-8B; the 11B Vision model reads the image); llm: the served model name")
    judge.add_argument("--device", default="auto", help="llama-guard: auto (default), cpu, cuda, ...")
    judge.add_argument("--dtype", default="auto", help="llama-guard: auto (default), float32, bfloat16, float16")
    judge.add_argument("--base-url", help="llm: server URL, e.g. http://localhost:8000/v1")
    judge.add_argument("--api-key-env", default="OPENAI_API_KEY", help="llm: environment variable holding the API key (default OPENAI_API_KEY)")
    judge.add_argument("--concurrency", type=int, default=4, help="llm: requests in flight (default 4)")
    judge.add_argument("--no-image", action="store_true", help="llm: judge the text only, without sending the image")
    judge.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="any other judge option (repeatable), e.g. --option max_new_tokens=32")
    judge.add_argument(
        "--protocol", help="llm: whose judging rules, mmsafe (default: prompt, image and answer) or mm-safetybench (MM-SafetyBench's own: the answer alone, a rule per scenario)"
    )
    judge.add_argument("--benchmark-option", action="append", default=[], metavar="KEY=VALUE", help="benchmark loader option as given to generate (repeatable), e.g. settings=[text-only-changed]")


def _benchmark_options(args: argparse.Namespace) -> dict:
    """``--benchmark-option KEY=VALUE`` pairs as loader keywords."""
    from mmsafe.config import parse_override

    options = {}
    for text in getattr(args, "benchmark_option", None) or []:
        key, value = parse_override(text)
        options[".".join(key)] = value
    return options


def _judge_options(args: argparse.Namespace) -> dict:
    from mmsafe.errors import ConfigError

    options: dict = {}
    if args.judge == "llama-guard":
        options.update(device=args.device, dtype=args.dtype)
        if args.judge_model:
            options["model"] = args.judge_model
    elif args.judge == "llm":
        if not args.base_url:
            raise ConfigError("--judge llm needs --base-url (e.g. http://localhost:8000/v1) and --judge-model")
        options.update(model=args.judge_model or "", base_url=args.base_url, api_key_env=args.api_key_env, max_concurrency=args.concurrency, send_image=not args.no_image)
        if args.protocol:
            options["protocol"] = args.protocol
    if args.protocol and args.judge != "llm":
        raise ConfigError(f"--protocol is an option of the llm judge, not of {args.judge!r}")
    for text in args.option:
        key, separator, value = text.partition("=")
        if not separator or not key:
            raise ConfigError(f"--option: expected KEY=VALUE, got {text!r}")
        options[key.replace("-", "_")] = _option_value(value)
    return options


def _judge(args: argparse.Namespace) -> int:
    from mmsafe.evaluate.judges import get_judge
    from mmsafe.evaluate.judging import judge_responses

    judge = get_judge(args.judge, **_judge_options(args))
    result = judge_responses(
        args.responses, args.out, judge, data=args.data, benchmark=args.benchmark, image_root=args.image_root, batch_size=args.batch_size, benchmark_options=_benchmark_options(args)
    )
    print(result.summary())
    return 0


def add_report(subparsers: argparse._SubParsersAction) -> None:
    report = _command(subparsers, "report", "safety rates with intervals, breakdowns, model comparisons, plots and an HTML page to browse", _report)
    report.add_argument("--verdicts", nargs="+", required=True, help="verdict files (one or more models and judges)")
    report.add_argument("--out", required=True, help="output folder (summary.md, summary.json, *.png, report.html)")
    report.add_argument("--responses", nargs="*", default=[], help="response files, shown side by side in report.html")
    report.add_argument("--data", help="the benchmark data (prompts, images, categories to break down by)")
    report.add_argument("--benchmark", help=BENCHMARK_HELP)
    report.add_argument("--image-root", help="image folder of --data (mmsafe-po default: the data file's folder)")
    report.add_argument("--unparseable-as-unsafe", action="store_true", help="count unparseable verdicts as unsafe (default: left out of rates, counted apart)")
    report.add_argument("--resamples", type=int, default=10_000, help="paired bootstrap resamples (default 10000)")
    report.add_argument("--seed", type=int, default=0, help="paired bootstrap seed (default 0)")
    report.add_argument("--benchmark-option", action="append", default=[], metavar="KEY=VALUE", help="benchmark loader option as given to generate (repeatable), e.g. settings=[text-only-changed]")
    report.add_argument("--probe", help="a probe summary to show beside the rates: probe.json from mmsafe probe, or its folder")
    report.add_argument("--run-name", help="the run's name in the page header (default: the output folder)")


def _report(args: argparse.Namespace) -> int:
    from mmsafe.evaluate.report import build_report

    result = build_report(
        args.verdicts,
        args.out,
        responses=args.responses,
        data=args.data,
        benchmark=args.benchmark,
        image_root=args.image_root,
        unparseable_as_unsafe=args.unparseable_as_unsafe,
        benchmark_options=_benchmark_options(args),
        resamples=args.resamples,
        seed=args.seed,
        probe=args.probe,
        run=args.run_name,
    )
    print(result.describe())
    return 0


# ---------------------------------------------------------------- benchmarks


def add_benchmarks(subparsers: argparse._SubParsersAction) -> None:
    benchmarks = subparsers.add_parser("benchmarks", help="the benchmarks --benchmark reads", description="The benchmarks that --benchmark reads.")
    commands = benchmarks.add_subparsers(dest="benchmarks_command", required=True, metavar="COMMAND")
    listing = _command(commands, "list", "every registered benchmark (plugins: the mmsafe.benchmarks entry-point group) with its options", _benchmarks_list)
    listing.add_argument("--json", action="store_true", help="print JSON instead of text")


def _benchmarks_list(args: argparse.Namespace) -> int:
    from mmsafe.evaluate.benchmarks import describe_benchmarks

    rows = describe_benchmarks()
    if args.json:
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


# ---------------------------------------------------------------- train


def add_train(subparsers: argparse._SubParsersAction) -> None:
    from mmsafe.config import describe
    from mmsafe.train.config import TrainConfig

    options = "\n".join(f"  {name} (default {default}): {text}" for name, default, text in describe(TrainConfig))
    train = subparsers.add_parser(
        "train",
        help="DPO / BPO preference training of a vision-language model",
        description="DPO / BPO preference training on transformers.Trainer (also under accelerate launch).",
        epilog="options (YAML keys and key=value overrides):\n" + options,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.set_defaults(handler=_train)
    train.add_argument("--config", help="YAML file of TrainConfig options (configs/train/*.yaml)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="override an option, e.g. beta=0.2 max_steps=10")


def _train(args: argparse.Namespace) -> int:
    import json

    from mmsafe.config import load_config
    from mmsafe.models.loading import check_model_name
    from mmsafe.train.config import TrainConfig
    from mmsafe.train.trainer import train

    config = load_config(TrainConfig, args.config, args.overrides)
    check_model_name(config.model, revision=getattr(config, "revision", None), what="model")
    result = train(config)
    print(json.dumps({"output_dir": str(result.output_dir), "global_step": result.global_step, "skipped": result.skipped}))
    return 0


# ---------------------------------------------------------------- pairwise


def add_pairwise(subparsers: argparse._SubParsersAction) -> None:
    pairwise = _command(subparsers, "pairwise", "pairwise accuracy: does the model tell the chosen (safe) response from the rejected one?", _pairwise)
    pairwise.add_argument("--model", required=True, help="checkpoint directory, LoRA adapter directory or Hub id")
    pairwise.add_argument("--data", required=True, help="preference data (any format mmsafe reads)")
    pairwise.add_argument("--out", required=True, help="output folder (pairwise.json, pairwise.md, pairwise_answers.jsonl)")
    pairwise.add_argument("--image-root", help="folder that image paths are relative to (default: the data file's folder)")
    pairwise.add_argument("--forms", default="asked,likelihood", help="asked (the model answers which response is safe, A/B order seeded) and/or likelihood (chosen more likely than rejected); default both")
    pairwise.add_argument("--seed", type=int, default=0, help="seed of the A/B order (default 0)")
    pairwise.add_argument("--batch-size", type=int, default=8, help="records per batch (default 8)")
    pairwise.add_argument("--dtype", choices=DTYPES, help=f"weights dtype (default: {RECIPE_DEFAULT}, else {DEFAULTS['dtype']})")
    pairwise.add_argument("--device", default="auto", help="auto (default), cpu, cuda, ...")
    pairwise.add_argument("--prompt-style", choices=PROMPT_STYLES, help=f"chat-template or llava-v1 (default: {RECIPE_DEFAULT}, else {DEFAULTS['prompt_style']})")
    pairwise.add_argument("--image-mode", choices=IMAGE_MODES, help=f"pad, resize or none (default: {RECIPE_DEFAULT}, else {DEFAULTS['image_mode']})")
    pairwise.add_argument("--max-length", type=int, help=f"likelihood: most tokens of prompt + one response (default: {RECIPE_DEFAULT}, else {DEFAULTS['max_length']})")


def _pairwise(args: argparse.Namespace) -> int:
    from mmsafe.evaluate.pairwise import evaluate_pairwise

    report = evaluate_pairwise(
        args.model,
        args.data,
        args.out,
        forms=[form.strip() for form in args.forms.split(",") if form.strip()],
        image_root=args.image_root,
        seed=args.seed,
        batch_size=args.batch_size,
        dtype=args.dtype,
        device=args.device,
        prompt_style=args.prompt_style,
        image_mode=args.image_mode,
        max_length=args.max_length,
    )
    print(report.table())
    return 0


# ---------------------------------------------------------------- run and demo


def add_run(subparsers: argparse._SubParsersAction) -> None:
    from mmsafe.pipeline import STAGES

    run = _command(subparsers, "run", "run every stage of a pipeline config in order (build-data, blind, train, generate, judge, report); resumable", _run)
    run.add_argument("config", help="pipeline YAML (see configs/paper/llava15_7b.yaml)")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. out=runs/try2 train.options.beta=0.2")
    run.add_argument("--from", dest="from_stage", choices=STAGES, help="redo this stage and every later one (their outputs are removed first)")
    run.add_argument("--only", choices=STAGES, help="run just this stage (the earlier ones must be done)")


def _run(args: argparse.Namespace) -> int:
    from mmsafe.models.loading import check_model_name
    from mmsafe.pipeline import TINY_MODEL, load_pipeline_config, run_pipeline, safety_table

    config = load_pipeline_config(args.config, args.overrides)
    if config.model != TINY_MODEL:
        check_model_name(config.model, what="model")
    result = run_pipeline(config, from_stage=args.from_stage, only=args.only)
    if not result.ran:
        print("nothing to do: every stage is up to date for this config")
    report = Path(config.out) / "report" / "summary.json"
    if report.exists() and args.only in (None, "report"):
        print(safety_table(config))
        print(f"HTML report: {report.parent / 'report.html'}")
        print(f"summary: {report.parent / 'summary.md'}")
    return 0


def add_demo(subparsers: argparse._SubParsersAction) -> None:
    demo = _command(subparsers, "demo", "the whole loop on the tiny built-in model and bundled data (CPU, a few minutes)", _demo)
    demo.add_argument("--out", default="mmsafe-demo", help="output folder (default mmsafe-demo); a rerun reuses what is done")


def _demo(args: argparse.Namespace) -> int:
    import time
    from importlib import resources

    from mmsafe.pipeline import load_pipeline_config, run_pipeline, safety_table

    started = time.perf_counter()
    with resources.as_file(resources.files("mmsafe") / "configs" / "demo.yaml") as path:
        config = load_pipeline_config(path, [f"out={json.dumps(args.out)}"])
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


# ---------------------------------------------------------------- env


def add_env(subparsers: argparse._SubParsersAction) -> None:
    env = _command(subparsers, "env", "versions, devices and installed extras, to paste into a bug report", _env)
    env.add_argument("--json", action="store_true", help="print JSON instead of text")


#: The extras of the package and a module that tells whether each is installed.
EXTRAS = {"gpu": ("deepspeed", "bitsandbytes"), "serve": ("vllm",), "tensorboard": ("tensorboard",), "wandb": ("wandb",), "dev": ("pytest", "ruff"), "bench": ("trl",)}


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

    packages = ("torch", "transformers", "peft", "accelerate", "datasets", "safetensors", "tokenizers", "huggingface_hub", "trl", "deepspeed", "bitsandbytes", "vllm")
    report: dict = {"platform": platform.platform(), "python": platform.python_version(), "mmsafe": __version__}
    report.update({name: version(name) for name in packages})
    devices: dict = {"cuda": False, "cuda_devices": [], "mps": False}
    try:
        import torch

        devices["cuda"] = torch.cuda.is_available()
        devices["cuda_version"] = torch.version.cuda
        devices["cuda_devices"] = [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())] if devices["cuda"] else []
        devices["mps"] = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    except ImportError:
        pass
    report["devices"] = devices
    report["extras"] = {extra: all(importlib.util.find_spec(module) is not None for module in modules) for extra, modules in EXTRAS.items()}
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
    cuda = f"{len(devices['cuda_devices'])} ({', '.join(devices['cuda_devices'])}; CUDA {devices.get('cuda_version')})" if devices["cuda"] else "none"
    print(f"- CUDA GPUs: {cuda}")
    print(f"- MPS (Apple GPU): {'yes' if devices['mps'] else 'no'}")
    print(f"- extras: {', '.join(f'{name} ' + ('yes' if installed else 'no') for name, installed in extras.items())}")
    return 0


# ---------------------------------------------------------------- main

# In the order of the flow: the whole loop first, then each stage.
COMMANDS = [add_demo, add_run, add_data, add_build_data, add_blind, add_train, add_generate, add_judge, add_report, add_pairwise, add_probe, add_benchmarks, add_models, add_env]


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


#: Arguments that name what a command writes, to name the place of an OSError without a file name.
_OUTPUT_ARGUMENTS = ("out", "output", "output_dir", "out_dir")


def _check_arguments(args: argparse.Namespace) -> None:
    """Refuse an argument holding a lone surrogate (how Python reads bytes that are not
    UTF-8): a model or judge name with one could be neither sent nor written."""
    from mmsafe.data.jsonl import find_lone_surrogate, surrogate_message
    from mmsafe.errors import ConfigError

    for name, value in vars(args).items():
        found = find_lone_surrogate(value) if isinstance(value, str | list) else None
        if found is not None:
            raise ConfigError(f"argument {name.replace('_', '-')}: {surrogate_message(found[1])} (is the argument UTF-8?)")


def _os_error_place(error: OSError, args: argparse.Namespace) -> str:
    """The file an OSError names, else the command and the output it was writing."""
    if error.filename:
        return str(error.filename)
    command = " ".join(str(part) for part in (args.command, getattr(args, "data_command", None)) if part)
    outputs = [str(getattr(args, name)) for name in _OUTPUT_ARGUMENTS if getattr(args, name, None)]
    return f"mmsafe {command}" + (f" (output {', '.join(outputs)})" if outputs else " (the system named no file)")


class Terminated(KeyboardInterrupt):
    """SIGTERM (a job scheduler's stop, ``kill``): unwound like Ctrl-C, so what is written is kept."""


def _raise_terminated(signum: int, frame: object) -> None:
    import signal

    # Once: a second SIGTERM (a scheduler signalling the whole process group, ``timeout``
    # forwarding its own) must not cut short the unwinding that keeps what is written.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated()


#: Commands that pick up where an interrupted run stopped when rerun as they were.
RESUMABLE = ("generate", "blind", "probe", "judge", "run", "demo", "build-data", "train")


def resume_command(argv: Sequence[str]) -> str:
    """The command line that reruns this one, shell-quoted."""
    import os
    import shlex

    program = sys.argv[0] if sys.argv else "mmsafe"
    prefix = [sys.executable, "-m", "mmsafe"] if os.path.basename(program) == "__main__.py" else ["mmsafe"]
    return shlex.join([*prefix, *argv])


def _count_rows(path: Path) -> int | None:
    try:
        with path.open("rb") as handle:
            return sum(1 for line in handle if line.strip() and line.endswith(b"\n"))
    except OSError:
        return None


def interrupt_message(args: argparse.Namespace, argv: Sequence[str], signal_name: str) -> str:
    """What an interrupted command says: how far it got, what is saved where, how to go on."""
    from mmsafe.progress import last_progress

    state = last_progress()
    out = Path(args.out) if isinstance(getattr(args, "out", None), str) else None
    saved = _count_rows(out) if out is not None and out.is_file() else None
    noun = "responses" if args.command in ("generate", "blind") else "verdicts" if args.command == "judge" else "rows"
    if saved is not None and state is not None and not state.finished and state.total is not None:
        # The last progress counted this run's work; the file also holds what earlier runs wrote.
        what = f"{saved} of {saved - state.done + state.total} {noun} saved in {out}"
    elif saved is not None:
        what = f"{saved} {noun} saved in {out}"
    elif state is not None and not state.finished:
        what = f"stopped in {state.desc or 'a step'} at {state.done}{f' of {state.total}' if state.total is not None else ''}"
        if out is not None:
            what += f"; what finished is saved in {out}"
    else:
        what = f"what finished is saved in {out}" if out is not None else "stopped"
    message = f"interrupted ({signal_name}): {what}"
    if args.command in RESUMABLE:
        message += f"; rerun the same command to resume:\n  {resume_command(argv)}"
    return message


#: Commands whose --model names a checkpoint (hf engine): checked before the parser is built.
_MODEL_COMMANDS = ("generate", "blind", "probe", "pairwise")


def _model_typo_check(argv: Sequence[str]) -> None:
    """Check ``--model`` before anything slow (the full parser imports numpy): a typo fails at once."""
    from mmsafe.models.loading import check_model_name

    def values(flag: str) -> list[str]:
        found = [argv[index + 1] for index, part in enumerate(argv[:-1]) if part == flag]
        return found + [part.partition("=")[2] for part in argv if part.startswith(flag + "=")]

    command = next((part for part in argv if not part.startswith("-")), None)
    if command not in _MODEL_COMMANDS or "openai" in values("--engine"):
        return
    for value in values("--model"):
        if value and not value.startswith("-"):
            check_model_name(value, what="--model")


def main(argv: Sequence[str] | None = None) -> int:
    import contextlib
    import signal

    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" not in argv and "--help" not in argv:
        try:
            _model_typo_check(argv)
        except MmsafeError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    previous_handler = None
    with contextlib.suppress(ValueError):  # not the main thread: SIGTERM is left alone
        previous_handler = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        from mmsafe.progress import progress_every

        progress_every()  # a bad MMSAFE_PROGRESS_EVERY fails now, not after the model loads
        _check_arguments(args)
        _check_model_arguments(args)
        return args.handler(args)
    except MmsafeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # the file system said no (permissions, a full disk, a bad output path): name the file
        print(f"error: {_os_error_place(error, args)}: {error.strerror or error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as interrupt:
        terminated = isinstance(interrupt, Terminated)
        print(interrupt_message(args, argv, "SIGTERM" if terminated else "Ctrl-C"), file=sys.stderr)
        return 143 if terminated else 130
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)


if __name__ == "__main__":
    raise SystemExit(main())
