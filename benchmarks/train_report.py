"""The training benchmark's verdict and report: the acceptance targets, the printed tables and the JSON results."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any

from benchmarks.harness import format_table, machine_info
from benchmarks.train_measure import SCORING_MEMORY_RESPONSE_TOKENS
from benchmarks.train_models import Setup
from benchmarks.train_variants import CONTENDERS, LossAgreement
from benchmarks.train_workload import LengthProfile, Workload

#: Acceptance: A's examples/s against C's and D's, and A's peak memory against D's;
#: the general path G against C on the same work, on the LLaVA and the Qwen2.5-VL shape.
TARGET_SPEEDUP = 4.0
TARGET_TRL_SPEEDUP = 6.0
TARGET_GENERAL_SPEEDUP = 2.0
TARGET_QWEN_SPEEDUP = 3.0
TARGET_MEMORY_RATIO = 0.5
TARGET_PADDING_SHARE = 0.10
#: Chunked log-probs' peak scoring memory against the plain computation's, at the 152k vocabulary.
TARGET_CHUNKED_MEMORY = 0.25


@dataclass
class CpuRun:
    """Everything the CPU run measured, for :func:`acceptance`, :func:`print_cpu_report` and :func:`cpu_results`."""

    setup: Setup
    qwen_setup: Setup
    parameters: int
    workload: Workload
    tokenizer_vocabulary: int
    profile: LengthProfile | None
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    agreement: LossAgreement
    general_agreement: LossAgreement
    rows: list[dict[str, Any]]
    step_flops: float
    ceiling: dict[str, float]
    k_rows: list[dict[str, Any]]
    length_rows: list[dict[str, Any]]
    padding_rows: list[dict[str, Any]]
    padding_examples: int
    qwen: dict[str, Any] | None
    memory_rows: list[dict[str, Any]]

    @property
    def achieved(self) -> float:
        """A's achieved FLOP/s."""
        by_key = {row["key"]: row for row in self.rows}
        return self.step_flops / by_key["A"]["median_seconds"]


def acceptance(run: CpuRun) -> tuple[dict[str, float], bool]:
    """The ratios the targets are set on, and whether every target is met."""
    by_key = {row["key"]: row for row in run.rows}
    verdict = {
        "A_over_C": by_key["A"]["examples_per_s"] / by_key["C"]["examples_per_s"],
        "G_over_C": by_key["G"]["examples_per_s"] / by_key["C"]["examples_per_s"],
        "A_over_D": by_key["A"]["examples_per_s"] / by_key["D"]["examples_per_s"],
        "A_memory_over_D": by_key["A"]["peak_rss_mb"] / by_key["D"]["peak_rss_mb"],
        "A_padding_share": max(
            row["padding_share"] for row in run.padding_rows if row["key"] == "A" and row["order"] == "grouped"
        ),
    }
    if run.qwen is not None:
        verdict["qwen_G_over_C"] = run.qwen["G_over_C"]
    chunked = [row["logprobs_chunked_over_plain"] for row in run.memory_rows if row["setup"] == run.qwen_setup.name]
    if chunked:
        verdict["qwen_logprobs_chunked_over_plain"] = chunked[0]
    passed = (
        verdict["A_over_C"] >= TARGET_SPEEDUP
        and verdict["A_over_D"] >= TARGET_TRL_SPEEDUP
        and verdict["A_memory_over_D"] <= TARGET_MEMORY_RATIO
        and verdict["G_over_C"] >= TARGET_GENERAL_SPEEDUP
        and verdict.get("qwen_G_over_C", TARGET_QWEN_SPEEDUP) >= TARGET_QWEN_SPEEDUP
        and verdict.get("qwen_logprobs_chunked_over_plain", 0.0) <= TARGET_CHUNKED_MEMORY
        and verdict["A_padding_share"] <= TARGET_PADDING_SHARE
    )
    return verdict, passed


def print_cpu_report(run: CpuRun, verdict: dict[str, float]) -> None:
    """The CPU run's tables and ratios, as quoted in benchmarks/README.md."""
    setup, qwen, ceiling, achieved = run.setup, run.qwen, run.ceiling, run.achieved
    print(
        format_table(
            run.rows,
            [
                "name",
                "examples_per_s",
                "examples_per_s_min",
                "examples_per_s_max",
                "median_seconds",
                "peak_rss_mb",
                "A_speedup",
            ],
        )
    )
    print(
        f"A/C {verdict['A_over_C']:.2f}x (target >= {TARGET_SPEEDUP:g}x), A/D {verdict['A_over_D']:.2f}x (target >= {TARGET_TRL_SPEEDUP:g}x); "
        f"G/C {verdict['G_over_C']:.2f}x (target >= {TARGET_GENERAL_SPEEDUP:g}x); "
        f"A's peak memory / D's {verdict['A_memory_over_D']:.2f} (target <= {TARGET_MEMORY_RATIO:g})"
    )
    print(
        f"padding share over an epoch of {run.padding_examples} realistic examples (target for A, grouped: <= {TARGET_PADDING_SHARE:.0%}):"
    )
    print(format_table(run.padding_rows, ["path", "batch_size", "order", "padding_share", "positions"]))
    print("step time against K rejected responses (A vs C):")
    print(format_table(run.k_rows, ["rejected", "A_step_s", "C_step_s", "C_over_A"]))
    print("step time against response length in tokens, K = 2 (A vs C):")
    print(format_table(run.length_rows, ["response_tokens", "A_step_s", "C_step_s", "C_over_A"]))
    print(
        f"A's achieved rate {achieved / 1e9:.1f} GFLOP/s ({run.step_flops / 1e9:.1f} GFLOP per step) = "
        f"{achieved / ceiling['median']:.0%} of the measured {setup.dtype} matmul rate {ceiling['median'] / 1e9:.1f} GFLOP/s"
    )
    if qwen is not None:
        print(
            f"Qwen2.5-VL-shaped model ({qwen['parameters']:,} parameters, {run.qwen_setup.vocab_size:,}-token vocabulary): {qwen['agreement']}"
        )
        print(
            format_table(
                qwen["results"],
                ["name", "examples_per_s", "examples_per_s_min", "examples_per_s_max", "median_seconds", "G_speedup"],
            )
        )
        print(f"G/C {qwen['G_over_C']:.2f}x on the Qwen2.5-VL-shaped model")
    print(
        f"peak memory of one scoring forward + backward, K = 2 responses of about {SCORING_MEMORY_RESPONSE_TOKENS} tokens (plain vs chunked output layer):"
    )
    print(
        format_table(
            run.memory_rows,
            [
                "setup",
                "path",
                "vocabulary",
                "tokens",
                "step_plain_mb",
                "step_chunked_mb",
                "step_chunked_over_plain",
                "logprobs_plain_mb",
                "logprobs_chunked_mb",
                "logprobs_chunked_over_plain",
            ],
        )
    )
    machine = machine_info()
    print(
        f"machine: {machine.get('cpu_count')} cores, {machine.get('memory_gib')} GiB, torch {machine.get('torch')} "
        f"({machine.get('torch_threads')} threads), load average {run.load_before[0]:.2f} before, {run.load_after[0]:.2f} after; "
        f"{run.parameters:,} parameters, {run.workload.examples} examples per step"
    )


def cpu_results(run: CpuRun, command: str, verdict: dict[str, float], passed: bool) -> dict[str, Any]:
    """The CPU run's JSON results (``--json``)."""
    workload, profile, achieved, ceiling, qwen = run.workload, run.profile, run.achieved, run.ceiling, run.qwen
    return {
        "benchmark": "train",
        "command": command,
        "setup": asdict(run.setup),
        "parameters": run.parameters,
        "workload": {
            "examples_per_step": workload.examples,
            "rejected_per_example": len(workload.sources),
            "prompt_tokens": workload.prompt_lengths,
            "image_tokens": run.setup.image_tokens,
            "response_tokens": workload.response_lengths,
            "tokenizer_vocabulary": run.tokenizer_vocabulary,
            "profile": profile and asdict(profile),
        },
        "load_average": {"before": run.load_before, "after": run.load_after},
        "loss_agreement": asdict(run.agreement),
        "general_loss_agreement": asdict(run.general_agreement),
        "results": run.rows,
        "contenders": {
            row["key"]: {"examples_per_s": row["examples_per_s"], "peak_rss_mb": row["peak_rss_mb"]} for row in run.rows
        },
        "acceptance": {**verdict, "passed": passed},
        "scaling_rejected": run.k_rows,
        "scaling_response_tokens": run.length_rows,
        "padding_share": run.padding_rows,
        "flops": {
            "A_step_flops": run.step_flops,
            "A_flops_per_s": achieved,
            "matmul_flops_per_s": ceiling,
            "fraction": achieved / ceiling["median"],
        },
        "qwen2.5-vl": qwen and {**qwen, "setup": asdict(run.qwen_setup)},
        "scoring_memory": run.memory_rows,
    }


def gpu_row(shape: Setup, key: str, result: dict[str, Any]) -> dict[str, Any]:
    """A table row of one contender's :func:`~benchmarks.train_measure.run_solo` result on a GPU shape."""
    seconds = result["seconds"]
    rates = [result["examples"] / value for value in seconds]
    return {
        "name": f"{shape.name} {key}: {CONTENDERS[key]}",
        "setup": shape.name,
        "key": key,
        "attention": result["attention"],
        "examples_per_s": statistics.median(rates),
        "examples_per_s_min": min(rates),
        "examples_per_s_max": max(rates),
        "tokens_per_s": statistics.median(rates) * result["tokens"] / result["examples"],
        "median_seconds": statistics.median(seconds),
        "flop_utilisation": result["flop_utilisation"],
        "peak_gpu_mb": result.get("peak_gpu_mb"),
        "peak_rss_mb": result["peak_rss_mb"],
    }


def print_gpu_report(
    rows: list[dict[str, Any]], contenders: dict[str, tuple[str, ...]], shapes: dict[str, Setup]
) -> None:
    """The GPU run's table and each contender's rate against C's, per model shape (``shapes``: by family)."""
    columns = [
        "name",
        "attention",
        "examples_per_s",
        "examples_per_s_min",
        "examples_per_s_max",
        "tokens_per_s",
        "flop_utilisation",
        "peak_gpu_mb",
    ]
    print(format_table(rows, columns))
    for family, keys in contenders.items():
        shape = shapes[family].name
        rate = {row["key"]: row["examples_per_s"] for row in rows if row["setup"] == shape}
        print(f"{shape}: " + ", ".join(f"{key}/C {rate[key] / rate['C']:.2f}x" for key in keys if key != "C"))
