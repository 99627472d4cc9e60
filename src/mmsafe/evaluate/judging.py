"""Judge a responses file into a verdicts file, resumably and without judging twice.

Verdicts are appended in batches through :class:`~mmsafe.data.resumable.ResumableOutput`
keyed by ``(id, variant, judge)``: a rerun (after a crash, or with more responses) only
judges what is missing, and one verdicts file can hold several judges' verdicts.

Resume is keyed by content: each verdict keeps a hash of the response text it labels
(``response_sha256``), and a response whose text changed since is judged again, its old
verdict line replaced (atomically). Verdicts of responses no longer in the responses file
are kept and counted (``not_in_input``). The settings of each judge's run are saved
beside the verdicts as ``<out>.config.yaml`` (written atomically), with the settings that
change a verdict under ``resume`` (the judge's name, model, rubric version and a hash of
its rubric text, protocol, benchmark and loader options); a rerun of the same judge with
other such settings is refused with the list of what changed, the verdicts untouched.
Settings that do not change a verdict (device, batch size, concurrency, timeouts,
retries, server URL, key variable) may change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmsafe.data.inputs import source_name
from mmsafe.data.outputs import check_output_is_not_an_input
from mmsafe.data.records import ResponseRecord, VerdictRecord, parse_messages, read_response_records
from mmsafe.data.resumable import ResumableOutput, stamp
from mmsafe.data.sidecar import content_hash, flatten
from mmsafe.errors import ConfigError, DataError, MmsafeError
from mmsafe.evaluate.benchmarks import BenchmarkItem, load_prompts
from mmsafe.evaluate.judges.base import Judge, JudgeInput
from mmsafe.progress import progress

logger = logging.getLogger(__name__)

#: Judge settings (``describe_judge`` keys) that do not change a verdict: a rerun may change them.
RESUME_FREE_JUDGE_SETTINGS = frozenset(
    {
        "device",
        "batch_size",
        "concurrency",
        "timeout",
        "deadline",
        "max_body_bytes",
        "max_retries",
        "base_url",
        "api_key_env",
        "trust_remote_code",
    }
)


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
    redone: int = 0
    """Responses whose text changed since their verdict was written (judged again, line replaced)."""
    not_in_input: int = 0
    """This judge's verdicts for responses no longer in the responses file (kept)."""

    def summary(self) -> str:
        counts = ", ".join(f"{name} {count}" for name, count in sorted(self.counts.items())) or "nothing new"
        text = f"{self.judge}: judged {self.judged} of {self.total} responses ({self.skipped} already judged"
        if self.redone:
            text += f", {self.redone} judged again because the response changed"
        text += f") -> {self.out_path} [{counts}]"
        if self.not_in_input:
            text += f"; {self.not_in_input} verdicts of responses no longer in the responses file kept"
        return text


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
            if (
                item.init
                and not item.name.startswith("_")
                and isinstance(value, str | int | float | bool | type(None) | list | tuple)
            ):
                settings[item.name] = list(value) if isinstance(value, tuple) else value
    return settings


def judge_resume_settings(judge: Judge, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every setting of ``judge`` that changes a verdict, flat (``judge.model``, ``judge.rubric_sha``, ...)."""
    settings = {
        f"judge.{key}": value
        for key, value in flatten(describe_judge(judge)).items()
        if key not in RESUME_FREE_JUDGE_SETTINGS
    }
    settings["judge.protocol"] = judge_protocol(judge)
    rubrics = getattr(judge, "_rubrics", None)
    if isinstance(rubrics, Mapping) and rubrics:
        settings["judge.rubric_sha"] = content_hash(dict(rubrics))  # an edited rubric file of the same version
    settings.update(extra or {})
    return json.loads(json.dumps(settings, default=str))


def _sidecar(
    previous: Mapping[str, Any] | None, judge: Judge, settings: dict[str, Any], resume: dict[str, Any]
) -> dict[str, Any]:
    """The settings file beside the verdicts with this judge's run recorded; one entry per judge name."""
    runs = dict(previous or {})
    runs[judge.name] = stamp({**settings, "judge": describe_judge(judge), "resume": resume})
    return runs


def _read_responses(path: Path) -> list[ResponseRecord]:
    responses = list(read_response_records(path))
    seen: set[tuple[str, str]] = set()
    for response in responses:
        if response.key in seen:
            raise DataError(
                f"duplicate response for variant {response.variant!r}; one response per (id, variant) is expected",
                file=str(path),
                record=response.id,
                field="id",
            )
        seen.add(response.key)
    return responses


def _judge_input(
    response: ResponseRecord, prompts: Mapping[str, BenchmarkItem] | None, responses_path: Path, image_root: Path | None
) -> JudgeInput:
    item = None if prompts is None else prompts.get(response.id)
    if prompts is not None and item is None:
        raise DataError(
            "response id not found in the benchmark data; were these responses generated for another data set?",
            file=str(responses_path),
            record=response.id,
            field="id",
        )
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
    check_output_is_not_an_input(out_path, [responses_path, data, image_root])
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    responses = _read_responses(responses_path)
    prompts = None
    if data is not None:
        prompts = load_prompts(data, benchmark=benchmark, image_root=image_root, **dict(benchmark_options or {}))
    elif getattr(judge, "needs_prompt", True) and any("messages" not in response.extra for response in responses):
        raise ConfigError(
            f"judge {judge.name!r} reads the prompt too: pass the benchmark data (--data) the responses answer"
        )
    root = None if image_root is None else Path(image_root)
    inputs = [_judge_input(response, prompts, responses_path, root) for response in responses]

    settings = {
        "responses": str(responses_path),
        "data": None if data is None else source_name(data, "<in memory>"),
        "benchmark": benchmark,
        "image_root": None if image_root is None else str(image_root),
        "batch_size": batch_size,
        "benchmark_options": dict(benchmark_options) if benchmark_options else None,
        "protocol": judge_protocol(judge),
        "output": str(out_path),
    }
    current = judge_resume_settings(
        judge, {"benchmark": benchmark, "benchmark_options": dict(benchmark_options) if benchmark_options else None}
    )
    hashes = {(response.id, response.variant, judge.name): response_hash(response.response) for response in responses}
    output = ResumableOutput(
        out_path,
        key=verdict_key,
        scope=lambda row: row.get("judge") == judge.name,
        settings=current,
        sidecar=config_path_for(out_path),
        settings_at=(judge.name, "resume"),
        what=f"verdicts of judge {judge.name!r}",
        advice="write the verdicts to a new file",
        content_field="response_sha256",
    ).open()
    with output:
        output.compare_inputs(hashes)
        output.write_sidecar(_sidecar(output.previous, judge, settings, current))
        todo = output.todo(zip(responses, inputs, strict=True), lambda pair: (pair[0].id, pair[0].variant, judge.name))
        counts: Counter[str] = Counter()
        model_fallback = responses_path.stem
        with progress(total=len(todo), desc=f"judge {judge.name}", unit="resp") as bar:
            for start in range(0, len(todo), batch_size):
                batch = todo[start : start + batch_size]
                verdicts = judge.judge([item for _, item in batch])
                if len(verdicts) != len(batch):
                    raise MmsafeError(
                        f"judge {judge.name!r} returned {len(verdicts)} verdicts for {len(batch)} responses"
                    )
                rows = []
                for (response, _), verdict in zip(batch, verdicts, strict=True):
                    extra = {
                        "model": response.model or model_fallback,
                        "response_sha256": response_hash(response.response),
                        "protocol": judge_protocol(judge),
                        **verdict.extra,
                    }
                    record = VerdictRecord(
                        response.id,
                        judge.name,
                        verdict.verdict,
                        response.variant,
                        list(verdict.categories),
                        verdict.raw,
                        extra,
                    )
                    rows.append(record.to_dict())
                    counts[verdict.verdict] += 1
                output.append(rows)
                bar.update(len(batch))
        output.close()
    return JudgeRunResult(
        out_path,
        judge.name,
        len(responses),
        sum(counts.values()),
        len(responses) - len(todo),
        dict(counts),
        redone=len(output.stale),
        not_in_input=len(output.removed),
    )
