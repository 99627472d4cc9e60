"""Shared-prefix scoring equals scoring each (prompt, response) alone: log-probs and gradients."""

from __future__ import annotations

import pytest
import torch

from mmsafe.data.records import read_preference_records
from mmsafe.models import load_model
from mmsafe.train.data import PreferenceCollator, PreferenceDataset, PreferenceEncoder, prepare_examples
from mmsafe.train.forward import block_attention_mask, score_batch
from mmsafe.train.losses import bpo_loss


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    loaded = load_model(tiny_model_dir, dtype="float32", device="cpu")
    loaded.model.train()  # the tiny model has no dropout: training mode changes nothing but is what training runs
    return loaded


@pytest.fixture(scope="module")
def items(tiny, sample_dir, bpo_records):
    """Three examples: two with K = 2 (human, blind), one with K = 1; one with earlier turns."""
    encoder = PreferenceEncoder(tiny.processor, sample_dir, max_length=256)
    two = list(read_preference_records(bpo_records))[:2]
    one = list(read_preference_records(sample_dir / "records.jsonl"))[5:6]
    prepared = prepare_examples([*two, *one], encoder)
    assert [example.num_rejected for example in prepared.examples] == [2, 2, 1]
    dataset = PreferenceDataset(prepared.examples, encoder)
    return [dataset[index] for index in range(len(dataset))], prepared.sources, encoder


def alone(model, items, encoder):
    """Every (prompt, response) as its own batch of one: no padding, no packing."""
    chosen, rejected = [], []
    for item in items:
        example = item["example"]
        scores = []
        for response in example.responses:
            ids = torch.tensor([example.prompt_ids + response])
            image_inputs = {
                key: value
                for key, value in encoder.process_prompt(example.prompt_text, item["image"]).items()
                if key not in ("input_ids", "attention_mask")
            }
            logits = model(input_ids=ids, **image_inputs).logits[0]
            start = len(example.prompt_ids)
            logps = torch.log_softmax(logits[start - 1 : -1], dim=-1)
            scores.append(logps.gather(-1, torch.tensor(response)[:, None]).sum())
        chosen.append(scores[0])
        rejected.append(scores[1:])
    return chosen, rejected


def gradients(model):
    return {name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.grad is not None}


def assert_same_gradients(expected, actual):
    assert expected.keys() == actual.keys()
    total = max(gradient.norm().item() for gradient in expected.values())
    for name, gradient in expected.items():
        difference = (gradient - actual[name]).norm().item()
        scale = gradient.norm().item()
        # Some gradients are zero in exact arithmetic (attention key biases: softmax does not
        # move when every score shifts by the same amount); there only float noise is left.
        if scale < 1e-6 * total:
            assert actual[name].norm().item() < 1e-6 * total, name
            continue
        assert difference <= 1e-4 * scale, f"{name}: relative difference {difference / scale:.2e}"


def test_block_mask_lets_responses_see_the_prompt_and_themselves_only():
    # segments: prompt, prompt, response 1, response 1, response 2, pad
    segments = torch.tensor([[0, 0, 1, 1, 2, -1]])
    allowed = block_attention_mask(segments, torch.float32, as_bool=True)[0, 0].int()
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 0, 0, 1, 0],  # response 2 skips response 1
            [0, 0, 0, 0, 0, 1],  # padding sees itself only
        ]
    )
    assert torch.equal(allowed, expected)
    additive = block_attention_mask(segments, torch.float32, as_bool=False)[0, 0]
    assert torch.equal(additive == 0, expected.bool())


WEIGHTS = torch.tensor([0.7, -1.3, 0.4])  # any fixed mix, so that every score feeds the gradient


@pytest.fixture(scope="module")
def expected(tiny, items):
    """Scores and parameter gradients from scoring every sequence alone."""
    model = tiny.model
    model.zero_grad()
    chosen, rejected = alone(model, items[0], items[2])
    total = sum(w * c for w, c in zip(WEIGHTS, chosen, strict=True)) + sum(r for row in rejected for r in row)
    total.backward()
    return [c.detach() for c in chosen], [[r.detach() for r in row] for row in rejected], gradients(model)


@pytest.mark.parametrize("mode", ["shared-prefix", "prompt-cache", "per-response", "separate"])
def test_log_probs_and_gradients_match_scoring_each_sequence_alone(tiny, items, expected, mode):
    items, sources, encoder = items
    chosen, rejected, expected_gradients = expected
    model = tiny.model
    batch = PreferenceCollator(tiny.tokenizer.pad_token_id, sources, mode=mode, encoder=encoder)(items)
    weights = WEIGHTS
    model.zero_grad()
    scores = score_batch(model, batch)
    assert scores.rejected.shape == (3, 2)
    assert scores.rejected_mask.tolist() == [[True, True], [True, True], [True, False]]
    torch.testing.assert_close(scores.chosen, torch.stack(chosen), atol=1e-4, rtol=0)
    for row, expected_row in enumerate(rejected):
        torch.testing.assert_close(
            scores.rejected[row, : len(expected_row)], torch.stack(expected_row), atol=1e-4, rtol=0
        )
    total = (weights * scores.chosen).sum() + scores.rejected[scores.rejected_mask].sum()
    total.backward()
    assert_same_gradients(expected_gradients, gradients(model))


def test_shared_prefix_and_separate_give_the_same_bpo_loss(tiny, items):
    items, sources, encoder = items
    with torch.no_grad():
        shared = score_batch(
            tiny.model,
            PreferenceCollator(tiny.tokenizer.pad_token_id, sources, mode="shared-prefix", encoder=encoder)(items),
        )
        separate = score_batch(
            tiny.model,
            PreferenceCollator(tiny.tokenizer.pad_token_id, sources, mode="separate", encoder=encoder)(items),
        )
    # A reference a little below the policy, so that the loss is not at its symmetric point.
    reference_chosen = shared.chosen - 0.5
    reference_rejected = shared.rejected + 0.25
    losses = [
        bpo_loss(
            scores.chosen,
            scores.rejected,
            reference_chosen,
            reference_rejected,
            beta=0.1,
            rejected_mask=scores.rejected_mask,
        ).loss
        for scores in (shared, separate)
    ]
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=0)


def test_sdpa_bool_mask_and_eager_float_mask_agree(tiny_model_dir, items):
    items, sources, encoder = items
    results = []
    for implementation in ("sdpa", "eager"):
        loaded = load_model(tiny_model_dir, dtype="float32", device="cpu", attn_implementation=implementation)
        batch = PreferenceCollator(loaded.tokenizer.pad_token_id, sources, encoder=encoder)(items)
        with torch.no_grad():
            results.append(score_batch(loaded.model, batch).chosen)
    torch.testing.assert_close(results[0], results[1], atol=1e-4, rtol=0)


def test_auto_falls_back_past_an_inexact_path(tiny, items, monkeypatch):
    """auto takes the first exact path: a broken shared-prefix gives prompt-cache, both broken give per-response."""
    from mmsafe.train import forward

    items, sources, encoder = items
    collator = PreferenceCollator(tiny.tokenizer.pad_token_id, sources, mode="per-response", encoder=encoder)
    assert forward.select_forward_mode(tiny.model, collator, items, "auto")[0] == "shared-prefix"

    def broken(score):
        def scored(*args, **kwargs):
            result = score(*args, **kwargs)
            return forward.ResponseLogProbs(
                chosen=result.chosen + 0.5, rejected=result.rejected, rejected_mask=result.rejected_mask
            )

        return scored

    monkeypatch.setattr(forward, "score_shared_prefix", broken(forward.score_shared_prefix))
    mode, check = forward.select_forward_mode(tiny.model, collator, items, "auto")
    assert mode == "prompt-cache" and check.passed
    monkeypatch.setattr(forward, "score_prompt_cache", broken(forward.score_prompt_cache))
    assert forward.select_forward_mode(tiny.model, collator, items, "auto")[0] == "per-response"
    assert (
        forward.select_forward_mode(tiny.model, collator, items, "auto", gradient_checkpointing=True)[0]
        == "per-response"
    )


def test_prompt_cache_runs_the_output_layer_on_response_positions_only(tiny, items, monkeypatch):
    """Plain: the prompt's forward keeps only its last position's logits, the responses' forward theirs.
    Chunked (the default): the layer itself runs on no position; its inputs are scored in chunks."""
    from mmsafe.train import forward

    items, sources, encoder = items
    batch = PreferenceCollator(tiny.tokenizer.pad_token_id, sources, mode="prompt-cache", encoder=encoder)(items)
    head = tiny.model.get_output_embeddings()
    # Responses of similar length run together (0.8 of the longest; the tiny model's cache rolls back).
    groups = []
    for row in batch["prompt_cache_rows"]:
        lengths = (row["responses"]["labels"] != -100).sum(1).tolist()
        groups.append(
            [len(group) * max(lengths[index] for index in group) for group in forward.response_groups(lengths)]
        )
    assert any(len(row) > 1 for row in groups)  # the fixture has responses of different lengths

    def rows_through_head():
        rows = []
        handle = head.register_forward_hook(
            lambda module, inputs, output: rows.append(output.shape[0] * output.shape[1])
        )
        try:
            with torch.no_grad():
                scores = score_batch(tiny.model, batch)
        finally:
            handle.remove()
        return rows, scores

    chunked_rows, chunked = rows_through_head()
    assert chunked_rows == [0] * sum(1 + len(row) for row in groups)
    monkeypatch.setattr(forward, "chunked_head", lambda model: None)
    plain_rows, plain = rows_through_head()
    assert plain_rows == [value for row in groups for value in (1, *row)]
    torch.testing.assert_close(chunked.chosen, plain.chosen, atol=1e-4, rtol=0)
    torch.testing.assert_close(chunked.rejected, plain.rejected, atol=1e-4, rtol=0)


def test_response_groups_by_hand():
    from mmsafe.train.forward import response_groups, response_positions

    # Longest first; a response joins the batch while it is at least 0.8 of the batch's longest.
    assert response_groups([25, 29, 194]) == [[2], [1, 0]]
    assert response_groups([100, 80, 79, 64]) == [[0, 1], [2, 3]]
    assert response_groups([5]) == [[0]]
    # Padding: [194] alone (0), [29, 25] padded to 29 (4 of 58): 4 of 252 positions.
    assert response_positions([25, 29, 194], [[2], [1, 0]]) == (4, 252)
    assert response_positions([25, 29, 194], [[0, 1, 2]]) == (169 + 165, 3 * 194)


def test_prompt_cache_reports_the_positions_it_ran(tiny, items):
    """The padding the prompt-cache forwards ran: prompts unpadded, each response batch padded to its longest (counted by hand)."""
    items, sources, encoder = items
    batch = PreferenceCollator(tiny.tokenizer.pad_token_id, sources, mode="prompt-cache", encoder=encoder)(items)
    padded = total = 0
    for item in items:
        example = item["example"]
        lengths = [len(ids) for ids in example.responses]
        ordered = sorted(range(len(lengths)), key=lambda index: -lengths[index])
        batches = [[ordered[0]]]
        for index in ordered[1:]:
            if lengths[index] >= 0.8 * lengths[batches[-1][0]]:
                batches[-1].append(index)
            else:
                batches.append([index])
        for group in batches:
            width = max(lengths[index] for index in group)
            padded += sum(width - lengths[index] for index in group)
            total += width * len(group)
        total += len(example.prompt_ids)
    with torch.no_grad():
        scores = score_batch(tiny.model, batch)
    assert scores.positions == (padded, total)
