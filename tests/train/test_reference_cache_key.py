"""The reference cache key: by weight content, Hub commit and loaded dtype; only finite values are cached."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mmsafe.errors import DataError
from mmsafe.train import precompute, reference
from mmsafe.train.config import TrainConfig
from mmsafe.train.reference import ReferenceCache, file_hash_memo, model_fingerprint


def fake_checkpoint(folder: Path, weights: bytes = b"\x01" * 64) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "config.json").write_text('{"model_type": "llava"}', encoding="utf-8")
    return folder


def cache_key(name: str, memo: Path, **extra) -> str:
    return ReferenceCache(memo.parent, {"model": model_fingerprint(name, memo=memo, **extra)}).key


def test_weights_rewritten_in_place_with_size_and_mtime_restored_change_the_key(tmp_path):
    model = fake_checkpoint(tmp_path / "model")
    memo = tmp_path / "cache" / "file-hashes.json"
    weights = model / "model.safetensors"
    before = weights.stat()
    first = cache_key(str(model), memo)

    # Same inode, same size, old atime and mtime put back: only ctime can tell.
    while True:
        with open(weights, "r+b") as handle:
            handle.write(b"\x02")
        os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
        if weights.stat().st_ctime_ns != before.st_ctime_ns:
            break
        time.sleep(0.01)  # the file system's clock has not moved yet: write again
    after = weights.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    assert cache_key(str(model), memo) != first


def test_the_memo_spares_a_second_read_of_each_file(tmp_path, monkeypatch):
    model = fake_checkpoint(tmp_path / "model")
    memo = tmp_path / "cache" / "file-hashes.json"
    reads: list[str] = []
    real = reference.file_sha256
    monkeypatch.setattr(reference, "file_sha256", lambda path: reads.append(Path(path).name) or real(path))

    first = model_fingerprint(str(model), memo=memo)
    assert sorted(reads) == ["config.json", "model.safetensors"]
    entries = json.loads(memo.read_text(encoding="utf-8"))
    assert str((model / "model.safetensors").resolve()) in entries

    reads.clear()
    assert model_fingerprint(str(model), memo=memo) == first
    assert reads == []


def test_a_copy_of_the_same_weights_shares_the_key(tmp_path):
    memo = tmp_path / "cache" / "file-hashes.json"
    assert cache_key(str(fake_checkpoint(tmp_path / "a")), memo) == cache_key(
        str(fake_checkpoint(tmp_path / "b")), memo
    )
    assert cache_key(str(fake_checkpoint(tmp_path / "c", b"\x03" * 64)), memo) != cache_key(str(tmp_path / "a"), memo)


def fake_hub_cache(root: Path, repo_id: str, commit: str, revision: str = "main") -> None:
    ref = root / f"models--{repo_id.replace('/', '--')}" / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit, encoding="utf-8")


def test_a_hub_id_is_keyed_by_the_commit_its_revision_resolves_to(tmp_path, monkeypatch):
    from huggingface_hub import constants

    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))  # read at import time
    memo = tmp_path / "cache" / "file-hashes.json"
    old, new = "a" * 40, "b" * 40

    unresolved = model_fingerprint("owner/model", memo=memo)
    assert unresolved["commit"] == "unresolved"

    fake_hub_cache(hub, "owner/model", old)
    fingerprint = model_fingerprint("owner/model", memo=memo)
    assert fingerprint == {"hub_id": "owner/model", "revision": "main", "commit": old}
    first = cache_key("owner/model", memo)

    fake_hub_cache(hub, "owner/model", new)  # the Hub's main moved on and was downloaded
    assert cache_key("owner/model", memo) != first

    fake_hub_cache(hub, "owner/model", old, revision="v1")
    assert model_fingerprint("owner/model", revision="v1", memo=memo)["commit"] == old
    assert model_fingerprint("owner/model", revision=new, memo=memo)["commit"] == new


class FakeDataset:
    def __init__(self, examples: list) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)


def test_the_trainer_keys_by_the_dtype_the_weights_were_loaded_in(tmp_path, monkeypatch):
    """``dtype: auto`` both times, but fp32 weights one time and bf16 the other: two caches."""
    model_dir = fake_checkpoint(tmp_path / "model")
    config = TrainConfig(
        model=str(model_dir),
        data=str(tmp_path / "data.jsonl"),
        output_dir=str(tmp_path / "out"),
        reference_cache_dir=str(tmp_path / "cache"),
    )
    assert config.dtype == "auto"
    monkeypatch.setattr(precompute, "precompute_reference", lambda *args, **kwargs: {"r1": [-1.0, -2.0]})
    encoder = SimpleNamespace(settings=lambda: {"max_length": 8}, image_root=None)
    collator = SimpleNamespace(mode="per-response", with_mode=lambda mode: None)

    paths = []
    for dtype in (torch.float32, torch.bfloat16):
        dataset = FakeDataset([SimpleNamespace(id="r1", prompt_ids=[1, 2], responses=[[3], [4]], image=None)])
        path, _ = precompute.attach_reference(config, torch.nn.Linear(2, 2).to(dtype), dataset, collator, encoder)
        paths.append(path)
        assert dataset.examples[0].reference_logps == [-1.0, -2.0]
    assert paths[0] != paths[1]
    assert file_hash_memo(config.reference_cache_dir).is_file()


def test_a_cache_holding_nan_is_not_used(tmp_path, caplog):
    cache = ReferenceCache(tmp_path, {"model": "m"})
    cache.path.write_text('{"key": {}, "logps": {"r1": [-1.5, NaN], "r2": [-1.0, -2.0]}}', encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="mmsafe.train.reference"):
        assert cache.load() is None
    assert any("r1" in message and "recomputing" in message for message in caplog.messages)

    for bad in ("Infinity", '"-1.0"', "true", "null"):
        cache.path.write_text(f'{{"key": {{}}, "logps": {{"r1": [-1.5, {bad}]}}}}', encoding="utf-8")
        assert cache.load() is None, bad


def test_save_refuses_a_non_finite_value_naming_the_record(tmp_path):
    cache = ReferenceCache(tmp_path, {"model": "m"})
    with pytest.raises(DataError, match=r"r2:reference_logps: reference log-prob nan is not a finite number"):
        cache.save({"r1": [-1.0, -2.0], "r2": [-1.0, float("nan")]})
    assert not cache.path.exists()
    cache.save({"r1": [-1.0, -2.0]})
    assert cache.load() == {"r1": [-1.0, -2.0]}
