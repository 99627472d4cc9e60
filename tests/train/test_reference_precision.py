"""The reference is exactly the starting model: same precision context, no dropout, the training dtype.

Oracle: at step 0 the policy is the starting model, so every reward margin is 0 and the
BPO loss is K log 2 exactly, whatever the reference mode, as long as the reference is
scored as the policy is (same weights dtype, same autocast, dropout off).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mmsafe.train.config import TrainConfig
from mmsafe.train.trainer import LOG_FILE, disable_dropout, train, training_dtype


@pytest.fixture(scope="module")
def dropout_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny LLaVA with attention dropout 0.1 and hidden dropout in the projector path, as real checkpoints may ship."""
    from mmsafe.models import load_model

    loaded = load_model(tiny_model_dir, dtype="float32", device="cpu")
    config = loaded.model.config
    config.text_config.attention_dropout = 0.1
    config.vision_config.attention_dropout = 0.1
    out = tmp_path_factory.mktemp("dropout-model")
    torch.manual_seed(0)
    type(loaded.model)(config).save_pretrained(out, safe_serialization=True)
    loaded.processor.save_pretrained(out)
    return out


def step_zero(tmp_path: Path, model: Path, data: Path, name: str, **options) -> dict:
    values = {
        "model": str(model),
        "data": str(data),
        "output_dir": str(tmp_path / name),
        "loss": "bpo",
        "learning_rate": 1e-3,
        "warmup_steps": 0,
        "max_steps": 1,
        "per_device_train_batch_size": 2,
        "save_steps": 1000,
        "lora_r": 4,
        "lora_alpha": 8,
        "reference_cache_dir": str(tmp_path / "cache"),
        "dtype": "float32",
        **options,
    }
    train(TrainConfig(**values))
    for line in (tmp_path / name / LOG_FILE).read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        if "loss" in entry:
            return entry
    raise AssertionError("no loss logged")


@pytest.mark.parametrize(
    ("reference", "finetune"),
    [("precomputed", "full"), ("copy", "full"), ("adapters-disabled", "lora")],
)
@pytest.mark.parametrize(
    "precision",
    [
        {"dtype": "float32"},
        {"dtype": "float32", "bf16": True, "trainer_args": {"use_cpu": True}},
        {"dtype": "bfloat16"},
    ],
    ids=["fp32", "fp32-bf16-autocast", "bf16-weights"],
)
def test_every_reference_mode_is_the_policy_at_step_zero(
    tmp_path, dropout_model_dir, small_records, reference, finetune, precision
):
    entry = step_zero(
        tmp_path,
        dropout_model_dir,
        small_records,
        "out",
        reference=reference,
        finetune=finetune,
        lora_dropout=0.1,
        **precision,
    )
    # Before this build: the precomputed reference was scored outside the bf16 autocast
    # (0.012 nats off) and the adapters-disabled one in train mode with dropout (0.2 nats).
    assert entry["rewards/margin"] == pytest.approx(0.0, abs=1e-7)
    assert entry["loss"] == pytest.approx(2 * math.log(2), abs=1e-6)


def test_dropout_is_off_by_default_and_kept_on_request(dropout_model_dir):
    from mmsafe.models import load_model

    def two_passes(model):
        model.train()
        ids = torch.arange(3, 40).unsqueeze(0)
        with torch.no_grad():
            return model.language_model(input_ids=ids).last_hidden_state if hasattr(model, "language_model") else None

    model = load_model(dropout_model_dir, dtype="float32", device="cpu").model
    torch.manual_seed(0)
    assert not torch.equal(two_passes(model.model), two_passes(model.model))  # dropout acts in train mode
    assert disable_dropout(model) > 0
    assert torch.equal(two_passes(model.model), two_passes(model.model))
    assert TrainConfig(model="m", data="d", output_dir="o").disable_dropout is True


def test_dtype_auto_is_bf16_on_a_bf16_gpu_fp16_on_an_older_one_fp32_on_cpu(monkeypatch):
    config = TrainConfig(model="m", data="d", output_dir="o")
    assert config.dtype == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert training_dtype(config, torch.device("cuda", 0)) == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert training_dtype(config, "cuda:1") == "float16"
    assert training_dtype(config, "cpu") == "float32"
    assert training_dtype(TrainConfig(model="m", data="d", output_dir="o", dtype="float32"), "cuda") == "float32"


def test_the_policy_is_loaded_in_the_resolved_dtype_on_the_training_device(monkeypatch, tiny_model_dir):
    """dtype: auto on a (mocked) bf16 GPU: the loader is asked for bf16 on that device, not fp32 on the CPU."""
    from mmsafe.train import trainer

    calls = {}

    def fake_load_model(name, **kwargs):
        calls.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr("mmsafe.models.loading.load_model", fake_load_model)
    with pytest.raises(RuntimeError, match="stop here"):
        trainer.load_policy(
            TrainConfig(model=str(tiny_model_dir), data="d", output_dir="o", finetune="lora"), torch.device("cuda", 0)
        )
    assert calls["dtype"] == "bfloat16" and calls["device"] == "cuda:0"


def test_metrics_after_the_last_logging_step_reach_the_final_log(tmp_path, tiny_model_dir, small_records):
    """logging_steps 2, max_steps 3: step 3's preference metrics are flushed with the end-of-training log."""
    from mmsafe.train.trainer import LOG_FILE as log_file

    values = {
        "model": str(tiny_model_dir), "data": str(small_records), "output_dir": str(tmp_path / "out"), "learning_rate": 1e-3, "warmup_steps": 0,
        "max_steps": 3, "logging_steps": 2, "per_device_train_batch_size": 2, "save_steps": 1000, "finetune": "lora", "lora_r": 4,
        "lora_alpha": 8, "reference_cache_dir": str(tmp_path / "cache"), "dtype": "float32",
    }  # fmt: skip
    result = train(TrainConfig(**values))
    entries = [json.loads(line) for line in (tmp_path / "out" / log_file).read_text(encoding="utf-8").splitlines()]
    assert [entry["step"] for entry in entries if "loss" in entry] == [2]
    final = [entry for entry in entries if "train_runtime" in entry]
    assert len(final) == 1 and "rewards/accuracy" in final[0] and "logps/chosen" in final[0]
    assert result.metrics["logps/chosen"] == final[0]["logps/chosen"]
