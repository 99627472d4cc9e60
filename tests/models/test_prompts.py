from mmsafe.data.records import Message
from mmsafe.models import load_processor
from mmsafe.models.prompts import render_prompt, response_text

HISTORY = [
    Message("user", "Hi there"),
    Message("assistant", "Hello!"),
    Message("user", "<image>\nWho is the person featured in the image?"),
]


def test_chat_template_renders_llava_form(tiny_model_dir):
    processor = load_processor(tiny_model_dir)
    prompt = render_prompt(processor, HISTORY)
    assert (
        prompt
        == "USER: Hi there ASSISTANT: Hello!</s>USER: <image>\nWho is the person featured in the image? ASSISTANT:"
    )


def test_blind_prompt_has_no_image(tiny_model_dir):
    processor = load_processor(tiny_model_dir)
    prompt = render_prompt(processor, HISTORY, with_image=False)
    assert "<image>" not in prompt
    assert prompt.endswith("USER: Who is the person featured in the image? ASSISTANT:")


def test_raw_llava_v1_style(tiny_model_dir):
    processor = load_processor(tiny_model_dir)
    prompt = render_prompt(processor, HISTORY, style="llava-v1")
    assert (
        prompt == "USER: Hi there ASSISTANT: Hello! USER: <image>\nWho is the person featured in the image? ASSISTANT:"
    )


def test_response_text_starts_after_one_space():
    assert response_text("  I cannot help. ") == " I cannot help."
