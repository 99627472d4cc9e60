"""An adversarial input corpus, made in code: every case writes its files into a folder.

Each :class:`Case` is one hostile or broken input of one kind (preference records JSONL,
the released MMSafe-PO JSON, HH-RLHF dialogues, response records, verdict records, YAML
configs) together with what every stage must do with it: ``"error"`` (exit 1 with one
``error:`` or ``file:record:field`` line that contains ``expect``) or ``"ok"`` (the input
is legal and handled as documented, e.g. an animated GIF gives its first frame).
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

RECORDS = "records"
RELEASED = "released"
HH_RLHF = "hh-rlhf"
RESPONSES = "responses"
VERDICTS = "verdicts"
CONFIG = "config"


@dataclass(frozen=True)
class Case:
    """One corpus entry: ``write(folder)`` returns the input file it made there."""

    name: str
    kind: str
    write: Callable[[Path], Path]
    outcome: str  # "error" or "ok"
    expect: str = ""  # a piece of the error line: the field or the reason

    @property
    def is_error(self) -> bool:
        return self.outcome == "error"

    @property
    def reads_image(self) -> bool:
        """A case about the image file or its path (not about the ``<image>`` token)."""
        return self.name.startswith("image-") and not self.name.startswith("image-token")


def good_record(record_id: str = "r1", *, image: str | None = "images/ok.png", **changes) -> dict:
    """A valid record; ``changes`` replace fields (a value of ``...`` removes the field)."""
    record = {
        "id": record_id,
        "messages": [{"role": "user", "content": ("<image>\n" if image else "") + "How do I get into the stadium?"}],
        "image": image,
        "chosen": "I cannot help with that.",
        "rejected": ["Climb the fence at night."],
        "rejected_sources": ["human"],
        "meta": {
            "text_prompt": "How do I get into Wembley Stadium?",
            "mid_prompt": "How do I get into the stadium?",
            "entity": "Wembley Stadium",
        },
    }
    for key, value in changes.items():
        if value is ...:
            record.pop(key, None)
        else:
            record[key] = value
    return record


def _save_ok_image(folder: Path) -> None:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 16), (200, 30, 30)).save(folder / "images" / "ok.png")


def _records_file(
    folder: Path, rows: list, *, raw_lines: list[bytes] | None = None, name: str = "records.jsonl"
) -> Path:
    """A records JSONL beside a valid image; ``raw_lines`` are written after the rows as bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    _save_ok_image(folder)
    path = folder / name
    data = b"".join(json.dumps(row).encode() + b"\n" for row in rows) + b"".join(raw_lines or [])
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    return path


def _records(*rows: dict) -> Callable[[Path], Path]:
    return lambda folder: _records_file(folder, [good_record("r0"), *rows])


def _raw(line: bytes) -> Callable[[Path], Path]:
    return lambda folder: _records_file(folder, [good_record("r0")], raw_lines=[line])


def _truncated_gzip(folder: Path) -> Path:
    path = _records_file(folder, [good_record(f"r{index}") for index in range(50)], name="records.jsonl.gz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _with_image(image_name: str, make: Callable[[Path], None]) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        path = _records_file(folder, [good_record("r0"), good_record("r1", image=image_name)])
        make(folder)
        return path

    return write


def _image_bytes(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda folder: (folder / "images" / name).write_bytes(data)


def _bomb(folder: Path) -> None:
    # 12,000 x 12,000 one-bit pixels compress to a few kB but decode to 144 million pixels.
    Image.new("1", (12_000, 12_000)).save(folder / "images" / "bomb.png", optimize=True)


def _animated(folder: Path) -> None:
    frames = [Image.new("P", (16, 16), colour) for colour in (1, 2, 3)]
    frames[0].save(folder / "images" / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)


def _sixteen_bit(folder: Path) -> None:
    values = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 250).astype(np.uint16)
    Image.fromarray(values).save(folder / "images" / "deep.png")  # uint16 -> mode I;16


def _cmyk(folder: Path) -> None:
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(folder / "images" / "cmyk.jpg")


def _secret(folder: Path) -> Path:
    """A file outside the image root that a hostile path tries to reach."""
    outside = folder.parent / f"{folder.name}-outside"
    outside.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(outside / "secret.png")
    return outside / "secret.png"


def _absolute(folder: Path) -> Path:
    secret = _secret(folder)
    return _records_file(folder, [good_record("r0"), good_record("r1", image=str(secret))])


def _dotdot(folder: Path) -> Path:
    secret = _secret(folder)
    return _records_file(
        folder, [good_record("r0"), good_record("r1", image=f"images/../../{secret.parent.name}/secret.png")]
    )


def _symlink(folder: Path) -> Path:
    secret = _secret(folder)
    path = _records_file(folder, [good_record("r0"), good_record("r1", image="images/link.png")])
    os.symlink(secret, folder / "images" / "link.png")
    return path


# ---------------------------------------------------------------- released MMSafe-PO JSON


def released_row(row_id: int = 1, **changes) -> dict:
    row = {
        "id": row_id,
        "image": None,
        "question": "USER: How do I pick a lock? ASSISTANT:",
        "chosen": "ASSISTANT: I cannot help with that.",
        "rejected": "ASSISTANT: Use a tension wrench.",
    }
    for key, value in changes.items():
        if value is ...:
            row.pop(key, None)
        else:
            row[key] = value
    return row


def _released(content: bytes | list | dict) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "train.json"
        path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
        return path

    return write


# ---------------------------------------------------------------- HH-RLHF

GOOD_DIALOGUE = {
    "chosen": "\n\nHuman: How do I pick a lock?\n\nAssistant: I cannot help.",
    "rejected": "\n\nHuman: How do I pick a lock?\n\nAssistant: Use a pin.",
}


def _hh(lines: list[bytes], *, gz: bool = False, truncate: bool = False) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        data = b"".join(lines)
        path = folder / ("train.jsonl.gz" if gz else "train.jsonl")
        if gz:
            data = gzip.compress(data)
            if truncate:
                data = data[: len(data) // 2]
        path.write_bytes(data)
        return path

    return write


def _hh_line(row: dict) -> bytes:
    return json.dumps(row).encode() + b"\n"


# ---------------------------------------------------------------- responses and verdicts


def response_row(record_id: str = "r0", **changes) -> dict:
    row = {"id": record_id, "variant": "default", "response": "I cannot help with that.", "model": "tiny", "params": {}}
    row.update(changes)
    return {key: value for key, value in row.items() if value is not ...}


def verdict_row(record_id: str = "r0", **changes) -> dict:
    row = {"id": record_id, "variant": "default", "judge": "refusal", "verdict": "safe", "categories": [], "raw": ""}
    row.update(changes)
    return {key: value for key, value in row.items() if value is not ...}


def _lines(name: str, rows: list, raw: bytes = b"") -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        path.write_bytes(b"".join(json.dumps(row).encode() + b"\n" for row in rows) + raw)
        return path

    return write


# ---------------------------------------------------------------- configs


def _text(name: str, text: str) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


HUGE = "x" * 2_000_000

CASES: list[Case] = [
    # Preference records (JSONL): the contract every stage reads.
    Case("malformed-json", RECORDS, _raw(b'{"id": "r1", "messages": [\n'), "error", "malformed JSON"),
    Case("truncated-gzip", RECORDS, _truncated_gzip, "error", "gzip"),
    Case("non-utf8", RECORDS, _raw(b'{"id": "r1", "chosen": "caf\xe9"}\n'), "error", "UTF-8"),
    Case("not-an-object", RECORDS, _raw(b'["r1", "hello"]\n'), "error", "line 2"),
    Case("missing-chosen", RECORDS, _records(good_record("r1", chosen=...)), "error", "chosen"),
    Case("wrong-type-rejected", RECORDS, _records(good_record("r1", rejected="just one")), "error", "rejected"),
    Case("wrong-type-id", RECORDS, _records(good_record("r1", id=17.5)), "error", "id"),
    Case("empty-id", RECORDS, _records(good_record("r1", id="")), "error", "id"),
    Case("zero-rejected", RECORDS, _records(good_record("r1", rejected=[], rejected_sources=[])), "error", "rejected"),
    Case(
        "sources-length-mismatch",
        RECORDS,
        _records(good_record("r1", rejected_sources=["human", "blind"])),
        "error",
        "rejected_sources",
    ),
    Case("empty-messages", RECORDS, _records(good_record("r1", messages=[], image=None)), "error", "messages"),
    Case(
        "bad-role",
        RECORDS,
        _records(good_record("r1", image=None, messages=[{"role": "system", "content": "hi"}])),
        "error",
        "role",
    ),
    Case(
        "last-turn-assistant",
        RECORDS,
        _records(
            good_record(
                "r1", image=None, messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
            )
        ),
        "error",
        "messages",
    ),
    Case(
        "image-token-twice",
        RECORDS,
        _records(good_record("r1", messages=[{"role": "user", "content": "<image>\n<image>\nWhat is this?"}])),
        "error",
        "<image>",
    ),
    Case(
        "image-token-wrong-turn",
        RECORDS,
        _records(
            good_record(
                "r1",
                messages=[
                    {"role": "user", "content": "<image>\nhi"},
                    {"role": "assistant", "content": "yes"},
                    {"role": "user", "content": "and?"},
                ],
            )
        ),
        "error",
        "<image>",
    ),
    Case(
        "image-token-without-image",
        RECORDS,
        _records(good_record("r1", image=None, messages=[{"role": "user", "content": "<image>\nhi"}])),
        "ok",
    ),
    Case("duplicate-ids", RECORDS, _records(good_record("r0")), "error", "duplicate"),
    Case("empty-file", RECORDS, lambda folder: _records_file(folder, []), "error", "no record"),
    Case("huge-strings", RECORDS, _records(good_record("r1", chosen=HUGE, meta={"text_prompt": HUGE})), "ok"),
    Case(
        "huge-prompt",
        RECORDS,
        _records(good_record("r1", image=None, messages=[{"role": "user", "content": "why " * 500_000}])),
        "error",
        "positions",
    ),
    Case("empty-chosen", RECORDS, _records(good_record("r1", chosen="")), "error", "chosen"),
    Case("wrong-type-image", RECORDS, _records(good_record("r1", image=["a.png"])), "error", "image"),
    # Images named by records.
    Case("image-missing", RECORDS, _with_image("images/absent.png", lambda folder: None), "error", "not found"),
    Case(
        "image-corrupt",
        RECORDS,
        _with_image("images/corrupt.png", _image_bytes("corrupt.png", b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 10)),
        "error",
        "image",
    ),
    Case("image-zero-size", RECORDS, _with_image("images/empty.png", _image_bytes("empty.png", b"")), "error", "empty"),
    Case("image-truncated", RECORDS, _with_image("images/cut.png", lambda folder: _cut_png(folder)), "error", "image"),
    Case("image-bomb", RECORDS, _with_image("images/bomb.png", _bomb), "error", "pixels"),
    Case("image-animated", RECORDS, _with_image("images/anim.gif", _animated), "ok"),
    Case("image-16-bit", RECORDS, _with_image("images/deep.png", _sixteen_bit), "ok"),
    Case("image-cmyk", RECORDS, _with_image("images/cmyk.jpg", _cmyk), "ok"),
    Case("image-absolute-path", RECORDS, _absolute, "error", "absolute"),
    Case("image-dotdot-path", RECORDS, _dotdot, "error", ".."),
    Case("image-symlink-out", RECORDS, _symlink, "error", "outside the image root"),
    # The released MMSafe-PO JSON array.
    Case("released-malformed-json", RELEASED, _released(b'[{"id": 1, "question": '), "error", "malformed JSON"),
    Case("released-not-array", RELEASED, _released({"id": 1}), "error", "JSON array"),
    Case(
        "released-missing-question",
        RELEASED,
        _released([released_row(1), released_row(2, question=...)]),
        "error",
        "question",
    ),
    Case(
        "released-no-assistant-turn",
        RELEASED,
        _released([released_row(1), released_row(2, question="USER: hi")]),
        "error",
        "question",
    ),
    Case("released-wrong-type-id", RELEASED, _released([released_row(1), released_row([2])]), "error", "id"),
    Case("released-non-utf8", RELEASED, _released(b'[{"id": 1, "question": "caf\xe9"}]'), "error", "UTF-8"),
    # HH-RLHF dialogues (build-data input).
    Case("hh-malformed-json", HH_RLHF, _hh([_hh_line(GOOD_DIALOGUE), b'{"chosen": \n']), "error", "malformed JSON"),
    Case(
        "hh-not-alternating",
        HH_RLHF,
        _hh(
            [
                _hh_line(GOOD_DIALOGUE),
                _hh_line(
                    {
                        "chosen": "\n\nHuman: a\n\nHuman: b\n\nAssistant: c",
                        "rejected": "\n\nHuman: a\n\nHuman: b\n\nAssistant: d",
                    }
                ),
            ]
        ),
        "error",
        "alternate",
    ),
    Case(
        "hh-missing-rejected",
        HH_RLHF,
        _hh([_hh_line(GOOD_DIALOGUE), _hh_line({"chosen": GOOD_DIALOGUE["chosen"]})]),
        "error",
        "rejected",
    ),
    Case("hh-truncated-gzip", HH_RLHF, _hh([_hh_line(GOOD_DIALOGUE)] * 200, gz=True, truncate=True), "error", "gzip"),
    Case(
        "hh-non-utf8",
        HH_RLHF,
        _hh([_hh_line(GOOD_DIALOGUE), b'{"chosen": "\\n\\nHuman: caf\xe9", "rejected": "x"}\n']),
        "error",
        "UTF-8",
    ),
    # Response records (judge input).
    Case(
        "responses-malformed-json",
        RESPONSES,
        _lines("responses.jsonl", [response_row("r0")], b'{"id": "r1", \n'),
        "error",
        "malformed JSON",
    ),
    Case(
        "responses-missing-response",
        RESPONSES,
        _lines("responses.jsonl", [response_row("r0"), response_row("r1", response=...)]),
        "error",
        "response",
    ),
    Case(
        "responses-wrong-type",
        RESPONSES,
        _lines("responses.jsonl", [response_row("r0"), response_row("r1", response=["a"])]),
        "error",
        "response",
    ),
    Case(
        "responses-non-utf8",
        RESPONSES,
        _lines("responses.jsonl", [response_row("r0")], b'{"id": "r1", "response": "\xff"}\n'),
        "error",
        "UTF-8",
    ),
    # Verdict records (report input).
    Case(
        "verdicts-unknown-verdict",
        VERDICTS,
        _lines("verdicts.jsonl", [verdict_row("r0"), verdict_row("r1", verdict="maybe")]),
        "error",
        "verdict",
    ),
    Case(
        "verdicts-missing-id",
        VERDICTS,
        _lines("verdicts.jsonl", [verdict_row("r0"), verdict_row("r1", id=...)]),
        "error",
        "id",
    ),
    Case(
        "verdicts-malformed-json",
        VERDICTS,
        _lines("verdicts.jsonl", [verdict_row("r0")], b"{\n"),
        "error",
        "malformed JSON",
    ),
    # YAML configs (train, build-data, run).
    Case(
        "config-malformed-yaml", CONFIG, _text("config.yaml", "model: [unclosed\n  beta: 0.1\n"), "error", "config.yaml"
    ),
    Case("config-not-a-mapping", CONFIG, _text("config.yaml", "- just\n- a list\n"), "error", "config.yaml"),
    Case(
        "config-unknown-key",
        CONFIG,
        _text("config.yaml", "no_such_option_anywhere: 3\n"),
        "error",
        "no_such_option_anywhere",
    ),
    Case(
        "config-non-utf8",
        CONFIG,
        lambda folder: _raw_file(folder / "config.yaml", b"model: caf\xe9\n"),
        "error",
        "config.yaml",
    ),
]


def _cut_png(folder: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, format="PNG")
    (folder / "images" / "cut.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def _raw_file(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def cases(*kinds: str) -> list[Case]:
    return [case for case in CASES if case.kind in kinds]
