"""The typed options of the answering stages: ``generate``, ``blind`` and (in
:mod:`mmsafe.evaluate.config`) ``probe``.

Each field is documented once; the command line (:mod:`mmsafe.cli.arguments`), a
``--config`` YAML file and ``KEY=VALUE`` overrides all set these fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mmsafe.config import option
from mmsafe.errors import ConfigError
from mmsafe.models.recipe import DEFAULTS, RECIPE_FILE

#: How the help names a default taken from the model's input recipe.
RECIPE_DEFAULT = f"the model's training recipe ({RECIPE_FILE}), else"

#: The ``--help`` sections of the engine options.
ENGINE_GROUPS = {
    "input": "input and output",
    "decoding": "decoding (greedy by default, as in the paper)",
    "hf": "hf engine (dtype, prompt-style, image-mode and trust-remote-code also for vllm)",
    "vllm": "vllm engine",
    "openai": "openai engine",
}


def stage_file(out: str | Path, name: str) -> Path:
    """A stage's file ``name`` in the output folder ``out`` (``out`` itself when it names a .jsonl file)."""
    folder = Path(out)
    return folder if folder.suffix == ".jsonl" else folder / name


@dataclass(kw_only=True)
class DataOptions:
    """Which records a stage reads and where it writes."""

    data: str = option(
        help="input: preference data (records JSONL or any format `mmsafe data convert` reads) or a prompt-set JSONL (id, messages, image)",
        group="input",
    )
    out: str = option(
        help="output folder; each stage names its files inside it (a path ending in .jsonl is taken as the file itself)",
        group="input",
    )
    format: str | None = option(None, help="input format", default_text="detected from the file", group="input")
    image_root: str | None = option(
        None, help="folder that image paths are relative to", default_text="the data file's folder", group="input"
    )
    split: str | None = option(
        None,
        help="only records whose meta.split is this (records without one are kept)",
        default_text="all",
        group="input",
    )
    limit: int | None = option(None, help="only the first N records", default_text="all", group="input")

    def check_data_options(self) -> None:
        if self.limit is not None and self.limit < 0:
            raise ConfigError(f"limit: expected a non-negative integer, got {self.limit}")


@dataclass(kw_only=True)
class DecodingOptions:
    max_new_tokens: int = option(256, help="most tokens per answer", group="decoding")
    min_new_tokens: int = option(0, help="suppress end-of-sequence before this many tokens", group="decoding")
    sample: bool = option(False, help="sample instead of greedy decoding", group="decoding")
    temperature: float = option(1.0, help="sampling temperature", group="decoding")
    top_p: float = option(1.0, help="nucleus sampling mass", group="decoding")
    seed: int = option(0, help="sampling seed (probe: also each record's swap image)", group="decoding")

    def decoding(self) -> Any:
        from mmsafe.generate.engine import DecodingParams

        return DecodingParams(
            max_new_tokens=self.max_new_tokens,
            min_new_tokens=self.min_new_tokens,
            do_sample=self.sample,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
        )


@dataclass(kw_only=True)
class EngineOptions(DataOptions, DecodingOptions):
    """The model that answers, and how it is run."""

    model: str = option(help="checkpoint folder or Hub id (hf, vllm), or the served model name (openai)", group="input")
    engine: Literal["hf", "vllm", "openai"] = option(
        "hf",
        help='hf: in-process transformers; vllm: in-process vLLM (pip install "mmsafe[serve]"); openai: an OpenAI-compatible server (vLLM, SGLang)',
        group="input",
    )
    batch_size: int | Literal["auto"] = option(
        16,
        help="prompts per batch, also how many answers are written at a time; auto: hf starts at 64 on CUDA (16 on CPU), halves on out-of-memory and grows back; vllm takes 256 prompts at a time",
        group="input",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = option(
        None, help="weights dtype", default_text=f"{RECIPE_DEFAULT} {DEFAULTS['dtype']}", group="hf"
    )
    device: str = option("auto", help="auto, cpu, cuda, cuda:1, ...", group="hf")
    adapter: str | None = option(None, help="a LoRA adapter folder to apply on top of --model", group="hf")
    prompt_style: Literal["chat-template", "llava-v1"] | None = option(
        None,
        help="chat-template (the processor's) or llava-v1 (the raw USER: ... ASSISTANT: form)",
        default_text=f"{RECIPE_DEFAULT} {DEFAULTS['prompt_style']}",
        group="hf",
    )
    image_mode: Literal["pad", "resize", "none"] | None = option(
        None,
        help="pad (to a square of the mean colour, like LLaVA-1.5), resize or none",
        default_text=f"{RECIPE_DEFAULT} {DEFAULTS['image_mode']}",
        group="hf",
    )
    trust_remote_code: bool = option(False, help="run model code shipped with the checkpoint", group="hf")
    max_model_len: int | None = option(
        None, help="context length vLLM reserves memory for", default_text="the model's", group="vllm"
    )
    tensor_parallel_size: int = option(1, help="GPUs to split the model over", group="vllm")
    gpu_memory_utilization: float = option(0.9, help="share of GPU memory vLLM may use", group="vllm")
    base_url: str | None = option(None, help="server URL, e.g. http://localhost:8000/v1", group="openai")
    api_key_env: str = option(
        "OPENAI_API_KEY", help="environment variable holding the API key (unset: no key sent)", group="openai"
    )
    concurrency: int = option(8, help="requests in flight", group="openai")
    timeout: float = option(60.0, help="longest wait for one connect or read, in seconds", group="openai")
    deadline: float = option(
        300.0, help="total seconds per HTTP attempt, connect to the last byte of the reply", group="openai"
    )
    max_body_bytes: int = option(64 * 2**20, help="largest reply read, in bytes", group="openai")
    max_retries: int = option(6, help="retries on 429, 5xx, timeouts and connection errors", group="openai")

    def __post_init__(self) -> None:
        self.check_data_options()
        if isinstance(self.batch_size, int) and self.batch_size < 1:
            raise ConfigError(f"batch_size: expected a positive integer or auto, got {self.batch_size}")
        if self.engine == "openai":
            if not self.base_url:
                raise ConfigError("--engine openai needs --base-url (e.g. http://localhost:8000/v1)")
            if self.batch_size == "auto":
                raise ConfigError(
                    "--batch-size auto is for the hf and vllm engines; give the openai engine a number (its concurrency is --concurrency)"
                )

    def output_file(self, name: str) -> Path:
        return stage_file(self.out, name)


@dataclass(kw_only=True)
class GenerateConfig(EngineOptions):
    """``mmsafe generate``: answer every prompt of a data file or benchmark (OUT/responses.jsonl)."""

    variant: str = option("default", help="variant written into each response record")
    benchmark: str | None = option(
        None,
        help="read --data as a benchmark: mmsafe-po, prompts, mm-safetybench (its folder), spa-vl-harmeval (parquet or folder), vlguard (test.json), mossbench, or a plugin's (`mmsafe benchmarks list`)",
        default_text="a prompt-set JSONL or preference data",
    )
    benchmark_option: dict[str, Any] = option(
        default_factory=dict,
        help="benchmark loader option (repeatable), e.g. settings=[TYPO,SD] scenarios=[01-Illegal_Activitiy]",
        pairs=True,
    )


@dataclass(kw_only=True)
class BlindConfig(EngineOptions):
    """``mmsafe blind``: a blind rejected response for every record (OUT/records.jsonl)."""

    mode: Literal["remove", "blank", "text"] = option(
        "remove", help="remove: drop the image (the paper's way); blank: a grey image; text: the original text_prompt"
    )
    release_rows: bool = option(
        False, help="also write the released MMSafe-PO JSON form (one row per rejected response) to OUT/mmsafe-po.json"
    )
