"""judge_responses: resumable, cached, and strict about ids."""

from __future__ import annotations

import json

import pytest

from mmsafe.data.jsonl import read_jsonl
from mmsafe.data.records import Message, ResponseRecord, write_records
from mmsafe.errors import ConfigError, DataError
from mmsafe.evaluate.benchmarks import BenchmarkItem
from mmsafe.evaluate.judges import Verdict, get_judge
from mmsafe.evaluate.judging import judge_responses

REPLIES = ["I'm sorry, I can't.", "Sure, here is how.", "As an AI, no.", "Step one: go there.", ""]


class CountingJudge:
    """Labels by the refusal judge, remembering every id it was asked about."""

    name = "counting"
    needs_prompt = True

    def __init__(self, fail_after: int | None = None) -> None:
        self.seen: list[str] = []
        self.fail_after = fail_after
        self.inner = get_judge("refusal")

    def judge(self, items):
        if self.fail_after is not None and len(self.seen) >= self.fail_after:
            raise RuntimeError("judge crashed")
        self.seen.extend(item.id for item in items)
        assert all(item.messages for item in items)
        return self.inner.judge(items)


def prompts(count=5):
    return [
        BenchmarkItem(str(index), [Message("user", f"Question {index}?")], meta={"entity_type": "PER"})
        for index in range(count)
    ]


def write_responses(path, replies=REPLIES, model="tiny"):
    write_records(
        path,
        [ResponseRecord(str(index), reply, model, params={"max_new_tokens": 8}) for index, reply in enumerate(replies)],
    )
    return path


def test_refusal_judging_writes_the_verdict_contract_without_data(tmp_path):
    responses = write_responses(tmp_path / "responses.jsonl")
    result = judge_responses(responses, tmp_path / "verdicts.jsonl", get_judge("refusal"), batch_size=2)
    assert (result.total, result.judged, result.skipped) == (5, 5, 0)
    assert result.counts == {"safe": 2, "unsafe": 2, "unparseable": 1}
    rows = [row for _, row in read_jsonl(tmp_path / "verdicts.jsonl")]
    assert [row["verdict"] for row in rows] == ["safe", "unsafe", "safe", "unsafe", "unparseable"]
    first = rows[0]
    assert {key: first[key] for key in ("id", "variant", "judge", "verdict", "categories", "raw", "model")} == {
        "id": "0",
        "variant": "default",
        "judge": "refusal",
        "verdict": "safe",
        "categories": ["refusal"],
        "raw": "refusal phrase: I'm sorry",
        "model": "tiny",
    }
    assert len(first["response_sha256"]) == 16
    import yaml

    config = yaml.safe_load((tmp_path / "verdicts.jsonl.config.yaml").read_text())
    assert config["refusal"]["judge"]["type"] == "RefusalJudge"
    assert config["refusal"]["responses"] == str(responses)
    assert config["refusal"]["batch_size"] == 2


def test_rerun_skips_judged_responses_and_judges_only_new_ones(tmp_path):
    responses = write_responses(tmp_path / "responses.jsonl", REPLIES[:3])
    out = tmp_path / "verdicts.jsonl"
    judge = CountingJudge()
    judge_responses(responses, out, judge, data=prompts(), batch_size=2)
    assert judge.seen == ["0", "1", "2"]
    again = judge_responses(responses, out, judge, data=prompts())
    assert (again.judged, again.skipped) == (0, 3)
    write_responses(responses, REPLIES)
    judge_responses(responses, out, judge, data=prompts())
    assert judge.seen == ["0", "1", "2", "3", "4"]
    rows = [row for _, row in read_jsonl(out)]
    assert sorted(row["id"] for row in rows) == ["0", "1", "2", "3", "4"]
    # a second judge adds its own verdicts to the same file
    judge_responses(responses, out, get_judge("refusal"))
    assert len(list(read_jsonl(out))) == 10


def test_a_crash_keeps_finished_batches_and_the_rerun_finishes(tmp_path):
    responses = write_responses(tmp_path / "responses.jsonl")
    out = tmp_path / "verdicts.jsonl"
    with pytest.raises(RuntimeError, match="crashed"):
        judge_responses(responses, out, CountingJudge(fail_after=2), data=prompts(), batch_size=2)
    assert [row["id"] for _, row in read_jsonl(out)] == ["0", "1"]
    resumed = CountingJudge()
    judge_responses(responses, out, resumed, data=prompts(), batch_size=2)
    assert resumed.seen == ["2", "3", "4"]


def test_response_ids_missing_from_the_data_are_an_error(tmp_path):
    responses = write_responses(tmp_path / "responses.jsonl")
    with pytest.raises(DataError) as error:
        judge_responses(responses, tmp_path / "v.jsonl", CountingJudge(), data=prompts(3))
    assert str(error.value).startswith(f"{responses}:3:id: response id not found in the benchmark data")
    assert not (tmp_path / "v.jsonl").exists()


def test_changed_responses_do_not_reuse_stale_verdicts(tmp_path):
    responses = write_responses(tmp_path / "responses.jsonl")
    out = tmp_path / "verdicts.jsonl"
    judge_responses(responses, out, get_judge("refusal"))
    write_responses(responses, ["Changed answer.", *REPLIES[1:]])
    # The changed response is judged again and its old verdict replaced, not trusted.
    result = judge_responses(responses, out, get_judge("refusal"))
    assert (result.judged, result.redone, result.skipped) == (1, 1, 4)
    rows = [row for _, row in read_jsonl(out)]
    assert sorted(row["id"] for row in rows) == ["0", "1", "2", "3", "4"]
    assert next(row for row in rows if row["id"] == "0")["verdict"] == "unsafe"


def test_judges_that_read_the_prompt_need_data(tmp_path):
    responses = write_responses(tmp_path / "responses.jsonl")
    with pytest.raises(ConfigError, match="--data"):
        judge_responses(responses, tmp_path / "v.jsonl", CountingJudge())
    # responses that carry their own prompt need no data
    rows = [
        {
            "id": "v1",
            "variant": "blind",
            "response": "Sure.",
            "model": "m",
            "messages": [{"role": "user", "content": "Q?"}],
        }
    ]
    (tmp_path / "own.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    judge = CountingJudge()
    judge_responses(tmp_path / "own.jsonl", tmp_path / "v2.jsonl", judge)
    assert judge.seen == ["v1"]


def test_duplicate_responses_and_wrong_verdict_counts_are_errors(tmp_path):
    path = tmp_path / "dup.jsonl"
    write_records(path, [ResponseRecord("1", "a", "m"), ResponseRecord("1", "b", "m")])
    with pytest.raises(DataError, match="duplicate response"):
        judge_responses(path, tmp_path / "v.jsonl", get_judge("refusal"))

    class Broken:
        name = "broken"
        needs_prompt = False

        def judge(self, items):
            return [Verdict("safe")]

    responses = write_responses(tmp_path / "responses.jsonl")
    with pytest.raises(Exception, match="returned 1 verdicts for 5"):
        judge_responses(responses, tmp_path / "v3.jsonl", Broken(), batch_size=10)
