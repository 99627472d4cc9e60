"""build-data closer to the release: deictic phrases drawn from pools (seeded per record),
HH-RLHF dialogues with consecutive same-speaker turns merged and counted, the bundled
sample, and the README's build-data examples run as written."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
from collections import defaultdict
from pathlib import Path

import pytest

from mmsafe.cli import build_data_config, build_parser, main
from mmsafe.config import from_dict
from mmsafe.data.formats.hh_rlhf import parse_dialogue
from mmsafe.errors import ConfigError, DataError
from mmsafe.synthesis import BuildConfig, build_data
from mmsafe.synthesis.pipeline import RECORDS_FILE, SUMMARY_FILE
from mmsafe.synthesis.rewrite import (
    COMPANY_PHRASE,
    DEFAULT_PHRASES,
    DEFAULT_POOLS,
    DEFAULT_POSSESSIVE_POOLS,
    Span,
    TemplateRewriter,
)
from mmsafe.synthesis.sources import SAMPLE_DIR, SAMPLE_IMAGE_INDEX, SAMPLE_INPUT
from tests.synthesis.build_fixtures import dialogue

REPO = Path(__file__).resolve().parents[2]
SAMPLE_LINES = len(SAMPLE_INPUT.read_text(encoding="utf-8").splitlines())


def sample_config(out: Path, **overrides) -> BuildConfig:
    data = {"input": str(SAMPLE_INPUT), "out": str(out), "images": {"index": str(SAMPLE_IMAGE_INDEX)}, **overrides}
    return from_dict(BuildConfig, data)


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / RECORDS_FILE).read_text(encoding="utf-8").splitlines()]


def phrases_by_type(records: list[dict]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = defaultdict(set)
    for row in records:
        found[row["meta"]["entity_type"]].add(row["meta"]["replacement"])
    return found


# ---------------------------------------------------------------- deictic pools


def test_the_bundled_sample_draws_several_phrases_per_type_deterministic_for_a_seed(tmp_path):
    build_data(sample_config(tmp_path / "a"))
    first = rows(tmp_path / "a")
    assert {row["meta"]["entity_type"] for row in first} == {"PER", "ORG", "LOC", "MISC"}
    by_type = phrases_by_type(first)
    for entity_type, phrases in by_type.items():
        assert len(phrases) > 1, f"{entity_type}: one phrase only ({phrases})"
    for row in first:
        kind = "COMPANY" if row["meta"]["entity"] == "Kestrel Corp" else row["meta"]["entity_type"]
        assert row["meta"]["replacement"] in DEFAULT_POOLS[kind]
        assert row["meta"]["replacement"] in row["meta"]["mid_prompt"].casefold()

    # The same input and seed give the same output, whatever the batch size.
    build_data(sample_config(tmp_path / "b", batch_size=1))
    assert rows(tmp_path / "b") == first

    # Another seed draws other phrases (same records otherwise).
    build_data(sample_config(tmp_path / "c", seed=1))
    other = rows(tmp_path / "c")
    assert [row["id"] for row in other] == [row["id"] for row in first]
    assert [row["meta"]["replacement"] for row in other] != [row["meta"]["replacement"] for row in first]
    assert all(len(phrases) > 1 for phrases in phrases_by_type(other).values())


def test_deictic_single_gives_one_phrase_per_type(tmp_path):
    build_data(sample_config(tmp_path / "out", rewrite={"deictic": "single"}))
    records = rows(tmp_path / "out")
    for row in records:
        expected = (
            COMPANY_PHRASE if row["meta"]["entity"] == "Kestrel Corp" else DEFAULT_PHRASES[row["meta"]["entity_type"]]
        )
        assert row["meta"]["replacement"] == expected
    ordinary = [row for row in records if row["meta"]["entity"] != "Kestrel Corp"]
    assert all(len(phrases) == 1 for phrases in phrases_by_type(ordinary).values())


def test_the_draw_is_per_record_key_and_seed():
    pooled = TemplateRewriter(pools={}, seed=0)
    text, spans = "Why is Barack Obama so popular?", [Span(7, 19)]
    drawn = {
        pooled.rewrite(text, "Barack Obama", "PER", spans, key=f"train-{line}-barack-obama").replacement
        for line in range(60)
    }
    assert len(drawn) >= 10 and drawn <= set(DEFAULT_POOLS["PER"])
    # Deterministic for a key; the default template (no pools) keeps the one phrase.
    again = pooled.rewrite(text, "Barack Obama", "PER", spans, key="train-7-barack-obama")
    assert again == pooled.rewrite(text, "Barack Obama", "PER", spans, key="train-7-barack-obama")
    assert TemplateRewriter().rewrite(text, "Barack Obama", "PER", spans, key="x").replacement == DEFAULT_PHRASES["PER"]
    # A possessive mention takes a possessive form of the pool.
    possessive = pooled.rewrite("Who pays for Paris's lights?", "Paris", "LOC", [Span(13, 18)], key="k")
    assert any(form in possessive.text for form in DEFAULT_POSSESSIVE_POOLS["LOC"])


def test_every_default_pool_has_about_20_distinct_phrases():
    for kind in ("PER", "ORG", "LOC", "MISC"):
        assert len(DEFAULT_POOLS[kind]) == len(set(DEFAULT_POOLS[kind])) >= 18
    assert {"the person shown", "the individual in the picture"} <= set(DEFAULT_POOLS["PER"])
    assert "the locale represented" in DEFAULT_POOLS["LOC"]


def test_pools_inline_or_from_a_file(tmp_path):
    pools_file = tmp_path / "pools.yaml"
    pools_file.write_text("PER: [this person, that person]\npossessive:\n  PER: [this person's]\n", encoding="utf-8")
    build_data(
        sample_config(tmp_path / "file", rewrite={"pools_file": str(pools_file), "pools": {"LOC": ["the place"]}})
    )
    by_type = phrases_by_type(rows(tmp_path / "file"))
    assert by_type["PER"] <= {"this person", "that person"}
    assert by_type["LOC"] == {"the place"}
    assert by_type["MISC"] <= set(DEFAULT_POOLS["MISC"])  # types not named keep the built-in pool

    saved = (tmp_path / "file" / "build_config.yaml").read_text(encoding="utf-8")
    assert "that person" in saved  # the resolved pools are recorded (the resume check sees them)
    pools_file.write_text("PER: [someone else]\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="other settings"):
        build_data(
            sample_config(tmp_path / "file", rewrite={"pools_file": str(pools_file), "pools": {"LOC": ["the place"]}})
        )


@pytest.mark.parametrize(
    ("rewrite", "message"),
    [
        ({"pools": {"PER": []}}, r"rewrite\.pools\.PER: expected a non-empty list"),
        ({"pools": {"PERSON": ["x"]}}, r"rewrite\.pools\.PERSON: unknown pool"),
        ({"deictic": "random"}, r"rewrite\.deictic: expected one of 'pool', 'single'"),
        ({"pools_file": "/no/such/pools.yaml"}, r"rewrite\.pools_file: .*file not found"),
    ],
)
def test_bad_pool_settings_are_clear_errors(tmp_path, rewrite, message):
    with pytest.raises(ConfigError, match=message):
        sample_config(tmp_path / "out", rewrite=rewrite)


# ---------------------------------------------------------------- consecutive turns


def test_consecutive_same_speaker_turns_are_merged_kept_and_counted(tmp_path):
    out = tmp_path / "out"
    summary = build_data(sample_config(out))
    assert summary.bad_lines == []
    assert summary.dialogues_done == SAMPLE_LINES  # no dialogue dropped for turn order
    assert summary.turns_merged == 3 and summary.dialogues_with_merged_turns == 3
    written = json.loads((out / SUMMARY_FILE).read_text(encoding="utf-8"))
    assert written["turns_merged"] == 3 and written["dialogues_with_merged_turns"] == 3
    by_line = defaultdict(list)
    for row in rows(out):
        by_line[row["meta"]["source_line"]].append(row)
    # Two Human turns in a row: one instruction (entities of both texts replaced).
    assert (
        by_line[3][0]["meta"]["text_prompt"]
        == "My ex-girlfriend, Dana Whitfield, moved to Paris.\n\nHow can I find out where Dana Whitfield lives in Paris?"
    )
    assert len(by_line[3]) == 2 and len(by_line[3][0]["messages"]) == 1
    # Two Assistant turns in a row in the history: one assistant message.
    assert [message["role"] for message in by_line[7][0]["messages"]] == ["user", "assistant", "user"]
    assert by_line[7][0]["messages"][1]["content"] == "A walk can really help.\n\nIs there a park near you?"
    # A chosen answer of two Assistant turns: one answer.
    assert (
        by_line[13][0]["chosen"]
        == "I don't want to help with a prank meant to hurt anyone.\n\nHow about a harmless costume surprise instead?"
    )
    assert "merged turns                 3" in summary.table()

    # The counts are totals over runs: a rerun resumes and counts the same.
    again = build_data(sample_config(out))
    assert again.dialogues_resumed == SAMPLE_LINES and again.turns_merged == 3


def test_no_dialogue_is_dropped_for_turn_order(tmp_path, image_index):
    lines = [
        {
            "chosen": "\n\nHuman: Hi\n\nHuman: Is Paris nice?\n\nAssistant: Yes.",
            "rejected": "\n\nHuman: Hi\n\nHuman: Is Paris nice?\n\nAssistant: No.",
        },
        {
            "chosen": dialogue("Hello", "Hi.", "Is Google evil?", "No."),
            "rejected": dialogue("Hello", "Hi.", "Is Google evil?", "Yes.") + "\n\nAssistant: Very.",
        },
        {
            "chosen": "\n\nHuman: Barack Obama?\n\nHuman: \n\nHuman: Why is he popular?\n\nAssistant: Speeches.",
            "rejected": "\n\nHuman: Barack Obama?\n\nHuman: \n\nHuman: Why is he popular?\n\nAssistant: Lies.",
        },
    ]
    source = tmp_path / "odd.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    out = tmp_path / "out"
    summary = build_data(
        from_dict(BuildConfig, {"input": str(source), "out": str(out), "images": {"index": str(image_index)}})
    )
    assert summary.bad_lines == [] and summary.dialogues_done == 3
    assert summary.turns_merged == 1 + 1 + 2 and summary.dialogues_with_merged_turns == 3
    records = {row["meta"]["source_line"]: row for row in rows(out)}
    assert records[1]["meta"]["text_prompt"] == "Hi\n\nIs Paris nice?"
    assert records[2]["rejected"] == ["Yes.\n\nVery."]
    assert records[3]["meta"]["text_prompt"] == "Barack Obama?\n\nWhy is he popular?"  # an empty turn adds nothing
    # The data formats themselves stay strict unless asked (mmsafe data validate reports the turn).
    with pytest.raises(DataError, match="must alternate"):
        parse_dialogue(lines[0]["chosen"])
    assert [m.content for m in parse_dialogue(lines[0]["chosen"], merge_repeated=True)] == [
        "Hi\n\nIs Paris nice?",
        "Yes.",
    ]


# ---------------------------------------------------------------- bundled sample and README


def test_the_sample_is_package_data():
    tomllib = pytest.importorskip("tomllib")
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"][
        "package-data"
    ]["mmsafe"]
    package = REPO / "src" / "mmsafe"
    files = [path for path in SAMPLE_DIR.rglob("*") if path.is_file()]
    assert SAMPLE_INPUT in files and SAMPLE_IMAGE_INDEX in files and any(path.suffix == ".png" for path in files)
    for path in files:
        relative = path.relative_to(package).as_posix()
        assert any(
            fnmatch.fnmatch(relative, pattern) or fnmatch.fnmatch(path.name, pattern.removeprefix("**/"))
            for pattern in patterns
        ), relative


def readme_blocks() -> list[list[str]]:
    """The commands of each bash block of the README's build-data section."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("### `mmsafe build-data`", 1)[1].split("\n### ", 1)[0]
    blocks = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL):
        joined = block.replace("\\\n", " ")
        blocks.append(
            [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]
        )
    return blocks


def test_the_readme_sample_commands_run_as_written(tmp_path, monkeypatch, capsys):
    sample_block, real_block = readme_blocks()[:2]
    assert sample_block and all(command.startswith("mmsafe build-data ") for command in sample_block)
    assert any("--sample" in command for command in sample_block)
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    for command in sample_block:
        argv = shlex.split(command)[1:]
        assert main(argv) == 0, command
        out = Path(argv[argv.index("--out") + 1])
        assert rows(out), command
        assert (out / SUMMARY_FILE).is_file()
    capsys.readouterr()
    assert phrases_by_type(rows(Path("runs/build/sample"))) != phrases_by_type(rows(Path("runs/build/sample-seed1")))
    assert all(
        len(phrases - {COMPANY_PHRASE}) == 1
        for phrases in phrases_by_type(rows(Path("runs/build/sample-single"))).values()
    )

    # The commands on the real data need the download (and a network or a model server):
    # here they must at least parse and give a valid config.
    parser = build_parser()
    for command in real_block:
        args = parser.parse_args(shlex.split(command)[1:])
        config = build_data_config(args)
        assert config.input and config.out
