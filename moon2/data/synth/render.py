"""Procedural product photos: silhouette per category, fill per colour, texture per pattern,
shading per material, then a view (background, scale, rotation, crop, lighting, camera noise).

Everything here is a pure function of its arguments, so a product renders to the same bytes
in any process. Caches hold the expensive intermediate images (textures, product layers).
"""

from __future__ import annotations

import functools
import io
import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from moon2.data.synth.shapes import detail_mask, shape_mask
from moon2.data.synth.taxonomy import COLORS, GLOSSY_MATERIALS, ROUGH_MATERIALS

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class Appearance:
    """What a product looks like, independent of how it is photographed."""

    shape: str
    color: str
    pattern: str
    material: str
    variant: int
    """0..15: texture scale/phase and secondary colour, so two red striped tees still differ."""


@dataclass(frozen=True)
class View:
    """How one photo of a product is taken."""

    width: int
    height: int
    background: str = "white"
    """white | studio | pastel | gradient | lifestyle | clutter"""
    background_seed: int = 0
    scale: float = 0.9
    angle: float = 0.0
    dx: float = 0.0
    dy: float = 0.0
    flip: bool = False
    zoom: float = 1.0
    zoom_x: float = 0.5
    zoom_y: float = 0.5
    brightness: float = 1.0
    contrast: float = 1.0
    blur: float = 0.0
    noise: float = 0.0
    shadow: bool = True
    transparent: bool = False
    """Cut-out product on a transparent background (PNG only)."""
    image_format: str = "JPEG"
    quality: int = 90


# --- colours and textures -----------------------------------------------------------------


def color_rgb(name: str) -> RGB:
    return COLORS[name][0]


def _luma(rgb: RGB) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def secondary_rgb(color: str, variant: int) -> RGB:
    """The pattern's second colour: a light or dark tint of the main one, or white/black."""
    base = np.array(color_rgb(color), dtype=np.float32)
    light = _luma(color_rgb(color)) > 150
    choice = variant % 3
    if choice == 0:
        target = np.zeros(3) if light else np.full(3, 255.0)
        mixed = base * 0.45 + target * 0.55
    elif choice == 1:
        mixed = base * 0.6 if light else base * 0.4 + 255 * 0.6
    else:
        mixed = np.array([40, 40, 44]) if light else np.array([245, 245, 240])
    return tuple(int(v) for v in np.clip(mixed, 0, 255))  # type: ignore[return-value]


@functools.lru_cache(maxsize=32)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


@functools.lru_cache(maxsize=64)
def _smooth_noise(size: int, seed: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1], bilinear upsampling of a coarse random grid."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((cells + 1, cells + 1)).astype(np.float32)
    image = Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    return np.asarray(image, dtype=np.float32) / 255.0


@functools.lru_cache(maxsize=256)
def _pattern_mask(pattern: str, size: int, variant: int) -> np.ndarray:
    """Fraction (0..1) of the secondary colour at each pixel, shape (size, size, 1).

    Cached and shared: callers must not modify the array.
    """
    mask = np.clip(_pattern_values(pattern, size, variant), 0, 1).astype(np.float32)
    mask.setflags(write=False)
    return mask[..., None]


def _pattern_values(pattern: str, size: int, variant: int) -> np.ndarray:
    yy, xx = _grid(size)
    period = size / (5 + (variant % 4) * 2)
    phase = (variant * 7) % max(1, int(period))
    ones = np.ones((size, size), np.float32)
    if pattern == "solid":
        return ones * 0
    if pattern == "striped":
        axis = xx if variant % 2 else yy
        return (((axis + phase) // (period / 2)) % 2).astype(np.float32)
    if pattern == "plaid":
        band = max(1.0, period / 4)
        horizontal = ((yy + phase) % period) < band * 1.5
        vertical = ((xx + phase) % period) < band * 1.5
        thin = (((yy + phase) % period) < 1.5) | (((xx + phase) % period) < 1.5)
        return horizontal * 0.5 + vertical * 0.5 + thin * 0.4
    if pattern == "checkered":
        cell = period / 1.5
        return (((xx // cell) + (yy // cell)) % 2).astype(np.float32)
    if pattern in ("polka dot", "floral"):
        cell = period
        ox = (xx + phase) % cell - cell / 2
        row = ((yy + phase) // cell) % 2
        ox = np.where(row == 1, (xx + phase + cell / 2) % cell - cell / 2, ox)
        oy = (yy + phase) % cell - cell / 2
        radius = cell * (0.22 if pattern == "polka dot" else 0.12)
        if pattern == "polka dot":
            return (ox**2 + oy**2 < radius**2).astype(np.float32)
        petals = np.zeros((size, size), bool)
        for k in range(5):
            angle = 2 * math.pi * k / 5
            px, py = math.cos(angle) * radius * 1.6, math.sin(angle) * radius * 1.6
            petals |= (ox - px) ** 2 + (oy - py) ** 2 < radius**2
        centre = ox**2 + oy**2 < (radius * 0.8) ** 2
        return petals * 1.0 - centre * 0.5
    if pattern == "camouflage":
        noise = _smooth_noise(size, 1000 + variant, 6)
        noise2 = _smooth_noise(size, 2000 + variant, 9)
        return (noise > 0.55) * 1.0 + (noise2 > 0.62) * -0.6 + 0.3 * (noise2 > 0.62)
    if pattern == "zigzag":
        triangle = np.abs(((xx + phase) % period) - period / 2)
        return (((yy + triangle) // (period / 2)) % 2).astype(np.float32)
    if pattern == "gradient":
        return yy / size
    if pattern == "color block":
        split = size * (0.45 + 0.1 * (variant % 3) / 2)
        if variant % 2:
            return (xx + yy * 0.5 > split * 1.5).astype(np.float32)
        return (yy > split).astype(np.float32)
    if pattern == "quilted":
        width = max(1.0, size / 64)
        return ((((xx + yy) % period) < width) | (((xx - yy) % period) < width)) * 1.0
    if pattern == "snakeskin":
        cell = period / 1.6
        ox = xx % cell - cell / 2
        row = (yy // (cell * 0.8)) % 2
        ox = np.where(row == 1, (xx + cell / 2) % cell - cell / 2, ox)
        oy = yy % (cell * 0.8) - cell * 0.4
        distance = np.sqrt(ox**2 + oy**2)
        return ((distance > cell * 0.38) & (distance < cell * 0.5)) * 1.0
    if pattern == "marble":
        noise = _smooth_noise(size, 3000 + variant, 5)
        veins = np.abs(np.sin((xx * 0.6 + yy * 0.3) / period * math.pi * 2 + noise * 9))
        return (veins < 0.12) * 0.8
    if pattern == "carbon fiber":
        weave = max(2, size // 48)
        a = ((xx + yy) // weave) % 2
        b = ((xx - yy + size) // weave) % 2
        return (a != b) * 0.55
    raise KeyError(f"unknown pattern {pattern!r}")


@functools.lru_cache(maxsize=256)
def _pattern_image(pattern: str, size: int, variant: int) -> Image.Image:
    amount = _pattern_mask(pattern, size, variant)[..., 0]
    return Image.fromarray(np.round(amount * 255).astype(np.uint8), "L")


@functools.lru_cache(maxsize=16)
def _lighting(size: int) -> Image.Image:
    """Soft light from the top left: a multiplier from 1.0 down to about 0.74."""
    yy, xx = _grid(size)
    factor = 1.0 - 0.16 * yy / size - 0.1 * xx / size
    return Image.fromarray(np.round(factor * 255).astype(np.uint8), "L").convert("RGB")


@functools.lru_cache(maxsize=16)
def _highlight(size: int) -> Image.Image:
    yy, xx = _grid(size)
    cx, cy, radius = 0.36 * size, 0.3 * size, 0.2 * size
    glow = 70 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * radius**2))
    return Image.fromarray(np.round(glow).astype(np.uint8), "L").convert("RGB")


_GRAIN_OFFSET = 24


@functools.lru_cache(maxsize=16)
def _grain(size: int) -> Image.Image:
    """Fabric/wood grain: noise around ``_GRAIN_OFFSET`` (subtracted back when applied)."""
    rng = np.random.default_rng(size)
    noise = np.clip(rng.normal(_GRAIN_OFFSET, 10, (size, size)), 0, 2 * _GRAIN_OFFSET)
    return Image.fromarray(noise.astype(np.uint8), "L").convert("RGB")


@functools.lru_cache(maxsize=512)
def product_layer(appearance: Appearance, size: int) -> Image.Image:
    """The product alone, ``size`` x ``size`` RGBA, transparent around the silhouette.

    Built from cached masks with Pillow's C operations (this runs once per product photo).
    """
    main = Image.new("RGB", (size, size), color_rgb(appearance.color))
    second = Image.new("RGB", (size, size), secondary_rgb(appearance.color, appearance.variant))
    pixels = Image.composite(
        second, main, _pattern_image(appearance.pattern, size, appearance.variant)
    )
    pixels = ImageChops.multiply(pixels, _lighting(size))
    if appearance.material in GLOSSY_MATERIALS:
        pixels = ImageChops.add(pixels, _highlight(size))
    elif appearance.material in ROUGH_MATERIALS:
        pixels = ImageChops.add(pixels, _grain(size), offset=-_GRAIN_OFFSET)
    if _luma(color_rgb(appearance.color)) < 60:
        stroke = ImageChops.add(pixels, Image.new("RGB", (size, size), (80, 80, 80)))
    else:
        stroke = ImageChops.multiply(pixels, Image.new("RGB", (size, size), (115, 115, 115)))
    pixels = Image.composite(stroke, pixels, detail_mask(appearance.shape, size))
    pixels.putalpha(shape_mask(appearance.shape, size))
    return pixels


# --- backgrounds ----------------------------------------------------------------------------


def _pastel(rng: random.Random) -> RGB:
    return tuple(rng.randint(190, 250) for _ in range(3))  # type: ignore[return-value]


def _any_color(rng: random.Random) -> RGB:
    return tuple(rng.randint(30, 240) for _ in range(3))  # type: ignore[return-value]


def _vertical_gradient(width: int, height: int, top: RGB, bottom: RGB) -> Image.Image:
    t = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    column = np.array(top, np.float32) * (1 - t) + np.array(bottom, np.float32) * t
    return Image.fromarray(np.repeat(column, width, axis=1).astype(np.uint8), "RGB")


def background(kind: str, width: int, height: int, seed: int) -> Image.Image:
    rng = random.Random(seed)
    if kind == "white":
        shade = rng.choice((255, 252, 248))
        return Image.new("RGB", (width, height), (shade, shade, shade))
    if kind == "studio":
        return _vertical_gradient(width, height, (236, 236, 238), (196, 198, 202))
    if kind == "pastel":
        return Image.new("RGB", (width, height), _pastel(rng))
    if kind == "gradient":
        return _vertical_gradient(width, height, _pastel(rng), _any_color(rng))
    if kind in ("lifestyle", "clutter"):
        wall, floor = _pastel(rng), _any_color(rng)
        image = Image.new("RGB", (width, height), wall)
        draw = ImageDraw.Draw(image)
        horizon = int(height * rng.uniform(0.55, 0.75))
        draw.rectangle((0, horizon, width, height), fill=floor)
        if kind == "clutter":
            for _ in range(rng.randint(3, 6)):
                x0, y0 = rng.uniform(-0.1, 0.9) * width, rng.uniform(-0.1, 0.9) * height
                w, h = rng.uniform(0.1, 0.35) * width, rng.uniform(0.1, 0.35) * height
                box = (x0, y0, x0 + w, y0 + h)
                if rng.random() < 0.5:
                    draw.rectangle(box, fill=_any_color(rng))
                else:
                    draw.ellipse(box, fill=_any_color(rng))
        return image
    raise KeyError(f"unknown background {kind!r}")


@functools.lru_cache(maxsize=16)
def _sensor_noise(width: int, height: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(0, 1, (height, width, 1)).astype(np.float32)


_SHADOW_OPACITY = 90


# --- a photo ------------------------------------------------------------------------------


def _layer_size(side: int, wanted: float) -> int:
    """The smallest of side, side/sqrt(2), side/2, ... that is still >= ``wanted``.

    Few distinct sizes keep the mask and layer caches small; the remaining downscale (at most
    by 1/sqrt(2)) is done by the affine resample without visible aliasing.
    """
    size = side
    while size / math.sqrt(2) >= wanted and size > 16:
        size = round(size / math.sqrt(2))
    return size


def _placed_product(appearance: Appearance, view: View) -> Image.Image:
    """The product scaled, rotated, flipped and moved onto a transparent canvas, one resample."""
    width, height = view.width, view.height
    side = min(width, height)
    wanted = max(4.0, side * view.scale)
    drawn = _layer_size(side, wanted)
    layer = product_layer(appearance, drawn)
    if view.flip:
        layer = layer.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    scale = wanted / drawn
    theta = math.radians(view.angle)
    cos, sin = math.cos(theta), math.sin(theta)
    out_x = width / 2 + view.dx * width
    out_y = height / 2 + view.dy * height
    centre = drawn / 2
    # inverse map: layer point = centre + R(-theta) (canvas point - out centre) / scale
    a, b = cos / scale, -sin / scale
    d, e = sin / scale, cos / scale
    c = centre - a * out_x - b * out_y
    f = centre - d * out_x - e * out_y
    return layer.transform(
        (width, height), Image.Transform.AFFINE, (a, b, c, d, e, f), resample=Image.BILINEAR
    )


@functools.lru_cache(maxsize=16)
def _grey(width: int, height: int) -> Image.Image:
    return Image.new("RGB", (width, height), (128, 128, 128))


@functools.lru_cache(maxsize=16)
def _black(width: int, height: int) -> Image.Image:
    return Image.new("RGB", (width, height), (0, 0, 0))


def render(appearance: Appearance, view: View) -> Image.Image:
    """One photo of the product (RGB, or RGBA when ``view.transparent``)."""
    width, height = view.width, view.height
    placed = _placed_product(appearance, view)
    if view.transparent:
        return placed
    canvas = background(view.background, width, height, view.background_seed)
    alpha = placed.getchannel("A")
    if view.shadow:
        # blur a quarter-size copy: a soft shadow needs no detail, and it is 16x cheaper
        small = alpha.reduce(4) if min(width, height) >= 32 else alpha
        small = ImageChops.multiply(small, Image.new("L", small.size, _SHADOW_OPACITY))
        shadow = small.filter(ImageFilter.GaussianBlur(max(0.5, min(small.size) / 40)))
        offset = max(1, min(width, height) // 40)
        shadow = shadow.resize((width, height), Image.BILINEAR)
        canvas.paste(
            (40, 40, 40),
            (offset, 2 * offset),
            shadow.crop((0, 0, width - offset, height - 2 * offset)),
        )
    canvas.paste(placed.convert("RGB"), (0, 0), alpha)
    if view.zoom > 1.0:
        crop_w, crop_h = width / view.zoom, height / view.zoom
        left = (width - crop_w) * view.zoom_x
        top = (height - crop_h) * view.zoom_y
        canvas = canvas.resize(
            (width, height), Image.BILINEAR, box=(left, top, left + crop_w, top + crop_h)
        )
    if view.blur > 0:
        canvas = canvas.filter(ImageFilter.GaussianBlur(view.blur))
    if view.contrast != 1.0:  # Image.blend extrapolates for factors > 1, as ImageEnhance does
        canvas = Image.blend(_grey(width, height), canvas, view.contrast)
    if view.brightness != 1.0:
        canvas = Image.blend(_black(width, height), canvas, view.brightness)
    if view.noise > 0:
        pixels = np.asarray(canvas, np.float32)
        pixels = pixels + _sensor_noise(width, height, view.background_seed % 4) * view.noise
        canvas = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    return canvas


def encode(image: Image.Image, view: View) -> bytes:
    """Encode a rendered photo in the view's format (deterministic bytes)."""
    buffer = io.BytesIO()
    image_format = "PNG" if view.transparent else view.image_format.upper()
    if image_format == "JPEG":
        image.convert("RGB").save(buffer, format="JPEG", quality=view.quality)
    elif image_format == "WEBP":
        image.save(buffer, format="WEBP", quality=view.quality, method=0)
    else:
        image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def render_bytes(appearance: Appearance, view: View) -> bytes:
    return encode(render(appearance, view), view)
