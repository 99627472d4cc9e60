"""The typed options of the data utilities: ``mmsafe data validate | convert | stats | sample``."""

from __future__ import annotations

from dataclasses import dataclass

from mmsafe.config import option

DATA_HELP = "data file (records JSONL, released JSON, HF parquet or HH-RLHF JSONL[.gz]) or a Hub id"


@dataclass(kw_only=True)
class ValidateConfig:
    """mmsafe data validate: check a data file; one line per problem (file:record:field), exit 1 if any."""

    data: str = option(help=DATA_HELP)
    format: str | None = option(None, help="input format", default_text="detected from the file")
    image_root: str | None = option(
        None,
        help="folder that image paths are relative to; every image is opened",
        default_text="the data file's folder",
    )
    max_problems: int = option(1000, help="stop listing problems after this many")


@dataclass(kw_only=True)
class ConvertConfig:
    """mmsafe data convert: convert between data formats (jsonl, mmsafe-po, hf, hh-rlhf)."""

    data: str = option(help=DATA_HELP)
    out: str = option(help="output file (its name gives the format unless --to does)")
    format: str | None = option(None, help="input format", default_text="detected", aliases=("--from",))
    to: str | None = option(None, help="output format", default_text="from the output file name")
    image_dir: str | None = option(
        None, help="where to write embedded images (hf input)", default_text="the output's folder/images"
    )


@dataclass(kw_only=True)
class StatsConfig:
    """mmsafe data stats: counts by entity type, turns and rejected sources."""

    data: str = option(help=DATA_HELP)
    format: str | None = option(None, help="input format", default_text="detected")
    json: bool = option(False, help="print JSON instead of a table")


@dataclass(kw_only=True)
class SampleConfig:
    """mmsafe data sample: write the bundled synthetic sample set (records.jsonl and images/)."""

    out: str = option(help="output folder (records.jsonl and images/ are written there)")
