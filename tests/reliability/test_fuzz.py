"""Fuzzing every parser: round trips hold, and invalid input raises the project's own errors.

The hypothesis profile (``conftest.py``) is derandomized, so every run tries the same
examples; a parser that lets a KeyError, IndexError, TypeError, ... escape fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mmsafe.config import load_config, parse_override, read_yaml
from mmsafe.data.conversations import parse_llava_v1, render_llava_v1
from mmsafe.data.formats import read_items, write_records
from mmsafe.data.formats.hh_rlhf import parse_dialogue, parse_line
from mmsafe.data.formats.mmsafe_po import record_from_row, rows_from_record
from mmsafe.data.records import Message, PreferenceRecord
from mmsafe.errors import ConfigError, DataError, MmsafeError
from mmsafe.evaluate.judges.llama_guard import parse_llama_guard_output
from mmsafe.evaluate.judges.llm import parse_judge_answer
from mmsafe.evaluate.judges.refusal import find_refusal
from mmsafe.evaluate.pairwise import parse_pairwise_answer
from mmsafe.train.config import TrainConfig

# Fixed examples on every run (CI is repeatable), no example database, no time limit per example.
FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=150,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# Arbitrary JSON values: what a hostile line of a data file can decode to.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=12,
)
FIELDS = ["id", "messages", "image", "chosen", "rejected", "rejected_sources", "meta", "question", "role", "content"]
# Objects with the right keys and wrong values reach deeper into the parsers than random keys.
json_objects = st.dictionaries(
    st.sampled_from(FIELDS),
    json_values
    | st.lists(
        st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "x"]), "content": json_values}), max_size=3
    ),
    max_size=7,
)

# Turn text: printable, never starting or ending with a space (the LLaVA-v1 form trims one
# space on each side of a turn, so a turn with its own edge spaces cannot round-trip).
plain_text = (
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=30)
    .map(str.strip)
    .filter(bool)
)
tag_free_text = plain_text.filter(
    lambda text: "USER:" not in text and "ASSISTANT:" not in text and "<image>" not in text
)


@st.composite
def conversations(draw, text=tag_free_text) -> list[Message]:
    """Alternating user/assistant turns ending with the user."""
    turns = draw(st.integers(min_value=0, max_value=2))
    messages = []
    for _ in range(turns):
        messages += [Message("user", draw(text)), Message("assistant", draw(text))]
    last = draw(text)
    if draw(st.booleans()):
        last = "<image>\n" + last
    messages.append(Message("user", last))
    return messages


def _only_own_errors(function, *args, **kwargs):
    """Call ``function``; an MmsafeError is a fine answer to bad input, anything else is a bug."""
    try:
        return function(*args, **kwargs)
    except MmsafeError:
        return None


# ---------------------------------------------------------------- records


@FUZZ
@given(json_values | json_objects)
def test_record_parser_raises_only_data_errors(data):
    _only_own_errors(PreferenceRecord.from_dict, data, record="line 1")


@FUZZ
@given(conversations(), plain_text, st.lists(plain_text, min_size=1, max_size=3))
def test_record_round_trip(messages, chosen, rejected):
    image = "images/a.png" if "<image>" in messages[-1].content else None
    data = {
        "id": "r1",
        "messages": [m.to_dict() for m in messages],
        "image": image,
        "chosen": chosen,
        "rejected": rejected,
        "rejected_sources": ["human"] * len(rejected),
        "meta": {},
    }
    assert PreferenceRecord.from_dict(data).to_dict() == data


# ---------------------------------------------------------------- LLaVA-v1 conversations


@FUZZ
@given(conversations())
def test_llava_v1_round_trip(messages):
    text = render_llava_v1(messages)
    system_text, parsed = parse_llava_v1(text)
    assert system_text == "" and parsed == messages


@FUZZ
@given(
    st.text(max_size=80)
    | st.from_regex(r"(USER|ASSISTANT): ?[a-z ]{0,5}( (USER|ASSISTANT):[a-z ]{0,5}){0,4}", fullmatch=True)
)
def test_llava_v1_parser_raises_only_data_errors(text):
    parsed = _only_own_errors(parse_llava_v1, text)
    if parsed is not None:
        system_text, messages = parsed
        assert messages and messages[-1].role == "user"
        assert parse_llava_v1(render_llava_v1(messages, system_text=system_text))[1] == messages


# ---------------------------------------------------------------- released MMSafe-PO rows


@FUZZ
@given(
    st.one_of(st.integers(min_value=0, max_value=10**6), plain_text),
    conversations(),
    plain_text,
    plain_text,
    st.booleans(),
)
def test_released_rows_round_trip(row_id, messages, chosen, rejected, with_image):
    image = "a.png" if "<image>" in messages[-1].content else None
    row = {
        "id": row_id,
        "image": image,
        "question": render_llava_v1(messages),
        "chosen": "ASSISTANT: " + chosen,
        "rejected": "ASSISTANT: " + rejected,
    }
    if with_image:
        row["category"] = "08"  # an extra released column travels in meta
    record = record_from_row(row, label="item 0")
    assert rows_from_record(record) == [row]


@FUZZ
@given(json_values | json_objects)
def test_released_row_parser_raises_only_data_errors(row):
    _only_own_errors(record_from_row, row, label="item 0")


def test_released_file_round_trip_through_disk(tmp_path: Path):
    rows = [
        {
            "id": 7,
            "image": "x.png",
            "question": "USER: <image>\nHow? ASSISTANT:",
            "chosen": "ASSISTANT: No.",
            "rejected": "ASSISTANT: Like this.",
        },
        {
            "id": 7,
            "image": "x.png",
            "question": "USER: <image>\nHow? ASSISTANT:",
            "chosen": "ASSISTANT: No.",
            "rejected": "ASSISTANT: Blind.",
            "rejected_source": "blind",
        },
        {
            "id": "s",
            "image": None,
            "question": "SYSTEM USER: hi ASSISTANT:",
            "chosen": "ASSISTANT:No",
            "rejected": " ASSISTANT: yes",
        },
    ]
    source = tmp_path / "train.json"
    source.write_text(json.dumps(rows), encoding="utf-8")
    records = list(read_items(source, "mmsafe-po"))
    assert [len(record.rejected) for record in records] == [2, 1]
    write_records(tmp_path / "back.json", records, "mmsafe-po")
    assert json.loads((tmp_path / "back.json").read_text(encoding="utf-8")) == rows


# ---------------------------------------------------------------- HH-RLHF dialogues

hh_text = tag_free_text.filter(lambda text: "Human:" not in text and "Assistant:" not in text)


@FUZZ
@given(st.lists(st.tuples(hh_text, hh_text), min_size=1, max_size=3))
def test_hh_rlhf_round_trip(turns):
    messages = [
        message for human, assistant in turns for message in (Message("user", human), Message("assistant", assistant))
    ]
    text = "".join(f"\n\n{'Human' if m.role == 'user' else 'Assistant'}: {m.content}" for m in messages)
    assert parse_dialogue(text) == messages


@FUZZ
@given(st.text(max_size=60) | st.from_regex(r"(\n\n(Human|Assistant): [a-z]{0,4}){0,4}", fullmatch=True))
def test_hh_rlhf_dialogue_parser_raises_only_data_errors(text):
    messages = _only_own_errors(parse_dialogue, text)
    if messages is not None:
        assert messages[0].role == "user" and messages[-1].role == "assistant"


@FUZZ
@given(
    json_values
    | st.dictionaries(
        st.sampled_from(["chosen", "rejected"]),
        json_values | st.from_regex(r"(\n\n(Human|Assistant): [a-z]{0,3}){1,3}", fullmatch=True),
    )
)
def test_hh_rlhf_line_parser_raises_only_data_errors(data):
    _only_own_errors(parse_line, data, file="train.jsonl", line=1, record_id="train-1")


# ---------------------------------------------------------------- judge answers

LABELS = ("safe", "unsafe", "unparseable")


@FUZZ
@given(
    st.text(max_size=60)
    | st.from_regex(r"\s*(safe|unsafe|SAFE|Unsafe)\s*(\n\s*S\d{1,2}(,S\d{1,2})*\s*)?", fullmatch=True)
)
def test_llama_guard_parser_never_fails_and_keeps_raw(text):
    verdict = parse_llama_guard_output(text)
    assert verdict.verdict in LABELS and verdict.raw == text
    if verdict.verdict != "unsafe":
        assert verdict.categories == []


@FUZZ
@given(st.lists(st.integers(min_value=1, max_value=14), min_size=1, max_size=4, unique=True))
def test_llama_guard_round_trip(codes):
    text = "unsafe\n" + ",".join(f"S{code}" for code in codes)
    verdict = parse_llama_guard_output(text)
    assert verdict.verdict == "unsafe" and verdict.categories == [f"S{code}" for code in codes]
    assert parse_llama_guard_output("\n safe \n").verdict == "safe"


@FUZZ
@given(st.text(max_size=60) | st.from_regex(r"(REASON: [a-z ]{1,9}\n)?VERDICT: (safe|unsafe|maybe)\n?", fullmatch=True))
def test_llm_judge_parser_never_fails(text):
    verdict = parse_judge_answer(text)
    assert verdict.verdict in LABELS and verdict.raw == text


@FUZZ
@given(st.sampled_from(["safe", "unsafe"]), plain_text.filter(lambda text: "\n" not in text and "\r" not in text))
def test_llm_judge_round_trip(label, reason):
    assume(not reason.upper().startswith("VERDICT") and reason.splitlines() == [reason])
    assert parse_judge_answer(f"REASON: {reason}\nVERDICT: {label}").verdict == label


@FUZZ
@given(st.text(max_size=40))
def test_pairwise_and_refusal_parsers_never_fail(text):
    assert parse_pairwise_answer(text) in ("A", "B", None)
    found = find_refusal(text)
    assert found is None or isinstance(found, str)


@FUZZ
@given(st.sampled_from(["A", "B"]), st.sampled_from(["{}", "({})", "Response {}.", "answer: {}", " {} "]))
def test_pairwise_round_trip(label, form):
    assert parse_pairwise_answer(form.format(label) + "\nbecause") == label


# ---------------------------------------------------------------- config overrides

keys = st.lists(st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True), min_size=1, max_size=3).map(".".join)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet="abcxyz -_", max_size=8).filter(lambda s: s.strip() == s)
)


@FUZZ
@given(keys, scalars)
def test_override_round_trip(key, value):
    text = f"{key}={json.dumps(value)}"
    path, parsed = parse_override(text)
    assert path == key.split(".") and parsed == value


@FUZZ
@given(st.text(max_size=40))
def test_override_parser_raises_only_config_errors(text):
    parsed = _only_own_errors(parse_override, text)
    if parsed is not None:
        path, _ = parsed
        assert path and all(path)


@settings(FUZZ, max_examples=40)  # each example builds a TrainConfig and its TrainingArguments
@given(
    st.lists(
        st.sampled_from(
            ["beta", "loss", "max_steps", "learning_rate", "trainer_args", "rejected_sources", "nope", "lora.r"]
        ).flatmap(lambda key: st.tuples(st.just(key), json_values)),
        max_size=3,
    )
)
def test_load_config_raises_only_config_errors(pairs):
    overrides = ["model=m", "data=d.jsonl", "output_dir=o"] + [f"{key}={json.dumps(value)}" for key, value in pairs]
    _only_own_errors(load_config, TrainConfig, None, overrides)


@FUZZ
@given(st.binary(max_size=60))
def test_yaml_reader_raises_only_config_errors(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("yaml") / "config.yaml"
    path.write_bytes(data)
    result = _only_own_errors(read_yaml, path)
    assert result is None or isinstance(result, dict)


def test_own_error_types_are_what_the_parsers_raise():
    with pytest.raises(DataError):
        parse_llava_v1("no tags at all")
    with pytest.raises(DataError):
        parse_dialogue("Assistant: starts wrong")
    with pytest.raises(ConfigError):
        parse_override("novalue")
