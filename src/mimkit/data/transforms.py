"""Image transforms for MAE pre-training and evaluation (PIL image -> float tensor (C, H, W))."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torchvision import transforms as T

from .datasets import _match_channels
from .sources import check_in_chans

BICUBIC = T.InterpolationMode.BICUBIC


class ConvertChannels:
    """Convert a PIL image to mode "L" (``in_chans=1``) or "RGB" (``in_chans=3``)."""

    def __init__(self, in_chans: int) -> None:
        check_in_chans(in_chans)
        self.in_chans = in_chans
        self.mode = "L" if in_chans == 1 else "RGB"

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(in_chans={self.in_chans})"


def _normalize(mean: Sequence[float], std: Sequence[float], in_chans: int) -> T.Normalize:
    return T.Normalize(_match_channels(mean, in_chans), _match_channels(std, in_chans))


def pretrain_transform(
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    in_chans: int,
    *,
    scale: tuple[float, float] = (0.2, 1.0),
    hflip: bool = True,
) -> Callable[[Image.Image], torch.Tensor]:
    """MAE pre-training augmentation: RandomResizedCrop (bicubic) + horizontal flip + normalize.

    Randomness comes from the global torch RNG (see ``SeededDataset`` for per-sample seeding).
    """
    steps: list[Callable] = [
        ConvertChannels(in_chans),
        T.RandomResizedCrop(img_size, scale=scale, interpolation=BICUBIC),
    ]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), _normalize(mean, std, in_chans)]
    return T.Compose(steps)


def eval_transform(
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    in_chans: int,
    *,
    crop_pct: float | None = None,
) -> Callable[[Image.Image], torch.Tensor]:
    """Deterministic evaluation transform.

    Small images (``img_size <= 64``, no ``crop_pct``): bicubic resize to ``img_size`` squared.
    Otherwise the MAE recipe: resize the short side to ``img_size / crop_pct`` (default 0.875,
    i.e. 256 for 224) and center-crop ``img_size``.
    """
    steps: list[Callable] = [ConvertChannels(in_chans)]
    if crop_pct is None and img_size <= 64:
        steps.append(T.Resize((img_size, img_size), interpolation=BICUBIC))
    else:
        crop_pct = 0.875 if crop_pct is None else crop_pct
        if not 0.0 < crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        steps += [T.Resize(int(img_size / crop_pct), interpolation=BICUBIC), T.CenterCrop(img_size)]
    steps += [T.ToTensor(), _normalize(mean, std, in_chans)]
    return T.Compose(steps)
