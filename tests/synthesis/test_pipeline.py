"""build_data end to end: gazetteer + local images + template against hand-written records."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmsafe.cli import main
from mmsafe.config import from_dict
from mmsafe.data.records import read_preference_records
from mmsafe.errors import ConfigError, DataError
from mmsafe.synthesis import BuildConfig, Stages, build_data, make_stages
from mmsafe.synthesis.entities import Mention
from mmsafe.synthesis.images import ImageChain
from mmsafe.synthesis.pipeline import RECORDS_FILE, STATE_FILE, group_mentions
from mmsafe.synthesis.rewrite import TemplateRewriter
from tests.synthesis.build_fixtures import hh_line


def config_for(hh_file: Path, image_index: Path, out: Path, **overrides) -> BuildConfig:
    """The fixture's config; one fixed deictic phrase per type (the hand-written records'),
    unless ``rewrite`` says otherwise (tests/synthesis/test_build_release_form.py covers pools)."""
    data = {"input": str(hh_file), "out": str(out), "images": {"index": str(image_index)}, **overrides}
    data["rewrite"] = {"deictic": "single", **data.get("rewrite", {})}
    return from_dict(BuildConfig, data)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def expected_records(source_file: str) -> list[dict]:
    """The records worked out by hand from tests/synthesis/conftest.py's HH_LINES."""

    def meta(entity, entity_type, replacement, text_prompt, mid_prompt, line):
        return {
            "type": "harmless",
            "entity": entity,
            "entity_type": entity_type,
            "replacement": replacement,
            "text_prompt": text_prompt,
            "mid_prompt": mid_prompt,
            "rewrite": "template",
            "image_source": "local",
            "source_file": source_file,
            "source_line": line,
            "source_id": f"train-{line}",
        }

    trouble = [
        {"role": "user", "content": "I want to cause trouble."},
        {"role": "assistant", "content": "What kind of trouble?"},
    ]
    greeting = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Tell me more."},
        {"role": "assistant", "content": "Sure."},
    ]
    vandalize = "Is it easy to vandalize Google offices in Paris?"
    eiffel = "The Eiffel Tower is ugly. Who pays for Eiffel Tower's lights?"
    return [
        {
            "id": "train-1-barack-obama",
            "messages": [{"role": "user", "content": "<image>\nWhy is the person featured in the image so popular?"}],
            "image": "images/obama.png",
            "chosen": "Many people liked his speeches.",
            "rejected": ["Because he lies to everyone."],
            "rejected_sources": ["human"],
            "meta": meta(
                "Barack Obama",
                "PER",
                "the person featured in the image",
                "Why is Barack Obama so popular?",
                "Why is the person featured in the image so popular?",
                1,
            ),
        },
        {
            "id": "train-2-google",
            "messages": [
                *trouble,
                {
                    "role": "user",
                    "content": "<image>\nIs it easy to vandalize the organization in the image offices in Paris?",
                },
            ],
            "image": "images/google.png",
            "chosen": "I can't help with vandalism.",
            "rejected": ["Yes, just bring spray paint."],
            "rejected_sources": ["human"],
            "meta": meta(
                "Google",
                "ORG",
                "the organization in the image",
                vandalize,
                "Is it easy to vandalize the organization in the image offices in Paris?",
                2,
            ),
        },
        {
            "id": "train-2-paris",
            "messages": [
                *trouble,
                {
                    "role": "user",
                    "content": "<image>\nIs it easy to vandalize Google offices in the site visible in the image?",
                },
            ],
            "image": "images/paris.png",
            "chosen": "I can't help with vandalism.",
            "rejected": ["Yes, just bring spray paint."],
            "rejected_sources": ["human"],
            "meta": meta(
                "Paris",
                "LOC",
                "the site visible in the image",
                vandalize,
                "Is it easy to vandalize Google offices in the site visible in the image?",
                2,
            ),
        },
        {
            "id": "train-5-eiffel-tower",
            "messages": [
                *greeting,
                {
                    "role": "user",
                    "content": "<image>\nThe site visible in the image is ugly. Who pays for the pictured site's lights?",
                },
            ],
            "image": "images/eiffel_tower.png",
            "chosen": "Paris pays for them.",
            "rejected": ["Nobody, burn it."],
            "rejected_sources": ["human"],
            "meta": meta(
                "Eiffel Tower",
                "LOC",
                "the site visible in the image",
                eiffel,
                "The site visible in the image is ugly. Who pays for the pictured site's lights?",
                5,
            ),
        },
    ]


def test_gazetteer_local_template_give_the_hand_written_records(hh_file, image_index, tmp_path):
    out = tmp_path / "out"
    summary = build_data(config_for(hh_file, image_index, out))

    assert read_rows(out / RECORDS_FILE) == expected_records(str(hh_file))
    assert sorted(path.name for path in (out / "images").iterdir()) == [
        "eiffel_tower.png",
        "google.png",
        "obama.png",
        "paris.png",
    ]
    # Every record is valid against the preference contract and its image opens.
    assert len(list(read_preference_records(out / RECORDS_FILE))) == 4

    assert summary.records == summary.records_written == 4
    assert summary.dialogues_done == 5  # lines 1, 2, 3, 5, 6 (line 4 is not JSON)
    assert summary.dialogues_with_records == 3
    assert summary.entities == 5  # 1 + 2 + 0 + 1 + 1 (line 6 repeats line 1)
    assert summary.duplicates == 1
    assert summary.entities_without_image == 0
    assert summary.by_entity_type == {"PER": 1, "ORG": 1, "LOC": 2}
    assert summary.by_turns == {"1": 1, "2": 2, "3": 1}  # lines 1; 2 (two records); 5
    assert summary.images == 4
    assert (
        len(summary.bad_lines) == 1
        and f"{hh_file}:line 4:" in summary.bad_lines[0]
        and "malformed JSON" in summary.bad_lines[0]
    )
    assert json.loads((out / "summary.json").read_text())["by_entity_type"] == {"PER": 1, "ORG": 1, "LOC": 2}
    assert (out / "build_config.yaml").is_file()


def test_bad_line_fails_at_its_line_when_asked(hh_file, image_index, tmp_path):
    with pytest.raises(DataError, match=r"train\.jsonl:line 4:"):
        build_data(config_for(hh_file, image_index, tmp_path / "out", on_bad_line="fail"))


class FixedRecognizer:
    """Returns the mentions it is given for every instruction containing their text."""

    name = "fixed"

    def __init__(self, entities: list[tuple[str, str]]) -> None:
        self.entities = entities

    def recognize(self, texts):
        results = []
        for text in texts:
            mentions = []
            for name, entity_type in self.entities:
                start = text.find(name)
                if start >= 0:
                    mentions.append(Mention(name, entity_type, start, start + len(name), name))
            results.append(mentions)
        return results


def test_entities_without_image_are_dropped_and_counted(hh_file, image_index, tmp_path):
    config = config_for(hh_file, image_index, tmp_path / "out")
    stages = make_stages(config)
    stages.recognizer = FixedRecognizer([("Barack Obama", "PER"), ("bread", "MISC")])
    summary = build_data(config, stages=stages)
    assert summary.entities_without_image == 1  # "bread" of line 3
    assert summary.records == 1 and summary.duplicates == 1


def test_cap_is_deterministic_for_a_seed(tmp_path, image_index):
    names = ["Barack Obama", "Google", "Paris", "Eiffel Tower"]
    lines = [hh_line([f"Dialogue {index}: " + " and ".join(names) + "?"], "No.", "Yes.") for index in range(12)]
    source = tmp_path / "many.jsonl"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def run(out: str, seed: int) -> list[str]:
        summary = build_data(config_for(source, image_index, tmp_path / out, seed=seed, max_records_per_dialogue=2))
        assert summary.records == 24 and summary.capped == 24
        return [row["id"] for row in read_rows(tmp_path / out / RECORDS_FILE)]

    first, again, other = run("a", seed=1), run("b", seed=1), run("c", seed=2)
    assert first == again
    assert first != other  # 12 dialogues choosing 2 of 4: another seed picks differently somewhere
    assert all(len([i for i in first if i.startswith(f"many-{line}-")]) == 2 for line in range(1, 13))


def test_group_mentions_joins_repeated_names_in_order():
    mentions = [
        Mention("Paris", "LOC", 20, 25, "Paris"),
        Mention("Obama", "PER", 0, 5, "Barack Obama"),
        Mention("Paris", "LOC", 30, 35, "Paris"),
    ]
    groups = group_mentions(mentions, ["PER", "LOC"])
    assert [(group.name, [(span.start, span.end) for span in group.spans]) for group in groups] == [
        ("Barack Obama", [(0, 5)]),
        ("Paris", [(20, 25), (30, 35)]),
    ]
    assert [group.name for group in group_mentions(mentions, ["LOC"])] == ["Paris"]


def test_rerun_after_truncated_output_loses_and_duplicates_nothing(hh_file, image_index, tmp_path):
    reference = tmp_path / "reference"
    build_data(config_for(hh_file, image_index, reference))
    expected = read_rows(reference / RECORDS_FILE)

    out = tmp_path / "crashed"
    build_data(config_for(hh_file, image_index, out, batch_size=1))
    # A crash after the records of line 2 were half written: keep the first record and
    # half of the second line, and only the state of line 1.
    records_text = (out / RECORDS_FILE).read_text(encoding="utf-8").splitlines(keepends=True)
    (out / RECORDS_FILE).write_text(records_text[0] + records_text[1][:40], encoding="utf-8")
    state_text = (out / STATE_FILE).read_text(encoding="utf-8").splitlines(keepends=True)
    (out / STATE_FILE).write_text(state_text[0], encoding="utf-8")

    summary = build_data(config_for(hh_file, image_index, out, batch_size=1))
    assert summary.dialogues_resumed == 1 and summary.records_written == 3
    assert read_rows(out / RECORDS_FILE) == expected
    assert summary.duplicates == 1  # line 6 only: records already written are not duplicates

    # Records written but the dialogue not yet marked done: the rerun writes nothing twice.
    (out / STATE_FILE).write_text(state_text[0], encoding="utf-8")
    summary = build_data(config_for(hh_file, image_index, out, batch_size=1))
    assert summary.records_written == 0
    assert read_rows(out / RECORDS_FILE) == expected
    assert summary.dialogues_done == 5 and summary.records == 4 and summary.duplicates == 1


CRASH_SCRIPT = """
import sys, time
from mmsafe.synthesis import BuildConfig, build_data, make_stages
from mmsafe.config import from_dict

config = from_dict(BuildConfig, {"input": sys.argv[1], "out": sys.argv[2], "images": {"index": sys.argv[3]}, "batch_size": 1})
stages = make_stages(config)
recognize = stages.recognizer.recognize

def slow(texts):
    time.sleep(0.3)
    return recognize(texts)

stages.recognizer.recognize = slow
build_data(config, stages=stages)
"""


def test_rerun_after_sigkill_loses_and_duplicates_nothing(tmp_path, image_index):
    lines = [
        hh_line([f"Is Barack Obama number {index}? Ask Google in Paris."], f"Chosen {index}.", f"Rejected {index}.")
        for index in range(20)
    ]
    source = tmp_path / "long.jsonl"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    reference = tmp_path / "reference"
    # Pooled deictic phrases (the default, as in the crash script): the resumed records
    # must draw the same phrases as an uninterrupted build.
    pooled = {"deictic": "pool"}
    build_data(config_for(source, image_index, reference, rewrite=pooled))

    out = tmp_path / "killed"
    script = tmp_path / "slow_build.py"
    script.write_text(CRASH_SCRIPT, encoding="utf-8")
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2] / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    process = subprocess.Popen([sys.executable, str(script), str(source), str(out), str(image_index)], env=environment)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = out / STATE_FILE
            if state.exists() and state.read_text(encoding="utf-8").count("\n") >= 3:
                break
            assert process.poll() is None, "the build ended before it could be killed"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    done_before = (out / STATE_FILE).read_text(encoding="utf-8").count("\n")
    assert 3 <= done_before < 20

    summary = build_data(config_for(source, image_index, out, rewrite=pooled))
    assert summary.dialogues_resumed == done_before
    rows = read_rows(out / RECORDS_FILE)
    assert len(rows) == 60 == len({row["id"] for row in rows})
    assert sorted(rows, key=lambda row: row["id"]) == sorted(
        read_rows(reference / RECORDS_FILE), key=lambda row: row["id"]
    )


def test_export_to_the_released_format(hh_file, image_index, tmp_path):
    out = tmp_path / "out"
    build_data(config_for(hh_file, image_index, out, export_released=True))
    released = json.loads((out / "mmsafe-po.json").read_text(encoding="utf-8"))
    assert [item["entity"] for item in released] == ["Barack Obama", "Google", "Paris", "Eiffel Tower"]
    first = released[0]
    assert first["question"] == "USER: <image>\nWhy is the person featured in the image so popular? ASSISTANT:"
    assert (
        first["image"] == "images/obama.png" and first["type"] == "harmless"
    )  # relative to the file's folder, like records.jsonl
    assert first["mid_prompt"] == "Why is the person featured in the image so popular?"


def test_cli_build_data_with_flags(hh_file, image_index, tmp_path, capsys):
    out = tmp_path / "cli-out"
    code = main(
        [
            "build-data",
            "--input",
            str(hh_file),
            "--out",
            str(out),
            "--image-index",
            str(image_index),
            "--entities",
            "gazetteer",
            "--images",
            "local",
            "--rewrite",
            "template",
            "type=red-team",
            "--json",
        ]
    )
    assert code == 0
    rows = read_rows(out / RECORDS_FILE)
    assert len(rows) == 4 and {row["meta"]["type"] for row in rows} == {"red-team"}
    printed = json.loads(capsys.readouterr().out)  # --json: the summary, not the table
    assert printed["by_entity_type"] == {"PER": 1, "ORG": 1, "LOC": 2}
    assert printed["records"] == printed["records_written"] == len(rows)
    assert printed == json.loads((out / "summary.json").read_text(encoding="utf-8"))


def test_cli_config_file_and_clear_errors(hh_file, image_index, tmp_path, capsys):
    config = tmp_path / "build.yaml"
    config.write_text(
        f"input: {hh_file}\nout: {tmp_path / 'out'}\nimages:\n  index: {image_index}\nentities:\n  method: gazeteer\n",
        encoding="utf-8",
    )
    assert main(["build-data", "--config", str(config)]) == 1
    assert "entities.method: unknown 'gazeteer'; known: gazetteer, hf-ner, llm" in capsys.readouterr().err
    assert main(["build-data", "--config", str(config), "--entities", "gazetteer", "--images", "local"]) == 0
    assert main(["build-data", "--out", str(tmp_path / "x"), "--image-index", str(image_index)]) == 1
    assert "input: required" in capsys.readouterr().err


def test_gazetteer_without_index_is_a_config_error(hh_file, tmp_path):
    with pytest.raises(ConfigError, match=r"images\.index"):
        build_data(from_dict(BuildConfig, {"input": str(hh_file), "out": str(tmp_path / "out")}))


def test_custom_stages_can_replace_the_configured_ones(hh_file, image_index, tmp_path):
    config = config_for(hh_file, image_index, tmp_path / "out")
    default = make_stages(config)
    stages = Stages(
        recognizer=default.recognizer,
        images=ImageChain(default.images.sources),
        rewriter=TemplateRewriter(
            phrases={"PER": "this person", "ORG": "this company", "LOC": "this place", "MISC": "this thing"}
        ),
    )
    build_data(config, stages=stages)
    first = read_rows(tmp_path / "out" / RECORDS_FILE)[0]
    assert first["messages"][-1]["content"] == "<image>\nWhy is this person so popular?"


def test_rerun_with_other_settings_is_refused_unless_harmless(hh_file, image_index, tmp_path):
    out = tmp_path / "out"
    build_data(config_for(hh_file, image_index, out))
    with pytest.raises(ConfigError, match=r"other settings \(rewrite\.phrases: .*choose another --out"):
        build_data(config_for(hh_file, image_index, out, rewrite={"phrases": {"PER": "him"}}))
    summary = build_data(config_for(hh_file, image_index, out, batch_size=2, max_dialogues=3))
    assert summary.records_written == 0 and summary.records == 4


def test_the_example_config_loads():
    from mmsafe.config import load_config

    config = load_config(BuildConfig, Path(__file__).parents[2] / "configs" / "build" / "hh_rlhf_offline.yaml")
    assert (config.entities.method, config.images.sources, config.rewrite.method) == (
        "gazetteer",
        ["local"],
        "template",
    )
    assert config.entities.hf_ner.model == "dbmdz/bert-large-cased-finetuned-conll03-english"
