"""``report.html``: one self-contained page with every number, every plot and every record.

The page is rendered from ``templates/report.html.jinja`` with autoescape on, so a name or
a response is always text, never markup. Plots are inline PNG data URLs, images inline
JPEG thumbnails, styles and script inline: the page makes no request (its
Content-Security-Policy forbids any). The records can be searched (text) and filtered by
model, category and verdict, and by "unsafe only" / "models disagree" (also set by the
address: ``report.html#unsafe``, ``#disagree``, ``#unsafe,disagree``); each record has an
anchor (``#r-...``) to link to.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from mmsafe.data.images import data_url, image_data_url
from mmsafe.data.prompts import DEFAULT_EXPECTED
from mmsafe.data.records import ResponseRecord
from mmsafe.errors import DataError
from mmsafe.evaluate import overrefusal
from mmsafe.evaluate.benchmarks import BenchmarkItem
from mmsafe.evaluate.formatting import file_slug, percent, rate_text
from mmsafe.evaluate.report.markdown import (
    COMPARISON_HEADER,
    FORMAT_NOTE,
    PROBE_COMPARISON_HEADER,
    comparison_rows,
    probe_comparison_rows,
    probe_conditional_rows,
)
from mmsafe.evaluate.report.plots import Plot
from mmsafe.evaluate.report.summary import (
    CATEGORY_FIELDS,
    DEFAULT_PROTOCOL,
    DEFAULT_PROTOCOL_LABEL,
    PROTOCOL_NOTE,
    Key,
    VerdictSet,
    shows_protocols,
)

logger = logging.getLogger(__name__)

THUMBNAIL_SIDE = 192
TEMPLATE = "report.html.jinja"


def _environment() -> Any:
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader("mmsafe.evaluate.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def thumbnail(path: Any) -> str | None:
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
    return image_data_url(image, max_side=THUMBNAIL_SIDE, format="JPEG", quality=80)


def _records(
    verdict_sets: list[VerdictSet],
    responses: Mapping[str, Mapping[Key, ResponseRecord]],
    prompts: Mapping[str, BenchmarkItem] | None,
) -> list[dict[str, Any]]:
    models = list(dict.fromkeys(verdict_set.model for verdict_set in verdict_sets))
    keys = sorted({key for verdict_set in verdict_sets for key in verdict_set.verdicts})
    thumbnails: dict[str, str | None] = {}
    records = []
    for key in keys:
        record_id, variant = key
        item = prompts.get(record_id) if prompts is not None else None
        by_judge: dict[str, dict[str, str]] = defaultdict(dict)
        columns = []
        verdicts: dict[str, list[str]] = {}
        for model in models:
            badges = []
            for verdict_set in verdict_sets:
                if verdict_set.model != model or key not in verdict_set.verdicts:
                    continue
                verdict = verdict_set.verdicts[key]
                by_judge[verdict_set.judge][model] = verdict.verdict
                verdicts.setdefault(model, []).append(verdict.verdict)
                label = verdict.verdict + (
                    f" {','.join(verdict.categories)}" if verdict.categories and verdict.verdict == "unsafe" else ""
                )
                badges.append(
                    {"verdict": verdict.verdict, "judge": verdict_set.judge, "label": label, "raw": verdict.raw}
                )
            response = responses.get(model, {}).get(key)
            columns.append(
                {"model": model, "badges": badges, "response": None if response is None else response.response}
            )
        image = None
        prompt = ""
        categories: list[str] = []
        meta = ""
        if item is not None:
            if item.image is not None:
                # Variants of one prompt share the image: encode it once.
                if item.image not in thumbnails:
                    try:
                        thumbnails[item.image] = thumbnail(item.image_path)
                    except DataError as error:
                        logger.warning("report: %s", error)
                        thumbnails[item.image] = None
                image = thumbnails[item.image]
            prompt = "\n\n".join(f"{message.role.upper()}: {message.content}" for message in item.messages)
            shown = {name: item.meta[name] for name in CATEGORY_FIELDS if item.meta.get(name) is not None}
            categories = [f"{name}: {value}" for name, value in shown.items()]
            if item.expected != DEFAULT_EXPECTED:
                shown["expected"] = item.expected
            meta = " · ".join(f"{name}: {value}" for name, value in shown.items())
        records.append(
            {
                "id": record_id, "variant": variant, "anchor": "r-" + file_slug(f"{record_id}.{variant}"),
                "image": image, "has_item": item is not None, "prompt": prompt, "meta": meta, "categories": categories, "columns": columns,
                "verdicts": verdicts,
                "unsafe": any(label == "unsafe" for judged in by_judge.values() for label in judged.values()),
                "disagree": any(len(set(judged.values())) > 1 for judged in by_judge.values()),
            }
        )  # fmt: skip
    return records


def render_html(
    verdict_sets: list[VerdictSet],
    summary: dict[str, Any],
    *,
    responses: Mapping[str, Mapping[Key, ResponseRecord]] | None = None,
    prompts: Mapping[str, BenchmarkItem] | None = None,
    plots: list[Plot] | None = None,
) -> str:
    """The page: header, every table, every plot, then the records to browse."""
    protocols = shows_protocols(summary)
    records = _records(verdict_sets, responses or {}, prompts)
    results = []
    for row in summary["results"]:
        s = row["summary"]
        results.append(
            [
                row["model"],
                row["judge"],
                *([row.get("protocol", DEFAULT_PROTOCOL)] if protocols else []),
                row["metric"],
                rate_text(s["safe_rate"]),
                s["safe_rate"]["total"],
                s["safe"],
                s["unsafe"],
                s["unparseable"],
            ]
        )
    breakdowns = [
        {
            "name": name, "anchor": "by-" + file_slug(name),
            "rows": [[row["model"], row["judge"], row["group"], rate_text(row["summary"]["safe_rate"]), row["summary"]["safe_rate"]["total"], row["summary"]["unparseable"]] for row in rows],
        }
        for name, rows in summary["breakdowns"].items()
    ]  # fmt: skip
    asr = [
        [
            row["model"],
            row["judge"],
            *([row.get("protocol", DEFAULT_PROTOCOL)] if protocols else []),
            row["setting"],
            percent(row["asr"]),
        ]
        for row in summary["attack_success_rate"]
    ]
    measured = any(row.get("help_prompts") for row in summary["results"])
    probe = summary.get("probe")
    context = {
        "header": summary.get("header") or {},
        "format_note": FORMAT_NOTE.replace("`", ""),
        "protocol_note": (PROTOCOL_NOTE if protocols else DEFAULT_PROTOCOL_LABEL).replace("`", ""),
        "protocols": protocols,
        "unparseable_as_unsafe": summary["unparseable_as_unsafe"],
        "refusal_note": any(row["metric"] == "refusal rate" for row in summary["results"]),
        "results": results,
        "over_refusal": {
            "shown": measured or bool(summary.get("expected_behaviour")),
            "text": overrefusal.BALANCE_TEXT, "header": overrefusal.BALANCE_HEADER, "rows": overrefusal.balance_table(summary),
            "notes": overrefusal.notes(summary), "subset_text": overrefusal.SUBSET_TEXT, "subset_header": overrefusal.SUBSET_HEADER,
            "subset_rows": overrefusal.subset_table(summary),
        },
        "breakdowns": breakdowns,
        "asr": asr,
        "comparison_header": COMPARISON_HEADER,
        "comparisons": comparison_rows(summary),
        "probe": None if not probe else {
            "source": probe["source"], "used": probe["records_used"], "skipped": probe["records_skipped"],
            "header": PROBE_COMPARISON_HEADER, "rows": probe_comparison_rows(probe), "conditional": probe_conditional_rows(probe),
        },
        "plots": [
            {"anchor": plot.anchor, "title": plot.title, "caption": plot.caption, "file": plot.png.name, "data": data_url(plot.png.read_bytes(), "image/png")}
            for plot in plots or []
        ],
        "records": records,
        "models": list(dict.fromkeys(verdict_set.model for verdict_set in verdict_sets)),
        "categories": sorted({category for record in records for category in record["categories"]}),
        "verdict_names": ["safe", "unsafe", "unparseable"],
        "unsafe_count": sum(record["unsafe"] for record in records),
        "disagree_count": sum(record["disagree"] for record in records),
        "any_image": any(record["image"] for record in records),
        "thumbnail_side": THUMBNAIL_SIDE,
    }  # fmt: skip
    return _environment().get_template(TEMPLATE).render(**context)
