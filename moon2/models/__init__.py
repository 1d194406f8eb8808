"""Encoders: one interface over moon2 checkpoints and baseline models (open_clip, HF)."""

from moon2.models.base import EncodeItem, Encoder, resolve_device
from moon2.models.registry import load_encoder

__all__ = ["EncodeItem", "Encoder", "load_encoder", "resolve_device"]
