"""Packaging and project habits: one version, the wheel's contents, the extras, what CI runs."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import mmsafe
from mmsafe.cli import main

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the project's test set-up uses 3.11


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_the_version_is_written_once_and_mmsafe_version_prints_the_installed_one(capsys):
    project = _pyproject()
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "mmsafe.__version__"}
    # No other file of the package or the project writes the version string.
    version = mmsafe.__version__
    writers = [
        path.relative_to(ROOT).as_posix()
        for path in [ROOT / "pyproject.toml", *sorted((ROOT / "src" / "mmsafe").rglob("*.py"))]
        if version in path.read_text(encoding="utf-8")
    ]
    assert writers == ["src/mmsafe/__init__.py"]

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"mmsafe {importlib.metadata.version('mmsafe')}" == f"mmsafe {version}"


def test_trl_is_in_the_bench_extra_only_and_make_test_installs_it():
    extras = _pyproject()["project"]["optional-dependencies"]
    with_trl = sorted(
        name
        for name, requirements in extras.items()
        if any(re.match(r"trl\b", requirement) for requirement in requirements)
    )
    assert with_trl == ["bench"]
    # Dry run of `make test` in a virtual environment that does not exist: every step is printed.
    dry = subprocess.run(
        ["make", "-n", "-B", "test", "VENV=not-a-venv"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert dry.returncode == 0, dry.stderr
    installs = [line for line in dry.stdout.splitlines() if "pip install" in line and " -e " in line]
    assert installs[-1].endswith('-e ".[dev,bench]"'), installs


def test_ci_lints_before_it_runs_the_readme_test_command(tmp_path):
    """.ci/run with a stand-in ``make`` that records what it was asked to do."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "make.log"
    fake = bin_dir / "make"
    fake.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\n', encoding="utf-8")
    fake.chmod(0o755)
    result = subprocess.run(
        [str(ROOT / ".ci" / "run")],
        env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert log.read_text(encoding="utf-8").splitlines() == ["lint", "test"]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "make test" in readme and "make demo" in readme
    lint = subprocess.run(["make", "-n", "lint", "VENV=.venv"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "ruff check src tests benchmarks" in lint.stdout, lint.stdout + lint.stderr


@pytest.mark.slow
def test_the_wheel_ships_py_typed_the_license_and_the_version(tmp_path):
    """A wheel built from the project's files: typed, licensed, versioned from ``__version__``."""
    pytest.importorskip("setuptools")
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--disable-pip-version-check",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    [wheel] = (tmp_path / "dist").glob("mmsafe-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        dist_info = f"mmsafe-{mmsafe.__version__}.dist-info"
        metadata = archive.read(f"{dist_info}/METADATA").decode("utf-8")
        license_text = archive.read(f"{dist_info}/licenses/LICENSE").decode("utf-8")
    assert "mmsafe/py.typed" in names
    assert f"\nVersion: {mmsafe.__version__}\n" in metadata
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert 'Requires-Dist: trl==1.16.0; extra == "bench"' in metadata
