"""Rewriting: the entity's name gives way to a phrase that points at the image.

``template`` replaces every mention of the entity by a deictic phrase chosen by entity
type and fixes the grammar around it, giving ``mid_prompt``. The phrase is either one
fixed phrase per type (``deictic: single``; the paper's examples: "the person featured in the
image", "the site visible in the image", ...) or, as in the released data,
drawn per record from a pool of about 20 phrases per type (``deictic: pool``: "the
person shown", "the individual in the picture", "the locale represented", ...). The draw
is a hash of the seed, the record id and the type: the same input and seed give the
same phrases, whatever the batch order, resume point or process.

``model`` asks a language model to rephrase ``mid_prompt`` fluently with a versioned
prompt kept in ``mmsafe/synthesis/prompts`` and falls back to the template when the answer
still names the entity, is empty or runs too long.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from mmsafe.config import load_yaml
from mmsafe.data.records import IMAGE_TOKEN
from mmsafe.errors import ConfigError
from mmsafe.synthesis.entities import ENTITY_TYPES, load_prompt

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
COMPANY_WORDS = (
    "Inc",
    "Inc.",
    "Corp",
    "Corp.",
    "Corporation",
    "Company",
    "Co.",
    "Ltd",
    "Ltd.",
    "LLC",
    "GmbH",
    "plc",
    "AG",
    "SA",
)
COMPANY_PHRASE = "the company in the image"
COMPANY_POSSESSIVE_PHRASE = "the pictured company's"
#: Pool keys: the entity types, and COMPANY for ORG names with a company suffix.
POOL_KEYS = (*ENTITY_TYPES, "COMPANY")
#: Deictic phrases drawn per record (``deictic: pool``), by type; written in the style of
#: the released data's about 20 phrases per type, no phrase dominating.
DEFAULT_POOLS: dict[str, list[str]] = {
    "PER": [
        "the person shown",
        "the individual in the picture",
        "the person in the image",
        "the individual pictured",
        "the person depicted",
        "the figure in the photo",
        "the subject of the image",
        "the person featured in the image",
        "the individual shown in the photo",
        "the person portrayed",
        "the human figure shown",
        "the subject in the photo",
        "the person in this picture",
        "the individual depicted in the image",
        "the person captured in the photo",
        "the figure shown in the image",
        "the person seen in the picture",
        "the individual featured",
        "the person visible in the image",
        "the pictured individual",
    ],
    "ORG": [
        "the organization in the image",
        "the organization shown",
        "the corporate body featured",
        "the establishment in the picture",
        "the group depicted",
        "the institution shown in the image",
        "the organization pictured",
        "the body represented in the image",
        "the entity in the photo",
        "the organization portrayed",
        "the institution in the picture",
        "the group shown in the photo",
        "the organization whose logo is shown",
        "the enterprise in the image",
        "the association depicted",
        "the organization featured in the picture",
        "the establishment shown",
        "the institution depicted",
        "the organization represented",
        "the organization visible in the photo",
    ],
    "LOC": [
        "the place shown",
        "the locale represented",
        "the area portrayed",
        "the place in the scene",
        "the site visible in the image",
        "the location in the picture",
        "the place depicted",
        "the location shown in the photo",
        "the spot in the image",
        "the area in the picture",
        "the site pictured",
        "the location featured",
        "the place captured in the photo",
        "the region shown",
        "the setting of the image",
        "the destination pictured",
        "the place in this photo",
        "the location portrayed",
        "the locale in the image",
        "the area visible in the image",
    ],
    "MISC": [
        "the element depicted",
        "the item in the image",
        "the miscellaneous entity",
        "the thing shown",
        "the object in the image",
        "the item pictured",
        "the subject of the picture",
        "the thing depicted in the photo",
        "the item shown in the image",
        "the element in the picture",
        "the entity portrayed",
        "the object depicted",
        "the concept illustrated",
        "the thing in the photo",
        "the item featured",
        "the element shown in the image",
        "the thing represented",
        "the object pictured",
        "the entity in the picture",
        "the item visible in the photo",
    ],
    "COMPANY": [
        "the company in the image",
        "the company shown",
        "the business pictured",
        "the firm in the picture",
        "the corporation depicted",
        "the company featured",
        "the business in the photo",
        "the firm shown in the image",
        "the brand pictured",
        "the company whose logo is shown",
    ],
}
#: Possessive forms drawn with the same draw ("Obama's policies" -> "the depicted individual's policies").
DEFAULT_POSSESSIVE_POOLS: dict[str, list[str]] = {
    "PER": [
        "the pictured person's",
        "the depicted individual's",
        "the portrayed person's",
        "the photographed individual's",
        "the featured person's",
        "the pictured individual's",
        "the depicted person's",
        "the photographed person's",
    ],
    "ORG": [
        "the pictured organization's",
        "the depicted organization's",
        "the featured institution's",
        "the pictured group's",
        "the portrayed organization's",
        "the depicted institution's",
        "the pictured establishment's",
        "the featured organization's",
    ],
    "LOC": [
        "the pictured site's",
        "the depicted place's",
        "the featured location's",
        "the pictured area's",
        "the portrayed place's",
        "the depicted location's",
        "the pictured place's",
        "the photographed site's",
    ],
    "MISC": [
        "the pictured object's",
        "the depicted item's",
        "the featured element's",
        "the pictured item's",
        "the portrayed thing's",
        "the depicted object's",
        "the pictured thing's",
        "the illustrated item's",
    ],
    "COMPANY": [
        "the pictured company's",
        "the depicted company's",
        "the featured business's",
        "the pictured firm's",
        "the portrayed corporation's",
        "the depicted business's",
    ],
}
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


def draw(seed: int, key: str, kind: str) -> int:
    """A deterministic draw for one record: a hash of the seed, the record key and the
    pool key (independent of Python's hash seed, batch order and process)."""
    digest = hashlib.sha256(f"{seed}\x00{key}\x00{kind}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def check_pools(pools: Any, where: str) -> dict[str, list[str]]:
    """``pools`` as ``{type: [phrase, ...]}``; ConfigError naming ``where`` otherwise."""
    if not isinstance(pools, dict):
        raise ConfigError(
            f"{where}: expected a mapping of {', '.join(POOL_KEYS)} to lists of phrases, got {pools!r:.80}"
        )
    checked = {}
    for kind, phrases in pools.items():
        if kind not in POOL_KEYS:
            raise ConfigError(f"{where}.{kind}: unknown pool; expected one of {', '.join(POOL_KEYS)}")
        if isinstance(phrases, str):
            phrases = [phrases]
        if (
            not isinstance(phrases, list)
            or not phrases
            or not all(isinstance(phrase, str) and phrase.strip() for phrase in phrases)
        ):
            raise ConfigError(f"{where}.{kind}: expected a non-empty list of non-empty phrases, got {phrases!r:.80}")
        checked[kind] = [phrase.strip() for phrase in phrases]
    return checked


def load_pools_file(path: str | Path) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """``(pools, possessive_pools)`` from a YAML or JSON file.

    The file maps types (PER, ORG, LOC, MISC, COMPANY) to lists of phrases; an optional
    ``possessive`` key maps types to lists of possessive forms ("the pictured person's").
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"rewrite.pools_file: {path}: file not found (expected YAML or JSON: {{PER: [phrase, ...], ...}})"
        )
    try:
        text = path.read_text(encoding="utf-8")
        data = (
            json.loads(text)
            if path.suffix.lower() == ".json"
            else load_yaml(text, source=f"rewrite.pools_file: {path}")
        )
    except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"rewrite.pools_file: {path}: not valid YAML/JSON ({error})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"rewrite.pools_file: {path}: expected a mapping {{PER: [phrase, ...], ...}}")
    data = dict(data)
    possessive = data.pop("possessive", {}) or {}
    where = f"rewrite.pools_file ({path})"
    return check_pools(data, where), check_pools(possessive, f"{where}.possessive")


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
    """Deictic phrase per entity type; ORG names with a company suffix become "the company".

    ``pools`` None: the one phrase of ``phrases`` per type (``deictic: single``). A
    mapping (``deictic: pool``): a phrase drawn per record from ``pools[type]`` (types
    it lacks use :data:`DEFAULT_POOLS`), seeded by ``seed`` and the record ``key``.
    """

    phrases: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_PHRASES))
    possessive_phrases: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_POSSESSIVE_PHRASES))
    pools: dict[str, list[str]] | None = None
    possessive_pools: dict[str, list[str]] | None = None
    seed: int = 0
    name: str = "template"

    def phrase_for(self, entity: str, entity_type: str, key: str = "") -> tuple[str, str]:
        company = entity_type == "ORG" and bool(entity.split()) and entity.split()[-1] in COMPANY_WORDS
        if self.pools is None:
            if company:
                return COMPANY_PHRASE, COMPANY_POSSESSIVE_PHRASE
            phrase = self.phrases.get(entity_type, DEFAULT_PHRASES["MISC"])
            return phrase, self.possessive_phrases.get(entity_type, f"{phrase}'s")
        kind = "COMPANY" if company else entity_type
        pool = self.pools.get(kind) or DEFAULT_POOLS.get(kind) or DEFAULT_POOLS["MISC"]
        possessive_pool = (
            (self.possessive_pools or {}).get(kind)
            or DEFAULT_POSSESSIVE_POOLS.get(kind)
            or DEFAULT_POSSESSIVE_POOLS["MISC"]
        )
        index = draw(self.seed, key or entity, kind)
        return pool[index % len(pool)], possessive_pool[index % len(possessive_pool)]

    def mid_prompt(
        self, instruction: str, entity: str, entity_type: str, spans: Sequence[Span], key: str = ""
    ) -> tuple[str, str]:
        """``(mid_prompt, phrase)``; ``key`` (the record id) seeds the pool draw (default:
        the instruction and the entity)."""
        phrase, possessive = self.phrase_for(entity, entity_type, key or f"{instruction}\x00{entity}")
        return replace_spans(instruction, spans, phrase, possessive), phrase

    def rewrite(self, instruction: str, entity: str, entity_type: str, spans: Sequence[Span], key: str = "") -> Rewrite:
        mid_prompt, phrase = self.mid_prompt(instruction, entity, entity_type, spans, key)
        return Rewrite(mid_prompt=mid_prompt, replacement=phrase, text=mid_prompt, method=self.name)


class Rewriter(Protocol):
    name: str

    def rewrite(
        self, instruction: str, entity: str, entity_type: str, spans: Sequence[Span], key: str = ""
    ) -> Rewrite: ...


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
    :mod:`mmsafe.synthesis.complete`). The answer is rejected, and ``mid_prompt`` used, when
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

    def rewrite(self, instruction: str, entity: str, entity_type: str, spans: Sequence[Span], key: str = "") -> Rewrite:
        mid_prompt, phrase = self.template.mid_prompt(instruction, entity, entity_type, spans, key)
        prompt = (
            self.prompt_text.replace("{replacement}", phrase)
            .replace("{entity_kind}", ENTITY_KINDS.get(entity_type, "thing"))
            .replace("{mid_prompt}", mid_prompt)
        )
        answer = clean_model_answer(self.complete(prompt))
        reason = self.check(answer, mid_prompt, entity)
        if reason is not None:
            return Rewrite(
                mid_prompt=mid_prompt, replacement=phrase, text=mid_prompt, method="template", fallback_reason=reason
            )
        return Rewrite(mid_prompt=mid_prompt, replacement=phrase, text=answer, method=f"model:{self.prompt}")
