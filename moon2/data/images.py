"""Image cells: decoding the Hugging Face Image struct and encoding pixels back into one.

A cell is ``{"bytes": <encoded JPEG/PNG/WebP/...> | None, "path": <str> | None}``. Bytes win
when both are set. A path is a local path (relative paths are resolved against the directory
of the Parquet file that holds the cell), a ``file://`` URI, or a remote URI (``http(s)://``,
``s3://``, ``gs://``) that this module never fetches: remote images are reported as such.

A local path is read only when it is a regular file of at most :data:`MAX_IMAGE_BYTES` (or
``MOON2_MAX_IMAGE_MB``) and, when image roots are set (a parameter, else
``MOON2_IMAGE_ROOTS``), only inside those roots.
"""

from __future__ import annotations

import functools
import io
import math
import os
import random
import re
import stat
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from moon2.errors import ConfigError, ImageDecodeError

REMOTE_SCHEMES = ("http", "https", "s3", "gs", "gcs", "az", "abfs", "hf")

MAX_IMAGE_BYTES = 64 * 1024 * 1024
"""Largest image file read from a local path (a product photo is a few MB). A larger file is
an ImageDecodeError found from its size, before any byte is read."""

MAX_IMAGE_MB_ENV = "MOON2_MAX_IMAGE_MB"
"""Environment variable: the image cap in MB (a positive number) instead of the default."""

IMAGE_ROOTS_ENV = "MOON2_IMAGE_ROOTS"
"""Environment variable: folders (``os.pathsep``-separated) that local image paths must lie
in; unset or empty = no limit. Every command reads images through this module, so all of
them honour it."""

ImageRoots = Sequence[str | os.PathLike[str]]


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


def max_image_bytes() -> int:
    """The image cap in bytes: ``MOON2_MAX_IMAGE_MB`` when set, else :data:`MAX_IMAGE_BYTES`."""
    value = os.environ.get(MAX_IMAGE_MB_ENV, "").strip()
    if not value:
        return MAX_IMAGE_BYTES
    try:
        megabytes = float(value)
    except ValueError:
        megabytes = -1.0
    if not math.isfinite(megabytes) or megabytes <= 0:
        raise ConfigError(f"{MAX_IMAGE_MB_ENV} must be a positive number of MB, not {value!r}")
    return int(megabytes * 1024 * 1024)


def image_roots_from_env() -> tuple[str, ...] | None:
    """The folders ``MOON2_IMAGE_ROOTS`` names (None when unset or empty: no limit)."""
    value = os.environ.get(IMAGE_ROOTS_ENV, "")
    roots = tuple(part for part in value.split(os.pathsep) if part.strip())
    return roots or None


@functools.lru_cache(maxsize=16)
def _resolved_roots(roots: tuple[str, ...]) -> tuple[Path, ...]:
    return tuple(Path(root).expanduser().resolve() for root in roots)


def _inside_roots(file: Path, roots: ImageRoots) -> Path:
    """``file`` resolved (symlinks and ``..`` followed); ImageDecodeError unless it lies in
    one of ``roots``."""
    try:
        resolved = file.resolve()
    except (OSError, RuntimeError):  # a symlink loop
        raise ImageDecodeError(f"image path {file} cannot be resolved") from None
    allowed = _resolved_roots(tuple(os.fspath(root) for root in roots))
    if not any(resolved.is_relative_to(root) for root in allowed):
        raise ImageDecodeError(f"image path {file} is outside the allowed image roots")
    return resolved


def _size_text(size: int) -> str:
    mib = 1024 * 1024
    return f"{size // mib} MB" if size >= mib and size % mib == 0 else f"{size:,}-byte"


def _file_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a special file"


def _check_file(name: Path, info: os.stat_result, max_bytes: int) -> None:
    """ImageDecodeError unless ``info`` is a regular file's of at most ``max_bytes``."""
    if stat.S_ISDIR(info.st_mode):
        raise ImageDecodeError(f"image path {name} is a directory")
    if not stat.S_ISREG(info.st_mode):
        raise ImageDecodeError(
            f"image path {name} is not a regular file ({_file_kind(info.st_mode)})"
        )
    if info.st_size > max_bytes:
        raise ImageDecodeError(
            f"image file {name} is larger than the {_size_text(max_bytes)} image cap"
        )


def _read_regular_file(file: Path, max_bytes: int, name: Path) -> bytes:
    """The bytes of ``file`` when it is a regular file of at most ``max_bytes`` (messages call
    it ``name``: the path as the catalog gave it)."""
    try:
        _check_file(name, file.stat(), max_bytes)
        # O_NONBLOCK: should the path have become a FIFO since the stat, opening it does
        # not wait for a writer; the fstat below then refuses it
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
        with os.fdopen(os.open(file, flags), "rb") as handle:
            _check_file(name, os.fstat(handle.fileno()), max_bytes)
            data = handle.read(max_bytes + 1)  # a file still growing stops at the cap
    except FileNotFoundError:
        raise ImageDecodeError(f"image file {name} does not exist") from None
    except IsADirectoryError:
        raise ImageDecodeError(f"image path {name} is a directory") from None
    except OSError as exc:
        raise ImageDecodeError(f"image file {name} cannot be read ({exc.strerror})") from None
    if len(data) > max_bytes:
        raise ImageDecodeError(
            f"image file {name} is larger than the {_size_text(max_bytes)} image cap"
        )
    return data


def read_image_bytes(
    cell: dict[str, Any] | None,
    base_dir: str | os.PathLike[str] | None = None,
    max_bytes: int | None = None,
    image_roots: ImageRoots | None = None,
) -> bytes:
    """The encoded bytes of an image cell (read from disk for a local path).

    A local path must be a regular file (never a device, FIFO, socket or directory) of at most
    ``max_bytes`` (default :data:`MAX_IMAGE_BYTES`). ``image_roots``: folders the path must
    resolve into (after symlinks and ``..``); None = the ``MOON2_IMAGE_ROOTS`` setting, and no
    limit when that is unset (the default for local catalogs). Anything else is an
    ImageDecodeError saying why; no message quotes a file's contents.
    """
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
    roots = image_roots if image_roots is not None else image_roots_from_env()
    # with roots, read the resolved path that was checked, not a path a symlink swap redirects
    target = _inside_roots(file, roots) if roots is not None else file
    cap = max_image_bytes() if max_bytes is None else max_bytes
    return _read_regular_file(target, cap, name=file)


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


_BYTES_LITERAL = re.compile(r"""\bb(['"]).*?(?<!\\)\1""")


def _safe_detail(exc: BaseException) -> str:
    """Pillow's message without the file bytes some of its errors quote (e.g. a PNG chunk
    type or a TIFF header as a ``b'...'`` literal): messages never show file contents."""
    return _BYTES_LITERAL.sub("<bytes>", str(exc))[:200]


def _open_guarded(data: bytes, draft_size: int | None, load: bool) -> Image.Image:
    """``Image.open`` (and ``load``) under Pillow's decompression-bomb guard, made strict (its
    warning is an error); every failure is an ImageDecodeError that quotes no bytes."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if load:
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
            f"image bytes are not a recognised image format ({len(data)} bytes)"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"image is too large to decode safely ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError(f"image bytes are corrupt ({_safe_detail(exc)})") from None
    return image


def check_image_header(data: bytes) -> None:
    """ImageDecodeError unless ``data`` opens as an image format Pillow knows, within the
    decompression-bomb limit (a cheap check: the pixels are not decoded)."""
    _open_guarded(data, None, load=False)


def decode_bytes(
    data: bytes, mode: str | None = "RGB", draft_size: int | None = None
) -> Image.Image:
    """Decode encoded image bytes into a loaded PIL image.

    ``mode="RGB"`` flattens transparency onto white (the usual product-photo background) and
    applies the EXIF orientation; ``mode=None`` returns the image as stored. ``draft_size``
    lets JPEG decode at a reduced scale when only a check or a thumbnail is needed.
    """
    image = _open_guarded(data, draft_size, load=True)
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
    image_roots: ImageRoots | None = None,
) -> Image.Image:
    """Decode an image cell into a PIL image; ImageDecodeError says why when it cannot.
    ``image_roots``: as in :func:`read_image_bytes`."""
    data = read_image_bytes(cell, base_dir, image_roots=image_roots)
    return decode_bytes(data, mode=mode, draft_size=draft_size)


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
