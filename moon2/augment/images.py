"""Image engines: stage 1 turns the main image into a clean standardised product image, stage 2
makes varied views of that clean image. Each output carries the operations that made it.

``classic`` (offline default) never changes the product's colours or shape beyond a mild
perspective tilt: it cuts the product out by colour distance from a plain background (the
matte), centres it on white with a margin (MOON v1's core region), and makes views with a new
background, another viewpoint (perspective, rotation, scale) and other lighting. A photo whose
background is not plain is cropped to its centre instead of being cut out.
"""

from __future__ import annotations

import abc
import random
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageEnhance, ImageFilter

from moon2.augment.config import ClassicConfig, ImageConfig
from moon2.data.images import border_color, product_matte, random_background, to_mode


@dataclass
class ImageRequest:
    """What an image engine knows about the row: its key (product id), title and seed."""

    key: str
    title: str
    seed: int


@dataclass
class EditedImage:
    image: Image.Image
    ops: list[str] = field(default_factory=list)
    alpha: Image.Image | None = None  # the product's matte, when the engine knows it

    @property
    def op(self) -> str:
        return "+".join(self.ops)


class ImageEngine(abc.ABC):
    """``clean(main image) -> image``; ``variants(clean image, count, attempt) -> images``.

    Deterministic given the request's seed and the attempt number (retries use new seeds).
    """

    name: str = ""

    @abc.abstractmethod
    def clean(self, image: Image.Image, request: ImageRequest) -> EditedImage: ...

    @abc.abstractmethod
    def variants(
        self, clean: EditedImage, request: ImageRequest, count: int, attempt: int = 0
    ) -> list[EditedImage]: ...


def seeded(request: ImageRequest, *parts: object) -> random.Random:
    return random.Random(":".join(str(p) for p in (request.seed, request.key, *parts)))


def product_box(alpha: Image.Image, threshold: int = 128) -> tuple[int, int, int, int] | None:
    """Bounding box of the matte's product pixels, or None when there are none."""
    return alpha.point(lambda v: 255 if v >= threshold else 0).getbbox()


def _square_box(
    box: tuple[int, int, int, int], margin: float, size: tuple[int, int]
) -> tuple[int, int, int, int]:
    left, top, right, bottom = box
    side = max(right - left, bottom - top) * (1 + 2 * margin)
    cx, cy = (left + right) / 2, (top + bottom) / 2
    half = max(side / 2, 1)
    return (round(cx - half), round(cy - half), round(cx + half), round(cy + half))


class ClassicImageEngine(ImageEngine):
    """Offline edits with Pillow; see the module docstring."""

    name = "classic"

    def __init__(self, config: ClassicConfig | None = None) -> None:
        self.config = config or ClassicConfig()

    def clean(self, image: Image.Image, request: ImageRequest) -> EditedImage:
        image = to_mode(image, "RGB")
        width, height = image.size
        matte = product_matte(image)
        box = product_box(matte) if matte is not None else None
        if matte is None or box is None:
            # not a plain-background photo: a centred square crop keeps the product region
            side = min(width, height)
            left, top = (width - side) // 2, (height - side) // 2
            return EditedImage(image.crop((left, top, left + side, top + side)), ["center_crop"])
        white = Image.new("RGB", image.size, (255, 255, 255))
        cut = Image.composite(image, white, matte)
        square = _square_box(box, self.config.crop_margin, image.size)
        side = square[2] - square[0]
        canvas = Image.new("RGB", (side, side), (255, 255, 255))
        canvas.paste(cut.crop(square), (0, 0))
        alpha = Image.new("L", (side, side), 0)
        alpha.paste(matte.crop(square), (0, 0))
        target = max(width, height)
        clean = canvas.resize((target, target), Image.Resampling.LANCZOS)
        return EditedImage(
            clean,
            ["matte", "white_background", "product_crop"],
            alpha.resize((target, target), Image.Resampling.BILINEAR),
        )

    def variants(
        self, clean: EditedImage, request: ImageRequest, count: int, attempt: int = 0
    ) -> list[EditedImage]:
        kinds = ("background", "viewpoint", "lighting")
        out = []
        for index in range(count):
            rng = seeded(request, "variant", attempt, index)
            primary = kinds[(index + attempt) % len(kinds)]
            ops = [primary]
            # each view changes one thing for sure and maybe a second, so views differ
            extra = rng.choice([k for k in kinds if k != primary] + [None])
            if extra is not None:
                ops.append(extra)
            out.append(self._view(clean, rng, ops))
        return out

    def _view(self, clean: EditedImage, rng: random.Random, ops: list[str]) -> EditedImage:
        image = clean.image
        alpha = clean.alpha if clean.alpha is not None else product_matte(image)
        width, height = image.size
        background_fill = border_color(image)
        if "viewpoint" in ops:
            image, alpha = self._viewpoint(image, alpha, rng, background_fill)
        if "background" in ops and alpha is not None:
            image = Image.composite(image, random_background(width, height, rng), alpha)
        elif "background" in ops:
            ops = [op for op in ops if op != "background"] or ["lighting"]
        if "lighting" in ops:
            image = self._lighting(image, rng)
        return EditedImage(image, list(ops), alpha)

    def _viewpoint(
        self,
        image: Image.Image,
        alpha: Image.Image | None,
        rng: random.Random,
        fill: tuple[int, int, int],
    ) -> tuple[Image.Image, Image.Image | None]:
        c = self.config
        width, height = image.size
        scale = rng.uniform(c.min_scale, 1.0)
        angle = rng.uniform(-c.max_rotation, c.max_rotation)
        flip = rng.random() < 0.5
        d = c.max_perspective
        corners = [(rng.uniform(-d, d) * width, rng.uniform(-d, d) * height) for _ in range(4)]
        coefficients = _perspective_coefficients(width, height, corners)
        shift = (rng.uniform(-0.08, 0.08) * width, rng.uniform(-0.08, 0.08) * height)

        def move(layer: Image.Image, background: Any) -> Image.Image:
            if flip:
                layer = layer.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            layer = layer.transform(
                layer.size,
                Image.Transform.PERSPECTIVE,
                coefficients,
                Image.Resampling.BILINEAR,
                fillcolor=background,
            )
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            canvas = Image.new(layer.mode, (width, height), background)
            left = round((width - size[0]) / 2 + shift[0])
            top = round((height - size[1]) / 2 + shift[1])
            canvas.paste(layer.resize(size, Image.Resampling.BILINEAR), (left, top))
            return canvas.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=background)

        return move(image, fill), (None if alpha is None else move(alpha, 0))

    def _lighting(self, image: Image.Image, rng: random.Random) -> Image.Image:
        c = self.config
        image = ImageEnhance.Brightness(image).enhance(
            rng.uniform(1 - c.max_brightness, 1 + c.max_brightness)
        )
        image = ImageEnhance.Contrast(image).enhance(
            rng.uniform(1 - c.max_contrast, 1 + c.max_contrast)
        )
        if rng.random() < 0.3:
            image = image.filter(ImageFilter.GaussianBlur(0.6 * min(image.size) / 128))
        return image


def _perspective_coefficients(
    width: int, height: int, offsets: list[tuple[float, float]]
) -> list[float]:
    """PIL PERSPECTIVE coefficients mapping the output corners back to the input corners moved
    by ``offsets`` (top-left, top-right, bottom-right, bottom-left)."""
    import numpy as np

    out = [(0, 0), (width, 0), (width, height), (0, height)]
    src = [(x + dx, y + dy) for (x, y), (dx, dy) in zip(out, offsets, strict=True)]
    rows = []
    rhs = []
    for (x, y), (u, v) in zip(out, src, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs.extend([u, v])
    solution = np.linalg.solve(np.asarray(rows, dtype=np.float64), np.asarray(rhs))
    return [float(v) for v in solution]


def load_image_engine(config: ImageConfig) -> ImageEngine | None:
    """The engine ``config.engine`` names (None for ``none``)."""
    if config.engine == "none":
        return None
    if config.engine == "classic":
        return ClassicImageEngine(config.classic)
    from moon2.augment.diffusion import DiffusersImageEngine

    return DiffusersImageEngine(config.diffusers)
