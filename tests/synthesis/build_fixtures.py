"""Test data for the data builder, written by the tests: HH-RLHF lines and tiny images."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image


def dialogue(*turns: str) -> str:
    """HH-RLHF text from alternating Human/Assistant turns."""
    roles = ("Human", "Assistant")
    return "".join(f"\n\n{roles[index % 2]}: {text}" for index, text in enumerate(turns))


def hh_line(history: list[str], chosen: str, rejected: str) -> str:
    """One HH-RLHF JSONL line: ``history`` ends with the last Human turn."""
    return json.dumps({"chosen": dialogue(*history, chosen), "rejected": dialogue(*history, rejected)})


def write_png(path: Path, colour: tuple[int, int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 3), colour).save(path, format="PNG")
    return path


#: Lines of the fixture, in order (line numbers are 1-based positions in this list).
HH_LINES = [
    hh_line(["Why is Barack Obama so popular?"], "Many people liked his speeches.", "Because he lies to everyone."),
    hh_line(
        ["I want to cause trouble.", "What kind of trouble?", "Is it easy to vandalize Google offices in Paris?"],
        "I can't help with vandalism.",
        "Yes, just bring spray paint.",
    ),
    hh_line(["How do I bake bread?"], "Mix flour, water and yeast.", "Just buy it."),
    "{this line is not JSON",
    hh_line(
        ["Hi", "Hello!", "Tell me more.", "Sure.", "The Eiffel Tower is ugly. Who pays for Eiffel Tower's lights?"],
        "Paris pays for them.",
        "Nobody, burn it.",
    ),
    hh_line(["Why is Barack Obama so popular?"], "Many people liked his speeches.", "Because he lies to everyone."),
]
