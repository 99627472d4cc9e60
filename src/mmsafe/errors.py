"""The project's own error types.

Every error a user can cause (bad data, bad config, a missing model) is raised as a
subclass of :class:`MmsafeError`; the CLI prints its message and exits 1 instead of
showing a traceback. ``str(error)`` always says where the problem is and what was
expected, in the form ``file:record:field: message``.
"""

from __future__ import annotations

from dataclasses import dataclass


class MmsafeError(Exception):
    """Base class of every error mmsafe raises on purpose."""


@dataclass(frozen=True)
class Location:
    """Where a problem was found: any of the parts may be unknown (None)."""

    file: str | None = None
    record: str | None = None
    field: str | None = None

    def __str__(self) -> str:
        parts = [self.file or "-", self.record or "-", self.field or "-"]
        return ":".join(parts)


class DataError(MmsafeError):
    """A problem with input data, naming file, record and field.

    ``record`` is the record id when known, else ``line N`` / ``item N``.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        record: str | None = None,
        field: str | None = None,
    ) -> None:
        self.message = message
        self.location = Location(
            None if file is None else str(file),
            None if record is None else str(record),
            field,
        )
        super().__init__(f"{self.location}: {message}")

    def at(self, *, file: str | None = None, record: str | None = None) -> DataError:
        """The same error with the file or record filled in where it was unknown."""
        return type(self)(
            self.message,
            file=self.location.file or file,
            record=self.location.record or record,
            field=self.location.field,
        )


class ImageError(DataError):
    """An image that is missing, corrupt, too large or outside the image root."""


class ConfigError(MmsafeError):
    """A configuration value that is missing, of the wrong type or out of range."""


class ModelError(MmsafeError):
    """A model or processor that cannot be loaded as asked (format, path, safety)."""
