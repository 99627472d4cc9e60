"""The response boundary with a tokenizer in the legacy Llama form (the real llava-hf one's).

That form (normalizer ``Prepend("▁")`` + ``Replace(" ", "▁")``, no pre-tokenizer) turns
a string that starts with a space, tokenized alone, into a lone ``▁`` and then the word;
inside the whole conversation ``ASSISTANT: I`` gives ``... ▁ASSISTANT: ▁I``. The oracle
here is the whole conversation tokenized at once.
"""

from __future__ import annotations

import pytest

from mmsafe.data.records import read_preference_records
from mmsafe.models import load_model
from mmsafe.models.prompts import render_conversation, tokenize_options
from mmsafe.train.data import PreferenceEncoder, prepare_examples


@pytest.fixture(scope="module")
def legacy_llava(tmp_path_factory):
    from mmsafe.models.zoo import build

    return build("llava-1.5", tmp_path_factory.mktemp("llava-legacy"), seed=0)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    from mmsafe.data.sample import write_sample

    out = tmp_path_factory.mktemp("sample")
    write_sample(out)
    return out


def test_the_fixture_has_the_legacy_trap(legacy_llava):
    tokenizer = load_model(legacy_llava, dtype="float32", device="cpu").tokenizer
    lone = tokenizer.convert_tokens_to_ids("▁")
    assert tokenizer(" I cannot", add_special_tokens=False)["input_ids"][0] == lone
    whole = tokenizer.convert_ids_to_tokens(tokenizer("USER: hi ASSISTANT: I cannot")["input_ids"])
    assert whole[0] == "<s>" and "▁" not in whole[whole.index("▁ASSISTANT:") + 1 :][:1]


def test_training_response_ids_are_the_span_of_the_whole_conversation(legacy_llava, sample):
    loaded = load_model(legacy_llava, dtype="float32", device="cpu")
    tokenizer = loaded.tokenizer
    lone = tokenizer.convert_tokens_to_ids("▁")
    records = list(read_preference_records(sample / "records.jsonl"))
    encoder = PreferenceEncoder.for_model(loaded.model, loaded.processor, sample, max_length=4096)
    prepared = prepare_examples(records, encoder)
    assert len(prepared.examples) == len(records) == 96
    for record, example in zip(records, prepared.examples, strict=True):
        for text, ids in zip([record.chosen, *record.rejected], example.responses, strict=True):
            assert ids[0] != lone, record.id
            assert ids.count(tokenizer.bos_token_id) == 0
            assert ids[-1] == tokenizer.eos_token_id
            # The template writes no end-of-sequence after an answer; the answer's ids are
            # the whole conversation's tail.
            full = render_conversation(
                loaded.processor, record.messages, text.strip(), with_image=True, style="chat-template"
            )
            whole = tokenizer(full, **tokenize_options(tokenizer, full))["input_ids"]
            assert whole[-(len(ids) - 1) :] == ids[:-1], record.id
            assert whole.count(tokenizer.bos_token_id) == 1
        # one BOS in the prompt as the processor expands it, too
        assert example.prompt_ids.count(tokenizer.bos_token_id) == 1


@pytest.mark.slow
def test_after_sft_on_chosen_responses_the_first_generated_token_is_never_a_lone_space(legacy_llava, sample, tmp_path):
    from mmsafe.generate.engine import DecodingParams, GenerationRequest
    from mmsafe.generate.hf_engine import HFEngine
    from mmsafe.train.config import TrainConfig
    from mmsafe.train.trainer import train

    train(
        TrainConfig(
            model=str(legacy_llava),
            data=str(sample / "records.jsonl"),
            split="train",
            output_dir=str(tmp_path / "sft"),
            loss="sft",
            learning_rate=3e-3,
            warmup_steps=0,
            max_steps=30,
            per_device_train_batch_size=8,
            lr_scheduler_type="constant",
            save_steps=1000,
            dtype="float32",
            reference_cache_dir=str(tmp_path / "cache"),
        )
    )
    loaded = load_model(tmp_path / "sft", dtype="float32", device="cpu")
    lone = loaded.tokenizer.convert_tokens_to_ids("▁")
    from mmsafe.data.images import load_image

    records = [
        record for record in read_preference_records(sample / "records.jsonl") if record.meta.get("split") == "test"
    ][:8]
    requests = [
        GenerationRequest(id=record.id, messages=list(record.messages), image=load_image(sample, record.image))
        for record in records
    ]
    engine = HFEngine(loaded, batch_size=8)
    answers = engine.generate(requests, DecodingParams(max_new_tokens=3))
    first_tokens = []
    for request in requests:
        prompt = engine.render(request)
        inputs = loaded.processor(
            text=[prompt],
            images=[[engine._prepare_image(request.image)]],
            return_tensors="pt",
            **tokenize_options(loaded.tokenizer, prompt),
        )
        output = loaded.model.generate(**inputs, max_new_tokens=1, do_sample=False)
        first_tokens.append(int(output[0, inputs["input_ids"].shape[1]]))
    assert lone not in first_tokens, first_tokens
    assert all(answers)


def test_gemma3_responses_end_with_end_of_turn_not_eos(tmp_path, sample):
    """Gemma 3's tokenizer eos is <eos>; its template ends an answer with <end_of_turn>."""
    from mmsafe.models.zoo import build

    loaded = load_model(build("gemma-3", tmp_path / "gemma", seed=0), dtype="float32", device="cpu")
    tokenizer = loaded.tokenizer
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert tokenizer.eos_token == "<eos>"
    records = list(read_preference_records(sample / "records.jsonl"))[:8]
    encoder = PreferenceEncoder.for_model(loaded.model, loaded.processor, sample, max_length=4096)
    for example in prepare_examples(records, encoder).examples:
        for ids in example.responses:
            assert ids[-1] == end_of_turn and tokenizer.eos_token_id not in ids
        assert example.prompt_ids.count(tokenizer.bos_token_id) == 1
