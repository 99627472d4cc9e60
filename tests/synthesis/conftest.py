"""Fixtures for the data builder: an HH-RLHF file and a local image index, made here."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.synthesis.build_fixtures import HH_LINES, write_png


@pytest.fixture
def image_index(tmp_path: Path) -> Path:
    """A CSV index: entity, image, type (images in the index's folder)."""
    folder = tmp_path / "index"
    write_png(folder / "img" / "obama.png", (200, 0, 0))
    write_png(folder / "img" / "google.png", (0, 200, 0))
    write_png(folder / "img" / "paris.png", (0, 0, 200))
    write_png(folder / "img" / "eiffel tower.png", (100, 100, 0))
    (folder / "entities.csv").write_text(
        "entity,image,type\n"
        "Barack Obama,img/obama.png,PER\n"
        "Google,img/google.png,ORG\n"
        "Paris,img/paris.png,LOC\n"
        "Eiffel Tower,img/eiffel tower.png,LOC\n",
        encoding="utf-8",
    )
    return folder / "entities.csv"


@pytest.fixture
def hh_file(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(HH_LINES) + "\n", encoding="utf-8")
    return path
