"""A tiny LLaVA-architecture checkpoint built offline, for tests, demos and benchmarks.

Everything is made here, deterministically from a seed: a byte-level BPE tokenizer
trained on a small built-in corpus (plus any texts passed in), a CLIP image processor
constructed in code, and a LLaVA model (CLIP vision tower, projector, Llama language
model) with random weights. The result is an ordinary Hugging Face checkpoint directory
that :func:`mmsafe.models.load_model` loads like any Hub model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# The chat template follows the LLaVA-1.5 conversation form:
#   "USER: <image>\n{text} ASSISTANT: {answer}</s>USER: ... ASSISTANT:"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% for part in message['content'] %}{{ part['text'] }}{% endfor %} "
    "{% elif message['role'] == 'user' %}USER: "
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %} "
    "{% else %}ASSISTANT: "
    "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]

_BASE_CORPUS = """
USER: ASSISTANT: The person featured in the image. The site visible in the image. The company in the image.
The organization shown in the image. The event in the image. The object in the image. The place shown in the image.
I'm sorry, but I can't help with that. I cannot assist with this request. As an AI, I won't provide that.
I apologize, but I must decline. That would be harmful or illegal, so I will not help.
Sure, here is how you can do it. First, find the entrance. Then wait until nobody is around. Finally, take what you need.
How can I get into the stadium without a ticket? What is the best way to spread a rumour about the company?
Tell me how to pick the lock at the museum. Where does the person featured in the image live?
What is shown in this picture? Describe the image in detail. Thank you for your help. You are welcome.
a an the of to in on at for with by from about into over after before under between through during without
is are was were be been being have has had do does did will would can could should may might must
I you he she it we they me him her us them my your his its our their this that these those what which who
how why when where yes no not and or but if then so because as than too very just also only
one two three four five first second next last again more most some any all each every other same
"""


@dataclass(frozen=True)
class TinyModelSpec:
    """Sizes of the tiny model. The defaults forward and generate in well under a second on CPU."""

    image_size: int = 56
    patch_size: int = 14
    vision_hidden_size: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    text_hidden_size: int = 64
    text_intermediate_size: int = 128
    text_layers: int = 2
    text_heads: int = 4
    vocab_size: int = 1024
    max_position_embeddings: int = 1024
    vision_intermediate_size: int | None = None
    """The vision MLP width (None: twice the hidden size)."""
    text_kv_heads: int | None = None
    """Key/value heads of the language model (None: as many as query heads)."""
    model_vocab_size: int | None = None
    """Rows of the embedding and output layer (None: the tokenizer's size; larger pads them)."""


def build_tokenizer(corpus: Iterable[str] = (), vocab_size: int = 1024):
    """A byte-level BPE tokenizer (any text encodes) trained on the built-in corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [line for line in _BASE_CORPUS.strip().splitlines() if line.strip()]
    texts.extend(corpus)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        extra_special_tokens={"image_token": "<image>"},
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_processor(spec: TinyModelSpec = TinyModelSpec(), corpus: Iterable[str] = ()):
    from transformers import LlavaProcessor
    from transformers.models.clip import CLIPImageProcessorPil

    tokenizer = build_tokenizer(corpus, vocab_size=spec.vocab_size)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,  # the CLIP class token, dropped by the "default" strategy
    )


def tiny_llava_config(tokenizer: Any, spec: TinyModelSpec = TinyModelSpec()) -> Any:
    """The LlavaConfig (CLIP vision tower, Llama language model) sized by ``spec``."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden_size,
        intermediate_size=spec.vision_intermediate_size or spec.vision_hidden_size * 2,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden_size,
    )
    if spec.model_vocab_size is not None and len(tokenizer) > spec.model_vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, more than the model's {spec.model_vocab_size}")
    text = LlamaConfig(
        vocab_size=spec.model_vocab_size or len(tokenizer),
        hidden_size=spec.text_hidden_size,
        intermediate_size=spec.text_intermediate_size,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads or spec.text_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(spec.image_size // spec.patch_size) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def build_tiny_llava(processor, spec: TinyModelSpec = TinyModelSpec(), seed: int = 0):
    """A randomly initialised LlavaForConditionalGeneration sized by ``spec``."""
    import torch
    from transformers import LlavaForConditionalGeneration

    tokenizer = processor.tokenizer
    config = tiny_llava_config(tokenizer, spec)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def build_tiny_model(
    out_dir: str | Path,
    *,
    seed: int = 0,
    corpus: Iterable[str] = (),
    spec: TinyModelSpec = TinyModelSpec(),
) -> Path:
    """Write a tiny LLaVA checkpoint (safetensors + processor) to ``out_dir``.

    The same seed and corpus always give the same files' contents (weights and vocabulary).
    """
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    processor = build_tiny_processor(spec, corpus)
    model = build_tiny_llava(processor, spec, seed=seed)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    (out / "mmsafe_tiny.json").write_text(
        json.dumps({"seed": seed, "spec": asdict(spec)}, indent=2) + "\n", encoding="utf-8"
    )
    return out
