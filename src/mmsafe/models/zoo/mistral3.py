"""Mistral 3, after mistralai/Mistral-Small-3.1-24B-Instruct-2503 (its Hugging Face form).

``Mistral3ForConditionalGeneration`` (model_type ``mistral3``) with ``PixtralProcessor``
and ``PixtralImageProcessorPil``. Images keep their own aspect ratio: each is resized to fit
a longest edge (never upscaled) and rounded up to a multiple of patch x merge, and its
``[IMG]`` becomes, per row of merged patches, ``[IMG]`` x columns + ``[IMG_BREAK]``, the last
``[IMG_BREAK]`` replaced by ``[IMG_END]``. A batch of images is padded (bottom/right) to the
largest in ``pixel_values``; ``image_sizes`` holds each one's real (height, width). The
language model (Mistral) is ``model.language_model``, the Pixtral tower
``model.vision_tower``, the projector ``model.multi_modal_projector`` (RMSNorm, 2x2 patch
merger, two Linears with GELU).

Scaled down: patches of 14 px (real 14), ``spatial_merge_size`` 2 (real 2), longest edge
84 px (real 1540 = 55 x 28; here 3 x 28), so a square image gives 3 x 3 ``[IMG]`` + 3
breaks/end = 12 image tokens. Vision: 2 layers, hidden 32 (real 24 x 1024), SiLU gated MLP
and 2-D RoPE (theta 1e4) as the real one; text: 2 layers, hidden 64, rope_theta 1e9, no
sliding window, untied lm_head (the real checkpoint stores a separate ``lm_head``).

BOS: ``<s>`` comes from the chat template only (transformers converts Tekken with a
ByteLevel post-processor, which adds nothing). Without torchvision,
``transformers.PixtralProcessor`` is a placeholder and ``AutoProcessor`` cannot load this
checkpoint; :func:`mmsafe.models.loading.pixtral_processor_class` gives the real class (``.from_pretrained`` works).
"""

from __future__ import annotations

from pathlib import Path

# Mistral-Small-3.1's default system prompt starts this way (the real one goes on for
# several paragraphs and includes today's date, which would make the template
# non-deterministic; here it is cut to its first sentence).
DEFAULT_SYSTEM_PROMPT = "You are Mistral Small 3.1, a Large Language Model (LLM) created by Mistral AI, a French startup headquartered in Paris."

# Mistral-Small-3.1-24B-Instruct-2503's chat template, written after the real one: BOS,
# always a [SYSTEM_PROMPT] block (the default when no system message), [INST]...[/INST]
# around each user turn with [IMG] for an image, the answer + </s>. There is no generation
# prompt: the assistant answers right after [/INST].
CHAT_TEMPLATE = (
    "{%- set default_system_message = '" + DEFAULT_SYSTEM_PROMPT + "' %}"
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- if messages[0]['content'] is string %}{%- set system_message = messages[0]['content'] %}"
    "{%- else %}{%- set system_message = messages[0]['content'][0]['text'] %}{%- endif %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{%- set system_message = default_system_message %}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if message['content'] is string %}{{- '[INST]' + message['content'] + '[/INST]' }}"
    "{%- else %}"
    "{{- '[INST]' }}"
    "{%- for block in message['content'] %}"
    "{%- if block['type'] == 'text' %}{{- block['text'] }}"
    "{%- elif block['type'] in ['image', 'image_url'] %}{{- '[IMG]' }}"
    "{%- else %}{{- raise_exception('Only text and image blocks are supported in message content!') }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{{- '[/INST]' }}"
    "{%- endif %}"
    "{%- elif message['role'] == 'system' %}"
    "{%- if message['content'] is string %}{{- '[SYSTEM_PROMPT]' + message['content'] + '[/SYSTEM_PROMPT]' }}"
    "{%- else %}{{- '[SYSTEM_PROMPT]' + message['content'][0]['text'] + '[/SYSTEM_PROMPT]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- if message['content'] is string %}{{- message['content'] + eos_token }}"
    "{%- else %}{{- message['content'][0]['text'] + eos_token }}{%- endif %}"
    "{%- else %}{{- raise_exception('Only user, system and assistant roles are supported!') }}"
    "{%- endif %}"
    "{%- endfor %}"
)

PATCH_SIZE = 14
SPATIAL_MERGE_SIZE = 2
LONGEST_EDGE = 84  # == vision image_size, as the real 1540

# Tekken's control tokens in the real order: [IMG] is id 10 (image_token_index), <pad> 11.
SPECIAL_TOKENS = [
    "<unk>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
    "[TOOL_CALLS]",
    "[IMG]",
    "<pad>",
    "[IMG_BREAK]",
    "[IMG_END]",
    "[PREFIX]",
    "[MIDDLE]",
    "[SUFFIX]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[TOOL_CONTENT]",
]


def build_mistral3(out_dir: Path, seed: int) -> None:
    import torch
    from transformers import (
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        PixtralImageProcessorPil,
    )
    from transformers.image_utils import PILImageResampling

    from mmsafe.models.loading import pixtral_processor_class
    from mmsafe.models.zoo._tokenizers import train_tokenizer

    tokenizer = train_tokenizer(
        "byte-level",
        SPECIAL_TOKENS,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        add_bos=False,  # transformers converts Tekken with a ByteLevel post-processor: <s> comes from the template
        chat_template=CHAT_TEMPLATE,
    )
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    assert ids["[IMG]"] == 10

    image_processor = PixtralImageProcessorPil(
        do_convert_rgb=True,
        do_normalize=True,
        do_pad=True,
        do_rescale=True,
        do_resize=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        patch_size={"height": PATCH_SIZE, "width": PATCH_SIZE},
        resample=PILImageResampling.BICUBIC,
        rescale_factor=1 / 255,
        size={"longest_edge": LONGEST_EDGE},
    )
    processor = pixtral_processor_class()(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        spatial_merge_size=SPATIAL_MERGE_SIZE,
        chat_template=CHAT_TEMPLATE,
        image_token="[IMG]",
        image_break_token="[IMG_BREAK]",
        image_end_token="[IMG_END]",
    )

    config = Mistral3Config(
        vision_config={
            "model_type": "pixtral",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "head_dim": 16,
            "num_channels": 3,
            "image_size": LONGEST_EDGE,
            "patch_size": PATCH_SIZE,
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            "initializer_range": 0.02,
        },
        text_config={
            "model_type": "mistral",
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "hidden_act": "silu",
            "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-5,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000000.0},
            "sliding_window": None,
            "attention_dropout": 0.0,
            "tie_word_embeddings": False,
            "bos_token_id": ids["<s>"],
            "eos_token_id": ids["</s>"],
            "pad_token_id": ids["<pad>"],
        },
        image_token_index=ids["[IMG]"],
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        multimodal_projector_bias=False,
        spatial_merge_size=SPATIAL_MERGE_SIZE,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Mistral3ForConditionalGeneration(config).eval()
    generation = model.generation_config
    generation.bos_token_id = ids["<s>"]
    generation.eos_token_id = ids["</s>"]
    generation.pad_token_id = ids["<pad>"]
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
