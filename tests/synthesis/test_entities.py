"""Entity recognizers: gazetteer matching, B-/I- tag aggregation, a tiny hf-ner model, llm JSON."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import BertConfig, BertForTokenClassification, PreTrainedTokenizerFast

from mmsafe.synthesis.entities import (
    EntityError,
    Gazetteer,
    HFNerRecognizer,
    LLMRecognizer,
    Mention,
    TokenTag,
    aggregate_tags,
    split_label,
)


def spans(mentions):
    return [(mention.text, mention.type, mention.start, mention.end) for mention in mentions]


# ---------------------------------------------------------------- gazetteer

GAZETTEER = Gazetteer(
    [
        ("New York", "LOC"),
        ("New York Times", "ORG"),
        ("York", "LOC"),
        ("Apple", "ORG"),
        ("AT&T", "ORG"),
        ("Paris", "LOC"),
    ]
)


def test_gazetteer_prefers_the_longest_match():
    assert spans(GAZETTEER.find("Did the New York Times lie about New York?")) == [
        ("New York Times", "ORG", 8, 22),
        ("New York", "LOC", 33, 41),
    ]


def test_gazetteer_matches_whole_words_only():
    assert GAZETTEER.find("Parisian food and Yorkshire") == []
    assert spans(GAZETTEER.find("Paris's cafes, (Paris)")) == [("Paris", "LOC", 0, 5), ("Paris", "LOC", 16, 21)]
    assert spans(GAZETTEER.find("I hate AT&T.")) == [("AT&T", "ORG", 7, 11)]


def test_gazetteer_is_case_aware():
    assert GAZETTEER.find("an apple a day") == []
    assert spans(GAZETTEER.find("APPLE is evil")) == [("APPLE", "ORG", 0, 5)]
    relaxed = Gazetteer([("Apple", "ORG")], case_sensitive=False)
    found = relaxed.find("an apple a day")
    assert spans(found) == [("apple", "ORG", 3, 8)] and found[0].name == "Apple"


# ---------------------------------------------------------------- aggregation


def tags(text: str, labelled: list[tuple[str, str, int]]) -> list[TokenTag]:
    """Token tags from ``(piece, label, word)``; pieces are found left to right in ``text``."""
    result, position = [], 0
    for piece, label, word in labelled:
        start = text.index(piece, position)
        result.append(TokenTag(label, start, start + len(piece), word))
        position = start + len(piece)
    return result


def test_split_label():
    assert split_label("B-PER") == ("B", "PER")
    assert split_label("I-MISC") == ("I", "MISC")
    assert split_label("O") == ("O", None)
    assert split_label("LOC") == ("I", "LOC")


def test_aggregate_iob2_with_subwords():
    text = "Barack Obama met Angela Merkel"
    tokens = tags(
        text,
        [
            ("Barack", "B-PER", 0),
            ("Obama", "I-PER", 1),
            ("met", "O", 2),
            ("Ang", "B-PER", 3),
            ("ela", "I-LOC", 3),
            ("Merkel", "I-PER", 4),
        ],
    )
    assert spans(aggregate_tags(text, tokens)) == [("Barack Obama", "PER", 0, 12), ("Angela Merkel", "PER", 17, 30)]


def test_aggregate_iob1_and_boundaries():
    text = "Paris and Berlin Berlin Siemens AG"
    tokens = tags(
        text,
        [
            ("Paris", "I-LOC", 0),
            ("and", "O", 1),
            ("Berlin", "I-LOC", 2),
            ("Berlin", "B-LOC", 3),
            ("Siemens", "I-ORG", 4),
            ("AG", "I-ORG", 5),
        ],
    )
    # I- after O starts a span; B- splits two adjacent LOCs; a type change starts a span.
    assert spans(aggregate_tags(text, tokens)) == [
        ("Paris", "LOC", 0, 5),
        ("Berlin", "LOC", 10, 16),
        ("Berlin", "LOC", 17, 23),
        ("Siemens AG", "ORG", 24, 34),
    ]


def test_aggregate_drops_special_tokens_and_unwanted_types_and_averages_scores():
    text = "Obama likes Python"
    tokens = [
        TokenTag("O", 0, 0, -1),  # [CLS]: empty span
        TokenTag("B-PER", 0, 3, 0, 0.9),
        TokenTag("I-PER", 3, 5, 0, 0.5),
        TokenTag("O", 6, 11, 1),
        TokenTag("B-MISC", 12, 18, 2),
    ]
    mentions = aggregate_tags(text, tokens, types=("PER",))
    assert spans(mentions) == [("Obama", "PER", 0, 5)]
    assert mentions[0].score == pytest.approx(0.7)  # (0.9 + 0.5) / 2


# ---------------------------------------------------------------- tiny hf-ner

LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
#: The tag each vocabulary piece predicts (the model below is built to obey it).
PIECE_TAGS = {
    "[PAD]": "O", "[UNK]": "O", "[CLS]": "O", "[SEP]": "O",
    "Barack": "B-PER", "Obama": "I-PER", "visited": "O", "Paris": "I-LOC", "and": "O",
    "Ber": "B-LOC", "##lin": "I-ORG", ".": "O", "Nokia": "I-ORG",
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_ner():
    """A BERT token classifier with no layers whose predictions are set by hand.

    Each piece's embedding is the one-hot vector of its tag; position and segment
    embeddings are zero. LayerNorm keeps the hot coordinate the only positive one
    (one-hot e_k in 9 dims: mean 1/9, so k maps to (8/9)/std > 0 and the others to
    (-1/9)/std < 0), and a classifier of 10 x identity turns it into the tag.
    """
    vocab = {piece: index for index, piece in enumerate(PIECE_TAGS)}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=len(LABELS), num_hidden_layers=0, num_attention_heads=1, intermediate_size=4,
        max_position_embeddings=32, id2label=dict(enumerate(LABELS)), label2id={label: index for index, label in enumerate(LABELS)},
    )  # fmt: skip
    model = BertForTokenClassification(config)
    with torch.no_grad():
        embeddings = model.bert.embeddings
        embeddings.word_embeddings.weight.zero_()
        for piece, index in vocab.items():
            embeddings.word_embeddings.weight[index, LABELS.index(PIECE_TAGS[piece])] = 1.0
        embeddings.position_embeddings.weight.zero_()
        embeddings.token_type_embeddings.weight.zero_()
        model.classifier.weight.copy_(torch.eye(len(LABELS)) * 10)
        model.classifier.bias.zero_()
    return model, tokenizer


def test_hf_ner_on_a_tiny_model_gives_spans_types_and_offsets(tiny_ner):
    model, tokenizer = tiny_ner
    recognizer = HFNerRecognizer(model, tokenizer, batch_size=2)
    texts = ["Barack Obama visited Paris and Berlin.", "Nokia and  Obama", "and ."]
    results = recognizer.recognize(texts)
    assert spans(results[0]) == [("Barack Obama", "PER", 0, 12), ("Paris", "LOC", 21, 26), ("Berlin", "LOC", 31, 37)]
    assert spans(results[1]) == [("Nokia", "ORG", 0, 5), ("Obama", "PER", 11, 16)]
    assert results[2] == []
    assert all(texts[0][m.start : m.end] == m.text for m in results[0])
    only_people = HFNerRecognizer(model, tokenizer, types=("PER",)).recognize(texts[:1])
    assert spans(only_people[0]) == [("Barack Obama", "PER", 0, 12)]


# ---------------------------------------------------------------- llm


def test_llm_recognizer_locates_the_named_entities():
    prompts = []

    def complete(prompt: str) -> str:
        prompts.append(prompt)
        return 'Sure! ```json\n[{"text": "Paris", "type": "LOC"}, {"text": "Obama", "type": "per"}, {"text": "Mars", "type": "LOC"}, {"text": "x", "type": "FOO"}]\n```'

    recognizer = LLMRecognizer(complete)
    [mentions] = recognizer.recognize(["Did Obama like Paris? Paris!"])
    assert spans(mentions) == [("Obama", "PER", 4, 9), ("Paris", "LOC", 15, 20), ("Paris", "LOC", 22, 27)]
    assert "Instruction: Did Obama like Paris? Paris!" in prompts[0]


def test_llm_recognizer_reports_answers_that_are_not_json():
    recognizer = LLMRecognizer(lambda prompt: "I think the entity is Paris.")
    [result, good] = LLMRecognizer(lambda prompt: '{"entities": []}').recognize(["a", "b"])
    assert result == [] and good == []
    [error] = recognizer.recognize(["Paris"])
    assert isinstance(error, EntityError) and "not JSON" in str(error)


def test_a_mention_is_its_span_of_the_instruction_named_by_the_gazetteer_spelling():
    text = "OBAMA flew to Paris, then to paris."
    found = Gazetteer([("Obama", "PER"), ("Paris", "LOC")]).find(text)
    assert [(mention.text, mention.name) for mention in found] == [
        ("OBAMA", "Obama"),
        ("Paris", "Paris"),
    ]  # "paris" is not "Paris"
    assert all(text[mention.start : mention.end] == mention.text for mention in found)
    assert found[0] == Mention(text="OBAMA", type="PER", start=0, end=5, name="Obama", score=1.0)
    ignoring_case = Gazetteer([("Paris", "LOC")], case_sensitive=False).find(text)
    assert [(mention.text, mention.name, text[mention.start : mention.end]) for mention in ignoring_case] == [
        ("Paris", "Paris", "Paris"),
        ("paris", "Paris", "paris"),
    ]
    with pytest.raises(
        AttributeError
    ):  # a frozen value: a recognizer's result cannot be changed behind the builder's back
        found[0].start = 1


def test_hf_ner_stage_loads_a_saved_model_by_path(tiny_ner, tmp_path, image_index):
    import json

    from mmsafe.config import from_dict
    from mmsafe.synthesis import BuildConfig, build_data
    from tests.synthesis.build_fixtures import hh_line

    model, tokenizer = tiny_ner
    model.save_pretrained(tmp_path / "ner")
    tokenizer.save_pretrained(tmp_path / "ner")
    assert (tmp_path / "ner" / "model.safetensors").is_file()
    source = tmp_path / "in.jsonl"
    source.write_text(hh_line(["Barack Obama visited Paris and Berlin."], "Nice.", "Boo.") + "\n", encoding="utf-8")
    config = from_dict(
        BuildConfig,
        {
            "input": str(source),
            "out": str(tmp_path / "out"),
            "entities": {"method": "hf-ner", "hf_ner": {"model": str(tmp_path / "ner")}},
            "images": {"index": str(image_index)},
            "rewrite": {"deictic": "single"},
        },
    )
    summary = build_data(config)
    rows = [json.loads(line) for line in (tmp_path / "out" / "records.jsonl").read_text().splitlines()]
    # Berlin has no image in the index: dropped and counted.
    assert [row["messages"][-1]["content"] for row in rows] == [
        "<image>\nThe person featured in the image visited Paris and Berlin.",
        "<image>\nBarack Obama visited the site visible in the image and Berlin.",
    ]
    assert summary.entities_without_image == 1
