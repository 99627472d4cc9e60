"""Reference precompute and likelihood scoring batched by length: same numbers, less padding."""

from __future__ import annotations

import logging

import pytest

from mmsafe.data.records import read_preference_records
from mmsafe.train.data import PreferenceCollator, PreferenceDataset, PreferenceEncoder, prepare_examples
from mmsafe.train.reference import PrecomputeStats, batch_row_length, length_grouped_batches, precompute_reference


def test_length_grouped_batches_worked_example():
    assert length_grouped_batches([5, 9, 7, 3], 2) == [[1, 2], [0, 3]]
    assert length_grouped_batches([4, 4, 4], 2) == [[0, 1], [2]]  # ties keep input order
    with pytest.raises(ValueError):
        length_grouped_batches([1], 0)


def hand_padding(widths: list[list[int]], batches: list[list[int]]) -> float:
    """Per-response rows: each batch pads every row to its longest row. ``widths[i]``: example i's row widths."""
    padded = total = 0
    for batch in batches:
        rows = [width for index in batch for width in widths[index]]
        padded += sum(max(rows) - row for row in rows)
        total += max(rows) * len(rows)
    return padded / total


@pytest.fixture(scope="module")
def scoring_setup(tiny_model_dir, sample_dir, bpo_records):
    from mmsafe.models import load_model

    loaded = load_model(tiny_model_dir, dtype="float32", device="cpu")
    encoder = PreferenceEncoder(loaded.processor, sample_dir, max_length=256)
    records = list(read_preference_records(bpo_records))[:12]
    # Lengths spread wide: every third chosen response is made long, so input-order batches pad a lot.
    for index, record in enumerate(records):
        if index % 3 == 0:
            record.chosen = record.chosen + " And here is a much longer explanation of the reasons." * 4
    prepared = prepare_examples(records, encoder)
    dataset = PreferenceDataset(prepared.examples, encoder)
    collator = PreferenceCollator(loaded.tokenizer.pad_token_id, prepared.sources, mode="per-response", encoder=encoder)
    return loaded, dataset, collator, records


def test_grouped_precompute_gives_the_ungrouped_numbers_with_less_padding(scoring_setup, caplog):
    loaded, dataset, collator, _ = scoring_setup
    grouped_stats, plain_stats = PrecomputeStats(), PrecomputeStats()
    with caplog.at_level(logging.INFO, logger="mmsafe.train.reference"):
        grouped = precompute_reference(loaded.model, dataset, collator, batch_size=4, stats=grouped_stats)
    plain = precompute_reference(
        loaded.model, dataset, collator, batch_size=4, stats=plain_stats, group_by_length=False
    )
    assert set(grouped) == set(plain) == {example.id for example in dataset.examples}
    for key, values in plain.items():
        # float32 sums over batches of other widths: a few units in the last place apart (1 ulp is 3e-5 at -320)
        assert grouped[key] == pytest.approx(values, rel=1e-6, abs=1e-6)
    # Independent count of the padding of each order.
    widths = [[len(example.prompt_ids) + len(ids) for ids in example.responses] for example in dataset.examples]
    lengths = [batch_row_length(example, "per-response") for example in dataset.examples]
    in_order = [list(range(start, min(start + 4, len(lengths)))) for start in range(0, len(lengths), 4)]
    assert plain_stats.padding_share == pytest.approx(hand_padding(widths, in_order), abs=1e-12)
    assert grouped_stats.padding_share == pytest.approx(
        hand_padding(widths, length_grouped_batches(lengths, 4)), abs=1e-12
    )
    assert grouped_stats.padding_share < plain_stats.padding_share
    assert grouped_stats.forwards == plain_stats.forwards == 3
    assert any("padding share" in message and "grouped by length" in message for message in caplog.messages)


def test_score_responses_sorted_by_length_keeps_record_order_and_numbers(scoring_setup):
    from mmsafe.train.logprobs import score_responses

    loaded, dataset, _, records = scoring_setup
    root = dataset.encoder.image_root
    grouped = score_responses(loaded, records, root, batch_size=4, max_length=256, forward_mode="per-response")
    single = score_responses(loaded, records, root, batch_size=1, max_length=256, forward_mode="per-response")
    assert [score.id for score in grouped.scores] == [record.id for record in records]  # input order restored
    for a, b in zip(grouped.scores, single.scores, strict=True):
        assert a.id == b.id and a.chosen == pytest.approx(b.chosen, rel=1e-6, abs=1e-5)
        assert a.rejected == pytest.approx(b.rejected, rel=1e-6, abs=1e-5)
    in_order = score_responses(
        loaded, records, root, batch_size=4, max_length=256, forward_mode="per-response", group_by_length=False
    )
    assert [score.id for score in in_order.scores] == [record.id for record in records]
    assert 0 < grouped.padding_share < in_order.padding_share
