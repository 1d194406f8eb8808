"""moon2: e-commerce multimodal product representation learning (MOON2.0)."""

__version__ = "0.1.0"


def load_model(path, device="auto"):
    """Load a trained moon2 model directory (``OUT/final``) as an encoder.

    ``encoder.encode([EncodeItem(text=..., images=[...]), ...])`` returns L2-normalised
    float32 embeddings; see :class:`moon2.train.model.Moon2Encoder`.
    """
    from moon2.train.model import load_model as _load

    return _load(path, device=device)


__all__ = ["__version__", "load_model"]
