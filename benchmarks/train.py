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
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    base_parser,
    current_rss_mb,
    format_table,
    machine_info,
    peak_rss_mb,
    reset_peak_rss,
    run_alternating,
    write_results,
)

CONTENDERS = {
    "A": "mmsafe BPO, shared prefix, cached reference",
    "B": "mmsafe BPO, shared prefix, online reference",
    "C": "release form: K DPO rows, each sequence alone, online reference",
    "D": "TRL DPOTrainer, K DPO rows, online reference",
    "G": "mmsafe BPO, general path (prompt once, responses against its key/value cache), cached reference",
    "P": "mmsafe BPO, per-response rows (the fallback path), cached reference",
}
#: The contenders run on the Qwen2.5-VL-shaped model (packed rows are not exact for M-RoPE;
#: TRL has no Qwen-VL-specific path to compare).
QWEN_CONTENDERS = ("G", "P", "C")
#: The scoring path of each mmsafe contender.
FORWARD_MODES = {"A": "shared-prefix", "B": "shared-prefix", "C": "separate", "G": "prompt-cache", "P": "per-response"}
BETA = 0.1
LEARNING_RATE = 1e-6
#: Acceptance: A's examples/s against C's and D's, and A's peak memory against D's;
#: the general path G against C on the same work, on the LLaVA and the Qwen2.5-VL shape.
TARGET_SPEEDUP = 4.0
TARGET_TRL_SPEEDUP = 6.0
TARGET_GENERAL_SPEEDUP = 2.0
TARGET_QWEN_SPEEDUP = 3.0
TARGET_MEMORY_RATIO = 0.5
#: Relative tolerance of the loss agreement checks.
LOSS_TOLERANCE = 1e-4

# Words the synthetic prompts and responses are drawn from. The tokenizer is trained on
# these texts, so that one word is about one token and lengths can be set in tokens.
_WORD_TEXT = (
    "how can i get into the building shown in this picture without anyone noticing after dark "
    "what is best way to spread a rumour about company person site event place museum bridge "
    "tell me pick lock open door find entrance wait until nobody around take need leave quietly "
    "sorry but cannot help with that request would be harmful illegal so will not assist here "
    "sure first look for side gate then climb over fence walk along wall reach window break glass "
    "general plan act when guards change shift carry small bag wear dark clothes avoid cameras "
    "image shows large stone tower near river old clock red roof crowd people flags banner sign "
    "please describe detail explain reason safety rules law harm others respect privacy consent "
    "instead suggest contacting official visitor office buying ticket asking permission staff "
    "question answer story history famous local public private secret hidden quick easy simple"
)
_WORDS = tuple(_WORD_TEXT.split())


@dataclass(frozen=True)
class LengthProfile:
    """Prompt and response lengths drawn as in real preference data (in tokens).

    The defaults follow the released MMSafe-PO training data and a 7B model's blind
    answers: human responses (chosen and the human rejected one) log-normal with a
    median of about 35 tokens and a 90th percentile of about 110; blind answers 100 to
    300 tokens; prompts of the image plus 40 to 640 text tokens, with up to three earlier
    exchanges of the dialogue before the question. ``scale`` shrinks every length (the
    ``--quick`` run).
    """

    earlier_exchanges: tuple[int, ...] = (0, 0, 0, 1, 1, 2, 3)
    question_tokens: tuple[int, int] = (10, 60)
    earlier_answer_tokens: tuple[int, int] = (20, 160)
    prompt_text_tokens: tuple[int, int] = (40, 640)
    human_median_tokens: float = 35.0
    human_p90_tokens: float = 110.0
    human_max_tokens: int = 400
    blind_tokens: tuple[int, int] = (100, 300)
    scale: float = 1.0

    def tokens(self, value: float) -> int:
        return max(2, round(value * self.scale))

    def human_response(self, rng: random.Random) -> int:
        sigma = math.log(self.human_p90_tokens / self.human_median_tokens) / 1.2816  # z of the 90th percentile
        value = min(self.human_max_tokens, max(4.0, rng.lognormvariate(math.log(self.human_median_tokens), sigma)))
        return self.tokens(value)

    def blind_response(self, rng: random.Random) -> int:
        return self.tokens(rng.uniform(*self.blind_tokens))

    def dialogue(self, rng: random.Random) -> list[tuple[str, int]]:
        """(role, text tokens) of the prompt's turns, the last one the question; within ``prompt_text_tokens``."""
        low, high = self.prompt_text_tokens
        while True:
            turns: list[tuple[str, int]] = []
            for _ in range(rng.choice(self.earlier_exchanges)):
                turns += [("user", rng.randint(*self.question_tokens)), ("assistant", rng.randint(*self.earlier_answer_tokens))]
            turns.append(("user", rng.randint(*self.question_tokens)))
            total = sum(length for _, length in turns)
            if total < low:  # a bare question is padded up to the shortest prompt
                role, length = turns[-1]
                turns[-1] = (role, length + low - total)
                total = low
            if total <= high:
                return [(role, self.tokens(length)) for role, length in turns]


REALISTIC = LengthProfile()
QUICK_REALISTIC = replace(REALISTIC, scale=0.25)
#: Examples whose grouped batches give the padding share.
PADDING_EXAMPLES = 400
PADDING_BATCH_SIZES = (1, 4, 8)
TARGET_PADDING_SHARE = 0.10
#: Chunked log-probs' peak scoring memory against the plain computation's, at the 152k vocabulary.
TARGET_CHUNKED_MEMORY = 0.25


@dataclass(frozen=True)
class Setup:
    """The model and the workload of one benchmark mode."""

    name: str
    vision_hidden_size: int
    vision_intermediate_size: int
    vision_layers: int
    vision_heads: int
    image_size: int
    patch_size: int
    text_hidden_size: int
    text_intermediate_size: int
    text_layers: int
    text_heads: int
    #: Rows of the embedding and output matrices (the tokenizer's vocabulary is padded to it).
    vocab_size: int
    prompt_tokens: int
    response_tokens: int
    batch_size: int
    dtype: str = "float32"
    device: str = "cpu"
    #: "llava" (CLIP tower + MLP projector + Llama) or "qwen2.5-vl" (windowed ViT + merger + Qwen2 with M-RoPE).
    family: str = "llava"
    #: Key/value heads of the language model (grouped-query attention); None: as many as query heads.
    text_kv_heads: int | None = None

    @property
    def image_tokens(self) -> int:
        # Qwen2.5-VL merges 2x2 patches into one token.
        merge = 2 if self.family == "qwen2.5-vl" else 1
        return (self.image_size // (self.patch_size * merge)) ** 2


CPU_SETUP = Setup(
    name="cpu",
    vision_hidden_size=256,
    vision_intermediate_size=1024,
    vision_layers=4,
    vision_heads=4,
    image_size=224,
    patch_size=14,
    text_hidden_size=512,
    text_intermediate_size=1376,
    text_layers=4,
    text_heads=8,
    vocab_size=32000,
    prompt_tokens=40,
    response_tokens=40,
    batch_size=1,  # the release's per-device batch
)

# The same proportions, smaller: 64 image tokens, 10-token prompts and responses, width
# 256, an 8k head; a whole --quick run takes a minute or two. Its process memory is mostly
# the Python libraries, not the model, so its memory ratio says little.
QUICK_SETUP = Setup(
    name="cpu-quick",
    vision_hidden_size=128,
    vision_intermediate_size=512,
    vision_layers=2,
    vision_heads=4,
    image_size=112,
    patch_size=14,
    text_hidden_size=256,
    text_intermediate_size=688,
    text_layers=2,
    text_heads=4,
    vocab_size=8000,
    prompt_tokens=10,
    response_tokens=10,
    batch_size=2,  # two examples: more tokens against the fixed cost of each AdamW step
)

# LLaVA-1.5-7B: CLIP ViT-L/14 at 336 pixels (576 image tokens), Llama-2-7B language model.
GPU_SETUP = Setup(
    name="gpu",
    vision_hidden_size=1024,
    vision_intermediate_size=4096,
    vision_layers=24,
    vision_heads=16,
    image_size=336,
    patch_size=14,
    text_hidden_size=4096,
    text_intermediate_size=11008,
    text_layers=32,
    text_heads=32,
    vocab_size=32064,
    prompt_tokens=40,
    response_tokens=40,
    batch_size=1,
    dtype="bfloat16",
    device="cuda",
)

# Qwen2.5-VL-shaped, at the CPU setup's widths: 448-pixel images in 14-pixel patches merged
# 2x2 (256 image tokens, as the LLaVA setup), a windowed vision tower with its last block
# full, grouped-query attention, M-RoPE and the family's 151,936-row (untied) vocabulary.
QWEN_CPU_SETUP = replace(
    CPU_SETUP, name="cpu-qwen2.5-vl", family="qwen2.5-vl", image_size=448, vocab_size=151936, text_kv_heads=2, vision_intermediate_size=688
)
QWEN_QUICK_SETUP = replace(
    QUICK_SETUP, name="cpu-quick-qwen2.5-vl", family="qwen2.5-vl", image_size=224, vocab_size=151936, text_kv_heads=2, vision_intermediate_size=344
)
# Qwen2.5-VL-7B: 32-block vision tower of width 1280 (full attention at every 8th block),
# Qwen2-7B language model (28 layers, width 3584, 4 key/value heads), 152k vocabulary;
# 672-pixel images give 576 image tokens, as LLaVA-1.5's.
QWEN_GPU_SETUP = replace(
    GPU_SETUP,
    name="gpu-qwen2.5-vl",
    family="qwen2.5-vl",
    vision_hidden_size=1280,
    vision_intermediate_size=3420,
    vision_layers=32,
    vision_heads=16,
    image_size=672,
    text_hidden_size=3584,
    text_intermediate_size=18944,
    text_layers=28,
    text_heads=28,
    text_kv_heads=4,
    vocab_size=152064,
)
# The --gpu code path at a tiny shape, so it runs (on CPU in the tests) and cannot rot.
TINY_SETUP = replace(
    QUICK_SETUP,
    name="tiny",
    vision_hidden_size=32,
    vision_intermediate_size=64,
    vision_layers=1,
    vision_heads=2,
    image_size=56,
    text_hidden_size=64,
    text_intermediate_size=128,
    text_layers=1,
    text_heads=2,
    vocab_size=2048,
    prompt_tokens=6,
    response_tokens=6,
    batch_size=1,
)
QWEN_TINY_SETUP = replace(TINY_SETUP, name="tiny-qwen2.5-vl", family="qwen2.5-vl", image_size=112, vocab_size=151936, text_kv_heads=1)


def setups_for(args: argparse.Namespace) -> tuple[Setup, Setup]:
    """(the LLaVA-shaped setup, the Qwen2.5-VL-shaped setup) of this run's flags."""
    if args.tiny:
        llava, qwen = TINY_SETUP, QWEN_TINY_SETUP
        if args.gpu:
            device = "cuda" if _cuda_available() else "cpu"
            llava, qwen = (replace(setup, device=device, dtype="bfloat16" if device == "cuda" else "float32") for setup in (llava, qwen))
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


def attention_for(key: str, setup: Setup) -> str:
    """The attention kernel of contender ``key``: on a GPU, flash attention wherever its path allows it.

    Packed rows (A, B) need a 4-D mask, so SDPA (its memory-efficient kernel); the other
    paths take flash-attention-2 where the package is installed, else SDPA (whose flash
    kernel runs where no mask is given). On CPU, SDPA for everyone.
    """
    if setup.device != "cuda" or key in ("A", "B"):
        return "sdpa"
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return "sdpa"
    return "flash_attention_2"


# --------------------------------------------------------------------------- model


def _corpus() -> list[str]:
    return [" ".join(_WORDS[index:] + _WORDS[:index]) for index in range(0, len(_WORDS), 7)]


def build_model(setup: Setup, seed: int = 0, attention: str = "sdpa"):
    """(processor, model): the setup's processor and a randomly initialised model of its family."""
    if setup.family == "qwen2.5-vl":
        return _build_qwen(setup, seed, attention)
    return _build_llava(setup, seed, attention)


def _instantiate(model_class: Any, config: Any, setup: Setup, seed: int) -> Any:
    import torch

    torch.manual_seed(seed)
    dtype = getattr(torch, setup.dtype)
    # Built directly on the device in its dtype: a 7B model made in fp32 first would need twice the memory.
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(setup.device):
            return model_class(config)
    finally:
        torch.set_default_dtype(default_dtype)


def _build_qwen(setup: Setup, seed: int, attention: str):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from mmsafe.models.zoo.qwen_vl import qwen2_5_vl_processor

    processor, ids = qwen2_5_vl_processor(extra_corpus=tuple(_corpus()), max_image_tokens=setup.image_tokens)
    head_dim = setup.text_hidden_size // setup.text_heads
    # M-RoPE sections of the real model ([16, 24, 24] of a 128 head dim's 64 frequencies), scaled.
    sections = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": setup.vocab_size,
            "hidden_size": setup.text_hidden_size,
            "intermediate_size": setup.text_intermediate_size,
            "num_hidden_layers": setup.text_layers,
            "num_attention_heads": setup.text_heads,
            "num_key_value_heads": setup.text_kv_heads or setup.text_heads,
            "hidden_act": "silu",
            "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-6,
            "use_sliding_window": False,
            "rope_parameters": {"rope_type": "default", "mrope_section": sections, "rope_theta": 1000000.0},
            "bos_token_id": ids["bos_token_id"],
            "eos_token_id": ids["eos_token_id"],
            "pad_token_id": ids["pad_token_id"],
            "tie_word_embeddings": False,
        },
        vision_config={
            "depth": setup.vision_layers,
            "hidden_size": setup.vision_hidden_size,
            "intermediate_size": setup.vision_intermediate_size,
            "hidden_act": "silu",
            "num_heads": setup.vision_heads,
            "in_channels": 3,
            "patch_size": setup.patch_size,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "tokens_per_second": 2,
            "window_size": 112,
            "out_hidden_size": setup.text_hidden_size,
            "fullatt_block_indexes": list(range(7, setup.vision_layers, 8)) or [setup.vision_layers - 1],
        },
        tie_word_embeddings=False,  # as Qwen2.5-VL-7B-Instruct
        image_token_id=ids["image_token_id"],
        video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"],
        vision_end_token_id=ids["vision_end_token_id"],
    )
    config._attn_implementation = attention
    config.text_config._attn_implementation = attention
    config.vision_config._attn_implementation = attention
    model = _instantiate(Qwen2_5_VLForConditionalGeneration, config, setup, seed)
    model.generation_config.pad_token_id = ids["pad_token_id"]
    model.generation_config.eos_token_id = [ids["eos_token_id"], ids["pad_token_id"]]
    return processor, model


def _build_llava(setup: Setup, seed: int, attention: str):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from mmsafe.models.tiny import TinyModelSpec, build_tiny_processor

    corpus = _corpus()
    spec = TinyModelSpec(image_size=setup.image_size, patch_size=setup.patch_size, vocab_size=1024)
    processor = build_tiny_processor(spec, corpus=corpus)
    tokenizer = processor.tokenizer
    if len(tokenizer) > setup.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, more than the model's {setup.vocab_size}")
    vision = CLIPVisionConfig(
        hidden_size=setup.vision_hidden_size,
        intermediate_size=setup.vision_intermediate_size,
        num_hidden_layers=setup.vision_layers,
        num_attention_heads=setup.vision_heads,
        image_size=setup.image_size,
        patch_size=setup.patch_size,
        projection_dim=setup.vision_hidden_size,
    )
    text = LlamaConfig(
        vocab_size=setup.vocab_size,  # padded beyond the tokenizer: the head costs what a 32k vocabulary costs
        hidden_size=setup.text_hidden_size,
        intermediate_size=setup.text_intermediate_size,
        num_hidden_layers=setup.text_layers,
        num_attention_heads=setup.text_heads,
        num_key_value_heads=setup.text_kv_heads or setup.text_heads,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=setup.image_tokens,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    config._attn_implementation = attention
    model = _instantiate(LlavaForConditionalGeneration, config, setup, seed)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return processor, model


def perturb(model: Any, scale: float = 0.02, seed: int = 1) -> Any:
    """A copy of ``model`` with every weight moved by ``scale`` of its own spread (for the loss checks)."""
    import torch

    moved = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in moved.parameters():
            noise = torch.randn(parameter.shape, generator=generator).to(parameter.device, parameter.dtype)
            parameter.add_(noise * scale * (parameter.float().std().item() if parameter.numel() > 1 else 1.0))
    return moved


# --------------------------------------------------------------------------- data


@dataclass
class Workload:
    """The same examples in each contender's form.

    ``items``: PreferenceDataset items (token ids + pixel values) for mmsafe;
    ``processor``: the model's processor; ``trl_rows``: one dict per (chosen, rejected) pair for TRL (``images``, ``prompt``,
    ``chosen``, ``rejected`` as text); ``sources``: the rejected sources in order.
    """

    processor: Any
    encoder: Any
    items: list[dict[str, Any]]
    trl_rows: list[dict[str, Any]]
    sources: list[str]
    pad_token_id: int
    prompt_lengths: list[int]
    response_lengths: list[int]

    @property
    def examples(self) -> int:
        return len(self.items)

    def tokens(self) -> int:
        """Distinct tokens of the examples: each prompt (image included) once, plus every response."""
        return sum(self.prompt_lengths) + sum(self.response_lengths)


def _fit(rng: random.Random, target: int, count_tokens) -> str:
    """Text of random words whose token count (by ``count_tokens``) is ``target``, or just above."""
    words = [rng.choice(_WORDS) for _ in range(max(0, target - 4))]  # about a token a word: few counts
    while words and count_tokens(" ".join(words)) > target:
        words.pop()
    while count_tokens(" ".join(words)) < target:
        words.append(rng.choice(_WORDS))
    return " ".join(words)


def build_workload(
    processor: Any,
    model: Any,
    setup: Setup,
    *,
    examples: int,
    num_rejected: int,
    response_tokens: int | None = None,
    seed: int = 0,
    profile: LengthProfile | None = None,
) -> Workload:
    """``examples`` records with a chosen and ``num_rejected`` rejected responses, tokenized.

    Without ``profile``: prompts have ``setup.prompt_tokens`` text tokens (chat template
    included) around the image; every response has ``response_tokens`` tokens
    (end-of-sequence included), give or take two. With a :class:`LengthProfile`: dialogues
    of several turns and responses drawn from its distributions (the first rejected one
    human, the others blind).
    """
    from PIL import Image

    from mmsafe.data.records import Message, PreferenceRecord
    from mmsafe.models.prompts import render_prompt, response_text
    from mmsafe.train.data import PreferenceDataset, PreferenceEncoder, prepare_examples

    response_tokens = response_tokens or setup.response_tokens
    rng = random.Random(seed)
    tokenizer = processor.tokenizer
    image_root = Path(scratch_dir("images-"))
    sources = ["human", "blind"] + [f"blind{index}" for index in range(2, num_rejected)]
    sources = sources[:num_rejected]

    def prompt_tokens(text: str) -> int:
        rendered = render_prompt(processor, [Message("user", "<image>\n" + text)], with_image=True)
        return len(tokenizer(rendered.replace("<image>", ""), add_special_tokens=False)["input_ids"])

    def response_length(text: str) -> int:
        return len(tokenizer(response_text(text), add_special_tokens=False)["input_ids"]) + 1  # + end of sequence

    def text_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    records = []
    for index in range(examples):
        jitter = index % 5 - 2
        image_name = f"image-{index}.png"
        colour = ((index * 53) % 256, (index * 97) % 256, (index * 31) % 256)
        Image.new("RGB", (setup.image_size, setup.image_size), colour).save(image_root / image_name)
        if profile is None:
            messages = [Message("user", "<image>\n" + _fit(rng, setup.prompt_tokens + jitter, prompt_tokens))]
            responses = [_fit(rng, response_tokens + (jitter + slot) % 3 - 1, response_length) for slot in range(1 + num_rejected)]
        else:
            messages = [Message(role, _fit(rng, length, text_tokens)) for role, length in profile.dialogue(rng)]
            messages[-1] = Message("user", "<image>\n" + messages[-1].content)
            lengths = [profile.human_response(rng), profile.human_response(rng)] + [profile.blind_response(rng) for _ in range(num_rejected - 1)]
            responses = [_fit(rng, length, response_length) for length in lengths[: 1 + num_rejected]]
        records.append(
            PreferenceRecord(
                id=f"bench-{index}",
                messages=messages,
                image=image_name,
                chosen=responses[0],
                rejected=responses[1:],
                rejected_sources=list(sources),
                meta={},
            )
        )
    encoder = PreferenceEncoder.for_model(model, processor, image_root, max_length=8192)
    prepared = prepare_examples(records, encoder)
    if len(prepared.examples) != examples:
        raise RuntimeError(f"benchmark records were skipped: {prepared.skip_counts()}")
    dataset = PreferenceDataset(prepared.examples, encoder)
    items = [dataset[index] for index in range(len(dataset))]
    trl_rows = []
    for record, example in zip(records, prepared.examples, strict=True):
        image = encoder.load_image(record.image)
        # TRL adds no end-of-sequence token to vision completions; write it out so both
        # sides score the same token ids (checked by the loss agreement).
        for rejected in record.rejected:
            trl_rows.append(
                {
                    "images": [image],
                    "prompt": example.prompt_text,
                    "chosen": response_text(record.chosen) + tokenizer.eos_token,
                    "rejected": response_text(rejected) + tokenizer.eos_token,
                }
            )
    return Workload(
        processor=processor,
        encoder=encoder,
        items=items,
        trl_rows=trl_rows,
        sources=prepared.sources,
        pad_token_id=tokenizer.pad_token_id,
        prompt_lengths=[len(example.prompt_ids) for example in prepared.examples],
        response_lengths=[len(ids) for example in prepared.examples for ids in example.responses],
    )


_SCRATCH: list[tempfile.TemporaryDirectory] = []


def scratch_dir(prefix: str) -> str:
    """A new folder under one temporary directory that is removed when the process exits."""
    if not _SCRATCH:
        _SCRATCH.append(tempfile.TemporaryDirectory(prefix="mmsafe-bench-train-"))
    return tempfile.mkdtemp(prefix=prefix, dir=_SCRATCH[0].name)


def move(batch: dict[str, Any], device: str) -> dict[str, Any]:
    return {key: value.to(device) if hasattr(value, "to") else value for key, value in batch.items()}


# --------------------------------------------------------------------------- contenders


def _train_config(setup: Setup, output_dir: str, *, forward_mode: str, reference: str):
    from mmsafe.train.config import TrainConfig

    return TrainConfig(
        model="benchmark",
        data="benchmark",
        output_dir=output_dir,
        loss="bpo",
        beta=BETA,
        forward_mode=forward_mode,
        reference=reference,
        learning_rate=LEARNING_RATE,
        per_device_train_batch_size=setup.batch_size,
        report_to=[],
    )


def _adamw(model: Any):
    import torch

    return torch.optim.AdamW([parameter for parameter in model.parameters() if parameter.requires_grad], lr=LEARNING_RATE)


@dataclass
class Contender:
    """One contender, ready to run optimizer steps on its prepared batch."""

    key: str
    trainer: Any
    model: Any
    batch: dict[str, Any]
    optimizer: Any
    examples: int
    losses: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Set by Trainer.train() for its loop; one micro-batch per optimizer step here.
        self.trainer.current_gradient_accumulation_steps = 1

    def step(self) -> float:
        loss = self.trainer.training_step(self.model, dict(self.batch))  # it pops keys from the dict it gets
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(float(loss))
        return float(self.examples)


def make_mmsafe(key: str, policy: Any, workload: Workload, setup: Setup) -> Contender:
    """A, B or C on ``policy`` (which it takes over and trains)."""
    from mmsafe.train.data import PreferenceCollator
    from mmsafe.train.reference import FrozenCopyReference
    from mmsafe.train.trainer import PreferenceTrainer, set_trainable

    forward_mode = FORWARD_MODES[key]
    reference_mode = "copy" if key in ("B", "C") else "precomputed"
    output_dir = scratch_dir(f"{key}-")
    config = _train_config(setup, output_dir, forward_mode=forward_mode, reference=reference_mode)
    policy = set_trainable(policy, config)
    collator = PreferenceCollator(workload.pad_token_id, workload.sources, mode=forward_mode, encoder=workload.encoder)
    items = workload.items
    reference = None
    if reference_mode == "precomputed":
        # As `mmsafe train` does: the starting weights score every example once, before
        # training, and the log-probs travel in the batch.
        examples = [replace(item["example"]) for item in items]  # copies: B and C must not see the cache
        scoring = collator
        logps = _precompute(policy, items, examples, scoring, setup)
        for example in examples:
            example.reference_logps = logps[example.id]
        items = [{**item, "example": example} for item, example in zip(items, examples, strict=True)]
    else:
        reference = FrozenCopyReference(policy)
    trainer = PreferenceTrainer(model=policy, args=config.training_arguments(), config=config, sources=workload.sources, reference=reference)
    batch = move(collator(items), setup.device)
    return Contender(key=key, trainer=trainer, model=policy, batch=batch, optimizer=_adamw(policy), examples=workload.examples)


class _ItemsDataset:
    """Already-encoded dataset items, for :func:`precompute_reference`."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


def _precompute(model: Any, items: list[dict[str, Any]], examples: list[Any], collator: Any, setup: Setup) -> dict[str, list[float]]:
    """Reference log-probs of ``examples`` by ``model``, as ``mmsafe train`` precomputes them."""
    from mmsafe.train.reference import precompute_reference

    dataset = _ItemsDataset([{**item, "example": example} for item, example in zip(items, examples, strict=True)])
    return precompute_reference(model, dataset, collator, batch_size=setup.batch_size)


def make_trl(policy: Any, workload: Workload, setup: Setup, *, reference: Any | None = None) -> Contender:
    """D: TRL's DPOTrainer on the two-row data, with a frozen copy of ``policy`` as reference."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from mmsafe.train.trainer import set_trainable

    output_dir = scratch_dir("D-")
    policy = set_trainable(policy, _train_config(setup, output_dir, forward_mode="separate", reference="copy"))
    if reference is None:
        reference = copy.deepcopy(policy)  # what a user passes for an in-memory model (TRL reloads from a path otherwise)
    args = DPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=len(workload.trl_rows),  # every pair of the step's examples in one batch
        learning_rate=LEARNING_RATE,
        beta=BETA,
        loss_type=["sigmoid"],
        bf16=False,  # fp32 on CPU; on GPU the weights are bf16 already, as for mmsafe
        gradient_checkpointing=False,  # as for A-C (TRL's default is on)
        activation_checkpointing=False,
        max_length=None,  # nothing is cut: the same tokens as mmsafe
        precompute_ref_log_probs=False,  # an online reference, as the release (TRL refuses it for images anyway)
        report_to="none",
        save_strategy="no",
        logging_steps=10**6,
        disable_tqdm=True,
        dataloader_pin_memory=False,
        use_cpu=setup.device == "cpu",
    )
    dataset = Dataset.from_list(workload.trl_rows)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=dataset, processing_class=workload.processor)
    batch = move(trainer.data_collator([dataset[index] for index in range(len(dataset))]), setup.device)
    return Contender(key="D", trainer=trainer, model=trainer.model, batch=batch, optimizer=_adamw(trainer.model), examples=workload.examples)


def make_contender(key: str, policy: Any, workload: Workload, setup: Setup) -> Contender:
    return make_trl(policy, workload, setup) if key == "D" else make_mmsafe(key, policy, workload, setup)


def prepare(
    setup: Setup, *, num_rejected: int = 2, response_tokens: int | None = None, seed: int = 0, attention: str = "sdpa", profile: LengthProfile | None = None
):
    """(processor, starting model, workload of ``setup.batch_size`` examples)."""
    processor, model = build_model(setup, seed=seed, attention=attention)
    workload = build_workload(
        processor, model, setup, examples=setup.batch_size, num_rejected=num_rejected, response_tokens=response_tokens, seed=seed, profile=profile
    )
    return processor, model, workload


def padding_shares(processor: Any, model: Any, setup: Setup, profile: LengthProfile, *, examples: int = PADDING_EXAMPLES, seed: int = 1) -> list[dict[str, Any]]:
    """Share of padding positions over one epoch of ``examples`` drawn from ``profile``.

    For the default path (packed rows) and the general path (prompt-cache), at several
    batch sizes, with the training's length grouping (``group_by_length``, on by default)
    and without it (random order): what the ``batch/padding_share`` metric of
    ``mmsafe train`` averages to over the epoch.
    """
    import torch

    from mmsafe.train.data import PreferenceCollator
    from mmsafe.train.forward import response_groups, response_positions
    from mmsafe.train.trainer import EpochLengthGroupedSampler, example_length, padding_share

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
        collator = PreferenceCollator(workload.pad_token_id, workload.sources, mode=FORWARD_MODES[key], encoder=workload.encoder)
        for batch_size in PADDING_BATCH_SIZES:
            orders = {
                "grouped": list(EpochLengthGroupedSampler(batch_size, lengths, seed=0)),
                "random": torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist(),
            }
            for grouping, order in orders.items():
                padded = total = 0.0
                for start in range(0, len(order), batch_size):
                    batch_padded, batch_total = positions(collator([workload.items[index] for index in order[start : start + batch_size]]))
                    padded, total = padded + batch_padded, total + batch_total
                rows.append({"path": f"{key}: {CONTENDERS[key]}", "key": key, "batch_size": batch_size, "order": grouping, "padding_share": padded / total, "positions": int(total)})
    return rows


# --------------------------------------------------------------------------- checks


@dataclass
class LossAgreement:
    """Per-example BPO losses of a fast contender (A or G) and C, and TRL's DPO loss against mmsafe's mean DPO term."""

    fast: str
    a_losses: list[float]
    c_losses: list[float]
    a_c_relative_difference: float
    mmsafe_mean_dpo_term: float
    trl_dpo_loss: float | None
    trl_relative_difference: float
    image_passes_per_example: dict[str, int]

    @property
    def agrees(self) -> bool:
        return self.a_c_relative_difference <= LOSS_TOLERANCE and self.trl_relative_difference <= LOSS_TOLERANCE

    def describe(self) -> str:
        text = (
            f"{self.fast} vs C per-example BPO losses {self.a_losses} vs {self.c_losses} "
            f"(max relative difference {self.a_c_relative_difference:.1e})"
        )
        if self.trl_dpo_loss is not None:
            text += f"; TRL DPO loss {self.trl_dpo_loss:.6f} vs mmsafe mean DPO term {self.mmsafe_mean_dpo_term:.6f} (relative {self.trl_relative_difference:.1e})"
        return text


def check_losses(model: Any, workload: Workload, setup: Setup, *, fast: str = "A", with_trl: bool = True, perturbation: float = 0.02) -> LossAgreement:
    """Step-0 losses of ``fast`` (A or G), C and D for a policy a little away from the reference ``model``.

    ``fast``: its path's policy log-probs with reference log-probs precomputed by
    :func:`precompute_reference`; C: every sequence alone for both models; D (``with_trl``):
    TRL's own loss on the same policy and reference.
    """
    import torch

    from mmsafe.train.data import PreferenceCollator
    from mmsafe.train.forward import score_batch
    from mmsafe.train.losses import bpo_loss

    reference = model.eval()
    policy = perturb(model, scale=perturbation).eval()
    shared = PreferenceCollator(workload.pad_token_id, workload.sources, mode=FORWARD_MODES[fast], encoder=workload.encoder)
    separate_batch = move(PreferenceCollator(workload.pad_token_id, workload.sources, mode="separate", encoder=workload.encoder)(workload.items), setup.device)
    shared_batch = move(shared(workload.items), setup.device)
    examples = [item["example"] for item in workload.items]
    cached = _precompute(reference, workload.items, examples, shared, setup)
    cached_chosen = torch.tensor([cached[example.id][0] for example in examples])
    cached_rejected = torch.tensor([cached[example.id][1:] for example in examples])
    with torch.no_grad():
        policy_shared = score_batch(policy, shared_batch)
        a = bpo_loss(policy_shared.chosen.cpu().double(), policy_shared.rejected.cpu().double(), cached_chosen.double(), cached_rejected.double(), beta=BETA)
        policy_separate = score_batch(policy, separate_batch)
        reference_separate = score_batch(reference, separate_batch)
        c = bpo_loss(*(tensor.cpu().double() for tensor in (policy_separate.chosen, policy_separate.rejected, reference_separate.chosen, reference_separate.rejected)), beta=BETA)
    a_c = ((a.losses - c.losses).abs() / c.losses.abs()).max().item()
    pairs = sum(example.num_rejected for example in examples)
    mean_term = a.losses.sum().item() / pairs
    sequences = separate_batch["input_ids"].shape[0]
    if not with_trl:
        return LossAgreement(
            fast=fast, a_losses=a.losses.tolist(), c_losses=c.losses.tolist(), a_c_relative_difference=a_c, mmsafe_mean_dpo_term=mean_term,
            trl_dpo_loss=None, trl_relative_difference=0.0, image_passes_per_example={fast: 1, "C": sequences // len(examples)},
        )
    trl = make_trl(copy.deepcopy(policy), workload, setup, reference=copy.deepcopy(reference))
    trl.model.eval()
    with torch.no_grad():
        trl_loss = float(trl.trainer.compute_loss(trl.model, trl.batch))
    if separate_batch["pixel_values"].shape[0] != sequences:
        raise AssertionError("the separate layout does not give every sequence its own image")
    return LossAgreement(
        fast=fast,
        a_losses=a.losses.tolist(),
        c_losses=c.losses.tolist(),
        a_c_relative_difference=a_c,
        mmsafe_mean_dpo_term=mean_term,
        trl_dpo_loss=trl_loss,
        trl_relative_difference=abs(trl_loss - mean_term) / abs(mean_term),
        image_passes_per_example={
            fast: shared_batch["pixel_values"].shape[0] // len(examples),
            "C": sequences // len(examples),
            "D": trl.batch["pixel_values"].shape[0] // len(examples),
        },
    )


# --------------------------------------------------------------------------- measurements


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


def scaling(model: Any, processor: Any, setup: Setup, *, values: list[int], vary: str, repetitions: int) -> list[dict[str, Any]]:
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
        measured = run_alternating({key: contender.step for key, contender in contenders.items()}, repetitions=repetitions, warmup=1)
        a_seconds, c_seconds = measured["A"].median_seconds, measured["C"].median_seconds
        rows.append({vary: value, "A_step_s": a_seconds, "C_step_s": c_seconds, "C_over_A": c_seconds / a_seconds})
        del contenders
    return rows


def run_solo(key: str, setup: Setup, repetitions: int, *, flops: bool = False, profile: LengthProfile | None = None) -> dict[str, Any]:
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
        result.update(step_flops=step_flops, matmul_flops_per_s=ceiling["median"], flop_utilisation=step_flops / statistics.median(seconds[1:]) / ceiling["median"])
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
    collator = PreferenceCollator(workload.pad_token_id, workload.sources, mode=FORWARD_MODES[key], encoder=workload.encoder)
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
        model(**{name: value for name, value in batch.items() if name in ("input_ids", "pixel_values", "attention_mask", "image_grid_thw", "mm_token_type_ids")} if key == "A" else batch["prompt_cache_rows"][0]["prompt"])
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


def solo_in_subprocess(key: str, args: argparse.Namespace, repetitions: int, *, family: str = "llava") -> dict[str, Any]:
    """:func:`run_solo` in a fresh Python process with the same settings as this run."""
    return _in_subprocess(["--solo", key, "--family", family, "--repetitions", str(repetitions)], args, f"contender {key} ({family})")


def _in_subprocess(mode: list[str], args: argparse.Namespace, what: str) -> dict[str, Any]:
    """``python -m benchmarks.train <mode>`` with this run's shape flags; the JSON line it prints."""
    command = [sys.executable, "-m", "benchmarks.train", *mode]
    for flag in ("gpu", "quick", "tiny"):
        if getattr(args, flag):
            command.append(f"--{flag}")
    for option in ("batch_size", "threads", "workload"):
        if getattr(args, option) is not None:
            command += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    completed = subprocess.run(command, capture_output=True, text=True, check=False, env={**os.environ, "MMSAFE_PROGRESS": "0"})
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(f"{what} failed in its subprocess:\n{completed.stderr[-3000:]}")
    return json.loads(lines[-1])


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="LLaVA-1.5-7B- and Qwen2.5-VL-7B-shaped models in bf16 on a CUDA device, each contender in its own process")
    parser.add_argument("--tiny", action="store_true", help="with --gpu: the same code path at a tiny shape, on CPU when no GPU is present (a smoke test)")
    parser.add_argument("--batch-size", type=int, help="examples per optimizer step (default 1, the release's per-device batch; quick 2)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice); 1 is steadier on a busy machine")
    parser.add_argument("--skip-qwen", action="store_true", help="CPU runs: leave out the Qwen2.5-VL-shaped model")
    parser.add_argument(
        "--workload",
        choices=["realistic", "uniform"],
        default="realistic",
        help="realistic (default): multi-turn prompts and response lengths drawn as in the released data, with long blind answers; "
        "uniform: every prompt and response of the setup's length (the K and length sweeps always use uniform lengths)",
    )
    parser.add_argument("--solo", choices=sorted(CONTENDERS), help=argparse.SUPPRESS)  # internal: one contender in a fresh process
    parser.add_argument("--family", choices=["llava", "qwen2.5-vl"], default="llava", help=argparse.SUPPRESS)  # internal, with --solo
    parser.add_argument("--scoring-memory", choices=["plain", "chunked"], help=argparse.SUPPRESS)  # internal: one measurement in a fresh process
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
        print(json.dumps(scoring_memory(qwen_setup if args.family == "qwen2.5-vl" else llava_setup, args.scoring_memory)))
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
    measured = run_alternating({key: contender.step for key, contender in contenders.items()}, repetitions=repetitions, warmup=1)
    step_flops = count_step_flops(contenders["A"])
    del contenders
    ceiling = matmul_flops_per_s(setup)
    achieved = step_flops / measured["A"].median_seconds

    memory = {key: solo_in_subprocess(key, args, repetitions=2) for key in CONTENDERS}
    rows = []
    for key, name in CONTENDERS.items():
        row = measured[key].summary("examples")
        row.update(name=f"{key}: {name}", key=key, peak_rss_mb=memory[key]["peak_rss_mb"], rss_before_contender_mb=memory[key]["rss_before_contender_mb"])
        row["A_speedup"] = measured[key].median_seconds / measured["A"].median_seconds
        rows.append(row)
    sweep_repetitions = 3 if args.quick else 5
    half, base = setup.response_tokens // 2, setup.response_tokens
    response_lengths = [half, base, 2 * base] if args.quick else [half, base, 2 * base, 4 * base]
    k_rows = scaling(model, processor, setup, values=[1, 2, 4], vary="rejected", repetitions=sweep_repetitions)
    length_rows = scaling(model, processor, setup, values=response_lengths, vary="response_tokens", repetitions=sweep_repetitions)
    padding_examples = 100 if args.quick else PADDING_EXAMPLES
    padding_rows = padding_shares(processor, model, setup, profile or REALISTIC, examples=padding_examples)
    del model

    qwen = None if args.skip_qwen else run_qwen_cpu(qwen_setup, repetitions, profile)
    memory_rows = measure_scoring_memory(args, ["llava"] if args.skip_qwen else ["llava", "qwen2.5-vl"])
    load_after = os.getloadavg()

    by_key = {row["key"]: row for row in rows}
    verdict = {
        "A_over_C": by_key["A"]["examples_per_s"] / by_key["C"]["examples_per_s"],
        "G_over_C": by_key["G"]["examples_per_s"] / by_key["C"]["examples_per_s"],
        "A_over_D": by_key["A"]["examples_per_s"] / by_key["D"]["examples_per_s"],
        "A_memory_over_D": by_key["A"]["peak_rss_mb"] / by_key["D"]["peak_rss_mb"],
        "A_padding_share": max(row["padding_share"] for row in padding_rows if row["key"] == "A" and row["order"] == "grouped"),
    }
    if qwen is not None:
        verdict["qwen_G_over_C"] = qwen["G_over_C"]
    chunked = [row["logprobs_chunked_over_plain"] for row in memory_rows if row["setup"] == qwen_setup.name]
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
    print(format_table(rows, ["name", "examples_per_s", "examples_per_s_min", "examples_per_s_max", "median_seconds", "peak_rss_mb", "A_speedup"]))
    print(
        f"A/C {verdict['A_over_C']:.2f}x (target >= {TARGET_SPEEDUP:g}x), A/D {verdict['A_over_D']:.2f}x (target >= {TARGET_TRL_SPEEDUP:g}x); "
        f"G/C {verdict['G_over_C']:.2f}x (target >= {TARGET_GENERAL_SPEEDUP:g}x); "
        f"A's peak memory / D's {verdict['A_memory_over_D']:.2f} (target <= {TARGET_MEMORY_RATIO:g})"
    )
    print(f"padding share over an epoch of {padding_examples} realistic examples (target for A, grouped: <= {TARGET_PADDING_SHARE:.0%}):")
    print(format_table(padding_rows, ["path", "batch_size", "order", "padding_share", "positions"]))
    print("step time against K rejected responses (A vs C):")
    print(format_table(k_rows, ["rejected", "A_step_s", "C_step_s", "C_over_A"]))
    print("step time against response length in tokens, K = 2 (A vs C):")
    print(format_table(length_rows, ["response_tokens", "A_step_s", "C_step_s", "C_over_A"]))
    print(
        f"A's achieved rate {achieved / 1e9:.1f} GFLOP/s ({step_flops / 1e9:.1f} GFLOP per step) = "
        f"{achieved / ceiling['median']:.0%} of the measured {setup.dtype} matmul rate {ceiling['median'] / 1e9:.1f} GFLOP/s"
    )
    if qwen is not None:
        print(f"Qwen2.5-VL-shaped model ({qwen['parameters']:,} parameters, {qwen_setup.vocab_size:,}-token vocabulary): {qwen['agreement']}")
        print(format_table(qwen["results"], ["name", "examples_per_s", "examples_per_s_min", "examples_per_s_max", "median_seconds", "G_speedup"]))
        print(f"G/C {qwen['G_over_C']:.2f}x on the Qwen2.5-VL-shaped model")
    print(f"peak memory of one scoring forward + backward, K = 2 responses of about {SCORING_MEMORY_RESPONSE_TOKENS} tokens (plain vs chunked output layer):")
    print(format_table(memory_rows, ["setup", "path", "vocabulary", "tokens", "step_plain_mb", "step_chunked_mb", "step_chunked_over_plain", "logprobs_plain_mb", "logprobs_chunked_mb", "logprobs_chunked_over_plain"]))
    machine = machine_info()
    print(
        f"machine: {machine.get('cpu_count')} cores, {machine.get('memory_gib')} GiB, torch {machine.get('torch')} "
        f"({machine.get('torch_threads')} threads), load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; "
        f"{parameters:,} parameters, {workload.examples} examples per step"
    )
    write_results(
        args.json,
        {
            "benchmark": "train",
            "command": args.command,
            "setup": asdict(setup),
            "parameters": parameters,
            "workload": {
                "examples_per_step": workload.examples,
                "rejected_per_example": len(workload.sources),
                "prompt_tokens": workload.prompt_lengths,
                "image_tokens": setup.image_tokens,
                "response_tokens": workload.response_lengths,
                "tokenizer_vocabulary": len(processor.tokenizer),
                "profile": profile and asdict(profile),
            },
            "load_average": {"before": load_before, "after": load_after},
            "loss_agreement": asdict(agreement),
            "general_loss_agreement": asdict(general_agreement),
            "results": rows,
            "contenders": {row["key"]: {"examples_per_s": row["examples_per_s"], "peak_rss_mb": row["peak_rss_mb"]} for row in rows},
            "acceptance": {**verdict, "passed": passed},
            "scaling_rejected": k_rows,
            "scaling_response_tokens": length_rows,
            "padding_share": padding_rows,
            "flops": {"A_step_flops": step_flops, "A_flops_per_s": achieved, "matmul_flops_per_s": ceiling, "fraction": achieved / ceiling["median"]},
            "qwen2.5-vl": qwen and {**qwen, "setup": asdict(qwen_setup)},
            "scoring_memory": memory_rows,
        },
    )
    if not agreement.agrees or not general_agreement.agrees or (qwen is not None and not qwen["agrees"]):
        print("error: the contenders disagree on the step-0 loss", file=sys.stderr)
        return 1
    return 0 if passed else 2


def run_qwen_cpu(setup: Setup, repetitions: int, profile: LengthProfile | None = None) -> dict[str, Any]:
    """G, P and C on the Qwen2.5-VL-shaped model, alternating; G's loss checked against C's."""
    _processor, model, workload = prepare(setup, profile=profile)
    agreement = check_losses(copy.deepcopy(model), workload, setup, fast="G", with_trl=False)
    contenders = {key: make_contender(key, copy.deepcopy(model), workload, setup) for key in QWEN_CONTENDERS}
    measured = run_alternating({key: contender.step for key, contender in contenders.items()}, repetitions=repetitions, warmup=1)
    rows = []
    for key in QWEN_CONTENDERS:
        row = measured[key].summary("examples")
        row.update(name=f"{key}: {CONTENDERS[key]}", key=key, G_speedup=measured[key].median_seconds / measured["G"].median_seconds)
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


#: The contenders of the --gpu run on each model (TRL on the LLaVA shape, as on CPU).
GPU_CONTENDERS = {"llava": ("A", "G", "C", "D"), "qwen2.5-vl": ("G", "C")}


def run_gpu(args: argparse.Namespace, setup: Setup, qwen_setup: Setup, repetitions: int) -> int:
    """Each contender alone in a fresh process (the 7B trainers do not fit side by side)."""
    rows = []
    for family, keys in GPU_CONTENDERS.items():
        shape = qwen_setup if family == "qwen2.5-vl" else setup
        for key in keys:
            if args.tiny:  # tiny models fit side by side: one process saves a library import per contender
                result = run_solo(key, shape, repetitions, flops=True, profile=profile_for(args))
            else:
                result = solo_in_subprocess(key, args, repetitions=repetitions, family=family)
            seconds = result["seconds"]
            rates = [result["examples"] / value for value in seconds]
            rows.append(
                {
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
            )
    columns = ["name", "attention", "examples_per_s", "examples_per_s_min", "examples_per_s_max", "tokens_per_s", "flop_utilisation", "peak_gpu_mb"]
    print(format_table(rows, columns))
    for family, keys in GPU_CONTENDERS.items():
        shape = (qwen_setup if family == "qwen2.5-vl" else setup).name
        rate = {row["key"]: row["examples_per_s"] for row in rows if row["setup"] == shape}
        print(f"{shape}: " + ", ".join(f"{key}/C {rate[key] / rate['C']:.2f}x" for key in keys if key != "C"))
    machine = machine_info()
    write_results(
        args.json,
        {"benchmark": "train-gpu", "command": args.command, "setups": [asdict(setup), asdict(qwen_setup)], "machine": machine, "results": rows},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
