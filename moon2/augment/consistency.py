"""Consistency scores: does a generated image still show the same product?

- ``openclip``: cosine similarity under an open_clip model, either image<->title (CLIP-score)
  or image<->original image. Needs a pretrained checkpoint (a tag, which needs the hub, or a
  local file) to mean anything.
- ``histogram`` (no model): similarity of the product's colour histogram (hue x saturation
  for coloured pixels, value for greys, soft-assigned; histogram intersection) and of its
  edge-orientation histogram (gradient angles weighted by magnitude, 12 bins, best over
  rotations) between the generated image and the original, each over the product's pixels
  (the matte when known or findable, else a centre-weighted window). Both lie in [0, 1]; the
  score is 0.7 colour + 0.3 edges. A recoloured product scores low; a new background,
  viewpoint or lighting keeps the product's hues and scores high.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from moon2.augment.config import ConsistencyConfig
from moon2.augment.images import EditedImage
from moon2.data.images import product_matte, to_mode
from moon2.errors import ConfigError

HUE_BINS = 12
GREY_BINS = 4
EDGE_BINS = 12
ANALYSIS_SIDE = 96


class ConsistencyScorer(abc.ABC):
    name: str = ""

    @abc.abstractmethod
    def score(
        self, images: Sequence[EditedImage], original: Image.Image, title: str
    ) -> list[float]:
        """One score per generated image (higher = more consistent)."""


def _weights(image: Image.Image, alpha: Image.Image | None) -> np.ndarray:
    """Per-pixel product weights in [0, 1] at the analysis size."""
    side = (ANALYSIS_SIDE, ANALYSIS_SIDE)
    if alpha is None:
        alpha = product_matte(image)
    if alpha is not None:
        weights = np.asarray(alpha.resize(side, Image.Resampling.BILINEAR), np.float32) / 255.0
        if weights.sum() >= 0.02 * weights.size:
            return weights
    grid = (np.arange(ANALYSIS_SIDE) + 0.5) / ANALYSIS_SIDE - 0.5
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    return np.exp(-(xx**2 + yy**2) / (2 * 0.22**2)).astype(np.float32)


def _soft_bins(position: np.ndarray, bins: int, circular: bool) -> tuple[np.ndarray, ...]:
    """Each value shared between its two nearest bins: (low bin, high bin, high share)."""
    if circular:
        position = np.mod(position - 0.5, bins)
        low = np.floor(position).astype(np.int64)
        return low % bins, (low + 1) % bins, position - low
    position = np.clip(position - 0.5, 0, bins - 1)
    low = np.floor(position).astype(np.int64)
    return low, np.minimum(low + 1, bins - 1), position - low


def colour_histogram(image: Image.Image, weights: np.ndarray) -> np.ndarray:
    """A lighting-tolerant colour histogram of the weighted pixels: hue (12 circular bins) x
    saturation (2 bins) for coloured pixels, value (4 bins) for greys, each pixel shared
    between neighbouring bins. A brighter, darker or flatter photo keeps its hues; a recolour
    moves them."""
    hsv = (
        np.asarray(
            to_mode(image, "RGB")
            .resize((ANALYSIS_SIDE, ANALYSIS_SIDE), Image.Resampling.BILINEAR)
            .convert("HSV"),
            np.float64,
        ).reshape(-1, 3)
        / 255.0
    )
    flat = weights.ravel().astype(np.float64)
    hue, saturation, value = hsv[:, 0], hsv[:, 1], hsv[:, 2]
    # colourfulness: how much a pixel counts as coloured (dark pixels have unreliable hue)
    coloured = np.clip((saturation * value - 0.08) / 0.12, 0, 1)
    hist = np.zeros(HUE_BINS * 2 + GREY_BINS)
    h_low, h_high, h_up = _soft_bins(hue * HUE_BINS, HUE_BINS, circular=True)
    s_low, s_high, s_up = _soft_bins(saturation * 2, 2, circular=False)
    for h_bin, h_share in ((h_low, 1 - h_up), (h_high, h_up)):
        for s_bin, s_share in ((s_low, 1 - s_up), (s_high, s_up)):
            share = flat * coloured * h_share * s_share
            hist += np.bincount(h_bin * 2 + s_bin, weights=share, minlength=len(hist))
    v_low, v_high, v_up = _soft_bins(value * GREY_BINS, GREY_BINS, circular=False)
    offset = HUE_BINS * 2
    for v_bin, v_share in ((v_low, 1 - v_up), (v_high, v_up)):
        share = flat * (1 - coloured) * v_share
        hist += np.bincount(offset + v_bin, weights=share, minlength=len(hist))
    return hist / max(hist.sum(), 1e-9)


def edge_histogram(image: Image.Image, weights: np.ndarray) -> np.ndarray:
    grey = np.asarray(
        to_mode(image, "L").resize((ANALYSIS_SIDE, ANALYSIS_SIDE), Image.Resampling.BILINEAR),
        np.float32,
    )
    gy, gx = np.gradient(grey)
    magnitude = np.hypot(gx, gy) * weights
    angle = np.mod(np.arctan2(gy, gx), np.pi)  # orientation, not direction
    index = np.minimum((angle / np.pi * EDGE_BINS).astype(np.int64), EDGE_BINS - 1)
    hist = np.bincount(index.ravel(), weights=magnitude.ravel(), minlength=EDGE_BINS)
    return hist / max(hist.sum(), 1e-9)


def product_histograms(
    image: Image.Image, alpha: Image.Image | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The colour and edge-orientation histograms of the product's pixels."""
    weights = _weights(image, alpha)
    return colour_histogram(image, weights), edge_histogram(image, weights)


def _similarity(new: tuple[np.ndarray, np.ndarray], old: tuple[np.ndarray, np.ndarray]) -> float:
    colour = np.minimum(new[0], old[0]).sum()
    # orientation histograms are compared up to a rotation of the product (a view may turn it)
    edges = max(np.minimum(np.roll(new[1], s), old[1]).sum() for s in range(EDGE_BINS))
    return float(0.7 * colour + 0.3 * edges)


def histogram_similarity(
    image: Image.Image,
    original: Image.Image,
    alpha: Image.Image | None = None,
    original_alpha: Image.Image | None = None,
) -> float:
    """0.7 colour + 0.3 edge-orientation histogram intersection over product pixels."""
    return _similarity(
        product_histograms(image, alpha), product_histograms(original, original_alpha)
    )


class HistogramScorer(ConsistencyScorer):
    name = "histogram"

    def score(
        self, images: Sequence[EditedImage], original: Image.Image, title: str
    ) -> list[float]:
        reference = product_histograms(original)  # once per call, not once per image
        return [_similarity(product_histograms(e.image, e.alpha), reference) for e in images]


class OpenClipScorer(ConsistencyScorer):
    """Cosine similarity of open_clip embeddings (against the title or the original image)."""

    def __init__(self, config: ConsistencyConfig, device: str = "cpu") -> None:
        import open_clip
        import torch

        from moon2.models.openclip import _register_moon2_configs

        _register_moon2_configs()  # moon2-tiny-clip, for tests and small offline runs
        self.reference = config.reference
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                config.openclip_model, pretrained=config.openclip_pretrained, device=device
            )
        except Exception as exc:  # open_clip raises RuntimeError/ValueError/OSError variously
            raise ConfigError(
                f"open_clip model {config.openclip_model!r} with pretrained "
                f"{config.openclip_pretrained!r} could not be loaded ({exc})"
            ) from None
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(config.openclip_model)
        self.device = device
        self.name = f"openclip:{config.openclip_model}:{config.openclip_pretrained}"
        self._torch = torch

    def _images(self, images: Sequence[Image.Image]) -> Any:
        torch = self._torch
        batch = torch.stack([self.preprocess(to_mode(i, "RGB")) for i in images]).to(self.device)
        with torch.inference_mode():
            features = self.model.encode_image(batch)
        return torch.nn.functional.normalize(features.float(), dim=-1)

    def score(
        self, images: Sequence[EditedImage], original: Image.Image, title: str
    ) -> list[float]:
        if not images:
            return []
        torch = self._torch
        generated = self._images([e.image for e in images])
        if self.reference == "title" and title.strip():
            with torch.inference_mode():
                text = self.model.encode_text(self.tokenizer([title]).to(self.device))
            reference = torch.nn.functional.normalize(text.float(), dim=-1)
        else:
            reference = self._images([original])
        return [float(v) for v in (generated @ reference.T).squeeze(1).tolist()]


def load_scorer(config: ConsistencyConfig, device: str = "cpu") -> ConsistencyScorer:
    """The scorer ``config.scorer`` names (``auto``: openclip when a checkpoint is set)."""
    if config.scorer_kind() == "histogram":
        if config.reference == "title" and config.scorer == "histogram":
            raise ConfigError(
                "consistency.reference 'title' needs an open_clip model; the histogram scorer "
                "compares against the original image"
            )
        return HistogramScorer()
    return OpenClipScorer(config, device)
