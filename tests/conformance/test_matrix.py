"""Every command on every architecture of the matrix, checked against independent oracles.

The oracle for log-probs is plain scoring: each (prompt + response) alone, unpadded,
through ``model(...)`` with the processor's own output for that one prompt, and the
log-softmax of the logits taken here. Tolerances: 1e-4 nats per token (float32) for
log-probs, 1e-4 relative for gradients.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from mmsafe.data.records import read_preference_records
from mmsafe.models import load_model
from mmsafe.models.structure import model_parts, prompt_cache_supported
from mmsafe.models.zoo import ARCHITECTURES
from mmsafe.train.data import PreferenceCollator, PreferenceDataset, PreferenceEncoder, prepare_examples
from mmsafe.train.forward import score_batch, select_forward_mode

from .conftest import record_result

ARCHS = list(ARCHITECTURES)
LOGPROB_TOLERANCE = 1e-4
GRADIENT_TOLERANCE = 1e-4
#: Images keep their own sizes: processors that tile or keep native resolution see unequal images.
IMAGE_MODE = "none"


def plain_logprob(model, processor, example, image, response_ids, model_type) -> torch.Tensor:
    """Independent oracle: one sequence, the processor's own tensors for its prompt, no padding."""
    from mmsafe.models.prompts import tokenize_options
    from mmsafe.models.structure import response_token_fill

    options = tokenize_options(processor.tokenizer, example.prompt_text)
    kwargs = {"images": [[image]]} if image is not None else {}
    inputs = dict(processor(text=[example.prompt_text], return_tensors="pt", **options, **kwargs))
    inputs.pop("labels", None)
    prompt_ids = inputs["input_ids"][0].tolist()
    assert prompt_ids == example.prompt_ids
    length = len(prompt_ids)
    ids = torch.tensor([prompt_ids + response_ids])
    model_inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    for key, value in inputs.items():
        if key in ("input_ids", "attention_mask"):
            continue
        if value.dim() >= 2 and value.shape[1] == length:  # per-token: continue over the response
            tail = torch.stack(
                [
                    torch.as_tensor(response_token_fill(model_type, key, value[0]), dtype=value.dtype).expand(
                        value.shape[2:]
                    )
                ]
                * len(response_ids)
            )
            value = torch.cat([value[0], tail], dim=0).unsqueeze(0)
        model_inputs[key] = value
    logits = model(**model_inputs, use_cache=False).logits[0].float()
    logps = torch.log_softmax(logits[length - 1 : -1], dim=-1)
    return logps.gather(1, torch.tensor(response_ids).unsqueeze(1)).sum()


@pytest.fixture(scope="module", params=ARCHS)
def arch(request, checkpoints, conformance_data):
    name = request.param
    path = checkpoints(name)
    loaded = load_model(path, dtype="float32", device="cpu")
    loaded.model.eval()
    records = list(read_preference_records(conformance_data))
    encoder = PreferenceEncoder.for_model(
        loaded.model, loaded.processor, conformance_data.parent, max_length=2048, image_mode=IMAGE_MODE
    )
    prepared = prepare_examples(records, encoder)
    dataset = PreferenceDataset(prepared.examples, encoder)
    collator = PreferenceCollator(loaded.tokenizer.pad_token_id, prepared.sources, mode="per-response", encoder=encoder)
    return {
        "name": name,
        "path": path,
        "loaded": loaded,
        "dataset": dataset,
        "collator": collator,
        "records": records,
        "data": conformance_data,
    }


def test_scoring_paths_match_one_sequence_at_a_time(arch):
    """Batch of 3 examples, prompts of different lengths, K = 2, 2, 1: log-probs and gradients."""
    model = arch["loaded"].model
    processor = arch["loaded"].processor
    items = [arch["dataset"][index] for index in range(3)]
    assert [item["example"].num_rejected for item in items] == [2, 2, 1]
    assert len({len(item["example"].prompt_ids) for item in items}) == 3
    model_type = model.config.model_type
    weights = torch.linspace(0.5, 1.5, 9)
    torch.manual_seed(0)

    def gradients(loss):
        model.zero_grad()
        loss.backward()
        return torch.cat([parameter.grad.flatten() for parameter in model.parameters() if parameter.grad is not None])

    expected = []
    for item in items:
        for ids in item["example"].responses:
            expected.append(plain_logprob(model, processor, item["example"], item["image"], ids, model_type))
    expected_values = torch.stack(expected)
    expected_gradients = gradients((weights[: len(expected)] * expected_values).sum())
    token_counts = torch.tensor([len(ids) for item in items for ids in item["example"].responses], dtype=torch.float)

    mode, _ = select_forward_mode(model, arch["collator"], items, "auto")
    measured = {}
    cache_supported, _ = prompt_cache_supported(model)
    for path in dict.fromkeys([mode, *(["prompt-cache"] if cache_supported else []), "per-response", "separate"]):
        scores = score_batch(model, arch["collator"].with_mode(path)(items))
        values = torch.stack(
            [
                value
                for row, item in enumerate(items)
                for value in [scores.chosen[row], *scores.rejected[row, : item["example"].num_rejected]]
            ]
        )
        difference = ((values - expected_values.detach()).abs() / token_counts).max().item()
        got_gradients = gradients((weights[: len(values)] * values).sum())
        relative = ((got_gradients - expected_gradients).norm() / expected_gradients.norm()).item()
        measured[path] = (difference, relative)
        assert difference <= LOGPROB_TOLERANCE, f"{path}: log-probs differ by {difference:.3g} per token"
        assert relative <= GRADIENT_TOLERANCE, f"{path}: gradients differ by {relative:.3g} relative"
    record_result(arch["name"], "path", mode)
    record_result(arch["name"], "logp diff", f"{max(value[0] for value in measured.values()):.1e}")
    record_result(arch["name"], "grad rel", f"{max(value[1] for value in measured.values()):.1e}")
    model.zero_grad()


def test_generation_is_the_same_at_batch_1_and_4(arch):
    from mmsafe.data.images import load_image
    from mmsafe.generate.engine import DecodingParams, GenerationRequest
    from mmsafe.generate.hf_engine import HFEngine

    requests = [
        GenerationRequest(
            id=record.id, messages=list(record.messages), image=load_image(arch["data"].parent, record.image)
        )
        for record in arch["records"]
    ]
    params = DecodingParams(max_new_tokens=8)
    answers = {}
    for batch_size in (1, 4):
        engine = HFEngine(arch["loaded"], batch_size=batch_size, image_mode=IMAGE_MODE)
        answers[batch_size] = engine.generate(requests, params)
    assert answers[1] == answers[4]
    record_result(arch["name"], "generate b1=b4", f"{len(requests)}/{len(requests)}")


def test_blind(arch, tmp_path):
    from mmsafe.errors import ConfigError
    from mmsafe.generate.blind import make_blind
    from mmsafe.generate.engine import DecodingParams
    from mmsafe.generate.hf_engine import HFEngine

    engine = HFEngine(arch["loaded"], batch_size=4, image_mode=IMAGE_MODE)
    mode = "remove"
    if not engine.accepts_text_only:
        with pytest.raises(ConfigError, match="takes no prompt without an image"):
            make_blind(
                engine, arch["data"], tmp_path / "refused.jsonl", mode="remove", params=DecodingParams(max_new_tokens=6)
            )
        mode = "blank"
    summary = make_blind(
        engine, arch["data"], tmp_path / "blind.jsonl", mode=mode, params=DecodingParams(max_new_tokens=6)
    )
    written = list(read_preference_records(tmp_path / "blind.jsonl"))
    assert len(written) == len(arch["records"]) == summary.generated
    # a random tiny model may answer only whitespace: such records are counted, not given an empty answer
    added = [
        record
        for record, original in zip(written, arch["records"], strict=True)
        if len(record.rejected) == len(original.rejected) + 1
    ]
    assert len(added) + len(summary.empty) == len(written)
    assert all(record.rejected_sources[-1] == "blind" and record.rejected[-1].strip() for record in added)
    record_result(arch["name"], "blind", f"{mode} {len(added)}/{len(written)}")


def _train(arch, tmp_path, **options):
    from mmsafe.train.config import TrainConfig
    from mmsafe.train.trainer import train

    values = {
        "model": str(arch["path"]),
        "data": str(arch["data"]),
        "output_dir": str(tmp_path / "out"),
        "learning_rate": 5e-3,
        "warmup_steps": 0,
        "max_steps": 6,
        "per_device_train_batch_size": 3,
        "save_steps": 1000,
        "logging_steps": 1,
        "reference_cache_dir": str(tmp_path / "cache"),
        "dtype": "float32",
        "image_mode": IMAGE_MODE,
        "max_length": 2048,
        "lr_scheduler_type": "constant",
    }
    values.update(options)
    return train(TrainConfig(**values))


def _losses(output_dir):
    from mmsafe.train.trainer import LOG_FILE

    return [
        json.loads(line)["loss"]
        for line in (output_dir / LOG_FILE).read_text(encoding="utf-8").splitlines()
        if "loss" in json.loads(line)
    ]


def test_train_bpo_full_loss_falls_and_frozen_tower_stays(arch, tmp_path):
    """A full fine-tune with the reference precomputed: loss falls, the vision tower is bit-identical."""
    result = _train(arch, tmp_path)
    assert result.reference_forwards > 0  # reference log-probs were precomputed
    losses = _losses(tmp_path / "out")
    assert losses[-1] < losses[0], losses
    # Compared as loaded (checkpoints may be saved under the architecture's legacy key names).
    before = dict(load_model(arch["path"], dtype="float32", device="cpu").model.named_parameters())
    after = dict(load_model(tmp_path / "out", dtype="float32", device="cpu").model.named_parameters())
    parts = model_parts(arch["loaded"].model)
    tower = [name for name in before if parts.is_vision_tower(name)]
    trained = [name for name in before if not parts.is_vision_tower(name)]
    assert tower, "no vision tower weights found"
    assert all(torch.equal(before[name], after[name]) for name in tower)
    assert any(not torch.equal(before[name], after[name]) for name in trained)
    record_result(arch["name"], "train loss", f"{losses[0]:.3f}->{losses[-1]:.3f}")
    record_result(arch["name"], "tower frozen", f"{len(tower)} tensors")


def test_train_lora_targets_the_language_model(arch, tmp_path):
    result = _train(
        arch,
        tmp_path,
        finetune="lora",
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        max_steps=2,
        reference="adapters-disabled",
    )
    assert result.trainable_parameters > 0
    adapter = json.loads((tmp_path / "out" / "adapter_config.json").read_text(encoding="utf-8"))
    assert model_parts(arch["loaded"].model).language_model.replace(".", "\\.") in adapter["target_modules"]
    record_result(arch["name"], "lora", f"{result.trainable_parameters} params")


def test_pairwise_likelihood(arch):
    from mmsafe.train.logprobs import score_responses

    scored = score_responses(arch["loaded"], arch["records"], arch["data"].parent, image_mode=IMAGE_MODE)
    assert len(scored.scores) == len(arch["records"])
    assert all(torch.isfinite(torch.tensor([score.chosen, *score.rejected])).all() for score in scored.scores)
    record_result(arch["name"], "pairwise", f"{len(scored.scores)} records")


def test_probe(arch, tmp_path):
    from mmsafe.evaluate.probe import run_probe
    from mmsafe.generate.engine import DecodingParams
    from mmsafe.generate.hf_engine import HFEngine

    engine = HFEngine(arch["loaded"], batch_size=4, image_mode=IMAGE_MODE)
    result = run_probe(
        engine, arch["data"], tmp_path / "probe", params=DecodingParams(max_new_tokens=6), limit=3, resamples=200
    )
    ran = sorted(result.rates["refusal"])
    assert "multimodal" in ran and "mid" in ran
    record_result(arch["name"], "probe", f"{len(ran)} variants")


def test_forced_packed_path_is_refused_on_qwen2_vl(checkpoints, conformance_data, tmp_path, capsys):
    """The exactness self-check refuses shared-prefix on an M-RoPE model: one line, no traceback."""
    from PIL import Image

    from mmsafe.cli import main
    from mmsafe.data.records import write_records

    # Larger images (64 image tokens): the packed row's 1-D positions then drift far from M-RoPE's.
    records = list(read_preference_records(conformance_data))
    (tmp_path / "images").mkdir()
    for index, record in enumerate(records):
        Image.open(conformance_data.parent / record.image).resize((224, 224)).save(tmp_path / "images" / f"{index}.png")
        record.image = f"images/{index}.png"
    write_records(tmp_path / "records.jsonl", records)
    config = {
        "model": str(checkpoints("qwen2-vl")),
        "data": str(tmp_path / "records.jsonl"),
        "output_dir": str(tmp_path / "out"),
        "forward_mode": "shared-prefix",
        "max_steps": 1,
        "dtype": "float32",
        "reference_cache_dir": str(tmp_path / "cache"),
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    code = main(["train", "--config", str(path)])
    err = capsys.readouterr().err
    assert code != 0
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "not exact" in line]
    assert len(lines) == 1 and "Qwen2VLForConditionalGeneration" in lines[0], err


def test_prompt_cache_is_refused_on_the_hybrid_and_with_gradient_checkpointing(
    checkpoints, conformance_data, tmp_path, capsys
):
    """The recurrent state of the hybrid cannot be shared; gradient checkpointing turns the cache off: one line each."""
    from mmsafe.cli import main

    for name, options, expected in (
        ("lfm2-vl", {}, "recurrent layers"),
        ("qwen2-vl", {"gradient_checkpointing": True}, "gradient checkpointing"),
    ):
        config = {
            "model": str(checkpoints(name)),
            "data": str(conformance_data),
            "output_dir": str(tmp_path / name),
            "forward_mode": "prompt-cache",
            "max_steps": 1,
            "dtype": "float32",
            "reference_cache_dir": str(tmp_path / "cache"),
            **options,
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        code = main(["train", "--config", str(path)])
        err = capsys.readouterr().err
        assert code != 0
        assert "Traceback" not in err
        lines = [line for line in err.splitlines() if "prompt-cache" in line]
        assert len(lines) == 1 and expected in lines[0], err
