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
  ``imgs/<scenario>/{SD,TYPO,SD_TYPO}/<key>.jpg`` (the repository's ``data/``, or the
  clone root above it); settings text-only, SD, TYPO, SD_TYPO, and text-only-changed
  when asked; ``subset="tiny"`` for upstream's 168 questions; broken down by
  ``scenario`` and ``setting``.
- ``spa-vl-harmeval``: the SPA-VL test ``harm`` split, a parquet file, a folder of
  parquet shards in the Hub's layouts, or a ``datasets.save_to_disk`` folder (the test
  DatasetDict or its harm split) with ``image``, ``question``, ``class1``, ``class2``,
  ``class3``; broken down by ``class1``.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from mmsafe.data.prompts import BenchmarkItem, is_prompt_set, item_from_record, read_prompt_set
from mmsafe.data.records import IMAGE_TOKEN, Message
from mmsafe.errors import ConfigError, DataError
from mmsafe.evaluate.mossbench import load_mossbench
from mmsafe.evaluate.vlguard import load_vlguard
from mmsafe.registry import Registry, first_doc_line

#: Third-party benchmarks: an entry point ``name = "package.module:BENCHMARK"`` naming a
#: :class:`Benchmark` (or a loader function ``(path, **options) -> list[BenchmarkItem]``).
ENTRY_POINT_GROUP = "mmsafe.benchmarks"


Loader = Callable[..., list[BenchmarkItem]]


@dataclass(frozen=True)
class Benchmark:
    """A loader and the meta fields that its results are broken down by.

    ``image_folder_option`` names the loader keyword that ``--image-root`` sets (the
    folder its images are in, or are written to), if it has one.
    """

    name: str
    description: str
    load: Loader
    category_fields: tuple[str, ...] = ()
    image_folder_option: str | None = None

    def options(self) -> dict[str, Any]:
        """The loader's options (its keyword arguments) and their defaults."""
        parameters = list(inspect.signature(self.load).parameters.values())[1:]  # the first is the path
        return {
            parameter.name: (None if parameter.default is inspect.Parameter.empty else parameter.default)
            for parameter in parameters
            if parameter.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        }


def _as_benchmark(name: str, target: Any) -> Benchmark:
    """What an entry point names: a Benchmark (renamed to the entry point) or a loader."""
    if isinstance(target, Benchmark):
        return target if target.name == name else dataclasses.replace(target, name=name)
    if callable(target):
        return Benchmark(name, first_doc_line(target) or f"plugin {target.__module__}:{target.__qualname__}", target)
    raise TypeError("a Benchmark or a loader function")


#: Every benchmark by name; plugins come from the ``mmsafe.benchmarks`` entry points.
BENCHMARKS: Registry[Benchmark] = Registry(
    "benchmark",
    group=ENTRY_POINT_GROUP,
    describe=lambda benchmark: benchmark.description,
    adapt=_as_benchmark,
    find_entry_points=lambda group: entry_points(group=group),
)


def register_benchmark(benchmark: Benchmark, *, replace: bool = False) -> Benchmark:
    return BENCHMARKS.register(benchmark.name, benchmark, replace=replace)


def available_benchmarks() -> list[str]:
    """Names of the built-in, registered and entry-point benchmarks."""
    return sorted(BENCHMARKS)


def get_benchmark(name: str) -> Benchmark:
    return BENCHMARKS.lookup(name)


def describe_benchmarks() -> list[dict[str, Any]]:
    """Every benchmark with its description, breakdown fields and loader options.

    A plugin that cannot be loaded is listed with the error instead of its settings.
    """
    rows: list[dict[str, Any]] = []
    for entry in sorted(BENCHMARKS.describe(), key=lambda entry: entry.name):
        if entry.error is not None:
            rows.append({"name": entry.name, "source": entry.source, "error": entry.error})
            continue
        benchmark = get_benchmark(entry.name)
        option = benchmark.image_folder_option
        rows.append(
            {
                "name": entry.name,
                "source": entry.source,
                "description": benchmark.description,
                "category_fields": list(benchmark.category_fields),
                "options": {
                    key: list(value) if isinstance(value, tuple) else value
                    for key, value in benchmark.options().items()
                },
                "image_folder_option": option,
            }
        )
    return rows


def load_benchmark(name: str, path: str | Path, **options: Any) -> list[BenchmarkItem]:
    """The items of benchmark ``name`` stored at ``path`` (loader ``options`` passed on)."""
    return get_benchmark(name).load(path, **options)


# ---------------------------------------------------------------- mmsafe-po


def load_mmsafe_po(
    path: str | Path, *, image_root: str | Path | None = None, format_name: str | None = None
) -> list[BenchmarkItem]:
    """MMSafe-PO records (released JSON, HF parquet, or our JSONL) as benchmark items.

    ``image_root``: the folder the record image names are relative to. By default it
    is the data file's folder (as for generation); for parquet, whose images are
    embedded, it is ``images/`` beside the file (or inside the folder of shards), where
    the images are written once and read from.
    """
    from mmsafe.data.inputs import open_inputs

    inputs = open_inputs(path, format_name=format_name, image_root=image_root)
    return [item_from_record(record, inputs.image_root) for record in inputs.records]  # ids checked by open_inputs


# ---------------------------------------------------------------- mm-safetybench

MM_SAFETYBENCH_SETTINGS = ("text-only", "SD", "TYPO", "SD_TYPO")
#: Settings asked only when named: ``text-only-changed`` asks upstream's ``Changed Question``
#: (the question in the form the image settings rephrase, key phrase in place) without an image.
MM_SAFETYBENCH_EXTRA_SETTINGS = ("text-only-changed",)
#: Which question each setting asks (MM-SafetyBench pairs each image kind with one).
MM_SAFETYBENCH_QUESTION = {
    "text-only": "Question",
    "SD": "Rephrased Question(SD)",
    "TYPO": "Rephrased Question",
    "SD_TYPO": "Rephrased Question",
    "text-only-changed": "Changed Question",
}
_MM_SAFETYBENCH_TEXT_ONLY = ("text-only", "text-only-changed")
_MM_SAFETYBENCH_LAYOUT = "processed_questions/<scenario>.json and imgs/<scenario>/{SD,TYPO,SD_TYPO}/<key>.jpg"
#: Upstream's tiny subset: a JSON list of ``{"Scenario": ..., "Sampled_ID_List": [...]}``.
MM_SAFETYBENCH_TINY_FILE = "TinyVersion_ID_List.json"


def _key_order(key: str) -> tuple[int, str]:
    return (int(key), key) if key.isdigit() else (1 << 30, key)


def mm_safetybench_root(path: str | Path) -> Path:
    """The folder holding ``processed_questions/`` and ``imgs/``.

    ``path`` may be that folder (the repository's ``data/``) or the clone root above it
    (``MM-SafetyBench/``, whose files are under ``data/``). Image paths, and so item ids,
    are the same either way.
    """
    path = Path(path)
    if not (path / "processed_questions").is_dir() and (path / "data" / "processed_questions").is_dir():
        return path / "data"
    return path


def read_mm_safetybench_subset(file: str | Path) -> dict[str, list[str]]:
    """Question keys by scenario from an id list in upstream's ``TinyVersion_ID_List.json`` shape.

    Upstream's shape is a list of ``{"Scenario": "01-Illegal_Activitiy", "Sampled_ID_List":
    [3, 17, ...]}``; a plain mapping ``{scenario: [ids]}`` is read too. Ids become question
    keys (``3`` -> ``"3"``).
    """
    file = Path(file)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"not valid JSON ({error})", file=str(file)) from None
    if isinstance(data, dict):
        entries = list(data.items())
    elif isinstance(data, list):
        entries = []
        for index, entry in enumerate(data):
            if (
                not isinstance(entry, dict)
                or not isinstance(entry.get("Scenario"), str)
                or "Sampled_ID_List" not in entry
            ):
                raise DataError(
                    'expected objects with "Scenario" and "Sampled_ID_List"', file=str(file), record=str(index)
                )
            entries.append((entry["Scenario"], entry["Sampled_ID_List"]))
    else:
        raise DataError(
            f'expected a list of {{"Scenario", "Sampled_ID_List"}} objects, got a JSON {type(data).__name__}',
            file=str(file),
        )
    subset: dict[str, list[str]] = {}
    for scenario, ids in entries:
        if not isinstance(ids, list):
            raise DataError(
                f"expected a list of question ids, got {type(ids).__name__}",
                file=str(file),
                record=str(scenario),
                field="Sampled_ID_List",
            )
        keys = subset.setdefault(str(scenario), [])
        for value in ids:
            if isinstance(value, bool) or not (
                isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit())
            ):
                raise DataError(
                    f"expected a question id (an integer), got {value!r}",
                    file=str(file),
                    record=str(scenario),
                    field="Sampled_ID_List",
                )
            key = str(int(value))
            if key not in keys:
                keys.append(key)
    return subset


def _mm_safetybench_subset_file(subset: str, given: Path, root: Path) -> Path:
    if subset != "tiny":
        file = Path(subset)
        if not file.is_file():
            raise ConfigError(
                f"MM-SafetyBench subset {subset!r}: expected 'tiny' (upstream's {MM_SAFETYBENCH_TINY_FILE}) or an id list file in its shape"
            )
        return file
    places = list(dict.fromkeys([root, root.parent, given]))
    for place in places:
        if (place / MM_SAFETYBENCH_TINY_FILE).is_file():
            return place / MM_SAFETYBENCH_TINY_FILE
    raise DataError(
        f"the tiny subset needs {MM_SAFETYBENCH_TINY_FILE} (from the MM-SafetyBench repository); looked in "
        + ", ".join(str(place) for place in places),
        file=str(root),
    )


def load_mm_safetybench(
    path: str | Path,
    *,
    settings: Iterable[str] = MM_SAFETYBENCH_SETTINGS,
    scenarios: Iterable[str] | None = None,
    subset: str | None = None,
) -> list[BenchmarkItem]:
    """MM-SafetyBench items, one per (scenario, question, setting).

    ``path``: the folder with ``processed_questions/`` and ``imgs/``, or the clone root
    with them under ``data/``. ``settings``: any of text-only, SD, TYPO, SD_TYPO (the
    default four) and text-only-changed (``Changed Question``, no image). ``subset``:
    ``"tiny"`` keeps only the questions of upstream's ``TinyVersion_ID_List.json`` (looked
    for in the data folder and the clone root), or a path to an id list in its shape;
    None or ``"full"``: every question.

    Ids are ``<scenario>/<setting>/<key>``; ``meta`` holds ``scenario``, ``setting``,
    ``key``, ``key_phrase`` and ``phrase_type``. Image paths are relative to the data
    folder. A missing folder, question file, field or image is a DataError naming what is
    expected where.
    """
    given = Path(path)
    root = mm_safetybench_root(given)
    settings = list(settings)
    known = MM_SAFETYBENCH_SETTINGS + MM_SAFETYBENCH_EXTRA_SETTINGS
    unknown = [setting for setting in settings if setting not in known]
    if unknown:
        raise ConfigError(
            f"unknown MM-SafetyBench setting(s) {', '.join(unknown)}; expected some of {', '.join(known)}"
        )
    questions_dir = root / "processed_questions"
    if not questions_dir.is_dir():
        raise DataError(
            f"expected the MM-SafetyBench layout {_MM_SAFETYBENCH_LAYOUT} (in this folder or in its data/); the folder processed_questions/ is missing",
            file=str(questions_dir),
        )
    available = {file.stem: file for file in sorted(questions_dir.glob("*.json"))}
    if not available:
        raise DataError(
            "expected one <scenario>.json per scenario (e.g. 01-Illegal_Activitiy.json), found none",
            file=str(questions_dir),
        )
    keep: dict[str, list[str]] | None = None
    if subset is not None and subset != "full":
        keep = read_mm_safetybench_subset(_mm_safetybench_subset_file(str(subset), given, root))
    if scenarios is None:
        chosen = list(available) if keep is None else sorted(keep)
    else:
        chosen = list(scenarios)
        if keep is not None:
            chosen = [name for name in chosen if name in keep]
    missing = [name for name in chosen if name not in available]
    if missing:
        raise DataError(
            f"no question file for scenario(s) {', '.join(missing)} (expected {missing[0]}.json); found {', '.join(available)}",
            file=str(questions_dir),
        )
    items: list[BenchmarkItem] = []
    for scenario in chosen:
        items.extend(
            _mm_safetybench_scenario(
                root, scenario, available[scenario], settings, None if keep is None else keep[scenario]
            )
        )
    return items


def _mm_safetybench_scenario(
    root: Path, scenario: str, file: Path, settings: list[str], keys: list[str] | None = None
) -> Iterator[BenchmarkItem]:
    try:
        questions = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"not valid JSON ({error})", file=str(file)) from None
    if not isinstance(questions, dict):
        raise DataError(
            f"expected an object keyed '0', '1', ..., got a JSON {type(questions).__name__}", file=str(file)
        )
    if keys is not None:
        absent = [key for key in keys if key not in questions]
        if absent:
            raise DataError(
                f"the subset lists question id(s) {', '.join(absent)} that this file does not have",
                file=str(file),
                record=absent[0],
            )
        wanted = set(keys)
        questions = {key: value for key, value in questions.items() if key in wanted}
    for key in sorted(questions, key=_key_order):
        entry = questions[key]
        if not isinstance(entry, dict):
            raise DataError(
                f"expected an object with the question fields, got {type(entry).__name__}", file=str(file), record=key
            )
        for setting in settings:
            question_field = MM_SAFETYBENCH_QUESTION[setting]
            question = entry.get(question_field)
            if not isinstance(question, str) or not question.strip():
                raise DataError(
                    f"expected a non-empty string (the {setting} question)",
                    file=str(file),
                    record=key,
                    field=question_field,
                )
            image = None
            if setting not in _MM_SAFETYBENCH_TEXT_ONLY:
                image = f"imgs/{scenario}/{setting}/{key}.jpg"
                if not (root / image).is_file():
                    raise DataError(
                        f"image missing: expected {root / image} ({_MM_SAFETYBENCH_LAYOUT})",
                        file=str(file),
                        record=key,
                        field="image",
                    )
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
#: HarmEval is the ``harm`` split of SPA-VL's ``test`` config; its ``help`` split has the
#: same columns, so only the layout tells the two apart (never a word inside a name).
SPA_VL_SPLIT = "harm"
#: Split names of the SPA-VL dataset (configs default/validation/test).
SPA_VL_SPLITS = ("harm", "help", "train", "validation")
#: Columns of SPA-VL's preference splits (train, validation), never of HarmEval.
SPA_VL_PREFERENCE_COLUMNS = ("chosen", "rejected")
_SPA_VL_LAYOUTS = (
    "the SPA-VL HarmEval .parquet file; a folder in a Hub layout (test/harm-00000-of-00001.parquet as in the dataset "
    "repository, test/harm/0000.parquet as in its parquet conversion, or a clone holding either); a folder of "
    "HarmEval shards; or a datasets.save_to_disk folder (the test DatasetDict, or its harm split)"
)


def spa_vl_split_of(file: str | Path) -> str | None:
    """The split a parquet file holds by the Hub's layouts, or None when the layout does not say.

    ``harm-00000-of-00001.parquet`` (push_to_hub: the shard names its split),
    ``harm/0000.parquet`` (the parquet conversion: the folder names it), ``harm.parquet``
    and ``test-harm.parquet`` (a split name as the last part) are ``harm``. A name that
    merely contains the word (``harmless.parquet``, ``harm_notes.parquet``) says nothing.
    """
    import re

    file = Path(file)
    name = file.stem
    shard = re.fullmatch(r"(.+)-\d{5}-of-\d{5}", name)
    if shard is not None:
        name = shard.group(1)
    elif name.isdigit():
        name = file.parent.name
    if name in SPA_VL_SPLITS:
        return name
    last = re.split(r"[-_.]", name)[-1]
    return last if last in ("harm", "help") else None


def _parquet_columns(file: Path) -> list[str]:
    import pyarrow.parquet as pq

    try:
        return list(pq.read_schema(file).names)
    except Exception as error:  # pyarrow raises several types for a file that is not parquet
        raise DataError(f"not a readable parquet file ({error})", file=str(file)) from None


def _check_not_preference(columns: Iterable[str], file: Path) -> None:
    """Refuse SPA-VL's preference rows (train/validation), whatever the file is called."""
    found = [column for column in SPA_VL_PREFERENCE_COLUMNS if column in columns]
    if found:
        raise DataError(
            f"this holds preference rows (columns {', '.join(found)}: SPA-VL's train/validation data), not the HarmEval questions",
            file=str(file),
        )


def _spa_vl_parquet_files(path: Path) -> list[Path]:
    """The HarmEval files of a folder: chosen by the Hub layout, checked by their columns."""
    import logging

    logger = logging.getLogger(__name__)
    files = sorted(path.rglob("*.parquet"))
    if not files:
        raise DataError(
            f"no parquet files and no datasets.save_to_disk folder here; expected {_SPA_VL_LAYOUTS}", file=str(path)
        )
    splits = {file: spa_vl_split_of(file) for file in files}
    harm = [file for file in files if splits[file] == SPA_VL_SPLIT]
    unnamed = [file for file in files if splits[file] is None]
    if harm:
        if unnamed:
            logger.warning(
                "%s: left out %d parquet file(s) whose layout names no split: %s",
                path,
                len(unnamed),
                ", ".join(str(file.relative_to(path)) for file in unnamed),
            )
        for file in harm:
            _check_not_preference(_parquet_columns(file), file)
        return harm
    if not unnamed:
        found = sorted({str(split) for split in splits.values()})
        raise DataError(
            f"found the SPA-VL split(s) {', '.join(found)} but no {SPA_VL_SPLIT} split (HarmEval); expected {_SPA_VL_LAYOUTS}",
            file=str(path),
        )
    # No layout: a folder of shards, kept only where the columns are HarmEval's.
    chosen: list[Path] = []
    left_out: list[Path] = []
    for file in unnamed:
        columns = _parquet_columns(file)
        fits = all(column in columns for column in SPA_VL_COLUMNS) and not any(
            column in columns for column in SPA_VL_PREFERENCE_COLUMNS
        )
        (chosen if fits else left_out).append(file)
    if not chosen:
        raise DataError(
            f"no parquet file here has the HarmEval columns ({', '.join(SPA_VL_COLUMNS)}, no {'/'.join(SPA_VL_PREFERENCE_COLUMNS)}); expected {_SPA_VL_LAYOUTS}",
            file=str(path),
        )
    if left_out:
        logger.warning(
            "%s: left out %d parquet file(s) without the HarmEval columns: %s",
            path,
            len(left_out),
            ", ".join(str(file.relative_to(path)) for file in left_out),
        )
    return chosen


def _spa_vl_saved(path: Path) -> Any:
    """The harm split of a ``save_to_disk`` folder (a DatasetDict or one Dataset), or None."""
    if not path.is_dir():
        return None
    is_dict = (path / "dataset_dict.json").is_file()
    if not is_dict and not ((path / "dataset_info.json").is_file() and (path / "state.json").is_file()):
        return None
    import datasets

    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        if SPA_VL_SPLIT not in dataset:
            raise DataError(
                f"this DatasetDict has the split(s) {', '.join(dataset)}, not {SPA_VL_SPLIT!r} (HarmEval)",
                file=str(path),
            )
        dataset = dataset[SPA_VL_SPLIT]
    else:
        split = None if dataset.split is None else str(dataset.split)
        if split is not None and split != SPA_VL_SPLIT:
            raise DataError(
                f"this saved dataset is the {split!r} split, not {SPA_VL_SPLIT!r} (HarmEval)", file=str(path)
            )
    _check_not_preference(dataset.column_names, path)
    return dataset


def _spa_vl_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(source file, row)`` of the harm split, from any layout of :data:`_SPA_VL_LAYOUTS`."""
    dataset = _spa_vl_saved(path)
    if dataset is not None:
        import datasets

        if "image" in dataset.column_names:
            dataset = dataset.cast_column("image", datasets.Image(decode=False))
        for row in dataset:
            yield str(path), row
        return
    import pyarrow.parquet as pq

    if path.is_dir():
        files = _spa_vl_parquet_files(path)
    else:
        files = [path]
        _check_not_preference(_parquet_columns(path), path)
    for file in files:
        for row in pq.read_table(file).to_pylist():
            yield str(file), row


def load_spa_vl_harmeval(
    path: str | Path, *, image_root: str | Path | None = None, image_dir: str | Path | None = None
) -> list[BenchmarkItem]:
    """SPA-VL HarmEval items, ids ``harm-<row>``; ``meta`` holds ``class1..class3``.

    ``path``: any of :data:`_SPA_VL_LAYOUTS`. The harm split is told from the help split
    (same columns) by the layout: the DatasetDict's split, a saved split's own name, the
    Hub's file or folder names; a file with SPA-VL's preference columns (``chosen``,
    ``rejected``) is refused whatever its name, and in a folder without a layout only
    files with the HarmEval columns are read.

    Embedded images are written once to ``image_root`` (default: ``images/`` beside a
    parquet file, or inside the dataset folder) and read from there; ``image_dir`` is its
    earlier name.
    """
    from mmsafe.data.formats.hf import ImageWriter

    path = Path(path)
    if not path.exists():
        raise DataError(f"not found (expected {_SPA_VL_LAYOUTS})", file=str(path))
    from mmsafe.data.inputs import default_image_root

    if image_root is not None and image_dir is not None:
        raise ConfigError("spa-vl-harmeval: give image_root once (image_dir is its earlier name)")
    given = image_root if image_root is not None else image_dir
    root = default_image_root(path, given, format_name="hf")  # embedded images: images/ beside the parquet
    assert root is not None  # a path always has one
    writer = ImageWriter(root)
    items = []
    for index, (file, row) in enumerate(_spa_vl_rows(path)):
        record = f"harm-{index}"
        for column in SPA_VL_COLUMNS:
            if column not in row:
                raise DataError(
                    f"missing column {column!r} (expected columns {', '.join(SPA_VL_COLUMNS)})",
                    file=file,
                    record=record,
                    field=column,
                )
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
        raise DataError(
            f"expected embedded image bytes, got {type(data).__name__}", file=file, record=record, field="image"
        )
    try:
        return writer.name_for(bytes(data), original, record)
    except ValueError as error:
        raise DataError(str(error), file=file, record=record, field="image") from None


# ---------------------------------------------------------------- shared


def _check_unique(items: list[BenchmarkItem], source: str) -> None:
    from mmsafe.data.inputs import check_unique_ids

    check_unique_ids(items, file=source)


def default_benchmark(path: str | Path) -> str:
    """How a path is read when no benchmark is named: a prompt-set JSONL, else MMSafe-PO data."""
    return "prompts" if is_prompt_set(path) else "mmsafe-po"


def load_prompts(
    data: str | Path | Mapping[str, BenchmarkItem] | Iterable[Any],
    *,
    benchmark: str | None = None,
    image_root: str | Path | None = None,
    **options: Any,
) -> dict[str, BenchmarkItem]:
    """Prompts by id, from a path (read as ``benchmark``; by default a prompt-set JSONL or
    ``mmsafe-po`` data, see :func:`default_benchmark`) or items.

    ``image_root`` is where the images are (MMSafe-PO, prompt sets, VLGuard, MOSSBench) or
    go (SPA-VL's embedded images); MM-SafetyBench finds its own under its folder. Items
    may be benchmark items or preference records (anything with ``id``, ``messages``,
    ``image`` and ``meta``; ``meta.expected`` says refuse or help, default refuse).
    """
    if isinstance(data, Mapping):
        return dict(data)
    if isinstance(data, str | Path):
        name = benchmark or default_benchmark(data)
        option = get_benchmark(name).image_folder_option
        if image_root is not None and option is not None:
            options[option] = image_root
        items = load_benchmark(name, data, **options)
        source = str(data)
    else:
        items = [item if isinstance(item, BenchmarkItem) else item_from_record(item, image_root) for item in data]
        source = "data"
    _check_unique(items, source)
    return {item.id: item for item in items}


register_benchmark(
    Benchmark(
        "mmsafe-po",
        "MMSafe-PO test split (released JSON, HF parquet or records JSONL)",
        load_mmsafe_po,
        ("entity_type",),
        "image_root",
    )
)
register_benchmark(
    Benchmark(
        "mm-safetybench",
        "MM-SafetyBench (processed_questions/ + imgs/), settings text-only, SD, TYPO, SD_TYPO",
        load_mm_safetybench,
        ("scenario", "setting"),
    )
)
register_benchmark(
    Benchmark(
        "spa-vl-harmeval",
        "SPA-VL HarmEval (harm split: image, question, class1..3)",
        load_spa_vl_harmeval,
        ("class1",),
        "image_root",
    )
)
register_benchmark(
    Benchmark(
        "prompts",
        "a prompt-set JSONL: id, messages, image, optional category and expected (refuse | help)",
        read_prompt_set,
        ("category",),
        "image_root",
    )
)
register_benchmark(
    Benchmark(
        "vlguard",
        "VLGuard test.json + image folder: subsets unsafes, safe_unsafes (expected refuse), safe_safes (expected help)",
        load_vlguard,
        ("subset", "harmful_category"),
        "image_root",
    )
)
register_benchmark(
    Benchmark(
        "mossbench",
        "MOSSBench benign image + question pairs (expected help: refusing is over-refusal), by oversensitivity type",
        load_mossbench,
        ("over_type",),
        "image_root",
    )
)
