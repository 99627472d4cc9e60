"""The in-process engine on the tiny model: batching, order, decoding options, adapters."""

from __future__ import annotations

import random

import pytest
from PIL import Image

from mmsafe.data.records import Message
from mmsafe.errors import ConfigError, DataError
from mmsafe.generate.engine import DecodingParams, GenerationRequest
from mmsafe.generate.hf_engine import HFEngine, plan_batches


def _requests(count: int) -> list[GenerationRequest]:
    """Prompts of many lengths; every third has no image; some have a chat history."""
    requests = []
    for index in range(count):
        text = "Tell me about " + " ".join(["the site visible in the image"] * (1 + index % 6)) + "?"
        with_image = index % 3 != 0
        messages = [Message("user", ("<image>\n" if with_image else "") + text)]
        if index % 4 == 3:
            messages = [Message("user", "Hello"), Message("assistant", "Hi, how can I help?"), *messages]
        image = Image.new("RGB", (20 + index, 40), ((index * 53) % 256, 40, 200)) if with_image else None
        requests.append(GenerationRequest(id=f"q{index}", messages=messages, image=image))
    return requests


def test_plan_batches_groups_by_image_and_length():
    # Hand example from the docstring: lengths [5, 9, 7, 3], batch size 2 -> [1, 2], [0, 3].
    plan = plan_batches([5, 9, 7, 3], [False] * 4, 2)
    assert [batch.indices for batch in plan] == [[1, 2], [0, 3]]
    # Images never share a batch with text-only prompts; ties keep input order.
    plan = plan_batches([4, 4, 8, 4], [True, False, True, False], 4)
    assert [(batch.indices, batch.with_images) for batch in plan] == [([2, 0], True), ([1, 3], False)]
    with pytest.raises(ConfigError):
        plan_batches([1], [False], 0)


def test_greedy_outputs_identical_with_batch_size_1_and_16(tiny_engine):
    requests = _requests(32)  # two full batches of 16, mixed images, lengths and histories
    params = DecodingParams(max_new_tokens=16)
    batched = HFEngine(tiny_engine.loaded, batch_size=16).generate(requests, params)
    single = HFEngine(tiny_engine.loaded, batch_size=1).generate(requests, params)
    assert batched == single
    assert len(set(batched)) > 16  # different prompts really got different answers
    assert all(isinstance(text, str) for text in batched)


def test_answers_follow_request_order(tiny_engine):
    requests = _requests(12)
    params = DecodingParams(max_new_tokens=8)
    answers = dict(zip([r.id for r in requests], tiny_engine.generate(requests, params), strict=True))
    shuffled = requests[:]
    random.Random(1).shuffle(shuffled)
    assert tiny_engine.generate(shuffled, params) == [answers[r.id] for r in shuffled]


def test_image_changes_the_answer(tiny_engine):
    message = [Message("user", "<image>\nWhat is shown in the image?")]
    params = DecodingParams(max_new_tokens=12)
    red = GenerationRequest("a", message, Image.new("RGB", (56, 56), (255, 0, 0)))
    blue = GenerationRequest("b", message, Image.new("RGB", (56, 56), (0, 0, 255)))
    no_image = GenerationRequest("c", message, None)
    answers = tiny_engine.generate([red, blue, no_image], params)
    assert len(set(answers)) == 3


def test_max_new_tokens_and_stop_at_eos(tiny_engine):
    requests = _requests(4)
    one = tiny_engine.generate(requests, DecodingParams(max_new_tokens=1))
    eight = tiny_engine.generate(requests, DecodingParams(max_new_tokens=8))
    # Greedy decoding: the 1-token answer is where the 8-token answer starts.
    assert all(long.startswith(short) and len(long) > len(short) for short, long in zip(one, eight, strict=True))

    # Make the first greedy token of request 0 the end-of-sequence token: its answer stops there.
    import torch

    processor = tiny_engine.processor
    inputs = processor(
        text=[tiny_engine.render(requests[0])],
        images=[tiny_engine._prepare_image(requests[0].image)] if requests[0].image else None,
        return_tensors="pt",
    )
    with torch.inference_mode():
        first_token = int(tiny_engine.model.generate(**inputs, max_new_tokens=1, do_sample=False)[0, -1])
    config = tiny_engine.model.generation_config
    saved = config.eos_token_id
    config.eos_token_id = first_token
    try:
        stopped = tiny_engine.generate(requests[:1], DecodingParams(max_new_tokens=8))
        forced = tiny_engine.generate(requests[:1], DecodingParams(max_new_tokens=8, min_new_tokens=8))
    finally:
        config.eos_token_id = saved
    assert stopped == one[:1]
    assert forced[0] != stopped[0] and forced[0].startswith(stopped[0])


def test_sampling_is_seeded(tiny_engine):
    requests = _requests(6)
    first = tiny_engine.generate(requests, DecodingParams(max_new_tokens=16, do_sample=True, seed=3))
    again = tiny_engine.generate(requests, DecodingParams(max_new_tokens=16, do_sample=True, seed=3))
    other = tiny_engine.generate(requests, DecodingParams(max_new_tokens=16, do_sample=True, seed=4))
    greedy = tiny_engine.generate(requests, DecodingParams(max_new_tokens=16))
    assert first == again
    assert first != other
    assert first != greedy


def test_bfloat16_generates(tiny_model_dir):
    engine = HFEngine(tiny_model_dir, dtype="bfloat16", device="cpu", batch_size=4)
    assert engine.describe()["dtype"] == "bfloat16"
    answers = engine.generate(_requests(5), DecodingParams(max_new_tokens=6))
    assert len(answers) == 5 and any(answers)


def test_lora_adapter_is_applied(tiny_model_dir, tiny_engine, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model

    from mmsafe.models import load_model

    base = load_model(tiny_model_dir, dtype="float32", device="cpu").model
    peft_model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:  # zero-initialised: make the adapter change something
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir, safe_serialization=True)

    requests = _requests(6)
    params = DecodingParams(max_new_tokens=12)
    with_adapter = HFEngine(tiny_model_dir, device="cpu", adapter=adapter_dir)
    assert with_adapter.name == str(adapter_dir)
    assert with_adapter.generate(requests, params) != tiny_engine.generate(requests, params)


def test_bad_requests_and_settings(tiny_engine, tiny_model_dir):
    image = Image.new("RGB", (8, 8))
    with pytest.raises(DataError, match=r"-:q9:messages: an image is given"):
        tiny_engine.generate(
            [GenerationRequest("q9", [Message("user", "no token here")], image)], DecodingParams(max_new_tokens=2)
        )
    assert tiny_engine.generate([], DecodingParams()) == []
    with pytest.raises(ConfigError, match="prompt_style"):
        HFEngine(tiny_engine.loaded, prompt_style="chatml")
    with pytest.raises(ConfigError, match="batch_size"):
        HFEngine(tiny_engine.loaded, batch_size=0)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        DecodingParams(max_new_tokens=0)
    with pytest.raises(ConfigError, match="top_p"):
        DecodingParams(top_p=0.0)
