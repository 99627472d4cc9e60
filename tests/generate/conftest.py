"""Fixtures for generation tests: small preference data sets, the tiny model behind an engine."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.generate.generate_data import make_records, write_dataset


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """24 records (half with images) in ``tmp_path/data/records.jsonl``."""
    return write_dataset(tmp_path / "data", make_records(24))


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir):
    """The tiny model loaded once (fp32, CPU) behind an HFEngine."""
    from mmsafe.generate.hf_engine import HFEngine

    return HFEngine(tiny_model_dir, dtype="float32", device="cpu", batch_size=16)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine a parallel
    region waits for a descheduled thread; one thread keeps these tests fast and steady."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
