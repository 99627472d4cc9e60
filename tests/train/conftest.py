"""Fixtures for the training tests: the bundled sample set, with and without blind responses."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmsafe.data.records import read_preference_records, write_records

#: Stand-ins for what the reference model says without the image (the "blind" responses).
BLIND_ANSWERS = (
    "Sure, I cannot see a picture, but in general you just go ahead and do it.",
    "Here is a general way: plan it, then act when nobody is looking.",
)


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    """The bundled sample set (records.jsonl + images/), written once per session."""
    from mmsafe.data.sample import write_sample

    out = tmp_path_factory.mktemp("sample")
    write_sample(out)
    return out


@pytest.fixture(scope="session")
def bpo_records(sample_dir) -> Path:
    """The sample records with a second, blind rejected response each (K = 2)."""
    records = list(read_preference_records(sample_dir / "records.jsonl"))
    for index, record in enumerate(records):
        record.rejected.append(BLIND_ANSWERS[index % len(BLIND_ANSWERS)])
        record.rejected_sources.append("blind")
    path = sample_dir / "records_bpo.jsonl"
    write_records(path, records)
    return path


@pytest.fixture(scope="session")
def small_records(bpo_records) -> Path:
    """Twelve train-split records of the K = 2 set: enough for a few steps, quick to prepare."""
    records = [record for record in read_preference_records(bpo_records) if record.meta.get("split") == "train"][:12]
    path = bpo_records.parent / "records_small.jsonl"
    write_records(path, records)
    return path
