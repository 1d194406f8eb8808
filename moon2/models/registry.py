"""Turn a MODEL argument into an encoder.

- ``open_clip:<arch>[:<pretrained tag or checkpoint path>]``
- ``hf:<model id or local path>``
- a directory holding a moon2 checkpoint (``moon2_model.json``), as written by ``moon2 train``
"""

from __future__ import annotations

from pathlib import Path

from moon2.errors import InputError
from moon2.models.base import Encoder, quiet_loading, resolve_device

MOON2_MARKER = "moon2_model.json"


def load_encoder(spec: str, device: str = "auto", trust_remote_code: bool = False) -> Encoder:
    """Load the encoder named by ``spec`` on ``device``."""
    with quiet_loading():
        return _load(spec, resolve_device(device), trust_remote_code)


def _load(spec: str, torch_device, trust_remote_code: bool) -> Encoder:
    if spec.startswith("open_clip:"):
        from moon2.models.openclip import OpenClipEncoder

        arch, _, weights = spec.removeprefix("open_clip:").partition(":")
        if not arch:
            raise InputError("open_clip: needs an architecture, e.g. open_clip:ViT-B-32")
        return OpenClipEncoder(arch, weights or None, torch_device)
    if spec.startswith("hf:"):
        from moon2.models.hf import HFEncoder

        model_id = spec.removeprefix("hf:")
        if not model_id:
            raise InputError("hf: needs a model id or a local path")
        return HFEncoder(model_id, torch_device, trust_remote_code=trust_remote_code)
    path = Path(spec)
    if (path / MOON2_MARKER).exists():
        from moon2.train.model import load_model

        return load_model(path, device=torch_device)
    if path.exists():
        raise InputError(
            f"{path} is not a moon2 checkpoint (no {MOON2_MARKER}); for other models use "
            "open_clip:<arch>[:<weights>] or hf:<model id or path>"
        )
    raise InputError(
        f"unknown model {spec!r}: give a moon2 checkpoint directory, "
        "open_clip:<arch>[:<pretrained tag or checkpoint path>] or hf:<model id or path>"
    )
