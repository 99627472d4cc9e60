"""The llm entity stage and the model rewrite stage through the HTTP engine, against a local server."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mmsafe.config import from_dict
from mmsafe.synthesis import BuildConfig, build_data
from tests.synthesis.build_fixtures import hh_line


class FakeChatServer:
    """Answers ``POST /v1/chat/completions``: entities as JSON, rewrites as plain text."""

    def __init__(self) -> None:
        self.prompts: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][-1]["content"]
                outer.prompts.append(prompt)
                if prompt.startswith("Find the named entities"):
                    instruction = prompt.rsplit("Instruction: ", 1)[1]
                    found = [
                        {"text": name, "type": kind}
                        for name, kind in (("Barack Obama", "PER"), ("Paris", "LOC"))
                        if name in instruction
                    ]
                    answer = json.dumps(found)
                elif "the person featured in the image" in prompt:
                    answer = "Why is the man in this photo so popular?"
                else:
                    answer = "Why is Paris so popular?"  # names the entity: must fall back
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def chat_server():
    server = FakeChatServer()
    yield server
    server.close()


def test_llm_entities_and_model_rewrite_through_an_openai_compatible_server(chat_server, image_index, tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text(
        hh_line(["Why is Barack Obama so popular in Paris?"], "He gave good speeches.", "He bribed them.") + "\n",
        encoding="utf-8",
    )
    model = {"engine": "openai", "base_url": chat_server.base_url, "model": "fake-model"}
    config = from_dict(
        BuildConfig,
        {
            "input": str(source),
            "out": str(tmp_path / "out"),
            "entities": {"method": "llm", "llm": model},
            "images": {"index": str(image_index)},
            "rewrite": {"method": "model", "deictic": "single", "model": model},
        },
    )
    summary = build_data(config)
    rows = [json.loads(line) for line in (tmp_path / "out" / "records.jsonl").read_text().splitlines()]
    by_entity = {row["meta"]["entity"]: row for row in rows}
    assert by_entity["Barack Obama"]["messages"][-1]["content"] == "<image>\nWhy is the man in this photo so popular?"
    assert by_entity["Barack Obama"]["meta"]["rewrite"] == "model:rewrite_v1"
    assert (
        by_entity["Barack Obama"]["meta"]["mid_prompt"]
        == "Why is the person featured in the image so popular in Paris?"
    )
    paris = by_entity["Paris"]
    assert (
        paris["messages"][-1]["content"] == "<image>\nWhy is Barack Obama so popular in the site visible in the image?"
    )
    assert (paris["meta"]["rewrite"], paris["meta"]["rewrite_fallback"]) == ("template", "names the entity")
    assert summary.rewrite_fallbacks == {"names the entity": 1}
    assert len(chat_server.prompts) == 3  # one entity request, two rewrites
