"""Batched generation against a batch-1 loop: responses per second at 96 new tokens.

Both contenders are the in-process engine on the same model and prompts, one with
``batch_size=16`` (left padding, length-grouped batches) and one with ``batch_size=1``
(what the release does: one prompt at a time). End-of-sequence is suppressed for the
first 96 tokens in both (``min_new_tokens = max_new_tokens = 96``), so every response is
exactly 96 tokens long and both do the same work. Greedy outputs are asserted identical.
A third contender is ``batch_size="auto"`` (on a CPU: a fixed 16; on CUDA: from 64, halved
on out-of-memory), also asserted identical. The prompt padding share of the batched run
(left padding of length-grouped batches) is reported (target <= 10%).

Where ``vllm`` is importable (a CUDA machine with ``mmsafe[serve]``), a last section saves
the model, runs vLLM's offline engine on it beside the in-process engine on CUDA, and
reports both rates and how many greedy answers agree; elsewhere it prints that it was skipped.

The model is the tiny LLaVA architecture widened so that the measurement is about model
compute, not Python overhead alone (see ``SPEC``); its weights are random, which does not
matter for speed.

    python -m benchmarks.generate [--quick] [--json PATH]
"""

from __future__ import annotations

import sys
from dataclasses import asdict

from benchmarks.harness import base_parser, format_table, machine_info, run_alternating, write_results

NEW_TOKENS = 96
BATCH_SIZE = 16
TARGET_SPEEDUP = 4.0
TARGET_PADDING_SHARE = 0.10
OUTPUT_VOCABULARY = 32_000


def build_spec():
    from mmsafe.models.tiny import TinyModelSpec

    # A 4-layer, width-512 language model behind a small vision tower, with a 32k output
    # layer (see build_model): 46M parameters, 180 MB in fp32, far more than the CPU caches
    # hold, so a batch-1 decoding step is bound by reading the weights, as a 7B model's is
    # on a GPU; a small model whose weights stay cached is compute-bound on one row already,
    # which understates what batching buys.
    return TinyModelSpec(
        image_size=56,
        patch_size=14,
        vision_hidden_size=64,
        vision_layers=2,
        vision_heads=4,
        text_hidden_size=512,
        text_intermediate_size=1408,
        text_layers=4,
        text_heads=8,
        vocab_size=1024,
        max_position_embeddings=1024,
    )


def build_model():
    import torch

    from mmsafe.models.loading import LoadedModel
    from mmsafe.models.tiny import build_tiny_llava, build_tiny_processor

    spec = build_spec()
    processor = build_tiny_processor(spec)
    model = build_tiny_llava(processor, spec, seed=0).eval()
    # A real assistant's output layer has a ~32k vocabulary (LLaVA-1.5: 32,064), and at
    # width 512 that layer holds most of the weights a decoding step reads. The tokenizer
    # here is small, so the layer is padded to 32,000 rows; the padding rows are zero, so
    # their logits (0) never beat the largest real one and decoding stays in the vocabulary.
    tokens = len(processor.tokenizer)
    model.resize_token_embeddings(OUTPUT_VOCABULARY, mean_resizing=False)
    with torch.no_grad():
        model.get_output_embeddings().weight[tokens:].zero_()
    parameters = sum(parameter.numel() for parameter in model.parameters())
    return LoadedModel(model=model, processor=processor, name="tiny-llava-wide"), spec, parameters


def build_requests(count: int):
    """Prompts of varied length (1 to 4 turns), each with an image, as in MMSafe-PO."""
    from PIL import Image

    from mmsafe.data.records import Message
    from mmsafe.generate.engine import GenerationRequest

    topics = [
        "the person featured in the image",
        "the site visible in the image",
        "the company in the image",
        "the event in the image",
    ]
    requests = []
    for index in range(count):
        history: list[Message] = []
        for turn in range(index % 4):
            history += [
                Message("user", f"Question {turn} about {topics[turn % 4]}?"),
                Message("assistant", "Here is an answer to that."),
            ]
        text = f"<image>\nHow can I get into {topics[index % 4]} " + "without anyone noticing " * (index % 5) + "?"
        image = Image.new("RGB", (40 + 7 * index % 60, 56), ((index * 47) % 256, (index * 11) % 256, 128))
        requests.append(GenerationRequest(id=f"bench-{index}", messages=[*history, Message("user", text)], image=image))
    return requests


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, help="prompts per repetition (default 32, quick 16)")
    parser.add_argument(
        "--batch-size", type=int, default=BATCH_SIZE, help=f"batch size of the batched contender (default {BATCH_SIZE})"
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads (default: torch's choice); 1 keeps a shared, busy machine from stalling parallel regions",
    )
    args = parser.parse_args(argv)
    prompts = args.prompts or (16 if args.quick else 32)
    repetitions = args.repetitions or 5

    import torch

    from mmsafe.generate.engine import DecodingParams
    from mmsafe.generate.hf_engine import HFEngine

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    loaded, spec, parameters = build_model()
    requests = build_requests(prompts)
    params = DecodingParams(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    batched = HFEngine(loaded, batch_size=args.batch_size)
    single = HFEngine(loaded, batch_size=1)
    auto = HFEngine(loaded, batch_size="auto")

    outputs: dict[str, list[str]] = {}

    def contender(name: str, engine: HFEngine):
        def run() -> float:
            outputs[name] = engine.generate(requests, params)
            return float(len(requests))

        return run

    names = {
        f"batched (batch {args.batch_size})": batched,
        "batch-1 loop": single,
        f"batch size auto ({auto.batch_size})": auto,
    }
    results = run_alternating(
        {name: contender(name, engine) for name, engine in names.items()}, repetitions=repetitions, warmup=1
    )
    first, second, third = (outputs[name] for name in names)
    for other in (second, third):
        if first != other:
            differing = sum(a != b for a, b in zip(first, other, strict=True))
            print(
                f"error: greedy outputs differ between the contenders for {differing} of {len(first)} prompts",
                file=sys.stderr,
            )
            return 1
    padding_share = batched.padding.share or 0.0

    # Every response is exactly NEW_TOKENS tokens: checked on one batch with the raw model.
    inputs = batched.processor(
        text=[batched.render(r) for r in requests[:4]],
        images=[batched._prepare_image(r.image) for r in requests[:4]],
        return_tensors="pt",
        padding=True,
    )
    with torch.inference_mode():
        generated = batched.model.generate(**inputs, **batched._generation_kwargs(params))
    assert generated.shape[1] - inputs["input_ids"].shape[1] == NEW_TOKENS

    rows = [measurement.summary("responses") for measurement in results.values()]
    batched_rate, single_rate = (row["responses_per_s"] for row in rows[:2])
    speedup = batched_rate / single_rate
    for row in rows:
        row["tokens_per_s"] = row["responses_per_s"] * NEW_TOKENS
    print(
        format_table(
            rows,
            [
                "name",
                "responses_per_s",
                "responses_per_s_min",
                "responses_per_s_max",
                "tokens_per_s",
                "median_seconds",
                "repetitions",
            ],
        )
    )
    print(
        f"speedup (median rates): {speedup:.2f}x (target >= {TARGET_SPEEDUP:g}x); identical greedy outputs: yes; {len(requests)} prompts x {NEW_TOKENS} new tokens"
    )
    print(
        f"prompt padding share of the batched run: {100 * padding_share:.1f}% (target <= {100 * TARGET_PADDING_SHARE:g}%)"
    )
    vllm_section = compare_vllm(loaded, requests, params, repetitions)
    machine = machine_info()
    print(
        f"machine: {machine.get('cpu_count')} cores, {machine.get('memory_gib')} GiB, torch {machine.get('torch')} ({machine.get('torch_threads')} threads), {machine.get('date')}"
    )
    write_results(
        args.json,
        {
            "benchmark": "generate",
            "command": " ".join(["python -m benchmarks.generate", *(argv if argv is not None else sys.argv[1:])]),
            "prompts": len(requests),
            "new_tokens": NEW_TOKENS,
            "batch_size": args.batch_size,
            "model": {"spec": asdict(spec), "parameters": parameters},
            "results": rows,
            "speedup": speedup,
            "target_speedup": TARGET_SPEEDUP,
            "identical_outputs": True,
            "padding_share": padding_share,
            "target_padding_share": TARGET_PADDING_SHARE,
            "auto_batch_size": auto.batch_size,
            "vllm": vllm_section,
        },
    )
    return 0 if speedup >= TARGET_SPEEDUP and padding_share <= TARGET_PADDING_SHARE else 2


def compare_vllm(loaded, requests, params, repetitions: int) -> dict | None:
    """vLLM's offline engine against the in-process engine on CUDA, same model and prompts; None where vllm is missing."""
    import importlib.util
    import tempfile

    if importlib.util.find_spec("vllm") is None:
        print('vllm section: skipped (vllm is not importable here; pip install "mmsafe[serve]" on a CUDA machine)')
        return None
    import torch

    from mmsafe.generate.hf_engine import HFEngine
    from mmsafe.generate.vllm_engine import VLLMEngine

    if not torch.cuda.is_available():
        print("vllm section: skipped (no CUDA device)")
        return None
    with tempfile.TemporaryDirectory() as directory:
        loaded.model.save_pretrained(directory, safe_serialization=True)
        loaded.processor.save_pretrained(directory)
        hf = HFEngine(directory, dtype="bfloat16", device="cuda", batch_size="auto")
        vllm = VLLMEngine(directory, dtype="bfloat16", max_model_len=1024, gpu_memory_utilization=0.5)
        outputs: dict[str, list] = {}

        def contender(name, engine):
            def run() -> float:
                outputs[name] = engine.generate(requests, params)
                return float(len(requests))

            return run

        engines = {"hf (cuda, batch size auto)": hf, "vllm (offline engine)": vllm}
        results = run_alternating(
            {name: contender(name, engine) for name, engine in engines.items()}, repetitions=repetitions, warmup=1
        )
    rows = [measurement.summary("responses") for measurement in results.values()]
    hf_out, vllm_out = (outputs[name] for name in engines)
    agree = sum(a == b for a, b in zip(hf_out, vllm_out, strict=True))
    print(
        format_table(
            rows,
            ["name", "responses_per_s", "responses_per_s_min", "responses_per_s_max", "median_seconds", "repetitions"],
        )
    )
    speedup = rows[1]["responses_per_s"] / rows[0]["responses_per_s"]
    # bf16 kernels differ between the two, so greedy answers may part after a near tie: reported, not asserted.
    print(f"vllm vs hf: {speedup:.2f}x; identical greedy answers: {agree} of {len(requests)}")
    return {"results": rows, "speedup": speedup, "identical_answers": agree, "prompts": len(requests)}


if __name__ == "__main__":
    raise SystemExit(main())
