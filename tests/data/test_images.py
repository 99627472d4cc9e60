"""Images: confinement to the root, loading any mode to RGB, bombs, padding."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from mmsafe.data.images import (
    blank_image,
    load_image,
    mean_fill,
    pad_to_square,
    prepare_image,
    resolve_image_path,
)
from mmsafe.errors import ConfigError, ImageError


def test_exif_orientation_is_applied(tmp_path):
    # A 40x20 image whose EXIF says "rotate 90 degrees clockwise to display" (orientation 6),
    # with a red 10x10 block in the stored top-left corner.
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    loaded = load_image(tmp_path, "rotated.jpg")
    assert loaded.size == (20, 40)
    # After a clockwise turn the stored top-left corner is the displayed top-right one.
    red, _, blue = loaded.getpixel((15, 5))
    assert red > 200 and blue < 60
    red, _, blue = loaded.getpixel((5, 5))
    assert red < 60 and blue > 200


def test_palette_with_transparency_goes_onto_white(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 0
    image.save(tmp_path / "palette.png")
    loaded = load_image(tmp_path, "palette.png")
    assert loaded.mode == "RGB"
    assert loaded.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert loaded.getpixel((1, 0)) == (255, 0, 0)


def test_rgba_is_composited_onto_white(tmp_path):
    # Half-transparent black over white: 255 * (1 - 128/255) = 127.
    Image.new("RGBA", (2, 2), (0, 0, 0, 128)).save(tmp_path / "alpha.png")
    loaded = load_image(tmp_path, "alpha.png")
    assert loaded.mode == "RGB"
    assert loaded.getpixel((0, 0)) == (127, 127, 127)


def test_la_and_grayscale_become_rgb(tmp_path):
    Image.new("LA", (2, 2), (10, 0)).save(tmp_path / "la.png")
    Image.new("L", (2, 2), 77).save(tmp_path / "gray.png")
    assert load_image(tmp_path, "la.png").getpixel((0, 0)) == (255, 255, 255)
    assert load_image(tmp_path, "gray.png").getpixel((0, 0)) == (77, 77, 77)


def test_cmyk_becomes_rgb(tmp_path):
    Image.new("CMYK", (3, 3), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    loaded = load_image(tmp_path, "cmyk.jpg")
    assert loaded.mode == "RGB"
    red, green, blue = loaded.getpixel((1, 1))
    assert red > 200 and green < 60 and blue < 60


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    # 65535 / 257 = 255 and 25700 / 257 = 100: the 16-bit range maps onto 0..255.
    values = np.array([[65535, 25700]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    loaded = load_image(tmp_path, "deep.png")
    assert loaded.mode == "RGB"
    assert loaded.getpixel((0, 0)) == (255, 255, 255)
    assert loaded.getpixel((1, 0)) == (100, 100, 100)


def test_32_bit_integer_mode_is_scaled(tmp_path):
    image = Image.new("I", (1, 1), 514)  # 514 / 257 = 2
    image.save(tmp_path / "int.tif")
    assert load_image(tmp_path, "int.tif").getpixel((0, 0)) == (2, 2, 2)


def test_first_frame_of_an_animation(tmp_path):
    frames = [Image.new("RGB", (4, 4), colour) for colour in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    red, green, _ = load_image(tmp_path, "anim.gif").getpixel((0, 0))
    assert red > 200 and green < 50


def test_bomb_is_refused_before_decoding(tmp_path, monkeypatch):
    Image.new("RGB", (200, 100)).save(tmp_path / "big.png")

    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    with pytest.raises(ImageError, match=r"200x100 = 20,000 pixels, more than the limit of 19,999"):
        load_image(tmp_path, "big.png", max_pixels=19_999)


def test_limit_allows_exactly_max_pixels(tmp_path):
    Image.new("RGB", (200, 100)).save(tmp_path / "big.png")
    assert load_image(tmp_path, "big.png", max_pixels=20_000).size == (200, 100)


@pytest.mark.parametrize(
    ("relative", "message"),
    [
        ("/etc/passwd", "is absolute"),
        ("../outside.png", "contains '..'"),
        ("sub/../../outside.png", "contains '..'"),
        ("C:\\images\\x.png", "is absolute"),
        ("", "empty"),
    ],
)
def test_paths_that_leave_the_root_are_refused(tmp_path, relative, message):
    with pytest.raises(ImageError, match=message) as caught:
        resolve_image_path(tmp_path, relative)
    assert caught.value.location.field == "image"


def test_url_encoded_dotdot_is_refused(tmp_path):
    with pytest.raises(ImageError, match=r"contains '\.\.'"):
        resolve_image_path(tmp_path / "root", "%2E%2E/secret.png")


def test_symlink_leaving_the_root_is_refused(tmp_path, save_png):
    root = tmp_path / "root"
    root.mkdir()
    secret = save_png(tmp_path / "secret.png")
    os.symlink(secret, root / "link.png")
    with pytest.raises(ImageError, match="leads outside the image root") as caught:
        load_image(root, "link.png")
    assert "link.png" in str(caught.value)


def test_symlink_inside_the_root_is_fine(tmp_path, save_png):
    root = tmp_path / "root"
    save_png(root / "real.png")
    os.symlink(root / "real.png", root / "alias.png")
    assert load_image(root, "alias.png").size == (8, 6)


def test_url_decoded_name_is_used_when_the_encoded_one_is_missing(tmp_path, save_png):
    save_png(tmp_path / "500px-Café_de_Flore.jpg".replace(".jpg", ".png"))
    path = resolve_image_path(tmp_path, "500px-Caf%C3%A9_de_Flore.png")
    assert path.name == "500px-Café_de_Flore.png"
    assert load_image(tmp_path, "500px-Caf%C3%A9_de_Flore.png").size == (8, 6)


def test_exact_name_wins_over_the_decoded_one(tmp_path, save_png):
    save_png(tmp_path / "a%20b.png", size=(3, 3))
    save_png(tmp_path / "a b.png", size=(5, 5))
    assert load_image(tmp_path, "a%20b.png").size == (3, 3)


def test_missing_empty_and_corrupt_files_are_clear_errors(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "corrupt.png").write_bytes(b"this is not an image")
    Image.new("RGB", (64, 64)).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"image not found: 'nope\.png'"):
        load_image(tmp_path, "nope.png")
    with pytest.raises(ImageError, match="is empty"):
        load_image(tmp_path, "empty.png")
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(tmp_path, "corrupt.png")
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(tmp_path, "truncated.png")


def test_pad_to_square_centres_the_image():
    # 4x2 red on a 4x4 canvas: rows 0 and 3 are fill, rows 1..2 are the image ((4 - 2) // 2 = 1).
    padded = pad_to_square(Image.new("RGB", (4, 2), (255, 0, 0)), (1, 2, 3))
    assert padded.size == (4, 4)
    assert [padded.getpixel((0, y)) for y in range(4)] == [(1, 2, 3), (255, 0, 0), (255, 0, 0), (1, 2, 3)]
    tall = pad_to_square(Image.new("RGB", (1, 3), (255, 0, 0)), (9, 9, 9))
    assert [tall.getpixel((x, 0)) for x in range(3)] == [(9, 9, 9), (255, 0, 0), (9, 9, 9)]


def test_mean_fill_truncates_like_the_release():
    # CLIP mean: 0.48145466 * 255 = 122.77, 0.4578275 * 255 = 116.75, 0.40821073 * 255 = 104.09.
    assert mean_fill((0.48145466, 0.4578275, 0.40821073)) == (122, 116, 104)
    assert mean_fill(0.5) == (127, 127, 127)
    with pytest.raises(ConfigError, match="three floats"):
        mean_fill((0.5, 2.0, 0.1))


def test_prepare_image_modes():
    image = Image.new("RGB", (6, 2), (255, 0, 0))
    padded = prepare_image(image, "pad", image_mean=(0.48145466, 0.4578275, 0.40821073))
    assert padded.size == (6, 6) and padded.getpixel((0, 0)) == (122, 116, 104)
    assert prepare_image(image, "pad", size=3).size == (3, 3)
    assert prepare_image(image, "resize", size=(4, 4)).size == (4, 4)
    assert prepare_image(image, "none").size == (6, 2)
    with pytest.raises(ConfigError, match="expected one of pad, resize, none"):
        prepare_image(image, "crop")


def test_blank_image():
    image = blank_image()
    assert image.size == (336, 336) and image.mode == "RGB" and image.getpixel((5, 5)) == (128, 128, 128)
