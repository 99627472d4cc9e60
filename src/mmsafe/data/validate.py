"""Check a data file record by record and list every problem, not just the first.

Each problem is one :class:`~mmsafe.errors.DataError` whose text reads
``file:record:field: message``: malformed JSON lines, missing or mistyped fields,
duplicate ids, and images that are missing, corrupt, too large or outside the image root.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mmsafe.data.formats import detect_format, get_format
from mmsafe.data.formats.base import FileReadError
from mmsafe.data.images import DEFAULT_MAX_PIXELS, check_image_path, load_image
from mmsafe.data.inputs import EMBEDDED_IMAGE_FORMATS, UniqueIds, default_image_root
from mmsafe.errors import ConfigError, DataError, ImageError
from mmsafe.progress import track


@dataclass
class ValidationReport:
    """The outcome of :func:`validate_file`: ``good`` of ``total`` records had no problem."""

    path: str
    format_name: str | None = None
    image_root: str | None = None
    total: int = 0
    good: int = 0
    problems: list[DataError] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        kind = f" ({self.format_name})" if self.format_name else ""
        verdict = "ok" if self.ok else f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}"
        return f"{self.path}{kind}: {self.good} of {self.total} records good; {verdict}"


def validate_file(
    path: str | Path,
    image_root: str | Path | None = None,
    format_name: str | None = None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ValidationReport:
    """Read every record of ``path`` and collect every problem.

    ``image_root``: the folder image paths are relative to; by default the data file's
    folder. Every distinct image is opened (and decoded) once. Never raises for bad
    input: problems, including an unreadable file, are in the report.
    """
    file = str(path)
    report = ValidationReport(path=file)
    try:
        report.format_name = format_name or detect_format(path)
        data_format = get_format(report.format_name)
    except DataError as error:
        report.problems.append(error.at(file=file))
        return report
    # Embedded images (hf) are not files on disk: only their names are checked.
    root: Path | None = None
    if report.format_name not in EMBEDDED_IMAGE_FORMATS:
        try:
            root = default_image_root(path, image_root, format_name=report.format_name)
        except ConfigError as error:  # a damaged image-root sidecar: a problem in the report
            report.problems.append(DataError(str(error), file=file))
            return report
    report.image_root = None if root is None else str(root)
    ids = UniqueIds(file=file)
    image_problems: dict[str, ImageError | None] = {}
    for item in track(data_format.read_items(path), desc="validate", unit="record"):
        if isinstance(item, DataError):
            report.problems.append(item.at(file=file))
            if not isinstance(item, FileReadError):
                report.total += 1
            continue
        report.total += 1
        record_problems = []
        duplicate = ids.problem(item.id, report.total)
        if duplicate is not None:
            record_problems.append(duplicate)
        if item.image is not None:
            if item.image not in image_problems:
                image_problems[item.image] = _check_image(root, item.image, max_pixels)
            problem = image_problems[item.image]
            if problem is not None:
                record_problems.append(problem.at(file=file, record=item.id))
        report.problems.extend(record_problems)
        if not record_problems:
            report.good += 1
    if report.total == 0 and not report.problems:
        report.problems.append(DataError("no records in the file (expected at least one)", file=file))
    return report


def _check_image(root: Path | None, relative: str, max_pixels: int) -> ImageError | None:
    """The problem of one image under ``root``; with no root (embedded images) only its path is checked."""
    try:
        if root is not None:
            load_image(root, relative, max_pixels=max_pixels).close()
        else:
            check_image_path(relative)
    except ImageError as error:
        return error
    return None
