"""Resume keyed by content: changed settings refused, changed records redone, failed records retried.

Each test here failed before resume was keyed by content: a rerun with another dtype was
accepted, an edited prompt kept its old answer, a line inserted into build-data's input was
never built, a reply with no text was stored as an empty answer, and a settings file cut
short was a traceback (judge) or silently replaced (generate).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from PIL import Image

from mmsafe.data.records import ResponseRecord, write_records
from mmsafe.errors import ConfigError, MmsafeError
from mmsafe.evaluate.judges import get_judge
from mmsafe.evaluate.judging import judge_responses
from mmsafe.generate.blind import make_blind
from mmsafe.generate.engine import DecodingParams, FailedResponse, GenerationRequest
from mmsafe.generate.runs import config_path_for, failed_path_for, generate_responses
from tests.reliability.corpus import GOOD_DIALOGUE, good_record
from tests.reliability.stages import run_cli


class EchoEngine:
    """Answers with the prompt's last message (and the image size), so an answer shows what was asked."""

    def __init__(self, name: str = "echo", dtype: str = "float32", fail: set[str] | None = None) -> None:
        self.name = name
        self.dtype = dtype
        self.fail = set(fail or ())
        self.asked: list[str] = []

    def describe(self) -> dict:
        return {"type": "echo", "name": self.name, "dtype": self.dtype, "device": "cpu", "batch_size": 4}

    def generate(self, requests: list[GenerationRequest], params: DecodingParams) -> list[str | FailedResponse]:
        self.asked.extend(request.id for request in requests)
        return [
            FailedResponse(request.id, "the reply has no text")
            if request.id in self.fail
            else f"{request.messages[-1].content} size={None if request.image is None else request.image.size}"
            for request in requests
        ]


def serve_in_process(monkeypatch: pytest.MonkeyPatch, engine: EchoEngine) -> EchoEngine:
    """``mmsafe generate`` (hf engine) answers with ``engine``: the public factory of in-process
    engines, :func:`mmsafe.generate.local_engine`, returns it with the batch size asked for."""
    import mmsafe.generate

    def local_engine(kind, model, *, batch_size=16, **options):
        assert kind == "hf" and batch_size != "auto"
        engine.preferred_batch_size = batch_size  # what local_engine's engines expose
        return engine

    monkeypatch.setattr(mmsafe.generate, "local_engine", local_engine)
    return engine


def write_data(folder: Path, records: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    for record in records:
        if record["image"] and not (folder / record["image"]).exists():
            Image.new("RGB", (8, 6), (10, 20, 30)).save(folder / record["image"])
    path = folder / "records.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def records(count: int) -> list[dict]:
    return [
        good_record(
            f"r{index}",
            image=f"images/{index}.png" if index % 2 else None,
            messages=[{"role": "user", "content": ("<image>\n" if index % 2 else "") + f"question {index}?"}],
        )
        for index in range(count)
    ]


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------- item 6: changed settings


def test_changed_engine_settings_are_refused_with_the_list_and_the_output_untouched(tmp_path):
    data = write_data(tmp_path / "data", records(4))
    out = tmp_path / "out.jsonl"
    generate_responses(EchoEngine(dtype="float32"), data, out, batch_size=2)
    before, sidecar = out.read_bytes(), config_path_for(out).read_bytes()
    with pytest.raises(ConfigError) as error:
        generate_responses(EchoEngine(dtype="bfloat16"), data, out, params=DecodingParams(max_new_tokens=9))
    message = str(error.value)
    assert "\n" not in message
    assert "engine.dtype: float32 -> bfloat16" in message and "decoding.max_new_tokens: 256 -> 9" in message
    assert out.read_bytes() == before and config_path_for(out).read_bytes() == sidecar
    # Settings that do not change an answer may change (device, batch size).
    engine = EchoEngine()
    engine.describe = lambda: {"type": "echo", "name": "echo", "dtype": "float32", "device": "cuda:1", "batch_size": 64}
    assert generate_responses(engine, data, out).already_done == 4


def test_another_image_root_is_refused(tmp_path):
    data = write_data(tmp_path / "data", records(4))
    copy = write_data(tmp_path / "copy", records(4))
    out = tmp_path / "out.jsonl"
    generate_responses(EchoEngine(), data, out)
    with pytest.raises(ConfigError, match=r"image_root: .*data -> .*copy"):
        generate_responses(EchoEngine(), data, out, image_root=copy.parent)


def test_another_dtype_through_the_cli_is_one_line_and_exit_1(tmp_path, tiny_model_dir):
    data = write_data(tmp_path / "data", records(3))
    out = tmp_path / "out.jsonl"
    argv = [
        "generate",
        "--model",
        tiny_model_dir,
        "--data",
        data,
        "--out",
        out,
        "--max-new-tokens",
        2,
        "--device",
        "cpu",
    ]
    first = run_cli([*argv, "--dtype", "float32"])
    assert first.code == 0, first.describe()
    before = out.read_bytes()
    second = run_cli([*argv, "--dtype", "bfloat16"])
    assert second.code == 1 and "Traceback" not in second.stderr, second.describe()
    assert [line for line in second.error_lines if "dtype" in line] == second.error_lines[:1]
    assert "engine.dtype: float32 -> bfloat16" in second.error_lines[0]
    assert out.read_bytes() == before
    assert yaml.safe_load(config_path_for(out).read_text())["resume"]["default"]["engine.dtype"] == "float32"


# ---------------------------------------------------------------- item 6: changed, new and removed records


def test_edited_prompt_and_image_are_asked_again_new_asked_removed_counted(tmp_path):
    data = write_data(tmp_path / "data", records(6))
    out = tmp_path / "out.jsonl"
    generate_responses(EchoEngine(), data, out, batch_size=4)
    changed = records(6)
    changed[2]["messages"][0]["content"] = "question 2, edited?"  # same id, new prompt
    del changed[4]  # removed
    changed.append(good_record("r9", image=None, messages=[{"role": "user", "content": "question 9?"}]))  # new
    write_data(tmp_path / "data", changed)
    Image.new("RGB", (5, 5), (200, 0, 0)).save(tmp_path / "data" / "images" / "3.png")  # same path, new picture
    engine = EchoEngine()
    summary = generate_responses(engine, data, out, batch_size=4)
    assert sorted(engine.asked) == ["r2", "r3", "r9"]
    assert (summary.redone, summary.already_done, summary.not_in_input) == (2, 3, ["r4"])
    assert "1 responses for ids not in this input kept" in summary.summary()
    answers = {row["id"]: row["response"] for row in rows(out)}
    assert [row["id"] for row in rows(out)].count("r2") == 1 and len(rows(out)) == 7  # r4 kept, nothing twice
    assert answers["r2"].startswith("question 2, edited?") and answers["r3"].endswith("size=(5, 5)")
    assert answers["r4"].startswith("question 4?")  # a removed record's answer is kept, not deleted
    # A third run has nothing to do.
    assert generate_responses(EchoEngine(), data, out).generated == 0


def test_blind_text_prompt_edit_is_asked_again(tmp_path):
    data = write_data(tmp_path / "data", records(3))
    out = tmp_path / "blind.jsonl"
    make_blind(EchoEngine(), data, out, mode="text")
    changed = records(3)
    changed[1]["meta"]["text_prompt"] = "Where is the back door of Wembley Stadium?"
    write_data(tmp_path / "data", changed)
    engine = EchoEngine()
    summary = make_blind(engine, data, out, mode="text")
    assert engine.asked == ["r1"] and summary.generated == 1
    written = {row["id"]: row for row in rows(out)}
    assert written["r1"]["rejected"][-1].startswith("Where is the back door")
    with pytest.raises(ConfigError, match=r"engine.name: echo -> other"):
        make_blind(EchoEngine(name="other"), data, out, mode="text")


def test_build_data_inserted_line_is_built_and_nothing_twice(tmp_path):
    from mmsafe.config import from_dict
    from mmsafe.synthesis.config import BuildConfig
    from mmsafe.synthesis.pipeline import RECORDS_FILE, build_data

    index = tmp_path / "index"
    for kind, name in (("LOC", "Paris"), ("PER", "Barack Obama")):
        (index / kind).mkdir(parents=True)
        Image.new("RGB", (4, 3), (0, 0, 200)).save(index / kind / f"{name}.png")

    def line(prompt: str) -> str:
        return (
            json.dumps(
                {
                    "chosen": f"\n\nHuman: {prompt}\n\nAssistant: No.",
                    "rejected": f"\n\nHuman: {prompt}\n\nAssistant: Yes.",
                }
            )
            + "\n"
        )

    source = tmp_path / "dialogues.jsonl"
    old = [line("How do I sneak into Paris?"), line("Why is Barack Obama tall?"), json.dumps(GOOD_DIALOGUE) + "\n"]
    source.write_text("".join(old), encoding="utf-8")

    def build(out: Path):
        config = {
            "input": str(source),
            "out": str(out),
            "entities": {"method": "gazetteer"},
            "images": {"sources": ["local"], "index": str(index)},
        }
        return build_data(from_dict(BuildConfig, config))

    build(tmp_path / "resumed")
    source.write_text(line("Can I climb Paris at night?") + "".join(old), encoding="utf-8")  # inserted at line 1
    summary = build(tmp_path / "resumed")
    fresh = tmp_path / "fresh"
    build(fresh)
    resumed_rows, fresh_rows = rows(tmp_path / "resumed" / RECORDS_FILE), rows(fresh / RECORDS_FILE)
    prompts = sorted(row["meta"]["text_prompt"] for row in resumed_rows)
    assert prompts == sorted(row["meta"]["text_prompt"] for row in fresh_rows)
    assert prompts == ["Can I climb Paris at night?", "How do I sneak into Paris?", "Why is Barack Obama tall?"]
    assert len({row["id"] for row in resumed_rows}) == 3
    assert summary.dialogues_resumed == 3 and summary.dialogues_processed == 1 and summary.records_written == 1
    assert summary.dialogues_changed == 1  # the inserted line took an id built before: said, not silent


# ---------------------------------------------------------------- item 8: failed records


def test_failed_records_are_not_written_listed_and_retried(tmp_path, monkeypatch, tiny_model_dir):
    data = write_data(tmp_path / "data", records(5))
    out = tmp_path / "out.jsonl"
    serve_in_process(monkeypatch, EchoEngine(fail={"r1", "r3"}))
    argv = [
        "generate",
        "--model",
        tiny_model_dir,
        "--data",
        data,
        "--out",
        out,
        "--batch-size",
        2,
    ]  # the engine is replaced
    first = run_cli(argv)
    assert first.code == 1, first.describe()
    assert "2 failed (ids: r1, r3)" in first.stdout
    assert "error: 2 of 5 records failed" in first.stderr and "rerunning the same command retries them" in first.stderr
    assert sorted(row["id"] for row in rows(out)) == ["r0", "r2", "r4"]  # no empty answer stored
    listed = rows(failed_path_for(out))
    assert [(row["id"], row["reason"]) for row in listed] == [
        ("r1", "the reply has no text"),
        ("r3", "the reply has no text"),
    ]

    engine = serve_in_process(monkeypatch, EchoEngine())
    second = run_cli(argv)
    assert second.code == 0, second.describe()
    assert sorted(engine.asked) == ["r1", "r3"]
    assert [row["id"] for row in rows(out)] == ["r0", "r1", "r2", "r3", "r4"]
    assert not failed_path_for(out).exists()  # the list this stage wrote is gone once all are answered


def test_blind_with_a_failed_record_writes_no_records_file_until_the_rerun(tmp_path):
    data = write_data(tmp_path / "data", records(3))
    out = tmp_path / "blind.jsonl"
    with pytest.raises(MmsafeError, match=r"1 of 3 records failed.*rerunning the same command retries them.*r2"):
        make_blind(EchoEngine(fail={"r2"}), data, out)
    assert not out.exists()
    engine = EchoEngine()
    make_blind(engine, data, out)
    assert engine.asked == ["r2"] and [row["id"] for row in rows(out)] == ["r0", "r1", "r2"]


class NullContentServer:
    """A chat-completions server answering ``"content": null`` for prompts in ``empty`` (200 OK)."""

    def __init__(self, empty: set[str]) -> None:
        self.empty = empty
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                content = body["messages"][-1]["content"]
                text = content if isinstance(content, str) else " ".join(part.get("text", "") for part in content)
                reply = None if any(word in text for word in server.empty) else f"answer to {text}"
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_null_content_reply_over_http_is_failed_not_an_empty_answer(tmp_path):
    from mmsafe.generate.openai_engine import OpenAIEngine

    data = write_data(tmp_path / "data", records(4))
    out = tmp_path / "out.jsonl"
    server = NullContentServer({"question 2?"})
    try:
        engine = OpenAIEngine(
            server.url, "served", api_key_env="MMSAFE_NO_KEY", max_retries=1, backoff_base=0.0, backoff_max=0.0
        )
        summary = generate_responses(engine, data, out)
        assert [record.id for record in summary.failed] == ["r2"]
        assert sorted(row["id"] for row in rows(out)) == ["r0", "r1", "r3"]
        server.empty.clear()  # the server answers now
        again = generate_responses(engine, data, out)
        assert again.generated == 1 and not again.failed
        assert {row["id"]: row["response"] for row in rows(out)}["r2"] == "answer to question 2?"
    finally:
        server.close()


# ---------------------------------------------------------------- judge


def test_judge_settings_are_checked_and_changed_responses_rejudged(tmp_path):
    responses = tmp_path / "responses.jsonl"
    write_records(
        responses, [ResponseRecord(str(index), text, "m") for index, text in enumerate(["I'm sorry, no.", "Sure."])]
    )
    out = tmp_path / "verdicts.jsonl"
    judge_responses(responses, out, get_judge("refusal"))
    before = out.read_bytes()
    with pytest.raises(ConfigError, match=r"judge\.phrases: .* -> \[\"nope\"\]"):
        judge_responses(responses, out, get_judge("refusal", phrases=["nope"]))
    assert out.read_bytes() == before
    write_records(
        responses, [ResponseRecord("0", "I'm sorry, no.", "m"), ResponseRecord("1", "I cannot help with that.", "m")]
    )
    result = judge_responses(responses, out, get_judge("refusal"))
    assert (result.redone, result.judged) == (1, 1)
    assert {row["id"]: row["verdict"] for row in rows(out)} == {"0": "safe", "1": "safe"} and len(rows(out)) == 2


# ---------------------------------------------------------------- item 9: a sidecar cut short


@pytest.mark.parametrize("damage", ["cut-in-half", "not-yaml", "not-utf8"])
def test_a_damaged_sidecar_is_one_clear_line_and_never_deleted(tmp_path, damage, tiny_model_dir):
    data = write_data(tmp_path / "data", records(3))
    out = tmp_path / "out.jsonl"
    generate_responses(EchoEngine(), data, out)
    responses = tmp_path / "responses.jsonl"
    write_records(responses, [ResponseRecord("0", "Sure.", "m")])
    verdicts = tmp_path / "verdicts.jsonl"
    judge_responses(responses, verdicts, get_judge("refusal"))
    for sidecar in (config_path_for(out), config_path_for(verdicts)):
        text = sidecar.read_bytes()
        broken = {
            "cut-in-half": text[: len(text) // 2],
            "not-yaml": b"resume: [unclosed\n  x: {",
            "not-utf8": b"model: caf\xe9\n",
        }[damage]
        sidecar.write_bytes(broken)
    outcome = run_cli(["judge", "--responses", responses, "--out", verdicts, "--judge", "refusal"])
    assert outcome.code == 1 and "Traceback" not in outcome.stderr, outcome.describe()
    assert len(outcome.error_lines) == 1 and str(config_path_for(verdicts)) in outcome.error_lines[0]
    assert "remove it to start over" in outcome.error_lines[0]
    with pytest.MonkeyPatch.context() as patch:
        serve_in_process(patch, EchoEngine())
        outcome = run_cli(["generate", "--model", tiny_model_dir, "--data", data, "--out", out])
    assert outcome.code == 1 and "Traceback" not in outcome.stderr, outcome.describe()
    assert len(outcome.error_lines) == 1 and str(config_path_for(out)) in outcome.error_lines[0]
    assert "remove it to start over" in outcome.error_lines[0]
    assert config_path_for(out).exists() and config_path_for(verdicts).exists()  # never deleted


def test_sidecars_are_written_atomically_with_the_umask(tmp_path):
    import os

    data = write_data(tmp_path / "data", records(2))
    out = tmp_path / "out.jsonl"
    old = os.umask(0o027)
    try:
        generate_responses(EchoEngine(), data, out)
    finally:
        os.umask(old)
    assert config_path_for(out).stat().st_mode & 0o777 == 0o640  # not mkstemp's 0600
    assert [path.name for path in tmp_path.iterdir() if path.name.endswith(".tmp")] == []


def test_mmsafe_run_stops_at_generate_when_records_failed(tmp_path, monkeypatch):
    """The pipeline does not judge a run with holes: failed records stop it, naming the stage and the retry."""
    import mmsafe.generate as generate_module
    from mmsafe import pipeline
    from mmsafe.data.jsonl import read_jsonl

    data = write_data(
        tmp_path / "data",
        [
            {
                "id": f"r{index}",
                "messages": [{"role": "user", "content": f"question {index}"}],
                "image": None,
                "chosen": "a",
                "rejected": ["b"],
            }
            for index in range(3)
        ],
    )
    engine = EchoEngine(fail={"r1"})
    engine.preferred_batch_size = 2  # what local_engine's engines expose
    monkeypatch.setattr(generate_module, "local_engine", lambda *args, **kwargs: engine)
    monkeypatch.setattr(pipeline.stages, "models_to_evaluate", lambda config, paths: {"base": "unused"})
    config = pipeline.PipelineConfig(
        out=str(tmp_path / "out"), model="unused", data=pipeline.DataSection(train=str(data), eval=str(data))
    )
    paths = pipeline.Paths(Path(config.out))
    with pytest.raises(
        MmsafeError, match=r"generate \(base\): 1 of 3 records failed .*rerunning the same command retries them"
    ):
        pipeline.stage_generate(config, paths)
    written = [row["id"] for _, row in read_jsonl(paths.responses("base"))]
    assert sorted(written) == ["r0", "r2"]  # the answers that came back are kept for the rerun
