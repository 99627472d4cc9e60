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
import os
from pathlib import Path
from typing import Any

import torch

from mmsafe.train.data import PreferenceCollator, PreferenceDataset, TokenizedExample
from mmsafe.train.forward import ResponseLogProbs, score_batch, to_device, unwrap

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
        device = next(iter(batch.values())).device
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
        with model.disable_adapter():
            return score_batch(model, batch, average=self.average)


def model_fingerprint(name_or_path: str, *, revision: str | None = None) -> dict[str, Any]:
    """What identifies a model's weights without reading them all.

    A local checkpoint: each weight file's name, size and modification time (a changed
    or replaced file changes the key; a copy gets a new key and is recomputed once). A
    Hub id: the id and revision.
    """
    path = Path(name_or_path)
    if not path.is_dir():
        return {"hub_id": name_or_path, "revision": revision or "main"}
    files = sorted([*path.glob("*.safetensors"), *path.glob("*.json")])
    return {"path": str(path.resolve()), "files": [(file.name, file.stat().st_size, file.stat().st_mtime_ns) for file in files]}


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
        if not self.path.is_file():
            return None
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return {str(key): [float(value) for value in values] for key, values in data["logps"].items()}
        except (OSError, ValueError, KeyError, TypeError) as error:
            logger.warning("ignoring unreadable reference cache %s (%s); recomputing", self.path, error)
            return None

    def save(self, logps: dict[str, list[float]]) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(f".tmp{os.getpid()}")
        temporary.write_text(json.dumps({"key": self.key_material, "logps": logps}, default=str), encoding="utf-8")
        os.replace(temporary, self.path)  # atomic: a killed run never leaves half a cache
        return self.path


class PrecomputeStats:
    def __init__(self) -> None:
        self.forwards = 0


@torch.no_grad()
def precompute_reference(
    model: Any,
    dataset: PreferenceDataset,
    collator: PreferenceCollator,
    *,
    batch_size: int = 4,
    average: bool = False,
    stats: PrecomputeStats | None = None,
) -> dict[str, list[float]]:
    """Score every example with ``model`` (the starting weights): {id: [chosen, rejected...]}."""
    from mmsafe.progress import progress

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores: dict[str, list[float]] = {}
    indices = list(range(len(dataset)))
    try:
        for start in progress(range(0, len(indices), batch_size), desc="reference log-probs", total=(len(indices) + batch_size - 1) // batch_size):
            items = [dataset[index] for index in indices[start : start + batch_size]]
            batch = to_device(collator(items), device)
            result = score_batch(model, batch, average=average)
            if stats is not None:
                stats.forwards += 1
            for row, item in enumerate(items):
                example = item["example"]
                rejected = result.rejected[row, : example.num_rejected]
                scores[example.id] = [float(result.chosen[row]), *(float(value) for value in rejected)]
    finally:
        model.train(was_training)
    return scores
