"""InternVL3, after OpenGVLab/InternVL3-1B-hf.

``InternVLForConditionalGeneration``: an InternViT tower (``model.vision_tower``), pixel
shuffle with ``downsample_ratio`` 0.5 and an MLP projector (``model.multi_modal_projector``),
a Qwen2 language model (``model.language_model``). The processor is ``InternVLProcessor``
(its video processor needs torchvision, so it is built image-only) over the GotOcr2 image
processor (PIL backend): the image is cut into tiles (``crop_to_patches``, 1-12 tiles of
the best-fitting grid plus a thumbnail when there is more than one), each tile giving
``image_seq_length`` ``<IMG_CONTEXT>`` tokens between ``<img>`` and ``</img>``.

Scaled down: 32 px tiles (real 448) in 8 px patches (real 14), so a tile is a 4 x 4 grid
that pixel shuffle turns into 2 x 2 = 4 image tokens (real 256); with the real
``max_patches`` 12 one image gives at most 13 tiles, 52 image tokens.
"""

from __future__ import annotations

from pathlib import Path

# The chat template of InternVL3-*-hf (the one its conversion script writes): plain
# ChatML with no default system message; an image is rendered as ``<IMG_CONTEXT>\n``,
# which the processor expands into ``<img>`` + ``<IMG_CONTEXT>`` x n + ``</img>``.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TILE_SIZE = 32
PATCH_SIZE = 8
DOWNSAMPLE_RATIO = 0.5
IMAGE_SEQ_LENGTH = int((TILE_SIZE // PATCH_SIZE) ** 2 * DOWNSAMPLE_RATIO**2)  # 4


def build_internvl3(out_dir: Path, seed: int) -> None:
    import torch
    from transformers import (
        GotOcr2ImageProcessorPil,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
    )
    from transformers.image_utils import PILImageResampling

    from mmsafe.models.loading import image_only_processor_class
    from mmsafe.models.zoo._tokenizers import train_tokenizer
    from mmsafe.models.zoo.qwen_vl import QWEN_SPECIAL_TOKENS

    # Qwen2.5-VL's special tokens (the tokenizer InternVL3-hf is built from), then InternVL's.
    special_tokens = [
        *QWEN_SPECIAL_TOKENS,
        "<img>",
        "</img>",
        "<IMG_CONTEXT>",
        "<quad>",
        "</quad>",
        "<ref>",
        "</ref>",
        "<box>",
        "</box>",
        "<video>",
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
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
    )
    image_processor = GotOcr2ImageProcessorPil(
        do_convert_rgb=True,
        do_resize=True,
        size={"height": TILE_SIZE, "width": TILE_SIZE},
        resample=PILImageResampling.BICUBIC,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        crop_to_patches=False,  # as the real preprocessor_config; the processor turns it on
        min_patches=1,
        max_patches=12,
    )
    processor = image_only_processor_class(InternVLProcessor)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=IMAGE_SEQ_LENGTH,
        chat_template=CHAT_TEMPLATE,
    )

    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = InternVLConfig(
        text_config={
            "model_type": "qwen2",
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 1024,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "use_sliding_window": False,
            "tie_word_embeddings": False,
            "bos_token_id": pad_id,
            "eos_token_id": eos_id,
            "pad_token_id": pad_id,
        },
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": [TILE_SIZE, TILE_SIZE],
            "patch_size": [PATCH_SIZE, PATCH_SIZE],
            "hidden_act": "gelu",
            "norm_type": "layer_norm",
            "use_qk_norm": False,
            "attention_bias": True,
            "layer_scale_init_value": 0.1,
            "use_mean_pooling": True,
            "use_absolute_position_embeddings": True,
        },
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=IMAGE_SEQ_LENGTH,
        downsample_ratio=DOWNSAMPLE_RATIO,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    model.generation_config.bos_token_id = pad_id
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = pad_id
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
