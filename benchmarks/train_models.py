"""The training benchmark's models: the shape of each mode (:class:`Setup`) and randomly initialised models of it.

The package's tiny builders (:mod:`mmsafe.models.tiny`, :mod:`mmsafe.models.zoo`) make
fixed small shapes on the CPU in fp32 with the vocabulary of their tokenizer; the
benchmark needs shapes they cannot make: an output layer padded beyond the tokenizer
(the per-token cost of a 32k or 152k vocabulary), free intermediate sizes and
key/value heads, 7B shapes built directly on the GPU in bf16, and a chosen attention
kernel. Their processors are reused.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any

from benchmarks.train_workload import LengthProfile, build_workload, corpus


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
    CPU_SETUP,
    name="cpu-qwen2.5-vl",
    family="qwen2.5-vl",
    image_size=448,
    vocab_size=151936,
    text_kv_heads=2,
    vision_intermediate_size=688,
)
QWEN_QUICK_SETUP = replace(
    QUICK_SETUP,
    name="cpu-quick-qwen2.5-vl",
    family="qwen2.5-vl",
    image_size=224,
    vocab_size=151936,
    text_kv_heads=2,
    vision_intermediate_size=344,
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
QWEN_TINY_SETUP = replace(
    TINY_SETUP, name="tiny-qwen2.5-vl", family="qwen2.5-vl", image_size=112, vocab_size=151936, text_kv_heads=1
)


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

    processor, ids = qwen2_5_vl_processor(extra_corpus=tuple(corpus()), max_image_tokens=setup.image_tokens)
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
    from transformers import LlavaForConditionalGeneration

    from mmsafe.models.tiny import TinyModelSpec, build_tiny_processor, tiny_llava_config

    texts = corpus()
    # The package's tiny LLaVA, sized by the setup; the output layer is padded beyond the
    # tokenizer, so the head costs what a 32k vocabulary costs.
    spec = TinyModelSpec(
        image_size=setup.image_size,
        patch_size=setup.patch_size,
        vocab_size=1024,
        vision_hidden_size=setup.vision_hidden_size,
        vision_intermediate_size=setup.vision_intermediate_size,
        vision_layers=setup.vision_layers,
        vision_heads=setup.vision_heads,
        text_hidden_size=setup.text_hidden_size,
        text_intermediate_size=setup.text_intermediate_size,
        text_layers=setup.text_layers,
        text_heads=setup.text_heads,
        text_kv_heads=setup.text_kv_heads,
        max_position_embeddings=4096,
        model_vocab_size=setup.vocab_size,
    )
    processor = build_tiny_processor(spec, corpus=texts)
    tokenizer = processor.tokenizer
    config = tiny_llava_config(tokenizer, spec)
    config.image_seq_length = setup.image_tokens
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


def prepare(
    setup: Setup,
    *,
    num_rejected: int = 2,
    response_tokens: int | None = None,
    seed: int = 0,
    attention: str = "sdpa",
    profile: LengthProfile | None = None,
):
    """(processor, starting model, workload of ``setup.batch_size`` examples)."""
    processor, model = build_model(setup, seed=seed, attention=attention)
    workload = build_workload(
        processor,
        model,
        setup,
        examples=setup.batch_size,
        num_rejected=num_rejected,
        response_tokens=response_tokens,
        seed=seed,
        profile=profile,
    )
    return processor, model, workload
