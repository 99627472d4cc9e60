"""Reference log-probs, three ways.

* :class:`FrozenCopyReference`: a frozen copy of the starting model, run beside the policy.
* :class:`DisabledAdapterReference`: for LoRA, the policy itself with its adapters turned
  off: the base weights are the reference, and no second copy is held in memory.
* :func:`precompute_reference` with :class:`ReferenceCache`: the starting model scores
  every example once before training; the results are stored on disk under a key of the
  model, the data and the tokenization settings, and a later run with the same key reads
  them instead of running any reference forward.

Each keeps a count of the reference forwards it ran (``forwards``), which the run
summary reports.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Protocol

import torch

from mmsafe.errors import DataError
from mmsafe.train.data import PreferenceCollator, TokenizedExample
from mmsafe.train.forward import ResponseLogProbs, score_batch, unwrap
from mmsafe.train.scoring import ScoringStats, batch_row_length, length_grouped_batches, score_examples, scoring_batches  # noqa: F401 (their home was here)

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1


class FrozenCopyReference:
    """A deep copy of the model taken before training, never updated."""

    def __init__(self, model: Any, *, average: bool = False) -> None:
        self.model = copy.deepcopy(model)
        self.model.eval()
        self.model.requires_grad_(False)
        self.average = average
        self.forwards = 0

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor]) -> ResponseLogProbs:
        device = batch["rejected_mask"].device  # every layout has it (prompt-cache rows are not a tensor)
        if next(self.model.parameters()).device != device:
            self.model.to(device)
        self.forwards += 1
        return score_batch(self.model, batch, average=self.average)


class DisabledAdapterReference:
    """The (PEFT) policy with its adapters switched off for the reference pass."""

    def __init__(self, policy: Any, *, average: bool = False) -> None:
        if not hasattr(unwrap(policy), "disable_adapter"):
            raise ValueError("adapters-disabled reference needs a PEFT model")
        self.policy = policy
        self.average = average
        self.forwards = 0

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor]) -> ResponseLogProbs:
        model = unwrap(self.policy)
        self.forwards += 1
        was_training = model.training
        model.eval()  # dropout off: the reference is one fixed function, as the precomputed and copy ones
        try:
            with model.disable_adapter():
                return score_batch(model, batch, average=self.average)
        finally:
            model.train(was_training)


#: Bytes read at a time when hashing a weight file (memory stays bounded for a 14 GB shard).
HASH_CHUNK = 16 * 1024 * 1024
#: The memo of file hashes, in the reference cache folder (see :func:`file_hash_memo`).
HASH_MEMO_NAME = "file-hashes.json"


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_hash_memo(directory: str | Path | None = None) -> Path:
    """Where the file-hash memo of a reference cache folder (None: the default one) lives."""
    return (Path(directory) if directory is not None else default_cache_dir()) / HASH_MEMO_NAME


def _stat_key(stat: os.stat_result) -> list[int]:
    # ctime is in the key because it cannot be set back: a rewrite in place keeps the inode
    # and may restore size and mtime (os.utime), but both the write and the utime call
    # move ctime to the present, so the file is hashed again. (POSIX: on Windows st_ctime
    # is the creation time. A rewrite within the file system's timestamp tick of the
    # hashing itself, a few milliseconds, would go unseen.)
    return [stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


def _read_memo(memo: Path) -> dict[str, Any]:
    try:
        data = json.loads(memo.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_memo(memo: Path, entries: dict[str, Any]) -> None:
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        merged = {**_read_memo(memo), **entries}  # another run may have added files meanwhile
        merged = {name: entry for name, entry in merged.items() if os.path.exists(name)}  # forget deleted files
        temporary = memo.with_name(f"{memo.name}.tmp{os.getpid()}")
        temporary.write_text(json.dumps(merged, indent=0, sort_keys=True), encoding="utf-8")
        os.replace(temporary, memo)
    except OSError as error:  # the memo only saves time: a read-only cache folder hashes every run
        logger.warning("cannot write the file-hash memo %s (%s)", memo, error)


def file_hashes(files: list[Path], memo: str | Path | None = None) -> dict[str, str]:
    """sha256 of each file, by resolved path; each file is read once per change.

    The hashes are remembered in ``memo`` (a JSON file) under (inode, size, mtime, ctime):
    a file whose four are unchanged is not read again. A file rewritten in place with its
    old size and mtime restored still changes ctime, which no user can set back (only a
    changed system clock or a raw disk edit can), so it is hashed again.
    """
    memo = Path(memo) if memo is not None else file_hash_memo()
    known = _read_memo(memo)
    hashes: dict[str, str] = {}
    updates: dict[str, Any] = {}
    for file in files:
        name = str(file.resolve())
        before = file.stat()
        entry = known.get(name)
        if isinstance(entry, dict) and entry.get("stat") == _stat_key(before) and isinstance(entry.get("sha256"), str):
            hashes[name] = entry["sha256"]
            continue
        digest = file_sha256(file)
        hashes[name] = digest
        if _stat_key(file.stat()) == _stat_key(before):  # not remembered if it changed while being read
            updates[name] = {"stat": _stat_key(before), "sha256": digest}
    if updates:
        _write_memo(memo, updates)
    return hashes


def hub_commit(repo_id: str, revision: str | None = None) -> str | None:
    """The commit ``revision`` of Hub model ``repo_id`` resolves to in the local HF cache, or None.

    Read offline from the cache's ``models--owner--name/refs/<revision>`` (written when the
    model was downloaded); a revision that is already a commit hash is its own answer.
    """
    import re

    revision = revision or "main"
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    try:
        from huggingface_hub import constants
        from huggingface_hub.file_download import repo_folder_name
    except ImportError:
        return None
    if ".." in revision.split("/"):
        return None
    ref = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model") / "refs" / revision
    try:
        commit = ref.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return commit if re.fullmatch(r"[0-9a-f]{40}", commit) else None


def model_fingerprint(
    name_or_path: str, *, revision: str | None = None, memo: str | Path | None = None
) -> dict[str, Any]:
    """What identifies a model's weights.

    A local checkpoint: the name and sha256 of each weight and JSON (config, tokenizer,
    processor) file, remembered in the ``memo`` file so that each is read once (see :func:`file_hashes`);
    a PEFT adapter folder also holds its base model's fingerprint. A Hub id: the id, the
    revision and the commit that revision resolves to in the local HF cache (``unresolved``
    when the model is not there yet).
    """
    path = Path(name_or_path)
    if not path.is_dir():
        commit = hub_commit(name_or_path, revision)
        return {"hub_id": name_or_path, "revision": revision or "main", "commit": commit or "unresolved"}
    files = sorted([*path.glob("*.safetensors"), *path.glob("*.json")])
    hashes = file_hashes(files, memo)
    # By content alone: a copy of the same checkpoint elsewhere shares its cache.
    fingerprint: dict[str, Any] = {"files": [(file.name, hashes[str(file.resolve())]) for file in files]}
    adapter_config = path / "adapter_config.json"
    if adapter_config.is_file():
        try:
            base = json.loads(adapter_config.read_text(encoding="utf-8")).get("base_model_name_or_path")
        except (OSError, ValueError, AttributeError):
            base = None
        if isinstance(base, str) and base:
            fingerprint["base"] = model_fingerprint(base, revision=revision, memo=memo)
    return fingerprint


def weights_dtype(model: Any) -> str:
    """The dtype the model's floating-point weights were loaded in (``torch.bfloat16``, ...)."""
    for parameter in unwrap(model).parameters():
        if parameter.is_floating_point():
            return str(parameter.dtype)
    return "none"


def examples_fingerprint(examples: list[TokenizedExample], image_root: str | Path | None) -> str:
    """Digest of the token ids of every example and the images they name (size, mtime)."""
    digest = hashlib.sha256()
    for example in examples:
        image = None
        if example.image is not None and image_root is not None:
            image_path = Path(image_root) / example.image
            stat = image_path.stat() if image_path.exists() else None
            image = [example.image, stat.st_size if stat else None, stat.st_mtime_ns if stat else None]
        digest.update(json.dumps([example.id, example.prompt_ids, example.responses, image]).encode("utf-8"))
    return digest.hexdigest()


def default_cache_dir() -> Path:
    root = os.environ.get("MMSAFE_CACHE")
    return Path(root) / "reference" if root else Path.home() / ".cache" / "mmsafe" / "reference"


class ReferenceCache:
    """Reference log-probs on disk: ``<dir>/<key>.json``, {record id: [chosen, rejected...]}."""

    def __init__(self, directory: str | Path | None, key_material: dict[str, Any]) -> None:
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        text = json.dumps({"format": CACHE_FORMAT, **key_material}, sort_keys=True, default=str)
        self.key = hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]
        self.path = self.directory / f"{self.key}.json"
        self.key_material = key_material

    def load(self) -> dict[str, list[float]] | None:
        """The cached log-probs, or None (recompute) when missing, unreadable or not all finite numbers."""
        if not self.path.is_file():
            return None
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            logps = {}
            for key, values in data["logps"].items():
                if not isinstance(values, list) or not all(_finite_number(value) for value in values):
                    raise ValueError(f"record {key}: not a list of finite numbers: {values!r}"[:300])
                logps[str(key)] = [float(value) for value in values]
            return logps
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            logger.warning("ignoring unreadable reference cache %s (%s); recomputing", self.path, error)
            return None

    def save(self, logps: dict[str, list[float]]) -> Path:
        for key, values in logps.items():
            bad = [value for value in values if not _finite_number(value)]
            if bad:
                raise DataError(
                    f"reference log-prob {bad[0]} is not a finite number; not cached (a float16 overflow? try dtype: float32 or bfloat16)",
                    record=key,
                    field="reference_logps",
                )
        self.directory.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(f".tmp{os.getpid()}")
        temporary.write_text(
            json.dumps({"key": self.key_material, "logps": logps}, default=str, allow_nan=False), encoding="utf-8"
        )
        os.replace(temporary, self.path)  # atomic: a killed run never leaves half a cache
        return self.path


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


#: The precompute's counts (reference forwards run, padding); the one scoring loop's stats.
PrecomputeStats = ScoringStats


class IndexedItems(Protocol):
    """The collator's items by position: a :class:`PreferenceDataset` or a part of one."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


@torch.no_grad()
def precompute_reference(
    model: Any,
    dataset: IndexedItems,
    collator: PreferenceCollator,
    *,
    batch_size: int = 4,
    average: bool = False,
    stats: PrecomputeStats | None = None,
    group_by_length: bool = True,
) -> dict[str, list[float]]:
    """Score every example with ``model`` (the starting weights): {id: [chosen, rejected...]}.

    ``dataset``: a :class:`PreferenceDataset`, or a part of its items (one process's share).

    The loop is :func:`mmsafe.train.scoring.score_examples`. With ``group_by_length`` the
    examples are batched by length (see :func:`length_grouped_batches`), so batches carry
    little padding; the scores are the same as ungrouped ones (padding is masked out) and
    keyed by id, so order does not matter to the cache. The padding share of the batches
    run is logged and kept in ``stats``.
    """
    stats = stats if stats is not None else PrecomputeStats()
    batches, grouped = scoring_batches(dataset, collator.mode, batch_size, group_by_length=group_by_length)
    padded_before, positions_before = stats.padded_positions, stats.positions
    scored = score_examples(
        model, dataset, collator, batches=batches, average=average, stats=stats, progress_desc="reference log-probs"
    )
    scores = {entry.example.id: [entry.chosen, *entry.rejected] for entry in scored}
    run = stats.positions - positions_before
    if run:
        logger.info(
            "reference log-probs: %d examples in %d batches, padding share %.1f%%%s",
            len(scores), len(batches), 100 * (stats.padded_positions - padded_before) / run, " (grouped by length)" if grouped else "",
        )  # fmt: skip
    return scores
