"""Bounded memory and time on hostile images, YAML and chat templates.

Each input here is a few hundred bytes that used to cost gigabytes or hours: a PNG that
claims 60,000 x 1 pixels (squared for padding: 60,000 x 60,000 x 3 bytes = 10.8 GB), a
YAML of nested aliases that expands to 10^9 values, a chat template that loops 10^10
times. The CLI runs in a child process where memory or a hang is at stake: its own peak
memory is the peak the child reports of itself at exit (``VmHWM``), and a hang is a timeout.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from mmsafe.errors import ImageError, ModelError
from tests.reliability.corpus import good_record
from tests.reliability.stages import config_argv, run_cli

GIB_IN_KIB = 1024 * 1024
#: Python, torch and the tiny model take a few hundred MB; the strip once took 10.8 GB.
GENERATE_MEMORY_KIB = GIB_IN_KIB
#: A config error comes before any model is loaded (importing torch alone takes ~450 MB).
CONFIG_MEMORY_KIB = GIB_IN_KIB
#: A child that takes longer than this is stuck (importing torch takes a minute on a busy machine).
CHILD_TIMEOUT_S = 300
#: Address space a child may map: several times what it needs, far below what the hostile
#: inputs once took, so that a regression fails with MemoryError instead of filling the machine.
CHILD_ADDRESS_SPACE = 8 * 1024**3


def _child_env() -> dict[str, str]:
    return {
        **os.environ,
        "MMSAFE_PROGRESS": "0",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }


def _limit_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (CHILD_ADDRESS_SPACE, CHILD_ADDRESS_SPACE))


#: Runs ``python -m MODULE ...`` or ``python -c SCRIPT ...`` and, at exit, writes the
#: program's own peak RSS (``VmHWM``, KiB). ``ru_maxrss`` would not do: Linux carries it
#: over from the forked copy of the parent, a test process that may hold 1 GB itself.
_REPORT_PEAK = """
import atexit, runpy, sys
from pathlib import Path

def _peak():
    status = Path("/proc/self/status").read_text()
    Path(PEAK).write_text(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))

PEAK, mode, target, rest = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
atexit.register(_peak)
if mode == "-m":
    sys.argv = [target, *rest]
    runpy.run_module(target, run_name="__main__", alter_sys=True)
else:
    sys.argv = ["-c", *rest]
    exec(compile(target, "<string>", "exec"), {"__name__": "__main__"})
"""


def run_child(argv: list, folder: Path, *, timeout: float = CHILD_TIMEOUT_S) -> tuple[int, str, int]:
    """Run ``argv`` (``-m module ...`` or ``-c script ...``, after ``python``) in a child: ``(exit code, stderr, peak RSS in KiB)``."""
    folder.mkdir(parents=True, exist_ok=True)
    out, err, peak = folder / "stdout.txt", folder / "stderr.txt", folder / "peak_kib.txt"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        child = subprocess.Popen(
            [sys.executable, "-c", _REPORT_PEAK, str(peak), *map(str, argv)],
            stdout=stdout,
            stderr=stderr,
            env=_child_env(),
            preexec_fn=_limit_address_space,
        )
    timer = threading.Timer(timeout, child.kill)  # a stuck child is killed, not waited on forever
    timer.start()
    try:
        child.wait()
    finally:
        timer.cancel()
    peak_kib = int(peak.read_text()) if peak.is_file() else 10**9  # killed before it could say: count it as too much
    return child.returncode, err.read_text(encoding="utf-8", errors="replace"), peak_kib


def _records_with_image(folder: Path, image_name: str, size: tuple[int, int], mode: str = "RGB") -> Path:
    """Two records: ``r0`` with a good image, ``r1`` with an image of ``size`` (a few hundred bytes as PNG)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 16), (200, 30, 30)).save(folder / "images" / "ok.png")
    Image.new(mode, size).save(folder / "images" / image_name)
    path = folder / "records.jsonl"
    path.write_text(
        "".join(
            json.dumps(record) + "\n" for record in (good_record("r0"), good_record("r1", image=f"images/{image_name}"))
        ),
        encoding="utf-8",
    )
    return path


@pytest.fixture
def no_decoding(monkeypatch):
    """Decoding pixels fails the test: the bounds must be checked from the header alone."""

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"pixels of a {self.size[0]}x{self.size[1]} image were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


# --- images --------------------------------------------------------------------------------


def test_generate_on_a_60000x1_png_stays_under_1_gb_and_names_the_record(tmp_path, tiny_model_dir):
    """Squaring the strip for ``pad`` would allocate 10.8 GB; it is refused from its header."""
    data = _records_with_image(tmp_path / "in", "strip.png", (60_000, 1))
    assert (tmp_path / "in" / "images" / "strip.png").stat().st_size < 1_000
    argv = [
        "-m",
        "mmsafe",
        "generate",
        "--model",
        tiny_model_dir,
        "--data",
        data,
        "--out",
        tmp_path / "responses.jsonl",
    ]
    argv += ["--max-new-tokens", 2, "--batch-size", 4, "--device", "cpu"]
    code, stderr, peak_kib = run_child(argv, tmp_path / "child")
    assert code == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert peak_kib < GENERATE_MEMORY_KIB, f"peak RSS {peak_kib / 1024:.0f} MiB"
    lines = [line for line in stderr.splitlines() if "strip.png" in line]
    assert len(lines) == 1, stderr[-3000:]
    assert ":r1:image:" in lines[0] and "60000x1" in lines[0] and "16,384 pixels per side (max_side)" in lines[0]


@pytest.mark.parametrize(
    ("name", "size", "mode", "bound"),
    [
        ("strip.png", (60_000, 1), "RGB", "max_side"),
        ("ribbon.png", (10_000, 1), "RGB", "max_aspect_ratio"),  # passes max_side and max_pixels
        ("wide.png", (20_000, 1_000), "L", "max_side"),  # aspect 20:1 is fine, the side is not
    ],
)
def test_training_data_refuses_a_strip_from_its_header(name, size, mode, bound, tmp_path, tiny_model_dir, no_decoding):
    """Training's loader (load, then pad to a square) stops at the header: no pixel decoded."""
    from mmsafe.data.formats import read_records
    from mmsafe.models.loading import load_processor
    from mmsafe.train.data import PreferenceEncoder, prepare_examples

    data = _records_with_image(tmp_path, name, size, mode)
    records = [record for record in read_records(data) if record.id == "r1"]
    encoder = PreferenceEncoder(load_processor(tiny_model_dir), tmp_path, image_mode="pad")
    with pytest.raises(ImageError) as caught:
        prepare_examples(records, encoder, data_file=str(data))
    message = str(caught.value)
    assert message.startswith(f"{data}:r1:image: image 'images/{name}' is {size[0]}x{size[1]}")
    assert f"({bound})" in message and "\n" not in message


def test_padding_keeps_the_square_within_max_pixels():
    """A 9000x200 image under max_pixels=1,000,000: side floor(sqrt(10^6)) = 1000, the image
    scaled by 1000/9000 to 1000x22 (200 * 1000 / 9000 = 22.2), pasted at row (1000 - 22) // 2 = 489."""
    import numpy as np

    from mmsafe.data.images import pad_to_square, prepare_image

    red, fill = (200, 30, 30), (10, 20, 30)
    padded = pad_to_square(Image.new("RGB", (9_000, 200), red), fill, max_pixels=1_000_000)
    assert padded.size == (1_000, 1_000)
    pixels = np.asarray(padded)
    rows = np.flatnonzero((pixels[:, 500] == red).all(axis=1))
    assert (rows.min(), rows.max()) == (489, 489 + 22 - 1)
    assert tuple(pixels[488, 500]) == fill and tuple(pixels[511, 500]) == fill
    # Within the cap nothing changes: the release's own square.
    assert pad_to_square(Image.new("RGB", (40, 20), red), fill, max_pixels=1_600).size == (40, 40)
    assert prepare_image(Image.new("RGB", (9_000, 200), red), "pad", max_pixels=250_000).size == (500, 500)


def test_image_bounds_are_checked_from_the_header_with_their_defaults(tmp_path, no_decoding):
    from mmsafe.data.images import DEFAULT_MAX_ASPECT_RATIO, DEFAULT_MAX_SIDE, load_image

    assert (DEFAULT_MAX_SIDE, DEFAULT_MAX_ASPECT_RATIO) == (16_384, 50.0)
    Image.new("L", (500, 10)).save(tmp_path / "fifty.png")  # exactly 50:1 is allowed ...
    Image.new("L", (510, 10)).save(tmp_path / "fifty-one.png")  # ... 51:1 is not
    with pytest.raises(AssertionError, match="were decoded"):
        load_image(tmp_path, "fifty.png")  # passed the bounds, so it went on to decode
    with pytest.raises(ImageError, match=r"aspect ratio of 51\.0:1; expected at most 50:1 \(max_aspect_ratio\)"):
        load_image(tmp_path, "fifty-one.png")
    with pytest.raises(ImageError, match=r"at most 400 pixels per side \(max_side\)"):
        load_image(tmp_path, "fifty.png", max_side=400)


# --- YAML ----------------------------------------------------------------------------------


def billion_laughs(path: Path, levels: int = 9, width: int = 10) -> Path:
    """A YAML mapping whose last key expands to ``width ** levels`` (10^9) strings."""
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * width)}]" for level in range(1, levels)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_billion_laughs_is_refused_at_once_in_process(tmp_path):
    from mmsafe.config import read_yaml
    from mmsafe.errors import ConfigError

    bomb = billion_laughs(tmp_path / "bomb.yaml")
    assert bomb.stat().st_size < 600
    started = time.monotonic()
    with pytest.raises(ConfigError, match="expands to more than 100,000 values"):
        read_yaml(bomb)
    assert time.monotonic() - started < 1.0  # the promise: refused before anything is expanded


@pytest.mark.parametrize("stage", ["train", "build-data", "run"])
def test_billion_laughs_config_is_one_line_with_bounded_memory(stage, tmp_path):
    """Every command that loads a YAML config refuses the bomb before expanding it."""
    bomb = billion_laughs(tmp_path / "bomb.yaml")
    code, stderr, peak_kib = run_child(["-m", "mmsafe", *config_argv(stage, bomb, tmp_path)], tmp_path / "child")
    assert code == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert peak_kib < CONFIG_MEMORY_KIB, f"peak RSS {peak_kib / 1024:.0f} MiB"
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(bomb) in lines[0] and "expands to more than 100,000 values" in lines[0], stderr


def test_config_aliases_that_do_not_multiply_still_work(tmp_path):
    from mmsafe.config import load_yaml

    text = "base: &base {beta: 0.1, steps: [1, 2]}\ndpo:\n  <<: *base\n  loss: dpo\nruns: [*base, *base]\n"
    data = load_yaml(text, source="ok.yaml")
    assert data["dpo"] == {"beta": 0.1, "steps": [1, 2], "loss": "dpo"}
    assert data["runs"] == [{"beta": 0.1, "steps": [1, 2]}] * 2


def test_a_recursive_alias_is_one_line():
    from mmsafe.config import load_yaml
    from mmsafe.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^loop\.yaml: an alias refers to a node that contains it"):
        load_yaml("a: &a [1, *a]\n", source="loop.yaml")


# --- chat templates ------------------------------------------------------------------------

NESTED_WRITING = "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}"
NESTED_SILENT = "{% for a in range(100000) %}{% for b in range(100000) %}{% set c = b %}{% endfor %}{% endfor %}"


def _model_with_template(tiny_model_dir: Path, folder: Path, template: str) -> Path:
    shutil.copytree(tiny_model_dir, folder)
    (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    return folder


def _generate_argv(model: Path, data: Path, out: Path) -> list:
    return [
        "generate",
        "--model",
        model,
        "--data",
        data,
        "--out",
        out,
        "--max-new-tokens",
        2,
        "--batch-size",
        4,
        "--device",
        "cpu",
    ]


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (NESTED_SILENT, "rendering took longer than the limit of 2 s"),  # writes nothing: the timer stops it
        (NESTED_WRITING, "characters (the limit of 1,000,000 (max_chars) beyond twice the conversation's"),
    ],
    ids=["silent-loop", "writing-loop"],
)
def test_a_looping_chat_template_stops_generation_within_the_limit(template, expected, tmp_path, tiny_model_dir):
    """10^10 iterations would take hours; the child ends with one line saying which limit stopped it."""
    model = _model_with_template(tiny_model_dir, tmp_path / "model", template)
    data = _records_with_image(tmp_path / "in", "also-ok.png", (8, 8))
    limit_s = 2
    script = (
        "import sys; import mmsafe.models.prompts as prompts; "
        f"prompts.DEFAULT_TEMPLATE_LIMITS = prompts.TemplateLimits(seconds={limit_s}); "
        "from mmsafe.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    code, stderr, _ = run_child(
        ["-c", script, *_generate_argv(model, data, tmp_path / "out.jsonl")], tmp_path / "child"
    )
    assert code == 1 and "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if "chat template" in line]
    assert len(lines) == 1 and expected in lines[0] and str(model) in lines[0] and "(record r0)" in lines[0], stderr[
        -3000:
    ]


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (
            "{{ ''.__class__.__mro__ }}",
            "the template did something the sandbox forbids: access to attribute '__class__'",
        ),
        ("{{ raise_exception('boom') }}", "the template raised an error: boom"),
        ("{% for message in messages %}{{ message['role'] }", "the template is not valid jinja"),
    ],
    ids=["security-error", "raise-exception", "syntax-error"],
)
def test_a_failing_chat_template_is_one_line(template, expected, tmp_path, tiny_model_dir):
    model = _model_with_template(tiny_model_dir, tmp_path / "model", template)
    data = _records_with_image(tmp_path / "in", "also-ok.png", (8, 8))
    outcome = run_cli(_generate_argv(model, data, tmp_path / "out.jsonl"))
    assert outcome.code == 1 and "Traceback" not in outcome.stderr, outcome.describe()
    lines = [line for line in outcome.stderr.splitlines() if "chat template" in line]
    assert len(lines) == 1 and expected in lines[0] and f"{model}: chat template (record r0)" in lines[0], (
        outcome.describe()
    )


def test_the_time_limit_holds_outside_the_main_thread(tiny_model_dir):
    """No timer there: the clock is read between output chunks (size limit set out of reach)."""
    from mmsafe.models.loading import load_processor
    from mmsafe.models.prompts import TemplateLimits, apply_chat_template

    processor = load_processor(tiny_model_dir)
    processor.chat_template = NESTED_WRITING
    caught: list[BaseException] = []

    def render() -> None:
        try:
            apply_chat_template(
                processor, [], add_generation_prompt=True, limits=TemplateLimits(seconds=1, max_chars=10**12)
            )
        except ModelError as error:
            caught.append(error)

    worker = threading.Thread(target=render, daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive() and len(caught) == 1
    assert "rendering took longer than the limit of 1 s" in str(caught[0])


def test_the_size_limit_grows_with_the_conversation(tiny_model_dir):
    """A long prompt is legal (the model's context limit refuses it, naming positions); only
    what the template writes beyond twice the conversation's text counts against max_chars."""
    from mmsafe.models.loading import load_processor
    from mmsafe.models.prompts import TemplateLimits, apply_chat_template

    processor = load_processor(tiny_model_dir)
    long_text = "a" * 5_000
    chat = [{"role": "user", "content": [{"type": "text", "text": long_text}]}]
    limits = TemplateLimits(max_chars=100)
    assert long_text in apply_chat_template(processor, chat, add_generation_prompt=True, limits=limits)
    # The chat's text is 5,008 characters (with "user" and "text"): the limit is 100 + 2 * 5,008.
    processor.chat_template = "{{ messages[0]['content'][0]['text'] * 3 }}"  # writes 15,000
    with pytest.raises(ModelError, match=r"rendered more than 10,116 characters"):
        apply_chat_template(processor, chat, add_generation_prompt=True, limits=limits)


def test_bounded_rendering_gives_what_transformers_gives(tiny_model_dir):
    """The streamed rendering is transformers' own, for the templates of the conformance matrix."""
    from mmsafe.models.loading import load_processor
    from mmsafe.models.prompts import apply_chat_template
    from mmsafe.models.zoo import gemma, idefics, llava, qwen_vl

    processor = load_processor(tiny_model_dir)
    chat = [
        {"role": "system", "content": [{"type": "text", "text": "Be careful."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A stadium."}]},
        {"role": "user", "content": [{"type": "text", "text": "How do I get in?"}]},
    ]
    templates = [processor.chat_template, llava.LLAVA_15_CHAT_TEMPLATE, llava.LLAVA_ONEVISION_CHAT_TEMPLATE]
    templates += [qwen_vl.QWEN2_VL_CHAT_TEMPLATE, gemma.GEMMA3_CHAT_TEMPLATE, idefics.CHAT_TEMPLATE]
    for template in templates:
        processor.chat_template = template
        for add_generation_prompt in (True, False):
            expected = processor.apply_chat_template(chat, add_generation_prompt=add_generation_prompt, tokenize=False)
            assert apply_chat_template(processor, chat, add_generation_prompt=add_generation_prompt) == expected
