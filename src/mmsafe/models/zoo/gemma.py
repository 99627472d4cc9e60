"""Tiny Gemma 3 and PaliGemma 2 checkpoints.

* Gemma 3 (after ``google/gemma-3-4b-it``): SigLIP vision tower, a projector that
  average-pools the patch grid down to ``mm_tokens_per_image`` soft tokens, a language
  model with interleaved sliding-window and full-attention layers, and bidirectional
  attention inside each image (the processor marks image tokens with ``token_type_ids``).
  The processor expands ``<start_of_image>`` into
  ``\\n\\n<start_of_image><image_soft_token>*N<end_of_image>\\n\\n``.
* PaliGemma 2 (after ``google/paligemma2-3b-pt-224``): SigLIP, a linear projector, a Gemma 2
  language model (logit soft-capping, ``query_pre_attn_scalar``, sliding/full layers) used as
  a prefix LM. No chat template: the processor builds ``<image>*N<bos>prompt\\n`` itself
  and, given ``suffix=``, appends ``suffix<eos>`` with ``token_type_ids`` 1 and ``labels``.
"""

from __future__ import annotations

from pathlib import Path

from mmsafe.models.zoo._tokenizers import train_tokenizer

# SigLIP normalisation as in both real preprocessor configs.
_SIGLIP_MEAN = [0.5, 0.5, 0.5]
_SIGLIP_STD = [0.5, 0.5, 0.5]

# Written after the real Gemma 3 template: the system message is folded into the first
# user turn, "assistant" is rendered as "model", text is trimmed, an image becomes
# <start_of_image> (expanded by the processor).
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}"
    "{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}"
    "{{ item['text'] | trim }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}"
    "{{ raise_exception('Invalid content type') }}"
    "{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<start_of_turn>model\n' }}"
    "{%- endif -%}"
)

# Gemma's own first ids: <pad> 0, <eos> 1, <bos> 2, <unk> 3, <mask> 4.
_GEMMA_BASE_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]


def build_gemma3(out_dir: Path, seed: int) -> None:
    import torch
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
        GenerationConfig,
    )
    from transformers.image_utils import PILImageResampling

    specials = [*_GEMMA_BASE_SPECIALS, "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
    tokenizer = train_tokenizer(
        "gemma",
        specials,
        bos_token="<bos>",
        # As the real tokenizer: its eos is <eos>, while an assistant turn ends with
        # <end_of_turn>; the generation config stops at both. Code that took the
        # tokenizer's eos as the end of an answer would train the wrong token.
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        add_bos=True,
        chat_template=GEMMA3_CHAT_TEMPLATE,
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    )
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in specials}
    eos_ids = [ids["<eos>"], ids["<end_of_turn>"]]

    # Real: 896 px, patch 14 -> 64x64 patches, pooled (kernel 4) to 16x16 = 256 tokens.
    # Here: 112 px, patch 14 -> 8x8 patches, pooled (kernel 2) to 4x4 = 16 tokens.
    image_size, patch_size, mm_tokens_per_image = 112, 14, 16
    image_processor = Gemma3ImageProcessorPil(
        size={"height": image_size, "width": image_size},
        resample=PILImageResampling.BILINEAR,
        image_mean=_SIGLIP_MEAN,
        image_std=_SIGLIP_STD,
        do_convert_rgb=None,
        do_pan_and_scan=None,  # null in the real config; the processor's default is False
        pan_and_scan_min_crop_size=None,
        pan_and_scan_max_num_crops=None,
        pan_and_scan_min_ratio_to_activate=None,
        do_resize=True,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
    )
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=GEMMA3_CHAT_TEMPLATE,
        image_seq_length=mm_tokens_per_image,
    )

    config = Gemma3Config(  # type: ignore[call-arg]  # transformers configs take extra keys (**kwargs) their typed fields do not list
        text_config={
            "model_type": "gemma3_text",
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "layer_types": ["sliding_attention", "full_attention"],
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "query_pre_attn_scalar": 16,  # = head_dim, as in the 4B model (256 = head_dim)
            "hidden_activation": "gelu_pytorch_tanh",
            "sliding_window": 32,  # real 1024; small enough that it matters on tiny prompts
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            },
            "final_logit_softcapping": None,
            "attn_logit_softcapping": None,
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 131_072,
            "pad_token_id": ids["<pad>"],
            "bos_token_id": ids["<bos>"],
            "eos_token_id": eos_ids,
            "tie_word_embeddings": True,
        },
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": patch_size,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6,
            "vision_use_head": False,
        },
        mm_tokens_per_image=mm_tokens_per_image,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
        tie_word_embeddings=True,
        pad_token_id=ids["<pad>"],
        bos_token_id=ids["<bos>"],
        eos_token_id=eos_ids,
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<bos>"], eos_token_id=eos_ids, pad_token_id=ids["<pad>"], cache_implementation="hybrid"
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)


def build_paligemma2(out_dir: Path, seed: int) -> None:
    import torch
    from transformers import (
        GenerationConfig,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessorPil,
    )
    from transformers.image_utils import PILImageResampling

    specials = [*_GEMMA_BASE_SPECIALS, "<image>"]
    # No chat template (PaliGemma has none). BOS is added by the tokenizer as in the real
    # Gemma tokenizer; PaliGemmaProcessor switches it off and inserts <bos> after the image
    # tokens itself. It also adds the 1024 <locNNNN> and 128 <segNNN> tokens.
    tokenizer = train_tokenizer(
        "gemma",
        specials,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        add_bos=True,
        extra_special_tokens={"image_token": "<image>"},
    )

    # Real: 224 px, patch 14 -> 16x16 = 256 image tokens (no pooling). Here: 56 px -> 4x4 = 16.
    image_size, patch_size = 56, 14
    image_seq_length = (image_size // patch_size) ** 2
    image_processor = SiglipImageProcessorPil(
        size={"height": image_size, "width": image_size},
        resample=PILImageResampling.BICUBIC,
        image_mean=_SIGLIP_MEAN,
        image_std=_SIGLIP_STD,
        do_convert_rgb=None,
        do_resize=True,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
    )
    image_processor.image_seq_length = image_seq_length  # type: ignore[attr-defined]  # not declared; PaliGemmaProcessor reads it from here
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in specials}

    hidden = 64
    config = PaliGemmaConfig(  # type: ignore[call-arg]  # transformers configs take extra keys (**kwargs) their typed fields do not list
        text_config={
            "model_type": "gemma2",
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "layer_types": ["sliding_attention", "full_attention"],
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "query_pre_attn_scalar": 16,  # = head_dim, as in the 3B model (256 = head_dim)
            "hidden_activation": "gelu_pytorch_tanh",
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
            "sliding_window": 32,  # real 4096
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 8192,
            "pad_token_id": ids["<pad>"],
            "bos_token_id": ids["<bos>"],
            "eos_token_id": ids["<eos>"],
            "tie_word_embeddings": True,
        },
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": patch_size,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6,
            "vision_use_head": False,
            "projection_dim": hidden,
        },
        image_token_index=ids["<image>"],
        vocab_size=len(tokenizer),
        projection_dim=hidden,
        hidden_size=hidden,
        tie_word_embeddings=True,
        pad_token_id=ids["<pad>"],
        bos_token_id=ids["<bos>"],
        eos_token_id=ids["<eos>"],
    )
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<bos>"], eos_token_id=ids["<eos>"], pad_token_id=ids["<pad>"], cache_implementation="hybrid"
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.add_bos_token = True  # saved as the real one (BOS on); the processor turns it off when loaded
    processor.save_pretrained(out_dir)
