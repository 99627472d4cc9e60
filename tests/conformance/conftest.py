"""The conformance matrix: every architecture of :mod:`mmsafe.models.zoo`, every command.

Each architecture's tiny checkpoint is built once per session. The records are in the
released form with several turns, prompts of different lengths and images of different
sizes and aspect ratios (so processors that keep native sizes batch unequal images).
Numbers measured by the cells are collected and printed as one table at the end of the
run.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image

from mmsafe.data.records import read_preference_records, write_records
from mmsafe.models.zoo import ARCHITECTURES

#: architecture -> cell -> printed value
RESULTS: dict[str, dict[str, str]] = defaultdict(dict)

#: (width, height) of the conformance images: landscape, portrait, square.
IMAGE_SIZES = ((64, 48), (40, 56), (56, 56))


def record_result(architecture: str, cell: str, value: str) -> None:
    RESULTS[architecture][cell] = value


@pytest.fixture(scope="session")
def conformance_data(tmp_path_factory) -> Path:
    """Six records (1, 3, 5 and 7 turns), K = 2, 2, 1, 2, 2, 1, three image sizes; records.jsonl + images/."""
    from mmsafe.data.sample import write_sample

    out = tmp_path_factory.mktemp("conformance-data")
    write_sample(out)
    records = list(read_preference_records(out / "records.jsonl"))
    by_turns: dict[int, list] = defaultdict(list)
    for record in records:
        by_turns[len(record.messages)].append(record)
    chosen = [by_turns[1][0], by_turns[3][0], by_turns[5][0], by_turns[7][0], by_turns[1][1], by_turns[3][1]]
    (out / "images").mkdir(exist_ok=True)
    for index, record in enumerate(chosen):
        width, height = IMAGE_SIZES[index % len(IMAGE_SIZES)]
        picture = Image.new("RGB", (width, height), (40 * index % 255, 90, 160))
        for x in range(0, width, 8):  # some structure, so image features differ by position
            for y in range(height):
                picture.putpixel((x, y), (250, 250 - 3 * y % 250, 20))
        name = f"images/conformance-{index}.png"
        picture.save(out / name)
        record.image = name
        if index % 3 != 2:
            record.rejected.append("I cannot see any picture, but in general you would plan it carefully and then act.")
            record.rejected_sources.append("blind")
    write_records(out / "conformance.jsonl", chosen)
    return out / "conformance.jsonl"


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """architecture name -> its tiny checkpoint folder, built on first use."""
    from mmsafe.models.zoo import build

    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build(name, tmp_path_factory.mktemp(f"zoo-{name}"), seed=0)
        return built[name]

    return get


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not RESULTS:
        return
    cells = sorted({cell for row in RESULTS.values() for cell in row})
    terminalreporter.section("conformance matrix")
    header = ["architecture", *cells]
    rows = [[name, *(RESULTS[name].get(cell, "-") for cell in cells)] for name in ARCHITECTURES if name in RESULTS]
    widths = [max(len(str(row[column])) for row in [header, *rows]) for column in range(len(header))]
    for row in [header, *rows]:
        terminalreporter.write_line(
            "  ".join(str(value).ljust(width) for value, width in zip(row, widths, strict=True))
        )
