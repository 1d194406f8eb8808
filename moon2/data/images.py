"""Image cells: decoding the Hugging Face Image struct and encoding pixels back into one.

A cell is ``{"bytes": <encoded JPEG/PNG/WebP/...> | None, "path": <str> | None}``. Bytes win
when both are set. A path is a local path (relative paths are resolved against the directory
of the Parquet file that holds the cell), a ``file://`` URI, or a remote URI (``http(s)://``,
``s3://``, ``gs://``) that this module never fetches: remote images are reported as such.
"""

from __future__ import annotations

import io
import math
import os
import random
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

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
    decode: Any = None,
) -> tuple[list[Any], int]:
    """Up to ``limit`` decoded images from ``cells`` (null cells skipped), and how many failed.
    ``decode(number, cell)`` replaces :func:`decode_image` (``number``: the cell's position in
    ``cells``), e.g. to read through a cache; whatever it returns is listed."""
    images: list[Any] = []
    failed = 0
    for number, cell in enumerate(cells):
        if len(images) >= limit:
            break
        if cell is None:
            continue
        try:
            if decode is None:
                images.append(decode_image(cell, base_dir=base_dir))
            else:
                images.append(decode(number, cell))
        except ImageDecodeError:
            failed += 1
    return images, failed


class ImageCache:
    """Decoded photos (and anything else derived from one photo, e.g. its matte) kept by key,
    the least recently used dropped past ``max_bytes`` (sizes counted as decoded pixels).

    A training worker decodes the same catalog photos every epoch; with persistent workers
    this cache turns those decodes into lookups. ``max_bytes`` 0 caches nothing.
    """

    def __init__(self, max_bytes: int) -> None:
        from collections import OrderedDict

        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[Any, tuple[Any, int]] = OrderedDict()

    def get(self, key: Any, make: Any) -> Any:
        """The value cached under ``key``, else ``make()`` (cached when it fits; exceptions
        propagate and nothing is cached)."""
        found = self.find(key)
        if found is not MISSING:
            return found
        value = make()
        self.put(key, value)
        return value

    def find(self, key: Any) -> Any:
        """The value cached under ``key`` (now the most recently used), else :data:`MISSING`."""
        if key in self._items:
            self._items.move_to_end(key)
            self.hits += 1
            return self._items[key][0]
        self.misses += 1
        return MISSING

    def put(self, key: Any, value: Any) -> None:
        """Keep ``value`` under ``key`` when it fits, dropping the least recently used."""
        size = _pixel_bytes(value)
        if size > self.max_bytes:
            return
        if key in self._items:
            self.bytes -= self._items.pop(key)[1]
        self._items[key] = (value, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, dropped) = self._items.popitem(last=False)
            self.bytes -= dropped

    def __len__(self) -> int:
        return len(self._items)


MISSING = object()
"""What :meth:`ImageCache.find` returns for a key it does not hold."""


def _pixel_bytes(value: Any) -> int:
    if isinstance(value, Image.Image):
        return value.width * value.height * len(value.getbands())
    if isinstance(value, tuple | list):
        return 64 + sum(_pixel_bytes(part) for part in value)
    nbytes = getattr(value, "nbytes", None)  # numpy arrays and torch tensors
    return 64 + int(nbytes) if isinstance(nbytes, int) else 64  # None (no matte), small values


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


def _frame_background(pixels: Any) -> tuple[Any, float]:
    """The median colour of an RGB pixel array's one-pixel frame, and the frame's mean absolute
    deviation from it (a product photo's background colour, and how plain it is)."""
    import numpy as np

    frame = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]]).astype(np.float32)
    background = np.median(frame, axis=0)
    return background, float(np.abs(frame - background).mean())


def border_color(image: Image.Image) -> tuple[int, int, int]:
    """The median colour of the image's one-pixel frame (a product photo's background)."""
    import numpy as np

    background, _ = _frame_background(np.asarray(to_mode(image, "RGB")))
    return (int(background[0]), int(background[1]), int(background[2]))


PLAIN_BACKGROUND_SPREAD = 12.0
"""Mean absolute deviation (0-255) of the frame from its fitted background (a plain colour or
a linear gradient) under which a photo counts as shot on a plain background (its product can
be cut out by colour)."""


def background_model(pixels: Any) -> tuple[Any, float]:
    """A plain-or-linear-gradient background fitted to an RGB array's one-pixel frame
    (per channel ``a + b x + c y``, refitted without the worst fifth of the frame so a product
    touching the edge does not bend it), evaluated at every pixel; and the frame's mean
    absolute deviation from it (how well such a background explains the frame)."""
    import numpy as np

    height, width = pixels.shape[:2]
    ys = np.concatenate(
        [np.zeros(width), np.full(width, height - 1), np.arange(height), np.arange(height)]
    )
    xs = np.concatenate(
        [np.arange(width), np.arange(width), np.zeros(height), np.full(height, width - 1)]
    )
    frame = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]]).astype(np.float64)
    scale_x, scale_y = max(width - 1, 1), max(height - 1, 1)
    design = np.stack([np.ones_like(xs), xs / scale_x, ys / scale_y], axis=1)
    keep = np.ones(len(frame), dtype=bool)
    for _ in range(2):
        coefficients, *_ = np.linalg.lstsq(design[keep], frame[keep], rcond=None)
        residual = np.abs(frame - design @ coefficients).max(axis=1)
        keep = residual <= np.quantile(residual, 0.8)
    spread = float(np.abs(frame[keep] - design[keep] @ coefficients).mean())
    grid_y, grid_x = np.mgrid[0:height, 0:width]
    full = (
        np.stack([np.ones((height, width)), grid_x / scale_x, grid_y / scale_y], axis=-1)
        @ coefficients
    )
    return full.astype(np.float32), spread


def product_matte(image: Image.Image) -> Image.Image | None:
    """The product's alpha (L mode, 255 = product) of a photo on a plain or smoothly graded
    background, found by distance from the fitted background (:func:`background_model`); None
    when the background is neither (a lifestyle photo, a full-bleed close-up), where a colour
    matte would cut the product apart."""
    import numpy as np

    pixels = np.asarray(to_mode(image, "RGB"), dtype=np.float32)
    background, spread = background_model(pixels)
    if spread > PLAIN_BACKGROUND_SPREAD:
        return None
    from scipy.ndimage import binary_fill_holes

    distance = np.abs(pixels - background).max(axis=-1)
    alpha = np.clip((distance - 12.0) * (255.0 / 24.0), 0, 255)
    # parts of the product as pale as the background (a white panel inside a dark outline)
    # are enclosed by the silhouette: fill them
    alpha = np.maximum(alpha, binary_fill_holes(alpha >= 128) * 255.0).astype(np.uint8)
    return Image.fromarray(alpha, "L").filter(ImageFilter.GaussianBlur(0.7))


def random_background(width: int, height: int, rng: random.Random) -> Image.Image:
    """A plain colour, a two-colour gradient, or a clutter of coloured shapes."""
    from PIL import ImageDraw

    def colour() -> tuple[int, int, int]:
        return (rng.randrange(256), rng.randrange(256), rng.randrange(256))

    kind = rng.choice(("plain", "gradient", "clutter"))
    if kind == "plain":
        return Image.new("RGB", (width, height), colour())
    if kind == "gradient":
        top = Image.new("RGB", (width, height), colour())
        mask = Image.linear_gradient("L").resize((width, height))
        return Image.composite(Image.new("RGB", (width, height), colour()), top, mask)
    canvas = Image.new("RGB", (width, height), colour())
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.randint(2, 6)):
        x0, y0 = rng.uniform(-0.2, 1.0) * width, rng.uniform(-0.2, 1.0) * height
        x1, y1 = x0 + rng.uniform(0.15, 0.7) * width, y0 + rng.uniform(0.15, 0.7) * height
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x1, y1), fill=colour())
    return canvas


def random_view(
    image: Image.Image,
    rng: random.Random,
    max_rotation: float = 25.0,
    min_scale: float = 0.7,
    max_shift: float = 0.1,
    max_brightness: float = 0.15,
    background_probability: float = 0.5,
    max_blur: float = 1.0,
    matte_of: Any = None,
) -> Image.Image:
    """Another photo of the same product: mirrored or not, scaled down, moved, rotated, lit
    differently, on a new background (when the photo's is plain, see :func:`product_matte`)
    and a little out of focus.

    The product's colours never change (its colour is part of its identity) and nothing is
    cropped away beyond what rotating the frame's corners hides. Deterministic given ``rng``.
    ``matte_of(image)`` replaces :func:`product_matte` (e.g. a cached one).
    """
    from PIL import ImageEnhance

    image = to_mode(image, "RGB")
    width, height = image.size
    fill = border_color(image)
    matte = (matte_of or product_matte)(image) if rng.random() < background_probability else None
    flip = rng.random() < 0.5
    scale = rng.uniform(min_scale, 1.0)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    left = round((width - size[0]) / 2 + rng.uniform(-max_shift, max_shift) * width)
    top = round((height - size[1]) / 2 + rng.uniform(-max_shift, max_shift) * height)
    angle = rng.uniform(-max_rotation, max_rotation)
    # flip, scale, shift and rotation as one affine resampling instead of a resize, a paste
    # and a rotation, with the photo and its matte moved together as one RGBA image
    layer, background = image, fill
    if matte is not None:
        layer = image.convert("RGBA")
        layer.putalpha(matte)
        background = (*fill, 0)
    moved = layer.transform(
        (width, height),
        Image.Transform.AFFINE,
        _view_matrix(width, height, size, left, top, angle, flip),
        resample=Image.Resampling.BILINEAR,
        fillcolor=background,
    )
    canvas = moved
    if matte is not None:
        canvas = Image.composite(
            moved.convert("RGB"), random_background(width, height, rng), moved.getchannel("A")
        )
    if max_brightness:
        canvas = ImageEnhance.Brightness(canvas).enhance(
            rng.uniform(1 - max_brightness, 1 + max_brightness)
        )
    if max_blur:
        radius = rng.uniform(0.0, max_blur) * min(width, height) / 128
        if radius > 0.2:
            canvas = canvas.filter(ImageFilter.GaussianBlur(radius))
    return canvas


def _view_matrix(
    width: int,
    height: int,
    size: tuple[int, int],
    left: int,
    top: int,
    angle: float,
    flip: bool,
) -> tuple[float, ...]:
    """PIL's affine data (output pixel -> source pixel) of: mirror (``flip``), scale the photo
    to ``size``, place it at (``left``, ``top``) of a ``width`` x ``height`` frame, and rotate
    the frame ``angle`` degrees counter-clockwise about its centre (as ``Image.rotate``)."""
    radians = -math.radians(angle % 360.0)
    cos, sin = math.cos(radians), math.sin(radians)
    centre_x, centre_y = width / 2.0, height / 2.0
    # output -> frame (Image.rotate's matrix)
    a, b, d, e = cos, sin, -sin, cos
    c = a * -centre_x + b * -centre_y + centre_x
    f = d * -centre_x + e * -centre_y + centre_y
    # frame -> photo
    scale_x, scale_y = width / size[0], height / size[1]
    row_x = (scale_x * a, scale_x * b, scale_x * (c - left))
    row_y = (scale_y * d, scale_y * e, scale_y * (f - top))
    if flip:
        row_x = (-row_x[0], -row_x[1], width - row_x[2])
    return (*row_x, *row_y)
