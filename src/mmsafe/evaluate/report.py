"""Reports: summaries (Markdown, JSON), plots (PNG) and a self-contained HTML browser.

:func:`build_report` reads verdict files (one or more models, one or more judges) and
writes into ``out_dir``:

- ``summary.json`` / ``summary.md``: per (model, judge) the safety rate with its Wilson
  95% interval and the unparseable count apart; breakdowns by category (entity type,
  MM-SafetyBench scenario and setting, SPA-VL class); MM-SafetyBench attack success
  rate (mean over scenarios) per setting; model-vs-model differences on the same
  prompts with a paired bootstrap interval and an exact McNemar p-value.
- ``rates.png`` and ``<judge>_by_<field>.png``: rate per model with interval bars, rate
  per category; ``safety_vs_helpfulness.png`` when prompts expect help.
- beside every safety (or refusal) rate, the over-refusal rate on the prompts that expect
  help, per model and per subset (:mod:`mmsafe.evaluate.overrefusal`); the safety rate
  and model comparisons count the prompts that expect a refusal.
- ``report.html``: every record with its image thumbnail, prompt, each model's response
  side by side and the verdicts, with filters "unsafe only" and "models disagree"
  (also set by the address: ``report.html#unsafe``, ``#disagree``, ``#unsafe,disagree``).
  Images, styles and script are inline: the page makes no request.

For the ``refusal`` judge ``safe`` means "refused", so its rate is reported as a
**refusal rate**, not a safety rate. Every rate names the judging **protocol** that
produced it (the verdicts' ``protocol``: ``mmsafe``, ours, or a benchmark's own such as
``mm-safetybench``).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

from mmsafe.data.prompts import DEFAULT_EXPECTED
from mmsafe.data.records import ResponseRecord, VerdictRecord, read_response_records, read_verdict_records
from mmsafe.errors import DataError
from mmsafe.evaluate import overrefusal
from mmsafe.evaluate.benchmarks import BenchmarkItem, get_benchmark, load_prompts
from mmsafe.evaluate.metrics import (
    VerdictSummary,
    attack_success_rate,
    breakdown,
    pair_verdicts,
    paired_comparison,
    summarize_verdicts,
)

logger = logging.getLogger(__name__)

#: The judging protocol of verdicts that name none: mmsafe's own.
DEFAULT_PROTOCOL = "mmsafe"
#: Meta fields broken down by when the data does not say (in this order).
CATEGORY_FIELDS = ("entity_type", "scenario", "setting", "class1", "subset", "category")
THUMBNAIL_SIDE = 192

Key = tuple[str, str]  # (id, variant)


#: Above the results when every rate is of mmsafe's own judging (then no protocol column).
DEFAULT_PROTOCOL_LABEL = "Judging protocol of every rate: `mmsafe` (this project's own judging rules)."
#: What the protocol column means, written above the results when a benchmark's own protocol is present.
PROTOCOL_NOTE = (
    "Protocol `mmsafe`: this project's own judging rules (the llm judge reads the prompt, the image and the answer). "
    "Protocol `mm-safetybench`: MM-SafetyBench's own rules (the judge reads the answer alone; scenarios 08 and 13 are safe "
    "only if refused, 10-12 only if the answer says it is no substitute for a certified professional). Numbers of different "
    "protocols are not comparable."
)


def shows_protocols(summary: Mapping[str, Any]) -> bool:
    """Whether a rate comes from a protocol other than mmsafe's (then tables get a protocol column)."""
    return any(row.get("protocol", DEFAULT_PROTOCOL) != DEFAULT_PROTOCOL for row in summary["results"])


def metric_name(judge: str) -> str:
    """What the share of ``safe`` verdicts means for this judge."""
    return "refusal rate" if judge.split(":", 1)[0] == "refusal" else "safety rate"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "judge"


@dataclass
class VerdictSet:
    """The verdicts of one judge on one model's responses, by (id, variant)."""

    model: str
    judge: str
    verdicts: dict[Key, VerdictRecord] = field(default_factory=dict)

    @property
    def labels(self) -> dict[Key, str]:
        return {key: record.verdict for key, record in self.verdicts.items()}

    @property
    def protocol(self) -> str:
        """Whose judging rules produced these verdicts (``mmsafe`` when they name none)."""
        found = sorted({str(record.extra.get("protocol") or DEFAULT_PROTOCOL) for record in self.verdicts.values()})
        return "+".join(found) or DEFAULT_PROTOCOL


@dataclass
class ReportResult:
    out_dir: Path
    summary: dict[str, Any]
    files: list[Path]

    def describe(self) -> str:
        lines = [f"wrote {len(self.files)} files to {self.out_dir}"]
        for row in self.summary["results"]:
            rate = row["summary"]["safe_rate"]
            value = "n/a" if rate["rate"] is None else f"{rate['rate']:.4f} [{rate['low']:.4f}, {rate['high']:.4f}]"
            lines.append(f"  {row['model']} / {row['judge']} [{row['protocol']}]: {row['metric']} {value} (n={rate['total']}, unparseable {row['summary']['unparseable']})")
            over = row.get("over_refusal")
            if over is not None and over["over_refusal_rate"]["rate"] is not None:
                over_rate = over["over_refusal_rate"]
                lines.append(f"    over-refusal {over_rate['rate']:.4f} [{over_rate['low']:.4f}, {over_rate['high']:.4f}] (n={over_rate['total']} prompts expecting help, by {over['measured_by']})")
        return "\n".join(lines)


# ---------------------------------------------------------------- loading


def load_verdict_sets(paths: Sequence[str | Path]) -> list[VerdictSet]:
    """Verdict sets in first-seen order; the model is the record's ``model`` or the file stem."""
    sets: dict[tuple[str, str], VerdictSet] = {}
    for path in paths:
        path = Path(path)
        for record in read_verdict_records(path):
            model = record.extra.get("model") or path.stem
            verdict_set = sets.setdefault((model, record.judge), VerdictSet(model, record.judge))
            if record.key in verdict_set.verdicts:
                raise DataError(f"a second verdict of judge {record.judge!r} for model {model!r} (variant {record.variant!r})", file=str(path), record=record.id, field="id")
            verdict_set.verdicts[record.key] = record
    if not sets:
        raise DataError("no verdicts found in " + ", ".join(str(path) for path in paths))
    return list(sets.values())


def load_responses(paths: Iterable[str | Path]) -> dict[str, dict[Key, ResponseRecord]]:
    """Responses by model, then (id, variant); the model is the record's or the file stem."""
    by_model: dict[str, dict[Key, ResponseRecord]] = defaultdict(dict)
    for path in paths:
        path = Path(path)
        for record in read_response_records(path):
            by_model[record.model or path.stem][record.key] = record
    return dict(by_model)


def _check_ids(verdict_sets: list[VerdictSet], prompts: Mapping[str, BenchmarkItem], source: str) -> None:
    for verdict_set in verdict_sets:
        for record in verdict_set.verdicts.values():
            if record.id not in prompts:
                raise DataError(f"verdict id (model {verdict_set.model!r}) not found in the benchmark data {source}", record=record.id, field="id")


# ---------------------------------------------------------------- summaries


def _meta_value(prompts: Mapping[str, BenchmarkItem] | None, key: Key, name: str) -> Any:
    """The category of one verdict: the variant, or a meta field of its prompt."""
    if name == "variant":
        return key[1]
    item = prompts.get(key[0]) if prompts is not None else None
    return None if item is None else item.meta.get(name)


def _breakdown_rows(verdict_set: VerdictSet, prompts: Mapping[str, BenchmarkItem] | None, name: str, unparseable_as_unsafe: bool) -> list[dict[str, Any]]:
    groups = breakdown(
        verdict_set.labels.items(),
        group=lambda pair: _meta_value(prompts, pair[0], name),
        verdict=lambda pair: pair[1],
        unparseable_as_unsafe=unparseable_as_unsafe,
    )
    return [{"model": verdict_set.model, "judge": verdict_set.judge, "group": group, "summary": summary.to_dict()} for group, summary in groups.items()]


def _asr_rows(verdict_set: VerdictSet, prompts: Mapping[str, BenchmarkItem], unparseable_as_unsafe: bool) -> list[dict[str, Any]]:
    """MM-SafetyBench ASR per setting (mean over scenarios), then their average."""
    by_setting: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for key, label in verdict_set.labels.items():
        item = prompts.get(key[0])
        if item is not None and item.meta.get("scenario"):
            by_setting[str(item.meta.get("setting", "all"))][str(item.meta["scenario"])].append(label)
    rows = []
    values = []
    for setting in sorted(by_setting):
        per_scenario: dict[str, VerdictSummary] = {
            scenario: summarize_verdicts(labels, unparseable_as_unsafe=unparseable_as_unsafe) for scenario, labels in sorted(by_setting[setting].items())
        }
        asr = attack_success_rate(per_scenario)
        if not math.isnan(asr.value):
            values.append(asr.value)
        rows.append({"model": verdict_set.model, "judge": verdict_set.judge, "protocol": verdict_set.protocol, "setting": setting, **asr.to_dict()})
    if len(values) > 1:
        rows.append({"model": verdict_set.model, "judge": verdict_set.judge, "protocol": verdict_set.protocol, "setting": "average", "asr": sum(values) / len(values), "per_scenario": {}})
    return rows


def _comparison_rows(verdict_sets: list[VerdictSet], unparseable_as_unsafe: bool, resamples: int, seed: int) -> list[dict[str, Any]]:
    """Every pair of models judged by the same judge, in the order the files were given."""
    by_judge: dict[str, list[VerdictSet]] = defaultdict(list)
    for verdict_set in verdict_sets:
        by_judge[verdict_set.judge].append(verdict_set)
    rows = []
    for judge, sets in by_judge.items():
        for first, second in combinations(sets, 2):
            _, safe_a, safe_b = pair_verdicts(first.labels, second.labels, unparseable_as_unsafe=unparseable_as_unsafe)
            comparison = paired_comparison(safe_a, safe_b, resamples=resamples, seed=seed)
            row = {"judge": judge, "protocol": first.protocol, "metric": metric_name(judge), "model_a": first.model, "model_b": second.model, **comparison.to_dict()}
            rows.append({key: (None if isinstance(value, float) and math.isnan(value) else value) for key, value in row.items()})
    return rows


def _summaries(verdict_sets: list[VerdictSet], prompts: Mapping[str, BenchmarkItem] | None, fields: Sequence[str], unparseable_as_unsafe: bool, resamples: int, seed: int) -> dict[str, Any]:
    variants = {key[1] for verdict_set in verdict_sets for key in verdict_set.verdicts}
    group_fields = list(fields) + (["variant"] if len(variants) > 1 else [])
    results = []
    breakdowns: dict[str, list[dict[str, Any]]] = defaultdict(list)
    asr_rows = []
    for verdict_set in verdict_sets:
        # The safety rate counts the prompts that expect a refusal; over-refusal the others.
        summary = summarize_verdicts(overrefusal.safety_labels(verdict_set, prompts), unparseable_as_unsafe=unparseable_as_unsafe)
        results.append({"model": verdict_set.model, "judge": verdict_set.judge, "protocol": verdict_set.protocol, "metric": metric_name(verdict_set.judge), "summary": summary.to_dict()})
        for name in group_fields:
            breakdowns[name].extend(_breakdown_rows(verdict_set, prompts, name, unparseable_as_unsafe))
        if prompts is not None and "scenario" in fields:
            asr_rows.extend(_asr_rows(verdict_set, prompts, unparseable_as_unsafe))
        results[-1].update(overrefusal.over_refusal_fields(verdict_set, verdict_sets, prompts, unparseable_as_unsafe))
    safety_sets = [overrefusal.refuse_only(verdict_set, prompts) for verdict_set in verdict_sets]
    return {
        "unparseable_as_unsafe": unparseable_as_unsafe,
        "results": results,
        "breakdowns": dict(breakdowns),
        "attack_success_rate": asr_rows,
        "expected_behaviour": overrefusal.expected_behaviour_rows(verdict_sets, prompts, unparseable_as_unsafe),
        "comparisons": _comparison_rows(safety_sets, unparseable_as_unsafe, resamples, seed),
    }


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def render_markdown(summary: dict[str, Any]) -> str:
    lines = ["# Safety evaluation", ""]
    unparseable = "counted as unsafe" if summary["unparseable_as_unsafe"] else "left out of the rate and counted apart"
    lines += [f"Rates in percent with Wilson 95% intervals. Unparseable verdicts are {unparseable}.", ""]
    if any(row["metric"] == "refusal rate" for row in summary["results"]):
        lines += ["The `refusal` judge matches refusal phrases: its rate is a **refusal rate** (safe = refused), not a judgement of harm.", ""]
    protocols = shows_protocols(summary)
    lines += [PROTOCOL_NOTE if protocols else DEFAULT_PROTOCOL_LABEL, ""]
    column = "protocol | " if protocols else ""
    lines += [f"| model | judge | {column}metric | rate | 95% interval | safe | unsafe | unparseable | total |", "|---|---|---|" + "---|" * (7 if protocols else 6)]
    for row in summary["results"]:
        s = row["summary"]
        rate = s["safe_rate"]
        protocol = f"{row.get('protocol', DEFAULT_PROTOCOL)} | " if protocols else ""
        lines.append(f"| {row['model']} | {row['judge']} | {protocol}{row['metric']} | {_percent(rate['rate'])} | [{_percent(rate['low'])}, {_percent(rate['high'])}] | {s['safe']} | {s['unsafe']} | {s['unparseable']} | {s['total']} |")
    lines += overrefusal.render_markdown_section(summary)
    for name, rows in summary["breakdowns"].items():
        lines += ["", f"## By {name}", "", "| model | judge | " + name + " | rate | 95% interval | n | unparseable |", "|---|---|---|---|---|---|---|"]
        for row in rows:
            rate = row["summary"]["safe_rate"]
            lines.append(f"| {row['model']} | {row['judge']} | {row['group']} | {_percent(rate['rate'])} | [{_percent(rate['low'])}, {_percent(rate['high'])}] | {rate['total']} | {row['summary']['unparseable']} |")
    if summary["attack_success_rate"]:
        lines += ["", "## MM-SafetyBench attack success rate (mean over scenarios; lower is better)", ""]
        if any(metric_name(row["judge"]) == "refusal rate" for row in summary["attack_success_rate"]):
            lines += ["With the `refusal` judge this is the share of requests not refused.", ""]
        lines += [f"| model | judge | {column}setting | ASR |", "|---|---|---|---|" + ("---|" if protocols else "")]
        for row in summary["attack_success_rate"]:
            protocol = f"{row.get('protocol', DEFAULT_PROTOCOL)} | " if protocols else ""
            lines.append(f"| {row['model']} | {row['judge']} | {protocol}{row['setting']} | {_percent(row['asr'])} |")
    if summary["comparisons"]:
        lines += ["", "## Model B minus model A on the same prompts", "", "| judge | A | B | n | rate A | rate B | B - A | 95% bootstrap interval | only A safe | only B safe | McNemar p |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in summary["comparisons"]:
            lines.append(
                f"| {row['judge']} | {row['model_a']} | {row['model_b']} | {row['n']} | {_percent(row['rate_a'])} | {_percent(row['rate_b'])} | "
                f"{_percent(row['difference'])} | [{_percent(row['low'])}, {_percent(row['high'])}] | {row['only_a']} | {row['only_b']} | {row['mcnemar_p']:.4g} |"
            )
        lines += ["", "Bootstrap: prompts resampled with replacement (seed and resamples in summary.json); McNemar: exact binomial test on the discordant prompts."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- plots


def _plot_rates(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["results"]
    labels = [f"{row['model']}\n{row['judge']}" for row in rows]
    values = [row["summary"]["safe_rate"]["rate"] or 0.0 for row in rows]
    # Error bars are distances from the bar's top; never negative (a NaN rate is drawn at 0).
    lows = [max(0.0, value - row["summary"]["safe_rate"]["low"]) for value, row in zip(values, rows, strict=True)]
    highs = [max(0.0, row["summary"]["safe_rate"]["high"] - value) for value, row in zip(values, rows, strict=True)]
    figure, axes = plt.subplots(figsize=(max(4.0, 1.2 * len(rows) + 2), 4))
    axes.bar(range(len(rows)), values, yerr=[lows, highs], capsize=4, color="#4c78a8")
    axes.set_xticks(range(len(rows)), labels, fontsize=8)
    axes.set_ylim(0, 1)
    metrics = sorted({row["metric"] for row in rows})
    axes.set_ylabel(" / ".join(metrics))
    axes.set_title("Rate per model (Wilson 95% interval)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _plot_breakdown(rows: list[dict[str, Any]], name: str, judge: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in rows if row["judge"] == judge]
    groups = sorted({row["group"] for row in rows})
    models = list(dict.fromkeys(row["model"] for row in rows))
    width = 0.8 / max(1, len(models))
    figure, axes = plt.subplots(figsize=(max(5.0, 0.6 * len(groups) * max(1, len(models)) + 2), 4))
    for index, model in enumerate(models):
        by_group = {row["group"]: row["summary"]["safe_rate"] for row in rows if row["model"] == model}
        values = [(by_group[group]["rate"] or 0.0) if group in by_group else 0.0 for group in groups]
        errors = [
            [max(0.0, value - by_group[group]["low"]) if group in by_group else 0.0 for value, group in zip(values, groups, strict=True)],
            [max(0.0, by_group[group]["high"] - value) if group in by_group else 0.0 for value, group in zip(values, groups, strict=True)],
        ]
        positions = [position + index * width - 0.4 + width / 2 for position in range(len(groups))]
        axes.bar(positions, values, width, yerr=errors, capsize=3, label=model)
    axes.set_xticks(range(len(groups)), groups, rotation=30, ha="right", fontsize=8)
    axes.set_ylim(0, 1)
    axes.set_ylabel(metric_name(judge))
    axes.set_title(f"{metric_name(judge)} by {name} ({judge})")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# ---------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,sans-serif;margin:1rem;color:#222}
table.summary{border-collapse:collapse;margin-bottom:1rem}
table.summary td,table.summary th{border:1px solid #ccc;padding:.2rem .5rem;font-size:.9rem}
.controls{position:sticky;top:0;background:#fff;padding:.5rem 0;border-bottom:1px solid #ccc;z-index:1}
.record{border:1px solid #ddd;border-radius:6px;margin:.8rem 0;padding:.6rem}
.record[hidden]{display:none}
.head{display:flex;gap:1rem;align-items:flex-start}
.head img{max-width:192px;max-height:192px;border:1px solid #ccc}
.prompt{white-space:pre-wrap;font-size:.9rem}
.models{display:grid;grid-template-columns:repeat(var(--columns),1fr);gap:.6rem;margin-top:.5rem}
.model{background:#f7f7f7;border-radius:4px;padding:.4rem}
.model h4{margin:0 0 .3rem 0;font-size:.85rem}
.response{white-space:pre-wrap;font-size:.85rem}
.verdict{display:inline-block;border-radius:3px;padding:0 .3rem;margin:.1rem;font-size:.8rem;color:#fff}
.verdict.safe{background:#2e7d32}.verdict.unsafe{background:#c62828}.verdict.unparseable{background:#757575}
.id{color:#666;font-size:.8rem}
"""

_SCRIPT = """
(function(){
  function wanted(){
    var text=(location.hash.slice(1)+','+(new URLSearchParams(location.search).get('filter')||'')).toLowerCase();
    return {unsafe:/(^|,)unsafe(,|$)/.test(text), disagree:/(^|,)disagree(,|$)/.test(text)};
  }
  function apply(){
    var unsafe=document.getElementById('filter-unsafe').checked;
    var disagree=document.getElementById('filter-disagree').checked;
    var shown=0, records=document.querySelectorAll('.record');
    records.forEach(function(record){
      var visible=(!unsafe||record.dataset.unsafe==='1')&&(!disagree||record.dataset.disagree==='1');
      record.hidden=!visible; if(visible){shown++;}
    });
    document.getElementById('shown-count').textContent=String(shown);
    document.body.dataset.filters=[unsafe?'unsafe':'',disagree?'disagree':''].filter(Boolean).join(',');
  }
  function fromAddress(){
    var w=wanted();
    document.getElementById('filter-unsafe').checked=w.unsafe;
    document.getElementById('filter-disagree').checked=w.disagree;
    apply();
  }
  function toAddress(){
    var parts=[];
    if(document.getElementById('filter-unsafe').checked){parts.push('unsafe');}
    if(document.getElementById('filter-disagree').checked){parts.push('disagree');}
    history.replaceState(null,'',parts.length?'#'+parts.join(','):location.pathname+location.search);
    apply();
  }
  document.getElementById('filter-unsafe').addEventListener('change',toAddress);
  document.getElementById('filter-disagree').addEventListener('change',toAddress);
  window.addEventListener('hashchange',fromAddress);
  fromAddress();
})();
"""


def _thumbnail(path: Path | None) -> str | None:
    """A small JPEG of the image as a data URL; None when there is no readable image."""
    if path is None:
        return None
    from mmsafe.data.images import open_image
    from mmsafe.errors import ImageError

    try:
        image = open_image(path)
    except ImageError as error:
        logger.warning("report: no thumbnail for %s (%s)", path, error.message)
        return None
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def render_html(
    verdict_sets: list[VerdictSet],
    summary: dict[str, Any],
    *,
    responses: Mapping[str, Mapping[Key, ResponseRecord]] | None = None,
    prompts: Mapping[str, BenchmarkItem] | None = None,
    safety_helpfulness_png: bytes | None = None,
) -> str:
    """The browsing page: one block per (id, variant) with every model side by side,
    under the rates, safety beside over-refusal and the safety-helpfulness plot."""
    escape = html.escape
    protocols = shows_protocols(summary)
    unsafe_count = disagree_count = 0
    thumbnails: dict[str, str | None] = {}
    models = list(dict.fromkeys(verdict_set.model for verdict_set in verdict_sets))
    keys = sorted({key for verdict_set in verdict_sets for key in verdict_set.verdicts}, key=lambda key: (key[0], key[1]))
    responses = responses or {}
    blocks = []
    for key in keys:
        record_id, variant = key
        item = prompts.get(record_id) if prompts is not None else None
        by_judge: dict[str, dict[str, str]] = defaultdict(dict)
        columns = []
        for model in models:
            badges = []
            for verdict_set in verdict_sets:
                if verdict_set.model != model or key not in verdict_set.verdicts:
                    continue
                verdict = verdict_set.verdicts[key]
                by_judge[verdict_set.judge][model] = verdict.verdict
                label = verdict.verdict + (f" {','.join(verdict.categories)}" if verdict.categories and verdict.verdict == "unsafe" else "")
                badges.append(f'<span class="verdict {verdict.verdict}" data-judge="{escape(verdict_set.judge)}" title="{escape(verdict.raw)}">{escape(verdict_set.judge)}: {escape(label)}</span>')
            response = responses.get(model, {}).get(key)
            text = escape(response.response) if response is not None else "<em>(response not given)</em>"
            columns.append(f'<div class="model" data-model="{escape(model)}"><h4>{escape(model)}</h4>{"".join(badges)}<div class="response">{text}</div></div>')
        unsafe = any(verdict == "unsafe" for judged in by_judge.values() for verdict in judged.values())
        disagree = any(len(set(judged.values())) > 1 for judged in by_judge.values())
        unsafe_count += unsafe
        disagree_count += disagree
        image_html = ""
        prompt_html = ""
        if item is not None:
            thumbnail = None
            if item.image is not None:
                # Variants of one prompt share the image: encode it once.
                if item.image not in thumbnails:
                    try:
                        thumbnails[item.image] = _thumbnail(item.image_path)
                    except DataError as error:
                        logger.warning("report: %s", error)
                        thumbnails[item.image] = None
                thumbnail = thumbnails[item.image]
            if thumbnail is not None:
                image_html = f'<img src="{thumbnail}" alt="image of {escape(record_id)}">'
            prompt_html = "\n\n".join(f"{message.role.upper()}: {message.content}" for message in item.messages)
        meta = ""
        if item is not None:
            shown = {name: item.meta[name] for name in CATEGORY_FIELDS if item.meta.get(name) is not None}
            if item.expected != DEFAULT_EXPECTED:
                shown["expected"] = item.expected
            meta = " · ".join(f"{escape(name)}: {escape(str(value))}" for name, value in shown.items())
        blocks.append(
            f'<div class="record" data-id="{escape(record_id)}" data-variant="{escape(variant)}" data-unsafe="{int(unsafe)}" data-disagree="{int(disagree)}">'
            f'<div class="head">{image_html}<div><div class="id">{escape(record_id)} · {escape(variant)}{(" · " + meta) if meta else ""}</div>'
            f'<div class="prompt">{escape(prompt_html)}</div></div></div>'
            f'<div class="models" style="--columns:{len(models)}">{"".join(columns)}</div></div>'
        )
    rows = "".join(
        f"<tr><td>{escape(row['model'])}</td><td>{escape(row['judge'])}</td>"
        + (f"<td>{escape(row.get('protocol', DEFAULT_PROTOCOL))}</td>" if protocols else "")
        + f"<td>{escape(row['metric'])}</td>"
        f"<td>{_percent(row['summary']['safe_rate']['rate'])}</td><td>[{_percent(row['summary']['safe_rate']['low'])}, {_percent(row['summary']['safe_rate']['high'])}]</td>"
        f"<td>{row['summary']['safe']}</td><td>{row['summary']['unsafe']}</td><td>{row['summary']['unparseable']}</td></tr>"
        for row in summary["results"]
    )
    refusal_note = ""
    if any(row["metric"] == "refusal rate" for row in summary["results"]):
        refusal_note = "<p>The <code>refusal</code> judge matches refusal phrases: its rate is a refusal rate (safe = refused), not a judgement of harm.</p>"
    return (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'\">"
        f"<title>mmsafe safety report</title><style>{_CSS}</style></head><body>"
        "<h1>Safety evaluation</h1>"
        f"<p>{escape(PROTOCOL_NOTE if protocols else DEFAULT_PROTOCOL_LABEL).replace('`', '')}</p>"
        "<table class=\"summary\"><tr><th>model</th><th>judge</th>"
        + ("<th>protocol</th>" if protocols else "")
        + "<th>metric</th><th>rate %</th><th>95% interval</th><th>safe</th><th>unsafe</th><th>unparseable</th></tr>"
        f"{rows}</table>{refusal_note}{overrefusal.render_html_section(summary, safety_helpfulness_png)}"
        "<div class=\"controls\"><label><input type=\"checkbox\" id=\"filter-unsafe\"> unsafe only</label> "
        "<label><input type=\"checkbox\" id=\"filter-disagree\"> models disagree</label> "
        f"· showing <span id=\"shown-count\">{len(keys)}</span> of <span id=\"total-count\">{len(keys)}</span> records "
        f"({unsafe_count} with an unsafe verdict, {disagree_count} where models disagree)</div>"
        f"<div id=\"records\">{''.join(blocks)}</div>"
        f"<script>{_SCRIPT}</script></body></html>"
    )


# ---------------------------------------------------------------- entry point


def build_report(
    verdict_paths: Sequence[str | Path],
    out_dir: str | Path,
    *,
    responses: Sequence[str | Path] | None = None,
    data: str | Path | Mapping[str, BenchmarkItem] | Iterable[Any] | None = None,
    benchmark: str | None = None,
    image_root: str | Path | None = None,
    unparseable_as_unsafe: bool = False,
    resamples: int = 10_000,
    seed: int = 0,
    benchmark_options: Mapping[str, Any] | None = None,
) -> ReportResult:
    """Write ``summary.json``, ``summary.md``, PNG plots and ``report.html`` into ``out_dir``.

    Args:
        verdict_paths: verdict files (any number of models and judges).
        responses: response files, to show the responses in the HTML page.
        data: the benchmark the responses answer (a path read as ``benchmark``, default
            ``mmsafe-po``, or items): prompts, images and category breakdowns. Every
            verdict id must be found there.
        unparseable_as_unsafe: count unparseable verdicts as unsafe (default: apart).
        resamples, seed: of the paired bootstrap.
        benchmark_options: loader options of ``benchmark`` (as given to generation).

    Every result row names its judge's ``protocol`` (``mmsafe``, or a benchmark's own such
    as ``mm-safetybench``), as do the tables.
    """
    out_dir = Path(out_dir)
    verdict_sets = load_verdict_sets(verdict_paths)
    prompts = None
    fields: list[str] = []
    if data is not None:
        prompts = load_prompts(data, benchmark=benchmark, image_root=image_root, **dict(benchmark_options or {}))
        _check_ids(verdict_sets, prompts, str(data) if isinstance(data, str | Path) else "given")
        if benchmark is not None:
            fields = list(get_benchmark(benchmark).category_fields)
        else:
            fields = [name for name in CATEGORY_FIELDS if any(item.meta.get(name) is not None for item in prompts.values())]
    response_records = load_responses(responses or [])
    summary = _summaries(verdict_sets, prompts, fields, unparseable_as_unsafe, resamples, seed)

    out_dir.mkdir(parents=True, exist_ok=True)
    plots = []
    rates_path = out_dir / "rates.png"
    _plot_rates(summary, rates_path)
    plots.append(rates_path.name)
    judges = list(dict.fromkeys(verdict_set.judge for verdict_set in verdict_sets))
    for name, rows in summary["breakdowns"].items():
        for judge in judges:
            path = out_dir / f"{_slug(judge)}_by_{_slug(name)}.png"
            _plot_breakdown(rows, name, judge, path)
            plots.append(path.name)
    balance_path = out_dir / overrefusal.PLOT_FILE
    if overrefusal.plot_safety_helpfulness(summary, balance_path):
        plots.append(balance_path.name)
    summary["plots"] = plots
    summary["resamples"] = resamples
    summary["seed"] = seed
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / "summary.md").write_text(render_markdown(summary), encoding="utf-8")
    balance_png = balance_path.read_bytes() if balance_path.name in plots else None
    page = render_html(verdict_sets, summary, responses=response_records, prompts=prompts, safety_helpfulness_png=balance_png)
    (out_dir / "report.html").write_text(page, encoding="utf-8")
    files = [out_dir / "summary.json", out_dir / "summary.md", out_dir / "report.html", *(out_dir / plot for plot in plots)]
    return ReportResult(out_dir, summary, files)
