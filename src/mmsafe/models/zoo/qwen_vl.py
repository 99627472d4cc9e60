"""Tiny Qwen-VL checkpoints: Qwen2-VL, Qwen2.5-VL and Qwen3-VL.

All three share the Qwen2 byte-level tokenizer and its special tokens (``<|im_end|>``
ends a turn, ``<|endoftext|>`` pads, no BOS is added), the ``Qwen2VLImageProcessor``
(dynamic resolution: the image is resized to a multiple of ``patch_size * merge_size``
within ``[min_pixels, max_pixels]``, patches are flattened with the temporal axis
duplicated, ``image_grid_thw`` gives the grid) and a 3-D (M-RoPE) position index.

* Qwen2-VL (like Qwen/Qwen2-VL-2B-Instruct): patch 14, CLIP normalisation, M-RoPE
  sections ``[16, 24, 24]`` of a 128 head dim, scaled to ``[2, 3, 3]`` of 16; tied
  embeddings; QuickGELU vision MLP; ``model.visual.merger`` projects to the text width.
* Qwen2.5-VL (like Qwen/Qwen2.5-VL-3B-Instruct): the vision tower has RMSNorm + SwiGLU
  blocks with window attention (``window_size`` 112 px) except at
  ``fullatt_block_indexes`` (real ``[7, 15, 23, 31]`` of 32: every 8th, the last one
  included; here ``[1]`` of 2), and ``out_hidden_size`` for the merger.
* Qwen3-VL (like Qwen/Qwen3-VL-2B-Instruct): patch 16, 0.5/0.5 normalisation, learned
  interpolated position embeddings, DeepStack (features of ``deepstack_visual_indexes``
  vision layers are added to the first text layers' hidden states), interleaved M-RoPE
  sections ``[24, 20, 20]`` of 128, scaled exactly to ``[6, 5, 5]`` of a 32 head dim; no
  default system message in its chat template.

The image processors are scaled down through ``min_pixels``/``max_pixels`` only: a
56x56 image gives 4 image tokens, at most 64 tokens for any image.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypedDict

# The Qwen2 tokenizer's special tokens, in their real order (ids 151643...151656).
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# After the Qwen2-VL / Qwen2.5-VL chat template: a default system message when the first
# message is not a system one; images as <|vision_start|><|image_pad|><|vision_end|>.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# After the Qwen3-VL (Instruct) chat template, without tools: no default system message;
# a leading system message is rendered first, later system messages like user ones.
QWEN3_VL_CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].content is string %}{{- messages[0].content }}"
    "{%- else %}{%- for content in messages[0].content %}{%- if 'text' in content %}{{- content.text }}{%- endif %}{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- set image_count = namespace(value=0) %}"
    "{%- set video_count = namespace(value=0) %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}{{- message.content }}"
    "{%- else %}{%- for content in message.content %}"
    "{%- if content.type == 'image' or 'image' in content or 'image_url' in content %}"
    "{%- set image_count.value = image_count.value + 1 %}"
    "{%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif content.type == 'video' or 'video' in content %}"
    "{%- set video_count.value = video_count.value + 1 %}"
    "{%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in content %}{{- content.text }}"
    "{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}{{- message.content }}"
    "{%- else %}{%- for content_item in message.content %}{%- if 'text' in content_item %}{{- content_item.text }}{%- endif %}{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _tokenizer(chat_template: str, extra_corpus: tuple[str, ...] = ()):
    from mmsafe.models.zoo._tokenizers import train_tokenizer

    return train_tokenizer(
        "byte-level",
        QWEN_SPECIAL_TOKENS,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        add_bos=False,
        chat_template=chat_template,
        extra_corpus=["You are a helpful assistant.", "Describe the image.", "What is in this picture?", *extra_corpus],
    )


def _token_ids(tokenizer) -> dict[str, int]:
    return {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}


def _processor(
    processor_class,
    tokenizer,
    *,
    patch_size: int,
    image_mean,
    image_std,
    chat_template: str,
    max_image_tokens: int = 64,
):
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    from mmsafe.models.loading import image_only_processor_class, torchvision_available

    factor = patch_size * 2  # patch_size * merge_size: one image token per factor x factor pixels
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=2 * 2 * factor * factor,  # real: 56*56 (Qwen2/2.5-VL), 256*256 (Qwen3-VL)
        max_pixels=max_image_tokens * factor * factor,  # at most 64 image tokens by default
        patch_size=patch_size,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=list(image_mean),
        image_std=list(image_std),
        do_convert_rgb=True,
    )
    cls = processor_class if torchvision_available() else image_only_processor_class(processor_class)
    return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)


def qwen2_5_vl_processor(*, extra_corpus: tuple[str, ...] = (), max_image_tokens: int = 64):
    """A Qwen2.5-VL processor (tokenizer trained on ``extra_corpus`` too) and the special token ids for its config."""
    from transformers import Qwen2_5_VLProcessor

    tokenizer = _tokenizer(QWEN2_VL_CHAT_TEMPLATE, extra_corpus)
    ids = _token_ids(tokenizer)
    processor = _processor(
        Qwen2_5_VLProcessor,
        tokenizer,
        patch_size=14,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
        max_image_tokens=max_image_tokens,
    )
    return processor, {
        **_special_ids(ids),
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }


def _generation_config(model, ids: dict[str, int]) -> None:
    # As the real generation_config.json: bos = pad = <|endoftext|>, eos = [<|im_end|>, <|endoftext|>].
    # (The real ones also set sampling defaults; these fixtures keep greedy decoding.)
    model.generation_config.bos_token_id = ids["<|endoftext|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]


class _SpecialIds(TypedDict):
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int


def _special_ids(ids: dict[str, int]) -> _SpecialIds:
    return {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }


def _save(model, processor, out_dir: Path) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)


def build_qwen2_vl(out_dir: Path, seed: int) -> None:
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    tokenizer = _tokenizer(QWEN2_VL_CHAT_TEMPLATE)
    ids = _token_ids(tokenizer)
    processor = _processor(
        Qwen2VLProcessor,
        tokenizer,
        patch_size=14,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "hidden_act": "silu",
            "max_position_embeddings": 1024,
            "rms_norm_eps": 1e-6,
            "use_sliding_window": False,
            "sliding_window": 1024,
            "max_window_layers": 2,
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1000000.0},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "tie_word_embeddings": True,
        },
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": 64,  # the merger's output width: the text hidden size
            "hidden_act": "quick_gelu",
            "mlp_ratio": 4,
            "num_heads": 2,
            "in_channels": 3,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        tie_word_embeddings=True,  # as Qwen2-VL-2B-Instruct
        **_special_ids(ids),
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    _generation_config(model, ids)
    _save(model, processor, out_dir)


def build_qwen2_5_vl(out_dir: Path, seed: int) -> None:
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    processor, _ = qwen2_5_vl_processor()
    tokenizer = processor.tokenizer
    ids = _token_ids(tokenizer)
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "hidden_act": "silu",
            "max_position_embeddings": 1024,
            "rms_norm_eps": 1e-6,
            "use_sliding_window": False,
            "sliding_window": 1024,
            "max_window_layers": 2,
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1000000.0},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "tie_word_embeddings": True,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "hidden_act": "silu",
            "num_heads": 2,
            "in_channels": 3,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "tokens_per_second": 2,
            "window_size": 112,  # pixels: 4x4 merged tokens (8x8 patches) per window, as the real one
            "out_hidden_size": 64,
            "fullatt_block_indexes": [1],  # real [7, 15, 23, 31]: windowed blocks, the last one full
        },
        tie_word_embeddings=True,  # as Qwen2.5-VL-3B-Instruct
        **_special_ids(ids),
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    _generation_config(model, ids)
    _save(model, processor, out_dir)


def build_qwen3_vl(out_dir: Path, seed: int) -> None:
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor

    tokenizer = _tokenizer(QWEN3_VL_CHAT_TEMPLATE)
    ids = _token_ids(tokenizer)
    processor = _processor(
        Qwen3VLProcessor,
        tokenizer,
        patch_size=16,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        chat_template=QWEN3_VL_CHAT_TEMPLATE,
    )
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 32,
            "hidden_act": "silu",
            "max_position_embeddings": 1024,
            "rms_norm_eps": 1e-6,
            "attention_bias": False,
            # interleaved M-RoPE (always, in Qwen3-VL); real [24, 20, 20] of head_dim 128
            "rope_parameters": {
                "rope_type": "default",
                "mrope_section": [6, 5, 5],
                "mrope_interleaved": True,
                "rope_theta": 5000000.0,
            },
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "tie_word_embeddings": True,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 128,
            "hidden_act": "gelu_pytorch_tanh",
            "num_heads": 2,
            "in_channels": 3,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": 64,
            "num_position_embeddings": 64,  # an 8x8 grid, bilinearly interpolated to the image's
            "deepstack_visual_indexes": [0],  # real [5, 11, 17] of 24: intermediate layers only
        },
        tie_word_embeddings=True,  # as Qwen3-VL-2B-Instruct
        **_special_ids(ids),
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    _generation_config(model, ids)
    _save(model, processor, out_dir)
