"""The ``diffusers`` image engine: a generative editing pipeline (img2img, instruct-pix2pix or
inpainting) for both stages of ``moon2 augment``.

- The pipeline is loaded from a hub id or a local directory (``save_pretrained`` layout). Its
  kind is ``config.pipeline``; ``auto`` reads ``_class_name`` from the model's
  ``model_index.json`` (``*InstructPix2Pix*`` -> instruct_pix2pix, ``*Inpaint*`` -> inpaint,
  anything else -> img2img through ``AutoPipelineForImage2Image``). No NSFW safety checker is
  loaded (it would need its own weights); pipelines that list one are loaded without it.
- Every image is letterboxed onto a ``size`` x ``size`` square (padded with its border colour,
  so the product is not stretched), edited, then cut back to the input's own size.
- Stage 1 (``clean``) runs ``clean_prompt`` at ``clean_strength``; stage 2 (``variants``) runs
  ``variant_prompts`` in turn at ``variant_strength``, all views of one row in one batched call.
  Each image has its own ``torch.Generator`` seeded from (row seed, key, stage, attempt, index),
  so outputs are reproducible and a retry (``attempt + 1``) gives new ones. Ops:
  ``["diffusers_clean"]`` and ``["diffusers_variant", "prompt<i>"]`` (``i`` indexes
  ``variant_prompts``), plus ``inpaint_background`` / ``inpaint_border`` for inpainting.
- Inpainting repaints the background only: the mask is the inverted product matte
  (:func:`moon2.data.images.product_matte`) when the photo's background is plain, else a ring
  along the border. With a matte the product's own pixels are pasted back afterwards (the VAE
  round trip would otherwise blur them), and the matte is returned as the image's alpha.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from moon2.augment.config import DiffusersConfig
from moon2.augment.images import EditedImage, ImageEngine, ImageRequest, product_box
from moon2.augment.text import resolve_device, resolve_dtype
from moon2.data.images import border_color, product_matte, to_mode
from moon2.errors import ConfigError

KINDS = ("img2img", "instruct_pix2pix", "inpaint")
RING_WIDTH = 0.125
"""Width of the repainted border ring (fraction of the side) when no matte can be found."""
MIN_BACKGROUND = 0.02
"""A matte whose background covers less than this fraction of the image is not used as a mask."""


def kind_of_class(class_name: str) -> str:
    """The pipeline kind of a diffusers pipeline class name (``model_index.json``)."""
    if "InstructPix2Pix" in class_name:
        return "instruct_pix2pix"
    if "Inpaint" in class_name:
        return "inpaint"
    return "img2img"


def read_model_index(model: str) -> dict[str, Any]:
    """``model_index.json`` of a local pipeline directory or of a hub id (downloaded)."""
    path = Path(model).expanduser()
    if path.exists():
        index_file = path / "model_index.json"
        if not index_file.is_file():
            raise ConfigError(
                f"images.diffusers.model {model!r} is not a diffusers pipeline directory "
                "(no model_index.json; single-file checkpoints are not supported)"
            )
        try:
            return json.loads(index_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {index_file}: {exc}") from exc
    from diffusers import DiffusionPipeline

    try:
        config = DiffusionPipeline.load_config(model)
    except Exception as exc:
        raise ConfigError(
            f"cannot load diffusers pipeline {model!r}: not a local directory and its "
            f"model_index.json cannot be fetched from the hub ({type(exc).__name__}: {exc})"
        ) from exc
    return dict(config)


def _pipeline_class(kind: str, class_name: str) -> Any:
    import diffusers

    if kind == "img2img":
        return diffusers.AutoPipelineForImage2Image
    if kind == "inpaint":
        return diffusers.AutoPipelineForInpainting
    if "InstructPix2Pix" in class_name and hasattr(diffusers, class_name):
        return getattr(diffusers, class_name)  # e.g. the SDXL variant
    return diffusers.StableDiffusionInstructPix2PixPipeline


def _dtype_keyword() -> str:
    """diffusers renamed ``torch_dtype`` to ``dtype`` (the old name warns, then goes away)."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401
    except ImportError:
        return "torch_dtype"
    return "dtype"


def derive_seed(request: ImageRequest, *parts: object) -> int:
    """A 63-bit seed from the row's seed, its key and the stage / attempt / index."""
    text = ":".join(str(p) for p in (request.seed, request.key, *parts))
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") >> 1


def fill_prompt(template: str, title: str) -> str:
    return template.replace("{title}", title)


class _Letterbox:
    """Pads an image to a square with its border colour and resizes it to ``side``; ``undo``
    turns a ``side`` x ``side`` output back into the original size."""

    def __init__(self, size: tuple[int, int], side: int) -> None:
        self.size = size
        self.side = side
        width, height = size
        self.square = max(width, height)
        self.offset = ((self.square - width) // 2, (self.square - height) // 2)

    def apply(self, image: Image.Image, fill: Any, resample: Image.Resampling) -> Image.Image:
        canvas = Image.new(image.mode, (self.square, self.square), fill)
        canvas.paste(image, self.offset)
        return canvas.resize((self.side, self.side), resample)

    def undo(self, image: Image.Image) -> Image.Image:
        width, height = self.size
        left, top = self.offset
        big = image.resize((self.square, self.square), Image.Resampling.LANCZOS)
        return big.crop((left, top, left + width, top + height))


def ring_mask(size: tuple[int, int], width: float = RING_WIDTH) -> Image.Image:
    """White (repaint) ring along the border, black (keep) centre."""
    w, h = size
    band = max(1, round(min(w, h) * width))
    mask = Image.new("L", size, 255)
    if w > 2 * band and h > 2 * band:
        mask.paste(0, (band, band, w - band, h - band))
    return mask


def background_mask(
    image: Image.Image, alpha: Image.Image | None = None
) -> tuple[Image.Image, Image.Image | None]:
    """(mask, matte): mask is white where the background is repainted. The matte is ``alpha``
    or :func:`product_matte` when usable (a product and some background), else None and the
    mask is a border ring."""
    matte = alpha if alpha is not None else product_matte(image)
    if matte is not None:
        matte = matte.convert("L")
        if matte.size != image.size:
            matte = matte.resize(image.size, Image.Resampling.BILINEAR)
        mask = ImageOps.invert(matte)
        histogram = mask.point(lambda v: 255 if v >= 128 else 0).histogram()
        background = histogram[255] / max(1, image.size[0] * image.size[1])
        if product_box(matte) is not None and background >= MIN_BACKGROUND:
            return mask, matte
    return ring_mask(image.size), None


class DiffusersImageEngine(ImageEngine):
    """Both stages through one diffusers editing pipeline; see the module docstring."""

    max_batch: int = 8
    """Most images per pipeline call (variants are split into calls of at most this many)."""

    def __init__(self, config: DiffusersConfig) -> None:
        if not config.model:
            raise ConfigError("images.diffusers.model is not set (a hub id or a local directory)")
        if not config.variant_prompts:
            raise ConfigError("images.diffusers.variant_prompts is empty")
        self.config = config
        self.name = f"diffusers:{config.model}"
        self.side = max(8, config.size // 8 * 8)
        self.device = resolve_device(config.device)
        self.pipe, self.kind = self._load(config)
        call = inspect.signature(self.pipe.__call__).parameters
        self._call_params = {
            name
            for name, p in call.items()
            if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
        }

    # -- loading ------------------------------------------------------------------------------

    def _load(self, config: DiffusersConfig) -> tuple[Any, str]:
        model = str(config.model)
        index = read_model_index(model)
        class_name = str(index.get("_class_name", ""))
        kind = config.pipeline if config.pipeline != "auto" else kind_of_class(class_name)
        dtype = resolve_dtype(config.dtype, self.device, gpu_default="float16")
        kwargs: dict[str, Any] = {_dtype_keyword(): dtype}
        if "safety_checker" in index or "requires_safety_checker" in index:
            # the NSFW checker needs its own weights; load the pipeline without it, quietly
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        pipeline_class = _pipeline_class(kind, class_name)
        try:
            pipe = pipeline_class.from_pretrained(model, **kwargs)
        except Exception as exc:
            raise ConfigError(
                f"cannot load diffusers pipeline {model!r} as {kind} "
                f"({pipeline_class.__name__}): {type(exc).__name__}: {exc}"
            ) from exc
        unet = getattr(pipe, "unet", None)
        channels = getattr(getattr(unet, "config", None), "in_channels", None)
        if kind == "instruct_pix2pix" and channels is not None and channels != 8:
            raise ConfigError(
                f"diffusers pipeline {model!r} is not an instruct-pix2pix model (its UNet takes "
                f"{channels} input channels, not 8); set images.diffusers.pipeline to img2img"
            )
        try:
            pipe = pipe.to(self.device)
        except Exception as exc:
            raise ConfigError(f"cannot move {model!r} to {self.device}: {exc}") from exc
        pipe.set_progress_bar_config(disable=True)
        return pipe, kind

    # -- stages -------------------------------------------------------------------------------

    def clean(self, image: Image.Image, request: ImageRequest) -> EditedImage:
        image = to_mode(image, "RGB")
        prompt = fill_prompt(self.config.clean_prompt, request.title)
        seed = derive_seed(request, "clean")
        return self._edit(
            image,
            None,
            [prompt],
            [seed],
            self.config.clean_strength,
            [["diffusers_clean"]],
        )[0]

    def variants(
        self, clean: EditedImage, request: ImageRequest, count: int, attempt: int = 0
    ) -> list[EditedImage]:
        if count <= 0:
            return []
        image = to_mode(clean.image, "RGB")
        prompts, seeds, ops = [], [], []
        n = len(self.config.variant_prompts)
        for k in range(count):
            index = (k + attempt) % n
            prompts.append(fill_prompt(self.config.variant_prompts[index], request.title))
            seeds.append(derive_seed(request, "variant", attempt, k))
            ops.append(["diffusers_variant", f"prompt{index}"])
        out: list[EditedImage] = []
        for start in range(0, count, self.max_batch):
            stop = start + self.max_batch
            out.extend(
                self._edit(
                    image,
                    clean.alpha,
                    prompts[start:stop],
                    seeds[start:stop],
                    self.config.variant_strength,
                    ops[start:stop],
                )
            )
        return out

    # -- one batched pipeline call ------------------------------------------------------------

    def _steps(self, strength: float) -> int:
        """Steps such that ``int(steps * strength) >= 1`` (else img2img runs no step at all)."""
        steps = self.config.steps
        if self.kind != "instruct_pix2pix":
            steps = max(steps, math.ceil(1.0 / strength - 1e-9))
        return steps

    def _edit(
        self,
        image: Image.Image,
        alpha: Image.Image | None,
        prompts: Sequence[str],
        seeds: Sequence[int],
        strength: float,
        ops: Sequence[list[str]],
    ) -> list[EditedImage]:
        import torch

        c = self.config
        box = _Letterbox(image.size, self.side)
        square = box.apply(image, border_color(image), Image.Resampling.LANCZOS)
        n = len(prompts)
        generators = [torch.Generator(self.device).manual_seed(s) for s in seeds]
        kwargs: dict[str, Any] = {
            "prompt": list(prompts),
            "image": [square] * n,
            "num_inference_steps": self._steps(strength),
            "guidance_scale": c.guidance_scale,
            "generator": generators,
            "output_type": "pil",
        }
        if c.negative_prompt:
            kwargs["negative_prompt"] = [c.negative_prompt] * n
        matte = None
        extra_op: list[str] = []
        if self.kind == "inpaint":
            mask, matte = background_mask(image, alpha)
            kwargs["mask_image"] = [box.apply(mask, 255, Image.Resampling.BILINEAR)] * n
            kwargs["height"] = kwargs["width"] = self.side
            extra_op = ["inpaint_background" if matte is not None else "inpaint_border"]
        if self.kind == "instruct_pix2pix":
            kwargs["image_guidance_scale"] = c.image_guidance_scale
        else:
            kwargs["strength"] = strength
        kwargs = {k: v for k, v in kwargs.items() if k in self._call_params}
        result = self.pipe(**kwargs)
        images = result.images if hasattr(result, "images") else result[0]
        out = []
        for generated, op in zip(images, ops, strict=True):
            edited = box.undo(to_mode(generated, "RGB"))
            if matte is not None:
                # the product's own pixels stay exactly as they were
                edited = Image.composite(image, edited, matte)
            out.append(EditedImage(edited, [*op, *extra_op], matte))
        return out
