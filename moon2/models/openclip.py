"""open_clip baselines: ``open_clip:<arch>[:<pretrained tag or checkpoint path>]``.

Text-only items go through the text tower, image items through the image tower (several
images of a product are averaged), and a multimodal item is the normalised sum of its two
normalised halves, the usual late fusion of a CLIP-style model. Without a pretrained part the
weights are random: a sanity baseline that must score near chance.

Checkpoint files are loaded without unpickling code (safetensors, or ``torch.load`` with
``weights_only=True``). Pretrained tags are fetched by open_clip from the model hub, which
fails offline with a clear message.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from moon2 import progress
from moon2.errors import InputError
from moon2.models.base import EncodeItem, Encoder, l2_normalise

MOON2_CONFIGS = Path(__file__).parent / "model_configs"
_registered = False


def _register_moon2_configs() -> None:
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(MOON2_CONFIGS)
        _registered = True


def _load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle errors, truncated files, ...
            raise InputError(f"cannot load checkpoint {path} safely ({exc})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise InputError(f"{path} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


class OpenClipEncoder(Encoder):
    def __init__(self, arch: str, weights: str | None, device: torch.device) -> None:
        import open_clip

        _register_moon2_configs()
        if arch not in open_clip.list_models():
            raise InputError(
                f"unknown open_clip architecture {arch!r} (e.g. ViT-B-32, ViT-B-16, "
                "moon2-tiny-clip; see open_clip.list_models())"
            )
        self.device = device
        self.name = f"open_clip:{arch}" + (f":{weights}" if weights else "")
        pretrained = None
        checkpoint = None
        if weights:
            if Path(weights).expanduser().exists():
                checkpoint = Path(weights).expanduser()
            else:
                pretrained = weights
        try:
            # random weights are a baseline: seed them (without touching the caller's RNG)
            # so that its numbers are reproducible
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model, _, preprocess = open_clip.create_model_and_transforms(
                    arch, pretrained=pretrained, device=device
                )
        except Exception as exc:  # hub download errors come in many types
            raise InputError(
                f"could not load open_clip {arch} with pretrained={pretrained!r}: {exc}. "
                "Offline, pass a local checkpoint path instead of a pretrained tag."
            ) from None
        if checkpoint is not None:
            missing, unexpected = model.load_state_dict(_load_checkpoint(checkpoint), strict=False)
            if missing:
                raise InputError(
                    f"{checkpoint} does not fit open_clip {arch}: missing {missing[:5]}"
                )
            if unexpected:
                progress.warn(f"{checkpoint}: ignored unexpected keys {unexpected[:5]}")
        elif pretrained is None:
            progress.warn(f"open_clip {arch} has random weights (no pretrained part given)")
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(arch)
        with torch.inference_mode():
            self._dim = int(model.encode_text(self.tokenizer(["x"]).to(device)).shape[-1])

    @property
    def dim(self) -> int:
        return self._dim

    @torch.inference_mode()
    def encode(self, items: Sequence[EncodeItem]) -> np.ndarray:
        out = torch.zeros(len(items), self.dim)
        text_rows = [i for i, item in enumerate(items) if item.text]
        text_emb = {}
        if text_rows:
            tokens = self.tokenizer([items[i].text for i in text_rows]).to(self.device)
            encoded = l2_normalise(self.model.encode_text(tokens)).cpu()
            text_emb = dict(zip(text_rows, encoded, strict=True))
        image_rows = [i for i, item in enumerate(items) if item.images]
        image_emb = {}
        if image_rows:
            pixels = [self.preprocess(img) for i in image_rows for img in items[i].images]
            encoded = l2_normalise(self.model.encode_image(torch.stack(pixels).to(self.device)))
            encoded = encoded.cpu()
            start = 0
            for i in image_rows:
                count = len(items[i].images)
                image_emb[i] = l2_normalise(encoded[start : start + count].mean(0))
                start += count
        for i in range(len(items)):
            parts = [e for e in (text_emb.get(i), image_emb.get(i)) if e is not None]
            if parts:
                out[i] = l2_normalise(torch.stack(parts).sum(0))
        return out.numpy().astype(np.float32)
