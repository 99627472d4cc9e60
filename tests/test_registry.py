"""The one registry type behind data formats, benchmarks and judges, and its plugins.

Plugins are provided the way an installed package provides them: a ``*.dist-info``
folder with an ``entry_points.txt`` and the plugin module, in a folder put on
``sys.path`` for one test.
"""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from mmsafe.cli import main
from mmsafe.data.formats import FORMATS, detect_format, get_format
from mmsafe.errors import ConfigError, DataError
from mmsafe.evaluate.benchmarks import BENCHMARKS, available_benchmarks, get_benchmark
from mmsafe.evaluate.judges import JUDGES, available_judges, get_judge
from mmsafe.registry import Registry

PLUGIN_MODULE = "mmsafe_registry_test_plugin"

PLUGIN_SOURCE = '''
"""A third-party package: a data format, a benchmark and two judges."""

from pathlib import Path

from mmsafe.data.formats import Format
from mmsafe.data.prompts import BenchmarkItem
from mmsafe.data.reading import parse_each
from mmsafe.data.records import Message, PreferenceRecord
from mmsafe.evaluate.judges import Verdict


def _record(number, line):
    chosen, rejected = line.split("\\t")
    return PreferenceRecord(f"tsv-{number}", [Message("user", "question")], chosen, [rejected])


def read_tsv(path, *, image_dir=None):
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return parse_each(enumerate(lines, start=1), _record, file=str(path))


FORMAT = Format(name="tsv", description="chosen<TAB>rejected per line", detect=lambda path: str(path).endswith(".tsv"), read_items=read_tsv)


def load_scenarios(path):
    """Two prompts, one per scenario."""
    return [BenchmarkItem(f"p{index}", [Message("user", f"question {index}")], meta={"scenario": f"scenario-{index}"}) for index in range(2)]


class AlwaysUnsafe:
    """Labels every response unsafe."""

    name = "always-unsafe-v1"
    needs_prompt = False

    def judge(self, items):
        return [Verdict("unsafe") for _ in items]


class EchoCategory:
    """Labels every response safe, with the prompt's category."""

    name = "echo-category-v1"

    def judge(self, items):
        return [Verdict("safe", [item.category] if item.category else []) for item in items]
'''

ENTRY_POINTS = f"""
[mmsafe.formats]
tsv-pairs = {PLUGIN_MODULE}:FORMAT

[mmsafe.benchmarks]
plugin-scenarios = {PLUGIN_MODULE}:load_scenarios
plugin-broken = {PLUGIN_MODULE}_missing:THING

[mmsafe.judges]
always-unsafe = {PLUGIN_MODULE}:AlwaysUnsafe
echo-category = {PLUGIN_MODULE}:EchoCategory
refusal = {PLUGIN_MODULE}:AlwaysUnsafe
"""


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """An installed plugin package (its module not imported yet)."""
    site = tmp_path / "site"
    info = site / "mmsafe_registry_test_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: mmsafe-registry-test-plugin\nVersion: 0.1\n", encoding="utf-8"
    )
    (info / "entry_points.txt").write_text(textwrap.dedent(ENTRY_POINTS), encoding="utf-8")
    (site / f"{PLUGIN_MODULE}.py").write_text(PLUGIN_SOURCE, encoding="utf-8")
    monkeypatch.delitem(sys.modules, PLUGIN_MODULE, raising=False)
    monkeypatch.syspath_prepend(str(site))
    yield site
    sys.modules.pop(PLUGIN_MODULE, None)


def _responses(path, ids):
    path.write_text(
        "".join(json.dumps({"id": id_, "response": "Sure, here is how.", "model": "m"}) + "\n" for id_ in ids),
        encoding="utf-8",
    )
    return path


# ---------------------------------------------------------------- the registry type


def test_register_lookup_and_duplicates():
    colours: Registry[str] = Registry("colour")
    colours.register("red", "#f00")

    @colours.register("green")
    def green() -> str:
        """The colour of grass."""
        return "#0f0"

    assert colours.lookup("red") == "#f00" and colours.lookup("green") is green
    assert list(colours) == ["red", "green"] and "red" in colours and "blue" not in colours
    assert [(entry.name, entry.description) for entry in colours.describe()][1] == ("green", "The colour of grass.")
    with pytest.raises(ValueError, match="a colour named 'red' is already registered"):
        colours.register("red", "#e00")
    assert colours.lookup("red") == "#f00"  # the refused one changed nothing
    colours.register("red", "#e00", replace=True)
    assert colours.lookup("red") == "#e00"
    copy = colours.copy()
    copy.register("blue", "#00f")
    assert "blue" not in colours


def test_unknown_names_get_a_did_you_mean_and_the_list():
    colours: Registry[str] = Registry("colour")
    for name in ("red", "green", "blue"):
        colours.register(name, name)
    with pytest.raises(
        ConfigError, match=r"^unknown colour 'gren'; expected one of red, green, blue \(did you mean 'green'\?\)$"
    ):
        colours.lookup("gren")
    with pytest.raises(
        ConfigError, match=r"^unknown colour 'purple'; expected one of red, green, blue$"
    ):  # nothing close: no hint
        colours.lookup("purple")
    with pytest.raises(KeyError):
        colours["gren"]
    # the three real registries say it in their own error types
    with pytest.raises(DataError, match=r"unknown data format 'jsonll'; expected one of .* \(did you mean 'jsonl'\?\)"):
        get_format("jsonll")
    with pytest.raises(ConfigError, match=r"unknown benchmark 'vlgaurd'.*\(did you mean 'vlguard'\?\)"):
        get_benchmark("vlgaurd")
    with pytest.raises(ConfigError, match=r"unknown judge 'refusl'.*\(did you mean 'refusal'\?\)"):
        get_judge("refusl")


# ---------------------------------------------------------------- entry points


def test_each_group_loads_its_plugin_lazily(plugin):
    # listing names reads the groups but imports no plugin
    assert "tsv-pairs" in FORMATS.names()
    assert {"plugin-scenarios", "plugin-broken"} <= set(available_benchmarks())
    assert {"always-unsafe", "echo-category"} <= set(available_judges())
    assert PLUGIN_MODULE not in sys.modules
    data_format = get_format("tsv-pairs")
    assert PLUGIN_MODULE in sys.modules
    assert data_format.name == "tsv-pairs"  # the entry point's name wins
    assert get_benchmark("plugin-scenarios").description == "Two prompts, one per scenario."
    assert get_judge("always-unsafe").name == "always-unsafe-v1"
    # a plugin cannot take over a built-in name
    assert type(get_judge("refusal")).__name__ == "RefusalJudge"
    assert [entry.source for entry in JUDGES.describe() if entry.name == "refusal"] == ["built-in or registered"]
    # a broken plugin is one error naming it; the others still work
    with pytest.raises(
        ConfigError,
        match=r"benchmark plugin 'plugin-broken' \(mmsafe_registry_test_plugin_missing:THING\) could not be loaded",
    ):
        get_benchmark("plugin-broken")
    assert get_benchmark("mmsafe-po").name == "mmsafe-po"
    assert "plugin-broken" not in BENCHMARKS.available()


def test_without_the_plugin_its_names_are_gone():
    assert "tsv-pairs" not in FORMATS and "plugin-scenarios" not in BENCHMARKS and "always-unsafe" not in JUDGES


# ---------------------------------------------------------------- through the CLI


def test_a_plugin_format_is_detected_and_converted_by_the_cli(plugin, tmp_path, capsys):
    source = tmp_path / "pairs.tsv"
    source.write_text("No.\tYes.\nI won't.\tHere it is.\n", encoding="utf-8")
    assert detect_format(source) == "tsv-pairs"
    out = tmp_path / "records.jsonl"
    assert main(["data", "convert", str(source), str(out)]) == 0
    assert "converted 2 records (tsv-pairs)" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [(row["id"], row["chosen"], row["rejected"]) for row in rows] == [
        ("tsv-1", "No.", ["Yes."]),
        ("tsv-2", "I won't.", ["Here it is."]),
    ]


def test_a_plugin_benchmark_gives_the_judge_its_prompts_through_the_cli(plugin, tmp_path):
    responses = _responses(tmp_path / "responses.jsonl", ["p0", "p1"])
    out = tmp_path / "verdicts.jsonl"
    args = [
        "judge",
        "--judge",
        "echo-category",
        "--responses",
        str(responses),
        "--out",
        str(out),
        "--data",
        str(tmp_path),
        "--benchmark",
        "plugin-scenarios",
    ]
    assert main(args) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert {row["id"]: row["categories"] for row in rows} == {"p0": ["scenario-0"], "p1": ["scenario-1"]}


def test_a_plugin_judge_labels_through_the_cli(plugin, tmp_path, capsys):
    responses = _responses(tmp_path / "responses.jsonl", ["a", "b"])
    out = tmp_path / "verdicts.jsonl"
    assert main(["judge", "--judge", "always-unsafe", "--responses", str(responses), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [(row["id"], row["judge"], row["verdict"]) for row in rows] == [
        ("a", "always-unsafe-v1", "unsafe"),
        ("b", "always-unsafe-v1", "unsafe"),
    ]
    # a typo is one line with a hint, not a traceback
    assert main(["judge", "--judge", "always-unsafee", "--responses", str(responses), "--out", str(out)]) == 1
    assert "did you mean 'always-unsafe'?" in capsys.readouterr().err
