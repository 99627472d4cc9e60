"""The training benchmark's workload: synthetic preference records of chosen lengths, tokenized for every contender.

Lengths are set in tokens: the prompts and responses are drawn from a small word list
that the benchmark's tokenizers are trained on (:func:`corpus`), so one word is about
one token. :class:`LengthProfile` draws lengths as in real preference data;
:func:`build_workload` writes the images, encodes the records the way ``mmsafe train``
does, and gives TRL's two-row form of the same examples.
"""

from __future__ import annotations

import math
import random
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from benchmarks.train_models import Setup

# Words the synthetic prompts and responses are drawn from. The tokenizer is trained on
# these texts, so that one word is about one token and lengths can be set in tokens.
_WORD_TEXT = (
    "how can i get into the building shown in this picture without anyone noticing after dark "
    "what is best way to spread a rumour about company person site event place museum bridge "
    "tell me pick lock open door find entrance wait until nobody around take need leave quietly "
    "sorry but cannot help with that request would be harmful illegal so will not assist here "
    "sure first look for side gate then climb over fence walk along wall reach window break glass "
    "general plan act when guards change shift carry small bag wear dark clothes avoid cameras "
    "image shows large stone tower near river old clock red roof crowd people flags banner sign "
    "please describe detail explain reason safety rules law harm others respect privacy consent "
    "instead suggest contacting official visitor office buying ticket asking permission staff "
    "question answer story history famous local public private secret hidden quick easy simple"
)
_WORDS = tuple(_WORD_TEXT.split())


def corpus() -> list[str]:
    """Texts the benchmark tokenizers are trained on: every word of the workload, so that a word is about a token."""
    return [" ".join(_WORDS[index:] + _WORDS[:index]) for index in range(0, len(_WORDS), 7)]


@dataclass(frozen=True)
class LengthProfile:
    """Prompt and response lengths drawn as in real preference data (in tokens).

    The defaults follow the released MMSafe-PO training data and a 7B model's blind
    answers: human responses (chosen and the human rejected one) log-normal with a
    median of about 35 tokens and a 90th percentile of about 110; blind answers 100 to
    300 tokens; prompts of the image plus 40 to 640 text tokens, with up to three earlier
    exchanges of the dialogue before the question. ``scale`` shrinks every length (the
    ``--quick`` run).
    """

    earlier_exchanges: tuple[int, ...] = (0, 0, 0, 1, 1, 2, 3)
    question_tokens: tuple[int, int] = (10, 60)
    earlier_answer_tokens: tuple[int, int] = (20, 160)
    prompt_text_tokens: tuple[int, int] = (40, 640)
    human_median_tokens: float = 35.0
    human_p90_tokens: float = 110.0
    human_max_tokens: int = 400
    blind_tokens: tuple[int, int] = (100, 300)
    scale: float = 1.0

    def tokens(self, value: float) -> int:
        return max(2, round(value * self.scale))

    def human_response(self, rng: random.Random) -> int:
        sigma = math.log(self.human_p90_tokens / self.human_median_tokens) / 1.2816  # z of the 90th percentile
        value = min(self.human_max_tokens, max(4.0, rng.lognormvariate(math.log(self.human_median_tokens), sigma)))
        return self.tokens(value)

    def blind_response(self, rng: random.Random) -> int:
        return self.tokens(rng.uniform(*self.blind_tokens))

    def dialogue(self, rng: random.Random) -> list[tuple[str, int]]:
        """(role, text tokens) of the prompt's turns, the last one the question; within ``prompt_text_tokens``."""
        low, high = self.prompt_text_tokens
        while True:
            turns: list[tuple[str, int]] = []
            for _ in range(rng.choice(self.earlier_exchanges)):
                turns += [
                    ("user", rng.randint(*self.question_tokens)),
                    ("assistant", rng.randint(*self.earlier_answer_tokens)),
                ]
            turns.append(("user", rng.randint(*self.question_tokens)))
            total = sum(length for _, length in turns)
            if total < low:  # a bare question is padded up to the shortest prompt
                role, length = turns[-1]
                turns[-1] = (role, length + low - total)
                total = low
            if total <= high:
                return [(role, self.tokens(length)) for role, length in turns]


REALISTIC = LengthProfile()
QUICK_REALISTIC = replace(REALISTIC, scale=0.25)


@dataclass
class Workload:
    """The same examples in each contender's form.

    ``items``: PreferenceDataset items (token ids + pixel values) for mmsafe;
    ``processor``: the model's processor; ``trl_rows``: one dict per (chosen, rejected) pair for TRL (``images``, ``prompt``,
    ``chosen``, ``rejected`` as text); ``sources``: the rejected sources in order.
    """

    processor: Any
    encoder: Any
    items: list[dict[str, Any]]
    trl_rows: list[dict[str, Any]]
    sources: list[str]
    pad_token_id: int
    prompt_lengths: list[int]
    response_lengths: list[int]

    @property
    def examples(self) -> int:
        return len(self.items)

    def tokens(self) -> int:
        """Distinct tokens of the examples: each prompt (image included) once, plus every response."""
        return sum(self.prompt_lengths) + sum(self.response_lengths)


def _fit(rng: random.Random, target: int, count_tokens) -> str:
    """Text of random words whose token count (by ``count_tokens``) is ``target``, or just above."""
    words = [rng.choice(_WORDS) for _ in range(max(0, target - 4))]  # about a token a word: few counts
    while words and count_tokens(" ".join(words)) > target:
        words.pop()
    while count_tokens(" ".join(words)) < target:
        words.append(rng.choice(_WORDS))
    return " ".join(words)


def build_workload(
    processor: Any,
    model: Any,
    setup: Setup,
    *,
    examples: int,
    num_rejected: int,
    response_tokens: int | None = None,
    seed: int = 0,
    profile: LengthProfile | None = None,
) -> Workload:
    """``examples`` records with a chosen and ``num_rejected`` rejected responses, tokenized.

    Without ``profile``: prompts have ``setup.prompt_tokens`` text tokens (chat template
    included) around the image; every response has ``response_tokens`` tokens
    (end-of-sequence included), give or take two. With a :class:`LengthProfile`: dialogues
    of several turns and responses drawn from its distributions (the first rejected one
    human, the others blind).
    """
    from PIL import Image

    from mmsafe.data.records import Message, PreferenceRecord
    from mmsafe.models.prompts import render_prompt, response_text
    from mmsafe.train.data import PreferenceDataset, PreferenceEncoder, prepare_examples

    response_tokens = response_tokens or setup.response_tokens
    rng = random.Random(seed)
    tokenizer = processor.tokenizer
    image_root = Path(scratch_dir("images-"))
    sources = ["human", "blind"] + [f"blind{index}" for index in range(2, num_rejected)]
    sources = sources[:num_rejected]

    def prompt_tokens(text: str) -> int:
        rendered = render_prompt(processor, [Message("user", "<image>\n" + text)], with_image=True)
        return len(tokenizer(rendered.replace("<image>", ""), add_special_tokens=False)["input_ids"])

    def response_length(text: str) -> int:
        return len(tokenizer(response_text(text), add_special_tokens=False)["input_ids"]) + 1  # + end of sequence

    def text_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    records = []
    for index in range(examples):
        jitter = index % 5 - 2
        image_name = f"image-{index}.png"
        colour = ((index * 53) % 256, (index * 97) % 256, (index * 31) % 256)
        Image.new("RGB", (setup.image_size, setup.image_size), colour).save(image_root / image_name)
        if profile is None:
            messages = [Message("user", "<image>\n" + _fit(rng, setup.prompt_tokens + jitter, prompt_tokens))]
            responses = [
                _fit(rng, response_tokens + (jitter + slot) % 3 - 1, response_length)
                for slot in range(1 + num_rejected)
            ]
        else:
            messages = [Message(role, _fit(rng, length, text_tokens)) for role, length in profile.dialogue(rng)]
            messages[-1] = Message("user", "<image>\n" + messages[-1].content)
            lengths = [profile.human_response(rng), profile.human_response(rng)] + [
                profile.blind_response(rng) for _ in range(num_rejected - 1)
            ]
            responses = [_fit(rng, length, response_length) for length in lengths[: 1 + num_rejected]]
        records.append(
            PreferenceRecord(
                id=f"bench-{index}",
                messages=messages,
                image=image_name,
                chosen=responses[0],
                rejected=responses[1:],
                rejected_sources=list(sources),
                meta={},
            )
        )
    encoder = PreferenceEncoder.for_model(model, processor, image_root, max_length=8192)
    prepared = prepare_examples(records, encoder)
    if len(prepared.examples) != examples:
        raise RuntimeError(f"benchmark records were skipped: {prepared.skip_counts()}")
    dataset = PreferenceDataset(prepared.examples, encoder)
    items = [dataset[index] for index in range(len(dataset))]
    trl_rows = []
    for record, example in zip(records, prepared.examples, strict=True):
        image = encoder.load_image(record.image)
        # TRL adds no end-of-sequence token to vision completions; write it out so both
        # sides score the same token ids (checked by the loss agreement).
        for rejected in record.rejected:
            trl_rows.append(
                {
                    "images": [image],
                    "prompt": example.prompt_text,
                    "chosen": response_text(record.chosen) + tokenizer.eos_token,
                    "rejected": response_text(rejected) + tokenizer.eos_token,
                }
            )
    return Workload(
        processor=processor,
        encoder=encoder,
        items=items,
        trl_rows=trl_rows,
        sources=prepared.sources,
        pad_token_id=tokenizer.pad_token_id,
        prompt_lengths=[len(example.prompt_ids) for example in prepared.examples],
        response_lengths=[len(ids) for example in prepared.examples for ids in example.responses],
    )


_SCRATCH: list[tempfile.TemporaryDirectory] = []


def scratch_dir(prefix: str) -> str:
    """A new folder under one temporary directory that is removed when the process exits."""
    if not _SCRATCH:
        _SCRATCH.append(tempfile.TemporaryDirectory(prefix="mmsafe-bench-train-"))
    return tempfile.mkdtemp(prefix=prefix, dir=_SCRATCH[0].name)


def move(batch: dict[str, Any], device: str) -> dict[str, Any]:
    return {key: value.to(device) if hasattr(value, "to") else value for key, value in batch.items()}
