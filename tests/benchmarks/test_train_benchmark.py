"""The training benchmark's code paths on a very small model (no timing assertions)."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from benchmarks.harness import peak_rss_mb

from benchmarks import train as bench
from benchmarks import train_measure as measure
from benchmarks import train_models as models
from benchmarks import train_variants as variants
from benchmarks import train_workload as workloads

TINY = models.Setup(
    name="test",
    vision_hidden_size=32,
    vision_intermediate_size=64,
    vision_layers=1,
    vision_heads=2,
    image_size=28,  # 2 x 2 patches: 4 image tokens
    patch_size=14,
    text_hidden_size=32,
    text_intermediate_size=64,
    text_layers=2,
    text_heads=2,
    vocab_size=1500,  # padded beyond the tokenizer, as the benchmark's 32k
    prompt_tokens=8,
    response_tokens=6,
    batch_size=2,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: a second thread only waits for the first, and longer on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def prepared():
    return models.prepare(TINY)


def test_workload_lengths_follow_the_setup(prepared):
    processor, model, workload = prepared
    assert model.get_output_embeddings().weight.shape[0] == TINY.vocab_size > len(processor.tokenizer)
    assert workload.examples == TINY.batch_size
    assert workload.sources == ["human", "blind"]
    assert len(workload.trl_rows) == 2 * TINY.batch_size  # one row per (chosen, rejected) pair
    # Prompt = image tokens + about prompt_tokens of text; responses within a token or two of the target.
    for length in workload.prompt_lengths:
        assert abs(length - TINY.image_tokens - TINY.prompt_tokens) <= 3
    assert all(abs(length - TINY.response_tokens) <= 3 for length in workload.response_lengths)


def test_realistic_profile_draws_the_stated_distributions():
    """Medians and ranges of many draws against the numbers the profile states (independent of its code)."""
    import random
    import statistics

    profile = workloads.REALISTIC
    rng = random.Random(0)
    human = sorted(profile.human_response(rng) for _ in range(20000))
    assert abs(statistics.median(human) - 35) <= 2
    assert abs(human[int(0.9 * len(human))] - 110) <= 6  # the 90th percentile
    assert human[0] >= 4 and human[-1] <= profile.human_max_tokens
    blind = [profile.blind_response(rng) for _ in range(2000)]
    assert min(blind) >= 100 and max(blind) <= 300 and abs(statistics.mean(blind) - 200) <= 5
    dialogues = [profile.dialogue(rng) for _ in range(2000)]
    assert all(40 <= sum(length for _, length in turns) <= 640 for turns in dialogues)
    assert all(
        [role for role, _ in turns] == ["user", "assistant"] * ((len(turns) - 1) // 2) + ["user"] for turns in dialogues
    )
    assert {len(turns) for turns in dialogues} == {1, 3, 5, 7}  # zero to three earlier exchanges


def test_realistic_workload_has_several_turns_and_long_blind_answers():
    profile = replace(workloads.REALISTIC, scale=0.1)
    _, _, workload = models.prepare(replace(TINY, batch_size=6), profile=profile)
    prompts = [item["example"].prompt_text for item in workload.items]
    assert any(prompt.count("USER:") + prompt.count("user") > 1 for prompt in prompts)  # earlier turns rendered
    assert max(workload.prompt_lengths) > min(workload.prompt_lengths)  # drawn, not fixed
    responses = [workload.response_lengths[index : index + 3] for index in range(0, len(workload.response_lengths), 3)]
    # The blind answer (last) is drawn from 100-300 tokens x 0.1: 10 to 30, end-of-sequence included.
    assert all(10 <= blind <= 32 for _, _, blind in responses)


def test_length_grouping_cuts_the_padding_of_packed_batches():
    profile = replace(workloads.REALISTIC, scale=0.1)
    processor, model = models.build_model(TINY)
    rows = measure.padding_shares(processor, model, TINY, profile, examples=64)
    share = {(row["key"], row["batch_size"], row["order"]): row["padding_share"] for row in rows}
    assert share["A", 1, "grouped"] == 0.0  # one packed row per batch: nothing to pad
    assert share["A", 4, "grouped"] < share["A", 4, "random"]
    assert share["A", 8, "grouped"] < share["A", 8, "random"]
    assert all(0.0 <= value < 1.0 for value in share.values())
    # By hand from the example lengths: packed rows of a batch are padded to its longest.
    from mmsafe.train.hf_trainer import EpochLengthGroupedSampler

    workload = workloads.build_workload(processor, model, TINY, examples=64, num_rejected=2, seed=1, profile=profile)
    lengths = [
        len(item["example"].prompt_ids) + sum(len(ids) for ids in item["example"].responses) for item in workload.items
    ]
    order = list(EpochLengthGroupedSampler(4, lengths, seed=0))
    batches = [[lengths[index] for index in order[start : start + 4]] for start in range(0, len(order), 4)]
    expected = sum(len(batch) * max(batch) - sum(batch) for batch in batches) / sum(
        len(batch) * max(batch) for batch in batches
    )
    assert share["A", 4, "grouped"] == pytest.approx(expected, abs=1e-12)


def test_losses_agree_across_layouts_and_with_trl(prepared):
    _, model, workload = prepared
    agreement = variants.check_losses(copy.deepcopy(model), workload, TINY, perturbation=0.3)
    # The policy is moved away from the reference, so the losses are not the trivial 2 log 2.
    assert all(abs(loss - 2 * math.log(2)) > 1e-4 for loss in agreement.a_losses)
    assert agreement.a_c_relative_difference <= variants.LOSS_TOLERANCE
    assert agreement.trl_relative_difference <= variants.LOSS_TOLERANCE
    assert agreement.agrees
    # Shared prefix: one image pass per example; the release and TRL: one per sequence (2 x K).
    assert agreement.image_passes_per_example == {"A": 1, "C": 4, "D": 4}


def test_general_path_loss_agrees_with_the_release_form_on_llava_and_qwen(prepared):
    """G (prompt-cache) against C (every sequence alone, online reference), on both model families."""
    _, model, workload = prepared
    qwen_setup = replace(TINY, name="test-qwen", family="qwen2.5-vl", image_size=56, text_kv_heads=1, vocab_size=151936)
    _, qwen_model, qwen_workload = models.prepare(qwen_setup)
    for setup, chosen_model, chosen_workload in ((TINY, model, workload), (qwen_setup, qwen_model, qwen_workload)):
        # Moved further than the default: the Qwen-shaped model's small initial weights give near-uniform outputs.
        agreement = variants.check_losses(
            copy.deepcopy(chosen_model), chosen_workload, setup, fast="G", with_trl=False, perturbation=0.3
        )
        assert all(abs(loss - 2 * math.log(2)) > 1e-3 for loss in agreement.a_losses), agreement.a_losses
        assert agreement.a_c_relative_difference <= variants.LOSS_TOLERANCE, setup.name
    assert type(qwen_model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert qwen_workload.prompt_lengths[0] > qwen_setup.image_tokens == 4


def test_gpu_mode_runs_end_to_end_at_a_tiny_shape(tmp_path):
    """``--gpu --tiny``: the GPU run's code (both model shapes, every GPU contender, FLOP utilisation) on CPU."""
    out = tmp_path / "gpu.json"
    assert bench.main(["--gpu", "--tiny", "--repetitions", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    expected = [(family, key) for family, keys in bench.GPU_CONTENDERS.items() for key in keys]
    assert [(row["setup"], row["key"]) for row in rows] == [
        ("tiny" if family == "llava" else "tiny-qwen2.5-vl", key) for family, key in expected
    ]
    assert all(row["examples_per_s"] > 0 and row["flop_utilisation"] > 0 and row["tokens_per_s"] > 0 for row in rows)


def test_flash_attention_only_where_the_path_allows_it():
    gpu = replace(TINY, device="cuda")
    assert models.attention_for("A", gpu) == "sdpa"  # packed rows need a 4-D mask
    assert models.attention_for("G", TINY) == "sdpa"  # CPU
    assert models.attention_for("G", gpu) in ("sdpa", "flash_attention_2")


@pytest.mark.parametrize("key", sorted(variants.CONTENDERS))
def test_each_contender_takes_optimizer_steps_with_the_vision_tower_frozen(prepared, key):
    _, model, workload = prepared
    contender = variants.make_contender(key, copy.deepcopy(model), workload, TINY)
    before = {name: parameter.detach().clone() for name, parameter in contender.model.named_parameters()}
    assert contender.step() == TINY.batch_size
    contender.step()
    # Step 0: policy = reference, so each DPO term is log 2 (BPO sums K = 2 of them; TRL averages pairs).
    expected = math.log(2) if key == "D" else 2 * math.log(2)
    assert contender.losses[0] == pytest.approx(expected, rel=1e-5)
    changed = {
        name for name, parameter in contender.model.named_parameters() if not torch.equal(parameter, before[name])
    }
    assert any("language_model" in name for name in changed)
    assert not any("vision_tower" in name for name in changed)


def test_peak_memory_of_a_child_is_its_own():
    block = bytearray(200 * 2**20)
    block[::4096] = b"\x01" * len(block[::4096])  # touch every page
    parent = peak_rss_mb()
    child = subprocess.run(
        [sys.executable, "-c", "from benchmarks.harness import peak_rss_mb; print(peak_rss_mb())"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(bench.__file__).resolve().parents[1],
    )
    assert parent > 200
    assert float(child.stdout) < parent - 150


def test_flop_count_of_a_step_covers_the_output_layer(prepared):
    _, model, workload = prepared
    contender = variants.make_contender("A", copy.deepcopy(model), workload, TINY)
    flops = measure.count_step_flops(contender)
    # The output layer alone, forward (2 x width x vocab per scored position) and backward
    # (twice that), at the positions that predict a response token: each response's first
    # token is predicted by the prompt's last position, shared by all responses of an example.
    positions = sum(length for length in workload.response_lengths) - workload.examples * len(workload.sources)
    assert flops >= 3 * 2 * TINY.text_hidden_size * TINY.vocab_size * positions


def test_solo_mode_prints_its_timings_and_peak_memory(capsys):
    assert bench.main(["--solo", "A", "--quick", "--repetitions", "1", "--threads", "1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["key"] == "A"
    assert len(result["seconds"]) == 1
    assert result["peak_rss_mb"] >= result["rss_before_contender_mb"] > 0
    assert result["examples"] == models.QUICK_SETUP.batch_size
