"""Shared fixtures: the tiny offline model is built once per test session."""

from __future__ import annotations

import os

import pytest

# Progress bars off in tests (they go to a non-terminal anyway); offline always.
os.environ.setdefault("MMSAFE_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny LLaVA checkpoint (random weights, seed 0) in a session-wide folder."""
    from mmsafe.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=0)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """One run of ``mmsafe demo`` for the whole session (the slow demo tests share it): (out folder, what it printed)."""
    import contextlib
    import io

    from mmsafe.cli import main

    out = tmp_path_factory.mktemp("demo") / "demo"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["demo", "--out", str(out)]) == 0
    return out, printed.getvalue()
