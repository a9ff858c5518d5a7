"""Image transforms for MAE pre-training and evaluation (PIL image -> float tensor (C, H, W))."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as F

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


class ToNormalizedTensor:
    """PIL image ("L" or "RGB") -> normalised float tensor (C, H, W): ``ToTensor`` then ``Normalize``
    in one step, with the same arithmetic (divide by 255, subtract the mean, divide by the std), so
    the same values to the bit, at a fifth of their per-image overhead (what dominates on 32 px)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], in_chans: int) -> None:
        self.mean = torch.tensor(_match_channels(mean, in_chans), dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(_match_channels(std, in_chans), dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        x = torch.from_numpy(np.array(img, dtype=np.uint8))
        x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1).contiguous()
        return x.to(torch.float32).div_(255).sub_(self.mean).div_(self.std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


def whole_image_box(height: int, width: int) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of the whole image at its aspect ratio clamped to [3/4, 4/3], centred:
    RandomResizedCrop's fallback crop, and what ``crop_scale = [1, 1]`` (no random crop) takes."""
    ratio = width / height
    h = round(width / (3 / 4)) if ratio < 3 / 4 else height
    w = round(height * (4 / 3)) if ratio > 4 / 3 else width
    return (height - h) // 2, (width - w) // 2, h, w


def is_whole_image(scale: Sequence[float]) -> bool:
    """Whether a crop scale of ``scale`` means no random crop (``[1, 1]``)."""
    return tuple(float(s) for s in scale) == (1.0, 1.0)


class WholeImage:
    """``crop_scale = [1, 1]``: :func:`whole_image_box` resized to ``size`` squared (bicubic), with no
    random draw. RandomResizedCrop at that scale takes the same box (or, on some non-square images,
    one a pixel smaller) after up to ten rejected tries, which cost ~0.2 ms a sample."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, img: Image.Image) -> Image.Image:
        top, left, h, w = whole_image_box(img.height, img.width)
        return F.resized_crop(img, top, left, h, w, [self.size, self.size], interpolation=BICUBIC, antialias=True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


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
    ``scale = (1, 1)``: no random crop, the whole image (:class:`WholeImage`).

    Randomness comes from the global torch RNG (see ``SeededDataset`` for per-sample seeding).
    """
    steps: list[Callable] = [
        ConvertChannels(in_chans),
        WholeImage(img_size) if is_whole_image(scale) else T.RandomResizedCrop(img_size, scale=scale,
                                                                              interpolation=BICUBIC),
    ]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    steps.append(ToNormalizedTensor(mean, std, in_chans))
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
    steps.append(ToNormalizedTensor(mean, std, in_chans))
    return T.Compose(steps)
