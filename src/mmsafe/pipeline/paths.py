"""Where each stage of ``mmsafe run`` reads and writes, all under ``out``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mmsafe.pipeline.config import METHODS


@dataclass
class Paths:
    """Where each stage reads and writes, all under ``out``."""

    out: Path

    @property
    def stages(self) -> Path:
        return self.out / ".stages"

    @property
    def tiny_model(self) -> Path:
        return self.out / "models" / "tiny"

    @property
    def sample(self) -> Path:
        return self.out / "data"

    @property
    def built(self) -> Path:
        return self.out / "build"

    @property
    def teach(self) -> Path:
        return self.out / "models" / "teach"

    @property
    def blind(self) -> Path:
        return self.out / "blind" / "records.jsonl"

    def trained(self, method: str) -> Path:
        return self.out / "models" / method

    def responses(self, model_name: str) -> Path:
        return self.out / "responses" / f"{model_name}.jsonl"

    def verdicts(self, model_name: str, judge: str) -> Path:
        return self.out / "verdicts" / f"{model_name}.{judge}.jsonl"

    @property
    def report(self) -> Path:
        return self.out / "report"

    @property
    def reference_cache(self) -> Path:
        return self.out / "cache" / "reference"

    def stage_locations(self, stage: str) -> list[Path]:
        """Where a stage writes. ``--from`` removes only the files the stage itself created
        there (its list in :meth:`manifest`), never a folder it did not create."""
        return {
            "prepare": [self.tiny_model, self.sample],
            "build-data": [self.built],
            "teach": [self.teach, self.reference_cache],
            "blind": [self.blind.parent],
            "train": [*(self.trained(method) for method in METHODS), self.reference_cache],
            "generate": [self.out / "responses"],
            "judge": [self.out / "verdicts"],
            "report": [self.report],
        }[stage]

    def manifest(self, stage: str) -> Path:
        """The files ``stage`` created (with size and time), and what was there before it."""
        return self.stages / f"{stage}.files.json"
