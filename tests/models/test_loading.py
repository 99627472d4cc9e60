import json

import pytest
import torch

from mmsafe.errors import ModelError
from mmsafe.models import load_model
from mmsafe.models.loading import check_safetensors, resolve_dtype


def test_pickle_only_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelError, match="safetensors only"):
        load_model(tmp_path, device="cpu")


def test_directory_without_weights_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="no model weights"):
        check_safetensors(tmp_path)


def test_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="no such model directory"):
        load_model(str(tmp_path / "nope" / "model" / "x"), device="cpu")


def test_unknown_dtype_is_a_clear_error():
    with pytest.raises(ModelError, match="dtype must be one of"):
        resolve_dtype("float8", "cpu")


def test_auto_dtype_on_cpu_is_float32():
    assert resolve_dtype("auto", "cpu") is torch.float32


def test_remote_code_stays_off_by_default(tiny_model_dir, monkeypatch):
    seen = {}
    from transformers import AutoModelForImageTextToText

    original = AutoModelForImageTextToText.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", spy)
    load_model(tiny_model_dir, device="cpu", dtype="float32")
    assert seen["trust_remote_code"] is False
    assert seen["use_safetensors"] is True


def test_adapter_directory_loads_onto_its_base(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = load_model(tiny_model_dir, device="cpu", dtype="float32")
    peft_model = get_peft_model(
        base.model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(tiny_model_dir)
    config_path.write_text(json.dumps(config))

    fresh_base = load_model(tiny_model_dir, device="cpu", dtype="float32").model
    adapted = load_model(adapter_dir, device="cpu", dtype="float32")
    merged = load_model(tiny_model_dir, adapter=adapter_dir, merge_adapter=True, device="cpu", dtype="float32")
    input_ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        base_logits = fresh_base(input_ids=input_ids).logits
        adapted_logits = adapted.model(input_ids=input_ids).logits
        merged_logits = merged.model(input_ids=input_ids).logits
    assert not torch.allclose(base_logits, adapted_logits)
    assert torch.allclose(adapted_logits, merged_logits, atol=1e-5)
