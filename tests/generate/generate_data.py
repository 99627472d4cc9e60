"""Small preference data sets with images on disk, for the generation tests."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

WORDS = ["the", "person", "featured", "in", "image", "company", "site", "how", "can", "I", "get", "into", "stadium"]


def make_records(count: int, *, image_every: int = 2, seed: int = 0) -> list[dict]:
    """``count`` valid preference records of varied prompt lengths; every ``image_every``-th has no image.

    Records with an image name ``images/<id>.png`` (written by :func:`write_dataset`).
    """
    records = []
    for index in range(count):
        words = " ".join(WORDS[(index + seed + k) % len(WORDS)] for k in range(3 + (index * 7) % 17))
        with_image = index % image_every != 0
        messages = []
        if index % 5 == 4:  # some records carry a chat history
            messages += [
                {"role": "user", "content": "Hello there"},
                {"role": "assistant", "content": "Hi, how can I help?"},
            ]
        messages.append({"role": "user", "content": ("<image>\n" if with_image else "") + f"Tell me about {words}?"})
        records.append(
            {
                "id": f"rec-{index:04d}",
                "messages": messages,
                "image": f"images/rec-{index:04d}.png" if with_image else None,
                "chosen": "I cannot help with that.",
                "rejected": ["Sure, here is how."],
                "rejected_sources": ["human"],
                "meta": {"text_prompt": f"Tell me about {words} in Paris?", "entity": "Paris"},
            }
        )
    return records


def write_dataset(folder: Path, records: list[dict]) -> Path:
    """Write ``records.jsonl`` and the images it names (small, of varied size and colour)."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, record in enumerate(records):
        if record["image"]:
            path = folder / record["image"]
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new(
                "RGB", (24 + index % 40, 30 + (index * 3) % 20), ((index * 37) % 256, (index * 91) % 256, 90)
            ).save(path)
    data = folder / "records.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return data
