"""Where pre-training images are decoded and augmented (``data.decode``).

* ``pil`` (default): the workers decode with Pillow and augment the PIL image
  (:func:`~mimkit.data.transforms.pretrain_transform`: RandomResizedCrop, bicubic, then flip).
* ``torchvision``: the workers decode with ``torchvision.io.decode_image`` into a uint8 tensor
  and crop, resize (bicubic, antialiased) and flip it with ``torchvision.transforms.v2``'s
  functional ops: no PIL image and no ``ToTensor``, about 1.7× the images per core of ``pil``
  (``mimkit bench --jpeg``).
* ``device``: the workers only read the file's bytes and its size (the JPEG header) and draw the
  crop and the flip; the training device decodes the whole batch
  (``torchvision.io.decode_jpeg(list, device=...)``: nvJPEG on CUDA) and crops and resizes it
  there, a few kernels per batch (:class:`DeviceAugment`). Non-JPEG files are decoded in the
  workers and only resized on the device. Meant for CUDA, where the CPU cores cannot keep up with
  the step; on CPU it works but decodes in the training process.

Data sets that hold decoded images (Fashion-MNIST, CIFAR, synthetic, Python) hand the
transforms a PIL image: ``torchvision`` and ``device`` then only choose where and how the
augmentation runs (``device``: the worker converts the image to a uint8 tensor and draws the
box; the batch is cropped and resized in the training process, in one kernel per image size).

All three draw the crop box and the flip from the per-sample seeded RNG in the same order as
``pretrain_transform`` (``RandomResizedCrop.get_params``, then one ``torch.rand(1)`` for the
flip), and the masking noise after them, so for a given (seed, epoch, index) they crop the same
box, flip the same way and mask the same patches: they differ only in the decoder and the
resampling kernel, and a resumed run sees exactly the batches it would have.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision import transforms as T

from .datasets import CorruptImageError, EncodedFile, _match_channels

_JPEG_MAGIC = b"\xff\xd8\xff"
# torchvision 0.29 marks its image codecs deprecated in favour of TorchCodec (not a dependency here).
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


def crop_box(height: int, width: int, scale: Sequence[float], hflip: bool) -> torch.Tensor:
    """``[top, left, h, w, flip]`` of RandomResizedCrop (ratio 3/4..4/3) and the flip, drawn from
    torch's global RNG exactly as :func:`~mimkit.data.transforms.pretrain_transform` draws them."""
    size_only = torch.empty(1, 1, 1).expand(1, height, width)  # get_params reads the shape only
    top, left, h, w = T.RandomResizedCrop.get_params(size_only, list(scale), [3 / 4, 4 / 3])
    flip = bool(hflip and torch.rand(1) < 0.5)
    return torch.tensor([top, left, h, w, int(flip)], dtype=torch.int64)


def _pil_to_tensor(data: bytes, mode: str) -> torch.Tensor:
    from torchvision.transforms.functional import pil_to_tensor

    with Image.open(io.BytesIO(data)) as img:
        return pil_to_tensor(img.convert(mode))


def to_uint8(img: EncodedFile | Image.Image, in_chans: int) -> torch.Tensor:
    """uint8 (C, H, W) of a file's bytes (:func:`decode_bytes`) or of a decoded PIL image."""
    if isinstance(img, EncodedFile):
        return decode_bytes(img, in_chans)
    from torchvision.transforms.functional import pil_to_tensor

    mode = "L" if in_chans == 1 else "RGB"
    return pil_to_tensor(img if img.mode == mode else img.convert(mode))


def decode_bytes(file: EncodedFile, in_chans: int) -> torch.Tensor:
    """uint8 (C, H, W) of one file: ``torchvision.io.decode_image`` (JPEG, PNG, WebP, GIF), Pillow
    for the other formats; :class:`CorruptImageError` names the file when neither can read it."""
    from torchvision.io import ImageReadMode, decode_image

    mode = ImageReadMode.GRAY if in_chans == 1 else ImageReadMode.RGB
    try:
        return decode_image(torch.frombuffer(bytearray(file.data), dtype=torch.uint8), mode=mode)
    except RuntimeError:
        pass  # a format torchvision does not read (BMP, TIFF), or a broken file: Pillow decides
    try:
        return _pil_to_tensor(file.data, "L" if in_chans == 1 else "RGB")
    except Exception as e:  # PIL raises many types on corrupt files
        raise CorruptImageError(f"cannot read image {file.where} ({type(e).__name__}: {e})") from None


def _normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(x / 255 - mean) / std per channel, for float x in [0, 255]."""
    return (x / 255.0 - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)


class TensorCrop:
    """``data.decode=torchvision``: an :class:`EncodedFile` (or a PIL image) -> normalised float
    (C, S, S).

    ``decode_image`` (or ``pil_to_tensor``), then ``v2.functional.resized_crop`` (bicubic, antialiased, rounded back to
    uint8 as a uint8 image is) and ``horizontal_flip`` on the uint8 tensor, then scale and normalise.
    """

    reads_bytes = True  # the data sets hand an EncodedFile instead of a PIL image

    def __init__(self, img_size: int, mean: Sequence[float], std: Sequence[float], in_chans: int, *,
                 scale: Sequence[float] = (0.2, 1.0), hflip: bool = True) -> None:
        self.img_size, self.in_chans, self.scale, self.hflip = img_size, in_chans, tuple(scale), hflip
        self.mean = torch.tensor(_match_channels(mean, in_chans))
        self.std = torch.tensor(_match_channels(std, in_chans))

    def __call__(self, file: EncodedFile | Image.Image) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F2

        img = to_uint8(file, self.in_chans)
        top, left, h, w, flip = crop_box(img.shape[-2], img.shape[-1], self.scale, self.hflip).tolist()
        x = F2.resized_crop(img, top, left, h, w, [self.img_size, self.img_size],
                            interpolation=F2.InterpolationMode.BICUBIC, antialias=True)
        if flip:
            x = F2.horizontal_flip(x)
        return _normalize(x.float(), self.mean, self.std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(img_size={self.img_size}, scale={self.scale}, hflip={self.hflip})"


@dataclass
class DeviceSample:
    """One image for :class:`DeviceAugment`: JPEG bytes (``jpeg``) or, for other formats, the
    decoded uint8 image (``image``), plus its ``[top, left, h, w, flip]`` box."""

    box: torch.Tensor
    where: str
    jpeg: torch.Tensor | None = None
    image: torch.Tensor | None = None


@dataclass
class DeviceBatch:
    """A batch of :class:`DeviceSample` (what :func:`collate_device` makes of them)."""

    samples: list[DeviceSample]

    def __len__(self) -> int:
        return len(self.samples)


class DeviceCrop:
    """``data.decode=device``, worker side: read the image size from the header, draw the box.

    JPEGs stay encoded; other formats are decoded here (the device decoder reads JPEG only), and
    PIL images (data sets held decoded) become uint8 tensors.
    """

    reads_bytes = True

    def __init__(self, in_chans: int, *, scale: Sequence[float] = (0.2, 1.0), hflip: bool = True) -> None:
        self.in_chans, self.scale, self.hflip = in_chans, tuple(scale), hflip

    def __call__(self, file: EncodedFile | Image.Image) -> DeviceSample:
        if not isinstance(file, EncodedFile) or not file.data.startswith(_JPEG_MAGIC):
            img = to_uint8(file, self.in_chans)
            where = file.where if isinstance(file, EncodedFile) else "an image"
            return DeviceSample(crop_box(img.shape[-2], img.shape[-1], self.scale, self.hflip), where, image=img)
        try:
            with Image.open(io.BytesIO(file.data)) as img:  # reads the header only
                width, height = img.size
        except Exception as e:
            raise CorruptImageError(f"cannot read image {file.where} ({type(e).__name__}: {e})") from None
        jpeg = torch.frombuffer(bytearray(file.data), dtype=torch.uint8)
        return DeviceSample(crop_box(height, width, self.scale, self.hflip), file.where, jpeg=jpeg)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scale={self.scale}, hflip={self.hflip})"


def collate_device(batch: list) -> tuple:
    """DataLoader ``collate_fn`` for ``((DeviceSample, noise), label)`` items."""
    samples = [item[0][0] for item in batch]
    noise = torch.stack([item[0][1] for item in batch])
    labels = torch.tensor([int(item[1]) for item in batch], dtype=torch.int64)
    return (DeviceBatch(samples), noise), labels


class DeviceAugment:
    """``data.decode=device``, training-process side: a :class:`DeviceBatch` -> normalised float
    (B, C, S, S) on ``device``.

    JPEGs are decoded in one ``decode_jpeg(list, device=device)`` call. Crop and resize are one
    ``torchvision.ops.roi_align`` per distinct image size (``aligned=True``: pixel centres at
    +0.5, as ``F.interpolate(align_corners=False)``; ``sampling_ratio=0``: ceil(crop / S) bilinear
    samples per output pixel and axis, averaged, so a downscale is area-filtered and an upscale is
    bilinear). The flip and the normalisation run on the whole batch. The resampling is not the
    bicubic of ``pil``/``torchvision``; the boxes, flips and masks are the same.
    """

    def __init__(self, img_size: int, mean: Sequence[float], std: Sequence[float], in_chans: int) -> None:
        self.img_size, self.in_chans = img_size, in_chans
        self.mean = torch.tensor(_match_channels(mean, in_chans))
        self.std = torch.tensor(_match_channels(std, in_chans))

    def decode(self, batch: DeviceBatch, device: torch.device) -> list[torch.Tensor]:
        """Each sample's uint8 (C, H, W) on ``device``."""
        from torchvision.io import ImageReadMode, decode_jpeg

        mode = ImageReadMode.GRAY if self.in_chans == 1 else ImageReadMode.RGB
        images: list[torch.Tensor | None] = [
            s.image.to(device, non_blocking=True) if s.image is not None else None for s in batch.samples]
        todo = [i for i, img in enumerate(images) if img is None]
        if todo:
            try:
                decoded = decode_jpeg([batch.samples[i].jpeg for i in todo], mode=mode, device=device)
            except RuntimeError:  # find the file: decode one by one, on the CPU where it fails
                decoded = [self._decode_one(batch.samples[i], mode, device) for i in todo]
            for i, img in zip(todo, decoded, strict=True):
                images[i] = img
        return images  # type: ignore[return-value]

    @staticmethod
    def _decode_one(sample: DeviceSample, mode, device: torch.device) -> torch.Tensor:
        from torchvision.io import decode_jpeg

        try:
            return decode_jpeg(sample.jpeg, mode=mode, device=device)
        except RuntimeError as e:
            raise CorruptImageError(f"cannot read image {sample.where} ({e})",
                                    "remove it, or use data.decode=torchvision (it skips unreadable files "
                                    "under data.on_corrupt=skip)") from None

    def __call__(self, batch: DeviceBatch, device: torch.device) -> torch.Tensor:
        from torchvision.ops import roi_align

        images = self.decode(batch, device)
        boxes = torch.stack([s.box for s in batch.samples])  # (B, 5): top, left, h, w, flip
        size = self.img_size
        out = torch.empty(len(images), self.in_chans, size, size, device=device)
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            by_shape.setdefault(tuple(img.shape[-2:]), []).append(i)
        for idx in by_shape.values():
            group = torch.stack([images[i] for i in idx]).float()
            b = boxes[idx].to(torch.float32)
            rois = torch.stack([torch.arange(len(idx), dtype=torch.float32), b[:, 1], b[:, 0],
                                b[:, 1] + b[:, 3], b[:, 0] + b[:, 2]], dim=1)
            out[torch.tensor(idx, device=device)] = roi_align(
                group, rois.to(device), (size, size), spatial_scale=1.0, sampling_ratio=0, aligned=True)
        flip = boxes[:, 4].bool().to(device)
        out = torch.where(flip.view(-1, 1, 1, 1), out.flip(-1), out)
        return _normalize(out, self.mean.to(device), self.std.to(device))
