"""The hybrid (recurrent + attention) architecture of the matrix.

LFM2-VL itself (LiquidAI/LFM2-VL-450M) cannot be built here: its only image processor,
``Lfm2VlImageProcessor``, is a torchvision backend (``transformers.models.lfm2_vl.
image_processing_lfm2_vl`` imports ``torchvision.transforms.v2`` at module level, and the
auto mapping lists no ``pil`` class for ``lfm2_vl``), and torchvision cannot be loaded
beside a CPU torch. So this builds the other hybrid vision-language model of
transformers, Qwen3.5 (``Qwen3_5ForConditionalGeneration``, after the small Qwen3.5
checkpoints such as Qwen/Qwen3.5-0.8B): a language model (``model.language_model``) of
Gated DeltaNet linear-attention layers (a short causal convolution then a gated delta
rule recurrence) and gated full-attention layers (``layer_types``: here one of each, in the
real 3-linear-then-1-full order cut to two layers), interleaved M-RoPE over a partial
rotary dimension, and a Qwen3-VL-style vision tower (``model.visual``, with its patch
merger ``model.visual.merger``). The processor is ``Qwen3VLProcessor`` (built image-only:
its video processor needs torchvision) over ``Qwen2VLImageProcessorPil``.

Scaled down: 8 px patches (real 16), 2 x 2 merge as the real one, images resized to
between 32 x 32 and 128 x 128 pixels (real 256^2 .. 4096^2), so one image gives
(h/16) x (w/16) image tokens, at most 64.
"""

from __future__ import annotations

from pathlib import Path

# After Qwen3.5's template: ChatML, images as <|vision_start|><|image_pad|><|vision_end|>,
# thinking on unless ``enable_thinking=False``: the generation prompt opens ``<think>\n``
# (or gives an empty ``<think>\n\n</think>\n\n`` block), and an assistant turn after the
# last user message is rendered with its (possibly empty) think block, so that the
# generation prompt is a prefix of the rendered answer.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for message in messages -%}{%- if message['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
    "{%- else -%}{%- set text = namespace(value='') -%}"
    "{%- for content in message['content'] -%}"
    "{%- if content['type'] == 'image' -%}{%- set text.value = text.value + '<|vision_start|><|image_pad|><|vision_end|>' -%}"
    "{%- elif content['type'] == 'video' -%}{%- set text.value = text.value + '<|vision_start|><|video_pad|><|vision_end|>' -%}"
    "{%- elif content['type'] == 'text' -%}{%- set text.value = text.value + content['text'] -%}"
    "{%- endif -%}"
    "{%- endfor -%}{%- set text = text.value -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' and loop.index0 > ns.last_user -%}"
    "{%- set reasoning = message.get('reasoning_content', '') or '' -%}"
    "{{- '<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + text.lstrip('\n') -}}"
    "{%- else -%}{{- text -}}{%- endif -%}"
    "{{- '<|im_end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\n\n</think>\n\n' -}}"
    "{%- else -%}{{- '<think>\n' -}}{%- endif -%}"
    "{%- endif -%}"
)

PATCH_SIZE = 8
MERGE_SIZE = 2


def build_lfm2_vl(out_dir: Path, seed: int) -> None:
    import torch
    from transformers import Qwen2VLImageProcessorPil, Qwen3_5Config, Qwen3_5ForConditionalGeneration, Qwen3VLProcessor
    from transformers.image_utils import PILImageResampling

    from mmsafe.models.loading import image_only_processor_class
    from mmsafe.models.zoo._tokenizers import train_tokenizer
    from mmsafe.models.zoo.qwen_vl import QWEN_SPECIAL_TOKENS

    special_tokens = [
        *QWEN_SPECIAL_TOKENS,
        "<tool_call>",
        "</tool_call>",
        "<think>",
        "</think>",
    ]
    tokenizer = train_tokenizer(
        "byte-level",
        special_tokens,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        add_bos=False,
        chat_template=CHAT_TEMPLATE,
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        },
    )
    image_processor = Qwen2VLImageProcessorPil(
        do_convert_rgb=True,
        do_resize=True,
        size={"shortest_edge": 32 * 32, "longest_edge": 128 * 128},
        resample=PILImageResampling.BICUBIC,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        patch_size=PATCH_SIZE,
        temporal_patch_size=2,
        merge_size=MERGE_SIZE,
    )
    processor = image_only_processor_class(Qwen3VLProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    )

    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    hidden = 32
    config = Qwen3_5Config(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "layer_types": ["linear_attention", "full_attention"],
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 32,  # rotary dim 32 * 0.25 = 8: 4 frequencies, split [2, 1, 1] over (t, h, w)
            "linear_conv_kernel_dim": 4,
            "linear_key_head_dim": 8,
            "linear_value_head_dim": 8,
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 4,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000000.0,
                "partial_rotary_factor": 0.25,
                "mrope_section": [2, 1, 1],
                "mrope_interleaved": True,
            },
            "tie_word_embeddings": True,
            "bos_token_id": None,
            "eos_token_id": eos_id,
            "pad_token_id": pad_id,
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "hidden_act": "gelu_pytorch_tanh",
            "patch_size": PATCH_SIZE,
            "spatial_merge_size": MERGE_SIZE,
            "temporal_patch_size": 2,
            "out_hidden_size": hidden,
            "num_position_embeddings": 64,  # an 8 x 8 grid, interpolated to the image's (real 48 x 48)
        },
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen3_5ForConditionalGeneration(config).eval()
    model.generation_config.bos_token_id = None
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = pad_id
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
