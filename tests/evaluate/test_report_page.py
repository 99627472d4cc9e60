"""The one report page: every section, numbers equal to a hand computation, degenerate
cases as designed, and (in headless Chromium, offline) search and every filter."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from mmsafe.data.records import ResponseRecord, write_records
from mmsafe.evaluate.formatting import NO_ITEMS, difference_text, p_text, rate_text
from mmsafe.evaluate.probe import summarize_probe
from mmsafe.evaluate.report import build_report
from tests.evaluate.test_report_and_cli import BASE, BPO, write_benchmark
from tests.helpers.browser import keep_screenshots, offline_page

Z = 1.959963984540054


def wilson(successes: int, total: int) -> tuple[float, float]:
    p = successes / total
    denominator = 1 + Z * Z / total
    centre = (p + Z * Z / (2 * total)) / denominator
    half = Z / denominator * math.sqrt(p * (1 - p) / total + Z * Z / (4 * total * total))
    return centre - half, centre + half


def write_probe(folder):
    """A probe.json as mmsafe probe writes it, from synthetic verdicts (text all safe, multimodal half)."""
    verdicts = [
        SimpleNamespace(id=str(index), variant=variant, judge="refusal", verdict=label)
        for index in range(4)
        for variant, label in (("text", "safe"), ("multimodal", "safe" if index < 2 else "unsafe"), ("swap", "safe"))
    ]
    rates, comparisons, conditional = summarize_probe(verdicts, judge="refusal", resamples=200)
    folder.mkdir()
    (folder / "probe.json").write_text(
        json.dumps(
            {
                "records_used": 4,
                "records_skipped": [],
                "rates": {"refusal": rates},
                "comparisons": {"refusal": comparisons},
                "conditional": {"refusal": conditional},
            }
        )
    )
    return folder


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from mmsafe.cli import main

    work = tmp_path_factory.mktemp("page")
    data = write_benchmark(work / "data")
    for model, replies in (("base", BASE), ("bpo", BPO)):
        write_records(
            work / f"{model}.jsonl", [ResponseRecord(str(index), reply, model) for index, reply in enumerate(replies)]
        )
        assert (
            main(
                [
                    "judge",
                    "--responses",
                    str(work / f"{model}.jsonl"),
                    "--out",
                    str(work / f"{model}.verdicts.jsonl"),
                    "--judge",
                    "refusal",
                    "--data",
                    str(data),
                ]
            )
            == 0
        )
    probe = write_probe(work / "probe")
    result = build_report(
        [work / "base.verdicts.jsonl", work / "bpo.verdicts.jsonl"], work / "out",
        responses=[work / "base.jsonl", work / "bpo.jsonl"], data=data, resamples=2000, probe=probe, run="page-test",
    )  # fmt: skip
    return result


def test_page_holds_every_section_and_the_numbers_of_a_hand_computation(report):
    page = report.page.read_text(encoding="utf-8")
    markdown = report.markdown.read_text(encoding="utf-8")
    for anchor in ("header", "results", "by-entity_type", "differences", "probe", "plots", "records-section"):
        assert f'id="{anchor}"' in page, anchor
    assert "<title>mmsafe report: page-test</title>" in page
    # base refuses 1 of 4: Wilson interval computed here, printed as 25.0% [lo, hi]
    low, high = wilson(1, 4)
    expected = f"25.0% [{100 * low:.1f}, {100 * high:.1f}]"
    assert expected == "25.0% [4.6, 69.9]"
    assert f"<td>{expected}</td>" in page and f"| {expected} |" in markdown
    # per-prompt differences bpo - base = [1, 1, 0, 0]: the resampled mean is X/4, X ~ Bin(4, 1/2);
    # P[X = 0] = 1/16 > 2.5% and P[X <= 3] = 15/16 < 97.5%, so the 95% interval is [0, 1]; McNemar p = 2 / 4 = 0.5
    assert "+50.0 pts [+0.0, +100.0]" in page and "+50.0 pts [+0.0, +100.0]" in markdown
    assert "<td>0.500</td>" in page
    # probe: multimodal - text = 2 of 4 prompts lose the refusal, every paired difference is 0 or -1
    assert "co-defense: multimodal vs text" in page and "-50.0 pts [" in page
    assert "cheating: swap vs multimodal" in markdown
    # every plot inline, as PNG and SVG on disk
    assert page.count("data:image/png;base64,") == len(report.summary["plots"]) == 4
    for name in report.summary["plots"]:
        assert (report.out_dir / name).with_suffix(".svg").is_file()


def test_degenerate_cases_print_as_designed(tmp_path):
    assert rate_text({"rate": None, "low": 0.0, "high": 1.0, "total": 0}) == NO_ITEMS == "n/a (no items)"
    assert (
        difference_text({"n": 3, "difference": 1.0, "low": 1.0, "high": 1.0})
        == "+100.0 pts (no spread: all 3 paired differences equal)"
    )
    assert difference_text({"n": 0, "difference": None, "low": None, "high": None}) == NO_ITEMS
    assert (p_text(0.0004), p_text(0.125), p_text(1.0, 0)) == ("< 0.001", "0.125", "n/a")

    def verdicts(name, model, labels):
        rows = [
            {
                "id": str(index),
                "variant": "default",
                "judge": "refusal",
                "verdict": label,
                "categories": [],
                "raw": "",
                "model": model,
            }
            for index, label in enumerate(labels)
        ]
        (tmp_path / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
        return tmp_path / name

    # a model whose every verdict is unparseable has no items; two models that agree on everything have no spread
    result = build_report(
        [
            verdicts("a", "lost", ["unparseable"] * 2),
            verdicts("b", "x", ["safe", "unsafe"]),
            verdicts("c", "y", ["safe", "unsafe"]),
        ],
        tmp_path / "out",
        resamples=50,
    )
    page = result.page.read_text(encoding="utf-8")
    markdown = result.markdown.read_text(encoding="utf-8")
    assert "| lost | refusal | refusal rate | n/a (no items) |" in markdown and "<td>n/a (no items)</td>" in page
    assert "[0.0, 100.0]" not in markdown and "[0.0%, 100.0%]" not in page
    assert "+0.0 pts (no spread: all 2 paired differences equal)" in markdown
    assert "+0.0 pts (no spread: all 2 paired differences equal)" in page


# ---------------------------------------------------------------- headless Chromium, driven by Playwright


@pytest.mark.browser
def test_page_offline_in_chromium_search_and_filters(report, tmp_path):
    url = report.page.as_uri()
    with offline_page(report.page) as opened:
        page, shown = opened.page, opened.shown
        for section in ("#header", "#results", "#by-entity_type", "#differences", "#probe", "#plots", "#records"):
            assert page.locator(section).count() == 1, section
        assert page.inner_text("#header-run") == "page-test"
        assert page.evaluate(
            "Array.from(document.querySelectorAll('#plots img')).every(img => img.complete && img.naturalWidth > 0)"
        )
        boxes = [page.locator("img.thumb").nth(index).bounding_box() for index in range(4)]
        assert {(round(box["width"]), round(box["height"])) for box in boxes} == {
            (194, 194)
        }  # 192 + 1px border each side
        page.screenshot(path=str(tmp_path / "page-top.png"))
        assert shown() == 4
        # search: only bpo's response to id 2 says "apologize"
        page.fill("#search", "apologize")
        assert shown() == 1 and page.locator(".record:not([hidden])").get_attribute("data-id") == "2"
        page.fill("#search", "")
        # category: LOC holds ids 1 and 2
        page.select_option("#filter-category", "entity_type: LOC")
        assert shown() == 2
        page.select_option("#filter-category", "")
        # verdict: some unsafe verdict on ids 0, 1, 3; base's only refusal is id 2
        page.select_option("#filter-verdict", "unsafe")
        assert shown() == 3
        page.select_option("#filter-model", "base")
        page.select_option("#filter-verdict", "safe")
        assert shown() == 1
        assert page.locator(".record:not([hidden]) .model:not([hidden])").count() == 1  # only base's column
        page.screenshot(path=str(tmp_path / "page-filtered.png"), full_page=False)
        page.select_option("#filter-model", "")
        page.select_option("#filter-verdict", "")
        # the two checkboxes, and the address they write
        page.check("#filter-disagree")
        assert shown() == 2 and page.evaluate("location.hash") == "#disagree"
        page.check("#filter-unsafe")
        assert shown() == 2
        page.uncheck("#filter-disagree")
        page.uncheck("#filter-unsafe")
        assert shown() == 4
        # a record's anchor links to it and leaves the filters alone
        anchor = page.locator(".record").nth(3).get_attribute("id")
        page.goto(url + "#" + anchor)
        assert shown() == 4 and page.evaluate("document.querySelector(':target').dataset.id") == "3"
        page.screenshot(path=str(tmp_path / "page-full.png"), full_page=True)
    keep_screenshots(tmp_path, ["page-top.png", "page-filtered.png", "page-full.png"], "report-page")
