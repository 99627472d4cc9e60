"""Entity recognition on the last user instruction: which names can become an image.

A recognizer turns a batch of instructions into :class:`Mention` lists (character
offsets into each instruction). Three are built in, found by name in
:data:`RECOGNIZERS`:

- ``gazetteer``: the entity names of the image index, matched offline (whole words,
  case-aware, longest match first);
- ``hf-ner``: a Hugging Face token-classification model (default the CoNLL-03 BERT the
  paper used), its B-/I- word tags aggregated into spans by :func:`aggregate_tags`;
- ``llm``: any chat model answering JSON (through :mod:`mmsafe.synthesis.complete`).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol

from mmsafe.data.stats import ENTITY_TYPES  # the CoNLL-03 entity types
from mmsafe.errors import ConfigError, DataError, ModelError

logger = logging.getLogger(__name__)

DEFAULT_NER_MODEL = "dbmdz/bert-large-cased-finetuned-conll03-english"
_WORD = re.compile(r"\w+")


class EntityError(DataError):
    """A recognizer could not produce entities for one instruction (e.g. unparseable JSON)."""


@dataclass(frozen=True)
class Mention:
    """One mention of an entity: ``instruction[start:end] == text``.

    ``name`` is the canonical name used to find the image (the gazetteer's spelling;
    the mention text otherwise).
    """

    text: str
    type: str
    start: int
    end: int
    name: str
    score: float = 1.0


class EntityRecognizer(Protocol):
    """Anything that finds entity mentions in a batch of instructions, in order.

    The result has one item per text: its mentions, or the :class:`EntityError` that
    says why that text could not be handled (the builder reports and counts it).
    """

    name: str

    def recognize(self, texts: Sequence[str]) -> list[list[Mention] | EntityError]: ...


# ---------------------------------------------------------------- gazetteer


def _is_word_char(character: str) -> bool:
    return character.isalnum() or character == "_"


class Gazetteer:
    """Offline recognizer over a fixed list of ``(name, type)`` entries.

    Matches are whole words (no letter or digit right before or after), longest first at
    each position, left to right without overlap. Case-aware: a name matches its exact
    spelling or the text in capitals ("OBAMA"), but "apple" is not "Apple"; set
    ``case_sensitive=False`` to ignore case entirely.
    """

    name = "gazetteer"

    def __init__(self, entries: Iterable[tuple[str, str]], *, case_sensitive: bool = True) -> None:
        self.case_sensitive = case_sensitive
        self.types: dict[str, str] = {}
        # Candidates by their first word (case-folded), longest first, so that each
        # position costs one dictionary look-up and a few string comparisons.
        self._by_first_word: dict[str, list[str]] = {}
        for name, entity_type in entries:
            name = name.strip()
            first = _WORD.match(name)
            if first is None:
                logger.warning("gazetteer: skipping %r, which does not start with a letter or digit", name)
                continue
            if name in self.types:
                continue
            self.types[name] = entity_type
            self._by_first_word.setdefault(first.group().casefold(), []).append(name)
        for candidates in self._by_first_word.values():
            candidates.sort(key=len, reverse=True)

    def __len__(self) -> int:
        return len(self.types)

    def _matches(self, segment: str, name: str) -> bool:
        if segment == name:
            return True
        if not self.case_sensitive:
            return segment.casefold() == name.casefold()
        return segment.isupper() and segment == name.upper()

    def find(self, text: str) -> list[Mention]:
        mentions: list[Mention] = []
        covered_until = 0
        for word in _WORD.finditer(text):
            start = word.start()
            if start < covered_until:
                continue
            for name in self._by_first_word.get(word.group().casefold(), ()):
                end = start + len(name)
                if end > len(text) or (end < len(text) and _is_word_char(text[end]) and _is_word_char(name[-1])):
                    continue
                if self._matches(text[start:end], name):
                    mentions.append(
                        Mention(text=text[start:end], type=self.types[name], start=start, end=end, name=name)
                    )
                    covered_until = end
                    break
        return mentions

    def recognize(self, texts: Sequence[str]) -> list[list[Mention] | EntityError]:
        return [self.find(text) for text in texts]


# ---------------------------------------------------------------- tag aggregation


@dataclass(frozen=True)
class TokenTag:
    """A token's predicted tag with its character span; ``word`` numbers the word it belongs to."""

    label: str
    start: int
    end: int
    word: int
    score: float = 1.0


def split_label(label: str) -> tuple[str, str | None]:
    """``"B-PER"`` -> ``("B", "PER")``; ``"O"`` -> ``("O", None)``; a bare ``"PER"`` counts as ``I-PER``."""
    if label == "O" or not label:
        return "O", None
    if len(label) > 2 and label[1] in "-_" and label[0] in "BIES":
        return label[0], label[2:]
    return "I", label


def aggregate_tags(text: str, tokens: Sequence[TokenTag], *, types: Sequence[str] = ENTITY_TYPES) -> list[Mention]:
    """Join token tags into entity spans.

    A word takes the tag of its first token (sub-word pieces follow it). Then, over
    words: ``B-X`` always starts a span; ``I-X`` continues a span of type X that the
    previous word belongs to and starts one otherwise (so IOB1 taggers such as the
    CoNLL-03 BERT, which mostly emit ``I-``, work too); ``O`` or a type not in
    ``types`` closes it. A span runs from its first word's start to its last word's end,
    its score is the mean of its tokens' scores.

    Worked example, text ``"Barack Obama met Angela Merkel"``::

        Barack/B-PER Obama/I-PER met/O Ang/B-PER ##ela/I-LOC Merkel/I-PER
        -> words Barack=B-PER, Obama=I-PER, met=O, Angela=B-PER (first piece), Merkel=I-PER
        -> spans (0, 12) "Barack Obama" PER and (17, 30) "Angela Merkel" PER
    """
    words: list[list[Any]] = []  # [label, start, end, scores]
    last_word = None
    for token in tokens:
        if token.end <= token.start:
            continue  # special tokens ([CLS], [SEP], padding) have empty spans
        if words and token.word == last_word:
            words[-1][2] = max(words[-1][2], token.end)
            words[-1][3].append(token.score)
            continue
        words.append([token.label, token.start, token.end, [token.score]])
        last_word = token.word
    spans: list[list[Any]] = []  # [type, start, end, scores]
    open_span: list[Any] | None = None
    for label, start, end, scores in words:
        prefix, entity_type = split_label(label)
        if entity_type is None or entity_type not in types:
            open_span = None
            continue
        if prefix in ("B", "S") or open_span is None or open_span[0] != entity_type:
            open_span = [entity_type, start, end, list(scores)]
            spans.append(open_span)
        else:
            open_span[2] = end
            open_span[3].extend(scores)
        if prefix in ("E", "S"):
            open_span = None
    return [
        Mention(
            text=text[start:end],
            type=entity_type,
            start=start,
            end=end,
            name=text[start:end],
            score=sum(scores) / len(scores),
        )
        for entity_type, start, end, scores in spans
    ]


class HFNerRecognizer:
    """Named-entity recognition with a Hugging Face token-classification model.

    The model and its fast tokenizer run directly (not through ``pipeline``) because
    the tokenizer's word ids tell exactly which pieces form one word, whatever the
    tokenizer's sub-word marker; :func:`aggregate_tags` then builds the spans.
    Instructions longer than the model's maximum length are cut there.
    """

    name = "hf-ner"

    def __init__(
        self,
        model: Any = DEFAULT_NER_MODEL,
        tokenizer: Any = None,
        *,
        device: str = "cpu",
        batch_size: int = 16,
        min_score: float = 0.0,
        types: Sequence[str] = ENTITY_TYPES,
        trust_remote_code: bool = False,
    ) -> None:
        import torch  # noqa: F401  (fails early with a clear import error)
        from transformers import AutoModelForTokenClassification, AutoTokenizer

        if isinstance(model, str):
            try:
                tokenizer = tokenizer or AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
                model = AutoModelForTokenClassification.from_pretrained(
                    model, use_safetensors=True, trust_remote_code=trust_remote_code
                )
            except (OSError, ValueError) as error:
                raise ModelError(
                    f"cannot load the NER model {model!r} (safetensors weights required): {error}"
                ) from None
        if tokenizer is None or not getattr(tokenizer, "is_fast", False):
            raise ModelError("hf-ner needs a fast tokenizer (character offsets and word ids)")
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device
        self.batch_size = batch_size
        self.min_score = min_score
        self.types = tuple(types)
        self.id2label = {int(key): value for key, value in model.config.id2label.items()}

    def recognize(self, texts: Sequence[str]) -> list[list[Mention] | EntityError]:
        import torch

        results: list[list[Mention] | EntityError] = []
        for offset in range(0, len(texts), self.batch_size):
            batch = list(texts[offset : offset + self.batch_size])
            encoding = self.tokenizer(
                batch, return_offsets_mapping=True, truncation=True, padding=True, return_tensors="pt"
            )
            offsets = encoding.pop("offset_mapping")
            with torch.inference_mode():
                logits = self.model(
                    **{key: value.to(self.device) for key, value in encoding.items()}
                ).logits  # [B, T, labels]
            probabilities = logits.float().softmax(dim=-1).cpu()
            scores, label_ids = probabilities.max(dim=-1)  # [B, T]
            for row, text in enumerate(batch):
                word_ids = encoding.word_ids(row)
                tokens = [
                    TokenTag(
                        self.id2label[int(label_ids[row, position])],
                        int(offsets[row, position, 0]),
                        int(offsets[row, position, 1]),
                        word,
                        float(scores[row, position]),
                    )
                    for position, word in enumerate(word_ids)
                    if word is not None
                ]
                mentions = aggregate_tags(text, tokens, types=self.types)
                results.append([mention for mention in mentions if mention.score >= self.min_score])
        return results


# ---------------------------------------------------------------- llm

Complete = Callable[[str], str]


def load_prompt(name: str) -> str:
    """A versioned prompt kept in the package (``mmsafe/synthesis/prompts/<name>.txt``)."""
    try:
        return (resources.files("mmsafe.synthesis") / "prompts" / f"{name}.txt").read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"prompt {name!r} not found in mmsafe/synthesis/prompts") from None


def extract_json(answer: str) -> Any:
    """The first JSON array or object in a model's answer (code fences and chatter around it allowed)."""
    decoder = json.JSONDecoder()
    for index, character in enumerate(answer):
        if character in "[{":
            try:
                value, _ = decoder.raw_decode(answer, index)
                return value
            except json.JSONDecodeError:
                continue
    raise ValueError("no JSON array or object found")


def find_whole_word(text: str, needle: str) -> list[int]:
    """Start offsets of ``needle`` in ``text`` as a whole word (exact case)."""
    starts = []
    position = text.find(needle)
    while position >= 0:
        end = position + len(needle)
        before_ok = position == 0 or not _is_word_char(text[position - 1]) or not _is_word_char(needle[0])
        after_ok = end == len(text) or not _is_word_char(text[end]) or not _is_word_char(needle[-1])
        if before_ok and after_ok:
            starts.append(position)
        position = text.find(needle, position + 1)
    return starts


class LLMRecognizer:
    """Entities from a chat model that answers ``[{"text": ..., "type": ...}, ...]``.

    Every mention the model names is located in the instruction (whole word, exact
    spelling); names it invents that do not occur are ignored. An answer that is not
    JSON raises :class:`EntityError` for that instruction.
    """

    name = "llm"

    def __init__(self, complete: Complete, *, prompt: str = "entities_v1", types: Sequence[str] = ENTITY_TYPES) -> None:
        self.complete = complete
        self.prompt_name = prompt
        self.template = load_prompt(prompt)
        self.types = tuple(types)

    def parse(self, text: str, answer: str) -> list[Mention]:
        try:
            value = extract_json(answer)
        except ValueError:
            raise EntityError(f"the model's answer is not JSON: {answer[:120]!r}", field="entities") from None
        if isinstance(value, dict):
            value = value.get("entities", [])
        if not isinstance(value, list):
            raise EntityError(f"expected a JSON list of entities, got {type(value).__name__}", field="entities")
        mentions = []
        taken: set[int] = set()
        for item in value:
            if not isinstance(item, dict) or not isinstance(item.get("text"), str) or not item["text"].strip():
                continue
            entity_type = str(item.get("type", "")).upper()
            if entity_type not in self.types:
                continue
            surface = item["text"].strip()
            for start in find_whole_word(text, surface):
                span = set(range(start, start + len(surface)))
                if span & taken:
                    continue
                taken |= span
                mentions.append(
                    Mention(text=surface, type=entity_type, start=start, end=start + len(surface), name=surface)
                )
        return sorted(mentions, key=lambda mention: mention.start)

    def recognize(self, texts: Sequence[str]) -> list[list[Mention] | EntityError]:
        results: list[list[Mention] | EntityError] = []
        for text in texts:
            try:
                results.append(self.parse(text, self.complete(self.template.replace("{instruction}", text))))
            except EntityError as error:
                results.append(error)
        return results
