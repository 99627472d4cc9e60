"""The pipeline config is checked whole before any stage runs, and each stage's hash is
the hash of what that stage runs with.

What each stage's hash must depend on (besides the stages before it, chained):
- blind: the base model, the training records, blind.mode / max_new_tokens / batch_size,
  and generate.dtype / device / prompt_style / image_mode (the engine it builds), but not
  generate.max_new_tokens / batch_size / base (generation only);
- generate: each model's engine settings and the decoding, not the judges;
- judge: each judge's name and options; report: the files it reads and the seed;
- a stage that is off (teach.enabled / blind.enabled false) depends on none of its options;
- no hash depends on where the run folder is (paths under out are hashed relative to it).
"""

from __future__ import annotations

import json

import pytest
import yaml

from mmsafe.cli import main
from mmsafe.config import from_dict
from mmsafe.errors import ConfigError
from mmsafe.pipeline import (
    HASH_SCHEME,
    STAGES,
    Paths,
    PipelineConfig,
    load_pipeline_config,
    run_pipeline,
    stage_hashes,
    stage_status,
)

SAMPLE = {"model": "tiny", "data": {"sample": True}}
BUILD = {"model": "tiny", "build": {"input": "text.jsonl"}}
JUDGES = {
    **SAMPLE,
    "judge": {"judges": ["refusal", "llama-guard", "llm"], "options": {"llm": {"model": "judge-model"}}},
}

# (base config, the key as written, a value, what the message says after the source)
TYPOS = [
    (
        SAMPLE,
        "train.options.lerning_rate",
        1e-4,
        "train.options.lerning_rate: unknown option (did you mean train.options.learning_rate?)",
    ),
    (SAMPLE, "train.dpo.bta", 0.2, "train.dpo.bta: unknown option (did you mean train.dpo.beta?)"),
    (
        SAMPLE,
        "train.bpo.rejected_source",
        ["human", "blind"],
        "train.bpo.rejected_source: unknown option (did you mean train.bpo.rejected_sources?)",
    ),
    (
        SAMPLE,
        "teach.options.num_train_epoch",
        2,
        "teach.options.num_train_epoch: unknown option (did you mean teach.options.num_train_epochs?)",
    ),
    (BUILD, "build.max_dialogue", 2, "build.max_dialogue: unknown option (did you mean build.max_dialogues?)"),
    (BUILD, "build.entities.modle", "x", "build.entities.modle: unknown option"),
    (
        JUDGES,
        "judge.options.llm.modle",
        "other",
        "judge.options.llm.modle: unknown option (did you mean judge.options.llm.model?)",
    ),
    (
        JUDGES,
        "judge.options.llama-guard.devic",
        "cpu",
        "judge.options.llama-guard.devic: unknown option (did you mean judge.options.llama-guard.device?)",
    ),
    (SAMPLE, "generat.max_new_tokens", 4, "generat: unknown option (did you mean generate?)"),
    (
        SAMPLE,
        "generate.max_new_token",
        4,
        "generate.max_new_token: unknown option (did you mean generate.max_new_tokens?)",
    ),
    # values, not only names: the type, a check across options, a key the pipeline sets itself
    (SAMPLE, "train.options.learning_rate", "fast", "train.options.learning_rate: expected a number, got 'fast'"),
    (SAMPLE, "train.dpo.beta", -1.0, "train.dpo.beta: expected a positive number"),
    (SAMPLE, "train.options.output_dir", "elsewhere", "train.options.output_dir: set by the pipeline"),
    (
        SAMPLE,
        "generate.vllm.max_model_len",
        4096,
        "generate.vllm.max_model_len: an option of the vllm engine, but generate.engine is hf",
    ),
]


def _set(data: dict, key: str, value) -> dict:
    data = json.loads(json.dumps(data))
    node = data
    *parents, last = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return data


def _run(tmp_path, capsys, data: dict, *overrides: str) -> tuple[int, str]:
    config_path = tmp_path / "x.yaml"
    config_path.write_text(yaml.safe_dump({"out": str(tmp_path / "run"), **data}), encoding="utf-8")
    code = main(["run", str(config_path), *overrides])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("base", "key", "value", "message"), TYPOS, ids=[case[1] for case in TYPOS])
def test_a_wrong_key_in_the_file_fails_before_any_stage_naming_the_key_and_the_file(
    tmp_path, capsys, base, key, value, message
):
    code, err = _run(tmp_path, capsys, _set(base, key, value))
    assert code == 1
    assert f"error: {tmp_path / 'x.yaml'}: {message}" in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()  # no stage started: no marker, no tiny model, no folder


@pytest.mark.parametrize(("base", "key", "value", "message"), TYPOS, ids=[case[1] for case in TYPOS])
def test_a_wrong_key_in_an_override_fails_before_any_stage_naming_the_override(
    tmp_path, capsys, base, key, value, message
):
    override = f"{key}={json.dumps(value)}"
    code, err = _run(tmp_path, capsys, base, override)
    assert code == 1
    assert f"error: override {override!r}: {message}" in err, err
    assert not (tmp_path / "run").exists()


def test_an_error_in_the_file_is_not_blamed_on_an_unrelated_override(tmp_path, capsys):
    code, err = _run(
        tmp_path,
        capsys,
        _set(SAMPLE, "train.options.lerning_rate", 1e-4),
        "train.options.beta=0.2",
        "generate.max_new_tokens=4",
    )
    assert code == 1
    assert f"error: {tmp_path / 'x.yaml'}: train.options.lerning_rate: unknown option" in err, err


def test_judges_are_checked_without_loading_a_model(tmp_path, monkeypatch):
    from mmsafe.evaluate.judges.llama_guard import LlamaGuardJudge

    def no_loading(self):
        raise AssertionError("the Llama Guard weights were loaded while checking the config")

    monkeypatch.setattr(LlamaGuardJudge, "_load", no_loading)
    path = tmp_path / "x.yaml"
    data = {
        "out": str(tmp_path / "run"),
        **_set(JUDGES, "judge.options.llama-guard", {"model": str(tmp_path / "no-such-guard"), "batch_size": 2}),
    }
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    config = load_pipeline_config(path)
    assert config.judge.options["llama-guard"]["batch_size"] == 2
    # a value a judge itself refuses fails now too, and an unknown judge name
    with pytest.raises(
        ConfigError,
        match=r"x\.yaml \(with override 'judge\.options\.llama-guard\.batch_size=0'\): judge\.options\.llama-guard: llama-guard: batch_size .* at least 1",
    ):
        load_pipeline_config(path, ["judge.options.llama-guard.batch_size=0"])
    with pytest.raises(
        ConfigError,
        match=r"override 'judge\.judges=\[refusl\]': judge\.judges\[0\]: unknown judge 'refusl'.*did you mean 'refusal'",
    ):
        load_pipeline_config(path, ["judge.judges=[refusl]", "judge.options={}"])
    with pytest.raises(ConfigError, match=r"judge\.options\.llm: llm judge: give the judge model's name"):
        load_pipeline_config(path, ["judge.options.llm={}"])


def test_run_pipeline_checks_every_stage_before_writing_anything(tmp_path):
    config = from_dict(PipelineConfig, {"out": str(tmp_path / "run"), **_set(SAMPLE, "train.bpo.bta", 0.2)})
    with pytest.raises(ConfigError, match=r"train\.bpo\.bta: unknown option"):
        run_pipeline(config, log=lambda _: None)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- what each stage's hash depends on


def _hashes(tmp_path, data: dict | None = None, **changes) -> dict[str, str]:
    data = {"out": str(tmp_path / "run"), **(data or SAMPLE)}
    for key, value in changes.items():
        data = _set(data, key.replace("__", "."), value)
    return stage_hashes(from_dict(PipelineConfig, data))


def _changed(first: dict[str, str], second: dict[str, str]) -> list[str]:
    return [stage for stage in STAGES if first[stage] != second[stage]]


@pytest.mark.parametrize(
    ("key", "value"), [("dtype", "float32"), ("prompt_style", "llava-v1"), ("image_mode", "resize"), ("device", "cpu")]
)
def test_the_blind_stage_hash_follows_the_generate_settings_it_uses(tmp_path, key, value):
    base = _hashes(tmp_path)
    assert _changed(base, _hashes(tmp_path, **{f"generate__{key}": value})) == [
        "blind",
        "train",
        "generate",
        "judge",
        "report",
    ]


def test_generation_only_settings_leave_the_stages_before_generate_alone(tmp_path):
    base = _hashes(tmp_path)
    for key, value in (("generate__max_new_tokens", 8), ("generate__batch_size", 4), ("generate__base", False)):
        assert _changed(base, _hashes(tmp_path, **{key: value})) == ["generate", "judge", "report"], key


def test_judge_options_change_judge_and_report_only(tmp_path):
    data = {**SAMPLE, "judge": {"judges": ["refusal", "llm"], "options": {"llm": {"model": "a"}}}}
    base = _hashes(tmp_path, data)
    assert _changed(base, _hashes(tmp_path, data, judge__options__llm__model="b")) == ["judge", "report"]
    assert _changed(base, _hashes(tmp_path, data, train__dpo__beta=0.3)) == ["train", "generate", "judge", "report"]


def test_options_of_a_stage_that_is_off_change_no_hash(tmp_path):
    base = _hashes(tmp_path)
    assert _changed(base, _hashes(tmp_path, teach__options__learning_rate=0.5)) == []
    no_blind = _hashes(tmp_path, blind__enabled=False)
    assert _changed(base, no_blind) == ["blind", "train", "generate", "judge", "report"]
    assert (
        _changed(no_blind, _hashes(tmp_path, blind__enabled=False, blind__max_new_tokens=8, blind__mode="blank")) == []
    )
    # the same options with the warm-up on do matter, from the warm-up on
    teach = _hashes(tmp_path, teach__enabled=True)
    assert _changed(teach, _hashes(tmp_path, teach__enabled=True, teach__options__learning_rate=0.5)) == [
        "teach",
        "blind",
        "train",
        "generate",
        "judge",
        "report",
    ]


def test_hashes_do_not_depend_on_where_the_run_folder_is(tmp_path):
    here = stage_hashes(from_dict(PipelineConfig, {"out": str(tmp_path / "a"), **SAMPLE}))
    moved = stage_hashes(from_dict(PipelineConfig, {"out": str(tmp_path / "elsewhere" / "b"), **SAMPLE}))
    assert here == moved


# ---------------------------------------------------------------- run folders of an older mmsafe


def _fake_stages(monkeypatch) -> list[str]:
    from mmsafe import pipeline

    ran: list[str] = []

    def make(stage: str):
        def run(config: PipelineConfig, paths: Paths) -> str:
            ran.append(stage)
            return f"{stage} done"

        return run

    for stage in STAGES:
        monkeypatch.setitem(pipeline.STAGE_FUNCTIONS, stage, make(stage))
    return ran


def test_a_run_folder_of_an_older_mmsafe_is_refused_with_a_message_saying_so(tmp_path, monkeypatch):
    ran = _fake_stages(monkeypatch)
    config = from_dict(PipelineConfig, {"out": str(tmp_path / "run"), **SAMPLE})
    run_pipeline(config, log=lambda _: None)
    assert ran == list(STAGES)
    paths = Paths(tmp_path / "run")
    marker = json.loads((paths.stages / "prepare.done.json").read_text(encoding="utf-8"))
    assert marker["scheme"] == HASH_SCHEME
    # as an older mmsafe wrote it: no scheme, a hash of the sections it listed by hand
    (paths.stages / "prepare.done.json").write_text(
        json.dumps({"hash": "0123456789abcdef", "message": "", "time": "2024-01-01T00:00:00"}) + "\n", encoding="utf-8"
    )

    with pytest.raises(ConfigError, match=r"stage 'prepare': .* made by an older mmsafe.*rerun with --from prepare"):
        run_pipeline(config, log=lambda _: None)
    assert stage_status(config, "prepare").startswith("would be refused") and "older mmsafe" in stage_status(
        config, "prepare"
    )
    with pytest.raises(ConfigError, match=r"--only judge: stage 'prepare': .* older mmsafe"):
        run_pipeline(config, only="judge", log=lambda _: None)

    ran.clear()
    run_pipeline(config, from_stage="prepare", log=lambda _: None)
    assert ran == list(STAGES)
    assert stage_status(config, "report") == "up to date"

    # a marker of this version with another hash is a different config, said as such
    changed = from_dict(PipelineConfig, {"out": str(tmp_path / "run"), **_set(SAMPLE, "generate.max_new_tokens", 8)})
    with pytest.raises(ConfigError, match=r"stage 'generate': .* made with a different config.*--from generate"):
        run_pipeline(changed, log=lambda _: None)
