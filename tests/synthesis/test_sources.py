"""Sources and the parse stage: HH-RLHF (plain and gzip), PKU-SafeRLHF, prompt/chosen/rejected."""

from __future__ import annotations

import gzip
import json

import pytest

from mmsafe.errors import ConfigError, DataError
from mmsafe.synthesis.complete import chat_completer, engine_completer
from mmsafe.synthesis.sources import Dialogue, detect_source, read_dialogues
from tests.synthesis.build_fixtures import hh_line


def good(items):
    return [item for item in items if isinstance(item, Dialogue)]


def test_hh_rlhf_gzip_history_and_instruction(tmp_path):
    path = tmp_path / "test.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write(hh_line(["Hi", "Hello", "Where is Paris?"], "In France.", "Nowhere.") + "\n")
    [dialogue] = good(read_dialogues(path))
    assert dialogue.id == "test-1" and dialogue.line == 1 and dialogue.num_turns == 2
    assert [(message.role, message.content) for message in dialogue.history] == [("user", "Hi"), ("assistant", "Hello")]
    assert (dialogue.instruction, dialogue.chosen, dialogue.rejected) == ("Where is Paris?", "In France.", "Nowhere.")


def test_pku_saferlhf_picks_the_safer_response(tmp_path):
    path = tmp_path / "pku.jsonl"
    rows = [
        {
            "prompt": "How do I pick a lock?",
            "response_0": "Use a pick.",
            "response_1": "Ask a locksmith.",
            "safer_response_id": 1,
        },
        {"prompt": "x", "response_0": "a", "response_1": "b", "safer_response_id": 2},
    ]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")
    assert detect_source(path) == "pku-saferlhf"
    items = list(read_dialogues(path))
    assert (items[0].chosen, items[0].rejected, items[0].id) == ("Ask a locksmith.", "Use a pick.", "pku-1")
    assert isinstance(items[1], DataError) and str(items[1]).startswith(
        f"{path}:line 2:safer_response_id: expected 0 or 1"
    )


def test_prompt_jsonl_with_ids_and_bad_lines(tmp_path):
    path = tmp_path / "generic.jsonl"
    path.write_text(
        json.dumps({"id": "a", "prompt": "Hi Paris", "chosen": "Hello", "rejected": "Go away"}) + "\n\n"
        + "[1, 2]\n"
        + json.dumps({"prompt": "Hi", "chosen": "", "rejected": "x"}) + "\n"
        + json.dumps({"prompt": "Hi", "chosen": "ok", "rejected": "x"}) + "\n",
        encoding="utf-8",
    )  # fmt: skip
    items = list(read_dialogues(path, "jsonl"))
    assert items[0].id == "a" and items[0].instruction == "Hi Paris"
    assert str(items[1]).startswith(f"{path}:line 3:-: expected a JSON object")
    assert str(items[2]).startswith(f"{path}:line 4:chosen: expected a non-empty string")
    assert items[3].id == "generic-5"


def test_hh_rlhf_bad_lines_keep_their_numbers(tmp_path):
    path = tmp_path / "hh.jsonl"
    path.write_text(
        hh_line(["Q1"], "A", "B") + "\n" + json.dumps({"chosen": "no turns", "rejected": "x"}) + "\n" + "{oops\n",
        encoding="utf-8",
    )
    items = list(read_dialogues(path, "hh-rlhf"))
    assert isinstance(items[0], Dialogue)
    assert str(items[1]).startswith(f"{path}:line 2:chosen:")
    assert str(items[2]).startswith(f"{path}:line 3:-: malformed JSON")


def test_unknown_format_and_missing_file(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"question": "?"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="cannot detect the input format"):
        list(read_dialogues(path))
    with pytest.raises(ConfigError, match="unknown source format 'csv'"):
        list(read_dialogues(path, "csv"))
    with pytest.raises(DataError, match="input file not found"):
        list(read_dialogues(tmp_path / "none.jsonl"))


class FakeEngine:
    name = "fake"

    def __init__(self) -> None:
        self.seen = []

    def generate(self, requests, params):
        self.seen.extend(requests)
        return [f"answer to {request.messages[-1].content}" for request in requests]

    def chat(self, messages, params):
        return f"chat answer to {messages[-1]['content']}"


def test_completers_adapt_the_engines():
    from mmsafe.generate.engine import DecodingParams

    engine = FakeEngine()
    assert engine_completer(engine, DecodingParams())("hello") == "answer to hello"
    assert engine.seen[0].image is None and engine.seen[0].messages[0].role == "user"
    assert chat_completer(engine, DecodingParams())("hi") == "chat answer to hi"
