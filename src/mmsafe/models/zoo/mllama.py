"""Llama 3.2 Vision (Mllama), after meta-llama/Llama-3.2-11B-Vision-Instruct.

``MllamaForConditionalGeneration`` (model_type ``mllama``) with ``MllamaProcessor``. The
image is not spliced into the text: the prompt holds one ``<|image|>`` token per image,
and the vision states enter the language model through gated cross-attention layers
(``text_config.cross_attention_layers``), masked per text token by the processor's
``cross_attention_mask`` of shape (batch, text length, max images, max tiles). The language
model is ``model.language_model`` (``MllamaTextModel``; its ``embed_tokens`` has
``vocab_size + 8`` rows), the vision tower ``model.vision_model``, the projector
``model.multi_modal_projector`` (one Linear).

As in the real checkpoint, ``<|image|>`` is the last id of the tokenizer and equals
``text_config.vocab_size``: ``lm_head`` has ``vocab_size = len(tokenizer) - 1`` outputs,
so the model can never emit ``<|image|>``.

Scaled down: tiles of 28 px (real 560) in 14 px patches (real 14), ``max_image_tiles`` 4
as the real one (aspect ratios [1,1] ... [4,1], ids 1-8, 0 = padding image), so one tile
gives (28/14)^2 + 1 = 5 vision tokens (the CLS included) and one image up to 4 x 5 = 20
cross-attended states. Vision: one local layer + one global layer (real 32 + 8), the
output is the last state concatenated with the states after ``intermediate_layers_indices``
(real [3, 7, 15, 23, 30]; here [0]), so ``vision_output_dim`` = 2 x 32. Text: 3 layers,
layer 1 a cross-attention layer (real [3, 8, 13, ...] of 40), llama3 RoPE scaling as the
real one, untied lm_head.
"""

from __future__ import annotations

from pathlib import Path

# Llama-3.2-11B-Vision-Instruct's chat template, written after the real one: BOS from the
# template (and again from the tokenizer's post-processor when the rendered text is
# tokenized with special tokens, as with the real tokenizer), no system block when an image
# is present (the real template refuses a system message beside an image), the knowledge
# cutoff system block otherwise; each turn is a header + content + <|eot_id|>.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- if messages[0]['content'] is string %}{%- set system_message = messages[0]['content'] | trim %}"
    "{%- else %}{%- set system_message = messages[0]['content'][0]['text'] | trim %}{%- endif %}"
    "{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{%- set image_ns = namespace(has_images=false) %}"
    "{%- for message in messages %}"
    "{%- if message['content'] is not string %}"
    "{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' %}{%- set image_ns.has_images = true %}{%- endif %}"
    "{%- endfor %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if image_ns.has_images and not system_message == '' %}"
    "{{- raise_exception('Prompting with images is incompatible with system messages.') }}"
    "{%- endif %}"
    "{%- if not image_ns.has_images %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}"
    "{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message }}"
    "{{- '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}"
    "{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' %}{{- '<|image|>' }}"
    "{%- elif content['type'] == 'text' %}{{- content['text'] }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

TILE_SIZE = 28  # size {height, width} == vision image_size
PATCH_SIZE = 14
MAX_IMAGE_TILES = 4

# Llama 3's special tokens, in the real order (128000 ...); <|image|> is added last.
SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
]
IMAGE_TOKEN = "<|image|>"


def build_mllama(out_dir: Path, seed: int) -> None:
    import torch
    from tokenizers import AddedToken
    from transformers import (
        MllamaConfig,
        MllamaForConditionalGeneration,
        MllamaImageProcessorPil,
        MllamaProcessor,
    )
    from transformers.image_utils import PILImageResampling

    from mmsafe.models.zoo._tokenizers import train_tokenizer

    tokenizer = train_tokenizer(
        "byte-level",
        SPECIAL_TOKENS,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        add_bos=True,  # the real Llama 3 tokenizer's TemplateProcessing prepends <|begin_of_text|>
        chat_template=CHAT_TEMPLATE,
    )
    # The real <|image|> (128256) comes after the whole vocabulary, == text vocab_size.
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert image_token_id == len(tokenizer) - 1
    bos_id = tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
    end_of_text_id = tokenizer.convert_tokens_to_ids("<|end_of_text|>")
    eom_id = tokenizer.convert_tokens_to_ids("<|eom_id|>")
    eot_id = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    pad_id = tokenizer.convert_tokens_to_ids("<|finetune_right_pad_id|>")

    image_processor = MllamaImageProcessorPil(
        do_convert_rgb=True,
        do_normalize=True,
        do_pad=True,
        do_rescale=True,
        do_resize=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        max_image_tiles=MAX_IMAGE_TILES,
        resample=PILImageResampling.BILINEAR,
        rescale_factor=1 / 255,
        size={"height": TILE_SIZE, "width": TILE_SIZE},
    )
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)

    vision_hidden = 32
    intermediate_layers_indices = [0]
    config = MllamaConfig(  # type: ignore[call-arg]  # transformers configs take extra keys (**kwargs) their typed fields do not list
        vision_config={
            "hidden_size": vision_hidden,
            "hidden_act": "gelu",
            "num_hidden_layers": 1,
            "num_global_layers": 1,
            "attention_heads": 2,
            "num_channels": 3,
            "intermediate_size": 64,
            "vision_output_dim": vision_hidden * (len(intermediate_layers_indices) + 1),
            "image_size": TILE_SIZE,
            "patch_size": PATCH_SIZE,
            "norm_eps": 1e-5,
            "max_num_tiles": MAX_IMAGE_TILES,
            "intermediate_layers_indices": intermediate_layers_indices,
            "supported_aspect_ratios": [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
        },
        text_config={
            "vocab_size": image_token_id,  # lm_head size; embed_tokens has vocab_size + 8 rows
            "hidden_size": 64,
            "hidden_act": "silu",
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 128,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            "rms_norm_eps": 1e-5,
            "max_position_embeddings": 131072,
            "tie_word_embeddings": False,
            "cross_attention_layers": [1],
            "bos_token_id": bos_id,
            "eos_token_id": eot_id,
            "pad_token_id": pad_id,
        },
        image_token_index=image_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(config).eval()
    generation = model.generation_config
    generation.bos_token_id = bos_id
    generation.eos_token_id = [end_of_text_id, eom_id, eot_id]  # as the real generation_config.json
    generation.pad_token_id = pad_id
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
