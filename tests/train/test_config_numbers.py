"""Numbers in the training config: finite, in range, and ``1e-6`` read as a float everywhere."""

from __future__ import annotations

import pytest

from mmsafe.config import load_config
from mmsafe.errors import ConfigError
from mmsafe.train.config import TrainConfig

REQUIRED = ["model=m", "data=d.jsonl", "output_dir=out"]


def write_yaml(tmp_path, text: str):
    path = tmp_path / "train.yaml"
    path.write_text("model: m\ndata: d.jsonl\noutput_dir: out\n" + text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ("beta: .nan", "beta"),
        ("beta: .inf", "beta"),
        ("label_smoothing: .nan", "label_smoothing"),
        ("learning_rate: -.inf", "learning_rate"),
        ("num_train_epochs: .nan", "num_train_epochs"),
        ("lora_dropout: .nan", "lora_dropout"),
        ("source_weights: {blind: .nan}", "source_weights.blind"),
        ("learning_rate: -1", "learning_rate"),
        ("learning_rate: 0", "learning_rate"),
        ("per_device_train_batch_size: 0", "per_device_train_batch_size"),
        ("gradient_accumulation_steps: 0", "gradient_accumulation_steps"),
        ("warmup_steps: -1", "warmup_steps"),
        ("logging_steps: 0", "logging_steps"),
        ("save_steps: 0", "save_steps"),
        ("max_steps: 0", "max_steps"),
        ("max_steps: -2", "max_steps"),
        ("num_train_epochs: 0", "num_train_epochs"),
    ],
)
def test_out_of_range_numbers_are_refused_naming_the_field(tmp_path, line, field):
    with pytest.raises(ConfigError, match=rf"train.yaml: {field}: expected"):
        load_config(TrainConfig, write_yaml(tmp_path, line + "\n"))


def test_epochs_do_not_matter_when_max_steps_is_set(tmp_path):
    assert load_config(TrainConfig, write_yaml(tmp_path, "num_train_epochs: 0\nmax_steps: 5\n")).max_steps == 5


def test_an_exponent_on_the_command_line_is_a_float():
    config = load_config(TrainConfig, None, [*REQUIRED, "learning_rate=1e-6", "beta=2E-1"])
    assert config.learning_rate == 1e-6 and isinstance(config.learning_rate, float)
    assert config.beta == 0.2


def test_an_exponent_without_a_dot_in_yaml_is_a_float(tmp_path):
    config = load_config(TrainConfig, write_yaml(tmp_path, "learning_rate: 1e-3\nsource_weights: {blind: 5e-1}\n"))
    assert config.learning_rate == 1e-3 and isinstance(config.learning_rate, float)
    assert config.source_weights == {"blind": 0.5}


def test_a_word_is_still_not_a_number():
    with pytest.raises(ConfigError, match=r"learning_rate: expected a number, got 'fast'"):
        load_config(TrainConfig, None, [*REQUIRED, "learning_rate=fast"])
