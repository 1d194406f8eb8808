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

from moon2.errors import ConfigError


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
    max_images: int | None = None
    """Most images of an item the encoder reads (a moon2 checkpoint: as many as it trained
    with); None: no number of its own."""

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


DEFAULT_MAX_IMAGES = 4
"""Images per product eval and embed give an encoder that has no number of its own."""


def settle_max_images(encoder: Encoder, requested: int | None) -> int:
    """Images per product to give ``encoder``: ``requested`` when the user chose a number (an
    encoder with a number of its own is told to read that many), else the encoder's own (a
    moon2 checkpoint's: as many as it trained with), else :data:`DEFAULT_MAX_IMAGES`."""
    if requested is None:
        return encoder.max_images or DEFAULT_MAX_IMAGES
    if encoder.max_images is not None:
        encoder.max_images = requested
    return requested


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def _cuda_devices() -> str:
    """What this machine has in CUDA GPUs, for an error message."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not count:
        return "this machine has no CUDA GPU"
    names = ", ".join(f"cuda:{i}" for i in range(count))
    return f"this machine has {count} CUDA GPU{'s' if count > 1 else ''} ({names})"


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device when this machine has it, else a ConfigError that says
    what the machine has (every command's device option goes through here)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(
            f"device {device!r} is not a device name: use auto, cpu, cuda, cuda:N or mps"
        ) from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (parsed.index or 0) >= count:
            raise ConfigError(f"device {device} is not available: {_cuda_devices()}")
    elif parsed.type == "mps":
        if not _mps_available():
            raise ConfigError(f"device {device} is not available: this machine has no MPS GPU")
    elif parsed.type != "cpu":
        # other accelerators (xpu, ...) expose torch.<type>.is_available(); meta & co. do not run
        backend = getattr(torch, parsed.type, None)
        if not getattr(backend, "is_available", lambda: False)():
            raise ConfigError(f"device {device} is not available on this machine")
    return parsed


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available (else mps, else cpu); anything else as given, when this
    machine has it."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    return check_device(device)


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
