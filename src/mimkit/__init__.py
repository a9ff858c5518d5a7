"""mimkit: masked image modeling (MAE, EMAE, RC-MAE, MixedAE) for Vision Transformers.

Public API: :func:`pretrain`, :func:`evaluate` (returning :class:`Run` / the evaluation record),
:func:`load_model`, :func:`load_encoder`. Importing ``mimkit`` does not import torch: the
functions import what they need when called (so ``mimkit --help`` stays fast).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["Run", "__version__", "evaluate", "load_encoder", "load_model", "pretrain", "use_dataset"]
_LAZY = {"pretrain": "mimkit.api", "evaluate": "mimkit.api", "Run": "mimkit.api", "use_dataset": "mimkit.api"}

if TYPE_CHECKING:
    from mimkit.api import Run, evaluate, pretrain


def __getattr__(name: str):
    """Import the API's names on first use (PEP 562)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mimkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def load_model(path: str | Path, weights: str = "auto", **overrides):
    """Load an MAE from a mimkit checkpoint, an official ``{'model': state_dict}`` file, a
    safetensors export or a Hugging Face ViTMAE folder.

    The architecture comes from the file (mimkit, exports, ``config.json``) or from tensor shapes
    (official; heads ``D/64`` unless ``num_heads=`` is given). ``weights``: ``auto`` (the method's
    evaluation weights, e.g. RC-MAE's teacher), ``student`` or ``teacher``. Keyword overrides
    (``img_size``, ``num_heads``, ``norm_pix_loss``, ...) change the built model; a new
    ``img_size`` resizes the position tables. Returns the model in eval mode.
    """
    from mimkit.interop.convert import build_mae, read_weights

    return build_mae(read_weights(path, weights), **overrides).eval()


def load_encoder(path: str | Path, weights: str = "auto", **overrides):
    """The encoder of any file :func:`load_model` reads, as a ``timm`` ``VisionTransformer``.

    Defaults follow MAE fine-tuning (docs/methods/mae.md): ``global_pool='avg'`` with a fresh ``fc_norm``
    (the pre-trained per-token ``norm`` is dropped, as in the official code) and
    ``num_classes=0``; a head (``num_classes=N``) is initialised trunc-normal(std 2e-5).
    ``global_pool='token'`` keeps ``norm`` and gives exactly the MAE encoder's features.
    Other keyword arguments go to ``VisionTransformer`` (``drop_path_rate``, ``img_size``, ...);
    ``num_heads`` overrides the inferred head count. Returns the model in eval mode.
    """
    from mimkit.interop.convert import read_weights
    from mimkit.interop.timm import to_timm_vit

    w = read_weights(path, weights)
    arch = dict(w.arch)
    if "num_heads" in overrides:
        arch["num_heads"] = overrides.pop("num_heads")
    overrides.setdefault("global_pool", "avg")
    return to_timm_vit(w.state, arch, **overrides).eval()
