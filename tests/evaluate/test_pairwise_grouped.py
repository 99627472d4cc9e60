"""Asked pairwise questions are batched by length, and their answers scored in record order."""

from __future__ import annotations

import json

from mmsafe.cli import main
from mmsafe.data.records import Message, PreferenceRecord
from mmsafe.data.sample import write_sample
from mmsafe.evaluate.pairwise import chosen_goes_first, run_pairwise


class EchoEngine:
    """Answers each question with its chosen letter when the record id is even, the other letter when odd."""

    name = "echo"

    def __init__(self, questions_by_id):
        self.questions_by_id, self.batches = questions_by_id, []

    def generate(self, requests, params):
        self.batches.append([request.id for request in requests])
        answers = []
        for request in requests:
            chosen = "A" if chosen_goes_first(request.id, 0) else "B"
            answers.append(chosen if int(request.id) % 2 == 0 else {"A": "B", "B": "A"}[chosen])
        return answers


def test_questions_asked_longest_first_answers_scored_in_record_order():
    records = [
        PreferenceRecord(
            id=str(index), messages=[Message("user", "Why? " * (1 + (index * 7) % 10))], chosen="No.", rejected=["Yes."]
        )
        for index in range(10)
    ]
    engine = EchoEngine({})
    result = run_pairwise(engine, records, batch_size=3)
    asked = [record_id for batch in engine.batches for record_id in batch]
    lengths = {record.id: len(record.messages[0].content) for record in records}
    assert sorted(asked) == sorted(record.id for record in records) and len(asked) == 10  # each asked once
    assert [lengths[record_id] for record_id in asked] == sorted(lengths.values(), reverse=True)  # longest first
    assert (result.correct, result.wrong) == (
        5,
        5,
    )  # the even ids right, the odd ones wrong: answers matched to their records
    assert list(result.answers) == [record.id for record in records]


def test_pairwise_report_carries_the_padding_share_of_each_form(tmp_path, tiny_model_dir):
    data = write_sample(tmp_path / "data")
    records = [json.loads(line) for line in data.read_text().splitlines()][:6]
    small = tmp_path / "data" / "six.jsonl"
    small.write_text("".join(json.dumps(record) + "\n" for record in records))
    assert (
        main(
            [
                "pairwise",
                "--model",
                str(tiny_model_dir),
                "--data",
                str(small),
                "--out",
                str(tmp_path / "pw"),
                "--device",
                "cpu",
                "--batch-size",
                "3",
            ]
        )
        == 0
    )
    shares = json.loads((tmp_path / "pw" / "pairwise.json").read_text())["padding_share"]
    assert set(shares) == {"asked", "likelihood"}
    assert all(isinstance(value, float) and 0 <= value < 1 for value in shares.values())
