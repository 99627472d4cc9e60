"""Preference records -> token ids -> padded batches.

The prompt (chat template and image, through the model's processor) and each response
are tokenized separately, so the boundary between them is exact and the same in every
mode. Responses are the text of :func:`mmsafe.models.prompts.response_text` followed by
the end-of-sequence token.

Policy on bad input, decided once here:

* a record without a rejected response or with an empty response is refused when the
  file is read (:func:`mmsafe.data.records.read_preference_records` raises a
  :class:`~mmsafe.errors.DataError` naming file, record and field);
* a missing or unreadable image is an error naming the record, unless
  ``skip_bad_images`` is set, in which case the record is skipped and counted;
* a prompt that alone fills ``max_length`` (image tokens included) cannot be trained on
  without cutting the image or the question: the record is skipped and counted;
* a record left with no rejected response after filtering by source is skipped and
  counted.

Skips are logged and reported in :class:`PreparedData` (and the run summary): nothing
is dropped silently, and nothing crashes in the middle of an epoch.

Two batch layouts (see :mod:`mmsafe.train.forward`):

* ``shared-prefix``: one row per example, ``[prompt | chosen | rejected_1 | ... ]``;
  segment ids let the forward build a block attention mask in which every response sees
  the prompt and itself only, so the image and the prompt are computed once.
* ``separate``: the public release's form, one DPO pair per (chosen, rejected): each
  sequence is prompt + one response, encoded alone with its own image.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from mmsafe.data.records import PreferenceRecord
from mmsafe.errors import DataError, ImageError
from mmsafe.models.prompts import PromptStyle, render_prompt, response_text

logger = logging.getLogger(__name__)

ForwardMode = Literal["shared-prefix", "separate"]
FORWARD_MODES = ("shared-prefix", "separate")
IGNORE_INDEX = -100
#: Segment id of padding in shared-prefix rows; the prompt is 0, response k is k + 1.
PAD_SEGMENT = -1


@dataclass
class TokenizedExample:
    """One record as token ids. ``responses[0]`` is the chosen one, then the K rejected."""

    id: str
    prompt_ids: list[int]
    responses: list[list[int]]
    rejected_sources: list[str]
    image: str | None
    prompt_text: str
    truncated: bool = False
    #: Reference log-probs of the 1 + K responses, when precomputed.
    reference_logps: list[float] | None = None

    @property
    def num_rejected(self) -> int:
        return len(self.responses) - 1


@dataclass
class PreparedData:
    """The examples kept and why the others were skipped (reason -> record ids)."""

    examples: list[TokenizedExample]
    skipped: dict[str, list[str]] = field(default_factory=dict)
    truncated: int = 0

    def skip_counts(self) -> dict[str, int]:
        return {reason: len(ids) for reason, ids in self.skipped.items()}

    @property
    def sources(self) -> list[str]:
        """Rejected sources in order of first appearance (``human`` first when present)."""
        seen = Counter(source for example in self.examples for source in example.rejected_sources)
        return sorted(seen, key=lambda source: (source != "human", source))


class PreferenceEncoder:
    """Tokenizes records for one model's processor with fixed settings.

    Args:
        processor: the model's processor (tokenizer + image processor).
        image_root: folder that record image paths are relative to.
        max_length: most tokens of prompt + one response (image tokens included).
        image_mode: ``pad`` (square on the processor's mean colour, as the release),
            ``resize`` or ``none``; see :func:`mmsafe.data.images.prepare_image`.
        prompt_style: ``chat-template`` or ``llava-v1``.
    """

    def __init__(
        self,
        processor: Any,
        image_root: str | Path | None,
        *,
        max_length: int = 768,
        image_mode: str = "pad",
        prompt_style: PromptStyle = "chat-template",
    ) -> None:
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.image_root = None if image_root is None else Path(image_root)
        self.max_length = max_length
        self.image_mode = image_mode
        self.prompt_style = prompt_style
        if self.tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no end-of-sequence token; responses cannot be terminated")

    def settings(self) -> dict[str, Any]:
        """Everything that changes the token ids, for cache keys."""
        return {"max_length": self.max_length, "image_mode": self.image_mode, "prompt_style": self.prompt_style}

    def load_image(self, relative: str) -> Any:
        from mmsafe.data.images import load_image, prepare_image

        if self.image_root is None:
            raise ImageError(f"record names an image ({relative!r}) but no image root was given", field="image")
        image_processor = getattr(self.processor, "image_processor", None)
        image_mean = getattr(image_processor, "image_mean", None)
        return prepare_image(load_image(self.image_root, relative), mode=self.image_mode, image_mean=image_mean)

    def process_prompt(self, prompt_text: str, image: Any | None) -> dict[str, torch.Tensor]:
        """The processor's output for one prompt: input_ids [1, P] and the image inputs."""
        if image is None:
            return dict(self.processor(text=[prompt_text], return_tensors="pt"))
        return dict(self.processor(text=[prompt_text], images=[image], return_tensors="pt"))

    def image_inputs(self, example: TokenizedExample) -> dict[str, torch.Tensor]:
        """pixel_values (and any other image tensors the processor makes) for one example."""
        if example.image is None:
            return {}
        processed = self.process_prompt(example.prompt_text, self.load_image(example.image))
        return {key: value for key, value in processed.items() if key not in ("input_ids", "attention_mask")}

    def encode_response(self, text: str) -> list[int]:
        ids = self.tokenizer(response_text(text), add_special_tokens=False)["input_ids"]
        return [*ids, self.tokenizer.eos_token_id]

    def encode(self, record: PreferenceRecord, rejected: Sequence[tuple[str, str]]) -> tuple[TokenizedExample | None, str | None]:
        """Tokenize one record with the given ``(text, source)`` rejected responses.

        Returns ``(example, None)``, or ``(None, reason)`` when the prompt alone is too long.
        Image errors propagate.
        """
        with_image = record.image is not None
        prompt_text = render_prompt(self.processor, record.messages, with_image=with_image, style=self.prompt_style)
        image = self.load_image(record.image) if with_image else None
        prompt_ids = self.process_prompt(prompt_text, image)["input_ids"][0].tolist()
        room = self.max_length - len(prompt_ids)
        if room < 1:
            return None, f"prompt alone is {len(prompt_ids)} tokens, max_length is {self.max_length}"
        responses = [self.encode_response(record.chosen)] + [self.encode_response(text) for text, _ in rejected]
        truncated = any(len(ids) > room for ids in responses)
        responses = [ids[:room] for ids in responses]
        example = TokenizedExample(
            id=record.id,
            prompt_ids=prompt_ids,
            responses=responses,
            rejected_sources=[source for _, source in rejected],
            image=record.image,
            prompt_text=prompt_text,
            truncated=truncated,
        )
        return example, None


def select_rejected(record: PreferenceRecord, sources: Sequence[str] | None, max_rejected: int | None) -> list[tuple[str, str]]:
    """The ``(text, source)`` rejected responses to train on, in record order."""
    pairs = [(text, source) for text, source in zip(record.rejected, record.rejected_sources, strict=True) if sources is None or source in sources]
    return pairs if max_rejected is None else pairs[:max_rejected]


def prepare_examples(
    records: Iterable[PreferenceRecord],
    encoder: PreferenceEncoder,
    *,
    data_file: str | None = None,
    rejected_sources: Sequence[str] | None = None,
    max_rejected: int | None = None,
    skip_bad_images: bool = False,
) -> PreparedData:
    """Tokenize every record, skipping (and counting) those that cannot be trained on.

    ``max_rejected=1`` keeps the first rejected response (plain DPO), ``0`` none (the
    chosen response alone, for supervised warm-up); ``rejected_sources``
    keeps only responses from those sources (``["human"]``, ``["human", "blind"]``).
    """
    prepared = PreparedData(examples=[])

    def skip(reason: str, record_id: str) -> None:
        prepared.skipped.setdefault(reason, []).append(record_id)

    for record in records:
        rejected = select_rejected(record, rejected_sources, max_rejected)
        if not rejected and max_rejected != 0:
            skip("no rejected response from the selected sources", record.id)
            continue
        try:
            example, reason = encoder.encode(record, rejected)
        except ImageError as error:
            if not skip_bad_images:
                raise error.at(file=data_file, record=record.id) from None
            skip("image missing or unreadable", record.id)
            logger.warning("skipping %s", error.at(file=data_file, record=record.id))
            continue
        if example is None:
            skip("prompt alone longer than max_length", record.id)
            logger.warning("skipping record %s: %s", record.id, reason)
            continue
        prepared.truncated += example.truncated
        prepared.examples.append(example)
    for reason, ids in prepared.skipped.items():
        logger.warning("skipped %d record(s): %s (first: %s)", len(ids), reason, ", ".join(ids[:5]))
    if prepared.truncated:
        logger.info("%d example(s) had responses cut to fit max_length=%d", prepared.truncated, encoder.max_length)
    return prepared


class PreferenceDataset(torch.utils.data.Dataset):
    """Token ids prepared up front; images are read again when an item is fetched."""

    def __init__(self, examples: list[TokenizedExample], encoder: PreferenceEncoder) -> None:
        self.examples = examples
        self.encoder = encoder

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.examples[index]
        return {"example": example, "image_inputs": self.encoder.image_inputs(example)}


def _cat_image_inputs(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    parts = [part for part in parts if part]
    if not parts:
        return {}
    return {key: torch.cat([part[key] for part in parts], dim=0) for key in parts[0]}


@dataclass
class PreferenceCollator:
    """Pads a list of dataset items into one batch (a dict of tensors) for either mode.

    ``sources`` fixes the id of each rejected source (``rejected_source_ids`` in the
    batch, -1 where an example has fewer than K rejected responses).
    """

    pad_token_id: int
    sources: list[str]
    mode: ForwardMode = "shared-prefix"

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        examples: list[TokenizedExample] = [item["example"] for item in items]
        batch = self._shared(items) if self.mode == "shared-prefix" else self._separate(items)
        max_rejected = max(example.num_rejected for example in examples)
        source_ids = torch.full((len(examples), max_rejected), -1, dtype=torch.long)
        for row, example in enumerate(examples):
            for slot, source in enumerate(example.rejected_sources):
                source_ids[row, slot] = self.sources.index(source) if source in self.sources else len(self.sources)
        batch["rejected_source_ids"] = source_ids
        batch["rejected_mask"] = source_ids >= 0
        if all(example.reference_logps is not None for example in examples):
            reference = torch.zeros(len(examples), 1 + max_rejected)
            for row, example in enumerate(examples):
                reference[row, : len(example.reference_logps)] = torch.tensor(example.reference_logps)
            batch["reference_chosen_logps"] = reference[:, 0]
            batch["reference_rejected_logps"] = reference[:, 1:]
        return batch

    def _shared(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Rows ``[prompt | response_0 | response_1 | ...]`` with segment and position ids.

        Each response's positions continue from the end of the prompt, as if it were
        the only response; ``logit_index[b, t]`` is the position whose logits predict
        the token at t (the previous token of the same response, or the last prompt
        token for a response's first token).
        """
        examples = [item["example"] for item in items]
        lengths = [len(example.prompt_ids) + sum(len(ids) for ids in example.responses) for example in examples]
        width = max(lengths)
        size = (len(examples), width)
        input_ids = torch.full(size, self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros(size, dtype=torch.long)
        segment_ids = torch.full(size, PAD_SEGMENT, dtype=torch.long)
        labels = torch.full(size, IGNORE_INDEX, dtype=torch.long)
        logit_index = torch.zeros(size, dtype=torch.long)
        for row, example in enumerate(examples):
            prompt_length = len(example.prompt_ids)
            input_ids[row, :prompt_length] = torch.tensor(example.prompt_ids)
            position_ids[row, :prompt_length] = torch.arange(prompt_length)
            segment_ids[row, :prompt_length] = 0
            start = prompt_length
            for slot, ids in enumerate(example.responses):
                end = start + len(ids)
                input_ids[row, start:end] = torch.tensor(ids)
                position_ids[row, start:end] = torch.arange(prompt_length, prompt_length + len(ids))
                segment_ids[row, start:end] = slot + 1
                labels[row, start:end] = torch.tensor(ids)
                logit_index[row, start] = prompt_length - 1
                logit_index[row, start + 1 : end] = torch.arange(start, end - 1)
                start = end
        batch = {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "segment_ids": segment_ids,
            "labels": labels,
            "logit_index": logit_index,
        }
        batch.update(_cat_image_inputs([item["image_inputs"] for item in items]))
        return batch

    def _separate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """One row per sequence: for each rejected k, (prompt + chosen) and (prompt + rejected_k)."""
        rows: list[tuple[int, int]] = []  # (item index, response slot)
        image_parts = []
        for item_index, item in enumerate(items):
            responses = item["example"].responses
            pairs = [(0, slot) for slot in range(1, len(responses))] or [(0,)]  # no rejected: chosen alone
            for pair in pairs:
                for response_slot in pair:
                    rows.append((item_index, response_slot))
                    image_parts.append(item["image_inputs"])
        sequences = [(items[index]["example"].prompt_ids, items[index]["example"].responses[slot]) for index, slot in rows]
        width = max(len(prompt) + len(response) for prompt, response in sequences)
        size = (len(sequences), width)
        # Right padding: causal attention never lets a real token see the padding after it.
        input_ids = torch.full(size, self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(size, dtype=torch.long)
        labels = torch.full(size, IGNORE_INDEX, dtype=torch.long)
        for row, (prompt, response) in enumerate(sequences):
            length = len(prompt) + len(response)
            input_ids[row, :length] = torch.tensor(prompt + response)
            attention_mask[row, :length] = 1
            labels[row, len(prompt) : length] = torch.tensor(response)
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "sequence_example": torch.tensor([index for index, _ in rows]),
            "sequence_slot": torch.tensor([slot for _, slot in rows]),
        }
        batch.update(_cat_image_inputs(image_parts))
        return batch
