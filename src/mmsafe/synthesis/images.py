"""Image sources: one image per entity, stored under the output image root.

A source answers ``find(name, entity_type)`` with a :class:`FoundImage` (a local file)
or None. Built in, found by name in :data:`IMAGE_SOURCES` and chained as fallbacks by
:class:`ImageChain`:

- ``local``: an :class:`ImageIndex` (a folder of images named after their entities, or
  a CSV/JSON index from entity to image file);
- ``wikipedia``: the page image of the entity's Wikipedia article through the public
  MediaWiki API, with an on-disk cache, a descriptive User-Agent, a polite minimum
  interval between requests and the bounds and retries of :mod:`mmsafe.http` (a total
  deadline per request, a cap on the size of an answer or image, backoff on 429 and 5xx).

:class:`ImageStore` copies found images into the image root under safe file names.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import shutil
import time
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

from mmsafe import __version__
from mmsafe.data.images import open_image
from mmsafe.errors import ConfigError, DataError, ImageError, MmsafeError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff")
DEFAULT_WIKIPEDIA_API = "https://en.wikipedia.org/w/api.php"
DEFAULT_USER_AGENT = f"mmsafe/{__version__} (multimodal preference data builder; python-httpx)"
MAX_FILE_NAME = 120


@dataclass(frozen=True)
class FoundImage:
    """An image for an entity: a readable local ``path``, a suggested ``file_name``, who found it."""

    path: Path
    file_name: str
    source: str
    detail: str = ""


class ImageSource(Protocol):
    name: str

    def find(self, name: str, entity_type: str) -> FoundImage | None: ...


def safe_file_name(name: str, *, default: str = "image") -> str:
    """A portable file name: NFC, ASCII letters/digits/``._-`` kept, the rest ``_``.

    ``"Café de Flore.JPG"`` -> ``"Caf_de_Flore.jpg"``: the extension is lower-cased,
    runs of other characters become one ``_``, leading dots are dropped (no hidden
    files, no ``..``) and the stem is cut to keep the name under 120 characters.
    """
    name = unicodedata.normalize("NFC", name).replace("\\", "/").rsplit("/", 1)[-1]
    stem, dot, suffix = name.rpartition(".")
    if not dot or not re.fullmatch(r"[A-Za-z0-9]{1,5}", suffix):
        stem, suffix = name, ""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-") or default
    suffix = f".{suffix.lower()}" if suffix else ""
    return stem[: MAX_FILE_NAME - len(suffix)] + suffix


# ---------------------------------------------------------------- local index


@dataclass(frozen=True)
class IndexEntry:
    name: str
    path: Path
    type: str | None = None


class ImageIndex:
    """Entity name -> image file, from a folder or a CSV/JSON index.

    - folder: ``Barack_Obama.jpg`` names the entity "Barack Obama" (underscores are
      spaces); files inside ``PER/``, ``ORG/``, ``LOC/`` or ``MISC/`` sub-folders also
      give the entity type.
    - CSV with a header ``entity,image[,type]``.
    - JSON: ``{"Barack Obama": "obama.jpg"}``, ``{"Barack Obama": {"image": ..., "type": ...}}``
      or ``[{"entity": ..., "image": ..., "type": ...}]``.

    Image paths in an index file are relative to the index file's folder.
    """

    def __init__(self, entries: Iterable[IndexEntry], *, source: str = "") -> None:
        self.source = source
        self.entries: dict[str, IndexEntry] = {}
        for entry in entries:
            self.entries.setdefault(entry.name, entry)
        self._folded = {name.casefold(): entry for name, entry in reversed(list(self.entries.items()))}

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, name: str) -> IndexEntry | None:
        return self.entries.get(name) or self._folded.get(name.casefold())

    def typed_names(self, types: Sequence[str]) -> list[tuple[str, str]]:
        """``(name, type)`` of every entry, for the gazetteer; untyped entries are an error."""
        untyped = [entry.name for entry in self.entries.values() if entry.type is None]
        if untyped:
            raise ConfigError(
                f"images.index {self.source}: the gazetteer needs an entity type for every entry ({len(untyped)} have none, "
                f"e.g. {untyped[0]!r}); add a 'type' column or put the images in PER/ORG/LOC/MISC sub-folders"
            )
        return [
            (entry.name, entry.type)
            for entry in self.entries.values()
            if entry.type is not None and entry.type in types
        ]

    @classmethod
    def load(cls, path: str | Path, *, types: Sequence[str] = ("PER", "ORG", "LOC", "MISC")) -> ImageIndex:
        path = Path(path)
        if path.is_dir():
            return cls(_folder_entries(path, types), source=str(path))
        if not path.is_file():
            raise DataError("image index not found (expected a folder, a .csv or a .json file)", file=str(path))
        if path.suffix.lower() == ".csv":
            entries = _csv_entries(path, types)
        elif path.suffix.lower() == ".json":
            entries = _json_entries(path, types)
        else:
            raise DataError(
                f"unknown image index format {path.suffix!r}; expected a folder, .csv or .json", file=str(path)
            )
        return cls(entries, source=str(path))


def _folder_entries(folder: Path, types: Sequence[str]) -> list[IndexEntry]:
    entries = []
    for file in sorted(folder.rglob("*")):
        if not file.is_file() or file.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        relative = file.relative_to(folder)
        entity_type = relative.parts[0] if len(relative.parts) > 1 and relative.parts[0] in types else None
        entries.append(IndexEntry(name=file.stem.replace("_", " ").strip(), path=file, type=entity_type))
    return entries


def _checked_entry(
    index_file: Path, row: str, name: Any, image: Any, entity_type: Any, types: Sequence[str]
) -> IndexEntry:
    if not isinstance(name, str) or not name.strip():
        raise DataError(
            f"expected a non-empty entity name, got {name!r}", file=str(index_file), record=row, field="entity"
        )
    if not isinstance(image, str) or not image.strip():
        raise DataError(f"expected an image path, got {image!r}", file=str(index_file), record=row, field="image")
    if entity_type in ("", None):
        entity_type = None
    elif entity_type not in types:
        raise DataError(
            f"expected one of {', '.join(types)}, got {entity_type!r}", file=str(index_file), record=row, field="type"
        )
    path = index_file.parent / image
    if not path.is_file():
        raise DataError(
            f"image file not found: {image!r} (looked for {str(path)!r})",
            file=str(index_file),
            record=row,
            field="image",
        )
    return IndexEntry(name=name.strip(), path=path, type=entity_type)


def _csv_entries(path: Path, types: Sequence[str]) -> list[IndexEntry]:
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"entity", "image"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(
                f"missing column(s) {', '.join(sorted(missing))}; expected a header entity,image[,type]",
                file=str(path),
                record="line 1",
            )
        return [
            _checked_entry(path, f"line {reader.line_num}", row.get("entity"), row.get("image"), row.get("type"), types)
            for row in reader
        ]


def _json_entries(path: Path, types: Sequence[str]) -> list[IndexEntry]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"not valid JSON ({error})", file=str(path)) from None
    if isinstance(data, dict):
        entries = []
        for name, value in data.items():
            if isinstance(value, dict):
                entries.append(_checked_entry(path, repr(name), name, value.get("image"), value.get("type"), types))
            else:
                entries.append(_checked_entry(path, repr(name), name, value, None, types))
        return entries
    if isinstance(data, list):
        entries = []
        for position, item in enumerate(data):
            if not isinstance(item, dict):
                raise DataError(
                    f"expected an object with entity and image, got {type(item).__name__}",
                    file=str(path),
                    record=f"item {position}",
                )
            entries.append(
                _checked_entry(path, f"item {position}", item.get("entity"), item.get("image"), item.get("type"), types)
            )
        return entries
    raise DataError("expected an object or a list of {entity, image, type}", file=str(path))


class LocalImageSource:
    """Images from an :class:`ImageIndex` (exact name first, then ignoring case)."""

    name = "local"

    def __init__(self, index: ImageIndex) -> None:
        self.index = index

    def find(self, name: str, entity_type: str) -> FoundImage | None:
        entry = self.index.get(name)
        if entry is None:
            return None
        return FoundImage(
            path=entry.path, file_name=safe_file_name(entry.path.name), source=self.name, detail=entry.name
        )


# ---------------------------------------------------------------- wikipedia


class WikipediaImageSource:
    """The page image of the entity's Wikipedia article (MediaWiki ``pageimages``).

    One API request per entity (redirects followed; missing pages, disambiguation pages
    and pages without an image give None) and one download per image. Both answers are
    cached under ``cache_dir`` so a rerun sends nothing for entities already seen;
    failures (an HTTP error after the retries, a malformed answer, a request past
    ``deadline``, an answer or image over ``max_body_bytes``) raise
    :class:`~mmsafe.errors.ImageError` and are not cached, so a rerun tries again.
    ``requests_sent`` counts HTTP requests, retries included. Redirects are followed
    (Wikimedia redirects thumbnails between hosts).
    """

    name = "wikipedia"

    def __init__(
        self,
        cache_dir: str | Path,
        *,
        api_url: str = DEFAULT_WIKIPEDIA_API,
        user_agent: str = DEFAULT_USER_AGENT,
        thumb_size: int = 500,
        min_interval_s: float = 0.1,
        max_retries: int = 4,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        timeout: float = 30.0,
        deadline: float = 120.0,
        max_body_bytes: int = 32 * 2**20,
        client: Any = None,
    ) -> None:
        from mmsafe.http import HttpPolicy, make_client

        if not user_agent.strip():
            raise ConfigError(
                "images.wikipedia.user_agent: Wikimedia requires a descriptive User-Agent; got an empty one"
            )
        self.api_url = api_url
        self.thumb_size = thumb_size
        self.min_interval_s = min_interval_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.pages_dir = Path(cache_dir) / "pages"
        self.images_dir = Path(cache_dir) / "images"
        self.policy = HttpPolicy(
            timeout_s=timeout,
            deadline_s=deadline,
            max_body_bytes=max_body_bytes,
            max_retries=max_retries,
            backoff_base=backoff_s,
            backoff_max=max_backoff_s,
            follow_redirects=True,
        )
        self.client = client or make_client(self.policy, headers={"User-Agent": user_agent})
        self.requests_sent = 0
        self._last_request = 0.0

    def _wait_politely(self) -> None:
        delay = self._last_request + self.min_interval_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        self._last_request = time.monotonic()

    def _count(self) -> None:
        self._wait_politely()
        self.requests_sent += 1

    def _get(self, url: str, params: dict[str, Any] | None, what: str) -> Any:
        """The answer to a GET (a :class:`mmsafe.http.Reply`); :class:`ImageError` after the retries."""
        from mmsafe.http import HttpError, RetriesExhausted, send

        try:
            return send(
                self.client,
                "GET",
                url,
                self.policy,
                label=f"{what}: GET {url}",
                before_attempt=self._count,
                params=params,
            )
        except RetriesExhausted as error:
            problem = str(error.last).removeprefix(f"{url}: ")
            raise ImageError(
                f"{what}: {problem} from {url} after {error.attempts} attempts", record=what, field="image"
            ) from None
        except HttpError as error:
            problem = f"HTTP {error.status}" if error.kind == "status" else str(error).removeprefix(f"{url}: ")
            raise ImageError(f"{what}: {problem} from {url}", record=what, field="image") from None

    def _page_path(self, name: str) -> Path:
        return self.pages_dir / f"{hashlib.sha1(name.encode('utf-8')).hexdigest()[:24]}.json"

    def lookup(self, name: str) -> dict[str, Any]:
        """``{"query", "title", "image_url"}`` for ``name`` (``image_url`` None: no image)."""
        cached = self._page_path(name)
        if cached.is_file():
            return json.loads(cached.read_text(encoding="utf-8"))
        params = {
            "action": "query",
            "format": "json",
            "formatversion": "2",
            "prop": "pageimages|pageprops",
            "piprop": "thumbnail|name",
            "pithumbsize": str(self.thumb_size),
            "ppprop": "disambiguation",
            "redirects": "1",
            "titles": name,
        }
        response = self._get(self.api_url, params, name)
        try:
            pages = json.loads(response.body)["query"]["pages"]
            page = pages[0] if isinstance(pages, list) else next(iter(pages.values()))
            if not isinstance(page, dict):
                raise TypeError("page is not an object")
        except (ValueError, KeyError, TypeError, IndexError, StopIteration) as error:
            raise ImageError(
                f"{name}: malformed answer from the Wikipedia API ({type(error).__name__}: {error})",
                record=name,
                field="image",
            ) from None
        image_url = None
        if (
            not page.get("missing")
            and not page.get("invalid")
            and "disambiguation" not in (page.get("pageprops") or {})
        ):
            thumbnail = page.get("thumbnail") or {}
            image_url = thumbnail.get("source") if isinstance(thumbnail.get("source"), str) else None
        result = {"query": name, "title": page.get("title", name), "image_url": image_url}
        _write_atomic(cached, json.dumps(result, ensure_ascii=False).encode("utf-8"))
        return result

    def download(self, url: str, what: str) -> Path:
        """The image at ``url`` in the cache, fetched once; named like the Wikimedia thumbnail."""
        base = unquote(Path(urlparse(url).path).name)
        digest = hashlib.sha1(url.encode("utf-8")).hexdigest()[:10]
        target = self.images_dir / f"{digest}-{safe_file_name(base)}"
        if target.is_file():
            return target
        response = self._get(url, None, what)
        _write_atomic(target, response.body)
        return target

    def find(self, name: str, entity_type: str) -> FoundImage | None:
        page = self.lookup(name)
        if page["image_url"] is None:
            return None
        path = self.download(page["image_url"], name)
        file_name = safe_file_name(unquote(Path(urlparse(page["image_url"]).path).name))
        return FoundImage(path=path, file_name=file_name, source=self.name, detail=page["title"])


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


# ---------------------------------------------------------------- chain and store


class ImageChain:
    """Sources tried in order until one finds an image.

    A source that fails (network, malformed answer, unreadable file) is logged and
    counted in ``errors`` and the next one is tried, so one flaky service never stops
    a long build; :meth:`lookup` also says whether a source failed, so the builder can
    leave the dialogue for a rerun to retry.
    """

    def __init__(self, sources: Sequence[ImageSource]) -> None:
        self.sources = list(sources)
        self.errors: Counter[str] = Counter()

    def lookup(self, name: str, entity_type: str) -> tuple[FoundImage | None, bool]:
        """``(image or None, whether a source failed on the way)``."""
        failed = False
        for source in self.sources:
            try:
                found = source.find(name, entity_type)
            except MmsafeError as error:
                self.errors[source.name] += 1
                failed = True
                logger.warning("image source %s failed for %r: %s", source.name, name, error)
                continue
            if found is not None:
                return found, failed
        return None, failed

    def find(self, name: str, entity_type: str) -> FoundImage | None:
        return self.lookup(name, entity_type)[0]


class ImageStore:
    """Copies images into ``root`` under safe, unique names; returns names relative to root.

    The same source file is stored once; two different files wanting the same name get
    a short content hash appended. With ``verify`` each image is opened first, so a
    corrupt download raises :class:`~mmsafe.errors.ImageError` instead of entering the data.
    """

    def __init__(self, root: str | Path, *, verify: bool = True) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.verify = verify
        self._stored: dict[Path, str] = {}

    def store(self, found: FoundImage) -> str:
        if found.path in self._stored:
            return self._stored[found.path]
        if self.verify:
            open_image(found.path, name=f"{found.source} image for {found.detail!r}")
        data = found.path.read_bytes()
        name = found.file_name
        target = self.root / name
        if target.exists() and target.read_bytes() != data:
            stem, dot, suffix = name.rpartition(".")
            stem, suffix = (stem, f".{suffix}") if dot else (name, "")
            name = f"{stem}-{hashlib.sha1(data).hexdigest()[:8]}{suffix}"
            target = self.root / name
        if not target.exists():
            temporary = target.with_name(f".{target.name}.tmp")
            shutil.copyfile(found.path, temporary)
            os.replace(temporary, target)
        self._stored[found.path] = name
        return name
