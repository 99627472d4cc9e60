"""Images: safe paths under an image root, robust loading to 8-bit RGB, square padding.

Every image a record names is a path relative to an *image root*. :func:`resolve_image_path`
keeps it there (no absolute paths, no ``..``, no symlink that leads out), and
:func:`load_image` turns whatever is on disk (palette, alpha, CMYK, 16-bit, animated,
rotated by EXIF) into a plain RGB image, refusing files that are missing, empty, corrupt or
so large that decoding them would exhaust memory (decompression bombs).

Three bounds are read from the file's header, before any pixel is decoded: the pixel
count (``max_pixels``), the longest side (``max_side``) and the ratio of the longer side
to the shorter (``max_aspect_ratio``). A tiny PNG can claim 10,000 x 1 pixels: it passes
the pixel count, but no processor reads such a strip sensibly, and squaring it would
build a 10,000 x 10,000 canvas.

:func:`prepare_image` then applies the LLaVA release's ``pad`` mode: the image is centred
on a square canvas filled with the processor's mean colour before the processor resizes
it, so that nothing is cropped away. The canvas itself stays within ``max_pixels``: an
image whose square would be larger is scaled down first (the processor shrinks it to a
few hundred pixels anyway).
"""

from __future__ import annotations

import base64
import io
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from urllib.parse import unquote

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mmsafe.errors import ConfigError, ImageError

#: Largest width x height :func:`load_image` decodes by default (a 7,000 x 7,000 photo).
DEFAULT_MAX_PIXELS = 50_000_000
#: Longest side :func:`load_image` accepts by default (larger than any camera's).
DEFAULT_MAX_SIDE = 16_384
#: Largest ratio of the longer side to the shorter one accepted by default; a stronger
#: strip is distorted or refused by every vision-language processor anyway.
DEFAULT_MAX_ASPECT_RATIO = 50.0
PAD_MODES = ("pad", "resize", "none")
WHITE = (255, 255, 255)


def _check_relative(relative: str) -> None:
    """Reject what would leave the root before touching the disk."""
    if not relative:
        raise ImageError("expected a relative image path, got an empty string", field="image")
    if "\x00" in relative:
        raise ImageError(f"image path {relative!r} contains a NUL byte", field="image")
    if (
        PurePosixPath(relative).is_absolute()
        or PureWindowsPath(relative).is_absolute()
        or PureWindowsPath(relative).drive
    ):
        raise ImageError(
            f"image path {relative!r} is absolute; expected a path relative to the image root", field="image"
        )
    parts = relative.replace("\\", "/").split("/")
    if ".." in parts:
        raise ImageError(f"image path {relative!r} contains '..'; expected a path inside the image root", field="image")


def check_image_path(relative: str) -> None:
    """Check a relative image path without an image root (absolute and ``..`` are refused)."""
    _check_relative(str(relative))


def resolve_image_path(image_root: str | Path, relative: str | Path) -> Path:
    """The file ``relative`` names under ``image_root``, confined to that root.

    Absolute paths, ``..`` components and symlinks whose real path leaves the root raise
    :class:`~mmsafe.errors.ImageError`. When the exact name does not exist but its
    URL-decoded form does (the release names files like ``500px-Caf%C3%A9_de_Flore.jpg``
    while an unpacked archive may hold ``500px-Café_de_Flore.jpg``), the decoded file is
    used. The returned path may not exist; :func:`load_image` reports that.
    """
    relative = str(relative)
    _check_relative(relative)
    root = Path(image_root)
    candidate = root / relative
    if not os.path.lexists(candidate):
        decoded = unquote(relative)
        if decoded != relative:
            _check_relative(decoded)
            if os.path.lexists(root / decoded):
                candidate = root / decoded
    real_root = root.resolve()
    real = candidate.resolve()
    if real != real_root and real_root not in real.parents:
        raise ImageError(
            f"image path {relative!r} leads outside the image root {str(root)!r} (to {str(real)!r})", field="image"
        )
    return candidate


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    Transparent pixels are composited onto white (what a viewer shows); 16- and 32-bit
    integer images are scaled from the 16-bit range (0..65535 -> 0..255, dividing by 257
    so that 65535 maps to exactly 255) instead of being clipped, which would turn most
    of a 16-bit photo white.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
        mode = image.mode
        if mode == "RGB":
            return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        gray = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode == "F":
        gray = np.clip(np.round(np.asarray(image, dtype=np.float64)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(
    image_root: str | Path,
    relative: str | Path,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int = DEFAULT_MAX_SIDE,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
) -> Image.Image:
    """Open ``relative`` under ``image_root`` as an upright 8-bit RGB image.

    The size is read from the header and checked before any pixel is decoded: at most
    ``max_pixels`` pixels, ``max_side`` pixels per side, and a longer side at most
    ``max_aspect_ratio`` times the shorter. Animated images give their first frame.
    Errors are :class:`~mmsafe.errors.ImageError` naming the path (field ``image``).
    """
    path = resolve_image_path(image_root, relative)
    return open_image(
        path, max_pixels=max_pixels, max_side=max_side, max_aspect_ratio=max_aspect_ratio, name=str(relative)
    )


def check_image_size(
    width: int,
    height: int,
    name: str,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int = DEFAULT_MAX_SIDE,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
) -> None:
    """Refuse a ``width`` x ``height`` image past one of the bounds (an :class:`ImageError`).

    A 60000x1 image fails ``max_side`` (16,384 by default); a 10000x1 image passes it
    but fails ``max_aspect_ratio`` (10000 / 1 > 50).
    """
    if width < 1 or height < 1:
        raise ImageError(f"image {name!r} is {width}x{height}; expected at least 1 pixel per side", field="image")
    if width * height > max_pixels:
        raise ImageError(
            f"image {name!r} is {width}x{height} = {width * height:,} pixels, more than the limit of {max_pixels:,} (max_pixels)",
            field="image",
        )
    if max(width, height) > max_side:
        raise ImageError(
            f"image {name!r} is {width}x{height}; expected at most {max_side:,} pixels per side (max_side)",
            field="image",
        )
    ratio = max(width, height) / min(width, height)
    if ratio > max_aspect_ratio:
        raise ImageError(
            f"image {name!r} is {width}x{height}, an aspect ratio of {ratio:,.1f}:1; expected at most {max_aspect_ratio:g}:1 (max_aspect_ratio)",
            field="image",
        )


def open_image(
    path: str | Path,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int = DEFAULT_MAX_SIDE,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
    name: str | None = None,
) -> Image.Image:
    """Like :func:`load_image` for a path that is already trusted (no root check)."""
    path = Path(path)
    name = name or str(path)
    if not path.exists():
        raise ImageError(
            f"image not found: {name!r} (looked for {str(path.absolute())!r}; set --image-root to the folder that holds the images)",
            field="image",
        )
    if not path.is_file():
        raise ImageError(f"image path {name!r} is not a file", field="image")
    if path.stat().st_size == 0:
        raise ImageError(f"image file {name!r} is empty (0 bytes)", field="image")
    try:
        with warnings.catch_warnings():
            # We apply our own limit below; Pillow's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as opened:  # reads the header only
                width, height = opened.size
                check_image_size(
                    width, height, name, max_pixels=max_pixels, max_side=max_side, max_aspect_ratio=max_aspect_ratio
                )
                opened.seek(0)  # the first frame of an animation
                opened.load()
                image = ImageOps.exif_transpose(opened)
                if image is opened:
                    image = opened.copy()
                return to_rgb(image)
    except ImageError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageError(f"image {name!r} is too large to decode safely ({error})", field="image") from None
    except UnidentifiedImageError:
        raise ImageError(
            f"image {name!r} is not a readable image file (corrupt or unknown format)", field="image"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageError(f"image {name!r} is corrupt or truncated ({error})", field="image") from None


def pad_to_square(
    image: Image.Image, fill: tuple[int, int, int], *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Centre ``image`` on a square canvas of colour ``fill`` (the release's ``pad`` mode).

    A 4x2 image gives a 4x4 canvas with the image pasted at row offset (4 - 2) // 2 = 1.
    The canvas has at most ``max_pixels`` pixels: a larger square is first scaled down to
    side ``floor(sqrt(max_pixels))``, so a 9000x200 image under ``max_pixels=1_000_000``
    is resized to 1000x22 (200 * 1000 / 9000 = 22.2) and padded to 1000x1000.
    """
    width, height = image.size
    if width == height:
        return image.copy()
    side = max(width, height)
    if side * side > max_pixels:
        side = math.isqrt(max_pixels)
        scale = side / max(width, height)
        width, height = max(1, int(width * scale)), max(1, int(height * scale))
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    canvas = Image.new(image.mode, (side, side), fill if image.mode == "RGB" else fill[0])
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def mean_fill(image_mean: float | Sequence[float]) -> tuple[int, int, int]:
    """The padding colour from a processor's ``image_mean`` (floats in 0..1).

    Truncates like the release (``int(x * 255)``): CLIP's mean (0.48145466, 0.4578275,
    0.40821073) gives (122, 116, 104), since 0.48145466 * 255 = 122.77 -> 122.
    """
    if isinstance(image_mean, int | float):
        image_mean = [float(image_mean)] * 3
    values = list(image_mean)
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or not all(isinstance(value, int | float) and 0.0 <= value <= 1.0 for value in values):
        raise ConfigError(f"image_mean: expected three floats in 0..1, got {image_mean!r}")
    red, green, blue = (int(value * 255) for value in values)
    return (red, green, blue)


def prepare_image(
    image: Image.Image,
    mode: str = "pad",
    image_mean: float | Sequence[float] | None = None,
    size: int | tuple[int, int] | None = None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Shape an RGB image for a processor.

    ``pad``: square canvas of the mean colour (mid-gray without ``image_mean``), at most
    ``max_pixels`` pixels (see :func:`pad_to_square`), then resized to ``size`` if given;
    ``resize``: stretched to ``size`` if given; ``none``: unchanged. The processor still
    applies its own resize and normalisation.
    """
    if mode not in PAD_MODES:
        raise ConfigError(f"image mode: expected one of {', '.join(PAD_MODES)}, got {mode!r}")
    image = to_rgb(image)
    if mode == "none":
        return image
    if mode == "pad":
        image = pad_to_square(image, mean_fill(0.5 if image_mean is None else image_mean), max_pixels=max_pixels)
    if size is not None:
        target = (size, size) if isinstance(size, int) else (size[0], size[1])
        if image.size != target:
            image = image.resize(target, Image.Resampling.BICUBIC)
    return image


def blank_image(size: tuple[int, int] = (336, 336), colour: tuple[int, int, int] = (128, 128, 128)) -> Image.Image:
    """A plain image of one colour (a harmless stand-in image for probes)."""
    return Image.new("RGB", size, colour)


def data_url(data: bytes, mime: str) -> str:
    """``data:<mime>;base64,...``: bytes to inline in a request or a page."""
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def image_data_url(image: Image.Image, *, max_side: int | None = None, format: str = "PNG", quality: int = 90) -> str:
    """A PIL image as a data URL: lossless PNG by default, or JPEG at ``quality`` (as RGB).

    ``max_side``: shrink (keeping the aspect ratio, never enlarging) so that neither side
    is longer, e.g. a thumbnail for a page or a bound on what a request carries. The
    caller's image is left unchanged.
    """
    format = format.upper()
    if format == "JPEG":
        image = image.convert("RGB")  # a copy; JPEG holds no alpha or palette
    elif max_side is not None:
        image = image.copy()
    if max_side is not None:
        image.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    image.save(buffer, format=format, **({"quality": quality} if format == "JPEG" else {}))
    return data_url(buffer.getvalue(), f"image/{format.lower()}")
