"""The OpenAI-compatible engine against a local server that fails 30% of requests."""

from __future__ import annotations

import base64
import io
import json
import logging
import random
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from mmsafe.data.records import Message
from mmsafe.errors import MmsafeError
from mmsafe.generate.engine import DecodingParams, GenerationRequest
from mmsafe.generate.openai_engine import OpenAIEngine, backoff_delay, openai_messages, parse_retry_after
from mmsafe.generate.runs import config_path_for, generate_responses

API_KEY = "sk-planted-secret-7f3a9c1e"
CLIENT_TIMEOUT = 0.3


def _last_text(body: dict) -> str:
    content = body["messages"][-1]["content"]
    if isinstance(content, str):
        return content
    return " ".join(part["text"] for part in content if part["type"] == "text")


def _image_parts(body: dict) -> list[str]:
    content = body["messages"][-1]["content"]
    return (
        [part["image_url"]["url"] for part in content if part["type"] == "image_url"]
        if isinstance(content, list)
        else []
    )


class FakeServer:
    """A chat-completions server; ``plan(attempt_number)`` picks ok / 429 / retry-after:N / 500 / timeout / 400 / 503."""

    def __init__(self, plan) -> None:
        self.plan = plan
        self.lock = threading.Lock()
        self.attempts = 0
        self.successes: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.authorization: set[str | None] = set()
        self.images: list[str] = []
        self.bodies: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    for key, value in (headers or {}).items():
                        self.send_header(key, value)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout) before we answered

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.attempts += 1
                    attempt = server.attempts
                    server.authorization.add(self.headers.get("Authorization"))
                    server.bodies.append(body)
                outcome = server.plan(attempt)
                text = _last_text(body)
                if outcome == "ok":
                    with server.lock:
                        server.successes[text] += 1
                        server.images.extend(_image_parts(body))
                    self._send(
                        200, {"choices": [{"message": {"role": "assistant", "content": f" answer to: {text} "}}]}
                    )
                    return
                with server.lock:
                    server.failures[outcome] += 1
                if outcome == "429":
                    self._send(429, {"error": "slow down"}, {"Retry-After": "0"})
                elif outcome.startswith("retry-after:"):
                    self._send(429, {"error": "slow down"}, {"Retry-After": outcome.split(":", 1)[1]})
                elif outcome == "timeout":
                    time.sleep(CLIENT_TIMEOUT * 2)
                    self._send(504, {"error": "too late"})
                elif outcome.isdigit():
                    self._send(int(outcome), {"error": "failure"})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> FakeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def flaky_plan(seed: int = 0):
    """30% of attempts fail: 10% rate-limited, 10% server errors, 10% too slow (timeouts)."""
    rng = random.Random(seed)
    lock = threading.Lock()

    def plan(attempt: int) -> str:
        with lock:
            draw = rng.random()
        return "429" if draw < 0.1 else "500" if draw < 0.2 else "timeout" if draw < 0.3 else "ok"

    return plan


def _engine(url: str, **kwargs) -> OpenAIEngine:
    settings = {
        "api_key_env": "MMSAFE_TEST_KEY",
        "timeout": CLIENT_TIMEOUT,
        "max_retries": 10,
        "concurrency": 8,
        "backoff_base": 0.01,
        "backoff_max": 0.05,
    }
    return OpenAIEngine(url, "served-model", **{**settings, **kwargs})


def test_flaky_server_every_record_once_and_the_key_never_leaks(dataset, tmp_path, monkeypatch, caplog, capfd):
    monkeypatch.setenv("MMSAFE_TEST_KEY", API_KEY)
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "responses.jsonl"
    with FakeServer(flaky_plan(seed=7)) as server:
        engine = _engine(server.url)
        summary = generate_responses(engine, dataset, out, params=DecodingParams(max_new_tokens=32), batch_size=10)
        engine.close()

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary.generated == 24 and len(rows) == 24
    assert sorted(row["id"] for row in rows) == [f"rec-{index:04d}" for index in range(24)]
    assert sum(server.failures.values()) >= 5 and set(server.failures) == {"429", "500", "timeout"}
    # Each prompt was answered successfully exactly once, and that answer is the one kept.
    assert len(server.successes) == 24 and set(server.successes.values()) == {1}
    prompts = {row["id"]: row["response"] for row in rows}
    assert prompts["rec-0001"].startswith("answer to: Tell me about")
    assert all(row["model"] == "served-model" for row in rows)
    # Twelve records have images: each went as a base64 PNG data URL that decodes.
    assert len(server.images) == 12
    png = base64.b64decode(server.images[0].removeprefix("data:image/png;base64,"))
    assert Image.open(io.BytesIO(png)).mode == "RGB"
    # The key was sent to the server ...
    assert server.authorization == {f"Bearer {API_KEY}"}
    # ... and appears nowhere else.
    captured = capfd.readouterr()
    assert API_KEY not in caplog.text and API_KEY not in captured.out and API_KEY not in captured.err
    assert any("retry" in record.getMessage() for record in caplog.records)  # the logs did run
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert API_KEY.encode() not in path.read_bytes(), path
    assert "MMSAFE_TEST_KEY" in config_path_for(out).read_text()
    assert API_KEY not in repr(engine) and API_KEY not in str(engine.describe()) and API_KEY not in str(vars(engine))


def test_no_key_variable_sends_no_authorization(monkeypatch):
    monkeypatch.delenv("MMSAFE_TEST_KEY", raising=False)
    with FakeServer(lambda attempt: "ok") as server:
        answers = _engine(server.url).generate(
            [GenerationRequest("a", [Message("user", "Hi")])], DecodingParams(max_new_tokens=4)
        )
    assert answers == ["answer to: Hi"] and server.authorization == {None}
    body = server.bodies[0]
    assert (body["max_tokens"], body["temperature"], body["model"]) == (4, 0.0, "served-model")


def test_gives_up_naming_the_request_and_last_status():
    with FakeServer(lambda attempt: "503") as server:
        engine = _engine(server.url, max_retries=2)
        with pytest.raises(MmsafeError, match=r"request 'rec-9' failed after 3 attempts; last: HTTP 503"):
            engine.generate([GenerationRequest("rec-9", [Message("user", "Hi")])], DecodingParams())
    assert server.attempts == 3
    with (
        FakeServer(lambda attempt: "400") as server,
        pytest.raises(MmsafeError, match=r"request 'rec-1' failed with HTTP 400"),
    ):
        _engine(server.url).generate([GenerationRequest("rec-1", [Message("user", "Hi")])], DecodingParams())
    assert server.attempts == 1  # a bad request is not retried
    with (
        FakeServer(lambda attempt: "timeout") as server,
        pytest.raises(MmsafeError, match=r"request 'rec-2' failed after 2 attempts; last: timed out"),
    ):
        _engine(server.url, max_retries=1).generate(
            [GenerationRequest("rec-2", [Message("user", "Hi")])], DecodingParams()
        )


def test_retry_after_is_respected_and_capped():
    waits: list[float] = []
    plan = {1: "retry-after:2", 2: "retry-after:600"}
    with FakeServer(lambda attempt: plan.get(attempt, "ok")) as server:
        engine = _engine(server.url, backoff_base=0.0, backoff_max=5.0)
        engine._sleep = waits.append
        assert engine.chat([{"role": "user", "content": "Hi"}], DecodingParams()) == "answer to: Hi"
    assert server.attempts == 3
    assert waits == [2.0, 5.0]  # Retry-After honoured, then capped at backoff_max


def test_backoff_and_retry_after_parsing():
    class Highest:
        def uniform(self, low, high):
            return high

    # Upper bounds: min(30, 0.5 * 2**attempt) -> 0.5, 1, 2, 4, 8, 16, 30, 30.
    assert [backoff_delay(attempt, 0.5, 30.0, Highest()) for attempt in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    rng = random.Random(0)
    assert all(0 <= backoff_delay(3, 0.5, 30.0, rng) <= 4 for _ in range(100))
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_openai_messages_place_the_image():
    image = Image.new("RGB", (4, 4), (255, 0, 0))
    history = [Message("user", "Hello"), Message("assistant", "Hi"), Message("user", "Look: <image>\nWhat is it?")]
    messages = openai_messages(history, image)
    assert messages[0] == {"role": "user", "content": "Hello"}
    parts = messages[2]["content"]
    assert [part["type"] for part in parts] == ["text", "image_url", "text"]
    assert parts[0]["text"] == "Look: " and parts[2]["text"] == "What is it?"
    assert parts[1]["image_url"]["url"].startswith("data:image/png;base64,")
    assert openai_messages([Message("user", "<image>\nWhat is it?")], None) == [
        {"role": "user", "content": "What is it?"}
    ]
