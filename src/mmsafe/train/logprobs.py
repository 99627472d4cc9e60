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
from mmsafe.train.forward import select_forward_mode
from mmsafe.train.scoring import ScoringStats, score_examples, scoring_batches

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

    The loop is :func:`mmsafe.train.scoring.score_examples`, the one reference precompute runs.
    """
    from mmsafe.models.recipe import resolve_inputs

    model = loaded_model.model
    inputs = resolve_inputs(
        getattr(loaded_model, "name", None),
        max_length=max_length,
        image_mode=image_mode,
        prompt_style=prompt_style,
        used=("prompt_style", "image_mode", "max_length"),
    )
    encoder = PreferenceEncoder.for_model(
        model,
        loaded_model.processor,
        image_root,
        max_length=inputs.max_length,
        image_mode=inputs.image_mode,
        prompt_style=inputs.prompt_style,
    )
    prepared = prepare_examples(records, encoder, skip_bad_images=skip_bad_images)
    dataset = PreferenceDataset(prepared.examples, encoder)
    collator = PreferenceCollator(
        encoder.tokenizer.pad_token_id, prepared.sources, mode="per-response", encoder=encoder
    )
    if not dataset.examples:
        return ScoredRecords(scores=[], skipped=prepared.skipped)
    mode, _ = select_forward_mode(
        model, collator, [dataset[index] for index in range(min(4, len(dataset)))], forward_mode
    )
    collator = collator.with_mode(mode)
    stats = ScoringStats()
    batches, grouped = scoring_batches(dataset, collator.mode, batch_size, group_by_length=group_by_length)
    scored = score_examples(model, dataset, collator, batches=batches, average=average, stats=stats)
    scores = [
        ResponseScores(
            id=entry.example.id,
            chosen=entry.chosen,
            rejected=entry.rejected,
            sources=list(entry.example.rejected_sources),
            truncated=entry.example.truncated,
        )
        for entry in scored
    ]
    logger.info(
        "scored %d records in %d batches, padding share %.1f%%%s",
        len(scores),
        len(batches),
        100 * (stats.padding_share or 0.0),
        " (grouped by length)" if grouped else "",
    )
    return ScoredRecords(scores=scores, skipped=prepared.skipped, padding_share=stats.padding_share)
