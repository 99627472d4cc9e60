"""Tokenizers in the form of the real ones, trained offline on a small corpus.

The form matters more than the vocabulary: a SentencePiece tokenizer in the legacy Llama
form (normalizer ``Prepend("▁")`` + ``Replace(" ", "▁")``, no pre-tokenizer) puts a lone
``▁`` before a string that starts with a space, a byte-level BPE does not, a Gemma-form
one neither prepends nor splits. Tests that use only one form hide the others' traps.

* ``byte-level``: GPT-2 style byte-level BPE (Qwen, Llama 3, Mistral Tekken, SmolLM, LFM2).
* ``llama-legacy``: SentencePiece BPE, legacy Llama-2 form (LLaVA-1.5, LLaVA-NeXT/Vicuna,
  Mistral v1-v3), BOS added by the post-processor.
* ``gemma``: SentencePiece BPE in Gemma's form (``Replace(" ", "▁")``, no prepend), BOS
  added by the post-processor.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

from mmsafe.models.tiny import _BASE_CORPUS

TokenizerForm = Literal["byte-level", "llama-legacy", "gemma"]


def corpus_lines(extra: Iterable[str] = ()) -> list[str]:
    lines = [line for line in _BASE_CORPUS.strip().splitlines() if line.strip()]
    lines.extend(extra)
    return lines


def train_tokenizer(
    form: TokenizerForm,
    special_tokens: Sequence[str],
    *,
    bos_token: str | None,
    eos_token: str,
    pad_token: str | None,
    unk_token: str | None = None,
    vocab_size: int = 512,
    add_bos: bool = False,
    chat_template: str | None = None,
    extra_corpus: Iterable[str] = (),
    padding_side: str = "left",
    extra_special_tokens: dict[str, str] | None = None,
):
    """A ``PreTrainedTokenizerFast`` of the given form whose first ids are ``special_tokens``.

    ``add_bos``: the post-processor prepends ``bos_token`` (as Llama-2 and Gemma do).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    lines = corpus_lines(extra_corpus)
    if form == "byte-level":
        tokenizer = Tokenizer(models.BPE(unk_token=unk_token))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(special_tokens),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(lines, trainer=trainer)
    else:
        tokenizer = _sentencepiece_bpe(form, lines, special_tokens, unk_token, vocab_size)
    if add_bos and bos_token is not None:
        bos_id = tokenizer.token_to_id(bos_token)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B", special_tokens=[(bos_token, bos_id)]
        )
    kwargs: dict[str, Any] = {}
    if unk_token is not None:
        kwargs["unk_token"] = unk_token
    if bos_token is not None:
        kwargs["bos_token"] = bos_token
    if pad_token is not None:
        kwargs["pad_token"] = pad_token
    if extra_special_tokens:
        kwargs["extra_special_tokens"] = extra_special_tokens
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=eos_token,
        padding_side=padding_side,
        chat_template=chat_template,
        **kwargs,
    )


def _sentencepiece_bpe(
    form: TokenizerForm, lines: list[str], special_tokens: Sequence[str], unk_token: str | None, vocab_size: int
):
    """SentencePiece-style BPE: pieces start with ``▁``, 256 byte-fallback pieces after the specials.

    Merges are learned word by word (``▁word``), as SentencePiece does, then the word
    splitting is removed: the real tokenizers of this form have no pre-tokenizer, which is
    what makes a leading space its own ``▁`` piece.
    """
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    training = Tokenizer(models.BPE(unk_token=unk_token))
    training.normalizer = normalizers.Replace(" ", "▁")
    training.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="always" if form == "llama-legacy" else "never", split=True
    )
    alphabet = sorted({character for line in lines for character in line.replace(" ", "▁")})
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(special_tokens), initial_alphabet=alphabet, show_progress=False
    )
    training.train_from_iterator(lines, trainer=trainer)
    state = json.loads(training.to_str())
    learned = sorted(state["model"]["vocab"].items(), key=lambda item: item[1])
    pieces = [piece for piece, _ in learned if piece not in special_tokens]
    ordered = [*special_tokens, *(f"<0x{value:02X}>" for value in range(256)), *pieces]
    vocab = {piece: index for index, piece in enumerate(ordered)}
    # each merge is "left right" (older tokenizers) or [left, right]
    pairs = (merge.split(" ") if isinstance(merge, str) else merge for merge in state["model"]["merges"])
    merges = [(left, right) for left, right in pairs]
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=unk_token, byte_fallback=True, fuse_unk=True)
    )
    tokenizer.add_special_tokens(list(special_tokens))
    if form == "llama-legacy":
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tokenizer.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
    else:  # gemma: spaces become ▁, nothing is prepended
        tokenizer.normalizer = normalizers.Replace(" ", "▁")
        tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tokenizer
