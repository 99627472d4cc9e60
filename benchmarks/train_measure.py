"""The training benchmark's measurements: step times, memory, FLOPs and padding, alone or in a fresh process.

Peak memory is a process's high-water mark, which never goes down, so each
measurement of it runs in a fresh ``python -m benchmarks.train`` process
(:func:`solo_in_subprocess`, :func:`scoring_memory_in_subprocess`).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from benchmarks.harness import current_rss_mb, peak_rss_mb, reset_peak_rss, run_alternating
from benchmarks.train_models import Setup, attention_for, prepare
from benchmarks.train_variants import CONTENDERS, FORWARD_MODES, Contender, make_contender
from benchmarks.train_workload import LengthProfile, build_workload, move

#: Examples whose grouped batches give the padding share.
PADDING_EXAMPLES = 400
PADDING_BATCH_SIZES = (1, 4, 8)


def padding_shares(
    processor: Any, model: Any, setup: Setup, profile: LengthProfile, *, examples: int = PADDING_EXAMPLES, seed: int = 1
) -> list[dict[str, Any]]:
    """Share of padding positions over one epoch of ``examples`` drawn from ``profile``.

    For the default path (packed rows) and the general path (prompt-cache), at several
    batch sizes, with the training's length grouping (``group_by_length``, on by default)
    and without it (random order): what the ``batch/padding_share`` metric of
    ``mmsafe train`` averages to over the epoch.
    """
    import torch

    from mmsafe.train.data import PreferenceCollator
    from mmsafe.train.forward import response_groups, response_positions
    from mmsafe.train.hf_trainer import EpochLengthGroupedSampler, example_length
    from mmsafe.train.scoring import padding_share

    def positions(batch: dict[str, Any]) -> tuple[float, float]:
        if "prompt_cache_rows" not in batch:
            return padding_share(batch)
        # What prompt-cache runs on a plain dynamic cache (the LLaVA shape's): each example's
        # responses in batches of similar length against its unpadded prompt.
        padded = total = 0.0
        for row in batch["prompt_cache_rows"]:
            lengths = (row["responses"]["labels"] != -100).sum(1).tolist()
            row_padded, row_total = response_positions(lengths, response_groups(lengths))
            padded, total = padded + row_padded, total + row_total + row["prompt"]["input_ids"].numel()
        return padded, total

    workload = build_workload(processor, model, setup, examples=examples, num_rejected=2, seed=seed, profile=profile)
    lengths = [example_length(item["example"]) for item in workload.items]
    rows = []
    for key in ("A", "G"):
        collator = PreferenceCollator(
            workload.pad_token_id, workload.sources, mode=FORWARD_MODES[key], encoder=workload.encoder
        )
        for batch_size in PADDING_BATCH_SIZES:
            orders = {
                "grouped": list(EpochLengthGroupedSampler(batch_size, lengths, seed=0)),
                "random": torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist(),
            }
            for grouping, order in orders.items():
                padded = total = 0.0
                for start in range(0, len(order), batch_size):
                    batch_padded, batch_total = positions(
                        collator([workload.items[index] for index in order[start : start + batch_size]])
                    )
                    padded, total = padded + batch_padded, total + batch_total
                rows.append(
                    {
                        "path": f"{key}: {CONTENDERS[key]}",
                        "key": key,
                        "batch_size": batch_size,
                        "order": grouping,
                        "padding_share": padded / total,
                        "positions": int(total),
                    }
                )
    return rows


def matmul_flops_per_s(setup: Setup, repetitions: int = 5) -> dict[str, float]:
    """The machine's dense matmul rate (median and max over ``repetitions``) in the benchmark's dtype."""
    import torch

    size = 2048 if setup.device == "cpu" else 8192
    dtype = getattr(torch, setup.dtype)
    left = torch.randn(size, size, device=setup.device).to(dtype)
    right = torch.randn(size, size, device=setup.device).to(dtype)
    rates = []
    for _ in range(repetitions + 1):
        _synchronize(setup)
        start = time.perf_counter()
        for _ in range(4):
            left @ right
        _synchronize(setup)
        rates.append(4 * 2 * size**3 / (time.perf_counter() - start))
    rates = rates[1:]  # the first round warms up
    return {"median": statistics.median(rates), "max": max(rates), "size": size}


def _synchronize(setup: Setup) -> None:
    if setup.device == "cuda":
        import torch

        torch.cuda.synchronize()


def count_step_flops(contender: Contender) -> float:
    """FLOPs of one optimizer step (forward + backward; AdamW's elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        contender.step()
    return float(counter.get_total_flops())


def scaling(
    model: Any, processor: Any, setup: Setup, *, values: list[int], vary: str, repetitions: int
) -> list[dict[str, Any]]:
    """A against C with ``vary`` ("rejected" or "response_tokens") set to each of ``values``."""
    rows = []
    for value in values:
        workload = build_workload(
            processor,
            model,
            setup,
            examples=setup.batch_size,
            num_rejected=value if vary == "rejected" else 2,
            response_tokens=value if vary == "response_tokens" else None,
        )
        contenders = {key: make_contender(key, copy.deepcopy(model), workload, setup) for key in ("A", "C")}
        measured = run_alternating(
            {key: contender.step for key, contender in contenders.items()}, repetitions=repetitions, warmup=1
        )
        a_seconds, c_seconds = measured["A"].median_seconds, measured["C"].median_seconds
        rows.append({vary: value, "A_step_s": a_seconds, "C_step_s": c_seconds, "C_over_A": c_seconds / a_seconds})
        del contenders
    return rows


def run_solo(
    key: str, setup: Setup, repetitions: int, *, flops: bool = False, profile: LengthProfile | None = None
) -> dict[str, Any]:
    """One contender alone in this (fresh) process: step times, peak memory, and (``flops``) its FLOP rate."""
    import torch

    attention = attention_for(key, setup)
    _, model, workload = prepare(setup, attention=attention, profile=profile)
    baseline = peak_rss_mb()
    contender = make_contender(key, model, workload, setup)
    del model
    if setup.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(1 + repetitions):
        _synchronize(setup)
        start = time.perf_counter()
        contender.step()
        _synchronize(setup)
        seconds.append(time.perf_counter() - start)
    result = {
        "key": key,
        "setup": setup.name,
        "attention": attention,
        "seconds": seconds[1:],
        "peak_rss_mb": peak_rss_mb(),
        "rss_before_contender_mb": baseline,
        "examples": workload.examples,
        "tokens": workload.tokens(),
    }
    if setup.device == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if flops:
        step_flops = count_step_flops(contender)
        ceiling = matmul_flops_per_s(setup)
        result.update(
            step_flops=step_flops,
            matmul_flops_per_s=ceiling["median"],
            flop_utilisation=step_flops / statistics.median(seconds[1:]) / ceiling["median"],
        )
    return result


#: Response tokens of the scoring-memory measurement (about a long blind answer of a 7B model).
SCORING_MEMORY_RESPONSE_TOKENS = 160


def scoring_memory(setup: Setup, head: str) -> dict[str, Any]:
    """Peak memory of one scoring forward + backward in this (fresh) process, output layer ``plain`` or ``chunked``.

    The mmsafe path of the setup's family (shared prefix on LLaVA, prompt-cache on
    Qwen2.5-VL), K = 2 responses of about 160 tokens: the memory above what the model, its
    batch and the libraries hold before the forward.
    """
    import torch

    from mmsafe.train import forward
    from mmsafe.train.data import PreferenceCollator

    _, model, workload = prepare(setup, response_tokens=SCORING_MEMORY_RESPONSE_TOKENS)
    key = "G" if setup.family == "qwen2.5-vl" else "A"
    collator = PreferenceCollator(
        workload.pad_token_id, workload.sources, mode=FORWARD_MODES[key], encoder=workload.encoder
    )
    batch = move(collator(workload.items), setup.device)
    if head == "plain":
        forward.chunked_head = lambda model: None  # this process only
    model.train()
    model.requires_grad_(True)
    if setup.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated() / 2**20
    else:
        if not reset_peak_rss():
            raise RuntimeError("peak memory cannot be reset here (needs Linux /proc/self/clear_refs)")
        start = current_rss_mb()

    def peak_above(start: float) -> float:
        return (torch.cuda.max_memory_allocated() / 2**20 if setup.device == "cuda" else peak_rss_mb()) - start

    scores = forward.score_batch(model, batch)
    (scores.chosen.sum() + scores.rejected[scores.rejected_mask].sum()).backward()
    step = peak_above(start)
    # The log-prob computation alone: the output layer on the response positions' hidden
    # states (taken from the model once, without gradients), forward and backward to the
    # hidden states, the layer frozen (as under LoRA; a trainable layer adds its weight's
    # gradient, the same for both).
    output_layer = model.get_output_embeddings()
    with torch.no_grad(), forward.head_inputs(output_layer) as captured:
        model(
            **{
                name: value
                for name, value in batch.items()
                if name in ("input_ids", "pixel_values", "attention_mask", "image_grid_thw", "mm_token_type_ids")
            }
            if key == "A"
            else batch["prompt_cache_rows"][0]["prompt"]
        )
    tokens = sum(workload.response_lengths)
    hidden = captured[0].reshape(-1, captured[0].shape[-1])[:1].expand(tokens, -1).contiguous().requires_grad_()
    labels = torch.randint(0, setup.vocab_size, (tokens,), device=hidden.device)
    model.zero_grad(set_to_none=True)
    output_layer.requires_grad_(False)
    if setup.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated() / 2**20
    else:
        reset_peak_rss()
        start = current_rss_mb()
    if head == "plain":
        from mmsafe.train.losses import token_logprobs

        values = token_logprobs(output_layer(hidden).unsqueeze(0), labels.unsqueeze(0))[0]
    else:
        from mmsafe.train.losses import chunked_token_logprobs

        values = chunked_token_logprobs(hidden, output_layer.weight, output_layer.bias, labels)
    values.sum().backward()
    return {
        "setup": setup.name,
        "head": head,
        "path": FORWARD_MODES[key],
        "vocabulary": setup.vocab_size,
        "response_tokens": workload.response_lengths,
        "scoring_peak_mb": step,
        "logprob_peak_mb": peak_above(start),
        "logprob_tokens": tokens,
    }


def scoring_memory_in_subprocess(args: argparse.Namespace, family: str, head: str) -> dict[str, Any]:
    """:func:`scoring_memory` in a fresh Python process with the same settings as this run."""
    return _in_subprocess(["--scoring-memory", head, "--family", family], args, f"scoring memory ({family}, {head})")


def measure_scoring_memory(args: argparse.Namespace, families: list[str]) -> list[dict[str, Any]]:
    """Plain against chunked output layer, each in a fresh process, per model family: peak scoring memory and the ratio."""
    rows = []
    for family in families:
        plain = scoring_memory_in_subprocess(args, family, "plain")
        chunked = scoring_memory_in_subprocess(args, family, "chunked")
        rows.append(
            {
                "setup": plain["setup"],
                "path": plain["path"],
                "vocabulary": plain["vocabulary"],
                "tokens": plain["logprob_tokens"],
                "step_plain_mb": plain["scoring_peak_mb"],
                "step_chunked_mb": chunked["scoring_peak_mb"],
                "step_chunked_over_plain": chunked["scoring_peak_mb"] / plain["scoring_peak_mb"],
                "logprobs_plain_mb": plain["logprob_peak_mb"],
                "logprobs_chunked_mb": chunked["logprob_peak_mb"],
                "logprobs_chunked_over_plain": chunked["logprob_peak_mb"] / plain["logprob_peak_mb"],
            }
        )
    return rows


def solo_in_subprocess(
    key: str, args: argparse.Namespace, repetitions: int, *, family: str = "llava"
) -> dict[str, Any]:
    """:func:`run_solo` in a fresh Python process with the same settings as this run."""
    return _in_subprocess(
        ["--solo", key, "--family", family, "--repetitions", str(repetitions)], args, f"contender {key} ({family})"
    )


def _in_subprocess(mode: list[str], args: argparse.Namespace, what: str) -> dict[str, Any]:
    """``python -m benchmarks.train <mode>`` with this run's shape flags; the JSON line it prints."""
    command = [sys.executable, "-m", "benchmarks.train", *mode]
    for flag in ("gpu", "quick", "tiny"):
        if getattr(args, flag):
            command.append(f"--{flag}")
    for option in ("batch_size", "threads", "workload"):
        if getattr(args, option) is not None:
            command += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    completed = subprocess.run(
        command, capture_output=True, text=True, check=False, env={**os.environ, "MMSAFE_PROGRESS": "0"}
    )
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(f"{what} failed in its subprocess:\n{completed.stderr[-3000:]}")
    return json.loads(lines[-1])
