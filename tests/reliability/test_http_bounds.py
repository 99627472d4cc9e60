"""Hard bounds on every HTTP request: a total deadline, a body cap, no text is no answer, no leaked key.

Hostile servers on 127.0.0.1, written with raw sockets so that they can misbehave in ways
a well-behaved HTTP server library would not: trickle a byte every 0.5 s forever, stream
2 GB, answer ``"content": null``, echo the request's headers in an error page.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from mmsafe.errors import ImageError, MmsafeError
from mmsafe.generate.engine import DecodingParams, FailedResponse, GenerationRequest
from mmsafe.generate.openai_engine import OpenAIEngine
from mmsafe.http import redact

API_KEY = "sk-planted-secret-5e1d07c2b9"
#: A key that looks like no known secret: only the literal redaction of the key in use hides it.
PLAIN_KEY = "plain-planted-4f0c9a7d31e2"
GIB = 2**30


class RawServer:
    """A TCP server on 127.0.0.1; ``handle(connection, request_bytes, server)`` answers each request."""

    def __init__(self, handle) -> None:
        self.handle = handle
        self.stop = threading.Event()
        self.requests: list[bytes] = []
        self.lock = threading.Lock()
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.socket.settimeout(0.2)
        self.port = self.socket.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                connection, _ = self.socket.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._one, args=(connection,), daemon=True).start()

    def _one(self, connection: socket.socket) -> None:
        with connection:
            try:
                request = _read_request(connection)
                with self.lock:
                    self.requests.append(request)
                self.handle(connection, request, self)
            except OSError:
                pass  # the client hung up: what a cut-off looks like from here

    def __enter__(self) -> RawServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.socket.close()


def _read_request(connection: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0
    )
    while len(body) < length:
        body += connection.recv(65536)
    return head + b"\r\n\r\n" + body


def _json_reply(status: int, payload: object, reason: str = "OK") -> bytes:
    body = json.dumps(payload).encode()
    return (
        # One request per connection (the server closes it after replying): say so, or a client
        # may send its next request on the closed connection and count a connection error.
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n".encode()
        + body
    )


def _trickle(data: bytes, connection: socket.socket, server: RawServer) -> None:
    """One byte every 0.5 s, repeating ``data`` for ever (until the client hangs up)."""
    while not server.stop.is_set():
        for byte in data:
            connection.sendall(bytes([byte]))
            if server.stop.wait(0.5):
                return


def slow_headers(connection, request, server) -> None:
    _trickle(b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 10_000, connection, server)


def slow_body(connection, request, server) -> None:
    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 10000000\r\n\r\n")
    _trickle(b'{"choices": [{"message": {"content": "' + b"a" * 10_000, connection, server)


def _chat(engine: OpenAIEngine, text: str = "Hi") -> str:
    return engine.chat([{"role": "user", "content": text}], DecodingParams(max_new_tokens=8), request_id="rec-1")


def _timed(call) -> tuple[float, BaseException | None]:
    """Run ``call`` in a thread; (seconds it took, what it raised). A call that hangs fails the test."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as error:
            outcome.append(error)

    start = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(20)
    assert not thread.is_alive(), "the request was still running after 20 s"
    return time.monotonic() - start, outcome[0]


# ---------------------------------------------------------------- deadline


@pytest.mark.parametrize("handler", [slow_headers, slow_body], ids=["headers-trickle", "body-trickle"])
def test_slow_loris_is_cut_off_at_the_total_deadline(handler):
    with RawServer(handler) as server:
        # timeout (per read) 60 s: only the total deadline can stop a byte every 0.5 s.
        engine = OpenAIEngine(server.url, "served", api_key_env="", timeout=60.0, max_retries=0, deadline=2.0)
        engine._client()  # made before the clock starts (loading the TLS certificates is not the request)
        took, error = _timed(lambda: _chat(engine))
        engine.close()
    assert isinstance(error, MmsafeError), error
    assert "deadline of 2 s" in str(error) and "deadline option" in str(error)
    assert took < 2.0 + 1.5, took
    assert len(server.requests) == 1


def test_wikipedia_source_is_cut_off_at_its_deadline(tmp_path):
    from mmsafe.synthesis.images import WikipediaImageSource

    with RawServer(slow_body) as server:
        wiki = WikipediaImageSource(
            tmp_path / "cache",
            api_url=f"{server.url}/w/api.php",
            min_interval_s=0.0,
            max_retries=0,
            timeout=60.0,
            deadline=2.0,
        )
        took, error = _timed(lambda: wiki.find("Paris", "LOC"))
    assert isinstance(error, ImageError) and "deadline of 2 s" in str(error), error
    assert took < 2.0 + 1.5, took


# ---------------------------------------------------------------- body cap


def huge_body(connection, request, server) -> None:
    """200 with a 2 GB chunked body, made on the fly from one 1 MiB block (nothing held here)."""
    block = b"a" * 2**20
    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    connection.sendall(b'6\r\n{"a":"\r\n')
    for _ in range(2 * GIB // len(block)):
        if server.stop.is_set():
            return
        connection.sendall(b"100000\r\n" + block + b"\r\n")
    connection.sendall(b"0\r\n\r\n")


#: Runs the CLI and writes the process's own peak RSS (KiB) next to it, however it ends:
#: ``VmHWM``, the peak of this program's memory. (``ru_maxrss`` would not do: Linux carries
#: it over from the forked copy of the parent, a test process that may hold 1 GB itself.)
_REPORT_PEAK = """
import sys
from pathlib import Path
from mmsafe.cli import main
try:
    code = main(sys.argv[2:])
finally:
    status = Path("/proc/self/status").read_text()
    Path(sys.argv[1]).write_text(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
sys.exit(code)
"""


def _run_generate(
    server_url: str, tmp_path: Path, env: dict[str, str], *extra: str, verbose: bool = False
) -> tuple[subprocess.CompletedProcess, int]:
    data = tmp_path / "records.jsonl"
    record = {
        "id": "rec-0",
        "messages": [{"role": "user", "content": "Hello?"}],
        "image": None,
        "chosen": "No.",
        "rejected": ["Yes."],
        "rejected_sources": ["human"],
    }
    data.write_text(json.dumps(record) + "\n", encoding="utf-8")
    peak = tmp_path / "peak_kib.txt"
    command = [sys.executable, "-c", _REPORT_PEAK, str(peak), *(["--verbose"] if verbose else []), "generate", "--engine", "openai", "--base-url", server_url, "--model", "served",
               "--data", str(data), "--out", str(tmp_path / "out" / "responses.jsonl"), "--max-retries", "0", *extra]  # fmt: skip
    finished = subprocess.run(
        command, env={**os.environ, "MMSAFE_PROGRESS": "0", **env}, capture_output=True, text=True, timeout=300
    )
    return finished, int(peak.read_text()) if peak.is_file() else -1


def test_a_2gb_reply_stops_at_the_cap_and_memory_stays_bounded(tmp_path):
    with RawServer(huge_body) as server:
        finished, peak_kib = _run_generate(server.url, tmp_path, {})
    assert finished.returncode == 1, finished.stderr[-2000:]
    last = finished.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("error: ")
        and "max_body_bytes" in last
        and "64 MiB" in last
        and f"127.0.0.1:{server.port}" in last
    ), last
    assert "Traceback" not in finished.stderr
    assert 0 < peak_kib * 1024 < GIB, f"peak RSS {peak_kib / 1024:.0f} MiB"
    assert (
        not (tmp_path / "out" / "responses.jsonl").is_file()
        or "rec-0" not in (tmp_path / "out" / "responses.jsonl").read_text()
    )


def test_a_small_cap_stops_the_engine_and_the_image_source(tmp_path):
    from mmsafe.synthesis.images import WikipediaImageSource

    with RawServer(huge_body) as server:
        engine = OpenAIEngine(server.url, "served", api_key_env="", max_retries=3, max_body_bytes=4096)
        _, error = _timed(lambda: _chat(engine))
        engine.close()
        assert (
            isinstance(error, MmsafeError) and "4096 bytes (max_body_bytes)" in str(error) and server.url in str(error)
        ), error
        assert len(server.requests) == 1  # a reply over the cap is not asked for again
        wiki = WikipediaImageSource(
            tmp_path / "cache",
            api_url=f"{server.url}/w/api.php",
            min_interval_s=0.0,
            max_retries=0,
            max_body_bytes=4096,
        )
        _, error = _timed(lambda: wiki.find("Paris", "LOC"))
        assert isinstance(error, ImageError) and "max_body_bytes" in str(error), error


# ---------------------------------------------------------------- no text is not an answer


def _chat_server(contents: dict[str, list]):
    """Answers the prompt ``text`` with ``contents[text][n]`` on its n-th attempt (the last one after that); ``"*"``: any other prompt."""
    seen: Counter[str] = Counter()

    def handle(connection, request, server) -> None:
        body = json.loads(request.partition(b"\r\n\r\n")[2])
        text = body["messages"][-1]["content"]
        text = text if text in contents else "*"
        with server.lock:
            plan = contents[text]
            content = plan[min(seen[text], len(plan) - 1)]
            seen[text] += 1
        message = {"role": "assistant"} if content == "<missing>" else {"role": "assistant", "content": content}
        connection.sendall(_json_reply(200, {"choices": [{"message": message}]}))

    return handle, seen


@pytest.mark.parametrize("bad", [None, "<missing>", 5, ["a"]], ids=["null", "missing", "number", "list"])
def test_a_reply_without_text_is_retried_then_a_failed_response(bad):
    handle, seen = _chat_server({"never": [bad], "later": [bad, "  fine  "], "empty": [""]})
    with RawServer(handle) as server:
        engine = OpenAIEngine(server.url, "served", api_key_env="", max_retries=2, backoff_base=0.0)
        requests = [GenerationRequest(text, [_user(text)]) for text in ("never", "later", "empty")]
        answers = engine.generate(requests, DecodingParams(max_new_tokens=8))
        engine.close()
    failed, later, empty = answers
    assert isinstance(failed, FailedResponse) and failed.id == "never" and "content" in failed.reason, failed
    assert seen["never"] == 3  # the first attempt and max_retries retries
    assert later == "fine" and seen["later"] == 2
    assert empty == "" and seen["empty"] == 1  # an empty string is an answer: not retried


def test_a_failing_server_still_raises():
    def down(connection, request, server) -> None:
        connection.sendall(_json_reply(503, {"error": "busy"}, "Service Unavailable"))

    with (
        RawServer(down) as server,
        pytest.raises(MmsafeError, match=r"request 'a' failed after 2 attempts; last: HTTP 503"),
    ):
        OpenAIEngine(server.url, "served", api_key_env="", max_retries=1, backoff_base=0.0).generate(
            [GenerationRequest("a", [_user("Hi")])], DecodingParams()
        )


def test_the_llm_judge_records_no_text_as_unparseable_with_the_reason():
    from mmsafe.evaluate.judges.base import JudgeInput
    from mmsafe.evaluate.judges.llm import LlmJudge

    handle, seen = _chat_server({"*": [None]})
    with RawServer(handle) as server:
        judge = LlmJudge(model="judge", base_url=server.url, api_key_env="", max_retries=1, send_image=False)
        [verdict] = judge.judge(
            [JudgeInput(id="r1", messages=[_user("How do I pick a lock?")], response="I can't help with that.")]
        )
    assert verdict.verdict == "unparseable"
    assert "null" in verdict.extra["error"] and "null" in verdict.raw
    assert seen["*"] == 2  # retried once, as max_retries says


# ---------------------------------------------------------------- the key is never shown


def echo_headers(connection, request, server) -> None:
    """A proxy's error page: the request's headers, raw and as JSON, and the key's value alone."""
    head = request.partition(b"\r\n\r\n")[0].decode()
    headers = dict(line.split(": ", 1) for line in head.split("\r\n")[1:])
    key = headers.get("Authorization", "").removeprefix("Bearer ")
    page = f"bad request; your key: {key}\n{head}\n{json.dumps({'headers': headers})}\n"
    body = page.encode()
    connection.sendall(
        f"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    )


@pytest.mark.parametrize("key", [API_KEY, PLAIN_KEY], ids=["sk-key", "plain-key"])
def test_a_key_echoed_in_an_error_body_is_on_no_stream_and_in_no_file(key, tmp_path, monkeypatch):
    with RawServer(echo_headers) as server:
        finished, _ = _run_generate(
            server.url, tmp_path, {"MMSAFE_ECHO_KEY": key}, "--api-key-env", "MMSAFE_ECHO_KEY", verbose=True
        )
        monkeypatch.setenv("MMSAFE_ECHO_KEY", key)
        with pytest.raises(MmsafeError) as caught:
            _chat(OpenAIEngine(server.url, "served", api_key_env="MMSAFE_ECHO_KEY", max_retries=0))
    # The key reached the server (so the echo really held it) ...
    assert all(f"Bearer {key}".encode() in request for request in server.requests)
    # ... and the error names the status and quotes a redacted excerpt, never the key.
    assert finished.returncode == 1 and "HTTP 400" in finished.stderr and "[redacted]" in finished.stderr, (
        finished.stderr[-2000:]
    )
    message = str(caught.value)
    assert "HTTP 400" in message and "[redacted]" in message and "bad request" in message and "\n" not in message
    assert key not in message and key not in finished.stdout and key not in finished.stderr
    assert key[:12] not in finished.stderr  # not even a cut-off piece of it
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path


def test_redact_hides_keys_tokens_and_authorization_values():
    text = 'Authorization: Bearer abc.DEF-123\n{"authorization": "Basic QWxhZGRpbjpvcGVu"} x-api-key=zz9 token sk-live_9f8e7d6c5b key=my-own-key'
    redacted = redact(text, ["my-own-key"])
    for secret in ("abc.DEF-123", "QWxhZGRpbjpvcGVu", "zz9", "sk-live_9f8e7d6c5b", "my-own-key"):
        assert secret not in redacted, secret
    assert redacted.startswith("Authorization: [redacted]") and redacted.count("[redacted]") >= 5
    assert redact("no secrets here: 42 tokens left") == "no secrets here: 42 tokens left"


def test_the_engine_does_not_follow_redirects():
    def redirect(connection, request, server) -> None:
        if request.startswith(b"POST /v1/chat/completions"):
            connection.sendall(
                f"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.1:{server.port}/elsewhere\r\nContent-Length: 0\r\n\r\n".encode()
            )
        else:
            connection.sendall(_json_reply(200, {"choices": [{"message": {"content": "followed"}}]}))

    with RawServer(redirect) as server, pytest.raises(MmsafeError, match="HTTP 307"):
        _chat(OpenAIEngine(server.url, "served", api_key_env="", max_retries=3))
    assert len(server.requests) == 1


def _user(text: str):
    from mmsafe.data.records import Message

    return Message("user", text)
