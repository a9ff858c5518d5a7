"""mimkit: masked image modeling (MAE, EMAE, RC-MAE, MixedAE) for Vision Transformers."""

__version__ = "0.1.0"
