"""The one loop that scores examples with a fixed model: reference precompute and likelihood evaluation.

:func:`score_examples` batches the examples (by length, so batches carry little padding),
scores each batch with :func:`mmsafe.train.forward.score_batch` in eval mode and without
gradients, counts the padding it ran, and hands the scores back in the dataset's order.
:func:`mmsafe.train.reference.precompute_reference` and
:func:`mmsafe.train.logprobs.score_responses` are this loop plus what each keeps of it.
It runs under the caller's autocast: reference precompute opens the training policy's
mixed precision around it, likelihood evaluation scores in the weights' own dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mmsafe.train.data import PAD_SEGMENT, PreferenceCollator, TokenizedExample
from mmsafe.train.forward import score_batch, to_device


class ScoringStats:
    """Batches run (``forwards``), and the padding positions of those batches."""

    def __init__(self) -> None:
        self.forwards = 0
        self.padded_positions = 0.0
        self.positions = 0.0

    @property
    def padding_share(self) -> float | None:
        """Padding positions over all positions run (None: nothing was run)."""
        return self.padded_positions / self.positions if self.positions else None


@dataclass
class ExampleScores:
    """Sequence log-probs (sums or means) of one example: its chosen response and each of its rejected ones."""

    example: TokenizedExample
    chosen: float
    rejected: list[float]


def padding_share(batch: dict[str, Any]) -> tuple[float, float]:
    """(padding positions, all positions) of the rows a batch runs through the model."""
    if "segment_ids" in batch:
        segments = batch["segment_ids"]
        return float((segments == PAD_SEGMENT).sum()), float(segments.numel())
    if "prompt_cache_rows" in batch:  # the prompts are unpadded; the response batches are right padded
        labels = [row["responses"]["labels"] for row in batch["prompt_cache_rows"]]
        padded = sum(float((label == -100).sum()) for label in labels)
        total = sum(
            float(label.numel()) + row["prompt"]["input_ids"].numel()
            for label, row in zip(labels, batch["prompt_cache_rows"], strict=True)
        )
        return padded, total
    mask = batch["attention_mask"]
    return float((mask == 0).sum()), float(mask.numel())


def batch_row_length(example: TokenizedExample, mode: str) -> int:
    """The width ``example`` takes in a batch of ``mode``: its row (shared prefix: prompt
    and every response in one row) or its longest row (the other modes: one row per response)."""
    responses = [len(ids) for ids in example.responses] or [0]
    return len(example.prompt_ids) + (sum(responses) if mode == "shared-prefix" else max(responses))


def length_grouped_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Positions cut into batches of at most ``batch_size``, longest first (a batch that runs
    out of memory does so at once); ties keep input order. Example: lengths [5, 9, 7, 3],
    batch size 2 -> [[1, 2], [0, 3]]."""
    if batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    order = sorted(range(len(lengths)), key=lambda index: -lengths[index])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def examples_of(dataset: Any) -> list[TokenizedExample] | None:
    """The examples behind a dataset or a subset of one (``.dataset`` and ``.indices``), without loading images."""
    examples = getattr(dataset, "examples", None)
    if isinstance(examples, list):
        return examples
    inner, indices = getattr(getattr(dataset, "dataset", None), "examples", None), getattr(dataset, "indices", None)
    if isinstance(inner, list) and indices is not None:
        return [inner[index] for index in indices]
    return None


def scoring_batches(
    dataset: Any, mode: str, batch_size: int, *, group_by_length: bool = True
) -> tuple[list[list[int]], bool]:
    """The batches (dataset positions) :func:`score_examples` runs, and whether they are grouped by length.

    Grouped where the examples can be read without loading images (see :func:`examples_of`);
    else, and with ``group_by_length`` off, in dataset order.
    """
    examples = examples_of(dataset) if group_by_length else None
    if examples is not None and len(examples) == len(dataset):
        return length_grouped_batches([batch_row_length(example, mode) for example in examples], batch_size), True
    return [
        list(range(start, min(start + batch_size, len(dataset)))) for start in range(0, len(dataset), batch_size)
    ], False


@torch.no_grad()
def score_examples(
    model: Any,
    dataset: Any,
    collator: PreferenceCollator,
    *,
    batches: list[list[int]],
    average: bool = False,
    stats: ScoringStats | None = None,
    progress_desc: str | None = None,
) -> list[ExampleScores]:
    """Score the items of ``dataset`` in ``batches`` (see :func:`scoring_batches`); the scores come back in dataset order.

    The model runs in eval mode (dropout off: one fixed function) and is put back in the
    mode it was in; each batch's padding and one forward are added to ``stats``.
    ``progress_desc`` shows a progress bar under that name.
    """
    from mmsafe.progress import progress

    stats = stats if stats is not None else ScoringStats()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    by_position: dict[int, ExampleScores] = {}
    steps = progress(batches, desc=progress_desc, total=len(batches)) if progress_desc else batches
    try:
        for positions in steps:
            items = [dataset[index] for index in positions]
            collated = collator(items)
            result = score_batch(model, to_device(collated, device), average=average)
            padded, total = result.positions or padding_share(collated)  # what ran, where the path reports it
            stats.padded_positions += padded
            stats.positions += total
            stats.forwards += 1
            for row, (position, item) in enumerate(zip(positions, items, strict=True)):
                example = item["example"]
                rejected = result.rejected[row, : example.num_rejected]
                by_position[position] = ExampleScores(
                    example, float(result.chosen[row]), [float(value) for value in rejected]
                )
    finally:
        model.train(was_training)
    return [by_position[position] for position in sorted(by_position)]
