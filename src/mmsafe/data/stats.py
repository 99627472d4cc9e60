"""Counts that describe a preference data set, in the paper's terms.

The paper reports MMSafe-PO by entity type and by number of user turns (1, 2, 3, 4, 5+:
2,806 / 1,207 / 955 / 530 / 169 of 5,667); :func:`compute_stats` gives the same
breakdown for any file, plus image presence, rejected-response sources and splits.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mmsafe.data.formats import detect_format, read_records
from mmsafe.progress import track

#: The CoNLL-03 entity types: what ``meta["entity_type"]`` of a record says.
ENTITY_TYPES = ("PER", "ORG", "LOC", "MISC")
#: User-turn counts of 5 and more share one bucket, as in the paper's statistics.
TURN_BUCKETS = ("1", "2", "3", "4", "5+")
NO_VALUE = "(none)"


def turn_bucket(user_turns: int) -> str:
    """``1`` .. ``4`` as themselves, anything larger as ``5+`` (the paper's bins)."""
    return str(user_turns) if user_turns < 5 else "5+"


def _ordered(counter: Counter[str], first: tuple[str, ...] = ()) -> dict[str, int]:
    """Known keys first in their order (zeros kept), then the rest alphabetically."""
    ordered = {key: counter.get(key, 0) for key in first}
    ordered.update((key, counter[key]) for key in sorted(counter) if key not in ordered)
    return ordered


@dataclass
class DataStats:
    """Counts over the records of one file.

    ``by_rejected_source`` counts rejected responses (a record with a human and a blind
    rejected response adds one to each); every other breakdown counts records.
    """

    path: str
    format_name: str
    records: int = 0
    with_image: int = 0
    without_image: int = 0
    rejected_responses: int = 0
    by_entity_type: dict[str, int] = field(default_factory=dict)
    by_user_turns: dict[str, int] = field(default_factory=dict)
    by_rejected_source: dict[str, int] = field(default_factory=dict)
    by_split: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """A plain-text table: one section per breakdown, count and share of records."""
        lines = [f"{self.path} ({self.format_name})", f"  {'records':<24}{self.records:>8}"]
        lines.append(f"  {'with image':<24}{self.with_image:>8}{self._share(self.with_image)}")
        lines.append(f"  {'without image':<24}{self.without_image:>8}{self._share(self.without_image)}")
        sections = [
            ("entity type", self.by_entity_type, self.records),
            ("user turns", self.by_user_turns, self.records),
            ("rejected source", self.by_rejected_source, self.rejected_responses),
            ("split", self.by_split, self.records),
        ]
        for title, counts, total in sections:
            if not counts:
                continue
            lines.append(f"{title}:")
            for key, count in counts.items():
                lines.append(f"  {key:<24}{count:>8}{self._share(count, total)}")
        return "\n".join(lines)

    def _share(self, count: int, total: int | None = None) -> str:
        total = self.records if total is None else total
        return f"  {100 * count / total:5.1f}%" if total else ""


def compute_stats(path: str | Path, format_name: str | None = None) -> DataStats:
    """Count the records of ``path`` (any readable format); bad data raises a DataError."""
    format_name = format_name or detect_format(path)
    stats = DataStats(path=str(path), format_name=format_name)
    entity_types: Counter[str] = Counter()
    turns: Counter[str] = Counter()
    sources: Counter[str] = Counter()
    splits: Counter[str] = Counter()
    for record in track(read_records(path, format_name), desc="stats", unit="record"):
        stats.records += 1
        if record.image is not None:
            stats.with_image += 1
        else:
            stats.without_image += 1
        entity_types[str(record.meta.get("entity_type") or NO_VALUE)] += 1
        turns[turn_bucket(record.num_turns)] += 1
        sources.update(record.rejected_sources)
        stats.rejected_responses += len(record.rejected)
        if "split" in record.meta:
            splits[str(record.meta["split"])] += 1
    has_entities = any(key != NO_VALUE for key in entity_types)
    stats.by_entity_type = _ordered(entity_types, ENTITY_TYPES if has_entities else ())
    stats.by_user_turns = _ordered(turns, TURN_BUCKETS)
    stats.by_rejected_source = _ordered(sources)
    stats.by_split = _ordered(splits)
    return stats
