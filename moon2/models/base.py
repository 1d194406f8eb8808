"""The encoder interface every model speaks: items in, L2-normalised embeddings out.

An item is a text, a list of images, or both; what the encoder makes of a multimodal item is
its own business (a moon2 model reads both in one sequence, a CLIP baseline fuses its two
towers). Encoders that cannot read a modality say so, and callers skip those tasks.
"""

from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image


@dataclass
class EncodeItem:
    """One thing to embed: text, images (main first), or both."""

    text: str | None = None
    images: list[Image.Image] = field(default_factory=list)

    @property
    def modality(self) -> str:
        if self.text and self.images:
            return "mm"
        if self.images:
            return "image"
        if self.text:
            return "text"
        return "empty"


class Encoder(ABC):
    """A model that embeds texts, images and image+text items into one space."""

    name: str = "encoder"
    supports_text: bool = True
    supports_images: bool = True

    @property
    @abstractmethod
    def dim(self) -> int:
        """Embedding size."""

    @abstractmethod
    def encode(self, items: Sequence[EncodeItem]) -> np.ndarray:
        """Embeddings of ``items`` as a float32 array [len(items), dim], rows L2-normalised.

        An item with nothing the encoder can read gets a zero row.
        """

    def supports(self, modality: str) -> bool:
        if modality == "text":
            return self.supports_text
        if modality == "image":
            return self.supports_images
        return self.supports_text or self.supports_images  # mm: at least one part is read


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available (else mps, else cpu); anything else as given."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Silence the progress bars and load reports of transformers and open_clip."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()
        root.setLevel(level)


def l2_normalise(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)
