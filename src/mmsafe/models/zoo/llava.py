"""Tiny LLaVA-family checkpoints: LLaVA-1.5, LLaVA-NeXT (Mistral) and LLaVA-OneVision (Qwen2).

Each follows one real llava-hf checkpoint, scaled down:

* ``build_llava_15``: llava-hf/llava-1.5-7b-hf. CLIP vision tower (vision_feature_layer -2,
  "default" strategy drops the class token), 2-layer GELU MLP projector, Llama language
  model, legacy Llama SentencePiece tokenizer (BOS added) with ``<image>``/``<pad>`` added
  after the vocabulary, CLIPImageProcessor (shortest edge + centre crop, OpenAI CLIP mean/std).
* ``build_llava_next``: llava-hf/llava-v1.6-mistral-7b-hf. As above plus any-resolution
  tiles (``image_grid_pinpoints`` scaled by the same factor as the tile size, 336 -> 42),
  ``image_newline``, Mistral language model (GQA, no sliding window, rope_theta 1e6) and
  the ``[INST] ... [/INST]`` chat template.
* ``build_llava_onevision``: llava-hf/llava-onevision-qwen2-0.5b-ov-hf. SigLIP vision tower
  (last layer, "full" strategy: no class token), Qwen2 language model with tied embeddings,
  byte-level tokenizer with the Qwen specials, 6x6 "anyres_max_9" pinpoints (384 -> 28),
  SigLIP mean/std 0.5, the ChatML template. Its processor is built without its video
  processor (video processors need torchvision).
"""

from __future__ import annotations

from pathlib import Path

# llava-hf/llava-1.5-7b-hf's template: "USER: <image>\n{text} ASSISTANT: {answer} USER: ... ASSISTANT:"
# (a system message is written bare, turns are separated by a space, no </s> between turns).
LLAVA_15_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}"
    "{% if message['role'] != 'assistant' %}{{ message['content'] + ' ' }}"
    "{% else %}{% generation %}{{ message['content'] + ' ' }}{% endgeneration %}{% endif %}"
    "{% else %}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' ' }}{% endgeneration %}"
    "{% endfor %}"
    "{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# llava-hf/llava-v1.6-mistral-7b-hf's template: "[INST] <image>\n{text} [/INST] {answer}</s> [INST] ..."
# It has no generation prompt: a user turn already ends with " [/INST]".
LLAVA_NEXT_MISTRAL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}{% else %}{% set text = message['content'][0]['text'] %}{% endif %}"
    "{{ '<<SYS>>\n' + text + '\n<</SYS>>\n\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{{ '[INST] ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% endif %}"
    "{{ ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}{% else %}{% set text = message['content'][0]['text'] %}{% endif %}"
    "{{ ' ' + text + '</s> ' }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}"
    "{% endfor %}"
)

# llava-hf/llava-onevision-qwen2-*-ov-hf's template:
# "<|im_start|>user\n<image>\n{text}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n"
LLAVA_ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}"
    "{% if message['role'] != 'assistant' %}{{ message['content'] }}"
    "{% else %}{% generation %}{{ message['content'] }}{% endgeneration %}{% endif %}"
    "{% else %}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all video then #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}"
    "{% endfor %}"
    "{% endif %}"
    "{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
SIGLIP_MEAN = [0.5, 0.5, 0.5]
SIGLIP_STD = [0.5, 0.5, 0.5]

PATCH_SIZE = 14
LLAVA_15_IMAGE_SIZE = 56  # 336 in the real one: 4x4 = 16 image tokens here (576 there)
LLAVA_NEXT_TILE_SIZE = 42  # 336 in the real one (scale 1/8): 3x3 patches a tile
# llava-v1.6's pinpoints [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]], scaled by 1/8.
LLAVA_NEXT_PINPOINTS = [
    [LLAVA_NEXT_TILE_SIZE * h, LLAVA_NEXT_TILE_SIZE * w] for h, w in ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))
]
ONEVISION_TILE_SIZE = 28  # 384 in the real one: 2x2 patches a tile (27x27 = 729 there)
# llava-onevision's anyres_max_9 pinpoints: every (i, j) tile grid with 1 <= i, j <= 6.
ONEVISION_PINPOINTS = [[ONEVISION_TILE_SIZE * i, ONEVISION_TILE_SIZE * j] for i in range(1, 7) for j in range(1, 7)]

LLAMA_LEGACY_CORPUS = (
    "USER: <image>\nWhat is shown in this image? ASSISTANT: The image shows a person.",
    "[INST] <image>\nWhat is shown in this image? [/INST] The image shows a place.",
)
CHATML_CORPUS = (
    "<|im_start|>user\nWhat is shown in this image?<|im_end|>\n<|im_start|>assistant\nThe image shows a person.",
)


def _llama_legacy_tokenizer(chat_template: str):
    """Legacy Llama-2 SentencePiece form: <unk> 0, <s> 1, </s> 2, bytes, pieces; then <image>, <pad> added."""
    from mmsafe.models.zoo._tokenizers import train_tokenizer

    base = train_tokenizer(
        "llama-legacy",
        ["<unk>", "<s>", "</s>"],
        bos_token="<s>",
        eos_token="</s>",
        pad_token=None,
        unk_token="<unk>",
        add_bos=True,
        extra_corpus=LLAMA_LEGACY_CORPUS,
    )
    # As in llava-hf's conversions: <image> (32000 there) then <pad> (32001) appended to the vocabulary.
    return _with_added_specials(
        base,
        ["<image>", "<pad>"],
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        chat_template=chat_template,
        extra_special_tokens={"image_token": "<image>"},
    )


def _with_added_specials(base, added: list[str], **kwargs):
    """``base``'s backend with ``added`` appended, in this order, as special added tokens."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    backend = base.backend_tokenizer
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in added])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, padding_side="left", **kwargs)
    ids = tokenizer.convert_tokens_to_ids(added)
    start = len(tokenizer) - len(added)
    if ids != list(range(start, len(tokenizer))):
        raise RuntimeError(f"added tokens {added} got ids {ids}, expected the last {len(added)} of {len(tokenizer)}")
    return tokenizer


def _clip_vision_config(image_size: int):
    from transformers import CLIPVisionConfig

    from mmsafe.models.tiny import TinyModelSpec

    spec = TinyModelSpec()
    return CLIPVisionConfig(
        hidden_size=spec.vision_hidden_size,
        intermediate_size=spec.vision_hidden_size * 2,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=image_size,
        patch_size=PATCH_SIZE,
        projection_dim=spec.vision_hidden_size,
        hidden_act="quick_gelu",
    )


def _set_generation_ids(model, tokenizer) -> None:
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id


def _save(model, processor, out_dir: Path) -> None:
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)


def build_llava_15(out_dir: Path, seed: int) -> None:
    """llava-hf/llava-1.5-7b-hf, tiny: CLIP (56 px, patch 14), Llama, 16 image tokens an image."""
    import torch
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip import CLIPImageProcessorPil

    tokenizer = _llama_legacy_tokenizer(LLAVA_15_CHAT_TEMPLATE)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": LLAVA_15_IMAGE_SIZE},
        crop_size={"height": LLAVA_15_IMAGE_SIZE, "width": LLAVA_15_IMAGE_SIZE},
        do_resize=True,
        do_center_crop=True,
        do_rescale=True,
        do_normalize=True,
        do_convert_rgb=True,
        resample=3,  # bicubic
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        chat_template=LLAVA_15_CHAT_TEMPLATE,
        image_token="<image>",
        num_additional_image_tokens=1,  # the CLIP class token, dropped by the "default" strategy
    )
    text = LlamaConfig(  # type: ignore[call-arg]  # transformers configs take extra keys (**kwargs) their typed fields do not list
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,  # Llama-2 7B / Vicuna: full multi-head attention
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=_clip_vision_config(LLAVA_15_IMAGE_SIZE),
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(LLAVA_15_IMAGE_SIZE // PATCH_SIZE) ** 2,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    _set_generation_ids(model, tokenizer)
    _save(model, processor, out_dir)


def build_llava_next(out_dir: Path, seed: int) -> None:
    """llava-hf/llava-v1.6-mistral-7b-hf, tiny: CLIP (42 px tiles), anyres pinpoints /8, Mistral."""
    import torch
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor, MistralConfig
    from transformers.models.llava_next import LlavaNextImageProcessorPil

    tokenizer = _llama_legacy_tokenizer(LLAVA_NEXT_MISTRAL_CHAT_TEMPLATE)
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": LLAVA_NEXT_TILE_SIZE},
        crop_size={"height": LLAVA_NEXT_TILE_SIZE, "width": LLAVA_NEXT_TILE_SIZE},
        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
        do_resize=True,
        do_center_crop=True,
        do_rescale=True,
        do_normalize=True,
        do_convert_rgb=True,
        do_pad=True,
        resample=3,  # bicubic
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        chat_template=LLAVA_NEXT_MISTRAL_CHAT_TEMPLATE,
        image_token="<image>",
        num_additional_image_tokens=1,
    )
    text = MistralConfig(  # type: ignore[call-arg]  # transformers configs take extra keys (**kwargs) their typed fields do not list
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # Mistral 7B: grouped-query attention (32 heads, 8 KV heads)
        head_dim=16,
        max_position_embeddings=32768,
        rms_norm_eps=1e-5,
        rope_theta=1000000.0,
        sliding_window=None,  # Mistral-7B-Instruct-v0.2: no sliding window
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaNextConfig(
        vision_config=_clip_vision_config(LLAVA_NEXT_TILE_SIZE),
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
        image_seq_length=(LLAVA_NEXT_TILE_SIZE // PATCH_SIZE) ** 2,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    _set_generation_ids(model, tokenizer)
    _save(model, processor, out_dir)


def build_llava_onevision(out_dir: Path, seed: int) -> None:
    """llava-hf/llava-onevision-qwen2-0.5b-ov-hf, tiny: SigLIP (28 px tiles), 6x6 pinpoints, Qwen2."""
    import torch
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )
    from transformers.models.llava_onevision import LlavaOnevisionImageProcessorPil

    from mmsafe.models.loading import image_only_processor_class
    from mmsafe.models.zoo._tokenizers import train_tokenizer

    # Qwen2's byte-level BPE; its specials follow the vocabulary: <|endoftext|>, <|im_start|>,
    # <|im_end|>, then llava-hf's <image> and <video>. Chat eos is <|im_end|>, pad <|endoftext|>, no BOS.
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
    base = train_tokenizer(
        "byte-level", [], bos_token=None, eos_token="<|endoftext|>", pad_token=None, extra_corpus=CHATML_CORPUS
    )
    tokenizer = _with_added_specials(
        base,
        specials,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=LLAVA_ONEVISION_CHAT_TEMPLATE,
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
    )
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": ONEVISION_TILE_SIZE, "width": ONEVISION_TILE_SIZE},
        image_grid_pinpoints=ONEVISION_PINPOINTS,
        do_resize=True,
        do_rescale=True,
        do_normalize=True,
        do_convert_rgb=True,
        do_pad=True,
        resample=3,  # bicubic
        image_mean=SIGLIP_MEAN,
        image_std=SIGLIP_STD,
    )
    num_image_tokens = (ONEVISION_TILE_SIZE // PATCH_SIZE) ** 2
    processor_class = image_only_processor_class(LlavaOnevisionProcessor)
    processor = processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=num_image_tokens,
        vision_feature_select_strategy="full",
        chat_template=LLAVA_ONEVISION_CHAT_TEMPLATE,
        image_token="<image>",
        video_token="<video>",
        vision_aspect_ratio="anyres_max_9",
    )
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=ONEVISION_TILE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        vision_use_head=False,
    )
    text = Qwen2Config(  # type: ignore[call-arg]  # transformers configs take extra keys (**kwargs) their typed fields do not list
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # Qwen2-0.5B: 14 heads, 2 KV heads
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        use_sliding_window=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,  # Qwen2-0.5B ties its embeddings
    )
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=ONEVISION_PINPOINTS,
        vision_aspect_ratio="anyres_max_9",
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        multimodal_projector_bias=True,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    _set_generation_ids(model, tokenizer)
    _save(model, processor, out_dir)
