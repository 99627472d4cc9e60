from dataclasses import dataclass
from typing import Literal

import pytest

from mmsafe.config import apply_overrides, config_hash, load_config, option, parse_override, save_config
from mmsafe.errors import ConfigError


@dataclass
class Inner:
    beta: float = option(0.1, help="strength")
    name: str = option("x", help="a name")


@dataclass
class Outer:
    mode: Literal["dpo", "bpo"] = option("bpo", help="loss")
    steps: int = option(10, help="steps")
    tags: list[str] = option(default_factory=list, help="tags")
    inner: Inner = option(default_factory=Inner, help="nested")
    path: str | None = option(None, help="optional path")


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("mode: dpo\ninner:\n  beta: 0.5\n")
    config = load_config(Outer, path, ["steps=3", "inner.name=abc", "tags=[a, b]", "inner.beta=1"])
    assert config == Outer(mode="dpo", steps=3, tags=["a", "b"], inner=Inner(beta=1.0, name="abc"))


def test_unknown_key_suggests_the_close_one(tmp_path):
    with pytest.raises(ConfigError, match=r"inner.bta: unknown option \(did you mean inner.beta\?\)"):
        load_config(Outer, None, ["inner.bta=1"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("steps=ten", "steps: expected an integer"),
        ("mode=ppo", "mode: expected one of 'dpo', 'bpo'"),
        ("inner=3", "inner: expected a mapping"),
    ],
)
def test_wrong_types_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, None, [override])


def test_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "none.yaml"
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Outer, missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("steps: many\n")
    with pytest.raises(ConfigError, match=r"wrong.yaml: steps: expected an integer"):
        load_config(Outer, wrong)


def test_override_syntax():
    assert parse_override("a.b=0.2") == (["a", "b"], 0.2)
    assert parse_override("a=") == (["a"], "")
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("novalue")
    assert apply_overrides({"a": {"b": 1}}, ["a.c=2"]) == {"a": {"b": 1, "c": 2}}


def test_saved_config_loads_back_and_hash_is_stable(tmp_path):
    config = load_config(Outer, None, ["steps=4"])
    path = save_config(config, tmp_path / "resolved.yaml")
    assert load_config(Outer, path) == config
    assert config_hash(config) == config_hash(load_config(Outer, path))
    assert config_hash(config) != config_hash(load_config(Outer, None, ["steps=5"]))
