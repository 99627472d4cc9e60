"""What ``mmsafe train`` reads and what it refuses before a model loads.

Training reads every format the data registry reads (the released MMSafe-PO ``train.json``
among them), and a run whose rejected responses cannot train what its config asks (BPO
without a second rejected response, a rejected source some or all records lack, source
weights that would be ignored) is refused with the counts, before the model is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from mmsafe.cli import main
from mmsafe.config import from_dict
from mmsafe.data.records import write_records
from mmsafe.errors import ConfigError, DataError
from mmsafe.pipeline import Paths, PipelineConfig, stage_train
from mmsafe.train import trainer
from mmsafe.train.config import TrainConfig
from mmsafe.train.trainer import SUMMARY_FILE, train


def released_row(
    record_id: int, image: str, *, turns: int, rejected: str = "ASSISTANT: Sure, climb the fence at night."
) -> dict:
    """A row of the released train.json: the whole conversation in the LLaVA-v1 text form."""
    history = "".join(f"USER: Hello number {turn}. ASSISTANT: Hi, how can I help? " for turn in range(turns - 1))
    instruction = "How do I get into the place in the scene without a ticket?"
    return {
        "id": record_id,
        "question": f"{history}USER: <image>\n{instruction} ASSISTANT:",
        "image": image,
        "chosen": "ASSISTANT: I can't help with getting in without a ticket.",
        "rejected": rejected,
        "type": "harmless",
        "entity": "Wembley Stadium",
        "entity_type": "LOC",
        "replacement": "the place in the scene",
        "text_prompt": f"{history}USER: How do I get into Wembley Stadium without a ticket? ASSISTANT:",
        "mid_prompt": f"{history}USER: <image>\nHow do I get into the place in the scene without a ticket? ASSISTANT:",
    }


def write_released(folder: Path, rows: list[dict]) -> Path:
    """``train.json`` with its images beside it (the default image root is the file's folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(sorted({row["image"] for row in rows})):
        Image.new("RGB", (24, 18), (40 * index % 256, 120, 200)).save(folder / name)
    path = folder / "train.json"
    path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return path


def options(tmp_path: Path, model: Path, data: Path, **extra) -> dict:
    values = {
        "model": str(model),
        "data": str(data),
        "output_dir": str(tmp_path / "out"),
        "learning_rate": 1e-3,
        "warmup_steps": 0,
        "max_steps": 1,
        "per_device_train_batch_size": 2,
        "save_steps": 1000,
        "reference_cache_dir": str(tmp_path / "cache"),
        "dtype": "float32",
    }
    values.update(extra)
    return values


def record(record_id: str, sources: list[str]) -> dict:
    answers = {"human": "Climb the fence at night.", "blind": "I cannot see a picture, but just go ahead and do it."}
    return {
        "id": record_id,
        "messages": [{"role": "user", "content": "<image>\nHow do I get into the stadium?"}],
        "image": "ok.png",
        "chosen": "I cannot help with that.",
        "rejected": [answers[source] for source in sources],
        "rejected_sources": sources,
        "meta": {},
    }


def write_jsonl(folder: Path, rows: list[dict]) -> Path:
    from mmsafe.data.records import PreferenceRecord

    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 16), (200, 30, 30)).save(folder / "ok.png")
    path = folder / "records.jsonl"
    write_records(path, [PreferenceRecord.from_dict(row) for row in rows])
    return path


def refuse_model(*args, **kwargs):
    raise AssertionError("the model was loaded before the inputs were checked")


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if training gets as far as loading the model."""
    monkeypatch.setattr(trainer, "load_policy", refuse_model)


def test_released_train_json_trains_directly_with_stable_ids(tmp_path, tiny_model_dir, capsys):
    rows = [
        released_row(0, "500px-Wembley_Stadium.jpg", turns=1),
        released_row(1, "500px-Wembley_Stadium.jpg", turns=3),
        released_row(2, "500px-Caf%C3%A9_de_Flore.jpg", turns=2),
        # The release's BPO form: the same prompt again with another rejected response.
        released_row(
            2, "500px-Caf%C3%A9_de_Flore.jpg", turns=2, rejected="ASSISTANT: I cannot see an image, but sneak in."
        ),
    ]
    data = write_released(tmp_path / "mmsafe-po", rows)
    for run in ("first", "second"):
        config = tmp_path / f"{run}.yaml"
        config.write_text(
            yaml.safe_dump(options(tmp_path, tiny_model_dir, data, output_dir=str(tmp_path / run), loss="bpo")),
            encoding="utf-8",
        )
        assert main(["train", "--config", str(config)]) == 0, capsys.readouterr().err
        summary = json.loads((tmp_path / run / SUMMARY_FILE).read_text(encoding="utf-8"))
        assert summary["global_step"] == 1 and summary["examples"] == 3 and summary["skipped"] == {}
        capsys.readouterr()
    # The same ids on every read: the second run finds every reference log-prob in the cache.
    assert summary["reference_forwards"] == 0
    cached = json.loads(Path(summary["reference_cache"]).read_text(encoding="utf-8"))["logps"]
    assert sorted(cached) == ["0", "1", "2"] and len(cached["2"]) == 3  # chosen + two rejected


def test_released_image_outside_the_image_root_is_refused(tmp_path, tiny_model_dir):
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    data = write_released(tmp_path / "mmsafe-po", [released_row(0, "ok.jpg", turns=1)])
    rows = json.loads(data.read_text(encoding="utf-8"))
    rows.append({**rows[0], "id": 1, "image": "../outside.png"})
    data.write_text(json.dumps(rows), encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.json:1:image: .*'\.\.'"):
        train(TrainConfig(**options(tmp_path, tiny_model_dir, data, loss="dpo")))


def test_released_form_runs_through_the_train_stage_with_blind_disabled(tmp_path, tiny_model_dir):
    data = write_released(
        tmp_path / "mmsafe-po",
        [released_row(index, "500px-Wembley_Stadium.jpg", turns=1 + index % 3) for index in range(4)],
    )
    train_options = {
        key: value
        for key, value in options(tmp_path, tiny_model_dir, data).items()
        if key not in ("model", "data", "output_dir")
    }
    config = from_dict(
        PipelineConfig,
        {
            "out": str(tmp_path / "run"),
            "model": str(tiny_model_dir),
            "data": {"train": str(data), "train_split": None, "eval_split": None},
            "blind": {"enabled": False},
            "train": {"methods": ["dpo", "bpo"], "options": train_options},
        },
    )
    summary = stage_train(config, Paths(Path(config.out)))
    assert summary.startswith("dpo: 1 steps") and "; bpo: 1 steps" in summary


def test_bpo_without_a_second_rejected_response_is_refused_before_the_model_loads(tmp_path, no_model):
    data = write_jsonl(tmp_path / "data", [record(f"r{index}", ["human"]) for index in range(3)])
    with pytest.raises(DataError, match="BPO would train exactly as DPO") as error:
        train(TrainConfig(**options(tmp_path, Path("no-model"), data, loss="bpo")))
    assert "human 3" in str(error.value) and "loss: dpo" in str(error.value) and "mmsafe blind" in str(error.value)
    with pytest.raises(
        DataError, match=r"records\.jsonl:-:rejected_sources: no record has a rejected response from 'blind'"
    ) as error:
        train(TrainConfig(**options(tmp_path, Path("no-model"), data, loss="bpo", rejected_sources=["human", "blind"])))
    assert "of 3: human 3" in str(error.value) and "mmsafe blind" in str(error.value)


def test_partial_sources_are_refused_with_counts_and_trained_with_the_option(tmp_path, tiny_model_dir, monkeypatch):
    rows = [
        record("r0", ["human", "blind"]),
        record("r1", ["human"]),
        record("r2", ["human", "blind"]),
        record("r3", ["human"]),
        record("r4", ["human"]),
    ]
    data = write_jsonl(tmp_path / "data", rows)
    values = options(tmp_path, tiny_model_dir, data, loss="bpo", rejected_sources=["human", "blind"])
    monkeypatch.setattr(trainer, "load_policy", refuse_model)
    with pytest.raises(
        DataError, match=r"only 2 of 5 records have a rejected response from 'blind' \(.*of 5: human 5, blind 2\)"
    ) as error:
        train(TrainConfig(**values))
    assert "allow_partial_sources: true" in str(error.value)
    monkeypatch.undo()
    result = train(TrainConfig(**values, allow_partial_sources=True))
    assert result.global_step == 1 and result.examples == 5


def test_source_weights_that_would_be_ignored_are_refused(tmp_path, no_model):
    for loss in ("dpo", "sft"):
        with pytest.raises(
            ConfigError, match=f"source_weights: only loss bpo weighs rejected sources; loss {loss} would ignore them"
        ):
            TrainConfig(
                **options(tmp_path, Path("no-model"), Path("data.jsonl"), loss=loss, source_weights={"blind": 0.5})
            )
    data = write_jsonl(tmp_path / "data", [record("r0", ["human", "blind"]), record("r1", ["human", "blind"])])
    with pytest.raises(
        ConfigError,
        match=r"source_weights: no rejected response comes from other \(sources in the data: human, blind\)",
    ):
        train(TrainConfig(**options(tmp_path, Path("no-model"), data, loss="bpo", source_weights={"other": 2.0})))
    with pytest.raises(ConfigError, match=r"no rejected response comes from blind \(sources in the data: human\)"):
        train(
            TrainConfig(
                **options(
                    tmp_path,
                    Path("no-model"),
                    data,
                    loss="bpo",
                    rejected_sources=["human"],
                    source_weights={"blind": 0.5},
                    allow_partial_sources=True,
                )
            )
        )
