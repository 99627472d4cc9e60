"""The vLLM engine, against a fake ``vllm`` module (vLLM needs a CUDA GPU to install and run).

The fake records what the engine hands vLLM (model options, prompts, images, sampling
parameters) and answers in vLLM's output shape (``RequestOutput.outputs[0].text``).
"""

from __future__ import annotations

import sys
import types
from typing import ClassVar

import pytest
from PIL import Image

from mmsafe.data.records import Message
from mmsafe.errors import ConfigError
from mmsafe.generate.engine import DecodingParams, FailedResponse, GenerationRequest


class FakeLLM:
    instances: ClassVar[list[FakeLLM]] = []

    def __init__(self, **options):
        self.options = options
        self.calls = []
        FakeLLM.instances.append(self)

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.calls.append((prompts, sampling_params))
        # vLLM answers in input order; the answer names the prompt it belongs to.
        return [
            types.SimpleNamespace(
                request_id=str(index),
                outputs=[]
                if "no answer" in prompt["prompt"]
                else [types.SimpleNamespace(text=f"  answer to {prompt['prompt'][-24:]!r} ")],
            )
            for index, prompt in enumerate(prompts)
        ]


class FakeSamplingParams:
    def __init__(self, **options):
        self.options = options


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM = FakeLLM
    module.SamplingParams = FakeSamplingParams
    module.__version__ = "0.0-fake"
    FakeLLM.instances = []
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


def _requests():
    image = Image.new("RGB", (30, 20), (200, 10, 10))
    return [
        GenerationRequest("with-image", [Message("user", "<image>\nWhat is in the picture, first?")], image),
        GenerationRequest("text-only", [Message("user", "A question without a picture, second?")]),
        GenerationRequest(
            "history",
            [Message("user", "Hi"), Message("assistant", "Hello."), Message("user", "<image>\nAnd this one, third?")],
            image,
        ),
    ]


def test_prompts_images_and_sampling_reach_vllm_and_answers_keep_request_order(fake_vllm, tiny_model_dir):
    from mmsafe.generate.hf_engine import HFEngine
    from mmsafe.generate.vllm_engine import VLLMEngine

    engine = VLLMEngine(tiny_model_dir, dtype="bfloat16", max_model_len=2048, prompt_style="llava-v1", image_mode="pad")
    (llm,) = FakeLLM.instances
    assert (
        llm.options["model"] == str(tiny_model_dir)
        and llm.options["dtype"] == "bfloat16"
        and llm.options["max_model_len"] == 2048
    )
    assert llm.options["limit_mm_per_prompt"] == {"image": 1} and llm.options["trust_remote_code"] is False
    assert llm.options["load_format"] == "safetensors"

    requests = _requests()
    answers = engine.generate(requests, DecodingParams(max_new_tokens=40, seed=7))
    ((prompts, sampling),) = llm.calls
    # The prompt text is the one the Hugging Face engine renders for the same settings.
    reference = HFEngine(tiny_model_dir, dtype="float32", device="cpu", prompt_style="llava-v1", image_mode="pad")
    assert [prompt["prompt"] for prompt in prompts] == [reference.render(request) for request in requests]
    assert "multi_modal_data" not in prompts[1]
    for position in (0, 2):
        image = prompts[position]["multi_modal_data"]["image"]
        assert isinstance(image, Image.Image) and image.size == (30, 30)  # padded to a square, as image_mode pad does
    assert sampling.options["temperature"] == 0.0 and sampling.options["top_p"] == 1.0  # greedy
    assert sampling.options["max_tokens"] == 40 and sampling.options["seed"] == 7 and sampling.options["n"] == 1
    assert sampling.options["stop_token_ids"] and reference.tokenizer.eos_token_id in sampling.options["stop_token_ids"]
    assert answers == [f"answer to {prompt['prompt'][-24:]!r}" for prompt in prompts]  # stripped, in request order
    assert "first" in answers[0] and "second" in answers[1] and "third" in answers[2]
    assert engine.describe()["type"] == "vllm" and engine.preferred_batch_size == 256


def test_sampling_options_and_a_missing_answer(fake_vllm, tiny_model_dir):
    from mmsafe.generate.vllm_engine import VLLMEngine

    engine = VLLMEngine(tiny_model_dir, batch_size=32)
    assert engine.preferred_batch_size == 32
    requests = [*_requests(), GenerationRequest("empty", [Message("user", "no answer")])]
    answers = engine.generate(
        requests, DecodingParams(max_new_tokens=8, do_sample=True, temperature=0.7, top_p=0.9, seed=3, min_new_tokens=2)
    )
    sampling = FakeLLM.instances[0].calls[0][1]
    assert (
        sampling.options["temperature"],
        sampling.options["top_p"],
        sampling.options["seed"],
        sampling.options["min_tokens"],
    ) == (0.7, 0.9, 3, 2)
    assert answers[3] == FailedResponse("empty", "vllm returned no text for this prompt")
    assert all(isinstance(answer, str) for answer in answers[:3])


def test_a_resumable_run_through_vllm(fake_vllm, tiny_model_dir, dataset, tmp_path):
    from mmsafe.data.jsonl import read_jsonl
    from mmsafe.generate import local_engine
    from mmsafe.generate.runs import generate_responses

    engine = local_engine("vllm", tiny_model_dir, batch_size="auto", vllm_options={"max_model_len": 512})
    out = tmp_path / "responses.jsonl"
    summary = generate_responses(
        engine, dataset, out, params=DecodingParams(max_new_tokens=8), batch_size=engine.preferred_batch_size
    )
    rows = [row for _, row in read_jsonl(out)]
    assert summary.generated == 24 and len({row["id"] for row in rows}) == 24
    assert all(row["response"].startswith("answer to") for row in rows)
    assert len(FakeLLM.instances[0].calls) == 1  # 24 prompts fit one call of 256
    assert (
        generate_responses(engine, dataset, out, params=DecodingParams(max_new_tokens=8), batch_size=256).generated == 0
    )  # resumed: nothing left


def test_without_vllm_one_clear_error(monkeypatch, tiny_model_dir, dataset, tmp_path, capsys):
    from mmsafe.cli import main

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    code = main(
        [
            "generate",
            "--engine",
            "vllm",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(dataset),
            "--out",
            str(tmp_path / "out.jsonl"),
        ]
    )
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(error) == 1
    assert 'pip install "mmsafe[serve]"' in error[0] and "Traceback" not in error[0]
    with pytest.raises(ConfigError, match="no --adapter"):
        from mmsafe.generate import local_engine

        local_engine("vllm", tiny_model_dir, adapter=tmp_path)


def test_cli_selects_vllm_and_batch_size_auto(fake_vllm, tiny_model_dir, dataset, tmp_path):
    from mmsafe.cli import main

    out = tmp_path / "out.jsonl"
    args = ["generate", "--engine", "vllm", "--model", str(tiny_model_dir), "--data", str(dataset), "--out", str(out)]
    assert main([*args, "--batch-size", "auto", "--max-model-len", "1024", "--max-new-tokens", "5"]) == 0
    (llm,) = FakeLLM.instances
    assert llm.options["max_model_len"] == 1024
    prompts, sampling = llm.calls[0]
    assert len(prompts) == 24 and sampling.options["max_tokens"] == 5
    import yaml

    written = yaml.safe_load(out.with_name(out.name + ".config.yaml").read_text(encoding="utf-8"))
    assert (
        written["engine"]["type"] == "vllm"
        and written["engine"]["max_model_len"] == 1024
        and written["batch_size"] == 256
    )
