"""The typed options of the evaluation stages: ``probe``, ``judge``, ``report`` and ``pairwise``.

Each field is documented once; the command line (:mod:`mmsafe.cli.arguments`), a
``--config`` YAML file and ``KEY=VALUE`` overrides all set these fields.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mmsafe.config import option
from mmsafe.errors import ConfigError
from mmsafe.generate.config import RECIPE_DEFAULT, DataOptions, EngineOptions, stage_file
from mmsafe.models.recipe import DEFAULTS

#: How judge and report name the ways of reading --data.
BENCHMARK_HELP = "how to read --data: mmsafe-po, prompts, mm-safetybench, spa-vl-harmeval, vlguard, mossbench or a plugin's (`mmsafe benchmarks list`)"
#: The probe's variants: the prompt as text, with its image, blind, with a blank or a swapped image, and mid-way.
PROBE_VARIANTS = ("text", "multimodal", "blind", "blank", "swap", "mid")
#: The two forms of pairwise accuracy.
PAIRWISE_FORMS = ("asked", "likelihood")


def check_variants(variants: Sequence[str]) -> None:
    unknown = [variant for variant in variants if variant not in PROBE_VARIANTS]
    if unknown or not variants:
        raise ConfigError(
            f"variants: expected a non-empty subset of {', '.join(PROBE_VARIANTS)}, got {list(variants)!r}"
        )


def check_forms(forms: Sequence[str]) -> None:
    unknown = [form for form in forms if form not in PAIRWISE_FORMS]
    if unknown or not forms:
        raise ConfigError(f"forms: expected asked and/or likelihood, got {list(forms)!r}")


@dataclass(kw_only=True)
class ProbeConfig(EngineOptions):
    """``mmsafe probe``: modality co-defense and cheating (OUT/probe.md, probe.json, probe.png, responses.jsonl, verdicts-*.jsonl)."""

    variants: list[str] = option(
        default_factory=lambda: list(PROBE_VARIANTS),
        help="which variants to run (comma-separated or repeated)",
        comma=True,
    )
    judges: list[str] = option(
        default_factory=lambda: ["refusal"],
        help="judges (comma-separated or repeated); refusal always runs, for the refusal rate",
        comma=True,
        flag="judge",
        aliases=("--judges",),
        metavar="JUDGE",
    )
    swap_pool: str | None = option(
        None,
        help="folder of harmless images for the swap variant; --seed chooses each record's swap image",
        default_text="built-in pictures",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_variants(self.variants)


@dataclass(kw_only=True)
class BenchmarkDataOptions:
    """The prompts that responses answer (judge and report)."""

    data: str | None = option(None, help="the benchmark data the responses answer (prompts, images, categories)")
    benchmark: str | None = option(
        None, help=BENCHMARK_HELP, default_text="a prompt-set JSONL (id, messages, image) or mmsafe-po"
    )
    image_root: str | None = option(
        None, help="image folder of --data", default_text="mmsafe-po: the data file's folder"
    )
    benchmark_option: dict[str, Any] = option(
        default_factory=dict,
        help="benchmark loader option as given to generate (repeatable), e.g. settings=[text-only-changed]",
        pairs=True,
    )


@dataclass(kw_only=True)
class JudgeConfig(BenchmarkDataOptions):
    """``mmsafe judge``: label every response safe / unsafe / unparseable (OUT/verdicts-JUDGE.jsonl)."""

    responses: str = option(help="response records (JSONL) written by `mmsafe generate` (or its output folder)")
    out: str = option(
        help="output folder (verdicts-JUDGE.jsonl inside; a path ending in .jsonl is taken as the file itself); a rerun skips what is judged"
    )
    judge: str = option(
        help="refusal (keywords: measures refusal), llama-guard (Llama Guard 3 in-process), llm (OpenAI-compatible chat model), or a plugin's name"
    )
    batch_size: int = option(16, help="responses per judge call and per written batch")
    judge_model: str | None = option(
        None,
        help="llama-guard: checkpoint or Hub id (the 11B Vision model reads the image); llm: the served model name",
        default_text="llama-guard: meta-llama/Llama-Guard-3-8B",
    )
    device: str = option("auto", help="llama-guard: auto, cpu, cuda, ...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option("auto", help="llama-guard: weights dtype")
    base_url: str | None = option(None, help="llm: server URL, e.g. http://localhost:8000/v1")
    api_key_env: str = option("OPENAI_API_KEY", help="llm: environment variable holding the API key")
    concurrency: int = option(4, help="llm: requests in flight")
    image: bool = option(True, help="llm: send the image with the prompt (--no-image: judge the text only)")
    protocol: str | None = option(
        None,
        help="llm: whose judging rules, mmsafe (prompt, image and answer) or mm-safetybench (MM-SafetyBench's own: the answer alone, a rule per scenario)",
        default_text="mmsafe",
    )
    option: dict[str, Any] = option(
        default_factory=dict, help="any other judge option (repeatable), e.g. --option max_new_tokens=32", pairs=True
    )

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: expected a positive integer, got {self.batch_size}")

    def output_file(self) -> Path:
        return stage_file(self.out, f"verdicts-{self.judge}.jsonl")

    def responses_file(self) -> Path:
        path = Path(self.responses)
        return path / "responses.jsonl" if path.is_dir() else path

    def judge_options(self) -> dict[str, Any]:
        """The keywords of the judge's constructor."""
        options: dict[str, Any] = {}
        if self.judge == "llama-guard":
            options.update(device=self.device, dtype=self.dtype)
            if self.judge_model:
                options["model"] = self.judge_model
        elif self.judge == "llm":
            if not self.base_url:
                raise ConfigError("--judge llm needs --base-url (e.g. http://localhost:8000/v1) and --judge-model")
            options.update(
                model=self.judge_model or "",
                base_url=self.base_url,
                api_key_env=self.api_key_env,
                concurrency=self.concurrency,
                send_image=self.image,
            )
            if self.protocol:
                options["protocol"] = self.protocol
        if self.protocol and self.judge != "llm":
            raise ConfigError(f"--protocol is an option of the llm judge, not of {self.judge!r}")
        options.update({key.replace("-", "_"): value for key, value in self.option.items()})
        return options


@dataclass(kw_only=True)
class ReportConfig(BenchmarkDataOptions):
    """``mmsafe report``: rates with intervals, breakdowns, comparisons, plots and an HTML page (OUT/report.html, summary.md, summary.json)."""

    verdicts: list[str] = option(help="verdict files (one or more models and judges)", metavar="FILE")
    out: str = option(help="output folder")
    responses: list[str] = option(
        default_factory=list, help="response files, shown side by side in report.html", metavar="FILE"
    )
    unparseable_as_unsafe: bool = option(
        False, help="count unparseable verdicts as unsafe (default: left out of rates, counted apart)"
    )
    resamples: int = option(10_000, help="paired bootstrap resamples")
    seed: int = option(0, help="paired bootstrap seed")
    probe: str | None = option(
        None, help="a probe summary to show beside the rates: probe.json from mmsafe probe, or its folder"
    )
    run_name: str | None = option(None, help="the run's name in the page header", default_text="the output folder")


@dataclass(kw_only=True)
class PairwiseConfig(DataOptions):
    """``mmsafe pairwise``: does the model tell the chosen (safe) response from the rejected one? (OUT/pairwise.json, pairwise.md, pairwise_answers.jsonl)."""

    model: str = option(help="checkpoint folder, LoRA adapter folder or Hub id", group="input")
    forms: list[str] = option(
        default_factory=lambda: list(PAIRWISE_FORMS),
        help="asked (the model answers which response is safe, A/B order seeded) and/or likelihood (chosen more likely than rejected)",
        comma=True,
    )
    seed: int = option(0, help="seed of the A/B order")
    batch_size: int = option(8, help="records per batch")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = option(
        None, help="weights dtype", default_text=f"{RECIPE_DEFAULT} {DEFAULTS['dtype']}"
    )
    device: str = option("auto", help="auto, cpu, cuda, ...")
    prompt_style: Literal["chat-template", "llava-v1"] | None = option(
        None, help="chat-template or llava-v1", default_text=f"{RECIPE_DEFAULT} {DEFAULTS['prompt_style']}"
    )
    image_mode: Literal["pad", "resize", "none"] | None = option(
        None, help="pad, resize or none", default_text=f"{RECIPE_DEFAULT} {DEFAULTS['image_mode']}"
    )
    max_length: int | None = option(
        None,
        help="likelihood: most tokens of prompt + one response",
        default_text=f"{RECIPE_DEFAULT} {DEFAULTS['max_length']}",
    )

    def __post_init__(self) -> None:
        self.check_data_options()
        check_forms(self.forms)
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: expected a positive integer, got {self.batch_size}")
