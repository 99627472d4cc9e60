"""Preference records -> token ids -> padded batches.

The prompt is rendered with the model's chat template and tokenized (image tokens
expanded) by its processor; each response is the token span the template gives the
assistant turn (:func:`mmsafe.models.prompts.response_token_ids`), ending with the
template's end-of-turn token, so training sees the exact ids the model produces at
inference.

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

Batch layouts (see :mod:`mmsafe.train.forward`):

* ``shared-prefix``: one row per example, ``[prompt | chosen | rejected_1 | ... ]``;
  segment ids let the forward build a block attention mask in which every response sees
  the prompt and itself only, so the image and the prompt are computed once. Exact only
  for plain causal decoders with 1-D positions (:func:`packing_supported`).
* ``prompt-cache``: per example, the prompt alone (``prompt_cache_rows``: its ids,
  per-token outputs and image tensors, unpadded) and its 1 + K responses as one
  right-padded batch (``[response | padding]``, per-token outputs continued), which the
  forward scores against the prompt's key/value cache.
* ``per-response``: one row per response, ``[prompt | response | padding]``, right
  padded, through the model's own forward: positions (M-RoPE included), token types,
  image attention, cross-attention and recurrent state come from the model. Exact on
  every architecture.
* ``separate``: the public release's form, one DPO pair per (chosen, rejected): each
  sequence is prompt + one response, encoded alone with its own image.

Processor outputs are handled by role: tensors shaped like ``input_ids`` (token types,
cross-attention masks) are continued over the response tokens by a rule per kind
(:func:`mmsafe.models.structure.response_token_fill`) and padded; image tensors come
from one processor call per batch with one image list per row; the processor's own
``labels`` never reach the model.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import torch

from mmsafe.data.records import PreferenceRecord
from mmsafe.errors import ConfigError, DataError, ImageError
from mmsafe.models.prompts import PromptStyle, render_prompt, response_token_ids, tokenize_options
from mmsafe.models.recipe import DEFAULT_IMAGE_MODE, DEFAULT_MAX_LENGTH, DEFAULT_PROMPT_STYLE

logger = logging.getLogger(__name__)

ForwardMode = Literal["shared-prefix", "prompt-cache", "per-response", "separate"]
FORWARD_MODES = ("shared-prefix", "prompt-cache", "per-response", "separate")


def as_forward_mode(name: str) -> ForwardMode:
    """``name`` as a :data:`ForwardMode`; a ConfigError unless it is one of :data:`FORWARD_MODES`."""
    if name not in FORWARD_MODES:
        raise ConfigError(f"forward_mode: expected one of {', '.join(FORWARD_MODES)}, got {name!r}")
    return cast(ForwardMode, name)


#: Processor outputs that are never model inputs.
_DROPPED_PROCESSOR_KEYS = ("labels",)
IGNORE_INDEX = -100
#: What happens to a response longer than max_length allows (see PreferenceEncoder).
LENGTH_RULES = ("cut", "release")
SKIP_PROMPT_TOO_LONG = "prompt alone longer than max_length"
SKIP_CHOSEN_TOO_LONG = "prompt + chosen longer than max_length (length_rule: release)"
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
            ``resize`` or ``none``; see :func:`mmsafe.data.images.prepare_image` (the
            image is refused past the bounds of :func:`mmsafe.data.images.load_image`, and
            a padded square never has more pixels than ``max_pixels``).
        prompt_style: ``chat-template`` or ``llava-v1``.
        stop_token_ids: ids that end an answer (default: the tokenizer's end of sequence;
            pass :func:`mmsafe.models.prompts.stop_token_ids` of the model to add its
            generation end tokens).
        model_type: the model's ``config.model_type``; decides how per-token processor
            outputs continue over response tokens.
        length_rule: what happens to a response that does not fit: ``cut`` (the default:
            every response is cut to fit) or ``release`` (the public release's rule: a
            record whose prompt + chosen response does not fit is skipped and counted; a
            rejected response is cut).
    """

    def __init__(
        self,
        processor: Any,
        image_root: str | Path | None,
        *,
        max_length: int = DEFAULT_MAX_LENGTH,
        image_mode: str = DEFAULT_IMAGE_MODE,
        prompt_style: PromptStyle = DEFAULT_PROMPT_STYLE,
        stop_token_ids: Sequence[int] | None = None,
        model_type: str | None = None,
        length_rule: str = "cut",
    ) -> None:
        if length_rule not in LENGTH_RULES:
            raise ValueError(f"length_rule: expected one of {', '.join(LENGTH_RULES)}, got {length_rule!r}")
        self.length_rule = length_rule
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.image_root = None if image_root is None else Path(image_root)
        self.max_length = max_length
        self.image_mode = image_mode
        self.prompt_style = prompt_style
        self.model_type = model_type
        if self.tokenizer.eos_token_id is None and not stop_token_ids:
            raise DataError("the tokenizer has no end-of-sequence token; responses cannot be terminated")
        self.stop_token_ids = list(stop_token_ids) if stop_token_ids else [self.tokenizer.eos_token_id]

    @classmethod
    def for_model(cls, model: Any, processor: Any, image_root: str | Path | None, **settings: Any) -> PreferenceEncoder:
        """An encoder whose responses end with ``model``'s own stop tokens and follow its per-token rules."""
        from mmsafe.models.prompts import stop_token_ids

        while hasattr(model, "module"):
            model = model.module
        tokenizer = getattr(processor, "tokenizer", processor)
        return cls(
            processor,
            image_root,
            stop_token_ids=stop_token_ids(tokenizer, getattr(model, "generation_config", None)),
            model_type=getattr(model.config, "model_type", None),
            **settings,
        )

    def settings(self) -> dict[str, Any]:
        """Everything that changes the token ids, for cache keys."""
        return {
            "max_length": self.max_length,
            "image_mode": self.image_mode,
            "prompt_style": self.prompt_style,
            "stop_token_ids": self.stop_token_ids,
            "response_tokens": "conversation-span",
            "length_rule": self.length_rule,
        }

    def load_image(self, relative: str) -> Any:
        from mmsafe.data.images import load_image, prepare_image

        if self.image_root is None:
            raise ImageError(f"record names an image ({relative!r}) but no image root was given", field="image")
        image_processor = getattr(self.processor, "image_processor", None)
        image_mean = getattr(image_processor, "image_mean", None)
        return prepare_image(load_image(self.image_root, relative), mode=self.image_mode, image_mean=image_mean)

    def process_prompts(self, prompt_texts: Sequence[str], images: Sequence[Any] | None) -> dict[str, torch.Tensor]:
        """One processor call for a batch of prompts, right padded.

        ``images`` is one image per prompt (or None for text-only prompts); the processor
        gets one list per prompt, the form every processor reads as "these images belong to
        this prompt". Its ``labels`` are dropped.
        """
        options = tokenize_options(self.tokenizer, prompt_texts[0])
        kwargs: dict[str, Any] = {"return_tensors": "pt", "padding": True, **options}
        if images is not None:
            kwargs["images"] = [[image] for image in images]
        padding_side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "right"
        try:
            output = dict(self.processor(text=list(prompt_texts), **kwargs))
        finally:
            self.tokenizer.padding_side = padding_side
        for key in _DROPPED_PROCESSOR_KEYS:
            output.pop(key, None)
        return output

    def process_prompt(self, prompt_text: str, image: Any | None) -> dict[str, torch.Tensor]:
        """The processor's output for one prompt: input_ids [1, P] and the image inputs."""
        return self.process_prompts([prompt_text], None if image is None else [image])

    def encode(
        self, record: PreferenceRecord, rejected: Sequence[tuple[str, str]]
    ) -> tuple[TokenizedExample | None, str | None]:
        """Tokenize one record with the given ``(text, source)`` rejected responses.

        Returns ``(example, None)``, or ``(None, reason)`` when the prompt alone is too long
        (or, under ``length_rule: release``, prompt + chosen); the reason starts with its
        category (``SKIP_PROMPT_TOO_LONG``, ``SKIP_CHOSEN_TOO_LONG``). Image errors propagate.
        """
        with_image = record.image is not None
        prompt_text = render_prompt(
            self.processor, record.messages, with_image=with_image, style=self.prompt_style, record=record.id
        )
        image = self.load_image(record.image) if record.image is not None else None
        prompt_ids = self.process_prompt(prompt_text, image)["input_ids"][0].tolist()
        room = self.max_length - len(prompt_ids)
        if room < 1:
            return (
                None,
                f"{SKIP_PROMPT_TOO_LONG}: the prompt is {len(prompt_ids)} tokens, max_length is {self.max_length}",
            )
        texts = [record.chosen, *(text for text, _ in rejected)]
        responses = [
            response_token_ids(
                self.processor,
                record.messages,
                prompt_text,
                text,
                with_image=with_image,
                style=self.prompt_style,
                stop_token_ids=self.stop_token_ids,
                record=record.id,
            )
            for text in texts
        ]
        if self.length_rule == "release" and len(responses[0]) > room:
            return (
                None,
                f"{SKIP_CHOSEN_TOO_LONG}: {len(prompt_ids)} + {len(responses[0])} tokens, max_length is {self.max_length}",
            )
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


def select_rejected(
    record: PreferenceRecord, sources: Sequence[str] | None, max_rejected: int | None
) -> list[tuple[str, str]]:
    """The ``(text, source)`` rejected responses to train on, in record order."""
    pairs = [
        (text, source)
        for text, source in zip(record.rejected, record.rejected_sources, strict=True)
        if sources is None or source in sources
    ]
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
            assert reason is not None  # encode gives the reason with every None
            skip(
                next(
                    (
                        category
                        for category in (SKIP_PROMPT_TOO_LONG, SKIP_CHOSEN_TOO_LONG)
                        if reason.startswith(category)
                    ),
                    reason,
                ),
                record.id,
            )
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
        image = None if example.image is None else self.encoder.load_image(example.image)
        return {"example": example, "image": image}


def _is_per_token(value: Any, prompt_width: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == prompt_width


class _Rows:
    """Rows of token ids (a prompt, then response ids) assembled into one right-padded batch.

    Per-token processor outputs of each row's prompt are continued over its response
    tokens by :func:`mmsafe.models.structure.response_token_fill` and padded with zeros.
    """

    def __init__(self, pad_token_id: int, model_type: str | None) -> None:
        self.pad_token_id = pad_token_id
        self.model_type = model_type

    def prompt_inputs(
        self, items: list[dict[str, Any]], encoder: PreferenceEncoder | None
    ) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        """Per row: the prompt's per-token tensors [1, P, ...]; for the batch: the image tensors.

        Rows with an image go through the processor in one call; text-only rows need no
        processor (their ids are known), so a batch may mix both.
        """
        per_token: list[dict[str, torch.Tensor]] = [{} for _ in items]
        image_inputs: dict[str, torch.Tensor] = {}
        with_image = [row for row, item in enumerate(items) if item.get("image") is not None]
        if with_image:
            if encoder is None:
                raise ValueError("a collator for examples with images needs the encoder (processor)")
            output = encoder.process_prompts(
                [items[row]["example"].prompt_text for row in with_image], [items[row]["image"] for row in with_image]
            )
            width = output["input_ids"].shape[1]
            for position, row in enumerate(with_image):
                example = items[row]["example"]
                length = len(example.prompt_ids)
                if output["input_ids"][position, :length].tolist() != example.prompt_ids:
                    raise DataError("the processor tokenized the prompt differently when batched", record=example.id)
                per_token[row] = {
                    key: value[position : position + 1, :length]
                    for key, value in output.items()
                    if key not in ("input_ids", "attention_mask") and _is_per_token(value, width)
                }
            image_inputs = {
                key: value
                for key, value in output.items()
                if key not in ("input_ids", "attention_mask") and not _is_per_token(value, width)
            }
        return per_token, image_inputs

    def assemble(
        self, sequences: list[tuple[list[int], list[int]]], per_token: list[dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """``sequences``: (prompt ids, response ids) per row -> input_ids, attention_mask, labels, per-token keys."""
        from mmsafe.models.structure import response_token_fill

        width = max(len(prompt) + len(response) for prompt, response in sequences)
        size = (len(sequences), width)
        # Right padding: causal attention (and causal convolution) never lets a real token
        # see the padding after it.
        input_ids = torch.full(size, self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(size, dtype=torch.long)
        labels = torch.full(size, IGNORE_INDEX, dtype=torch.long)
        extra: dict[str, torch.Tensor] = {}
        keys = sorted({key for row in per_token for key in row})
        for row, (prompt, response) in enumerate(sequences):
            length = len(prompt) + len(response)
            input_ids[row, :length] = torch.tensor(prompt + response)
            attention_mask[row, :length] = 1
            labels[row, len(prompt) : length] = torch.tensor(response)
            for key in keys:
                prompt_part = per_token[row].get(key)
                if prompt_part is None:
                    continue
                if key not in extra:
                    extra[key] = torch.zeros((len(sequences), width, *prompt_part.shape[2:]), dtype=prompt_part.dtype)
                extra[key][row, : len(prompt)] = prompt_part[0]
                extra[key][row, len(prompt) : length] = response_token_fill(self.model_type, key, prompt_part[0])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, **extra}


class ExampleRows(list):
    """The per-example inputs of a ``prompt-cache`` batch: a list of {"prompt", "responses"} dicts.

    ``.to(device)`` moves every tensor, so the batch moves like a dict of tensors.
    """

    def to(self, device: Any) -> ExampleRows:
        return ExampleRows(
            {part: {key: value.to(device) for key, value in inputs.items()} for part, inputs in row.items()}
            for row in self
        )


@dataclass
class PreferenceCollator:
    """Pads a list of dataset items into one batch (a dict of tensors) for any mode.

    ``sources`` fixes the id of each rejected source (``rejected_source_ids`` in the
    batch, -1 where an example has fewer than K rejected responses). ``encoder`` runs the
    processor for the image tensors (needed when items carry images); ``model_type``
    decides how per-token processor outputs continue over responses.
    """

    pad_token_id: int
    sources: list[str]
    mode: ForwardMode = "shared-prefix"
    encoder: PreferenceEncoder | None = None
    model_type: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in FORWARD_MODES:
            raise ValueError(f"mode: expected one of {', '.join(FORWARD_MODES)}, got {self.mode!r}")
        if self.model_type is None and self.encoder is not None:
            self.model_type = self.encoder.model_type

    def with_mode(self, mode: ForwardMode) -> PreferenceCollator:
        return dataclasses.replace(self, mode=mode)

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        examples: list[TokenizedExample] = [item["example"] for item in items]
        layout = {
            "shared-prefix": self._shared,
            "prompt-cache": self._prompt_cache,
            "per-response": self._per_response,
            "separate": self._separate,
        }[self.mode]
        batch = layout(items)
        max_rejected = max(example.num_rejected for example in examples)
        source_ids = torch.full((len(examples), max_rejected), -1, dtype=torch.long)
        for row, example in enumerate(examples):
            for slot, source in enumerate(example.rejected_sources):
                source_ids[row, slot] = self.sources.index(source) if source in self.sources else len(self.sources)
        batch["rejected_source_ids"] = source_ids
        batch["rejected_mask"] = source_ids >= 0
        reference_logps = [example.reference_logps for example in examples if example.reference_logps is not None]
        if len(reference_logps) == len(examples):
            reference = torch.zeros(len(examples), 1 + max_rejected)
            for row, logps in enumerate(reference_logps):
                reference[row, : len(logps)] = torch.tensor(logps)
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
        from mmsafe.models.structure import response_token_fill

        examples = [item["example"] for item in items]
        per_token, image_inputs = _Rows(self.pad_token_id, self.model_type).prompt_inputs(items, self.encoder)
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
        # Per-token processor outputs ride along, continued over every response; packing
        # is not exact for the models that have them (packing_supported says so, and the
        # exactness check measures it when the mode is forced).
        for key in sorted({key for row in per_token for key in row}):
            rows = []
            for row, example in enumerate(examples):
                prompt_part = per_token[row][key][0]
                values = torch.zeros((width, *prompt_part.shape[1:]), dtype=prompt_part.dtype)
                values[: len(example.prompt_ids)] = prompt_part
                values[len(example.prompt_ids) : lengths[row]] = torch.as_tensor(
                    response_token_fill(self.model_type, key, prompt_part), dtype=prompt_part.dtype
                )
                rows.append(values)
            batch[key] = torch.stack(rows)
        batch.update(image_inputs)
        return batch

    def _prompt_cache(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Per example: the prompt alone, and its responses as one right-padded batch.

        The processor runs once per example (each prompt is its own forward); a response
        row holds only response tokens, so it needs no attention mask: its real tokens see
        the whole (unpadded) prompt in the cache and the earlier tokens of their own row.
        """
        from mmsafe.models.structure import response_token_fill

        assembler = _Rows(self.pad_token_id, self.model_type)
        rows = ExampleRows()
        for item in items:
            example = item["example"]
            per_token, image_inputs = assembler.prompt_inputs([item], self.encoder)
            prompt_length = len(example.prompt_ids)
            prompt = {
                "input_ids": torch.tensor([example.prompt_ids]),
                "attention_mask": torch.ones(1, prompt_length, dtype=torch.long),
            }
            prompt.update(per_token[0])
            prompt.update(image_inputs)
            width = max(len(ids) for ids in example.responses)
            size = (len(example.responses), width)
            input_ids = torch.full(size, self.pad_token_id, dtype=torch.long)
            labels = torch.full(size, IGNORE_INDEX, dtype=torch.long)
            for slot, ids in enumerate(example.responses):
                input_ids[slot, : len(ids)] = torch.tensor(ids)
                labels[slot, : len(ids)] = torch.tensor(ids)
            responses = {"input_ids": input_ids, "labels": labels}
            for key, prompt_part in per_token[0].items():
                fill = torch.as_tensor(
                    response_token_fill(self.model_type, key, prompt_part[0]), dtype=prompt_part.dtype
                )
                responses[key] = fill.expand(*size, *prompt_part.shape[2:]).clone()
            rows.append({"prompt": prompt, "responses": responses})
        return {"prompt_cache_rows": rows}

    def _sequence_rows(self, items: list[dict[str, Any]], rows: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        """One right-padded row per (item index, response slot), each with its own image."""
        assembler = _Rows(self.pad_token_id, self.model_type)
        row_items = [items[index] for index, _ in rows]
        per_token, image_inputs = assembler.prompt_inputs(row_items, self.encoder)
        sequences = [
            (items[index]["example"].prompt_ids, items[index]["example"].responses[slot]) for index, slot in rows
        ]
        batch = assembler.assemble(sequences, per_token)
        batch["sequence_example"] = torch.tensor([index for index, _ in rows])
        batch["sequence_slot"] = torch.tensor([slot for _, slot in rows])
        batch.update(image_inputs)
        return batch

    def _per_response(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """One row per response of every example: the chosen once, then each rejected."""
        rows = [(index, slot) for index, item in enumerate(items) for slot in range(len(item["example"].responses))]
        return self._sequence_rows(items, rows)

    def _separate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """One row per sequence: for each rejected k, (prompt + chosen) and (prompt + rejected_k)."""
        rows: list[tuple[int, int]] = []  # (item index, response slot)
        for item_index, item in enumerate(items):
            responses = item["example"].responses
            pairs: list[tuple[int, ...]] = [(0, slot) for slot in range(1, len(responses))] or [
                (0,)
            ]  # no rejected: chosen alone
            for pair in pairs:
                rows.extend((item_index, response_slot) for response_slot in pair)
        return self._sequence_rows(items, rows)
