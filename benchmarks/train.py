"""BPO training steps: shared-prefix forward with cached reference log-probs against the
release's form (one row per (chosen, rejected) pair, each sequence encoded alone, and a
second model run for the reference).

One step = policy forward + loss + backward + optimizer step over a batch of examples,
each with a chosen and two rejected responses (human, blind), as BPO trains. Four
contenders cross the two choices that differ:

* forward: ``shared-prefix`` (image and prompt once per example, all responses in one
  block-masked row) or ``separate`` (the release: 2 x K sequences per example);
* reference: ``cached`` (log-probs computed once before training and read from the
  batch) or ``copy`` (a frozen copy of the model run on every step).

All four compute the same loss; the benchmark asserts it. The model is the tiny LLaVA
architecture widened, with 224-pixel images: 256 image tokens, so that, as with
LLaVA-1.5's 576, image tokens dominate the prompt. Its weights are random, which does
not matter for speed.

    python -m benchmarks.train [--quick] [--json PATH]
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

from benchmarks.harness import base_parser, format_table, run_alternating, write_results

BLIND_ANSWERS = (
    "Sure, I cannot see a picture, but in general you just go ahead and do it.",
    "Here is a general way: plan it, then act when nobody is looking.",
)


def build_spec():
    from mmsafe.models.tiny import TinyModelSpec

    return TinyModelSpec(
        image_size=224,
        patch_size=14,
        vision_hidden_size=64,
        vision_layers=2,
        vision_heads=4,
        text_hidden_size=256,
        text_intermediate_size=704,
        text_layers=4,
        text_heads=8,
        vocab_size=1024,
        max_position_embeddings=2048,
    )


def build_items(processor, count: int):
    """``count`` sample records with a blind second rejected response, as dataset items."""
    from mmsafe.data.sample import sample_records, write_sample
    from mmsafe.train.data import PreferenceDataset, PreferenceEncoder, prepare_examples

    folder = Path(tempfile.mkdtemp(prefix="mmsafe-bench-train-"))
    write_sample(folder)
    records = sample_records()[:count]
    for index, record in enumerate(records):
        record.rejected.append(BLIND_ANSWERS[index % len(BLIND_ANSWERS)])
        record.rejected_sources.append("blind")
    encoder = PreferenceEncoder(processor, folder, max_length=768)
    prepared = prepare_examples(records, encoder)
    dataset = PreferenceDataset(prepared.examples, encoder)
    return [dataset[index] for index in range(len(dataset))], prepared.sources


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=4, help="examples per step (default 4)")
    args = parser.parse_args(argv)
    repetitions = args.repetitions or (3 if args.quick else 5)

    import torch

    from mmsafe.models.tiny import build_tiny_llava, build_tiny_processor
    from mmsafe.train.data import PreferenceCollator
    from mmsafe.train.forward import score_batch
    from mmsafe.train.losses import bpo_loss

    # One thread: on a shared machine a two-thread op waits for its slower thread, and the
    # timings scatter tenfold; one thread keeps the contenders comparable.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    spec = build_spec()
    processor = build_tiny_processor(spec)
    policy = build_tiny_llava(processor, spec, seed=0)
    policy.model.vision_tower.requires_grad_(False)  # frozen, as in the recipe
    reference_model = copy.deepcopy(policy).eval().requires_grad_(False)
    with torch.no_grad():  # a reference unlike the policy, so that equal losses mean something
        for parameter in reference_model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    parameters = sum(parameter.numel() for parameter in policy.parameters())
    optimizer = torch.optim.SGD([parameter for parameter in policy.parameters() if parameter.requires_grad], lr=0.0)  # lr 0: every step sees the same weights
    items, sources = build_items(processor, args.batch_size)
    pad = processor.tokenizer.pad_token_id
    batches = {mode: PreferenceCollator(pad, sources, mode=mode)(items) for mode in ("shared-prefix", "separate")}
    with torch.no_grad():
        cached = score_batch(reference_model, batches["shared-prefix"])

    losses: dict[str, list[float]] = {}

    def step(mode: str, reference: str) -> float:
        batch = batches[mode]
        scores = score_batch(policy, batch)
        if reference == "cached":
            reference_scores = cached
        else:
            with torch.no_grad():
                reference_scores = score_batch(reference_model, batch)
        result = bpo_loss(scores.chosen, scores.rejected, reference_scores.chosen, reference_scores.rejected, beta=0.1, rejected_mask=scores.rejected_mask)
        optimizer.zero_grad()
        result.loss.backward()
        optimizer.step()
        losses.setdefault(f"{mode}/{reference}", []).append(result.loss.item())
        return float(args.batch_size)

    contenders = {
        "shared-prefix + cached reference (mmsafe default)": lambda: step("shared-prefix", "cached"),
        "shared-prefix + frozen copy": lambda: step("shared-prefix", "copy"),
        "separate + cached reference": lambda: step("separate", "cached"),
        "separate + frozen copy (the release's form)": lambda: step("separate", "copy"),
    }
    measurements = run_alternating(contenders, repetitions=repetitions, warmup=1)
    values = [value for series in losses.values() for value in series]
    spread = max(values) - min(values)
    assert spread < 1e-4, f"the contenders disagree on the loss by {spread}"
    rows = [measurement.summary("examples") for measurement in measurements.values()]
    baseline = measurements["separate + frozen copy (the release's form)"].median_seconds
    for row, measurement in zip(rows, measurements.values(), strict=True):
        row["speedup"] = baseline / measurement.median_seconds
    lengths = {mode: tuple(batch["input_ids"].shape) for mode, batch in batches.items()}
    print(format_table(rows, ["name", "examples_per_s", "examples_per_s_min", "examples_per_s_max", "speedup"]))
    print(f"batch input shapes: {lengths}; loss {values[0]:.6f} in every contender (spread {spread:.1e}); {parameters:,} parameters")
    write_results(
        args.json,
        {
            "benchmark": "train",
            "batch_size": args.batch_size,
            "input_shapes": lengths,
            "parameters": parameters,
            "loss": values[0],
            "loss_spread": spread,
            "results": rows,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
