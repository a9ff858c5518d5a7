"""mimkit: masked image modeling (MAE, EMAE, RC-MAE, MixedAE) for Vision Transformers."""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"
__all__ = ["__version__", "load_model"]


def load_model(path: str | Path, weights: str = "auto", **overrides):
    """Load an MAE from a mimkit checkpoint or an official ``{'model': state_dict}`` file.

    The architecture comes from the file (mimkit) or from tensor shapes (official; heads
    ``D/64`` unless ``num_heads=`` is given). ``weights``: ``auto`` (the method's evaluation
    weights, e.g. RC-MAE's teacher), ``student`` or ``teacher``. Keyword overrides
    (``img_size``, ``num_heads``, ``norm_pix_loss``, ...) change the built model; a new
    ``img_size`` resizes the position tables. Returns the model in eval mode.
    """
    from mimkit.engine.checkpoint import load_file
    from mimkit.interop.official import model_from_state

    ckpt = load_file(path)
    if ckpt.get("format", "").startswith("mimkit"):
        key = "model"
        if weights == "student" and "student" in ckpt:
            key = "student"
        elif weights == "teacher":
            if "teacher" not in ckpt:
                raise ValueError(f"{path} has no teacher weights")
            key = "teacher"
        arch = dict(ckpt["arch"])
        norm_pix = overrides.pop("norm_pix_loss", ckpt.get("norm_pix_loss", True))
        model = model_from_state(ckpt[key], arch, norm_pix_loss=norm_pix, **overrides)
    elif "model" in ckpt and isinstance(ckpt["model"], dict):
        norm_pix = overrides.pop("norm_pix_loss", True)
        model = model_from_state(ckpt["model"], None, norm_pix_loss=norm_pix, **overrides)
    else:
        raise ValueError(f"{path}: not a mimkit or official MAE checkpoint (keys: {sorted(ckpt)[:8]})")
    return model.eval()
