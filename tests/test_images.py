"""Image cells: decoding bytes, local paths and file:// URIs; errors; encoding."""

from __future__ import annotations

import io
import random
import socket
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from moon2.data.images import (
    RemoteImageError,
    decode_bytes,
    decode_image,
    encode_image,
    is_remote,
    local_path,
    product_matte,
    random_view,
)
from moon2.errors import ImageDecodeError

RED = (220, 20, 30)
BLUE = (10, 40, 230)


def _encode(image: Image.Image, image_format: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **params)
    return buffer.getvalue()


def _two_tone(size: tuple[int, int] = (40, 20)) -> Image.Image:
    """Left half red, right half blue."""
    image = Image.new("RGB", size, RED)
    image.paste(BLUE, (size[0] // 2, 0, size[0], size[1]))
    return image


def _close(pixel: tuple[int, ...], expected: tuple[int, ...], tolerance: int) -> bool:
    return len(pixel) == len(expected) and all(
        abs(a - b) <= tolerance for a, b in zip(pixel, expected, strict=True)
    )


def _cell(data: bytes | None = None, path: str | None = None) -> dict[str, Any]:
    return {"bytes": data, "path": path}


@pytest.fixture()
def png_file(tmp_path: Path) -> Path:
    path = tmp_path / "imgs" / "a.png"
    path.parent.mkdir()
    path.write_bytes(_encode(_two_tone((30, 12)), "PNG"))
    return path


# --- decoding -----------------------------------------------------------------------------


@pytest.mark.parametrize(("image_format", "tolerance"), [("JPEG", 12), ("PNG", 0), ("WEBP", 12)])
def test_decode_formats(image_format: str, tolerance: int) -> None:
    data = _encode(_two_tone(), image_format, **({"quality": 95} if tolerance else {}))

    image = decode_image(_cell(data))

    assert image.mode == "RGB"
    assert image.size == (40, 20)
    assert _close(image.getpixel((5, 10)), RED, tolerance)
    assert _close(image.getpixel((35, 10)), BLUE, tolerance)


def test_decode_bytes_directly_and_mode_none_keeps_stored_mode() -> None:
    rgba = Image.new("RGBA", (6, 6), (0, 255, 0, 0))
    image = decode_bytes(_encode(rgba, "PNG"), mode=None)
    assert image.mode == "RGBA"
    assert image.getpixel((0, 0)) == (0, 255, 0, 0)
    grey = decode_bytes(_encode(Image.new("L", (6, 6), 77), "PNG"), mode="L")
    assert (grey.mode, grey.getpixel((3, 3))) == ("L", 77)


def test_rgba_png_flattened_onto_white() -> None:
    image = Image.new("RGBA", (8, 4), (0, 0, 0, 0))  # fully transparent black
    image.paste((255, 0, 0, 255), (4, 0, 8, 4))  # right half opaque red
    image.putpixel((0, 3), (0, 0, 0, 128))  # half-transparent black

    decoded = decode_image(_cell(_encode(image, "PNG")))

    assert decoded.mode == "RGB"
    assert decoded.getpixel((0, 0)) == (255, 255, 255)
    assert decoded.getpixel((6, 2)) == (255, 0, 0)
    assert _close(decoded.getpixel((0, 3)), (127, 127, 127), 1)


def test_la_png_flattened_onto_white() -> None:
    image = Image.new("LA", (4, 4), (0, 0))
    image.putpixel((3, 3), (40, 255))

    decoded = decode_image(_cell(_encode(image, "PNG")))

    assert decoded.getpixel((0, 0)) == (255, 255, 255)
    assert decoded.getpixel((3, 3)) == (40, 40, 40)


def test_palette_png_with_transparency_flattened_onto_white() -> None:
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)  # 0: black, 1: red
    image.putpixel((3, 3), 1)
    data = _encode(image, "PNG", transparency=0)  # index 0 (black) is transparent
    assert decode_bytes(data, mode=None).mode == "P"

    decoded = decode_image(_cell(data))

    assert decoded.mode == "RGB"
    assert decoded.getpixel((0, 0)) == (255, 255, 255)  # transparent black -> white
    assert decoded.getpixel((3, 3)) == (255, 0, 0)


def test_rgba_webp_flattened_onto_white() -> None:
    image = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    image.paste((0, 0, 255, 255), (8, 0, 16, 16))

    decoded = decode_image(_cell(_encode(image, "WEBP", lossless=True)))

    assert decoded.getpixel((2, 8)) == (255, 255, 255)
    assert decoded.getpixel((13, 8)) == (0, 0, 255)


def test_exif_orientation_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display = stored rotated 90 degrees clockwise
    data = _encode(_two_tone((40, 20)), "JPEG", exif=exif.tobytes(), quality=95)

    stored = decode_bytes(data, mode=None)
    upright = decode_image(_cell(data))

    assert stored.size == (40, 20)
    assert upright.size == (20, 40)
    assert _close(upright.getpixel((10, 5)), RED, 12)  # stored left half is now on top
    assert _close(upright.getpixel((10, 35)), BLUE, 12)


# --- paths and URIs -----------------------------------------------------------------------


def test_relative_path_resolved_against_base_dir(
    png_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the relative path must not be read from the cwd
    cell = _cell(path="imgs/a.png")

    image = decode_image(cell, base_dir=tmp_path)

    assert image.size == (30, 12)
    assert image.getpixel((2, 2)) == RED
    assert local_path("imgs/a.png", tmp_path) == png_file
    with pytest.raises(ImageDecodeError, match="does not exist"):
        decode_image(cell)  # without base_dir: relative to the cwd, where it is not


def test_absolute_path_ignores_base_dir(png_file: Path, tmp_path: Path) -> None:
    image = decode_image(_cell(path=str(png_file)), base_dir=tmp_path / "unrelated")

    assert image.size == (30, 12)
    assert image.getpixel((25, 2)) == BLUE


def test_file_uri_with_percent_encoded_space(tmp_path: Path) -> None:
    path = tmp_path / "my images" / "b.png"
    path.parent.mkdir()
    path.write_bytes(_encode(Image.new("RGB", (5, 7), BLUE), "PNG"))
    uri = path.as_uri()
    assert "my%20images" in uri and uri.startswith("file:///")

    image = decode_image(_cell(path=uri), base_dir=tmp_path / "unrelated")

    assert image.size == (5, 7)
    assert image.getpixel((0, 0)) == BLUE
    assert local_path(uri) == path
    assert not is_remote(uri)


def test_bytes_win_over_path(tmp_path: Path) -> None:
    data = _encode(Image.new("RGB", (3, 3), RED), "PNG")

    image = decode_image(_cell(data, str(tmp_path / "missing.png")))

    assert image.getpixel((1, 1)) == RED


# --- errors -------------------------------------------------------------------------------


def _decode_error(cell: dict[str, Any] | None, base_dir: Path | None = None) -> str:
    with pytest.raises(ImageDecodeError) as excinfo:
        decode_image(cell, base_dir=base_dir)
    assert excinfo.type is ImageDecodeError  # a local failure is never "remote"
    return str(excinfo.value)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    message = _decode_error(_cell(path="nope/missing.jpg"), base_dir=tmp_path)
    assert message == f"image file {tmp_path / 'nope' / 'missing.jpg'} does not exist"


def test_directory_path(tmp_path: Path) -> None:
    (tmp_path / "adir").mkdir()
    message = _decode_error(_cell(path="adir"), base_dir=tmp_path)
    assert message == f"image path {tmp_path / 'adir'} is a directory"


@pytest.mark.parametrize("image_format", ["JPEG", "PNG", "WEBP"])
def test_truncated_bytes_are_corrupt(image_format: str) -> None:
    noise = random.Random(1)
    image = Image.frombytes("RGB", (64, 64), noise.randbytes(64 * 64 * 3))  # incompressible
    data = _encode(image, image_format)

    message = _decode_error(_cell(data[: len(data) // 2]))

    assert "corrupt" in message


def test_random_bytes_not_an_image() -> None:
    data = random.Random(0).randbytes(256)
    message = _decode_error(_cell(data))
    assert message == "image bytes are not a recognised image format (256 bytes)"
    assert repr(data[:8]) not in message  # never the file's contents


def test_empty_bytes() -> None:
    assert _decode_error(_cell(b"")) == "image bytes are empty"


@pytest.mark.parametrize("cell", [_cell(), _cell(None, ""), {}])
def test_cell_without_bytes_or_path(cell: dict[str, Any]) -> None:
    assert _decode_error(cell) == "image cell has neither bytes nor path"


def test_null_cell() -> None:
    assert _decode_error(None) == "image cell is null"


@pytest.mark.parametrize(
    "uri",
    [
        "http://img.example.com/a.jpg",
        "https://img.example.com/a.jpg?x=1,2",
        "HTTPS://IMG.EXAMPLE.COM/A.JPG",
        "s3://bucket/key/a.jpg",
        "gs://bucket/a.png",
    ],
)
def test_remote_uri_is_not_fetched(uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("decode_image tried to open a network connection")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    assert is_remote(uri)

    with pytest.raises(RemoteImageError) as excinfo:
        decode_image(_cell(path=uri))

    assert str(excinfo.value) == f"image is remote ({uri}) and was not fetched"
    assert isinstance(excinfo.value, ImageDecodeError)  # callers may catch either


@pytest.mark.parametrize("path", ["imgs/a.jpg", "/abs/a.jpg", "file:///abs/a.jpg", "C:/x.jpg"])
def test_local_paths_are_not_remote(path: str) -> None:
    assert not is_remote(path)


# --- encoding, draft, decompression bombs -------------------------------------------------


@pytest.mark.parametrize(
    ("image_format", "pillow_format", "tolerance"),
    [("JPEG", "JPEG", 12), ("jpg", "JPEG", 12), ("PNG", "PNG", 0), ("webp", "WEBP", 12)],
)
def test_encode_image_round_trip(image_format: str, pillow_format: str, tolerance: int) -> None:
    source = _two_tone((24, 16))

    cell = encode_image(source, image_format, quality=95)

    assert cell["path"] is None
    assert Image.open(io.BytesIO(cell["bytes"])).format == pillow_format
    decoded = decode_image(cell)
    assert decoded.size == (24, 16)
    assert _close(decoded.getpixel((3, 8)), RED, tolerance)
    assert _close(decoded.getpixel((20, 8)), BLUE, tolerance)


def test_encode_jpeg_flattens_transparency_onto_white() -> None:
    source = Image.new("RGBA", (8, 8), (0, 0, 0, 0))

    decoded = decode_image(encode_image(source, "JPEG"))

    assert _close(decoded.getpixel((4, 4)), (255, 255, 255), 2)


def test_encode_png_keeps_alpha() -> None:
    source = Image.new("RGBA", (4, 4), (10, 20, 30, 40))

    decoded = decode_image(encode_image(source, "PNG"), mode=None)

    assert decoded.mode == "RGBA"
    assert decoded.getpixel((0, 0)) == (10, 20, 30, 40)


def test_draft_size_decodes_jpeg_smaller() -> None:
    data = _encode(_two_tone((512, 384)), "JPEG")

    full = decode_image(_cell(data))
    draft = decode_image(_cell(data), draft_size=64)

    assert full.size == (512, 384)
    assert draft.size == (128, 96)  # the largest 1/2^n scale keeping both sides >= 64
    assert draft.mode == "RGB"
    assert _close(draft.getpixel((10, 48)), RED, 12)


def test_draft_size_leaves_png_alone() -> None:
    data = _encode(_two_tone((512, 384)), "PNG")

    assert decode_image(_cell(data), draft_size=64).size == (512, 384)


@pytest.mark.parametrize("side", [40, 50])  # > MAX_IMAGE_PIXELS (warning), > 2x (error)
def test_decompression_bomb_is_decode_error(side: int, monkeypatch: pytest.MonkeyPatch) -> None:
    small = _encode(Image.new("RGB", (20, 20), RED), "PNG")
    bomb = _encode(Image.new("RGB", (side, side), RED), "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)

    assert decode_image(_cell(small)).size == (20, 20)  # 400 pixels: under the limit
    with pytest.raises(ImageDecodeError, match="too large to decode safely"):
        decode_image(_cell(bomb))


# --- random views (training augmentation) -------------------------------------------------


def _product_photo() -> Image.Image:
    """A red square product on a light grey background."""
    image = Image.new("RGB", (64, 48), (235, 235, 235))
    image.paste(RED, (20, 12, 44, 36))
    return image


def test_random_view_is_seeded_keeps_size_and_product_colour() -> None:
    photo = _product_photo()
    first = random_view(photo, random.Random(3))
    assert first.size == photo.size and first.mode == "RGB"
    assert first.tobytes() == random_view(photo, random.Random(3)).tobytes()
    assert first.tobytes() != random_view(photo, random.Random(4)).tobytes()
    for seed in range(20):
        view = random_view(photo, random.Random(seed), background_probability=0.0)
        colours = {colour for _, colour in view.getcolors(64 * 48)}
        # corners are filled with the background, never black; the product is still red
        # (brightness may change, hue may not)
        for corner in ((0, 0), (63, 0), (0, 47), (63, 47)):
            r, g, b = view.getpixel(corner)
            assert abs(r - g) < 12 and abs(g - b) < 12 and r > 180
        reds = [c for c in colours if c[0] > 150 and c[1] < 60 and c[2] < 70]
        assert reds, f"seed {seed}: no red product pixels left"


# every change but the background switched off
BACKGROUND_ONLY: dict[str, float] = {
    "background_probability": 1.0,
    "max_rotation": 0.0,
    "min_scale": 1.0,
    "max_shift": 0.0,
    "max_brightness": 0.0,
    "max_blur": 0.0,
}


def test_random_view_replaces_a_plain_background_only() -> None:
    photo = _product_photo()
    matte = product_matte(photo)
    assert matte is not None
    assert matte.getpixel((32, 24)) == 255 and matte.getpixel((2, 2)) == 0
    replaced = 0
    for seed in range(12):
        view = random_view(photo, random.Random(seed), **BACKGROUND_ONLY)
        assert _close(view.getpixel((32, 24)), RED, 2)  # the product is untouched
        replaced += not _close(view.getpixel((2, 2)), (235, 235, 235), 2)
    assert replaced >= 10  # a new background (a random one may rarely match the old)
    # a busy photo (no plain background) keeps its background: the matte would cut it apart
    busy = Image.effect_noise((64, 48), 80).convert("RGB")
    assert product_matte(busy) is None
    kept = random_view(busy, random.Random(0), **BACKGROUND_ONLY)
    assert (
        kept.tobytes() == busy.tobytes()
        or kept.transpose(Image.Transpose.FLIP_LEFT_RIGHT).tobytes() == busy.tobytes()
    )


def _view_in_three_passes(photo: Image.Image, flip: bool, size, left, top, angle) -> Image.Image:
    """The geometry of a random view done the plain way: mirror, resize, paste, rotate."""
    fill = (235, 235, 235)
    layer = photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else photo
    canvas = Image.new("RGB", photo.size, fill)
    canvas.paste(layer.resize(size, Image.Resampling.BILINEAR), (left, top))
    return canvas.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=fill)


@pytest.mark.parametrize(
    ("flip", "scale", "left", "top", "angle"),
    [(False, 1.0, 0, 0, 0.0), (True, 0.75, 5, -3, 20.0), (False, 0.8, -4, 6, -25.0)],
)
def test_view_matrix_moves_the_photo_like_mirror_resize_paste_rotate(
    flip: bool, scale: float, left: int, top: int, angle: float
) -> None:
    import numpy as np

    from moon2.data.images import _view_matrix

    photo = _product_photo()
    width, height = photo.size
    size = (round(width * scale), round(height * scale))
    left += (width - size[0]) // 2
    top += (height - size[1]) // 2
    one_pass = photo.transform(
        photo.size,
        Image.Transform.AFFINE,
        _view_matrix(width, height, size, left, top, angle, flip),
        resample=Image.Resampling.BILINEAR,
        fillcolor=(235, 235, 235),
    )
    expected = np.asarray(_view_in_three_passes(photo, flip, size, left, top, angle), float)
    difference = np.abs(np.asarray(one_pass, float) - expected)
    # the same placement up to resampling: a misplaced product differs by ~200 on its edges
    assert difference.mean() < 4 and np.quantile(difference, 0.99) < 120
    if scale == 1.0 and not angle and not left and not top:
        assert one_pass.tobytes() == photo.tobytes()


def test_random_view_accepts_transparent_and_tiny_images() -> None:
    rgba = Image.new("RGBA", (5, 3), (0, 0, 255, 0))
    view = random_view(rgba, random.Random(0))
    assert view.size == (5, 3) and view.mode == "RGB"


def test_image_cache_keeps_the_recently_used_within_its_byte_budget() -> None:
    from moon2.data.images import ImageCache

    made: list[str] = []

    def make(name: str, side: int):
        def build() -> Image.Image:
            made.append(name)
            return Image.new("RGB", (side, side))

        return build

    cache = ImageCache(max_bytes=3 * 10 * 10 * 3)  # three 10x10 RGB images
    for name in ("a", "b", "c"):
        cache.get(name, make(name, 10))
    assert cache.get("a", make("a", 10)) is cache.get("a", make("a", 10))  # hits, no decode
    cache.get("d", make("d", 10))  # drops the least recently used: b
    assert len(cache) == 3 and cache.bytes == 900
    cache.get("b", make("b", 10))
    assert made == ["a", "b", "c", "d", "b"]
    cache.get("huge", make("huge", 100))  # larger than the budget: returned, not kept
    assert "huge" in made and len(cache) == 3
    assert cache.hits == 2 and cache.misses == 6

    def broken() -> Image.Image:
        raise ImageDecodeError("not an image")

    with pytest.raises(ImageDecodeError):
        cache.get("bad", broken)
    assert len(cache) == 3
    nothing = ImageCache(0)
    nothing.get("a", make("a2", 1))
    nothing.get("a", make("a2", 1))
    assert made[-2:] == ["a2", "a2"] and len(nothing) == 0


def test_image_cache_finds_and_puts_tensors_by_their_bytes() -> None:
    import torch

    from moon2.data.images import MISSING, ImageCache

    rows = torch.zeros(100, 10)  # 4,000 bytes
    cache = ImageCache(max_bytes=9_000)
    assert cache.find("a") is MISSING
    cache.put("a", (rows, torch.tensor([1, 10, 10])))
    assert cache.find("a")[0] is rows
    assert 4_000 < cache.bytes < 4_500
    cache.put("b", (rows.clone(), None))
    cache.put("c", (rows.clone(), None))  # over budget: "a" is the least recently used
    assert cache.find("a") is MISSING and cache.find("b") is not MISSING
    cache.put("b", (rows[:10].clone(), None))  # replacing a key frees its old bytes
    assert len(cache) == 2 and cache.bytes < 5_000
    cache.put("too big", torch.zeros(10_000))
    assert cache.find("too big") is MISSING
