"""The input recipe: training writes how a model's inputs were built, every command reads it.

A tiny model is given a chat template of its own (``<|user|> ... <|assistant|>``) so the
two prompt forms differ, then trained on the raw LLaVA-v1 form: without a flag,
generation, blind responses, probes, pairwise accuracy and the pipeline must ask it in
that form; an explicit flag still wins.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

from mmsafe.cli import main
from mmsafe.data.records import read_preference_records, write_records
from mmsafe.errors import ModelError
from mmsafe.generate.hf_engine import HFEngine
from mmsafe.models.recipe import DEFAULTS, RECIPE_FILE, Recipe, load_recipe, resolve_inputs, save_recipe

#: A chat template unlike the LLaVA-v1 text form, so the two styles render differently.
OWN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|>"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}{% endif %}{% endfor %}\n"
    "{% else %}<|assistant|>{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{{ eos_token }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def is_llava_v1(prompt: str) -> bool:
    return prompt.startswith("USER:") and prompt.endswith("ASSISTANT:") and "<|user|>" not in prompt


def is_own_template(prompt: str) -> bool:
    return prompt.startswith("<|user|>") and prompt.endswith("<|assistant|>")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Four train and two test records of the sample set (images beside them)."""
    from mmsafe.data.sample import write_sample

    out = tmp_path_factory.mktemp("recipe-data")
    records = list(read_preference_records(write_sample(out)))
    small = [record for record in records if record.meta.get("split") == "train"][:4] + [
        record for record in records if record.meta.get("split") == "test"
    ][:2]
    write_records(out / "small.jsonl", small)
    return out


@pytest.fixture(scope="module")
def own_template_model(tmp_path_factory) -> Path:
    """The tiny model with :data:`OWN_TEMPLATE` as its processor's chat template."""
    from mmsafe.models.loading import load_processor
    from mmsafe.models.tiny import build_tiny_model

    path = Path(build_tiny_model(tmp_path_factory.mktemp("own-template"), seed=0))
    processor = load_processor(path)
    processor.chat_template = OWN_TEMPLATE
    processor.tokenizer.chat_template = OWN_TEMPLATE
    processor.save_pretrained(str(path))
    assert load_recipe(path) is None
    return path


def train_options(model: Path, data: Path, out: Path, **extra) -> dict:
    values = {
        "model": str(model),
        "data": str(data),
        "output_dir": str(out),
        "split": "train",
        "loss": "dpo",
        "learning_rate": 1e-4,
        "warmup_steps": 0,
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "save_steps": 1,
        "save_total_limit": 2,
        "dtype": "float32",
        "max_length": 256,
        "prompt_style": "llava-v1",
        "reference_cache_dir": str(out.parent / "cache"),
    }
    values.update(extra)
    return values


@pytest.fixture(scope="module")
def trained(tmp_path_factory, own_template_model, data_dir) -> Path:
    """The model trained two steps on the LLaVA-v1 form, a checkpoint after each step."""
    from mmsafe.train.config import TrainConfig
    from mmsafe.train.trainer import train

    out = tmp_path_factory.mktemp("recipe-train") / "out"
    result = train(TrainConfig(**train_options(own_template_model, data_dir / "small.jsonl", out)))
    assert result.global_step == 2
    return out


@pytest.fixture
def rendered(monkeypatch) -> list[tuple[str, str]]:
    """Every prompt an HFEngine renders, with the engine's name."""
    seen: list[tuple[str, str]] = []
    original = HFEngine.render

    def render(self, request):
        prompt = original(self, request)
        seen.append((self.name, prompt))
        return prompt

    monkeypatch.setattr(HFEngine, "render", render)
    return seen


def test_training_writes_the_recipe_with_the_final_model_and_every_checkpoint(trained, own_template_model):
    from mmsafe.models.loading import load_processor
    from mmsafe.models.recipe import build_recipe, template_sha256

    for folder in (trained, trained / "checkpoint-1", trained / "checkpoint-2"):
        assert (folder / RECIPE_FILE).is_file(), folder
        recipe = load_recipe(folder)
        assert recipe is not None
        assert (recipe.prompt_style, recipe.template, recipe.image_mode, recipe.max_length, recipe.dtype) == (
            "llava-v1",
            "llava-v1",
            "pad",
            256,
            "float32",
        )
        assert recipe.template_sha256 is None  # the chat template was not used
        assert recipe.mmsafe_version
    saved = json.loads((trained / "checkpoint-1" / RECIPE_FILE).read_text())
    assert saved["prompt_style"] == "llava-v1" and "path" not in saved
    # With the chat template, its text's hash is kept, to tell a changed template later.
    processor = load_processor(own_template_model)
    recipe = build_recipe(processor, prompt_style="chat-template", image_mode="pad", max_length=768, dtype="float32")
    assert recipe.template == "chat-template" and recipe.template_sha256 == template_sha256(processor)


def test_lora_adapter_and_merged_model_carry_the_recipe(tmp_path, own_template_model, data_dir):
    from mmsafe.train.config import TrainConfig
    from mmsafe.train.trainer import train

    out = tmp_path / "lora"
    options = train_options(
        own_template_model,
        data_dir / "small.jsonl",
        out,
        finetune="lora",
        merge_lora=True,
        max_steps=1,
        save_steps=1000,
        lora_r=4,
        lora_alpha=8,
        image_mode="resize",
    )
    train(TrainConfig(**options))
    for folder in (out, out / "merged"):
        recipe = load_recipe(folder)
        assert recipe is not None and (recipe.prompt_style, recipe.image_mode) == ("llava-v1", "resize"), folder
    engine = HFEngine(out, device="cpu")  # the adapter folder: its recipe is used
    assert (engine.prompt_style, engine.image_mode) == ("llava-v1", "resize")


def test_generate_uses_the_recipe_without_a_flag_and_a_flag_wins(trained, data_dir, tmp_path, rendered, caplog):
    caplog.set_level(logging.INFO, logger="mmsafe.models.recipe")
    out = tmp_path / "responses.jsonl"
    command = [
        "generate",
        "--model",
        str(trained),
        "--data",
        str(data_dir / "small.jsonl"),
        "--out",
        str(out),
        "--limit",
        "2",
        "--max-new-tokens",
        "2",
        "--device",
        "cpu",
    ]
    assert main(command) == 0
    assert rendered and all(is_llava_v1(prompt) for _, prompt in rendered)
    engine = yaml.safe_load(out.with_name(out.name + ".config.yaml").read_text())["engine"]
    assert (engine["prompt_style"], engine["image_mode"], engine["dtype"]) == ("llava-v1", "pad", "float32")
    assert engine["recipe"] == str(trained / RECIPE_FILE)
    assert any(
        "input recipe" in record.message and "prompt_style=llava-v1" in record.message for record in caplog.records
    )

    rendered.clear()
    caplog.clear()
    other = tmp_path / "chat.jsonl"
    assert main([*command[:6], str(other), *command[7:], "--prompt-style", "chat-template"]) == 0
    assert rendered and all(is_own_template(prompt) for _, prompt in rendered)
    assert (
        yaml.safe_load(other.with_name(other.name + ".config.yaml").read_text())["engine"]["prompt_style"]
        == "chat-template"
    )
    assert any(
        record.levelno == logging.WARNING and "prompt_style=llava-v1" in record.message for record in caplog.records
    )


def test_a_model_without_a_recipe_gets_the_defaults(own_template_model, data_dir, tmp_path, rendered):
    out = tmp_path / "responses.jsonl"
    command = [
        "generate",
        "--model",
        str(own_template_model),
        "--data",
        str(data_dir / "small.jsonl"),
        "--out",
        str(out),
        "--limit",
        "1",
        "--max-new-tokens",
        "2",
        "--device",
        "cpu",
    ]
    assert main(command) == 0
    assert rendered and all(is_own_template(prompt) for _, prompt in rendered)
    engine = yaml.safe_load(out.with_name(out.name + ".config.yaml").read_text())["engine"]
    assert (engine["prompt_style"], engine["image_mode"], engine["recipe"]) == (
        DEFAULTS["prompt_style"],
        DEFAULTS["image_mode"],
        None,
    )


def test_blind_and_probe_use_the_recipe(trained, data_dir, tmp_path, rendered):
    common = [
        "--model",
        str(trained),
        "--data",
        str(data_dir / "small.jsonl"),
        "--limit",
        "2",
        "--max-new-tokens",
        "2",
        "--device",
        "cpu",
    ]
    assert main(["blind", *common, "--out", str(tmp_path / "blind.jsonl")]) == 0
    assert rendered and all(is_llava_v1(prompt) and "<image>" not in prompt for _, prompt in rendered)
    rendered.clear()
    assert main(["probe", *common, "--out", str(tmp_path / "probe"), "--variants", "text,multimodal"]) == 0
    assert rendered and all(is_llava_v1(prompt) for _, prompt in rendered)


def test_pairwise_asks_and_scores_in_the_recipe_form(trained, data_dir, tmp_path, rendered, monkeypatch):
    from mmsafe.train import logprobs

    scored = {}
    original = logprobs.score_responses

    def spy(loaded, records, image_root, **kwargs):
        scored.update(kwargs)
        return original(loaded, records, image_root, **kwargs)

    monkeypatch.setattr(logprobs, "score_responses", spy)
    assert (
        main(
            [
                "pairwise",
                "--model",
                str(trained),
                "--data",
                str(data_dir / "small.jsonl"),
                "--out",
                str(tmp_path / "pw"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert rendered and all(is_llava_v1(prompt) for _, prompt in rendered)
    assert (scored["prompt_style"], scored["image_mode"], scored["max_length"]) == ("llava-v1", "pad", 256)  # not 2048
    assert (
        main(
            [
                "pairwise",
                "--model",
                str(trained),
                "--data",
                str(data_dir / "small.jsonl"),
                "--out",
                str(tmp_path / "pw2"),
                "--device",
                "cpu",
                "--forms",
                "likelihood",
                "--max-length",
                "300",
            ]
        )
        == 0
    )
    assert scored["max_length"] == 300


def test_the_pipeline_generates_in_the_trained_form(own_template_model, data_dir, tmp_path, rendered):
    from mmsafe.config import from_dict
    from mmsafe.pipeline import PipelineConfig, run_pipeline

    config = from_dict(
        PipelineConfig,
        {
            "out": str(tmp_path / "run"),
            "model": str(own_template_model),
            "data": {"train": str(data_dir / "small.jsonl")},
            "blind": {"enabled": False},
            "train": {
                "methods": ["dpo"],
                "options": {
                    "prompt_style": "llava-v1",
                    "max_steps": 1,
                    "per_device_train_batch_size": 2,
                    "dtype": "float32",
                    "max_length": 256,
                    "save_steps": 1000,
                    "warmup_steps": 0,
                },
            },
            "generate": {"max_new_tokens": 2, "batch_size": 8, "device": "cpu", "base": False},
        },
    )
    run_pipeline(config, log=lambda _: None)
    assert [name for name, _ in rendered] == ["dpo", "dpo"]  # the two test records
    assert all(is_llava_v1(prompt) for _, prompt in rendered)
    engine = yaml.safe_load((tmp_path / "run" / "responses" / "dpo.jsonl.config.yaml").read_text())["engine"]
    assert engine["prompt_style"] == "llava-v1" and engine["dtype"] == "float32"


def test_given_values_win_then_the_recipe_then_the_defaults(tmp_path):
    recipe = Recipe(prompt_style="llava-v1", image_mode="resize", max_length=512, dtype="bfloat16", template="llava-v1")
    save_recipe(recipe, tmp_path)
    assert load_recipe(tmp_path) == recipe
    settings = resolve_inputs(tmp_path, image_mode="none")
    assert (settings.prompt_style, settings.image_mode, settings.max_length, settings.dtype) == (
        "llava-v1",
        "none",
        512,
        "bfloat16",
    )
    assert settings.origins == {
        "prompt_style": "recipe",
        "image_mode": "given",
        "max_length": "recipe",
        "dtype": "recipe",
    }
    hub = resolve_inputs("llava-hf/llava-1.5-7b-hf")
    assert load_recipe("llava-hf/llava-1.5-7b-hf") is None and hub.recipe is None
    assert {name: getattr(hub, name) for name in DEFAULTS} == DEFAULTS


def test_an_unreadable_recipe_is_an_error_naming_the_file(tmp_path):
    (tmp_path / RECIPE_FILE).write_text("{not json")
    with pytest.raises(ModelError, match=RECIPE_FILE):
        load_recipe(tmp_path)
    (tmp_path / RECIPE_FILE).write_text(
        json.dumps({"prompt_style": "chatml", "image_mode": "pad", "max_length": 10, "dtype": "float32"})
    )
    with pytest.raises(ModelError, match="prompt_style"):
        load_recipe(tmp_path)
