"""The training benchmark's verdict and report on made-up measurements (numbers worked out by hand)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from benchmarks.train_models import QUICK_SETUP, QWEN_QUICK_SETUP
from benchmarks.train_variants import LossAgreement
from benchmarks.train_workload import Workload

from benchmarks import train_report as report


def made_up_run(**changes) -> report.CpuRun:
    # examples/s: A 10, C 2, D 1.25, G 5; peak memory A 400 MB, D 1000 MB.
    rates = {"A": 10.0, "B": 4.0, "C": 2.0, "D": 1.25, "G": 5.0, "P": 3.0}
    memory = {"A": 400.0, "B": 600.0, "C": 700.0, "D": 1000.0, "G": 450.0, "P": 500.0}
    rows = [
        {
            "name": key,
            "key": key,
            "examples_per_s": rate,
            "median_seconds": 2 / rate,
            "peak_rss_mb": memory[key],
            "A_speedup": rates["A"] / rate,
        }
        for key, rate in rates.items()
    ]
    agreement = LossAgreement(
        fast="A", a_losses=[1.0], c_losses=[1.0], a_c_relative_difference=0.0, mmsafe_mean_dpo_term=0.5, trl_dpo_loss=0.5,
        trl_relative_difference=0.0, image_passes_per_example={"A": 1, "C": 4},
    )  # fmt: skip
    workload = Workload(
        processor=None, encoder=None, items=[{}, {}], trl_rows=[], sources=["human", "blind"], pad_token_id=0,
        prompt_lengths=[70, 74], response_lengths=[10, 11, 12, 10, 11, 12],
    )  # fmt: skip
    padding = [
        {"path": "A", "key": "A", "batch_size": 4, "order": "grouped", "padding_share": 0.04, "positions": 100},
        {"path": "A", "key": "A", "batch_size": 8, "order": "grouped", "padding_share": 0.08, "positions": 100},
        {
            "path": "A",
            "key": "A",
            "batch_size": 8,
            "order": "random",
            "padding_share": 0.30,
            "positions": 100,
        },  # not a target
    ]
    memory_rows = [{"setup": QWEN_QUICK_SETUP.name, "path": "prompt-cache", "logprobs_chunked_over_plain": 0.2}]
    values = {
        "setup": QUICK_SETUP, "qwen_setup": QWEN_QUICK_SETUP, "parameters": 1000, "workload": workload, "tokenizer_vocabulary": 900,
        "profile": None, "load_before": (1.0, 1.0, 1.0), "load_after": (2.0, 2.0, 2.0), "agreement": agreement,
        "general_agreement": agreement, "rows": rows, "step_flops": 4e9, "ceiling": {"median": 2e10, "max": 3e10, "size": 2048},
        "k_rows": [{"rejected": 2, "A_step_s": 0.2, "C_step_s": 1.0, "C_over_A": 5.0}],
        "length_rows": [{"response_tokens": 10, "A_step_s": 0.2, "C_step_s": 1.0, "C_over_A": 5.0}], "padding_rows": padding, "padding_examples": 100,
        "qwen": {"G_over_C": 3.5, "parameters": 10, "agreement": "ok", "results": [{"name": "G", "G_speedup": 1.0}]}, "memory_rows": memory_rows,
    }  # fmt: skip
    return report.CpuRun(**{**values, **changes})


def test_the_verdict_takes_the_ratios_the_targets_are_set_on():
    run = made_up_run()
    verdict, passed = report.acceptance(run)
    assert verdict == pytest.approx(
        {
            "A_over_C": 5.0,
            "G_over_C": 2.5,
            "A_over_D": 8.0,
            "A_memory_over_D": 0.4,
            "A_padding_share": 0.08,
            "qwen_G_over_C": 3.5,
            "qwen_logprobs_chunked_over_plain": 0.2,
        },
        rel=1e-12,
    )
    assert passed
    # A's rate: 4e9 FLOP per step / 0.2 s per step.
    assert run.achieved == pytest.approx(2e10, rel=1e-12)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (
            {"qwen": {"G_over_C": 2.9, "parameters": 10, "agreement": "ok", "results": []}},
            "G/C on the Qwen shape under 3x",
        ),
        (
            {"memory_rows": [{"setup": QWEN_QUICK_SETUP.name, "logprobs_chunked_over_plain": 0.3}]},
            "chunked memory over a quarter",
        ),
        ({"padding_rows": [{"key": "A", "order": "grouped", "padding_share": 0.11}]}, "padding over 10%"),
    ],
)
def test_one_missed_target_fails_the_run(change, why):
    _, passed = report.acceptance(made_up_run(**change))
    assert not passed, why


def test_without_the_qwen_shape_its_targets_are_not_asked():
    verdict, passed = report.acceptance(made_up_run(qwen=None, memory_rows=[]))
    assert "qwen_G_over_C" not in verdict and "qwen_logprobs_chunked_over_plain" not in verdict
    assert passed


def test_the_report_prints_the_ratios_and_the_results_are_json(capsys):
    run = made_up_run(profile=None)
    verdict, passed = report.acceptance(run)
    report.print_cpu_report(run, verdict)
    out = capsys.readouterr().out
    assert "A/C 5.00x" in out and "A/D 8.00x" in out and "G/C 2.50x" in out and "A's peak memory / D's 0.40" in out
    assert "= 100% of the measured float32 matmul rate 20.0 GFLOP/s" in out
    results = json.loads(json.dumps(report.cpu_results(run, "python -m benchmarks.train", verdict, passed)))
    assert results["acceptance"]["passed"] is True and results["acceptance"]["A_over_D"] == pytest.approx(8.0)
    assert results["contenders"]["D"] == {"examples_per_s": 1.25, "peak_rss_mb": 1000.0}
    assert results["workload"]["rejected_per_example"] == 2 and results["workload"]["tokenizer_vocabulary"] == 900
    assert results["flops"]["fraction"] == pytest.approx(1.0)
    assert results["qwen2.5-vl"]["setup"]["name"] == QWEN_QUICK_SETUP.name


def test_a_gpu_row_gives_rates_from_the_step_times():
    result = {
        "seconds": [0.5, 0.25, 1.0],
        "examples": 2,
        "tokens": 300,
        "attention": "sdpa",
        "flop_utilisation": 0.4,
        "peak_rss_mb": 10.0,
    }
    row = report.gpu_row(replace(QUICK_SETUP, name="shape"), "G", result)
    assert (row["examples_per_s"], row["examples_per_s_min"], row["examples_per_s_max"]) == (4.0, 2.0, 8.0)
    assert row["tokens_per_s"] == 600.0 and row["median_seconds"] == 0.5 and row["peak_gpu_mb"] is None
