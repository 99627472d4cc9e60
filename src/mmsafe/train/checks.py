"""Checks of a run's data against its config, made before any model loads (a refused run costs seconds)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

from mmsafe.errors import ConfigError, DataError
from mmsafe.train.config import TrainConfig
from mmsafe.train.data import select_rejected

logger = logging.getLogger(__name__)


def _ordered_sources(sources: Any) -> list[str]:
    return sorted(sources, key=lambda source: (source != "human", source))  # as PreparedData.sources


def check_rejected_sources(config: TrainConfig, records: Sequence[Any]) -> None:
    """Refuse, before any model loads, rejected responses that cannot train what ``config`` asks.

    * a source in ``rejected_sources`` that no record has is refused; one that only some
      records have is refused unless ``allow_partial_sources`` (those without it train
      on the other sources, or are skipped);
    * ``loss: bpo`` (an objective that ``needs_several_rejected``) where no record keeps
      more than one rejected response would train exactly as DPO: refused unless
      ``allow_partial_sources``;
    * ``source_weights`` naming a source that no kept rejected response comes from (it
      would weigh nothing) is refused.

    Errors name the data file and give the number of records with each source.
    """
    objective = config.objective()
    if objective.max_rejected == 0:
        return  # supervised: no rejected response is trained against
    file, total = config.data, len(records)
    having = Counter(source for record in records for source in set(record.rejected_sources))
    counts = ", ".join(f"{source} {having[source]}" for source in _ordered_sources(having))
    summary = f"records with a rejected response from each source, of {total}: {counts}"
    for source in config.rejected_sources or ():
        if having[source] == 0:
            hint = "generate them with `mmsafe blind`, or " if source == "blind" else ""
            raise DataError(
                f"no record has a rejected response from {source!r} ({summary}); {hint}remove {source} from rejected_sources",
                file=file,
                field="rejected_sources",
            )
        if having[source] < total:
            if not config.allow_partial_sources:
                raise DataError(
                    f"only {having[source]} of {total} records have a rejected response from {source!r} ({summary}); "
                    "set allow_partial_sources: true to train anyway (the others train without it)",
                    file=file,
                    field="rejected_sources",
                )
            logger.warning(
                "%s: only %d of %d records have a rejected response from %s; the others train without it",
                file,
                having[source],
                total,
                source,
            )
    kept = [select_rejected(record, config.rejected_sources, objective.max_rejected) for record in records]
    if objective.needs_several_rejected and max(map(len, kept)) <= 1:
        if not config.allow_partial_sources:
            selected = f" from {', '.join(config.rejected_sources)}" if config.rejected_sources else ""
            raise DataError(
                f"loss: {objective.name}, but no record has more than one rejected response{selected} ({summary}), so BPO would train exactly as DPO; "
                "use loss: dpo, add blind rejected responses with `mmsafe blind`, or set allow_partial_sources: true to train anyway",
                file=file,
                field="rejected",
            )
        logger.warning("%s: no record has more than one rejected response: BPO trains exactly as DPO", file)
    trained = _ordered_sources({source for pairs in kept for _, source in pairs})
    unknown = sorted(set(config.source_weights) - set(trained))
    if unknown:
        raise ConfigError(
            f"source_weights: no rejected response comes from {', '.join(unknown)} (sources in the data: {', '.join(trained)})"
        )
