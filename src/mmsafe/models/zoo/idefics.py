"""Idefics3 / SmolVLM, after HuggingFaceTB/SmolVLM-256M-Instruct.

SmolVLM-256M-Instruct is an ``idefics3`` checkpoint (``Idefics3ForConditionalGeneration``,
``Idefics3Processor``); the ``smolvlm`` model type is SmolVLM2's, whose processor also
needs a video processor. The language model (a Llama, SmolLM2) is ``model.text_model``,
the SigLIP tower ``model.vision_model``, the pixel-shuffle MLP ``model.connector``.

Scaled down: sub-images of 64 px (real 512) in 8 px patches (real 16), pixel shuffle
``scale_factor`` 4 as the real one, so each sub-image gives 64 / 16 = 4 ``<image>`` tokens
(``image_seq_len``; real 64). The image is first resized to a longest edge of 128 (real
2048 = 4 x 512; 2x here so one image stays under ~64 image tokens) and split into 64 px
tiles plus a global image: a square image gives 2 x 2 tiles + 1 global = 5 sub-images,
20 ``<image>`` tokens.
"""

from __future__ import annotations

from pathlib import Path

# SmolVLM-256M-Instruct's chat template, written after the real one: one ``<|im_start|>``
# opens the conversation, each turn is "Role:" (no space before an image) + content +
# ``<end_of_utterance>\n``; the generation prompt is ``Assistant:``.
CHAT_TEMPLATE = (
    "<|im_start|>"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}"
    "{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}"
    "{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<end_of_utterance>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

IMAGE_SIZE = 64  # max_image_size longest_edge == vision image_size
PATCH_SIZE = 8
SCALE_FACTOR = 4
IMAGE_SEQ_LEN = (IMAGE_SIZE // PATCH_SIZE) ** 2 // SCALE_FACTOR**2  # 4


def build_idefics3(out_dir: Path, seed: int) -> None:
    import torch
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
    )
    from transformers.image_utils import PILImageResampling

    from mmsafe.models.zoo._tokenizers import train_tokenizer

    row_col = [f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)]
    # The real vocabulary: <|endoftext|> 0 (unk), <|im_start|> 1 (bos), <|im_end|> 2 (pad), ...,
    # then added tokens <fake_token_around_image>, <image>, <global-img>, the 36 row/col
    # tokens and <end_of_utterance> (eos, the end of every turn).
    special_tokens = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<fake_token_around_image>",
        "<image>",
        "<global-img>",
        *row_col,
        "<end_of_utterance>",
    ]
    tokenizer = train_tokenizer(
        "byte-level",
        special_tokens,
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        add_bos=False,
        chat_template=CHAT_TEMPLATE,
        extra_special_tokens={
            "fake_image_token": "<fake_token_around_image>",
            "image_token": "<image>",
            "end_of_utterance_token": "<end_of_utterance>",
        },
    )
    image_processor = Idefics3ImageProcessorPil(
        do_convert_rgb=True,
        do_resize=True,
        size={"longest_edge": 2 * IMAGE_SIZE},
        resample=PILImageResampling.LANCZOS,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_image_splitting=True,
        max_image_size={"longest_edge": IMAGE_SIZE},
        do_pad=True,
    )
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=IMAGE_SEQ_LEN, chat_template=CHAT_TEMPLATE
    )

    vocab_size = len(tokenizer)
    bos_id = tokenizer.convert_tokens_to_ids("<|im_start|>")
    eos_id = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    pad_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = Idefics3Config(  # type: ignore[call-arg]  # transformers configs take extra keys (**kwargs) their typed fields do not list
        text_config={
            "model_type": "llama",
            "vocab_size": vocab_size,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "max_position_embeddings": 1024,
            "rms_norm_eps": 1e-5,
            "rope_theta": 100000.0,
            "tie_word_embeddings": False,
            "bos_token_id": bos_id,
            "eos_token_id": eos_id,
            "pad_token_id": pad_id,
        },
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH_SIZE,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6,
        },
        scale_factor=SCALE_FACTOR,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=False,
        pad_token_id=pad_id,
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config).eval()
    model.generation_config.bos_token_id = bos_id
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = pad_id
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
