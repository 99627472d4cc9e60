"""``batch_size="auto"``: on an out-of-memory error the batch is halved and retried, then grows back.

A CPU has no CUDA out-of-memory error, so one is injected: the model is wrapped so that
``generate`` raises ``torch.cuda.OutOfMemoryError`` for batches larger than a limit.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from mmsafe.errors import ConfigError, MmsafeError
from mmsafe.generate.engine import DecodingParams
from mmsafe.generate.hf_engine import AUTO_BATCH_SIZE_CPU, GROW_AFTER, HFEngine
from tests.generate.test_hf_engine import _requests

PARAMS = DecodingParams(max_new_tokens=6)


class OutOfMemoryAbove:
    """The model, except that ``generate`` on more than ``limit`` rows runs out of memory.

    ``limit`` may change as calls go by (``limits``: the limit for each successive call),
    as free memory does. Records the row count of each call and whether it failed.
    """

    def __init__(self, model, limits):
        self._model, self._limits, self.calls = model, list(limits), []

    def __getattr__(self, name):
        return getattr(self._model, name)

    def generate(self, **kwargs):
        rows = kwargs["input_ids"].shape[0]
        limit = self._limits[min(len(self.calls), len(self._limits) - 1)]
        failed = rows > limit
        self.calls.append((rows, failed))
        if failed:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return self._model.generate(**kwargs)


def engine_with(tiny_engine, limits, **options) -> tuple[HFEngine, OutOfMemoryAbove]:
    wrapper = OutOfMemoryAbove(tiny_engine.model, limits)
    return HFEngine(dataclasses.replace(tiny_engine.loaded, model=wrapper), batch_size="auto", **options), wrapper


def test_auto_on_cpu_is_a_fixed_default(tiny_engine):
    engine = HFEngine(tiny_engine.loaded, batch_size="auto")
    assert engine.batch_size == engine.preferred_batch_size == engine.current_batch_size == AUTO_BATCH_SIZE_CPU == 16
    assert engine.describe()["batch_size"] == "auto" and engine.describe()["max_batch_size"] == 16
    with pytest.raises(ConfigError, match="positive integer or auto"):
        HFEngine(tiny_engine.loaded, batch_size="big")


def test_out_of_memory_halves_and_retries_without_losing_or_repeating_a_request(tiny_engine, caplog):
    requests = _requests(24)
    expected = HFEngine(tiny_engine.loaded, batch_size=1).generate(requests, PARAMS)
    engine, wrapper = engine_with(tiny_engine, [3])
    with caplog.at_level(logging.WARNING, logger="mmsafe.generate.hf_engine"):
        answers = engine.generate(requests, PARAMS)
    assert answers == expected  # greedy answers of batch 1, in request order
    assert sum(rows for rows, failed in wrapper.calls if not failed) == len(
        requests
    )  # every request answered exactly once
    failed = [rows for rows, failed in wrapper.calls if failed]
    assert failed[:3] == [16, 8, 4]  # 16 -> 8 -> 4 -> 2 on the first batch
    assert all(rows > 3 for rows in failed) and all(rows <= 3 for rows, ok in wrapper.calls if not ok)
    assert engine.current_batch_size <= 3
    assert any("out of GPU memory at batch size 16" in message for message in caplog.messages)


def test_batch_size_grows_back_after_batches_that_fit(tiny_engine):
    # Memory is short for the first call only: 16 fails, 8 fits, then after GROW_AFTER*2
    # fitting batches (the wait doubles after an error) it goes back up to 16.
    requests = [request for request in _requests(120) if request.has_image][:80]
    engine, wrapper = engine_with(tiny_engine, [8, 100])
    answers = engine.generate(requests, PARAMS)
    assert len(answers) == 80 and all(isinstance(answer, str) for answer in answers)
    rows = [rows for rows, failed in wrapper.calls]
    assert wrapper.calls[0] == (16, True)
    assert rows[1 : 1 + 2 * GROW_AFTER] == [8] * (2 * GROW_AFTER)
    assert 16 in rows[1 + 2 * GROW_AFTER :] and engine.current_batch_size == 16
    assert sum(rows for rows, failed in wrapper.calls if not failed) == 80


def test_out_of_memory_at_one_prompt_or_a_fixed_size_is_one_clear_error(tiny_engine):
    engine, _ = engine_with(tiny_engine, [0])
    with pytest.raises(MmsafeError, match="out of GPU memory generating 1 prompt"):
        engine.generate(_requests(3), PARAMS)
    wrapper = OutOfMemoryAbove(tiny_engine.model, [2])
    fixed = HFEngine(dataclasses.replace(tiny_engine.loaded, model=wrapper), batch_size=8)
    with pytest.raises(MmsafeError, match="--batch-size auto"):
        fixed.generate(_requests(8), PARAMS)


def test_a_resumable_run_with_auto_writes_every_record_once(tiny_engine, dataset, tmp_path):
    from mmsafe.data.jsonl import read_jsonl
    from mmsafe.generate.runs import generate_responses

    engine, wrapper = engine_with(tiny_engine, [5])
    out = tmp_path / "responses.jsonl"
    summary = generate_responses(engine, dataset, out, params=PARAMS, batch_size=engine.preferred_batch_size)
    ids = [row["id"] for _, row in read_jsonl(out)]
    assert summary.generated == 24 and len(ids) == 24 and len(set(ids)) == 24
    assert any(failed for _, failed in wrapper.calls)


def test_padding_share_of_length_grouped_batches_is_counted(tiny_engine):
    requests = _requests(24)
    engine = HFEngine(tiny_engine.loaded, batch_size=8)
    engine.generate(requests, PARAMS)
    # Independent count: tokenize each planned batch's prompts and pad them by hand.
    from mmsafe.generate.hf_engine import plan_batches

    prompts = [engine.render(request) for request in requests]
    padded = total = 0
    for batch in plan_batches(
        [len(engine.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts],
        [r.has_image for r in requests],
        8,
    ):
        texts = [prompts[index] for index in batch.indices]
        images = (
            [[engine._prepare_image(requests[index].image)] for index in batch.indices] if batch.with_images else None
        )
        widths = [
            int(
                engine.processor(text=[text], images=None if images is None else [image], return_tensors="pt")[
                    "input_ids"
                ].shape[1]
            )
            for text, image in zip(texts, images or [None] * len(texts), strict=True)
        ]
        padded += sum(max(widths) - width for width in widths)
        total += max(widths) * len(widths)
    assert engine.padding.padded == padded and engine.padding.total == total
    assert 0 < engine.padding.share < 0.5


def test_cli_and_pipeline_config_take_batch_size_auto(tiny_model_dir, dataset, tmp_path, capsys):
    import yaml

    from mmsafe.cli import main
    from mmsafe.config import from_dict
    from mmsafe.errors import ConfigError
    from mmsafe.pipeline import GenerateSection

    out = tmp_path / "out.jsonl"
    base = [
        "generate",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(dataset),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--max-new-tokens",
        "3",
    ]
    assert main([*base, "--batch-size", "auto"]) == 0
    written = yaml.safe_load(out.with_name(out.name + ".config.yaml").read_text(encoding="utf-8"))
    assert written["engine"]["batch_size"] == "auto" and written["batch_size"] == AUTO_BATCH_SIZE_CPU
    assert main([*base, "--batch-size", "0"]) == 1
    assert "positive integer or auto" in capsys.readouterr().err
    section = from_dict(GenerateSection, {"batch_size": "auto", "engine": "vllm", "vllm": {"max_model_len": 4096}})
    assert (section.batch_size, section.engine, section.vllm) == ("auto", "vllm", {"max_model_len": 4096})
    with pytest.raises(ConfigError, match="batch_size"):
        from_dict(GenerateSection, {"batch_size": "big"})
