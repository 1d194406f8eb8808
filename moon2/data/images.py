"""Image cells: decoding the Hugging Face Image struct and encoding pixels back into one.

A cell is ``{"bytes": <encoded JPEG/PNG/WebP/...> | None, "path": <str> | None}``. Bytes win
when both are set. A path is a local path (relative paths are resolved against the directory
of the Parquet file that holds the cell), a ``file://`` URI, or a remote URI (``http(s)://``,
``s3://``, ``gs://``) that this module never fetches: remote images are reported as such.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from PIL import Image, ImageOps, UnidentifiedImageError

from moon2.errors import ImageDecodeError

REMOTE_SCHEMES = ("http", "https", "s3", "gs", "gcs", "az", "abfs", "hf")


class RemoteImageError(ImageDecodeError):
    """The image is behind a remote URI, which decoding does not fetch."""


def is_remote(path: str) -> bool:
    scheme = urlparse(path).scheme.lower()
    return scheme in REMOTE_SCHEMES


def local_path(path: str, base_dir: str | os.PathLike[str] | None = None) -> Path:
    """The filesystem path of a local path or ``file://`` URI."""
    parsed = urlparse(path)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    candidate = Path(path).expanduser()
    if not candidate.is_absolute() and base_dir is not None:
        candidate = Path(base_dir) / candidate
    return candidate


def describe(cell: dict[str, Any] | None) -> str:
    """A short human description of where an image cell's pixels come from."""
    if not cell:
        return "null image"
    if cell.get("bytes") is not None:
        return f"{len(cell['bytes'])} bytes"
    if cell.get("path"):
        return str(cell["path"])
    return "empty image cell"


def read_image_bytes(
    cell: dict[str, Any] | None, base_dir: str | os.PathLike[str] | None = None
) -> bytes:
    """The encoded bytes of an image cell (read from disk for a local path)."""
    if cell is None:
        raise ImageDecodeError("image cell is null")
    data = cell.get("bytes")
    if data is not None:
        if len(data) == 0:
            raise ImageDecodeError("image bytes are empty")
        return bytes(data)
    path = cell.get("path")
    if not path:
        raise ImageDecodeError("image cell has neither bytes nor path")
    if is_remote(path):
        raise RemoteImageError(f"image is remote ({path}) and was not fetched")
    file = local_path(path, base_dir)
    try:
        return file.read_bytes()
    except FileNotFoundError:
        raise ImageDecodeError(f"image file {file} does not exist") from None
    except IsADirectoryError:
        raise ImageDecodeError(f"image path {file} is a directory") from None
    except OSError as exc:
        raise ImageDecodeError(f"image file {file} cannot be read ({exc.strerror})") from None


_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def _sniff_format(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    for signature, name in _SIGNATURES:
        if data.startswith(signature):
            return name
    return None


def decode_bytes(
    data: bytes, mode: str | None = "RGB", draft_size: int | None = None
) -> Image.Image:
    """Decode encoded image bytes into a loaded PIL image.

    ``mode="RGB"`` flattens transparency onto white (the usual product-photo background) and
    applies the EXIF orientation; ``mode=None`` returns the image as stored. ``draft_size``
    lets JPEG decode at a reduced scale when only a check or a thumbnail is needed.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if draft_size is not None and image.format == "JPEG":
                image.draft("RGB", (draft_size, draft_size))
            image.load()
    except UnidentifiedImageError:
        known = _sniff_format(data)
        if known:
            raise ImageDecodeError(
                f"image bytes are corrupt or truncated ({known} header, {len(data)} bytes)"
            ) from None
        raise ImageDecodeError(
            f"image bytes are not a recognised image format (starts with {data[:8]!r})"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"image is too large to decode safely ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError(f"image bytes are corrupt ({exc})") from None
    if mode is None:
        return image
    image = ImageOps.exif_transpose(image)
    return to_mode(image, mode)


def to_mode(image: Image.Image, mode: str = "RGB") -> Image.Image:
    """Convert to ``mode``, compositing any transparency onto a white background."""
    if mode == "RGB" and (image.mode in ("RGBA", "LA") or "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == mode else image.convert(mode)


def decode_image(
    cell: dict[str, Any] | None,
    base_dir: str | os.PathLike[str] | None = None,
    mode: str | None = "RGB",
    draft_size: int | None = None,
) -> Image.Image:
    """Decode an image cell into a PIL image; ImageDecodeError says why when it cannot."""
    return decode_bytes(read_image_bytes(cell, base_dir), mode=mode, draft_size=draft_size)


def decode_images(
    cells: Sequence[dict[str, Any] | None],
    limit: int,
    base_dir: str | os.PathLike[str] | None = None,
) -> tuple[list[Image.Image], int]:
    """Up to ``limit`` decoded images from ``cells`` (null cells skipped), and how many failed."""
    images: list[Image.Image] = []
    failed = 0
    for cell in cells:
        if len(images) >= limit:
            break
        if cell is None:
            continue
        try:
            images.append(decode_image(cell, base_dir=base_dir))
        except ImageDecodeError:
            failed += 1
    return images, failed


def encode_image(
    image: Image.Image, image_format: str = "JPEG", quality: int = 90
) -> dict[str, Any]:
    """Encode a PIL image into an image cell (bytes set, path null)."""
    buffer = io.BytesIO()
    image_format = image_format.upper()
    if image_format == "JPG":  # the file extension; Pillow only knows "JPEG"
        image_format = "JPEG"
    if image_format == "JPEG":
        image = to_mode(image, "RGB")
        image.save(buffer, format="JPEG", quality=quality, optimize=False)
    elif image_format == "WEBP":
        image.save(buffer, format="WEBP", quality=quality, method=4)
    else:
        image.save(buffer, format=image_format)
    return {"bytes": buffer.getvalue(), "path": None}
