"""Safety benchmarks read from local folders, as prompts that generation can answer.

A benchmark loader turns files on disk into :class:`BenchmarkItem` objects: an id, the
prompt as messages (``<image>`` marks the image in the last user turn), the image path
relative to ``image_root``, and the category fields its metrics break down by. Items
carry the same ``id`` / ``messages`` / ``image`` / ``meta`` attributes as a preference
record, so the generation stage reads them the same way.

Built in (an open set: :func:`register_benchmark` adds more):

- ``mmsafe-po``: the MMSafe-PO test split, released JSON or HF parquet (any format
  :func:`mmsafe.data.formats.read_records` reads); broken down by ``entity_type``.
- ``mm-safetybench``: ``processed_questions/<scenario>.json`` and
  ``imgs/<scenario>/{SD,TYPO,SD_TYPO}/<key>.jpg``; settings text-only, SD, TYPO,
  SD_TYPO; broken down by ``scenario`` and ``setting``.
- ``spa-vl-harmeval``: the SPA-VL test ``harm`` split, a parquet file, a folder of
  parquet shards or a ``datasets.save_to_disk`` folder with ``image``, ``question``,
  ``class1``, ``class2``, ``class3``; broken down by ``class1``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmsafe.data.records import IMAGE_TOKEN, Message
from mmsafe.errors import ConfigError, DataError


@dataclass
class BenchmarkItem:
    """One benchmark prompt. ``image`` is relative to ``image_root`` (None: text only)."""

    id: str
    messages: list[Message]
    image: str | None = None
    image_root: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def image_path(self) -> Path | None:
        """The image file, confined to ``image_root`` (an ImageError if it would leave it)."""
        if self.image is None:
            return None
        if self.image_root is None:
            raise DataError("the item names an image but has no image root", record=self.id, field="image")
        from mmsafe.data.images import resolve_image_path

        return resolve_image_path(self.image_root, self.image)

    @property
    def prompt(self) -> str:
        return self.messages[-1].content


Loader = Callable[..., list[BenchmarkItem]]


@dataclass(frozen=True)
class Benchmark:
    """A loader and the meta fields that its results are broken down by."""

    name: str
    description: str
    load: Loader
    category_fields: tuple[str, ...] = ()


BENCHMARKS: dict[str, Benchmark] = {}


def register_benchmark(benchmark: Benchmark, *, replace: bool = False) -> Benchmark:
    if benchmark.name in BENCHMARKS and not replace:
        raise ValueError(f"a benchmark named {benchmark.name!r} is already registered")
    BENCHMARKS[benchmark.name] = benchmark
    return benchmark


def available_benchmarks() -> list[str]:
    return sorted(BENCHMARKS)


def get_benchmark(name: str) -> Benchmark:
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise ConfigError(f"unknown benchmark {name!r}; available: {', '.join(available_benchmarks())}") from None


def load_benchmark(name: str, path: str | Path, **options: Any) -> list[BenchmarkItem]:
    """The items of benchmark ``name`` stored at ``path`` (loader ``options`` passed on)."""
    return get_benchmark(name).load(path, **options)


# ---------------------------------------------------------------- mmsafe-po


def load_mmsafe_po(path: str | Path, *, image_root: str | Path | None = None, format_name: str | None = None) -> list[BenchmarkItem]:
    """MMSafe-PO records (released JSON, HF parquet, or our JSONL) as benchmark items.

    ``image_root``: the folder the record image names are relative to. By default it
    is the data file's folder (as for generation); for parquet, whose images are
    embedded, it is ``images/`` beside the file (or inside the folder of shards), where
    the images are written once and read from.
    """
    from mmsafe.data.formats import read_records

    path = Path(path)
    embeds_images = path.suffix == ".parquet" or path.is_dir()
    if image_root is not None:
        root = Path(image_root)
    elif embeds_images:
        root = (path if path.is_dir() else path.parent) / "images"
    else:
        root = path.parent
    records = read_records(path, format_name, image_dir=root if embeds_images else None)
    items = [BenchmarkItem(record.id, list(record.messages), record.image, root, dict(record.meta)) for record in records]
    _check_unique(items, str(path))
    return items


# ---------------------------------------------------------------- mm-safetybench

MM_SAFETYBENCH_SETTINGS = ("text-only", "SD", "TYPO", "SD_TYPO")
#: Which question each setting asks (MM-SafetyBench pairs each image kind with one).
MM_SAFETYBENCH_QUESTION = {
    "text-only": "Question",
    "SD": "Rephrased Question(SD)",
    "TYPO": "Rephrased Question",
    "SD_TYPO": "Rephrased Question",
}
_MM_SAFETYBENCH_LAYOUT = "processed_questions/<scenario>.json and imgs/<scenario>/{SD,TYPO,SD_TYPO}/<key>.jpg"


def _key_order(key: str) -> tuple[int, str]:
    return (int(key), key) if key.isdigit() else (1 << 30, key)


def load_mm_safetybench(
    path: str | Path,
    *,
    settings: Iterable[str] = MM_SAFETYBENCH_SETTINGS,
    scenarios: Iterable[str] | None = None,
) -> list[BenchmarkItem]:
    """MM-SafetyBench items, one per (scenario, question, setting).

    Ids are ``<scenario>/<setting>/<key>``; ``meta`` holds ``scenario``, ``setting``,
    ``key``, ``key_phrase`` and ``phrase_type``. Image paths are relative to ``path``.
    A missing folder, question file, field or image is a DataError naming what is
    expected where.
    """
    root = Path(path)
    settings = list(settings)
    unknown = [setting for setting in settings if setting not in MM_SAFETYBENCH_SETTINGS]
    if unknown:
        raise ConfigError(f"unknown MM-SafetyBench setting(s) {', '.join(unknown)}; expected some of {', '.join(MM_SAFETYBENCH_SETTINGS)}")
    questions_dir = root / "processed_questions"
    if not questions_dir.is_dir():
        raise DataError(f"expected the MM-SafetyBench layout {_MM_SAFETYBENCH_LAYOUT}; the folder processed_questions/ is missing", file=str(questions_dir))
    available = {file.stem: file for file in sorted(questions_dir.glob("*.json"))}
    if not available:
        raise DataError("expected one <scenario>.json per scenario (e.g. 01-Illegal_Activitiy.json), found none", file=str(questions_dir))
    if scenarios is None:
        chosen = list(available)
    else:
        chosen = list(scenarios)
        missing = [name for name in chosen if name not in available]
        if missing:
            raise DataError(f"no question file for scenario(s) {', '.join(missing)} (expected {missing[0]}.json); found {', '.join(available)}", file=str(questions_dir))
    items = []
    for scenario in chosen:
        items.extend(_mm_safetybench_scenario(root, scenario, available[scenario], settings))
    return items


def _mm_safetybench_scenario(root: Path, scenario: str, file: Path, settings: list[str]) -> Iterator[BenchmarkItem]:
    try:
        questions = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"not valid JSON ({error})", file=str(file)) from None
    if not isinstance(questions, dict):
        raise DataError(f"expected an object keyed '0', '1', ..., got a JSON {type(questions).__name__}", file=str(file))
    for key in sorted(questions, key=_key_order):
        entry = questions[key]
        if not isinstance(entry, dict):
            raise DataError(f"expected an object with the question fields, got {type(entry).__name__}", file=str(file), record=key)
        for setting in settings:
            question_field = MM_SAFETYBENCH_QUESTION[setting]
            question = entry.get(question_field)
            if not isinstance(question, str) or not question.strip():
                raise DataError(f"expected a non-empty string (the {setting} question)", file=str(file), record=key, field=question_field)
            image = None
            if setting != "text-only":
                image = f"imgs/{scenario}/{setting}/{key}.jpg"
                if not (root / image).is_file():
                    raise DataError(f"image missing: expected {root / image} ({_MM_SAFETYBENCH_LAYOUT})", file=str(file), record=key, field="image")
            content = question if image is None else f"{IMAGE_TOKEN}\n{question}"
            meta = {
                "scenario": scenario,
                "setting": setting,
                "key": key,
                "key_phrase": entry.get("Key Phrase"),
                "phrase_type": entry.get("Phrase Type"),
            }
            yield BenchmarkItem(f"{scenario}/{setting}/{key}", [Message("user", content)], image, root, meta)


# ---------------------------------------------------------------- spa-vl-harmeval

SPA_VL_COLUMNS = ("image", "question", "class1", "class2", "class3")


def _spa_vl_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(source file, row)`` from a parquet file, a folder of shards, or a save_to_disk folder."""
    if path.is_dir() and (path / "dataset_info.json").is_file() and not any(path.rglob("*.parquet")):
        import datasets

        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            if "harm" not in dataset:
                raise DataError(f"expected a 'harm' split, found {', '.join(dataset)}", file=str(path))
            dataset = dataset["harm"]
        if "image" in dataset.column_names:
            dataset = dataset.cast_column("image", datasets.Image(decode=False))
        for row in dataset:
            yield str(path), row
        return
    import pyarrow.parquet as pq

    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
        harm = [file for file in files if "harm" in file.name]
        files = harm or files
        if not files:
            raise DataError("expected the SPA-VL HarmEval parquet file(s) or a datasets.save_to_disk folder here, found neither", file=str(path))
    else:
        files = [path]
    for file in files:
        for row in pq.read_table(file).to_pylist():
            yield str(file), row


def load_spa_vl_harmeval(path: str | Path, *, image_dir: str | Path | None = None) -> list[BenchmarkItem]:
    """SPA-VL HarmEval items, ids ``harm-<row>``; ``meta`` holds ``class1..class3``.

    Embedded images are written once to ``image_dir`` (default: ``images/`` beside a
    parquet file, or inside the dataset folder) and read from there.
    """
    from mmsafe.data.formats.hf import ImageWriter

    path = Path(path)
    if not path.exists():
        raise DataError("not found (expected the SPA-VL HarmEval .parquet file, a folder of shards, or a datasets.save_to_disk folder)", file=str(path))
    root = Path(image_dir) if image_dir is not None else (path / "images" if path.is_dir() else path.parent / "images")
    writer = ImageWriter(root)
    items = []
    for index, (file, row) in enumerate(_spa_vl_rows(path)):
        record = f"harm-{index}"
        for column in SPA_VL_COLUMNS:
            if column not in row:
                raise DataError(f"missing column {column!r} (expected columns {', '.join(SPA_VL_COLUMNS)})", file=file, record=record, field=column)
        question = row["question"]
        if not isinstance(question, str) or not question.strip():
            raise DataError("expected a non-empty question", file=file, record=record, field="question")
        image = _embedded_image_name(row["image"], writer, record, file)
        content = question if image is None else f"{IMAGE_TOKEN}\n{question}"
        meta = {name: row[name] for name in ("class1", "class2", "class3")}
        items.append(BenchmarkItem(record, [Message("user", content)], image, root, meta))
    return items


def _embedded_image_name(value: Any, writer: Any, record: str, file: str) -> str | None:
    """Write an embedded image (bytes or ``{bytes, path}``) and return its name under the root."""
    if value is None:
        return None
    data = value.get("bytes") if isinstance(value, dict) else value
    original = value.get("path") if isinstance(value, dict) else None
    if not isinstance(data, bytes | bytearray):
        raise DataError(f"expected embedded image bytes, got {type(data).__name__}", file=file, record=record, field="image")
    try:
        return writer.name_for(bytes(data), original, record)
    except ValueError as error:
        raise DataError(str(error), file=file, record=record, field="image") from None


# ---------------------------------------------------------------- shared


def _check_unique(items: list[BenchmarkItem], source: str) -> None:
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise DataError("duplicate id; ids must be unique to match responses to prompts", file=source, record=item.id, field="id")
        seen.add(item.id)


#: The loader keyword that an image folder given on the command line maps to.
IMAGE_FOLDER_OPTION = {"mmsafe-po": "image_root", "spa-vl-harmeval": "image_dir"}


def load_prompts(
    data: str | Path | Mapping[str, BenchmarkItem] | Iterable[Any],
    *,
    benchmark: str | None = None,
    image_root: str | Path | None = None,
    **options: Any,
) -> dict[str, BenchmarkItem]:
    """Prompts by id, from a path (read as ``benchmark``, default ``mmsafe-po``) or items.

    ``image_root`` is where the images are (MMSafe-PO) or go (SPA-VL's embedded images);
    MM-SafetyBench finds its own under its folder. Items may be benchmark items or
    preference records (anything with ``id``, ``messages``, ``image`` and ``meta``).
    """
    if isinstance(data, Mapping):
        return dict(data)
    if isinstance(data, str | Path):
        name = benchmark or "mmsafe-po"
        option = IMAGE_FOLDER_OPTION.get(name)
        if image_root is not None and option is not None:
            options[option] = image_root
        items = load_benchmark(name, data, **options)
        source = str(data)
    else:
        root = None if image_root is None else Path(image_root)
        items = [
            item if isinstance(item, BenchmarkItem) else BenchmarkItem(item.id, list(item.messages), item.image, root, dict(item.meta))
            for item in data
        ]
        source = "data"
    _check_unique(items, source)
    return {item.id: item for item in items}


register_benchmark(Benchmark("mmsafe-po", "MMSafe-PO test split (released JSON, HF parquet or records JSONL)", load_mmsafe_po, ("entity_type",)))
register_benchmark(Benchmark("mm-safetybench", "MM-SafetyBench (processed_questions/ + imgs/), settings text-only, SD, TYPO, SD_TYPO", load_mm_safetybench, ("scenario", "setting")))
register_benchmark(Benchmark("spa-vl-harmeval", "SPA-VL HarmEval (harm split: image, question, class1..3)", load_spa_vl_harmeval, ("class1",)))
