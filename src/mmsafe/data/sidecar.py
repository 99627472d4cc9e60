"""Sidecar files beside an output: written atomically, read with one clear error.

A resumable output (responses, verdicts) keeps the settings it was made with in
``<out>.config.yaml``. That file is what lets a rerun refuse other settings, so it must
never be half-written: it is written to a temporary file in the same folder and renamed
over the old one (``os.replace``), with the permissions the user's umask gives a new
file. A sidecar that is cut short or unreadable anyway (a disk that filled up, a hand
edit) is reported as one line naming the file and what to do; mmsafe never deletes it.

Content keys: :func:`content_hash` is the short, deterministic hash of a JSON-able value
that outputs store per row (``input_sha``) to notice an input record that changed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mmsafe.errors import ConfigError
from mmsafe.fileio import atomic_write_text

#: Hex digits kept of a SHA-256 (64 bits: a collision among a few million records is ~1e-7).
HASH_DIGITS = 16


def content_hash(value: Any) -> str:
    """SHA-256 (first :data:`HASH_DIGITS` hex digits) of ``value`` as canonical JSON."""
    payload = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:HASH_DIGITS]


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (read in blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old file or the new one, never half (with the user's umask)."""
    atomic_write_text(path, text)


#: The last key of every sidecar: a hash of the rest, so a file cut short is told from a whole one.
CHECKSUM_KEY = "checksum"


def write_yaml_atomic(path: str | Path, data: Mapping[str, Any]) -> None:
    """Write a sidecar mapping atomically, with :data:`CHECKSUM_KEY` (a hash of the rest) last."""
    import yaml

    payload = {key: value for key, value in data.items() if key != CHECKSUM_KEY}
    payload[CHECKSUM_KEY] = content_hash(payload)
    write_text_atomic(path, yaml.safe_dump(payload, sort_keys=False, allow_unicode=True))


def _complete_without_checksum(data: Mapping[str, Any]) -> bool:
    """A file from before checksums: ``written_at`` was its last key (of each entry, for a verdicts file)."""
    if "resume" in data:
        return False
    if "written_at" in data:
        return True
    entries = [value for value in data.values() if isinstance(value, Mapping)]
    return bool(entries) and all("written_at" in entry and "resume" not in entry for entry in entries)


def read_sidecar(path: str | Path, *, output: str | Path | None = None) -> dict[str, Any] | None:
    """The mapping in a sidecar YAML (its checksum checked and removed), or None when there is none.

    A file that cannot be read or parsed, holds no mapping, or whose checksum is missing
    or wrong (cut short, edited) raises one :class:`ConfigError` naming it and what to
    do; it is never deleted here. Whole files from before checksums (they end with
    ``written_at``) are read as they are.
    """
    import yaml

    path = Path(path)
    if not path.exists():
        return None
    what = f"the settings {output} was made with" if output is not None else "the settings of the output beside it"
    advice = f"it records {what}: restore it, or remove it to start over (mmsafe never deletes it)"
    from mmsafe.config import load_yaml

    try:
        data = load_yaml(path.read_text(encoding="utf-8"), source=str(path))
    except ConfigError as error:  # not YAML, or nested aliases that multiply
        reason = str(error).removeprefix(f"{path}: ")
        raise ConfigError(
            f"{path}: cannot read this settings file ({reason}; cut short or damaged?); {advice}"
        ) from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        reason = getattr(error, "problem", None) or getattr(error, "strerror", None) or type(error).__name__
        raise ConfigError(
            f"{path}: cannot read this settings file ({reason}; cut short or damaged?); {advice}"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a YAML mapping of settings, found {'nothing' if data is None else type(data).__name__} (cut short or damaged?); {advice}"
        )
    checksum = data.pop(CHECKSUM_KEY, None)
    if checksum is None and not _complete_without_checksum(data):
        raise ConfigError(
            f"{path}: this settings file is cut short (its last line, {CHECKSUM_KEY}, is missing); {advice}"
        )
    if checksum is not None and checksum != content_hash(data):
        raise ConfigError(
            f"{path}: this settings file does not match its {CHECKSUM_KEY} (cut short or edited); {advice}"
        )
    return data


def _shown(value: Any) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def settings_changes(old: Mapping[str, Any], new: Mapping[str, Any], *, ignore: Iterable[str] = ()) -> list[str]:
    """``field: old -> new`` for every setting that differs (missing counts as none)."""
    skipped = set(ignore)
    return [
        f"{key}: {_shown(old.get(key))} -> {_shown(new.get(key))}"
        for key in sorted(set(old) | set(new))
        if key not in skipped and old.get(key) != new.get(key)
    ]


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"engine": {"dtype": x}}`` -> ``{"engine.dtype": x}`` (lists kept as values)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat
