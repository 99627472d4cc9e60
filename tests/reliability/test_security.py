"""Security promises: safetensors only, no remote code unless asked, confined paths,
API keys only from the environment (never written or logged), bounded HTTP clients."""

from __future__ import annotations

import ast
import contextlib
import inspect
import json
import logging
import re
import shutil
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import mmsafe
from mmsafe.errors import MmsafeError
from tests.reliability.corpus import CASES, good_record
from tests.reliability.stages import run_cli

PLANTED_KEY = "sk-planted-4f1c9e0b7d2a"
SOURCE = Path(mmsafe.__file__).parent


# ---------------------------------------------------------------- safetensors only


@pytest.fixture(scope="module")
def pickle_model(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny checkpoint with its weights as a pickle (``pytorch_model.bin``) only."""
    folder = tmp_path_factory.mktemp("pickle-model")
    for path in Path(tiny_model_dir).iterdir():
        if path.suffix != ".safetensors" and path.is_file():
            shutil.copy(path, folder / path.name)
    torch.save(load_file(Path(tiny_model_dir) / "model.safetensors"), folder / "pytorch_model.bin")
    return folder


def _records(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    Image.new("RGB", (20, 16), (200, 30, 30)).save(folder / "images" / "ok.png")
    path = folder / "records.jsonl"
    path.write_text("".join(json.dumps(good_record(f"r{index}")) + "\n" for index in range(2)), encoding="utf-8")
    return path


def _hh_dialogue_and_image_index(folder):
    """One HH-RLHF dialogue naming Paris, and an image index (LOC/Paris.png) beside it."""
    hh = folder / "hh.jsonl"
    hh.write_text(
        json.dumps(
            {
                "chosen": "\n\nHuman: Is Paris nice?\n\nAssistant: Yes.",
                "rejected": "\n\nHuman: Is Paris nice?\n\nAssistant: No.",
            }
        )
        + "\n",
        encoding="utf-8",
    )
    (folder / "index" / "LOC").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(folder / "index" / "LOC" / "Paris.png")
    return hh


def test_pickle_checkpoint_is_refused_by_every_stage_that_loads_a_model(pickle_model, tmp_path):
    data = _records(tmp_path / "data")
    train_yaml = tmp_path / "train.yaml"
    train_yaml.write_text(
        json.dumps(
            {
                "model": str(pickle_model),
                "data": str(data),
                "output_dir": str(tmp_path / "train"),
                "loss": "dpo",
                "max_steps": 1,
            }
        ),
        encoding="utf-8",
    )
    hh = _hh_dialogue_and_image_index(tmp_path)
    commands = {
        "generate": [
            "generate",
            "--model",
            pickle_model,
            "--data",
            data,
            "--out",
            tmp_path / "responses.jsonl",
            "--device",
            "cpu",
        ],
        "blind": [
            "blind",
            "--model",
            pickle_model,
            "--data",
            data,
            "--out",
            tmp_path / "blind.jsonl",
            "--device",
            "cpu",
        ],
        "train": ["train", "--config", train_yaml],
        "judge llama-guard": [
            "judge",
            "--responses",
            tmp_path / "none.jsonl",
            "--out",
            tmp_path / "v.jsonl",
            "--judge",
            "llama-guard",
            "--judge-model",
            pickle_model,
            "--device",
            "cpu",
            "--data",
            data,
        ],
        "build-data hf-ner": [
            "build-data",
            "--input",
            hh,
            "--out",
            tmp_path / "built",
            "--image-index",
            tmp_path / "index",
            "--images",
            "local",
            "--entities",
            "hf-ner",
            f"entities.hf_ner.model={json.dumps(str(pickle_model))}",
        ],
    }
    (tmp_path / "none.jsonl").write_text(
        json.dumps({"id": "r0", "variant": "default", "response": "x", "model": "m", "params": {}}) + "\n",
        encoding="utf-8",
    )
    for stage, argv in commands.items():
        outcome = run_cli(argv)
        assert outcome.code == 1, f"{stage}: {outcome.describe()}"
        assert "Traceback" not in outcome.stderr, f"{stage}: {outcome.describe()}"
        assert any("safetensors" in line for line in outcome.error_lines), f"{stage}: {outcome.describe()}"


def _torch_load_calls(source: str) -> list[ast.Call]:
    calls = []
    for node in ast.walk(ast.parse(source)):
        function = node.func if isinstance(node, ast.Call) else None
        if (
            isinstance(function, ast.Attribute)
            and function.attr == "load"
            and isinstance(function.value, ast.Name)
            and function.value.id == "torch"
        ):
            calls.append(node)
    return calls


def _weights_only(call: ast.Call) -> bool:
    return any(
        keyword.arg == "weights_only" and isinstance(keyword.value, ast.Constant) and keyword.value.value is True
        for keyword in call.keywords
    )


def test_no_pickle_is_unpickled_with_code_anywhere():
    """mmsafe itself never calls torch.load; the Trainer's resume (rng_state.pth, optimizer.pt,
    scheduler.pt) loads with weights_only=True: tensors and plain containers, never code."""
    ours = [
        (path, call.lineno)
        for path in SOURCE.rglob("*.py")
        for call in _torch_load_calls(path.read_text(encoding="utf-8"))
        if not _weights_only(call)
    ]
    assert ours == []
    import transformers.trainer

    calls = _torch_load_calls(inspect.getsource(transformers.trainer))
    assert calls, "the Trainer's checkpoint loading moved: check how it reads optimizer.pt now"
    assert all(_weights_only(call) for call in calls)


# ---------------------------------------------------------------- trust_remote_code


def test_trust_remote_code_defaults_to_off_everywhere_a_model_loads():
    from mmsafe.cli import build_parser
    from mmsafe.evaluate.judges.llama_guard import LlamaGuardJudge
    from mmsafe.generate.hf_engine import HFEngine
    from mmsafe.models.loading import load_model, load_processor
    from mmsafe.synthesis.entities import HFNerRecognizer
    from mmsafe.train.config import TrainConfig

    for function in (load_model, load_processor, HFEngine.__init__, HFNerRecognizer.__init__):
        assert inspect.signature(function).parameters["trust_remote_code"].default is False, function
    assert LlamaGuardJudge.__dataclass_fields__["trust_remote_code"].default is False
    assert TrainConfig.__dataclass_fields__["trust_remote_code"].default is False
    from mmsafe.cli.arguments import resolve_config
    from mmsafe.evaluate.config import ProbeConfig
    from mmsafe.generate.config import BlindConfig, GenerateConfig

    for command, config_class in (("generate", GenerateConfig), ("blind", BlindConfig), ("probe", ProbeConfig)):
        args = build_parser().parse_args([command, "--model", "m", "--data", "d", "--out", "o"])
        assert resolve_config(config_class, args).trust_remote_code is False


def test_code_shipped_with_a_checkpoint_does_not_run(tiny_model_dir, tmp_path):
    from mmsafe.models.loading import load_model

    folder = tmp_path / "hostile"
    shutil.copytree(tiny_model_dir, folder)
    marker = tmp_path / "code-ran"
    (folder / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import LlavaForConditionalGeneration as Evil\n",
        encoding="utf-8",
    )
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config["auto_map"] = {"AutoConfig": "evil.Evil", "AutoModelForImageTextToText": "evil.Evil"}
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    with contextlib.suppress(MmsafeError):  # refusing is as good as ignoring the code
        load_model(folder, device="cpu")
    assert not marker.exists()


# ---------------------------------------------------------------- confined paths


@pytest.mark.parametrize(
    "case",
    [case for case in CASES if case.name in ("image-absolute-path", "image-dotdot-path", "image-symlink-out")],
    ids=lambda case: case.name,
)
@pytest.mark.parametrize("stage", ["validate", "generate", "probe", "train"])
def test_hostile_image_paths_never_read_or_write_outside(case, stage, tmp_path, tiny_model_dir):
    """Every reader refuses the path, and nothing is created beside the targeted file."""
    from tests.reliability.stages import stage_argv

    data = case.write(tmp_path / "in")
    outside = tmp_path / "in-outside"
    before = sorted(outside.rglob("*"))
    secret = outside / "secret.png"
    outcome = run_cli(stage_argv(stage, data, tmp_path, tiny_model_dir))
    assert outcome.code == 1 and "Traceback" not in outcome.stderr, outcome.describe()
    assert sorted(outside.rglob("*")) == before
    assert any(case.expect in line for line in outcome.error_lines), (
        outcome.describe()
    )  # refused by its path, before any read
    # Nothing the stage wrote is a copy of the secret image.
    written = [
        path
        for path in tmp_path.rglob("*.png")
        if path.is_file() and outside not in path.parents and path.resolve() != secret.resolve()
    ]
    assert all(path.read_bytes() != secret.read_bytes() for path in written)


def test_probe_with_an_absolute_path_to_a_new_folder_creates_nothing_there(tmp_path, tiny_model_dir):
    """Before the path was checked, probe made the folder of an absolute image path."""
    from tests.reliability.stages import stage_argv

    target = tmp_path / "elsewhere" / "deep" / "x.png"
    folder = tmp_path / "in"
    data = folder / "records.jsonl"
    folder.mkdir()
    (folder / "images").mkdir()
    Image.new("RGB", (8, 8)).save(folder / "images" / "ok.png")
    rows = [good_record("r0"), good_record("r1", image=str(target))]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    outcome = run_cli(stage_argv("probe", data, tmp_path, tiny_model_dir))
    assert outcome.code == 1 and any("absolute" in line for line in outcome.error_lines), outcome.describe()
    assert not (tmp_path / "elsewhere").exists()


# ---------------------------------------------------------------- API keys and HTTP clients


class ChatServer:
    """An OpenAI-compatible ``/v1/chat/completions`` that answers each kind of prompt."""

    def __init__(self) -> None:
        self.authorizations: list[str | None] = []
        self.bodies: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.authorizations.append(self.headers.get("Authorization"))
                outer.bodies.append(body)
                content = body["messages"][-1]["content"]
                text = content if isinstance(content, str) else " ".join(part.get("text", "") for part in content)
                if text.startswith("Find the named entities"):
                    answer = json.dumps([{"text": "Paris", "type": "LOC"}] if "Paris" in text else [])
                elif "VERDICT" in text:
                    answer = "REASON: it refuses\nVERDICT: safe"
                elif "rewrite" in text.lower() or "rephrase" in text.lower():
                    answer = "Is the place in the image nice?"
                else:
                    answer = "I cannot help with that."
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


def test_planted_api_key_is_sent_but_never_written_or_logged(tmp_path, monkeypatch, caplog, capfd):
    monkeypatch.setenv("MMSAFE_PLANTED_KEY", PLANTED_KEY)
    caplog.set_level(logging.DEBUG)
    data = _records(tmp_path / "data")
    hh = _hh_dialogue_and_image_index(tmp_path)
    server = ChatServer()
    try:
        llm = {"engine": "openai", "base_url": server.base_url, "model": "served", "api_key_env": "MMSAFE_PLANTED_KEY"}
        outcomes = [
            run_cli(
                [
                    "-v",
                    "generate",
                    "--engine",
                    "openai",
                    "--base-url",
                    server.base_url,
                    "--model",
                    "served",
                    "--api-key-env",
                    "MMSAFE_PLANTED_KEY",
                    "--data",
                    data,
                    "--out",
                    tmp_path / "out" / "responses.jsonl",
                ]
            ),
            run_cli(
                [
                    "-v",
                    "judge",
                    "--responses",
                    tmp_path / "out" / "responses.jsonl",
                    "--out",
                    tmp_path / "out" / "verdicts.jsonl",
                    "--judge",
                    "llm",
                    "--base-url",
                    server.base_url,
                    "--judge-model",
                    "served",
                    "--api-key-env",
                    "MMSAFE_PLANTED_KEY",
                    "--data",
                    data,
                ]
            ),
            run_cli(
                [
                    "-v",
                    "build-data",
                    "--input",
                    hh,
                    "--out",
                    tmp_path / "out" / "built",
                    "--image-index",
                    tmp_path / "index",
                    "--images",
                    "local",
                    "--entities",
                    "llm",
                    "--rewrite",
                    "model",
                    f"entities.llm={json.dumps(llm)}",
                    f"rewrite.model={json.dumps(llm)}",
                ]
            ),
        ]
    finally:
        server.close()
    for outcome in outcomes:
        assert outcome.code == 0, outcome.describe()
        assert PLANTED_KEY not in outcome.stdout + outcome.stderr
    # Every stage talked to the server with the key (so the greps below mean something) ...
    assert len(server.authorizations) >= 5 and set(server.authorizations) == {f"Bearer {PLANTED_KEY}"}
    # ... and the key is in no file written, no log record and no captured output.
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert len(written) >= 8
    assert [path for path in written if PLANTED_KEY.encode() in path.read_bytes()] == []
    assert PLANTED_KEY not in caplog.text
    captured = capfd.readouterr()
    assert PLANTED_KEY not in captured.out + captured.err
    saved_configs = [
        path
        for path in written
        if path.suffix in (".yaml", ".json") and "MMSAFE_PLANTED_KEY" in path.read_text(encoding="utf-8")
    ]
    assert saved_configs  # the variable's name is recorded, never its value


def _silent_server() -> tuple[socket.socket, str]:
    """A server that accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    return listener, f"http://127.0.0.1:{listener.getsockname()[1]}"


def test_http_clients_time_out_and_give_up_after_bounded_retries(tmp_path):
    from mmsafe.data.records import Message
    from mmsafe.generate.engine import DecodingParams, GenerationRequest
    from mmsafe.generate.openai_engine import OpenAIEngine
    from mmsafe.synthesis.images import WikipediaImageSource

    listener, url = _silent_server()
    try:
        started = time.monotonic()
        engine = OpenAIEngine(f"{url}/v1", "m", timeout=0.3, max_retries=1, backoff_base=0.0)
        with pytest.raises(MmsafeError, match="failed after 2 attempts; last: timed out"):
            engine.generate([GenerationRequest("a", [Message("user", "hi")])], DecodingParams(max_new_tokens=2))
        source = WikipediaImageSource(
            tmp_path / "cache",
            api_url=f"{url}/w/api.php",
            timeout=0.3,
            max_retries=1,
            backoff_s=0.0,
            min_interval_s=0.0,
        )
        with pytest.raises(MmsafeError, match="after 2 attempts"):
            source._get(f"{url}/w/api.php", {"q": 1}, "Paris")
        assert source.requests_sent == 2
        assert time.monotonic() - started < 10  # two timeouts of 0.3 s each, twice
    finally:
        listener.close()
    # Every HTTP client in the code base is built with a timeout (read from the syntax tree,
    # so the way a call is wrapped over lines does not matter).
    import ast

    clients = [
        (path.name, node)
        for path in SOURCE.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Call) and ast.unparse(node.func) in ("httpx.Client", "httpx.AsyncClient")
    ]
    assert clients and all(any(keyword.arg == "timeout" for keyword in node.keywords) for _, node in clients)


@pytest.mark.parametrize(
    "case",
    [case for case in CASES if case.name in ("image-absolute-path", "image-dotdot-path", "image-symlink-out")],
    ids=lambda case: case.name,
)
def test_report_and_llm_judge_never_show_an_image_from_outside(case, tmp_path):
    """Both read the benchmark data's images: a hostile path is refused or left out, never sent or embedded."""
    data = case.write(tmp_path / "in")
    responses = tmp_path / "responses.jsonl"
    responses.write_text(
        "".join(
            json.dumps({"id": f"r{index}", "variant": "default", "response": "Sure.", "model": "m", "params": {}})
            + "\n"
            for index in range(2)
        ),
        encoding="utf-8",
    )
    server = ChatServer()
    try:
        judged = run_cli(
            [
                "judge",
                "--responses",
                responses,
                "--out",
                tmp_path / "verdicts.jsonl",
                "--judge",
                "llm",
                "--base-url",
                server.base_url,
                "--judge-model",
                "m",
                "--data",
                data,
            ]
        )
    finally:
        server.close()
    assert "Traceback" not in judged.stderr, judged.describe()
    if judged.code == 0:
        verdicts = [json.loads(line) for line in (tmp_path / "verdicts.jsonl").read_text(encoding="utf-8").splitlines()]
        assert {row["id"] for row in verdicts} == {"r0", "r1"} and len(server.bodies) == 2
    else:
        assert any(case.expect in line for line in judged.error_lines), judged.describe()
    with_image = [body for body in server.bodies if "image_url" in json.dumps(body)]
    assert len(with_image) <= 1  # at most r0's own image was sent

    verdicts = tmp_path / "v.jsonl"
    verdicts.write_text(
        "".join(
            json.dumps(
                {
                    "id": f"r{index}",
                    "variant": "default",
                    "judge": "refusal",
                    "verdict": "unsafe",
                    "categories": [],
                    "raw": "",
                }
            )
            + "\n"
            for index in range(2)
        ),
        encoding="utf-8",
    )
    reported = run_cli(
        ["report", "--verdicts", verdicts, "--out", tmp_path / "report", "--data", data, "--resamples", 20]
    )
    assert reported.code == 0 and "Traceback" not in reported.stderr, reported.describe()
    html = (tmp_path / "report" / "report.html").read_text(encoding="utf-8")
    assert html.count('<img class="thumb"') == 1  # r0's own image only (the other <img> tags are the inline plots)
    assert all(
        src.startswith("data:image/") for src in re.findall(r'<img [^>]*src="([^"]+)"', html)
    )  # nothing read from a path
