"""The options of ``mmsafe build-data``: one dataclass per stage, loaded from YAML."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mmsafe.config import option
from mmsafe.errors import ConfigError
from mmsafe.synthesis.entities import DEFAULT_NER_MODEL, ENTITY_TYPES
from mmsafe.synthesis.images import DEFAULT_USER_AGENT, DEFAULT_WIKIPEDIA_API
from mmsafe.synthesis.rewrite import (
    DEFAULT_PHRASES,
    DEFAULT_POOLS,
    DEFAULT_POSSESSIVE_PHRASES,
    DEFAULT_POSSESSIVE_POOLS,
    check_pools,
    load_pools_file,
)


@dataclass
class ModelOptions:
    """A language model reached through a generation engine."""

    engine: Literal["openai", "hf"] = option(
        "openai", help="openai: any OpenAI-compatible server (vLLM, SGLang, hosted); hf: a local transformers model"
    )
    base_url: str = option("", help="server URL for engine openai, e.g. http://localhost:8000/v1")
    model: str = option("", help="served model name (openai) or checkpoint folder / Hub id (hf)")
    api_key_env: str = option(
        "OPENAI_API_KEY", help="environment variable holding the API key (the key itself is never in the config)"
    )
    device: str = option("auto", help="device for engine hf")
    max_new_tokens: int = option(256, help="longest answer in tokens")
    temperature: float = option(0.0, help="0 for greedy (deterministic) answers")
    seed: int = option(0, help="sampling seed when temperature > 0")
    prompt: str = option("", help="versioned prompt name in mmsafe/synthesis/prompts (empty: the stage's default)")
    deadline: float = option(
        300.0, help="engine openai: total seconds per HTTP attempt, connect to the last byte of the reply"
    )
    max_body_bytes: int = option(64 * 2**20, help="engine openai: largest reply read, in bytes (64 MiB)")


@dataclass
class HFNerOptions:
    model: str = option(DEFAULT_NER_MODEL, help="token-classification model (folder or Hub id; safetensors weights)")
    device: str = option("cpu", help="cpu, cuda, cuda:1, ...")
    batch_size: int = option(32, help="instructions per forward pass")
    min_score: float = option(0.0, help="drop spans whose mean token probability is lower")


@dataclass
class GazetteerOptions:
    case_sensitive: bool = option(
        True, help="true: exact spelling or ALL CAPS only ('apple' is not 'Apple'); false: ignore case"
    )


@dataclass
class EntitiesConfig:
    method: str = option(
        "gazetteer", help="entity recognizer: gazetteer (names of the image index, offline), hf-ner or llm"
    )
    types: list[str] = option(
        default_factory=lambda: list(ENTITY_TYPES), help="entity types to keep (of PER, ORG, LOC, MISC)"
    )
    gazetteer: GazetteerOptions = option(default_factory=GazetteerOptions, help="gazetteer options")
    hf_ner: HFNerOptions = option(default_factory=HFNerOptions, help="hf-ner options")
    llm: ModelOptions = option(default_factory=ModelOptions, help="llm options (the model must answer JSON)")

    def __post_init__(self) -> None:
        unknown = [name for name in self.types if name not in ENTITY_TYPES]
        if unknown or not self.types:
            raise ConfigError(
                f"entities.types: expected a non-empty list of {', '.join(ENTITY_TYPES)}, got {self.types!r}"
            )


@dataclass
class WikipediaOptions:
    api_url: str = option(
        DEFAULT_WIKIPEDIA_API, help="MediaWiki API endpoint (another language: https://de.wikipedia.org/w/api.php)"
    )
    user_agent: str = option(
        DEFAULT_USER_AGENT, help="descriptive User-Agent; Wikimedia asks for a contact (URL or e-mail) in it"
    )
    thumb_size: int = option(500, help="width of the page image thumbnail in pixels")
    min_interval_s: float = option(0.1, help="least time between two requests (politeness)")
    max_retries: int = option(4, help="retries after a 429, a 5xx or a network error")
    backoff_s: float = option(
        1.0,
        help="bound of the first retry delay (a random wait up to it); doubles each retry; Retry-After is honoured up to max_backoff_s",
    )
    max_backoff_s: float = option(60.0, help="longest delay between retries")
    timeout: float = option(30.0, help="longest wait for one connect or read, in seconds")
    deadline: float = option(
        120.0, help="total seconds per HTTP request, connect to the last byte (a server trickling bytes is cut off)"
    )
    max_body_bytes: int = option(
        32 * 2**20,
        help="largest API answer or image download read, in bytes (32 MiB; a page-image thumbnail is well under 1 MiB)",
    )
    cache_dir: str = option("", help="on-disk cache of API answers and images (empty: OUT/cache/wikipedia)")


@dataclass
class ImagesConfig:
    sources: list[str] = option(
        default_factory=lambda: ["local"], help="image sources tried in order: local, wikipedia"
    )
    index: str = option(
        "", help="local image index: a folder of images named after entities, or a CSV/JSON index entity -> image"
    )
    wikipedia: WikipediaOptions = option(default_factory=WikipediaOptions, help="wikipedia options")
    verify: bool = option(
        True, help="open every image before it enters the data (corrupt files count as without image)"
    )

    def __post_init__(self) -> None:
        if not self.sources:
            raise ConfigError("images.sources: expected at least one image source (local, wikipedia)")


@dataclass
class RewriteConfig:
    method: str = option(
        "template",
        help="template (deictic phrase per entity type) or model (rephrased by a model, template as fallback)",
    )
    deictic: Literal["pool", "single"] = option(
        "pool",
        help="pool: a phrase drawn per record from pools[type] (seeded by seed and the record id, as in the release); single: the one phrase of phrases[type]",
    )
    phrases: dict[str, str] = option(
        default_factory=lambda: dict(DEFAULT_PHRASES), help="deictic single: phrase replacing an entity, by type"
    )
    possessive_phrases: dict[str, str] = option(
        default_factory=lambda: dict(DEFAULT_POSSESSIVE_PHRASES),
        help="deictic single: phrase replacing a possessive mention, by type",
    )
    pools: dict[str, list[str]] = option(
        default_factory=lambda: {kind: list(phrases) for kind, phrases in DEFAULT_POOLS.items()},
        help="deictic pool: phrases by type (PER, ORG, LOC, MISC; COMPANY for ORG names like 'Acme Corp'); a type left out keeps the built-in pool",
    )
    possessive_pools: dict[str, list[str]] = option(
        default_factory=lambda: {kind: list(phrases) for kind, phrases in DEFAULT_POSSESSIVE_POOLS.items()},
        help='deictic pool: possessive forms by type ("the pictured person\'s")',
    )
    pools_file: str = option(
        "",
        help="deictic pool: YAML/JSON file {PER: [phrase, ...], ..., possessive: {PER: [...]}}; the types it names replace those of pools",
    )
    model: ModelOptions = option(default_factory=ModelOptions, help="the rephrasing model (method model)")
    max_length_ratio: float = option(
        2.0, help="model answers longer than this times mid_prompt (+20 characters) fall back to the template"
    )

    def __post_init__(self) -> None:
        self.pools = check_pools(self.pools, "rewrite.pools")
        self.possessive_pools = check_pools(self.possessive_pools, "rewrite.possessive_pools")
        if self.pools_file:
            # Read now, so that the resolved pools are saved in build_config.yaml and a
            # changed file is caught by the resume check like any other setting.
            pools, possessive = load_pools_file(self.pools_file)
            self.pools = {**self.pools, **pools}
            self.possessive_pools = {**self.possessive_pools, **possessive}


@dataclass
class BuildConfig:
    """``mmsafe build-data``: text preference data -> multimodal preference records + images."""

    input: str = option(
        "",
        help="text preference data: HH-RLHF .jsonl[.gz], PKU-SafeRLHF JSONL, or JSONL with prompt/chosen/rejected",
        flag="data",
    )
    format: str = option("auto", help="auto, hh-rlhf, pku-saferlhf or jsonl")
    out: str = option("", help="output folder: records.jsonl, images/, summary.json, build_config.yaml")
    type: str = option("harmless", help="meta.type of every record")
    seed: int = option(
        0,
        help="seed for the deictic phrase drawn per record (rewrite.deictic pool) and the choice of entities when a dialogue has more than max_records_per_dialogue",
    )
    max_records_per_dialogue: int = option(0, help="at most this many records per dialogue (0: one per entity, no cap)")
    max_dialogues: int = option(0, help="read only the first N dialogues of the input (0: all)", flag="limit")
    batch_size: int = option(64, help="dialogues per step (each step is written and flushed before the next)")
    on_bad_line: Literal["report", "fail"] = option(
        "report", help="report: list bad input lines and go on; fail: stop at the first"
    )
    export_released: bool = option(False, help="also write OUT/mmsafe-po.json in the released MMSafe-PO format")
    entities: EntitiesConfig = option(default_factory=EntitiesConfig, help="entity recognition")
    images: ImagesConfig = option(default_factory=ImagesConfig, help="image matching")
    rewrite: RewriteConfig = option(default_factory=RewriteConfig, help="rewriting of the last instruction")

    def __post_init__(self) -> None:
        for name in ("max_records_per_dialogue", "max_dialogues"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: expected 0 or a positive integer, got {getattr(self, name)}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: expected a positive integer, got {self.batch_size}")

    def check_paths(self) -> None:
        if not self.input:
            raise ConfigError("input: required (the text preference file; --data or input: in the config)")
        if not self.out:
            raise ConfigError("out: required (the output folder; --out or out: in the config)")


__all__ = [
    "BuildConfig",
    "EntitiesConfig",
    "GazetteerOptions",
    "HFNerOptions",
    "ImagesConfig",
    "ModelOptions",
    "RewriteConfig",
    "WikipediaOptions",
]
