"""Judge a responses file into a verdicts file, resumably and without judging twice.

Verdicts are appended in batches through :class:`~mmsafe.data.jsonl.ResumableJsonlWriter`
keyed by ``(id, variant, judge)``: a rerun (after a crash, or with more responses) only
judges what is missing, and one verdicts file can hold several judges' verdicts. Each
verdict keeps a hash of the response it labels, so a verdicts file reused for changed
responses is refused rather than silently trusted. The settings of each judge's run are
saved beside the verdicts as ``<out>.config.yaml``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mmsafe.data.jsonl import ResumableJsonlWriter, read_jsonl
from mmsafe.data.records import ResponseRecord, VerdictRecord, parse_messages, read_response_records
from mmsafe.errors import ConfigError, DataError, MmsafeError
from mmsafe.evaluate.benchmarks import BenchmarkItem, load_prompts
from mmsafe.evaluate.judges.base import Judge, JudgeInput
from mmsafe.progress import progress

logger = logging.getLogger(__name__)

def response_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def verdict_key(row: dict[str, Any]) -> tuple[str, str, str]:
    return (row["id"], row.get("variant", "default"), row["judge"])


#: The protocol of verdicts that name none: mmsafe's own judging.
DEFAULT_PROTOCOL = "mmsafe"


def judge_protocol(judge: Judge) -> str:
    """Whose judging rules the judge applies: its ``protocol``, else ``mmsafe`` (ours).

    Written into every verdict (``protocol``), so a report can say which protocol
    produced each number (e.g. ``mm-safetybench``: MM-SafetyBench's own rules).
    """
    return str(getattr(judge, "protocol", None) or DEFAULT_PROTOCOL)


@dataclass
class JudgeRunResult:
    """What one :func:`judge_responses` call did."""

    out_path: Path
    judge: str
    total: int
    judged: int
    skipped: int
    counts: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        counts = ", ".join(f"{name} {count}" for name, count in sorted(self.counts.items())) or "nothing new"
        return f"{self.judge}: judged {self.judged} of {self.total} responses ({self.skipped} already judged) -> {self.out_path} [{counts}]"


def config_path_for(out_path: Path) -> Path:
    return out_path.with_name(out_path.name + ".config.yaml")


def describe_judge(judge: Judge) -> dict[str, Any]:
    """The judge's settings (plain values only: never a loaded model, never a key's value)."""
    describe = getattr(judge, "describe", None)
    if callable(describe):
        return dict(describe())
    settings: dict[str, Any] = {"type": type(judge).__name__, "name": judge.name}
    if dataclasses.is_dataclass(judge):
        for item in dataclasses.fields(judge):
            value = getattr(judge, item.name)
            if item.init and not item.name.startswith("_") and isinstance(value, str | int | float | bool | type(None) | list | tuple):
                settings[item.name] = list(value) if isinstance(value, tuple) else value
    return settings


def _write_config(path: Path, judge: Judge, settings: dict[str, Any]) -> None:
    """Record this judge's run beside the verdicts; one entry per judge name."""
    import yaml

    from mmsafe import __version__

    existing = yaml.safe_load(path.read_text(encoding="utf-8")) if path.exists() else None
    runs = existing if isinstance(existing, dict) else {}
    runs[judge.name] = {**settings, "judge": describe_judge(judge), "mmsafe_version": __version__, "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    path.write_text(yaml.safe_dump(runs, sort_keys=False, allow_unicode=True), encoding="utf-8")


def _read_responses(path: Path) -> list[ResponseRecord]:
    responses = list(read_response_records(path))
    seen: set[tuple[str, str]] = set()
    for response in responses:
        if response.key in seen:
            raise DataError(f"duplicate response for variant {response.variant!r}; one response per (id, variant) is expected", file=str(path), record=response.id, field="id")
        seen.add(response.key)
    return responses


def _check_cache(out_path: Path, judge_name: str, responses: list[ResponseRecord]) -> None:
    """Refuse a verdicts file whose cached verdicts label different response texts."""
    if not out_path.exists():
        return
    hashes = {response.key: response_hash(response.response) for response in responses}
    for line_number, row in read_jsonl(out_path):
        if not isinstance(row, dict) or row.get("judge") != judge_name:
            continue
        key = (row.get("id"), row.get("variant", "default"))
        cached = row.get("response_sha256")
        if key in hashes and cached is not None and cached != hashes[key]:
            raise DataError(
                f"this verdict was given to a different response text for id {key[0]!r}; the responses changed since, "
                "so write the verdicts to a new file (or delete this one) instead of reusing it",
                file=str(out_path),
                record=f"line {line_number}",
                field="response_sha256",
            )


def _judge_input(response: ResponseRecord, prompts: Mapping[str, BenchmarkItem] | None, responses_path: Path, image_root: Path | None) -> JudgeInput:
    item = None if prompts is None else prompts.get(response.id)
    if prompts is not None and item is None:
        raise DataError("response id not found in the benchmark data; were these responses generated for another data set?", file=str(responses_path), record=response.id, field="id")
    # A probe variant may have asked a different prompt; the response record then says which.
    if "messages" in response.extra:
        try:
            messages = parse_messages(response.extra["messages"], response.id)
        except DataError as error:
            raise error.at(file=str(responses_path)) from None
        image = response.extra.get("image")
    else:
        messages = list(item.messages) if item is not None else []
        image = item.image if item is not None else None
    root = item.image_root if item is not None and item.image_root is not None else image_root
    image_path = None
    if image is not None and root is not None:
        from mmsafe.data.images import resolve_image_path

        try:
            image_path = resolve_image_path(root, image)
        except DataError as error:
            raise error.at(file=str(responses_path), record=response.id) from None
    meta = dict(item.meta) if item is not None else {}
    category = meta.get("scenario") or meta.get("entity_type") or meta.get("class1")
    return JudgeInput(response.id, messages, response.response, response.variant, image_path, None, category, meta)


def judge_responses(
    responses_path: str | Path,
    out_path: str | Path,
    judge: Judge,
    *,
    data: str | Path | Mapping[str, BenchmarkItem] | Iterable[Any] | None = None,
    benchmark: str | None = None,
    image_root: str | Path | None = None,
    batch_size: int = 16,
    benchmark_options: Mapping[str, Any] | None = None,
) -> JudgeRunResult:
    """Append ``judge``'s verdict for every response of ``responses_path`` not yet in ``out_path``.

    Args:
        responses_path: response records (JSONL).
        out_path: verdict records (JSONL), appended to; created when missing.
        judge: any :class:`~mmsafe.evaluate.judges.Judge`.
        data: the prompts the responses answer: a data path (read as ``benchmark``,
            default ``mmsafe-po``), or benchmark items / preference records. Every
            response id must be found there. Judges other than ``refusal`` need it unless
            the response records carry their own ``messages``.
        image_root: image folder for data given as records (benchmark loaders know theirs).
        batch_size: responses per judge call; a crash loses at most one batch.
        benchmark_options: loader options of ``benchmark`` (as given to generation, e.g.
            ``settings`` with MM-SafetyBench's ``text-only-changed``).
    """
    responses_path, out_path = Path(responses_path), Path(out_path)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    responses = _read_responses(responses_path)
    prompts = None
    if data is not None:
        prompts = load_prompts(data, benchmark=benchmark, image_root=image_root, **dict(benchmark_options or {}))
    elif getattr(judge, "needs_prompt", True) and any("messages" not in response.extra for response in responses):
        raise ConfigError(f"judge {judge.name!r} reads the prompt too: pass the benchmark data (--data) the responses answer")
    root = None if image_root is None else Path(image_root)
    inputs = [_judge_input(response, prompts, responses_path, root) for response in responses]

    _check_cache(out_path, judge.name, responses)
    writer = ResumableJsonlWriter(out_path, key=verdict_key)
    settings = {
        "responses": str(responses_path),
        "data": str(data) if isinstance(data, str | Path) else None if data is None else "<in memory>",
        "benchmark": benchmark,
        "image_root": None if image_root is None else str(image_root),
        "batch_size": batch_size,
        "benchmark_options": dict(benchmark_options) if benchmark_options else None,
        "protocol": judge_protocol(judge),
        "output": str(out_path),
    }
    _write_config(config_path_for(out_path), judge, settings)
    if writer.repaired_bytes:
        logger.warning("%s: removed a line cut short by an earlier crash (%d bytes)", out_path, writer.repaired_bytes)
    todo = [(response, item) for response, item in zip(responses, inputs, strict=True) if (response.id, response.variant, judge.name) not in writer]
    counts: Counter[str] = Counter()
    model_fallback = responses_path.stem
    with progress(total=len(todo), desc=f"judge {judge.name}", unit="resp") as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            verdicts = judge.judge([item for _, item in batch])
            if len(verdicts) != len(batch):
                raise MmsafeError(f"judge {judge.name!r} returned {len(verdicts)} verdicts for {len(batch)} responses")
            rows = []
            for (response, _), verdict in zip(batch, verdicts, strict=True):
                extra = {"model": response.model or model_fallback, "response_sha256": response_hash(response.response), "protocol": judge_protocol(judge), **verdict.extra}
                record = VerdictRecord(response.id, judge.name, verdict.verdict, response.variant, list(verdict.categories), verdict.raw, extra)
                rows.append(record.to_dict())
                counts[verdict.verdict] += 1
            writer.write_batch(rows)
            bar.update(len(batch))
    return JudgeRunResult(out_path, judge.name, len(responses), sum(counts.values()), len(responses) - len(todo), dict(counts))
