"""Little padding: examples of similar length batched together, and the padding share measured."""

from __future__ import annotations

import json
import random

import pytest
import torch

from mmsafe.data.records import read_preference_records
from mmsafe.train.config import TrainConfig
from mmsafe.train.data import PreferenceCollator, PreferenceDataset, PreferenceEncoder, prepare_examples
from mmsafe.train.trainer import SUMMARY_FILE, EpochLengthGroupedSampler, padding_share, train


def hand_padding(lengths: list[int], order: list[int], batch_size: int) -> float:
    """Padding share of per-response-style rows: each batch pads to its longest row."""
    padded = total = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[index] for index in order[start : start + batch_size]]
        padded += sum(max(batch) - length for length in batch)
        total += max(batch) * len(batch)
    return padded / total


def test_length_grouped_order_is_fixed_per_epoch_and_pads_less_than_random():
    rng = random.Random(0)
    lengths = [rng.randint(20, 400) for _ in range(400)]
    sampler = EpochLengthGroupedSampler(batch_size=8, lengths=lengths, seed=42)
    first = list(sampler)
    assert sorted(first) == list(range(400)) and list(sampler) == first  # a permutation, the same again
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert list(EpochLengthGroupedSampler(8, lengths, 42)) == first  # a resumed run sees the same order
    shuffled = list(range(400))
    random.Random(1).shuffle(shuffled)
    grouped, plain = hand_padding(lengths, first, 8), hand_padding(lengths, shuffled, 8)
    assert grouped < 0.1 < plain  # about 2% against about 40% for random batches of uniform lengths


def test_padding_share_of_a_batch_equals_a_hand_count(tiny_model_dir, sample_dir, bpo_records):
    from mmsafe.models import load_model

    loaded = load_model(tiny_model_dir, dtype="float32", device="cpu")
    encoder = PreferenceEncoder(loaded.processor, sample_dir, max_length=256)
    prepared = prepare_examples(list(read_preference_records(bpo_records))[:3], encoder)
    items = [PreferenceDataset(prepared.examples, encoder)[index] for index in range(3)]
    rows = [len(item["example"].prompt_ids) + len(ids) for item in items for ids in item["example"].responses]
    per_response = PreferenceCollator(
        loaded.tokenizer.pad_token_id, prepared.sources, mode="per-response", encoder=encoder
    )(items)
    assert padding_share(per_response) == (float(sum(max(rows) - row for row in rows)), float(max(rows) * len(rows)))
    packed = [len(item["example"].prompt_ids) + sum(len(ids) for ids in item["example"].responses) for item in items]
    shared = PreferenceCollator(loaded.tokenizer.pad_token_id, prepared.sources, mode="shared-prefix", encoder=encoder)(
        items
    )
    assert padding_share(shared) == (float(sum(max(packed) - row for row in packed)), float(max(packed) * len(packed)))
    cached = PreferenceCollator(loaded.tokenizer.pad_token_id, prepared.sources, mode="prompt-cache", encoder=encoder)(
        items
    )
    padded = sum(
        max(map(len, item["example"].responses)) * len(item["example"].responses)
        - sum(map(len, item["example"].responses))
        for item in items
    )
    total = sum(
        max(map(len, item["example"].responses)) * len(item["example"].responses) + len(item["example"].prompt_ids)
        for item in items
    )
    assert padding_share(cached) == (float(padded), float(total))


def test_training_reports_its_padding_share(tmp_path, tiny_model_dir, small_records):
    values = {
        "model": str(tiny_model_dir), "data": str(small_records), "output_dir": str(tmp_path / "out"), "learning_rate": 1e-3,
        "warmup_steps": 0, "max_steps": 2, "per_device_train_batch_size": 3, "save_steps": 1000, "finetune": "lora", "lora_r": 4,
        "lora_alpha": 8, "reference_cache_dir": str(tmp_path / "cache"), "dtype": "float32", "forward_mode": "per-response",
    }  # fmt: skip
    result = train(TrainConfig(**values))
    share = result.metrics["batch/padding_share"]
    assert 0.0 <= share < 1.0
    assert json.loads((tmp_path / "out" / SUMMARY_FILE).read_text())["metrics"]["batch/padding_share"] == share
    assert torch.isfinite(torch.tensor(share))


def test_the_summary_carries_the_padding_share_of_the_reference_precompute(tmp_path, tiny_model_dir, small_records):
    from mmsafe.models import load_model

    values = {
        "model": str(tiny_model_dir), "data": str(small_records), "output_dir": str(tmp_path / "out"), "learning_rate": 1e-3,
        "warmup_steps": 0, "max_steps": 1, "per_device_train_batch_size": 3, "save_steps": 1000, "finetune": "lora", "lora_r": 4,
        "lora_alpha": 8, "reference_cache_dir": str(tmp_path / "cache"), "dtype": "float32", "forward_mode": "per-response",
    }  # fmt: skip
    config = TrainConfig(**values)
    result = train(config)
    # Hand count: the examples as the run encodes them, per-response rows (prompt + one
    # response), sorted longest first into batches of 3, each batch padded to its longest row.
    loaded = load_model(tiny_model_dir, dtype="float32", device="cpu")
    encoder = PreferenceEncoder.for_model(
        loaded.model,
        loaded.processor,
        small_records.parent,
        max_length=config.max_length,
        image_mode=config.image_mode,
        prompt_style=config.prompt_style,
        length_rule=config.length_rule,
    )
    examples = prepare_examples(list(read_preference_records(small_records)), encoder).examples
    rows = [[len(example.prompt_ids) + len(ids) for ids in example.responses] for example in examples]
    order = sorted(range(len(rows)), key=lambda index: -max(rows[index]))
    padded = total = 0
    for start in range(0, len(order), 3):
        batch = [row for index in order[start : start + 3] for row in rows[index]]
        padded += sum(max(batch) - row for row in batch)
        total += max(batch) * len(batch)
    assert result.reference_forwards == 4  # 12 examples in batches of 3
    assert result.reference_padding_share == pytest.approx(padded / total, abs=1e-12)
    assert (
        json.loads((tmp_path / "out" / SUMMARY_FILE).read_text())["reference_padding_share"]
        == result.reference_padding_share
    )
    # A second run reads the cache: no precompute, so no padding share.
    again = train(TrainConfig(**{**values, "output_dir": str(tmp_path / "again")}))
    assert again.reference_forwards == 0 and again.reference_padding_share is None
    assert json.loads((tmp_path / "again" / SUMMARY_FILE).read_text())["reference_padding_share"] is None
