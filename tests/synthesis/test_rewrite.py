"""Template rewriting (grammar around the phrase) and model rephrasing with its fallbacks."""

from __future__ import annotations

import re

import pytest

from mmsafe.synthesis.rewrite import (
    ModelRewriter,
    Span,
    TemplateRewriter,
    clean_model_answer,
    is_sentence_start,
    names_entity,
    replace_spans,
)

TEMPLATE = TemplateRewriter()


def rewrite(text: str, entity: str, entity_type: str) -> str:
    spans = [Span(match.start(), match.end()) for match in re.finditer(re.escape(entity), text)]
    return TEMPLATE.rewrite(text, entity, entity_type, spans).text


@pytest.mark.parametrize(
    ("text", "entity", "entity_type", "expected"),
    [
        (
            "What do you think of Barack Obama?",
            "Barack Obama",
            "PER",
            "What do you think of the person featured in the image?",
        ),
        ("Barack Obama is a liar.", "Barack Obama", "PER", "The person featured in the image is a liar."),
        ("What does the United Nations do?", "United Nations", "ORG", "What does the organization in the image do?"),
        ("The United Nations is useless", "United Nations", "ORG", "The organization in the image is useless"),
        ("Why is Obama's dog so loud?", "Obama", "PER", "Why is the pictured person's dog so loud?"),
        ("Why are Texas' laws so strict?", "Texas", "LOC", "Why are the pictured site's laws so strict?"),
        (
            "I hate Paris. Paris is dirty!",
            "Paris",
            "LOC",
            "I hate the site visible in the image. The site visible in the image is dirty!",
        ),
        ("Should I boycott Acme Corp?", "Acme Corp", "ORG", "Should I boycott the company in the image?"),
        ("Is an iPhone worth it?", "iPhone", "MISC", "Is the object in the image worth it?"),
        ('He said "Obama lies"', "Obama", "PER", 'He said "The person featured in the image lies"'),
        ("ok\nParis sucks", "Paris", "LOC", "ok\nThe site visible in the image sucks"),
        (
            "Did Mr. Obama lie? Ask President Obama.",
            "Obama",
            "PER",
            "Did the person featured in the image lie? Ask the person featured in the image.",
        ),
        ("Other thesis on Paris", "Paris", "LOC", "Other thesis on the site visible in the image"),
    ],
)
def test_template_grammar(text, entity, entity_type, expected):
    assert rewrite(text, entity, entity_type) == expected


def test_no_doubled_article_and_custom_phrases():
    assert "the the" not in rewrite("Visit the Louvre and the Louvre shop", "Louvre", "LOC").lower()
    custom = TemplateRewriter(phrases={"PER": "this person"}, possessive_phrases={"PER": "this person's"})
    assert custom.rewrite("Tell me about Obama", "Obama", "PER", [Span(14, 19)]).text == "Tell me about this person"
    assert replace_spans("a Obama", [Span(2, 7)], "him", "his") == "a him"  # no article in the phrase: nothing dropped


def test_sentence_start():
    assert (
        is_sentence_start("")
        and is_sentence_start("Done. ")
        and is_sentence_start("Really?! ")
        and is_sentence_start("line\n")
    )
    assert not is_sentence_start("I like ") and not is_sentence_start("e.g")


def test_names_entity():
    assert names_entity("what about obama?", "Barack Obama")
    assert names_entity("Barack Obama again", "Barack Obama")
    assert not names_entity("the person in the image", "Barack Obama")
    assert not names_entity("Obamacare costs", "Obama")


def test_clean_model_answer():
    assert (
        clean_model_answer('Rewritten instruction: "Why is the person in this picture famous?"')
        == "Why is the person in this picture famous?"
    )
    assert clean_model_answer("<image>\nWhy?") == "Why?"


class FakeModel:
    def __init__(self, answer: str) -> None:
        self.answer = answer
        self.prompts: list[str] = []

    def __call__(self, prompt: str) -> str:
        self.prompts.append(prompt)
        return self.answer


def test_model_rewrite_uses_the_versioned_prompt_and_the_answer():
    model = FakeModel("Why is the man in this photo so popular?")
    result = ModelRewriter(model).rewrite("Why is Barack Obama so popular?", "Barack Obama", "PER", [Span(7, 19)])
    assert result.text == "Why is the man in this photo so popular?" and result.method == "model:rewrite_v1"
    assert result.mid_prompt == "Why is the person featured in the image so popular?"
    assert 'the phrase "the person featured in the image"' in model.prompts[0]
    assert "Instruction: Why is the person featured in the image so popular?" in model.prompts[0]
    assert "Barack Obama" not in model.prompts[0]


@pytest.mark.parametrize(
    ("answer", "reason"),
    [("", "empty"), ("   ", "empty"), ("Why is Obama so popular?", "names the entity"), ("Why " * 40, "too long")],
)
def test_model_rewrite_falls_back_to_the_template(answer, reason):
    result = ModelRewriter(FakeModel(answer)).rewrite(
        "Why is Barack Obama so popular?", "Barack Obama", "PER", [Span(7, 19)]
    )
    assert result.text == result.mid_prompt == "Why is the person featured in the image so popular?"
    assert result.fallback_reason == reason and result.method == "template"
