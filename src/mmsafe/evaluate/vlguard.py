"""VLGuard's test set, in the three subsets its evaluation builds.

VLGuard (Zong et al., ICML 2024) ships ``test.json`` and the images it names (the folder
``test/`` once its archive is unpacked). ``test.json`` is a JSON list; each entry has
``id``, ``image`` (a path under the image folder, e.g. ``bad_ads/<name>.png``), ``safe``
(whether the *image* is safe), ``harmful_category``, ``harmful_subcategory`` and
``instr-resp``, a list of objects. An unsafe image carries one ``instruction``; a safe
image carries a ``safe_instruction`` and an ``unsafe_instruction`` (each object also has
the dataset's own ``response``, which evaluation does not use).

The subsets (442 + 558 + 558 = 1,558 prompts in the released file):

============  =============================  ========
subset        prompt                         expected
============  =============================  ========
unsafes       unsafe image, its instruction  refuse
safe_unsafes  safe image, unsafe instruction refuse
safe_safes    safe image, safe instruction   help
============  =============================  ========

VLGuard's metric per subset is the attack success rate (the share not refused) on the two
unsafe subsets, and on ``safe_safes`` how often the model helps: a refusal there is a
failure (over-refusal). Reports compute both from the items' ``expected`` field.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mmsafe.data.prompts import BenchmarkItem
from mmsafe.data.records import IMAGE_TOKEN, Message
from mmsafe.errors import ConfigError, DataError

VLGUARD_SUBSETS = ("unsafes", "safe_unsafes", "safe_safes")
#: What a good assistant does in each subset.
VLGUARD_EXPECTED = {"unsafes": "refuse", "safe_unsafes": "refuse", "safe_safes": "help"}
#: The ``instr-resp`` key that holds each subset's instruction.
VLGUARD_INSTRUCTION_KEY = {
    "unsafes": "instruction",
    "safe_unsafes": "unsafe_instruction",
    "safe_safes": "safe_instruction",
}
#: Which images each subset takes its prompts from (the entry's ``safe`` flag).
_IMAGE_SAFE = {"unsafes": False, "safe_unsafes": True, "safe_safes": True}
_LAYOUT = "test.json (a JSON list of {id, image, safe, instr-resp, ...}) and the images it names, under test/ beside it by default"


def _test_file(path: Path) -> Path:
    if path.is_dir():
        path = path / "test.json"
    if not path.is_file():
        raise DataError(f"not found; expected VLGuard's {_LAYOUT}", file=str(path))
    return path


def _default_image_root(test_file: Path) -> Path:
    """``test/`` beside ``test.json`` when it exists (the unpacked archive), else its folder."""
    unpacked = test_file.parent / "test"
    return unpacked if unpacked.is_dir() else test_file.parent


def _instructions(entry: dict[str, Any], key: str, file: str, record: str) -> list[str]:
    pairs = entry.get("instr-resp")
    if not isinstance(pairs, list):
        raise DataError(
            f"expected a list of instruction objects, got {type(pairs).__name__}",
            file=file,
            record=record,
            field="instr-resp",
        )
    found = []
    for index, pair in enumerate(pairs):
        if not isinstance(pair, dict):
            raise DataError(
                f"expected an object, got {type(pair).__name__}", file=file, record=record, field=f"instr-resp[{index}]"
            )
        if key in pair:
            text = pair[key]
            if not isinstance(text, str) or not text.strip():
                raise DataError(
                    "expected a non-empty instruction", file=file, record=record, field=f"instr-resp[{index}].{key}"
                )
            found.append(text.strip())
    if not found:
        kind = "a safe" if entry["safe"] else "an unsafe"
        raise DataError(
            f"{kind} image's entry has no {key!r} in instr-resp", file=file, record=record, field="instr-resp"
        )
    return found


def load_vlguard(
    path: str | Path, *, subsets: Iterable[str] = VLGUARD_SUBSETS, image_root: str | Path | None = None
) -> list[BenchmarkItem]:
    """VLGuard test items, subset by subset in the order of ``subsets``.

    ``path`` is ``test.json`` or the folder holding it; ``image_root`` is the folder the
    entries' images are relative to (default: ``test/`` beside ``test.json`` if it
    exists, else its folder). Ids are ``<subset>/<VLGuard id>`` (``/<k>`` added for an
    entry's k-th further instruction, k >= 1); ``meta`` holds ``subset``,
    ``harmful_category``, ``harmful_subcategory``, ``image_safe`` and ``vlguard_id``.
    """
    subsets = list(subsets)
    unknown = [name for name in subsets if name not in VLGUARD_SUBSETS]
    if unknown or not subsets:
        raise ConfigError(f"VLGuard subsets: expected some of {', '.join(VLGUARD_SUBSETS)}, got {subsets!r}")
    test_file = _test_file(Path(path))
    file = str(test_file)
    root = Path(image_root) if image_root is not None else _default_image_root(test_file)
    try:
        entries = json.loads(test_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"not valid JSON ({error})", file=file) from None
    if not isinstance(entries, list):
        raise DataError(f"expected a JSON list of entries ({_LAYOUT}), got a JSON {type(entries).__name__}", file=file)
    checked = []
    for index, entry in enumerate(entries):
        record = f"item {index}"
        if not isinstance(entry, dict):
            raise DataError(f"expected an object, got {type(entry).__name__}", file=file, record=record)
        entry_id = entry.get("id")
        if not isinstance(entry_id, str | int) or entry_id == "":
            raise DataError(f"expected a non-empty id, got {entry_id!r}", file=file, record=record, field="id")
        record = str(entry_id)
        if not isinstance(entry.get("safe"), bool):
            raise DataError(
                f"expected true or false (is the image safe?), got {entry.get('safe')!r}",
                file=file,
                record=record,
                field="safe",
            )
        image = entry.get("image")
        if not isinstance(image, str) or not image:
            raise DataError(
                f"expected the image's path under the image folder, got {image!r}",
                file=file,
                record=record,
                field="image",
            )
        checked.append((record, entry, image))
    _check_images(checked, root, file)

    items = []
    for subset in subsets:
        key = VLGUARD_INSTRUCTION_KEY[subset]
        for record, entry, image in checked:
            if entry["safe"] != _IMAGE_SAFE[subset]:
                continue
            meta = {
                "subset": subset,
                "harmful_category": entry.get("harmful_category"),
                "harmful_subcategory": entry.get("harmful_subcategory"),
                "image_safe": entry["safe"],
                "vlguard_id": record,
            }
            for number, instruction in enumerate(_instructions(entry, key, file, record)):
                item_id = f"{subset}/{record}" + (f"/{number}" if number else "")
                items.append(
                    BenchmarkItem(
                        item_id,
                        [Message("user", f"{IMAGE_TOKEN}\n{instruction}")],
                        image,
                        root,
                        dict(meta),
                        VLGUARD_EXPECTED[subset],
                    )
                )
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise DataError(
                "the same VLGuard id twice; ids must be unique to match responses to prompts",
                file=file,
                record=item.meta["vlguard_id"],
                field="id",
            )
        seen.add(item.id)
    return items


def _check_images(checked: list[tuple[str, dict[str, Any], str]], root: Path, file: str) -> None:
    """Every named image must exist under the root (checked now, not mid-generation)."""
    from mmsafe.data.images import resolve_image_path

    for record, _, image in checked:
        try:
            found = resolve_image_path(root, image).is_file()
        except DataError as error:
            raise error.at(file=file, record=record) from None
        if not found:
            raise DataError(
                f"image missing: expected {root / image} (give the unpacked image folder as image_root / --image-root)",
                file=file,
                record=record,
                field="image",
            )
