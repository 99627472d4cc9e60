"""``build_data``: text preference dialogues -> multimodal preference records + images.

For each dialogue (parse stage, :mod:`mmsafe.synthesis.sources`): find the entities of the
last user instruction, find one image per entity, drop entities without an image and
duplicates, cap the records per dialogue (seeded), rewrite the instruction so that it
points at the image (a deictic phrase drawn per record from a pool per type, seeded by
``seed`` and the record id, or one fixed phrase per type), and emit one preference record
per remaining entity. HH-RLHF dialogues with two consecutive turns of one speaker are
merged into one turn and counted (``turns_merged``), never dropped.

Output folder::

    records.jsonl        preference records (image paths images/<name>, relative to this folder)
    images/              the images, under safe file names
    summary.json         counts (by entity type, by number of turns, what was dropped or merged)
    build_config.yaml    the resolved configuration
    .build-state.jsonl   one line per finished dialogue (what makes a rerun resume)

Resuming: records are appended and flushed one batch of dialogues at a time, then the
dialogues are marked done. Dialogues are keyed by their content (a hash of the history,
instruction, chosen and rejected texts; the n-th identical copy in a file gets its own
key), never by their line: a rerun after a crash, or on an input that gained, lost or
moved lines, skips the dialogues done and builds the rest; records it had already written
are recognised by their id and content and not written twice. A new dialogue whose id
(e.g. ``<file>-<line>`` for sources without ids) names records of other content gets
record ids with a content suffix (``<id>-<entity>-<key8>``), so nothing already built is
overwritten or shadowed; a dialogue whose id was built before with other content (a line
edited in place) is counted (``dialogues_changed``) and its old records are kept. A dialogue for which an image source
failed is not marked done, so the next run tries it again; a recognizer or rewriting
model that cannot be reached stops the build (rerun to go on), while an answer it cannot
parse is counted and the dialogue marked done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mmsafe.config import read_yaml, save_config, to_dict
from mmsafe.data.jsonl import ResumableJsonlWriter, iter_lines, read_jsonl
from mmsafe.data.records import IMAGE_TOKEN, Message, PreferenceRecord
from mmsafe.data.stats import turn_bucket
from mmsafe.errors import ConfigError, DataError, ImageError
from mmsafe.progress import progress, progress_enabled
from mmsafe.synthesis.config import BuildConfig
from mmsafe.synthesis.entities import (
    ENTITY_TYPES,
    EntityError,
    EntityRecognizer,
    Gazetteer,
    HFNerRecognizer,
    LLMRecognizer,
    Mention,
)
from mmsafe.synthesis.images import (
    ImageChain,
    ImageIndex,
    ImageSource,
    ImageStore,
    LocalImageSource,
    WikipediaImageSource,
)
from mmsafe.synthesis.rewrite import ModelRewriter, Rewrite, Rewriter, Span, TemplateRewriter
from mmsafe.synthesis.sources import Dialogue, read_dialogues

logger = logging.getLogger(__name__)

RECORDS_FILE = "records.jsonl"
IMAGE_DIR = "images"
STATE_FILE = ".build-state.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "build_config.yaml"
RELEASED_FILE = "mmsafe-po.json"
#: Settings a rerun into the same folder may change: they do not change what is written.
RESUME_FREE_SETTINGS = {
    "batch_size",
    "on_bad_line",
    "export_released",
    "max_dialogues",
    "entities.hf_ner.device",
    "entities.hf_ner.batch_size",
    "images.wikipedia.min_interval_s",
    "images.wikipedia.max_retries",
    "images.wikipedia.backoff_s",
    "images.wikipedia.max_backoff_s",
    "images.wikipedia.timeout",
    "images.wikipedia.deadline",
    "images.wikipedia.max_body_bytes",
    "entities.llm.deadline",
    "entities.llm.max_body_bytes",
    "rewrite.model.deadline",
    "rewrite.model.max_body_bytes",
}


# ---------------------------------------------------------------- stages by name


@dataclass
class Stages:
    """The three replaceable stages of one build."""

    recognizer: EntityRecognizer
    images: ImageChain
    rewriter: Rewriter


def _needs_index(index: ImageIndex | None, what: str) -> ImageIndex:
    if index is None:
        raise ConfigError(f"{what} needs images.index (a folder or CSV/JSON index of entity images; --image-index)")
    return index


def _gazetteer(config: BuildConfig, index: ImageIndex | None) -> EntityRecognizer:
    names = _needs_index(index, "entities.method gazetteer").typed_names(config.entities.types)
    return Gazetteer(names, case_sensitive=config.entities.gazetteer.case_sensitive)


def _hf_ner(config: BuildConfig, index: ImageIndex | None) -> EntityRecognizer:
    options = config.entities.hf_ner
    return HFNerRecognizer(
        options.model,
        device=options.device,
        batch_size=options.batch_size,
        min_score=options.min_score,
        types=config.entities.types,
    )


def _llm(config: BuildConfig, index: ImageIndex | None) -> EntityRecognizer:
    from mmsafe.synthesis.complete import make_completer

    options = config.entities.llm
    return LLMRecognizer(make_completer(options), prompt=options.prompt or "entities_v1", types=config.entities.types)


def _local(config: BuildConfig, index: ImageIndex | None, out: Path) -> ImageSource:
    return LocalImageSource(_needs_index(index, "images.sources local"))


def _wikipedia(config: BuildConfig, index: ImageIndex | None, out: Path) -> ImageSource:
    options = config.images.wikipedia
    return WikipediaImageSource(
        options.cache_dir or out / "cache" / "wikipedia",
        api_url=options.api_url,
        user_agent=options.user_agent,
        thumb_size=options.thumb_size,
        min_interval_s=options.min_interval_s,
        max_retries=options.max_retries,
        backoff_s=options.backoff_s,
        max_backoff_s=options.max_backoff_s,
        timeout=options.timeout,
        deadline=options.deadline,
        max_body_bytes=options.max_body_bytes,
    )


def template_rewriter(config: BuildConfig) -> TemplateRewriter:
    """The template of ``config.rewrite``: one phrase per type, or a seeded pool draw."""
    options = config.rewrite
    pooled = options.deictic == "pool"
    return TemplateRewriter(
        phrases=dict(options.phrases),
        possessive_phrases=dict(options.possessive_phrases),
        pools={kind: list(phrases) for kind, phrases in options.pools.items()} if pooled else None,
        possessive_pools={kind: list(phrases) for kind, phrases in options.possessive_pools.items()}
        if pooled
        else None,
        seed=config.seed,
    )


def _template(config: BuildConfig) -> Rewriter:
    return template_rewriter(config)


def _model(config: BuildConfig) -> Rewriter:
    from mmsafe.synthesis.complete import make_completer

    options = config.rewrite.model
    template = template_rewriter(config)
    return ModelRewriter(
        make_completer(options),
        template=template,
        prompt=options.prompt or "rewrite_v1",
        max_length_ratio=config.rewrite.max_length_ratio,
    )


#: Stage factories by name: open sets, so plugins can add their own.
RECOGNIZERS: dict[str, Callable[[BuildConfig, ImageIndex | None], EntityRecognizer]] = {
    "gazetteer": _gazetteer,
    "hf-ner": _hf_ner,
    "llm": _llm,
}
IMAGE_SOURCES: dict[str, Callable[[BuildConfig, ImageIndex | None, Path], ImageSource]] = {
    "local": _local,
    "wikipedia": _wikipedia,
}
REWRITERS: dict[str, Callable[[BuildConfig], Rewriter]] = {"template": _template, "model": _model}


def _lookup(registry: dict[str, Any], name: str, key: str) -> Any:
    if name not in registry:
        raise ConfigError(f"{key}: unknown {name!r}; known: {', '.join(registry)}")
    return registry[name]


def make_stages(config: BuildConfig) -> Stages:
    """The stages the config names (models and indexes loaded now)."""
    recognizer_factory = _lookup(RECOGNIZERS, config.entities.method, "entities.method")
    source_factories = [_lookup(IMAGE_SOURCES, name, "images.sources") for name in config.images.sources]
    rewriter_factory = _lookup(REWRITERS, config.rewrite.method, "rewrite.method")
    index = ImageIndex.load(config.images.index, types=ENTITY_TYPES) if config.images.index else None
    out = Path(config.out)
    return Stages(
        recognizer=recognizer_factory(config, index),
        images=ImageChain([factory(config, index, out) for factory in source_factories]),
        rewriter=rewriter_factory(config),
    )


# ---------------------------------------------------------------- per dialogue


@dataclass
class EntityGroup:
    """One entity of an instruction with all its mentions (first mention first)."""

    name: str
    type: str
    spans: list[Span]


def group_mentions(mentions: Iterable[Mention], types: Iterable[str]) -> list[EntityGroup]:
    """Mentions of the same name form one entity (typed by its first mention), in order of appearance."""
    allowed = set(types)
    groups: dict[str, EntityGroup] = {}
    for mention in sorted(mentions, key=lambda mention: mention.start):
        if mention.type not in allowed:
            continue
        group = groups.get(mention.name)
        if group is None:
            group = groups[mention.name] = EntityGroup(mention.name, mention.type, [])
        group.spans.append(Span(mention.start, mention.end))
    return list(groups.values())


def slug(text: str) -> str:
    """``"Barack Obama"`` -> ``"barack-obama"`` (for record ids)."""
    return re.sub(r"[^a-z0-9]+", "-", text.casefold()).strip("-") or "entity"


def content_key(
    history: list[Message], instruction: str, entity: str, image: str, chosen: str, rejected: list[str]
) -> str:
    """What makes two records duplicates: same dialogue text, entity, image and answers."""
    payload = json.dumps(
        [[message.to_dict() for message in history], instruction, entity, image, chosen, rejected], ensure_ascii=False
    )
    return hashlib.sha1(payload.encode("utf-8")).hexdigest()


def dialogue_key(dialogue: Dialogue) -> str:
    """A dialogue's content key: its history, instruction and answers (not its line or id)."""
    payload = json.dumps(
        [[message.to_dict() for message in dialogue.history], dialogue.instruction, dialogue.chosen, dialogue.rejected],
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def record_content_key(row: dict[str, Any]) -> str:
    history = [Message(message["role"], message["content"]) for message in row["messages"][:-1]]
    return content_key(
        history, row["meta"]["text_prompt"], row["meta"]["entity"], row["image"], row["chosen"], row["rejected"]
    )


def emit_record(
    dialogue: Dialogue,
    record_id: str,
    group: EntityGroup,
    image: str,
    image_source: str,
    rewrite: Rewrite,
    record_type: str,
) -> PreferenceRecord:
    """The preference record for one (dialogue, entity): ``<image>\\n`` + the rewritten instruction."""
    meta: dict[str, Any] = {
        "type": record_type,
        "entity": group.name,
        "entity_type": group.type,
        "replacement": rewrite.replacement,
        "text_prompt": dialogue.instruction,
        "mid_prompt": rewrite.mid_prompt,
        "rewrite": rewrite.method,
        "image_source": image_source,
        "source_file": dialogue.file,
        "source_line": dialogue.line,
        "source_id": dialogue.id,
    }
    if rewrite.fallback_reason is not None:
        meta["rewrite_fallback"] = rewrite.fallback_reason
    return PreferenceRecord(
        id=record_id,
        messages=[*dialogue.history, Message("user", f"{IMAGE_TOKEN}\n{rewrite.text}")],
        image=image,
        chosen=dialogue.chosen,
        rejected=[dialogue.rejected],
        rejected_sources=["human"],
        meta=meta,
    )


# ---------------------------------------------------------------- summary


@dataclass
class BuildSummary:
    """What a build did. Totals cover every run into the same output folder."""

    input: str
    out: str
    dialogues_done: int = 0
    dialogues_with_records: int = 0
    entities: int = 0
    entities_without_image: int = 0
    duplicates: int = 0
    capped: int = 0
    entity_errors: int = 0
    #: HH-RLHF turns joined to the turn before them (same speaker twice in a row), and
    #: the dialogues that had such turns: kept, never dropped for turn order.
    turns_merged: int = 0
    dialogues_with_merged_turns: int = 0
    records: int = 0
    images: int = 0
    by_entity_type: dict[str, int] = field(default_factory=dict)
    by_turns: dict[str, int] = field(default_factory=dict)
    rewrite_fallbacks: dict[str, int] = field(default_factory=dict)
    # This run only:
    dialogues_resumed: int = 0
    dialogues_processed: int = 0
    records_written: int = 0
    dialogues_left_to_retry: int = 0
    dialogues_changed: int = 0
    image_source_errors: dict[str, int] = field(default_factory=dict)
    bad_lines: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """A plain-text report in the spirit of the paper's dataset statistics."""
        lines = [
            f"dialogues done        {self.dialogues_done:>8}   (this run: {self.dialogues_processed} processed, {self.dialogues_resumed} already done)",
            f"  with records        {self.dialogues_with_records:>8}",
            f"entities found        {self.entities:>8}",
            f"  without image       {self.entities_without_image:>8}   (dropped)",
            f"  duplicates          {self.duplicates:>8}   (dropped)",
            f"  over the cap        {self.capped:>8}   (dropped)",
            f"recognizer errors     {self.entity_errors:>8}",
            f"merged turns          {self.turns_merged:>8}   (same speaker twice in a row, joined into one turn; in {self.dialogues_with_merged_turns} dialogues, kept)",
            f"bad input lines       {len(self.bad_lines):>8}",
            f"records               {self.records:>8}   (this run: {self.records_written})",
            f"images                {self.images:>8}",
            "by entity type        " + ", ".join(f"{name} {count}" for name, count in self.by_entity_type.items()),
            "by number of turns    " + ", ".join(f"{name}: {count}" for name, count in self.by_turns.items()),
        ]
        if self.rewrite_fallbacks:
            lines.append(
                "rewrite fallbacks     "
                + ", ".join(f"{name} {count}" for name, count in self.rewrite_fallbacks.items())
            )
        if self.image_source_errors:
            lines.append(
                "image source errors   "
                + ", ".join(f"{name} {count}" for name, count in self.image_source_errors.items())
            )
        if self.dialogues_changed:
            lines.append(
                f"changed dialogues     {self.dialogues_changed:>8}   (an id built before from other text: a line inserted above or edited; built anew, old records kept)"
            )
        if self.dialogues_left_to_retry:
            lines.append(
                f"left for a rerun       {self.dialogues_left_to_retry:>7}   (an image source failed; rerun to retry them)"
            )
        return "\n".join(lines)


def summarize_outputs(summary: BuildSummary, records_path: Path, state_path: Path) -> BuildSummary:
    """Fill the totals of ``summary`` from the output files (all runs)."""
    by_type: Counter[str] = Counter()
    by_turns: Counter[str] = Counter()
    images: set[str] = set()
    if records_path.exists():
        for _, row in read_jsonl(records_path):
            summary.records += 1
            by_type[row["meta"]["entity_type"]] += 1
            by_turns[turn_bucket(sum(1 for message in row["messages"] if message["role"] == "user"))] += 1
            images.add(row["image"])
    fallbacks: Counter[str] = Counter()
    if state_path.exists():
        for _, row in read_jsonl(state_path):
            summary.dialogues_done += 1
            summary.dialogues_with_records += row["records"] > 0
            summary.entities += row["entities"]
            summary.entities_without_image += row["no_image"]
            summary.duplicates += row["duplicates"]
            summary.capped += row["capped"]
            summary.entity_errors += row["entity_error"] is not None
            summary.turns_merged += row.get("merged", 0)
            summary.dialogues_with_merged_turns += row.get("merged", 0) > 0
            fallbacks.update(row.get("fallbacks", {}))
    summary.images = len(images)
    summary.by_entity_type = {
        name: by_type[name] for name in (*ENTITY_TYPES, *sorted(set(by_type) - set(ENTITY_TYPES))) if by_type[name]
    }
    summary.by_turns = {name: by_turns[name] for name in sorted(by_turns, key=lambda bucket: int(bucket.rstrip("+")))}
    summary.rewrite_fallbacks = dict(fallbacks)
    return summary


# ---------------------------------------------------------------- the builder


class Builder:
    """One build into one output folder; :func:`build_data` is the usual entry point."""

    def __init__(self, config: BuildConfig, stages: Stages) -> None:
        self.config = config
        self.stages = stages
        self.out = Path(config.out)
        self.store = ImageStore(self.out / IMAGE_DIR, verify=config.images.verify)
        self.records = ResumableJsonlWriter(self.out / RECORDS_FILE, key=lambda row: row["id"])
        # State lines written before content keys are keyed by the dialogue id.
        self.state = ResumableJsonlWriter(self.out / STATE_FILE, key=lambda row: row.get("key") or row["dialogue"])
        self.built_ids: set[str] = set()
        if self.state.path.exists():
            self.built_ids = {
                row["dialogue"] for _, row in read_jsonl(self.state.path) if isinstance(row, dict) and "dialogue" in row
            }
        self.seen_content: set[str] = set()
        self.content_of_id: dict[str, str] = {}
        if self.records.path.exists():
            for line_number, row in read_jsonl(self.records.path):
                try:
                    key = record_content_key(row)
                except (KeyError, TypeError, IndexError):
                    raise DataError(
                        "existing record lacks meta.text_prompt / meta.entity; is this a build-data output folder?",
                        file=str(self.records.path),
                        record=f"line {line_number}",
                    ) from None
                self.seen_content.add(key)
                self.content_of_id[row["id"]] = key
        self.changed = 0
        #: The content key of each dialogue of this run, by dialogue id.
        self.keys: dict[str, str] = {}
        self.legacy_ids = (
            {
                row["dialogue"]
                for _, row in read_jsonl(self.state.path)
                if isinstance(row, dict) and "dialogue" in row and not row.get("key")
            }
            if self.state.path.exists()
            else set()
        )
        self.images: dict[tuple[str, str], tuple[tuple[str, str] | None, bool]] = {}
        self.image_errors: Counter[str] = Counter()
        self.records_written = 0
        self.left_to_retry = 0

    def _legacy_done(self, dialogue_id: str) -> bool:
        """Done by a state line written before content keys (keyed by the dialogue id alone)."""
        return dialogue_id in self.legacy_ids

    def image_for(self, group: EntityGroup) -> tuple[tuple[str, str] | None, bool]:
        """``((images/<name>, relative to the output folder, source) or None, lookup failed)``; once per entity and run."""
        key = (group.name, group.type)
        if key not in self.images:
            found, failed = self.stages.images.lookup(group.name, group.type)
            stored = None
            if found is not None:
                try:
                    # Relative to the output folder (images/<name>), so that records.jsonl reads
                    # with the default image root of every command: the data file's folder.
                    stored = (f"{IMAGE_DIR}/{self.store.store(found)}", found.source)
                except ImageError as error:
                    self.image_errors[f"{found.source} (unreadable image)"] += 1
                    logger.warning("dropping the image of %r: %s", group.name, error)
            self.images[key] = (stored, failed and stored is None)
        return self.images[key]

    def dialogue_records(
        self, dialogue: Dialogue, mentions: list[Mention]
    ) -> tuple[list[PreferenceRecord], dict[str, Any]]:
        """The records of one dialogue and its state line (counts of what was dropped).

        ``state["retry"]`` is True when an image source failed for one of its entities:
        the dialogue is then not marked done, so a rerun tries again (records already
        written are recognised by id and neither counted as duplicates nor written twice).
        """
        state: dict[str, Any] = {
            "dialogue": dialogue.id,
            "key": self.keys.get(dialogue.id) or dialogue_key(dialogue),
            "line": dialogue.line,
            "entities": 0,
            "no_image": 0,
            "duplicates": 0,
            "capped": 0,
            "records": 0,
            "entity_error": None,
            "fallbacks": {},
            "merged": dialogue.merged_turns,
        }
        groups = group_mentions(mentions, self.config.entities.types)
        state["entities"] = len(groups)
        record_ids: list[str] = []
        for group in groups:
            record_id = f"{dialogue.id}-{slug(group.name)}"
            record_ids.append(record_id if record_id not in record_ids else f"{record_id}-{group.spans[0].start}")
        candidates: list[tuple[EntityGroup, str, tuple[str, str], str]] = []
        keys_here: set[str] = set()
        for group, record_id in zip(groups, record_ids, strict=True):
            image, failed = self.image_for(group)
            if image is None:
                state["no_image"] += 1
                state["retry"] = state.get("retry", False) or failed
                continue
            key = content_key(
                dialogue.history, dialogue.instruction, group.name, image[0], dialogue.chosen, [dialogue.rejected]
            )
            if self.content_of_id.get(record_id, key) != key:
                # The id names a record of other content (a line inserted above moved this
                # id onto another dialogue, or the line was edited): keep that one, use a new id.
                record_id = f"{record_id}-{key[:8]}"
            written_before = record_id in self.records
            if key in keys_here or (key in self.seen_content and not written_before):
                state["duplicates"] += 1
                continue
            keys_here.add(key)
            candidates.append((group, record_id, image, key))
        cap = self.config.max_records_per_dialogue
        if cap and len(candidates) > cap:
            # Seeded by the dialogue id too, so the choice does not depend on batch order.
            rng = random.Random(f"{self.config.seed}:{dialogue.id}")
            keep = sorted(rng.sample(range(len(candidates)), cap))
            state["capped"] = len(candidates) - cap
            candidates = [candidates[index] for index in keep]
        records = []
        fallbacks: Counter[str] = Counter()
        for group, record_id, (image_path, source), key in candidates:
            # The record id seeds the deictic phrase draw: same phrase on a resume or in parallel.
            rewrite = self.stages.rewriter.rewrite(
                dialogue.instruction, group.name, group.type, group.spans, key=record_id
            )
            if rewrite.fallback_reason is not None:
                fallbacks[rewrite.fallback_reason] += 1
            records.append(emit_record(dialogue, record_id, group, image_path, source, rewrite, self.config.type))
            self.seen_content.add(key)
            self.content_of_id[record_id] = key
        state["records"] = len(records)
        state["fallbacks"] = dict(fallbacks)
        return records, state

    def process(self, batch: list[Dialogue]) -> None:
        """One batch: recognise, build, append the records, then mark the dialogues done."""
        if not batch:
            return
        results = self.stages.recognizer.recognize([dialogue.instruction for dialogue in batch])
        if len(results) != len(batch):
            raise ConfigError(
                f"entity recognizer {self.stages.recognizer.name!r} returned {len(results)} results for {len(batch)} instructions"
            )
        rows: list[dict[str, Any]] = []
        states: list[dict[str, Any]] = []
        for dialogue, result in zip(batch, results, strict=True):
            if isinstance(result, EntityError):
                logger.warning(
                    "%s:line %d: entity recognition failed: %s", dialogue.file, dialogue.line, result.message
                )
                states.append(
                    {
                        "dialogue": dialogue.id,
                        "key": self.keys.get(dialogue.id) or dialogue_key(dialogue),
                        "line": dialogue.line,
                        "entities": 0,
                        "no_image": 0,
                        "duplicates": 0,
                        "capped": 0,
                        "records": 0,
                        "entity_error": result.message,
                        "fallbacks": {},
                        "merged": dialogue.merged_turns,
                    }
                )
                continue
            records, state = self.dialogue_records(dialogue, result)
            rows.extend(record.to_dict() for record in records)
            if state.pop("retry", False):
                self.left_to_retry += 1
                continue
            states.append(state)
        self.records_written += self.records.write_batch(rows)
        self.state.write_batch(states)

    def run(
        self,
        items: Iterator[Dialogue | DataError],
        summary: BuildSummary,
        on_progress: Callable[[], None] = lambda: None,
    ) -> None:
        seen_lines: dict[str, int] = {}
        copies: Counter[str] = Counter()
        batch: list[Dialogue] = []
        read = 0
        for item in items:
            on_progress()
            if isinstance(item, DataError):
                if self.config.on_bad_line == "fail":
                    raise item
                summary.bad_lines.append(str(item))
                logger.warning("skipping bad input line: %s", item)
                continue
            read += 1
            if self.config.max_dialogues and read > self.config.max_dialogues:
                break
            if item.id in seen_lines:
                problem = DataError(
                    f"duplicate dialogue id {item.id!r} (first at line {seen_lines[item.id]})",
                    file=item.file,
                    record=f"line {item.line}",
                    field="id",
                )
                if self.config.on_bad_line == "fail":
                    raise problem
                summary.bad_lines.append(str(problem))
                continue
            seen_lines[item.id] = item.line
            content = dialogue_key(item)
            copies[content] += 1
            key = content if copies[content] == 1 else f"{content}#{copies[content]}"
            if key in self.state or self._legacy_done(item.id):
                summary.dialogues_resumed += 1
                continue
            self.keys[item.id] = key
            if item.id in self.built_ids:
                self.changed += 1
                logger.warning(
                    "%s:line %d: dialogue id %r was built before from other text (a line inserted above it, or this line edited): building it anew; records built before are kept",
                    item.file, item.line, item.id,
                )  # fmt: skip
            batch.append(item)
            summary.dialogues_processed += 1
            if len(batch) >= self.config.batch_size:
                self.process(batch)
                batch = []
        self.process(batch)


def count_lines(path: str | Path) -> int | None:
    try:
        return sum(1 for _ in iter_lines(path))
    except DataError:
        return None


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and key not in ("phrases", "possessive_phrases", "pools", "possessive_pools"):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_resume(config: BuildConfig, out: Path) -> None:
    """Refuse to continue a build in ``out`` that was started with other settings."""
    previous_path = out / CONFIG_FILE
    if not (out / STATE_FILE).exists() or not previous_path.exists():
        return
    previous = _flatten(read_yaml(previous_path))
    current = _flatten(to_dict(config))
    changed = [
        key
        for key in sorted(set(previous) | set(current))
        if key not in RESUME_FREE_SETTINGS and previous.get(key) != current.get(key)
    ]
    if changed:
        details = "; ".join(f"{key}: {previous.get(key)!r} -> {current.get(key)!r}" for key in changed[:5])
        raise ConfigError(
            f"{out} already holds a build made with other settings ({details}); rerun with the same settings to resume, or choose another --out"
        )


def build_data(config: BuildConfig, *, stages: Stages | None = None) -> BuildSummary:
    """Run the build the config describes; resumes from what ``config.out`` already holds.

    ``stages`` replaces the stages the config names (tests, custom recognizers). Returns
    the summary, which is also written to ``OUT/summary.json``.
    """
    config.check_paths()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    check_resume(config, out)
    save_config(config, out / CONFIG_FILE)
    stages = stages or make_stages(config)
    builder = Builder(config, stages)
    summary = BuildSummary(input=config.input, out=str(out))
    total = count_lines(config.input) if progress_enabled() else None
    with progress(total=total, desc="build-data", unit="dialogue") as bar:
        builder.run(read_dialogues(config.input, config.format), summary, on_progress=lambda: bar.update(1))
    summary.records_written = builder.records_written
    summary.dialogues_left_to_retry = builder.left_to_retry
    summary.dialogues_changed = builder.changed
    summary.image_source_errors = dict(stages.images.errors + builder.image_errors)
    summarize_outputs(summary, builder.records.path, builder.state.path)
    (out / SUMMARY_FILE).write_text(
        json.dumps(summary.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    if config.export_released:
        from mmsafe.data.formats import write_records
        from mmsafe.data.records import read_preference_records

        write_records(out / RELEASED_FILE, read_preference_records(builder.records.path), "mmsafe-po")
    return summary
