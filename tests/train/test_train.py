"""``mmsafe train`` on the tiny model and the sample set: what trains, what is written, what is reused."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mmsafe.cli import main
from mmsafe.config import load_config
from mmsafe.data.records import read_preference_records
from mmsafe.errors import ConfigError
from mmsafe.models import load_model
from mmsafe.train.config import TrainConfig
from mmsafe.train.logprobs import score_responses
from mmsafe.train.trainer import CONFIG_FILE, LOG_FILE, SUMMARY_FILE, train


def write_config(path: Path, **options) -> Path:
    path.write_text(yaml.safe_dump(options), encoding="utf-8")
    return path


def options(tmp_path: Path, model: Path, data: Path, **extra) -> dict:
    """A few quick steps with a learning rate that moves a tiny model visibly."""
    values = {
        "model": str(model),
        "data": str(data),
        "output_dir": str(tmp_path / "out"),
        "split": "train",
        "learning_rate": 1e-3,
        "warmup_steps": 0,
        "max_steps": 3,
        "per_device_train_batch_size": 2,
        "save_steps": 1000,
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "reference_cache_dir": str(tmp_path / "cache"),
        "dtype": "float32",
    }
    values.update(extra)
    return values


def first_loss(output_dir: Path) -> float:
    for line in (output_dir / LOG_FILE).read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        if "loss" in entry:
            return entry["loss"]
    raise AssertionError("no loss logged")


def split_weights(weights: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    vision = {name: value for name, value in weights.items() if "vision_tower" in name}
    other = {name: value for name, value in weights.items() if "vision_tower" not in name}
    return vision, other


@pytest.mark.parametrize(("loss", "finetune"), [("bpo", "full"), ("dpo", "full"), ("bpo", "lora"), ("dpo", "lora")])
def test_train_changes_trainable_weights_and_not_the_vision_tower(
    tmp_path, tiny_model_dir, small_records, loss, finetune, capsys
):
    merge = finetune == "lora" and loss == "dpo"
    config = write_config(
        tmp_path / "run.yaml",
        **options(tmp_path, tiny_model_dir, small_records, loss=loss, finetune=finetune, merge_lora=merge),
    )
    reference = "adapters-disabled" if finetune == "lora" else "precomputed"
    assert main(["train", "--config", str(config), f"reference={reference}"]) == 0
    out = tmp_path / "out"
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["global_step"] == 3

    saved = load_config(TrainConfig, out / CONFIG_FILE)
    assert (saved.loss, saved.finetune, saved.reference) == (loss, finetune, reference)
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["global_step"] == 3 and summary["examples"] == 12
    log = [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]
    logged = {key for entry in log for key in entry}
    assert {"loss", "logps/chosen", "rewards/margin_human", "rewards/accuracy_human"} <= logged
    assert ("rewards/accuracy_blind" in logged) == (loss == "bpo")

    if finetune == "full":
        base_vision, base_other = split_weights(load_file(tiny_model_dir / "model.safetensors"))
        vision, other = split_weights(load_file(out / "model.safetensors"))
        assert all(torch.equal(vision[name], value) for name, value in base_vision.items())
        changed = [name for name, value in base_other.items() if not torch.equal(other[name], value)]
        assert any("multi_modal_projector" in name for name in changed)
        assert any("language_model" in name for name in changed)
        # The trained model loads with the standard loader and scores records.
        records = list(read_preference_records(small_records))[:3]
        scored = score_responses(load_model(out, dtype="float32"), records, small_records.parent)
        assert [score.id for score in scored.scores] == [record.id for record in records]
        assert all(score.chosen < 0 and len(score.rejected) == 2 for score in scored.scores)
    else:
        adapter = load_file(out / "adapter_model.safetensors")
        lora_b = [value for name, value in adapter.items() if "lora_B" in name]
        assert lora_b and all(value.abs().sum() > 0 for value in lora_b)  # LoRA B starts at zero
        assert not any("vision_tower" in name for name in adapter)
        projector = {name: value for name, value in adapter.items() if "multi_modal_projector" in name}
        assert projector, "the projector trains beside the adapters"
        # The trained model loads with the standard loader (adapter on its base).
        trained = load_model(out, dtype="float32")
        base_model = load_model(tiny_model_dir, dtype="float32")
        # With its adapters off the trained model is the reference: the base, projector included.
        records = list(read_preference_records(small_records))[:2]
        with trained.model.disable_adapter():
            adapters_off = score_responses(trained, records, small_records.parent).scores
        base_scores = score_responses(base_model, records, small_records.parent).scores
        assert [s.chosen for s in adapters_off] == pytest.approx([s.chosen for s in base_scores], abs=1e-4)
        merged = trained.model.merge_and_unload().state_dict()
        base = base_model.model.state_dict()
        assert merged.keys() == base.keys()
        assert all(torch.equal(merged[name], value) for name, value in base.items() if "vision_tower" in name)
        projector = "model.multi_modal_projector.linear_1.weight"
        assert not torch.equal(merged[projector], base[projector])
        if merge:  # merged weights on request, loadable without PEFT
            assert not hasattr(load_model(out / "merged", dtype="float32").model, "peft_config")


def test_second_run_reads_the_reference_cache(tmp_path, tiny_model_dir, small_records):
    first = train(
        TrainConfig(
            **options(
                tmp_path / "a", tiny_model_dir, small_records, reference_cache_dir=str(tmp_path / "cache"), max_steps=1
            )
        )
    )
    second = train(
        TrainConfig(
            **options(
                tmp_path / "b", tiny_model_dir, small_records, reference_cache_dir=str(tmp_path / "cache"), max_steps=1
            )
        )
    )
    assert first.reference_forwards == 6  # 12 examples in batches of 2
    assert second.reference_forwards == 0
    assert second.reference_cache == first.reference_cache
    assert first_loss(tmp_path / "b" / "out") == pytest.approx(first_loss(tmp_path / "a" / "out"), abs=1e-6)
    # A frozen copy as reference gives the same first step (and counts its forwards).
    copy = train(TrainConfig(**options(tmp_path / "c", tiny_model_dir, small_records, reference="copy", max_steps=1)))
    assert copy.reference_forwards == 1
    assert first_loss(tmp_path / "c" / "out") == pytest.approx(first_loss(tmp_path / "a" / "out"), abs=1e-5)


@pytest.mark.slow
def test_overfitting_sixteen_examples_reaches_high_reward_accuracy(tmp_path, tiny_model_dir, bpo_records):
    records = [record for record in read_preference_records(bpo_records) if record.meta["split"] == "train"][:16]
    data = tmp_path / "sixteen.jsonl"
    data.write_text("".join(json.dumps(record.to_dict()) + "\n" for record in records), encoding="utf-8")
    image_root = str(bpo_records.parent)
    train(
        TrainConfig(
            **options(
                tmp_path,
                tiny_model_dir,
                data,
                image_root=image_root,
                max_steps=24,
                per_device_train_batch_size=4,
                learning_rate=2e-3,
            )
        )
    )
    policy = score_responses(load_model(tmp_path / "out", dtype="float32"), records, image_root).scores
    reference = score_responses(load_model(tiny_model_dir, dtype="float32"), records, image_root).scores
    wins = [
        (p.chosen - r.chosen) > (p_rejected - r_rejected)
        for p, r in zip(policy, reference, strict=True)
        for p_rejected, r_rejected in zip(p.rejected, r.rejected, strict=True)
    ]
    assert len(wins) == 32
    assert sum(wins) / len(wins) > 0.9


def test_records_without_rejected_or_with_empty_responses_are_clear_errors(
    tmp_path, tiny_model_dir, sample_dir, capsys
):
    record = next(iter(read_preference_records(sample_dir / "records.jsonl"))).to_dict()
    cases = {
        "no_rejected": (
            {**record, "rejected": [], "rejected_sources": []},
            "rejected: expected at least one rejected response",
        ),
        "empty_chosen": ({**record, "chosen": "  "}, "chosen: expected a non-empty string"),
        "empty_rejected": ({**record, "rejected": [""]}, "rejected[0]: expected a non-empty response"),
    }
    for name, (data, message) in cases.items():
        path = sample_dir / f"bad_{name}.jsonl"
        path.write_text(json.dumps(data) + "\n", encoding="utf-8")
        config = write_config(tmp_path / f"{name}.yaml", **options(tmp_path, tiny_model_dir, path))
        assert main(["train", "--config", str(config)]) == 1
        error = capsys.readouterr().err
        assert error.startswith(f"error: {path}:{record['id']}:") and message in error, error


def test_missing_image_is_an_error_or_a_counted_skip(tmp_path, tiny_model_dir, sample_dir, capsys):
    records = [record.to_dict() for record in read_preference_records(sample_dir / "records.jsonl")][:5]
    records[2]["image"] = "images/not-there.png"
    path = sample_dir / "missing_image.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    config = write_config(
        tmp_path / "run.yaml", **options(tmp_path, tiny_model_dir, path, split=None, max_steps=1, loss="dpo")
    )
    assert main(["train", "--config", str(config)]) == 1
    error = capsys.readouterr().err
    assert f"{path}:{records[2]['id']}:image: image not found" in error
    assert main(["train", "--config", str(config), "skip_bad_images=true"]) == 0
    summary = json.loads((tmp_path / "out" / SUMMARY_FILE).read_text())
    assert summary["skipped"] == {"image missing or unreadable": 1}
    assert summary["examples"] == 4


def test_too_long_prompt_is_skipped_and_long_responses_cut(tmp_path, tiny_model_dir, sample_dir):
    records = [record.to_dict() for record in read_preference_records(sample_dir / "records.jsonl")][:6]
    records[1]["messages"] = [
        {"role": "user", "content": "tell me a story " * 60},
        {"role": "assistant", "content": "ok"},
        *records[1]["messages"],
    ]
    path = sample_dir / "long_prompt.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    result = train(
        TrainConfig(**options(tmp_path, tiny_model_dir, path, split=None, max_steps=1, max_length=170, loss="dpo"))
    )
    assert result.skipped == {"prompt alone longer than max_length": 1}
    assert result.examples == 5
    assert result.truncated > 0  # sample-005 has a 162-token prompt: 8 tokens left for each response


def test_config_errors_name_the_option(tmp_path, tiny_model_dir, small_records, capsys):
    config = write_config(tmp_path / "run.yaml", **options(tmp_path, tiny_model_dir, small_records))
    cases = [
        (["betta=0.2"], "betta: unknown option (did you mean beta?)"),
        (["beta=-1"], "beta: expected a positive number"),
        (["reference=adapters-disabled"], "adapters-disabled needs finetune: lora"),
        (
            ["trainer_args={not_an_argument: 1}"],
            "trainer_args.not_an_argument: not a transformers.TrainingArguments parameter",
        ),
        (["trainer_args={learning_rate: 1}"], "trainer_args.learning_rate: set it as the top-level option"),
        (["quantization=4bit"], "quantization: 4bit weights cannot be trained directly"),
        (
            ["source_weights={blnd: 0.5}"],
            "source_weights: no rejected response comes from blnd (sources in the data: human, blind)",
        ),
    ]
    for overrides, message in cases:
        assert main(["train", "--config", str(config), *overrides]) == 1
        assert message in capsys.readouterr().err


def test_quantization_without_bitsandbytes_or_gpu_is_a_clear_error(
    tmp_path, tiny_model_dir, small_records, capsys, monkeypatch
):
    config = write_config(
        tmp_path / "run.yaml", **options(tmp_path, tiny_model_dir, small_records, finetune="lora", quantization="4bit")
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the error path, also on a GPU machine
    assert main(["train", "--config", str(config)]) == 1
    assert "quantization: 4bit needs" in capsys.readouterr().err  # bitsandbytes, or a CUDA GPU


@pytest.mark.parametrize("name", ["llava15_7b_bpo", "llava15_7b_dpo", "tiny_bpo", "tiny_dpo"])
def test_shipped_configs_load(name):
    config = load_config(TrainConfig, Path(__file__).resolve().parents[2] / "configs" / "train" / f"{name}.yaml")
    assert config.loss == name.rsplit("_", 1)[1]
    if name.startswith("llava15"):
        # The released training recipe.
        assert config.model == "llava-hf/llava-1.5-7b-hf"
        assert (config.beta, config.learning_rate, config.lr_scheduler_type, config.warmup_steps) == (
            0.1,
            1e-6,
            "cosine",
            10,
        )
        assert (config.per_device_train_batch_size, config.bf16, config.max_length, config.seed) == (1, True, 768, 42)
        assert (
            config.finetune == "full"
            and config.freeze_vision_tower
            and config.train_projector
            and config.image_mode == "pad"
        )
        # Step for step with the release on 4 GPUs: its BPO is DPO on 2N rows (human and blind
        # pairs), 8 rows per step; its DPO N rows. Same optimizer steps and pairs per step here.
        gpus, release_rows_per_step = 4, 8
        pairs = 2 if config.loss == "bpo" else 1
        examples_per_step = config.per_device_train_batch_size * gpus * config.gradient_accumulation_steps
        assert examples_per_step * pairs == release_rows_per_step
        for records in (5392, 1000, 7):
            assert math.ceil(records / examples_per_step) == math.ceil(pairs * records / release_rows_per_step)
        text = (Path(__file__).resolve().parents[2] / "configs" / "train" / f"{name}.yaml").read_text(encoding="utf-8")
        steps = f"{math.ceil(pairs * 5392 / release_rows_per_step):,}"
        assert steps in text  # the comment gives the arithmetic for the released train split
    if config.bf16 and not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="bf16"):  # a clear error on a machine without a GPU
            config.training_arguments()
    else:
        assert config.training_arguments().learning_rate == config.learning_rate


def test_sft_warm_up_raises_the_likelihood_of_its_target(tmp_path, tiny_model_dir, small_records):
    target = "rejected"  # the less obvious target: a deliberately unsafe warm-up
    result = train(
        TrainConfig(
            **options(
                tmp_path, tiny_model_dir, small_records, loss="sft", sft_target=target, reference="copy", max_steps=4
            )
        )
    )
    assert result.reference_forwards == 0  # a warm-up has no reference
    assert result.metrics["logps/chosen"] < 0
    records = list(read_preference_records(small_records))[:4]
    before = score_responses(
        load_model(tiny_model_dir, dtype="float32"), records, small_records.parent, average=True
    ).scores
    after = score_responses(
        load_model(tmp_path / "out", dtype="float32"), records, small_records.parent, average=True
    ).scores

    def imitated(score):
        return score.chosen if target == "chosen" else score.rejected[0]

    assert all(imitated(new) > imitated(old) for new, old in zip(after, before, strict=True))


def test_separate_mode_trains_the_same_as_shared_prefix(tmp_path, tiny_model_dir, small_records):
    runs = {}
    for mode in ("shared-prefix", "separate"):
        train(
            TrainConfig(
                **options(
                    tmp_path / mode,
                    tiny_model_dir,
                    small_records,
                    forward_mode=mode,
                    max_steps=2,
                    reference_cache_dir=str(tmp_path / "cache"),
                )
            )
        )
        runs[mode] = [
            entry
            for entry in map(json.loads, (tmp_path / mode / "out" / LOG_FILE).read_text().splitlines())
            if "loss" in entry
        ]
    shared, separate = runs["shared-prefix"], runs["separate"]
    # Step 1 starts at policy = reference (loss 2 log 2 for K = 2); its gradient norm and
    # the loss after one update depend on every log-prob and gradient of both modes.
    assert shared[0]["grad_norm"] == pytest.approx(separate[0]["grad_norm"], rel=1e-4)
    assert shared[1]["loss"] == pytest.approx(separate[1]["loss"], abs=1e-5)
    assert shared[1]["rewards/margin_blind"] == pytest.approx(separate[1]["rewards/margin_blind"], abs=1e-5)


def test_logged_metrics_per_rejected_source(tmp_path, tiny_model_dir, small_records):
    from mmsafe.train.forward import ResponseLogProbs
    from mmsafe.train.trainer import PreferenceTrainer

    config = TrainConfig(**options(tmp_path, tiny_model_dir, small_records))
    trainer = PreferenceTrainer(
        model=load_model(tiny_model_dir, dtype="float32").model,
        args=config.training_arguments(),
        config=config,
        sources=["human", "blind"],
    )
    # Reference 0 and beta 1, so rewards = policy log-probs. Example 0: chosen -1 against
    # human -3 (margin 2, a win) and blind -1 (margin 0, a tie); example 1: chosen -2
    # against human -2 (margin 0), no blind response.
    mask = torch.tensor([[True, True], [True, False]])
    policy = ResponseLogProbs(torch.tensor([-1.0, -2.0]), torch.tensor([[-3.0, -1.0], [-2.0, 0.0]]), mask)
    reference = ResponseLogProbs(torch.zeros(2), torch.zeros(2, 2), mask)
    objective = dataclasses.replace(config.objective(), beta=1.0)
    output = objective.compute(policy, reference, torch.tensor([[0, 1], [0, -1]]), trainer.sources)
    trainer.record_metrics(output.metrics)
    logs = {"loss": output.loss.item()}
    trainer.log(logs)
    assert logs["logps/chosen"] == pytest.approx(-1.5)
    assert logs["rewards/accuracy"] == pytest.approx(1 / 3)  # one win in three pairs
    assert logs["rewards/accuracy_human"] == pytest.approx(0.5)
    assert logs["rewards/margin_human"] == pytest.approx(1.0)  # (2 + 0) / 2
    assert logs["logps/rejected_human"] == pytest.approx(-2.5)
    assert logs["rewards/accuracy_blind"] == pytest.approx(0.0)
    assert logs["logps/rejected_blind"] == pytest.approx(-1.0)


@pytest.mark.gpu
def test_bf16_and_qlora_training_on_a_gpu(tmp_path, tiny_model_dir, small_records):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    result = train(
        TrainConfig(
            **options(
                tmp_path / "bf16",
                tiny_model_dir,
                small_records,
                dtype="bfloat16",
                bf16=True,
                gradient_checkpointing=True,
                max_steps=2,
            )
        )
    )
    assert result.global_step == 2
    pytest.importorskip("bitsandbytes")  # the gpu extra
    result = train(
        TrainConfig(
            **options(
                tmp_path / "qlora",
                tiny_model_dir,
                small_records,
                finetune="lora",
                quantization="4bit",
                reference="adapters-disabled",
                bf16=True,
                max_steps=2,
            )
        )
    )
    assert result.global_step == 2
    assert (tmp_path / "qlora" / "out" / "adapter_model.safetensors").is_file()
