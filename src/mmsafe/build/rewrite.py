"""Rewriting: the entity's name gives way to a phrase that points at the image.

``template`` replaces every mention of the entity by a deictic phrase chosen by entity
type (METHOD.md §1: "the person featured in the image", "the site visible in the
image", ...) and fixes the grammar around it, giving ``mid_prompt``. ``model`` asks a
language model to rephrase ``mid_prompt`` fluently with a versioned prompt kept in
``mmsafe/build/prompts`` and falls back to the template when the answer still names the
entity, is empty or runs too long.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from mmsafe.build.entities import load_prompt
from mmsafe.data.records import IMAGE_TOKEN

#: The phrase that replaces an entity, by type.
DEFAULT_PHRASES = {
    "PER": "the person featured in the image",
    "ORG": "the organization in the image",
    "LOC": "the site visible in the image",
    "MISC": "the object in the image",
}
#: The phrase for a possessive mention ("Obama's policies" -> "the pictured person's policies").
DEFAULT_POSSESSIVE_PHRASES = {
    "PER": "the pictured person's",
    "ORG": "the pictured organization's",
    "LOC": "the pictured site's",
    "MISC": "the pictured object's",
}
#: ORG names ending in one of these words are companies.
COMPANY_WORDS = ("Inc", "Inc.", "Corp", "Corp.", "Corporation", "Company", "Co.", "Ltd", "Ltd.", "LLC", "GmbH", "plc", "AG", "SA")
COMPANY_PHRASE = "the company in the image"
COMPANY_POSSESSIVE_PHRASE = "the pictured company's"
#: What the rephrasing prompt calls each type.
ENTITY_KINDS = {"PER": "person", "ORG": "organization", "LOC": "place", "MISC": "thing"}

# A title before a name goes with the name: "Mr. Obama" -> "the person featured in the image".
_TITLE_BEFORE = re.compile(r"(?:^|(?<=\W))(?:Mr|Mrs|Ms|Dr|Prof|Sir|President)\.?\s+$")
_ARTICLE_BEFORE = re.compile(r"(?:^|(?<=\W))(the|a|an)\s+$", re.IGNORECASE)
_POSSESSIVE_AFTER = re.compile(r"^['’]s(?!\w)")
_BARE_APOSTROPHE_AFTER = re.compile(r"^['’](?!\w)")
# Empty text, a sentence end or a line break, then optional opening quotes/brackets; or a
# double quote opened after a space (quoted speech starts a sentence).
_SENTENCE_END = re.compile(r"(?:(?:^|[.!?:]\s*|\n\s*)[\"'“‘(]*|\s[\"“])$")


@dataclass(frozen=True)
class Span:
    start: int
    end: int


def is_sentence_start(before: str) -> bool:
    """True when text ``before`` a position ends a sentence (or is empty): capitalise there."""
    return bool(_SENTENCE_END.search(before))


def capitalize_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def replace_spans(text: str, spans: Sequence[Span], phrase: str, possessive_phrase: str) -> str:
    """Replace each span of ``text`` by ``phrase``, fixing the grammar around it.

    - an article right before the mention is dropped, since the phrase brings its own:
      "the United Nations" -> "the organization in the image", not "the the ...";
    - a title right before the mention goes too: "Mr. Obama" -> "the person ...";
    - a possessive ("Obama's", "Paris’s", "Texas'") takes ``possessive_phrase``:
      "Obama's policies" -> "the pictured person's policies";
    - at the start of a sentence the phrase is capitalised.

    Spans are replaced right to left so earlier offsets stay valid.
    """
    for span in sorted(spans, key=lambda span: span.start, reverse=True):
        before, mention, after = text[: span.start], text[span.start : span.end], text[span.end :]
        replacement = phrase
        possessive = _POSSESSIVE_AFTER.match(after)
        if possessive is None and mention.endswith("s"):
            possessive = _BARE_APOSTROPHE_AFTER.match(after)
        if possessive is not None:
            replacement = possessive_phrase
            after = after[possessive.end() :]
        title = _TITLE_BEFORE.search(before)
        if title is not None:
            before = before[: title.start()]
        if replacement.split(" ", 1)[0].lower() in ("the", "a", "an"):
            article = _ARTICLE_BEFORE.search(before)
            if article is not None:
                before = before[: article.start()]
        if is_sentence_start(before):
            replacement = capitalize_first(replacement)
        text = before + replacement + after
    return text


@dataclass
class Rewrite:
    """The rewritten last instruction: ``mid_prompt`` after plain replacement, ``text`` final."""

    mid_prompt: str
    replacement: str
    text: str
    method: str
    fallback_reason: str | None = None


@dataclass
class TemplateRewriter:
    """Deictic phrase per entity type; ORG names with a company suffix become "the company"."""

    phrases: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_PHRASES))
    possessive_phrases: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_POSSESSIVE_PHRASES))
    name: str = "template"

    def phrase_for(self, entity: str, entity_type: str) -> tuple[str, str]:
        if entity_type == "ORG" and entity.split()[-1] in COMPANY_WORDS:
            return COMPANY_PHRASE, COMPANY_POSSESSIVE_PHRASE
        phrase = self.phrases.get(entity_type, DEFAULT_PHRASES["MISC"])
        return phrase, self.possessive_phrases.get(entity_type, f"{phrase}'s")

    def mid_prompt(self, instruction: str, entity: str, entity_type: str, spans: Sequence[Span]) -> tuple[str, str]:
        phrase, possessive = self.phrase_for(entity, entity_type)
        return replace_spans(instruction, spans, phrase, possessive), phrase

    def rewrite(self, instruction: str, entity: str, entity_type: str, spans: Sequence[Span]) -> Rewrite:
        mid_prompt, phrase = self.mid_prompt(instruction, entity, entity_type, spans)
        return Rewrite(mid_prompt=mid_prompt, replacement=phrase, text=mid_prompt, method=self.name)


class Rewriter(Protocol):
    name: str

    def rewrite(self, instruction: str, entity: str, entity_type: str, spans: Sequence[Span]) -> Rewrite: ...


def names_entity(text: str, entity: str) -> bool:
    """Whether ``text`` still names ``entity``: the whole name, or one of its words of 4+
    letters that starts with a capital (so "Obama" counts for "Barack Obama"), as a whole
    word and ignoring case."""
    candidates = [entity] + [word for word in re.findall(r"\w+", entity) if len(word) >= 4 and word[0].isupper()]
    folded = text.casefold()
    return any(re.search(rf"(?<!\w){re.escape(candidate.casefold())}(?!\w)", folded) for candidate in candidates)


def clean_model_answer(answer: str) -> str:
    """The rewritten instruction from a model's answer: one label line, quotes and ``<image>`` removed."""
    text = answer.replace(IMAGE_TOKEN, "").strip()
    text = re.sub(r"^(?:rewritten instruction|instruction|rewritten)\s*:\s*", "", text, flags=re.IGNORECASE).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'“”":
        text = text[1:-1].strip()
    if len(text) >= 2 and text[0] == "“" and text[-1] == "”":
        text = text[1:-1].strip()
    return text


@dataclass
class ModelRewriter:
    """Fluent rephrasing by a model, with the template as the safety net.

    ``complete(prompt) -> answer`` is any text completion function (see
    :mod:`mmsafe.build.complete`). The answer is rejected, and ``mid_prompt`` used, when
    it is empty, still names the entity, or is longer than ``max_length_ratio`` times
    ``mid_prompt`` plus 20 characters.
    """

    complete: Callable[[str], str]
    template: TemplateRewriter = field(default_factory=TemplateRewriter)
    prompt: str = "rewrite_v1"
    max_length_ratio: float = 2.0
    name: str = "model"

    def __post_init__(self) -> None:
        self.prompt_text = load_prompt(self.prompt)

    def check(self, answer: str, mid_prompt: str, entity: str) -> str | None:
        """Why ``answer`` cannot be used (None when it can)."""
        if not answer:
            return "empty"
        if names_entity(answer, entity):
            return "names the entity"
        if len(answer) > self.max_length_ratio * len(mid_prompt) + 20:
            return "too long"
        return None

    def rewrite(self, instruction: str, entity: str, entity_type: str, spans: Sequence[Span]) -> Rewrite:
        mid_prompt, phrase = self.template.mid_prompt(instruction, entity, entity_type, spans)
        prompt = (
            self.prompt_text.replace("{replacement}", phrase)
            .replace("{entity_kind}", ENTITY_KINDS.get(entity_type, "thing"))
            .replace("{mid_prompt}", mid_prompt)
        )
        answer = clean_model_answer(self.complete(prompt))
        reason = self.check(answer, mid_prompt, entity)
        if reason is not None:
            return Rewrite(mid_prompt=mid_prompt, replacement=phrase, text=mid_prompt, method="template", fallback_reason=reason)
        return Rewrite(mid_prompt=mid_prompt, replacement=phrase, text=answer, method=f"model:{self.prompt}")
