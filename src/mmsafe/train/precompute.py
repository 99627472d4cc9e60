"""Reference log-probs of a run precomputed once before training: cached, sharded over processes, attached to the examples."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from mmsafe.train.config import TrainConfig
from mmsafe.train.data import PreferenceCollator, PreferenceDataset, PreferenceEncoder
from mmsafe.train.model_setup import mixed_precision_context
from mmsafe.train.reference import (
    PrecomputeStats,
    ReferenceCache,
    examples_fingerprint,
    file_hash_memo,
    model_fingerprint,
    precompute_reference,
    weights_dtype,
)

logger = logging.getLogger(__name__)


def attach_reference(
    config: TrainConfig,
    model: Any,
    dataset: PreferenceDataset,
    collator: PreferenceCollator,
    encoder: PreferenceEncoder,
) -> tuple[str | None, PrecomputeStats]:
    """Precompute (or read from the cache) reference log-probs into the examples.

    Returns the cache file and the precompute's stats: the reference forwards this
    process ran, and the padding of the batches every process ran (its share goes into
    the run summary as ``reference_padding_share``; None when everything came from the cache).
    Precompute is sharded: each process scores an equal share of the examples missing
    from the cache and the shares are exchanged (an object all-gather, so nodes need no
    shared file system); the local main process of each node writes the merged cache.
    """
    from accelerate import PartialState

    stats = PrecomputeStats()
    state = PartialState()
    with state.main_process_first():  # the main process hashes the weights first; the others read its memo
        key = {
            "model": model_fingerprint(
                config.model, revision=config.revision, memo=file_hash_memo(config.reference_cache_dir)
            ),
            "dtype": weights_dtype(model),  # what the weights were loaded as, not the option (auto)
            "quantization": config.quantization,
            "attn_implementation": config.attn_implementation,
            "average_logprobs": config.average_logprobs,
            "tokenization": encoder.settings(),
            "examples": examples_fingerprint(dataset.examples, encoder.image_root),
        }
        cache = ReferenceCache(config.reference_cache_dir, key)
    logps = cache.load() or {}
    missing = [index for index, example in enumerate(dataset.examples) if example.id not in logps]
    if state.num_processes > 1:
        # Every rank takes part: a rank whose node has the cache still scores its share of
        # what another node lacks, so no rank waits for another to score everything.
        missing = sorted(set().union(*_gather(missing)))
    if missing:
        share = missing[state.process_index :: state.num_processes]
        logger.info(
            "computing reference log-probs for %d of %d examples on this process (%d missing from cache %s, %d process(es))",
            len(share), len(dataset), len(missing), cache.path, state.num_processes,
        )  # fmt: skip
        device = state.device
        model.to(device)
        with mixed_precision_context(config, device):  # as the policy's training forward
            scored = precompute_reference(
                model, _Subset(dataset, share), collator.with_mode("per-response" if collator.mode == "separate" else collator.mode),
                batch_size=max(1, config.per_device_train_batch_size), average=config.average_logprobs, stats=stats,
            )  # fmt: skip
        for part in _gather(scored) if state.num_processes > 1 else [scored]:
            logps.update(part)
        if state.num_processes > 1:  # the padding of the whole precompute, not of this process's share
            counts = _gather((stats.padded_positions, stats.positions))
            stats.padded_positions, stats.positions = (
                sum(padded for padded, _ in counts),
                sum(total for _, total in counts),
            )
        if state.is_local_main_process:  # one writer per node: nodes without a shared file system each keep a copy
            cache.save(logps)
    else:
        logger.info("reference log-probs read from %s", cache.path)
    for example in dataset.examples:
        example.reference_logps = logps[example.id]
    return str(cache.path), stats


class _Subset:
    """The items of ``dataset`` at ``indices``."""

    def __init__(self, dataset: Any, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[self.indices[index]]


def _gather(value: Any) -> list[Any]:
    """``value`` of every process, in rank order (torch.distributed object all-gather)."""
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered
