"""Sequence log-probs of each record's chosen and rejected responses under a model.

Used for the likelihood form of pairwise accuracy (does the model find the chosen
response more likely than the rejected one?) and by benchmarks. Scoring uses the same
tokenization and scoring path as training.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmsafe.data.records import PreferenceRecord
from mmsafe.models.prompts import PromptStyle
from mmsafe.train.data import PreferenceCollator, PreferenceDataset, PreferenceEncoder, prepare_examples
from mmsafe.train.forward import score_batch, select_forward_mode, to_device
from mmsafe.train.reference import PrecomputeStats, batch_row_length, length_grouped_batches

logger = logging.getLogger(__name__)


@dataclass
class ResponseScores:
    """Log-prob sums (or means) of one record's responses; ``rejected[k]`` is from ``sources[k]``."""

    id: str
    chosen: float
    rejected: list[float]
    sources: list[str]
    truncated: bool = False

    @property
    def prefers_chosen(self) -> list[bool]:
        """Per rejected response: is the chosen one more likely?"""
        return [self.chosen > value for value in self.rejected]


@dataclass
class ScoredRecords:
    """Scores of the records that could be scored, and the ids skipped (reason -> ids)."""

    scores: list[ResponseScores]
    skipped: dict[str, list[str]] = field(default_factory=dict)
    padding_share: float | None = None
    """Padding positions over all positions of the batches scored (None: nothing scored)."""


@torch.no_grad()
def score_responses(
    loaded_model: Any,
    records: Iterable[PreferenceRecord],
    image_root: str | Path | None,
    *,
    batch_size: int = 4,
    max_length: int | None = None,
    image_mode: str | None = None,
    prompt_style: PromptStyle | None = None,
    average: bool = False,
    skip_bad_images: bool = False,
    forward_mode: str = "auto",
    group_by_length: bool = True,
) -> ScoredRecords:
    """Score every record's chosen and rejected responses with ``loaded_model``.

    Args:
        loaded_model: a :class:`mmsafe.models.LoadedModel` (model + processor).
        records: preference records; images are read from ``image_root``.
        max_length: prompt + response token limit; longer responses are cut (and
            flagged ``truncated``), records whose prompt alone is longer are skipped.
        max_length, image_mode, prompt_style: None takes the model's input recipe
            (:mod:`mmsafe.models.recipe`; the form it was trained on), else the defaults.
        average: mean instead of sum of token log-probs.
        forward_mode: the scoring path (see :mod:`mmsafe.train.forward`); ``auto`` picks
            by architecture and checks it on the first records against one-at-a-time scoring.
        group_by_length: batch records of similar length together (less padding, the same
            numbers); the scores come back in record order either way.
    """
    from mmsafe.models.recipe import resolve_inputs
    from mmsafe.train.trainer import padding_share

    model = loaded_model.model
    inputs = resolve_inputs(
        getattr(loaded_model, "name", None), max_length=max_length, image_mode=image_mode, prompt_style=prompt_style, used=("prompt_style", "image_mode", "max_length")
    )
    encoder = PreferenceEncoder.for_model(
        model, loaded_model.processor, image_root, max_length=inputs.max_length, image_mode=inputs.image_mode, prompt_style=inputs.prompt_style
    )
    prepared = prepare_examples(records, encoder, skip_bad_images=skip_bad_images)
    dataset = PreferenceDataset(prepared.examples, encoder)
    collator = PreferenceCollator(encoder.tokenizer.pad_token_id, prepared.sources, mode="per-response", encoder=encoder)
    if not dataset.examples:
        return ScoredRecords(scores=[], skipped=prepared.skipped)
    mode, _ = select_forward_mode(model, collator, [dataset[index] for index in range(min(4, len(dataset)))], forward_mode)
    collator = collator.with_mode(mode)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stats = PrecomputeStats()
    if group_by_length:
        batches = length_grouped_batches([batch_row_length(example, collator.mode) for example in dataset.examples], batch_size)
    else:
        batches = [list(range(start, min(start + batch_size, len(dataset)))) for start in range(0, len(dataset), batch_size)]
    by_position: dict[int, ResponseScores] = {}
    try:
        for positions in batches:
            items = [dataset[index] for index in positions]
            collated = collator(items)
            padded, total = padding_share(collated)
            stats.padded_positions += padded
            stats.positions += total
            result = score_batch(model, to_device(collated, device), average=average)
            for row, (position, item) in enumerate(zip(positions, items, strict=True)):
                example = item["example"]
                by_position[position] = ResponseScores(
                    id=example.id,
                    chosen=float(result.chosen[row]),
                    rejected=[float(value) for value in result.rejected[row, : example.num_rejected]],
                    sources=list(example.rejected_sources),
                    truncated=example.truncated,
                )
    finally:
        model.train(was_training)
    logger.info(
        "scored %d records in %d batches, padding share %.1f%%%s", len(by_position), len(batches), 100 * (stats.padding_share or 0.0), " (grouped by length)" if group_by_length else ""
    )
    return ScoredRecords(scores=[by_position[position] for position in range(len(dataset))], skipped=prepared.skipped, padding_share=stats.padding_share)
