"""Tokenization boundaries, truncation and the two batch layouts, checked position by position."""

from __future__ import annotations

import pytest
import torch

from mmsafe.data.records import read_preference_records
from mmsafe.models import load_processor
from mmsafe.models.prompts import image_token_count
from mmsafe.train.data import PreferenceCollator, PreferenceEncoder, TokenizedExample, prepare_examples


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return load_processor(tiny_model_dir)


def example(prompt: list[int], responses: list[list[int]], sources: list[str]) -> dict:
    tokenized = TokenizedExample(
        id="x", prompt_ids=prompt, responses=responses, rejected_sources=sources, image=None, prompt_text=""
    )
    return {"example": tokenized, "image_inputs": {}}


def test_shared_prefix_layout_by_hand():
    # prompt [10, 11, 12], chosen [20, 21], rejected [30] (human) and [40, 41] (blind)
    items = [
        example([10, 11, 12], [[20, 21], [30], [40, 41]], ["human", "blind"]),
        example([50], [[60], [70]], ["human"]),
    ]
    batch = PreferenceCollator(pad_token_id=0, sources=["human", "blind"])(items)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 20, 21, 30, 40, 41], [50, 60, 70, 0, 0, 0, 0, 0]]
    assert batch["segment_ids"].tolist() == [[0, 0, 0, 1, 1, 2, 3, 3], [0, 1, 2, -1, -1, -1, -1, -1]]
    # every response continues the prompt's positions as if it were alone
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 3, 3, 4]
    assert batch["position_ids"][1, :3].tolist() == [0, 1, 1]
    # each response's first token is predicted from the last prompt token (position 2)
    assert batch["logit_index"][0].tolist() == [0, 0, 0, 2, 3, 2, 2, 6]
    assert batch["labels"][0].tolist() == [-100, -100, -100, 20, 21, 30, 40, 41]
    assert batch["rejected_source_ids"].tolist() == [[0, 1], [0, -1]]
    assert batch["rejected_mask"].tolist() == [[True, True], [True, False]]


def test_separate_layout_is_one_row_per_pair_sequence():
    items = [example([10, 11], [[20], [30, 31], [40]], ["human", "blind"])]
    batch = PreferenceCollator(pad_token_id=0, sources=["human", "blind"], mode="separate")(items)
    # (prompt + chosen, prompt + rejected 1), (prompt + chosen, prompt + rejected 2), right-padded
    assert batch["input_ids"].tolist() == [[10, 11, 20, 0], [10, 11, 30, 31], [10, 11, 20, 0], [10, 11, 40, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 0]]
    assert batch["labels"].tolist() == [
        [-100, -100, 20, -100],
        [-100, -100, 30, 31],
        [-100, -100, 20, -100],
        [-100, -100, 40, -100],
    ]
    assert batch["sequence_slot"].tolist() == [0, 1, 0, 2]
    assert batch["sequence_example"].tolist() == [0, 0, 0, 0]


def test_precomputed_reference_log_probs_travel_with_the_batch():
    first = example([1], [[2], [3], [4]], ["human", "blind"])
    second = example([1], [[2], [3]], ["human"])
    first["example"].reference_logps = [-1.0, -2.0, -3.0]
    second["example"].reference_logps = [-4.0, -5.0]
    batch = PreferenceCollator(pad_token_id=0, sources=["human", "blind"])([first, second])
    assert batch["reference_chosen_logps"].tolist() == [-1.0, -4.0]
    assert batch["reference_rejected_logps"].tolist() == [[-2.0, -3.0], [-5.0, 0.0]]


def test_truncation_cuts_responses_never_the_prompt_or_its_image_tokens(processor, sample_dir):
    record = next(iter(read_preference_records(sample_dir / "records.jsonl")))
    full = PreferenceEncoder(processor, sample_dir, max_length=4096)
    untruncated, _ = full.encode(record, [(record.rejected[0], "human")])
    prompt_length = len(untruncated.prompt_ids)
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert untruncated.prompt_ids.count(image_token) == image_token_count(processor) == 16

    tight = PreferenceEncoder(processor, sample_dir, max_length=prompt_length + 3)
    cut, reason = tight.encode(record, [(record.rejected[0], "human")])
    assert reason is None and cut.truncated
    assert cut.prompt_ids == untruncated.prompt_ids  # the whole prompt, all 16 image tokens
    assert cut.responses == [ids[:3] for ids in untruncated.responses]
    # the boundary is exact: a response starts right after "ASSISTANT:" and ends with end-of-sequence
    assert processor.tokenizer.decode(untruncated.prompt_ids[-3:]).endswith("ASSISTANT:")
    assert untruncated.responses[0][-1] == processor.tokenizer.eos_token_id

    too_tight = PreferenceEncoder(processor, sample_dir, max_length=prompt_length)
    skipped = prepare_examples([record], too_tight)
    assert skipped.examples == [] and skipped.skipped == {"prompt alone longer than max_length": [record.id]}


def test_release_length_rule_drops_a_record_whose_chosen_does_not_fit_and_cuts_the_rejected(processor, sample_dir):
    """length_rule: release, as the public release: prompt + chosen must fit; a rejected response is cut."""
    record = next(iter(read_preference_records(sample_dir / "records.jsonl")))
    full, _ = PreferenceEncoder(processor, sample_dir, max_length=4096).encode(record, [(record.rejected[0], "human")])
    prompt_length, chosen_length, rejected_length = len(full.prompt_ids), len(full.responses[0]), len(full.responses[1])
    assert chosen_length > 3 and rejected_length > 3
    tight = PreferenceEncoder(processor, sample_dir, max_length=prompt_length + 3, length_rule="release")
    prepared = prepare_examples([record], tight)
    assert prepared.examples == [] and prepared.skipped == {
        "prompt + chosen longer than max_length (length_rule: release)": [record.id]
    }
    # Room for the chosen response, not for a longer rejected one: kept, the rejected cut.
    record.rejected[0] = record.rejected[0] + " and then some more words that make it longer"
    full, _ = PreferenceEncoder(processor, sample_dir, max_length=4096).encode(record, [(record.rejected[0], "human")])
    fits = PreferenceEncoder(
        processor, sample_dir, max_length=prompt_length + len(full.responses[0]), length_rule="release"
    )
    kept = prepare_examples([record], fits)
    assert [example.responses for example in kept.examples] == [
        [full.responses[0], full.responses[1][: len(full.responses[0])]]
    ]
    assert kept.truncated == 1
    with pytest.raises(ValueError, match="length_rule"):
        PreferenceEncoder(processor, sample_dir, length_rule="drop-everything")


def test_rejected_source_filter_and_dpo_keep_the_right_responses(processor, bpo_records):
    record = next(iter(read_preference_records(bpo_records)))
    encoder = PreferenceEncoder(processor, bpo_records.parent)
    both = prepare_examples([record], encoder).examples[0]
    assert both.rejected_sources == ["human", "blind"] and both.num_rejected == 2
    blind_only = prepare_examples([record], encoder, rejected_sources=["blind"]).examples[0]
    assert blind_only.rejected_sources == ["blind"] and blind_only.responses[1] == both.responses[2]
    first_only = prepare_examples([record], encoder, max_rejected=1).examples[0]
    assert first_only.rejected_sources == ["human"]
    nothing = prepare_examples([record], encoder, rejected_sources=["other"])
    assert nothing.skipped == {"no rejected response from the selected sources": [record.id]}
    assert torch.equal(torch.tensor(both.prompt_ids), torch.tensor(first_only.prompt_ids))
