"""Preference training steps: mmsafe BPO against the release's recipe and TRL's DPOTrainer.

Every contender trains on the same examples (prompt + image + chosen + K rejected: the
human one and the blind one), with the same frozen vision tower, the same AdamW and the
same learning rate, in fp32 on CPU. One repetition is one optimizer step over a batch
of ``--batch-size`` examples: forward, loss, backward, AdamW step.

* ``A``: mmsafe BPO, shared prefix (image and prompt once per example, all responses in
  one block-masked row), reference log-probs precomputed once before training;
* ``B``: mmsafe BPO, shared prefix, online reference (a frozen copy run every step);
* ``C``: the release's form: K DPO rows per example, every (prompt, response) sequence
  encoded alone with its own image pass, online reference (mmsafe's ``separate`` layout
  with a frozen copy; the loss is the same sum of K DPO terms);
* ``D``: TRL's ``DPOTrainer`` on the two-row data (one row per (chosen, rejected) pair),
  online reference model (``precompute_ref_log_probs`` off, as the release runs);
* ``G``: mmsafe BPO, the general path (``prompt-cache``: the prompt and image once per
  example, the responses as one batch against its key/value cache), cached reference;
* ``P``: mmsafe BPO, one row per response (``per-response``, the fallback), cached reference.

A second, Qwen2.5-VL-shaped model (M-RoPE, windowed vision tower, 152k vocabulary) runs
G, P and C (``--skip-qwen`` leaves it out).

Each step goes through the trainer's own ``training_step`` (``PreferenceTrainer`` for
A-C, ``DPOTrainer`` for D); batches are collated once beforehand, so data loading and
image decoding are not timed for anyone. Gradient checkpointing is off for all four
(TRL turns it on by default; it trades time for memory, and mmsafe's default is off).

Besides the rates, the run checks that A and C give the same per-example BPO loss and
that TRL's DPO loss equals mmsafe's mean DPO term, on a policy moved away from the
reference so that the losses are not trivially log 2; measures each contender's peak
resident memory in a fresh subprocess; times A against C for K = 1, 2, 4 rejected
responses and for several response lengths; and reports A's achieved FLOP/s (counted by
``torch.utils.flop_counter``) as a fraction of the measured fp32 matmul FLOP/s.

The CPU model is LLaVA-shaped with random weights: 224-pixel images in 14-pixel patches
(256 image tokens), a 4-layer vision tower, a 4-layer language model of width 512 and a
32,000-token output vocabulary. The BPE tokenizer is trained on the benchmark's own text
and is smaller; the embedding and output matrices are padded to 32,000 rows, so the
per-token cost of the language-model head is that of a 32k vocabulary. ``--gpu`` uses a
LLaVA-1.5-7B-shaped model (336-pixel images, 576 image tokens, bf16) instead and runs
each contender alone in its own process (four 7B trainers do not fit on one device).

    python -m benchmarks.train [--quick] [--json PATH] [--gpu [--tiny]] [--threads N] [--batch-size N] [--skip-qwen] [--workload realistic|uniform]

The main comparison runs on the realistic workload (``--workload realistic``, the
default; see :class:`LengthProfile`): dialogues of up to four turns around the image,
human responses of median 35 and 90th percentile 110 tokens, blind answers of 100 to 300
tokens, K = 2. The K and response-length sweeps use uniform lengths. The padding share
is measured over an epoch of realistic examples at batch sizes 1, 4 and 8, with the
training's length grouping and in random order.

``--quick`` uses a smaller model of the same proportions, and lengths a quarter as long
(a few minutes); ``--gpu --tiny`` runs the ``--gpu`` code at a tiny shape (on the CPU
without a GPU). The exit status is 0 when the targets are met (A: 4x C's and 6x D's
examples/s at most 0.5 of D's peak memory, padding share at most 10%; G: 2x C's on the
LLaVA shape, 3x on the Qwen2.5-VL shape; chunked log-probs at most a quarter of the plain
computation's peak scoring memory at the 152k vocabulary), 2 when one is missed, 1 when
the step-0 losses disagree.

The code: the workload in :mod:`benchmarks.train_workload`, the model shapes in
:mod:`benchmarks.train_models`, the contenders and the loss check in
:mod:`benchmarks.train_variants`, the measurements in :mod:`benchmarks.train_measure`,
the targets and the report in :mod:`benchmarks.train_report`; this module is the
command line and the order of a run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from dataclasses import asdict, replace
from typing import Any

from benchmarks.harness import base_parser, machine_info, run_alternating, write_results
from benchmarks.train_measure import (
    PADDING_EXAMPLES,
    count_step_flops,
    matmul_flops_per_s,
    measure_scoring_memory,
    padding_shares,
    run_solo,
    scaling,
    scoring_memory,
    solo_in_subprocess,
)
from benchmarks.train_models import (
    CPU_SETUP,
    GPU_SETUP,
    QUICK_SETUP,
    QWEN_CPU_SETUP,
    QWEN_GPU_SETUP,
    QWEN_QUICK_SETUP,
    QWEN_TINY_SETUP,
    TINY_SETUP,
    Setup,
    prepare,
)
from benchmarks.train_report import CpuRun, acceptance, cpu_results, gpu_row, print_cpu_report, print_gpu_report
from benchmarks.train_variants import CONTENDERS, QWEN_CONTENDERS, check_losses, make_contender
from benchmarks.train_workload import QUICK_REALISTIC, REALISTIC, LengthProfile

#: The contenders of the --gpu run on each model (TRL on the LLaVA shape, as on CPU).
GPU_CONTENDERS = {"llava": ("A", "G", "C", "D"), "qwen2.5-vl": ("G", "C")}


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--gpu",
        action="store_true",
        help="LLaVA-1.5-7B- and Qwen2.5-VL-7B-shaped models in bf16 on a CUDA device, each contender in its own process",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="with --gpu: the same code path at a tiny shape, on CPU when no GPU is present (a smoke test)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        help="examples per optimizer step (default 1, the release's per-device batch; quick 2)",
    )
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads (default: torch's own choice); 1 is steadier on a busy machine"
    )
    parser.add_argument("--skip-qwen", action="store_true", help="CPU runs: leave out the Qwen2.5-VL-shaped model")
    parser.add_argument(
        "--workload",
        choices=["realistic", "uniform"],
        default="realistic",
        help="realistic (default): multi-turn prompts and response lengths drawn as in the released data, with long blind answers; "
        "uniform: every prompt and response of the setup's length (the K and length sweeps always use uniform lengths)",
    )
    parser.add_argument(
        "--solo", choices=sorted(CONTENDERS), help=argparse.SUPPRESS
    )  # internal: one contender in a fresh process
    parser.add_argument(
        "--family", choices=["llava", "qwen2.5-vl"], default="llava", help=argparse.SUPPRESS
    )  # internal, with --solo
    parser.add_argument(
        "--scoring-memory", choices=["plain", "chunked"], help=argparse.SUPPRESS
    )  # internal: one measurement in a fresh process
    args = parser.parse_args(argv)
    args.command = " ".join(["python -m benchmarks.train", *(sys.argv[1:] if argv is None else argv)])
    llava_setup, qwen_setup = setups_for(args)
    repetitions = args.repetitions or 5

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    if args.gpu and not args.tiny and not torch.cuda.is_available():
        print("error: --gpu needs a CUDA device (--gpu --tiny runs its code path on CPU)", file=sys.stderr)
        return 1
    if args.scoring_memory:
        print(
            json.dumps(scoring_memory(qwen_setup if args.family == "qwen2.5-vl" else llava_setup, args.scoring_memory))
        )
        return 0
    if args.solo:
        setup = qwen_setup if args.family == "qwen2.5-vl" else llava_setup
        print(json.dumps(run_solo(args.solo, setup, repetitions, flops=args.gpu, profile=profile_for(args))))
        return 0
    if args.gpu:
        return run_gpu(args, llava_setup, qwen_setup, repetitions)
    return run_cpu(args, llava_setup, qwen_setup, repetitions)


def profile_for(args: argparse.Namespace) -> LengthProfile | None:
    """The length profile of the main comparison: None for uniform lengths; shorter for --quick and --tiny."""
    if args.workload == "uniform":
        return None
    if args.tiny:
        return replace(REALISTIC, scale=0.1)
    return QUICK_REALISTIC if args.quick else REALISTIC


def setups_for(args: argparse.Namespace) -> tuple[Setup, Setup]:
    """(the LLaVA-shaped setup, the Qwen2.5-VL-shaped setup) of this run's flags."""
    if args.tiny:
        llava, qwen = TINY_SETUP, QWEN_TINY_SETUP
        if args.gpu:
            device = "cuda" if _cuda_available() else "cpu"
            llava, qwen = (
                replace(setup, device=device, dtype="bfloat16" if device == "cuda" else "float32")
                for setup in (llava, qwen)
            )
    elif args.gpu:
        llava, qwen = GPU_SETUP, QWEN_GPU_SETUP
    elif args.quick:
        llava, qwen = QUICK_SETUP, QWEN_QUICK_SETUP
    else:
        llava, qwen = CPU_SETUP, QWEN_CPU_SETUP
    if args.batch_size:
        llava, qwen = replace(llava, batch_size=args.batch_size), replace(qwen, batch_size=args.batch_size)
    return llava, qwen


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def run_cpu(args: argparse.Namespace, setup: Setup, qwen_setup: Setup, repetitions: int) -> int:
    import torch

    torch.manual_seed(0)
    load_before = os.getloadavg()
    profile = profile_for(args)
    processor, model, workload = prepare(setup, profile=profile)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    agreement = check_losses(copy.deepcopy(model), workload, setup)
    general_agreement = check_losses(copy.deepcopy(model), workload, setup, fast="G", with_trl=False)
    print(f"loss agreement at step 0: {agreement.describe()}; {general_agreement.describe()}")

    contenders = {key: make_contender(key, copy.deepcopy(model), workload, setup) for key in CONTENDERS}
    measured = run_alternating(
        {key: contender.step for key, contender in contenders.items()}, repetitions=repetitions, warmup=1
    )
    step_flops = count_step_flops(contenders["A"])
    del contenders
    ceiling = matmul_flops_per_s(setup)

    memory = {key: solo_in_subprocess(key, args, repetitions=2) for key in CONTENDERS}
    rows = []
    for key, name in CONTENDERS.items():
        row = measured[key].summary("examples")
        row.update(
            name=f"{key}: {name}",
            key=key,
            peak_rss_mb=memory[key]["peak_rss_mb"],
            rss_before_contender_mb=memory[key]["rss_before_contender_mb"],
        )
        row["A_speedup"] = measured[key].median_seconds / measured["A"].median_seconds
        rows.append(row)
    sweep_repetitions = 3 if args.quick else 5
    half, base = setup.response_tokens // 2, setup.response_tokens
    response_lengths = [half, base, 2 * base] if args.quick else [half, base, 2 * base, 4 * base]
    k_rows = scaling(model, processor, setup, values=[1, 2, 4], vary="rejected", repetitions=sweep_repetitions)
    length_rows = scaling(
        model, processor, setup, values=response_lengths, vary="response_tokens", repetitions=sweep_repetitions
    )
    padding_examples = 100 if args.quick else PADDING_EXAMPLES
    padding_rows = padding_shares(processor, model, setup, profile or REALISTIC, examples=padding_examples)
    del model

    qwen = None if args.skip_qwen else run_qwen_cpu(qwen_setup, repetitions, profile)
    memory_rows = measure_scoring_memory(args, ["llava"] if args.skip_qwen else ["llava", "qwen2.5-vl"])
    load_after = os.getloadavg()

    run = CpuRun(
        setup=setup, qwen_setup=qwen_setup, parameters=parameters, workload=workload, tokenizer_vocabulary=len(processor.tokenizer), profile=profile,
        load_before=load_before, load_after=load_after, agreement=agreement, general_agreement=general_agreement, rows=rows, step_flops=step_flops,
        ceiling=ceiling, k_rows=k_rows, length_rows=length_rows, padding_rows=padding_rows, padding_examples=padding_examples, qwen=qwen,
        memory_rows=memory_rows,
    )  # fmt: skip
    verdict, passed = acceptance(run)
    print_cpu_report(run, verdict)
    write_results(args.json, cpu_results(run, args.command, verdict, passed))
    if not agreement.agrees or not general_agreement.agrees or (qwen is not None and not qwen["agrees"]):
        print("error: the contenders disagree on the step-0 loss", file=sys.stderr)
        return 1
    return 0 if passed else 2


def run_qwen_cpu(setup: Setup, repetitions: int, profile: LengthProfile | None = None) -> dict[str, Any]:
    """G, P and C on the Qwen2.5-VL-shaped model, alternating; G's loss checked against C's."""
    _processor, model, workload = prepare(setup, profile=profile)
    agreement = check_losses(copy.deepcopy(model), workload, setup, fast="G", with_trl=False)
    contenders = {key: make_contender(key, copy.deepcopy(model), workload, setup) for key in QWEN_CONTENDERS}
    measured = run_alternating(
        {key: contender.step for key, contender in contenders.items()}, repetitions=repetitions, warmup=1
    )
    rows = []
    for key in QWEN_CONTENDERS:
        row = measured[key].summary("examples")
        row.update(
            name=f"{key}: {CONTENDERS[key]}",
            key=key,
            G_speedup=measured[key].median_seconds / measured["G"].median_seconds,
        )
        rows.append(row)
    by_key = {row["key"]: row for row in rows}
    return {
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
        "prompt_tokens": workload.prompt_lengths,
        "response_tokens": workload.response_lengths,
        "agreement": agreement.describe(),
        "agrees": agreement.agrees,
        "results": rows,
        "G_over_C": by_key["G"]["examples_per_s"] / by_key["C"]["examples_per_s"],
    }


def run_gpu(args: argparse.Namespace, setup: Setup, qwen_setup: Setup, repetitions: int) -> int:
    """Each contender alone in a fresh process (the 7B trainers do not fit side by side)."""
    shapes = {"llava": setup, "qwen2.5-vl": qwen_setup}
    rows = []
    for family, keys in GPU_CONTENDERS.items():
        shape = shapes[family]
        for key in keys:
            if args.tiny:  # tiny models fit side by side: one process saves a library import per contender
                result = run_solo(key, shape, repetitions, flops=True, profile=profile_for(args))
            else:
                result = solo_in_subprocess(key, args, repetitions=repetitions, family=family)
            rows.append(gpu_row(shape, key, result))
    print_gpu_report(rows, GPU_CONTENDERS, shapes)
    machine = machine_info()
    write_results(
        args.json,
        {
            "benchmark": "train-gpu",
            "command": args.command,
            "setups": [asdict(setup), asdict(qwen_setup)],
            "machine": machine,
            "results": rows,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
