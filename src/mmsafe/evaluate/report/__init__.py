"""Reports: one self-contained HTML page with every result, ``summary.md``, ``summary.json`` and plots.

:func:`build_report` reads verdict files (one or more models, one or more judges) and
writes into ``out_dir``:

- ``report.html``: the run's header (run, config, models, judges, data, date, mmsafe
  version); the rate per (model, judge) with its Wilson 95% interval, n and the
  unparseable count; over-refusal beside safety where prompts expect help; per-category
  tables; every model-minus-model difference with its paired bootstrap interval and
  exact McNemar p; the modality probe's co-defense and cheating figures when a probe
  summary is given; every plot inline; then every record (thumbnail, prompt, each
  model's response and verdicts) with search and filters. Nothing is fetched: images,
  plots, styles and script are inline.
- ``summary.md`` / ``summary.json``: the same numbers.
- plots, each a 200 dpi PNG with an SVG beside it (:mod:`.plots`).

Modules: :mod:`.summary` (the numbers), :mod:`.markdown`, :mod:`.plots`, :mod:`.page`
(the Jinja2 template ``templates/report.html.jinja``, autoescaped). Number formats are
in :mod:`mmsafe.evaluate.formatting`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mmsafe.data.inputs import source_name
from mmsafe.evaluate.benchmarks import BenchmarkItem, get_benchmark, load_prompts
from mmsafe.evaluate.report.markdown import render_markdown
from mmsafe.evaluate.report.page import THUMBNAIL_SIDE, render_html
from mmsafe.evaluate.report.plots import Plot, write_plots
from mmsafe.evaluate.report.summary import (
    CATEGORY_FIELDS,
    DEFAULT_PROTOCOL,
    DEFAULT_PROTOCOL_LABEL,
    PROTOCOL_NOTE,
    Key,
    ReportResult,
    VerdictSet,
    check_ids,
    header,
    load_probe,
    load_responses,
    load_verdict_sets,
    metric_name,
    shows_protocols,
    summaries,
)

__all__ = [
    "CATEGORY_FIELDS",
    "DEFAULT_PROTOCOL",
    "DEFAULT_PROTOCOL_LABEL",
    "PROTOCOL_NOTE",
    "THUMBNAIL_SIDE",
    "Key",
    "Plot",
    "ReportResult",
    "VerdictSet",
    "build_report",
    "load_probe",
    "load_responses",
    "load_verdict_sets",
    "metric_name",
    "render_html",
    "render_markdown",
    "shows_protocols",
]

#: Where a pipeline run keeps its resolved config (shown in the header when found beside the report).
RUN_CONFIG = "run_config.yaml"


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
    probe: str | Path | None = None,
    run: str | None = None,
    config: str | Path | None = None,
) -> ReportResult:
    """Write ``report.html``, ``summary.md``, ``summary.json`` and the plots into ``out_dir``.

    Args:
        verdict_paths: verdict files (any number of models and judges).
        responses: response files, to show the responses in the page.
        data: the benchmark the responses answer (a path read as ``benchmark``, default
            ``mmsafe-po``, or items): prompts, images and category breakdowns. Every
            verdict id must be found there.
        unparseable_as_unsafe: count unparseable verdicts as unsafe (default: apart).
        resamples, seed: of the paired bootstrap.
        benchmark_options: loader options of ``benchmark`` (as given to generation).
        probe: a probe summary (``probe.json`` from ``mmsafe probe``, or its folder); its
            co-defense and cheating differences join the page. Default: the ``probe``
            folder beside ``out_dir`` when it holds one.
        run: the run's name in the header (default: ``out_dir``, or the run folder
            holding it).
        config: the config file named in the header (default: the run's
            ``run_config.yaml`` beside ``out_dir`` when there is one).

    Every result row names its judge's ``protocol`` (``mmsafe``, or a benchmark's own such
    as ``mm-safetybench``), as do the tables.
    """
    out_dir = Path(out_dir)
    verdict_sets = load_verdict_sets(verdict_paths)
    prompts = None
    fields: list[str] = []
    if data is not None:
        prompts = load_prompts(data, benchmark=benchmark, image_root=image_root, **dict(benchmark_options or {}))
        check_ids(verdict_sets, prompts, source_name(data) or "given")
        if benchmark is not None:
            fields = list(get_benchmark(benchmark).category_fields)
        else:
            fields = [
                name for name in CATEGORY_FIELDS if any(item.meta.get(name) is not None for item in prompts.values())
            ]
    response_records = load_responses(responses or [])
    summary = summaries(verdict_sets, prompts, fields, unparseable_as_unsafe, resamples, seed)
    run_folder = out_dir.parent if (out_dir.parent / RUN_CONFIG).is_file() else None
    if config is None and run_folder is not None:
        config = run_folder / RUN_CONFIG
    if probe is None and (out_dir.parent / "probe" / "probe.json").is_file():
        probe = out_dir.parent / "probe"
    summary["header"] = header(
        verdict_sets,
        run=run or str(run_folder or out_dir),
        config=None if config is None else str(config),
        data=None if data is None else source_name(data, "given items"),
        prompts=prompts,
    )
    if probe is not None:
        summary["probe"] = load_probe(probe)

    out_dir.mkdir(parents=True, exist_ok=True)
    plots = write_plots(summary, out_dir)
    summary["plots"] = [plot.png.name for plot in plots]
    summary["resamples"] = resamples
    summary["seed"] = seed
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / "summary.md").write_text(render_markdown(summary), encoding="utf-8")
    page = render_html(verdict_sets, summary, responses=response_records, prompts=prompts, plots=plots)
    (out_dir / "report.html").write_text(page, encoding="utf-8")
    files = [
        out_dir / "report.html",
        out_dir / "summary.md",
        out_dir / "summary.json",
        *(path for plot in plots for path in (plot.png, plot.svg)),
    ]
    return ReportResult(out_dir, summary, files)
