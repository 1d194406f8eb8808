"""moon2: e-commerce multimodal product representation learning (MOON2.0)."""

__version__ = "0.1.0"
