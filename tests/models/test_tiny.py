import hashlib

import torch
from PIL import Image

from mmsafe.data.records import Message
from mmsafe.models import load_model
from mmsafe.models.prompts import image_token_count, render_prompt
from mmsafe.models.tiny import build_tiny_model


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tiny_model_builds_loads_and_generates_with_an_image(tmp_path):
    out = build_tiny_model(tmp_path / "tiny", seed=3)
    loaded = load_model(out, dtype="float32", device="cpu")
    processor = loaded.processor
    prompt = render_prompt(processor, [Message("user", "<image>\nWhat is shown in the image?")])
    inputs = processor(images=Image.new("RGB", (80, 50), (200, 30, 30)), text=prompt, return_tensors="pt")
    with torch.no_grad():
        logits = loaded.model(**inputs).logits
        generated = loaded.model.generate(**inputs, max_new_tokens=8, do_sample=False)

    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert (inputs["input_ids"] == image_id).sum().item() == image_token_count(processor) == 16
    assert logits.shape[:2] == inputs["input_ids"].shape
    assert generated.shape[1] > inputs["input_ids"].shape[1]
    assert type(loaded.model).__name__ == "LlavaForConditionalGeneration"
    # Small enough for every test to build its own in seconds on a CPU: under a million
    # float32 parameters, and the weights file holds them and nothing else (its JSON header aside).
    parameters = sum(parameter.numel() for parameter in loaded.model.parameters())
    assert parameters < 1_000_000
    assert {parameter.dtype for parameter in loaded.model.parameters()} == {torch.float32}
    assert 4 * parameters <= (out / "model.safetensors").stat().st_size < 4 * parameters + 65_536


def test_tiny_model_is_deterministic_for_a_seed(tmp_path):
    first = build_tiny_model(tmp_path / "a", seed=7)
    second = build_tiny_model(tmp_path / "b", seed=7)
    other = build_tiny_model(tmp_path / "c", seed=8)
    assert _digest(first / "model.safetensors") == _digest(second / "model.safetensors")
    assert _digest(first / "model.safetensors") != _digest(other / "model.safetensors")
    assert (first / "tokenizer.json").read_text() == (second / "tokenizer.json").read_text()


def test_tiny_tokenizer_encodes_any_text_and_round_trips(tiny_model_dir):
    loaded = load_model(tiny_model_dir, dtype="float32", device="cpu")
    tokenizer = loaded.tokenizer
    text = "Ünïcode “quotes” and emoji 🙂 survive"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.padding_side == "left"
