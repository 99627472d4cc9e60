"""Hostile model and judge names in a report: a ``$`` (mathtext), ``|`` and line breaks
(Markdown tables), raw HTML (``<script>``), a 300-character judge name (a file name)."""

from __future__ import annotations

import json
import re

import pytest

from mmsafe.evaluate.formatting import SLUG_LIMIT, file_slug, markdown_cell
from mmsafe.evaluate.report import build_report


def write_verdicts(path, model, judge="refusal", labels=("safe", "unsafe", "safe"), variants=("default",)):
    rows = [
        {
            "id": str(index),
            "variant": variant,
            "judge": judge,
            "verdict": label,
            "categories": [],
            "raw": "",
            "model": model,
        }
        for index, label in enumerate(labels)
        for variant in variants
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def table_rows(markdown: str, first_header: str) -> list[list[str]]:
    """The cells of the Markdown table whose header starts with ``first_header``, split on unescaped ``|``."""
    lines = markdown.splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


def test_a_dollar_in_a_model_name_is_drawn_as_text_not_mathtext(tmp_path):
    # "$\frac{$" is unbalanced mathtext: matplotlib refused to draw the label (no report was written).
    name = "m$\\frac{$x"
    result = build_report(
        [write_verdicts(tmp_path / "a.jsonl", name), write_verdicts(tmp_path / "b.jsonl", "other")],
        tmp_path / "out",
        resamples=20,
    )
    assert (tmp_path / "out" / "rates.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "out" / "differences.svg").is_file()
    assert result.summary["results"][0]["model"] == name
    assert name in (tmp_path / "out" / "summary.md").read_text(encoding="utf-8")


def test_pipes_and_line_breaks_in_names_keep_the_markdown_table_whole(tmp_path):
    names = ["a|b", "two\nlines"]
    build_report(
        [write_verdicts(tmp_path / f"{index}.jsonl", name) for index, name in enumerate(names)],
        tmp_path / "out",
        resamples=20,
    )
    markdown = (tmp_path / "out" / "summary.md").read_text(encoding="utf-8")
    header, _, *rows = table_rows(markdown, "model")
    assert len(rows) == 2
    assert all(len(row) == len(header) for row in rows), rows
    assert [row[0] for row in rows] == ["a\\|b", "two lines"]


def test_raw_html_in_a_name_is_text_in_the_markdown_and_the_page(tmp_path):
    name = "<script>alert(1)</script>"
    build_report(
        [write_verdicts(tmp_path / "a.jsonl", name, judge="refusal"), write_verdicts(tmp_path / "b.jsonl", "b")],
        tmp_path / "out",
        resamples=20,
    )
    markdown = (tmp_path / "out" / "summary.md").read_text(encoding="utf-8")
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert "<script>alert" not in markdown and "&lt;script&gt;alert(1)&lt;/script&gt;" in markdown
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count("<script>") == 1  # the page's own script only


def test_a_300_character_judge_name_gives_bounded_file_names(tmp_path):
    # Two variants: a plot per judge and variant breakdown, named after the judge (once "File name too long").
    judge = "llm:" + "j" * 296
    result = build_report(
        [write_verdicts(tmp_path / "a.jsonl", "m", judge=judge, variants=("default", "blind"))],
        tmp_path / "out",
        resamples=20,
    )
    assert "variant" in result.summary["breakdowns"]
    assert result.summary["results"][0]["judge"] == judge
    names = [path.name for path in (tmp_path / "out").iterdir()]
    assert max(len(name) for name in names) <= SLUG_LIMIT + 9 + len("_by_variant.png")
    assert (tmp_path / "out" / "report.html").is_file()


@pytest.mark.parametrize(
    ("name", "expected"),
    [("refusal", "refusal"), ("a b", None), ("$", None), ("", None), ("é" * 100, None)],
)
def test_file_slug_is_safe_bounded_and_distinct(name, expected):
    slug = file_slug(name)
    assert re.fullmatch(r"[A-Za-z0-9._-]+", slug) and len(slug) <= SLUG_LIMIT + 9
    if expected is not None:
        assert slug == expected
    else:
        assert re.search(r"-[0-9a-f]{8}$", slug)
    assert file_slug("a:b") != file_slug("a/b")


def test_markdown_cell_escapes_pipes_breaks_and_html():
    assert markdown_cell("a|b\r\nc <b>") == "a\\|b c &lt;b&gt;"
