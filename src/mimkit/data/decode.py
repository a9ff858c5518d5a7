"""Where pre-training images are decoded and augmented (``data.decode``).

* ``pil`` (default): the workers decode with Pillow and augment the PIL image
  (:func:`~mimkit.data.transforms.pretrain_transform`: RandomResizedCrop, bicubic, then flip).
* ``torchvision``: the workers decode with ``torchvision.io.decode_image`` into a uint8 tensor
  and crop, resize (bicubic, antialiased) and flip it with ``torchvision.transforms.v2``'s
  functional ops: no PIL image and no ``ToTensor``, about 1.6× the images per core of ``pil``
  (``mimkit bench --jpeg``).
* ``device``: the workers only read the file's bytes and its size (the JPEG header); the
  training process draws every sample's crop, flip and mask for the whole batch at once
  (:func:`batch_uniforms`), the training device decodes the batch
  (``torchvision.io.decode_jpeg(list, device=...)``: nvJPEG on CUDA) and crops and resizes it
  there: one resize kernel per distinct image size (:class:`DeviceAugment`). Non-JPEG files
  (and CMYK JPEGs) are decoded in the workers and cropped and resized on the device. Meant for
  CUDA, where the CPU cores cannot keep up with the step; on a CPU it works, but decodes in the
  training process. Pixel values depend on the decoder (nvJPEG or libjpeg-turbo), so an exact
  resume needs the same kind of device.

Data sets that hold decoded images (Fashion-MNIST, CIFAR, synthetic, Python) hand the
transforms a PIL image: ``torchvision`` and ``device`` then choose only where and how the
augmentation runs (``device``: the worker converts the image to a uint8 tensor, nothing more).

Every path is seeded per sample, so a sample's crop, flip and mask depend only on
(``train.seed``, epoch, index), never on the batch, the workers or the processes, and a resumed
run sees exactly the batches it would have. ``pil`` and ``torchvision`` draw them from the
per-sample seeded global RNG (:class:`~mimkit.data.datasets.SeededDataset`) in the same order
(``RandomResizedCrop.get_params``, none for ``crop_scale=[1, 1]``, one ``torch.rand(1)`` for the
flip, then the masking noise),
so they crop the same boxes and mask the same patches. ``device`` draws them from a counter-based
hash of (seed, epoch, index, draw), vectorised over the batch: the same distributions, other
values, and no per-sample RNG set-up in the workers.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision import transforms as T

from .datasets import CorruptImageError, EncodedFile, SeededDataset, _match_channels
from .transforms import is_whole_image, whole_image_box

_JPEG_MAGIC = b"\xff\xd8\xff"
# torchvision 0.29 marks its image codecs deprecated in favour of TorchCodec (not a dependency here).
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


def crop_box(height: int, width: int, scale: Sequence[float], hflip: bool) -> torch.Tensor:
    """``[top, left, h, w, flip]`` of RandomResizedCrop (ratio 3/4..4/3; ``scale`` (1, 1): the whole
    image, no draw) and the flip, drawn from torch's global RNG exactly as
    :func:`~mimkit.data.transforms.pretrain_transform` draws them."""
    if is_whole_image(scale):  # no random crop, no draw (WholeImage)
        top, left, h, w = whole_image_box(height, width)
    else:
        size_only = torch.empty(1, 1, 1).expand(1, height, width)  # get_params reads the shape only
        top, left, h, w = T.RandomResizedCrop.get_params(size_only, list(scale), [3 / 4, 4 / 3])
    flip = bool(hflip and torch.rand(1) < 0.5)
    return torch.tensor([top, left, h, w, int(flip)], dtype=torch.int64)


def to_uint8(img: EncodedFile | Image.Image, in_chans: int) -> torch.Tensor:
    """uint8 (C, H, W) of a file's bytes (:func:`decode_bytes`) or of a decoded PIL image."""
    if isinstance(img, EncodedFile):
        return decode_bytes(img, in_chans)
    from torchvision.transforms.functional import pil_to_tensor

    mode = "L" if in_chans == 1 else "RGB"
    return pil_to_tensor(img if img.mode == mode else img.convert(mode))


def decode_bytes(file: EncodedFile, in_chans: int) -> torch.Tensor:
    """uint8 (C, H, W) of one file: ``torchvision.io.decode_image`` (JPEG, PNG, WebP, GIF), Pillow
    for the other formats and for what ``decode_image`` returns otherwise than the ``pil`` path
    would (16-bit PNGs, animated GIFs, GIF/WebP that ignore the gray mode); a
    :class:`CorruptImageError` names the file when neither can read it."""
    from torchvision.io import ImageReadMode, decode_image

    if not file.data:
        raise CorruptImageError(f"cannot read image {file.where} (empty file)")
    mode = ImageReadMode.GRAY if in_chans == 1 else ImageReadMode.RGB
    try:
        img = decode_image(torch.frombuffer(bytearray(file.data), dtype=torch.uint8), mode=mode)
        if img.dtype == torch.uint8 and img.dim() == 3 and img.shape[0] == in_chans:
            return img
    except RuntimeError:
        pass  # a format torchvision does not read (BMP, TIFF), or a broken file: Pillow decides
    try:
        with Image.open(io.BytesIO(file.data)) as img:
            return to_uint8(img, in_chans)
    except Exception as e:  # PIL raises many types on corrupt files
        raise CorruptImageError(f"cannot read image {file.where} ({type(e).__name__}: {e})") from None


def _normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(x / 255 - mean) / std per channel, for float x in [0, 255]."""
    return (x / 255.0 - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)


class TensorCrop:
    """``data.decode=torchvision``: an :class:`EncodedFile` (or a PIL image) -> normalised float
    (C, S, S).

    ``decode_image`` (or ``pil_to_tensor``), then ``v2.functional.resized_crop`` (bicubic,
    antialiased, rounded back to uint8 as a uint8 image is) and ``horizontal_flip`` on the uint8
    tensor, then scale and normalise.
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


# --------------------------------------------------------------------------------------------
# data.decode=device: per-sample draws for a whole batch, decoding and cropping on the device
# --------------------------------------------------------------------------------------------

_M32 = 0xFFFF_FFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32) held in int64, without overflowing int64."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (xor-shift-multiply, "lowbias32"): every input bit affects every
    output bit. Integer ops on int64 tensors only, so the result is the same on any device."""
    x = x & _M32
    x = _mul32(x ^ (x >> 16), 0x7FEB352D)
    x = _mul32(x ^ (x >> 15), 0x846CA68B)
    return x ^ (x >> 16)


def batch_uniforms(seed: int, epoch: int, index: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n) uniforms in [0, 1) (24-bit) for samples ``index`` of ``epoch``: draw ``j`` of sample
    ``i`` is a hash of (seed, epoch, i, j) alone, so it does not depend on the batch."""
    key = _hash32(torch.tensor([(seed ^ (seed >> 32)) & _M32]))
    key = _hash32(key ^ (epoch & _M32))
    per_sample = _hash32(key ^ (index.to(torch.int64).view(-1, 1) & _M32))
    draws = _hash32(per_sample ^ _hash32(torch.arange(n, dtype=torch.int64) + 0x5BD1E995))
    return (draws >> 8).to(torch.float32) / float(1 << 24)


_CROP_TRIES = 10  # as RandomResizedCrop.get_params
CROP_CHUNK_PIXELS = 1 << 26  # input pixels per roi_align call: 64 M (256 MiB per channel in float32)


def batch_crop_boxes(u: torch.Tensor, height: torch.Tensor, width: torch.Tensor, scale: Sequence[float],
                     hflip: bool) -> torch.Tensor:
    """``[top, left, h, w, flip]`` (B, 5) of RandomResizedCrop (ratio 3/4..4/3, up to 10 tries,
    then the centre crop of the clamped ratio, as ``get_params``) and the flip, from the uniforms
    ``u`` (B, 4 * 10 + 1): tries' area, log-ratio, top, left, then the flip."""
    import math

    H, W = height.to(torch.float64).view(-1, 1), width.to(torch.float64).view(-1, 1)
    k = _CROP_TRIES
    u = u.to(torch.float64)
    area = H * W * (scale[0] + (scale[1] - scale[0]) * u[:, :k])
    lo, hi = math.log(3 / 4), math.log(4 / 3)
    ratio = torch.exp(lo + (hi - lo) * u[:, k:2 * k])
    w = torch.round(torch.sqrt(area * ratio))
    h = torch.round(torch.sqrt(area / ratio))
    ok = (w > 0) & (w <= W) & (h > 0) & (h <= H) & (not is_whole_image(scale))  # [1, 1]: whole image
    first = torch.where(ok.any(1), ok.to(torch.int8).argmax(1), torch.full_like(ok[:, 0], -1, dtype=torch.int64))
    rows = torch.arange(len(u))
    pick = first.clamp_min(0)
    ch, cw = h[rows, pick], w[rows, pick]
    top = torch.floor(u[rows, 2 * k + pick] * (H[:, 0] - ch + 1))
    left = torch.floor(u[rows, 3 * k + pick] * (W[:, 0] - cw + 1))
    # No try fits: the whole image at the ratio clamped to [3/4, 4/3], centred (get_params' fallback).
    in_ratio = W[:, 0] / H[:, 0]
    fw = torch.where(in_ratio > 4 / 3, torch.round(H[:, 0] * 4 / 3), W[:, 0])
    fh = torch.where(in_ratio < 3 / 4, torch.round(W[:, 0] / (3 / 4)), H[:, 0])
    fallback = first < 0
    ch, cw = torch.where(fallback, fh, ch), torch.where(fallback, fw, cw)
    top = torch.where(fallback, torch.div(H[:, 0] - ch, 2, rounding_mode="floor"), top)
    left = torch.where(fallback, torch.div(W[:, 0] - cw, 2, rounding_mode="floor"), left)
    flip = (u[:, 4 * k] < 0.5) & hflip
    return torch.stack([top, left, ch, cw, flip.to(torch.float64)], 1).to(torch.int64)


@dataclass
class DeviceSample:
    """One image for :class:`DeviceAugment`: JPEG bytes (``jpeg``) or, for other formats and data
    sets held decoded, the uint8 image (``image``); its size; and, once the data set has set
    them, its ``index`` and ``epoch`` (what its draws are seeded with)."""

    height: int
    width: int
    where: str
    jpeg: torch.Tensor | None = None
    image: torch.Tensor | None = None
    index: int = -1
    epoch: int = 0


class DeviceCrop:
    """``data.decode=device``, worker side: the file's bytes and size (header only) for JPEGs;
    other formats are decoded here (the device decoder reads JPEG only), and PIL images (data sets
    held decoded) become uint8 tensors."""

    reads_bytes = True

    def __init__(self, in_chans: int) -> None:
        self.in_chans = in_chans

    def __call__(self, file: EncodedFile | Image.Image) -> DeviceSample:
        if isinstance(file, EncodedFile) and file.data.startswith(_JPEG_MAGIC):
            try:
                with Image.open(io.BytesIO(file.data)) as img:  # reads the header only
                    (width, height), mode = img.size, img.mode
            except Exception as e:
                raise CorruptImageError(f"cannot read image {file.where} ({type(e).__name__}: {e})") from None
            if mode in ("L", "RGB"):  # what nvJPEG reads; CMYK/YCCK JPEGs are decoded here instead
                return DeviceSample(height, width, file.where,
                                    jpeg=torch.frombuffer(bytearray(file.data), dtype=torch.uint8))
        img = to_uint8(file, self.in_chans)
        where = file.where if isinstance(file, EncodedFile) else "an image"
        return DeviceSample(img.shape[-2], img.shape[-1], where, image=img)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(in_chans={self.in_chans})"


class DeviceDataset(SeededDataset):
    """The pre-training set of ``data.decode=device``: ``ds[i]`` is ``(DeviceSample, label)`` with
    the sample's index and the current epoch filled in. No RNG is seeded per sample here: the
    draws come later, for the whole batch, from (seed, epoch, index) (:class:`DeviceAugment`)."""

    def __getitem__(self, index: int) -> tuple:
        if index < 0:
            index += len(self)
        sample, label = self.dataset[index]
        sample.index, sample.epoch = index, self.epoch
        return sample, label


@dataclass
class DeviceBatch:
    """A batch of :class:`DeviceSample` packed for the trip from a worker: every sample's bytes
    (JPEG) or pixels (uint8 image) in one flat ``payload`` tensor, and ``meta`` (B, 6):
    index, epoch, height, width, is-JPEG, payload length. (A list of small tensors would cost one
    shared-memory transfer each.)"""

    payload: torch.Tensor
    meta: torch.Tensor
    where: list[str]

    @classmethod
    def of(cls, samples: Sequence[DeviceSample]) -> DeviceBatch:
        parts = [s.jpeg if s.jpeg is not None else s.image.reshape(-1) for s in samples]
        meta = torch.tensor([[s.index, s.epoch, s.height, s.width, int(s.jpeg is not None), len(part)]
                             for s, part in zip(samples, parts, strict=True)], dtype=torch.int64)
        return cls(torch.cat(parts), meta, [s.where for s in samples])

    def __len__(self) -> int:
        return len(self.meta)

    def pin_memory(self) -> DeviceBatch:
        """Page-locked copy (the DataLoader's ``pin_memory=True`` calls it): faster host-to-GPU copies."""
        return DeviceBatch(self.payload.pin_memory(), self.meta, self.where)

    def parts(self) -> list[torch.Tensor]:
        """Each sample's slice of ``payload`` (views, no copy)."""
        return list(torch.split(self.payload, self.meta[:, 5].tolist()))


def collate_device(batch: list) -> tuple:
    """DataLoader ``collate_fn`` for ``(DeviceSample, label)`` items: ``((DeviceBatch, None), labels)``,
    the trainer's ``((images, noise), labels)`` shape, the noise still to be drawn."""
    labels = torch.tensor([int(item[1]) for item in batch], dtype=torch.int64)
    return (DeviceBatch.of([item[0] for item in batch]), None), labels


class DeviceAugment:
    """``data.decode=device``, training-process side: a :class:`DeviceBatch` -> (normalised float
    images (B, C, S, S), masking noise (B, L)) on ``device``.

    Draws: :func:`batch_uniforms` per sample: the RandomResizedCrop tries, the flip, then ``L``
    noise values (:func:`batch_crop_boxes`). JPEGs are decoded in one ``decode_jpeg(list,
    device=device)`` call. Crop and resize are one ``torchvision.ops.roi_align`` per distinct
    image size (``aligned=True``: pixel centres at +0.5, as ``F.interpolate(align_corners=False)``;
    ``sampling_ratio=0``: ceil(crop / S) bilinear samples per output pixel and axis, averaged, so
    a downscale is area-filtered and an upscale is bilinear). The flip and the normalisation run
    on the whole batch. The resampling is not the bicubic of ``pil``/``torchvision``.
    """

    def __init__(self, img_size: int, mean: Sequence[float], std: Sequence[float], in_chans: int, *,
                 num_patches: int, seed: int, scale: Sequence[float] = (0.2, 1.0), hflip: bool = True) -> None:
        self.img_size, self.in_chans, self.num_patches, self.seed = img_size, in_chans, num_patches, seed
        self.scale, self.hflip = tuple(scale), hflip
        self.mean = torch.tensor(_match_channels(mean, in_chans))
        self.std = torch.tensor(_match_channels(std, in_chans))
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def draws(self, batch: DeviceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(boxes (B, 5), noise (B, L)) of the batch's samples, on the CPU."""
        index, epoch, height, width = batch.meta[:, :4].T
        if (epoch != epoch[0]).any() or (index < 0).any():
            raise ValueError("a DeviceBatch comes from one epoch of a DeviceDataset")
        n_box = 4 * _CROP_TRIES + 1
        u = batch_uniforms(self.seed, int(epoch[0]), index, n_box + self.num_patches)
        return batch_crop_boxes(u[:, :n_box], height, width, self.scale, self.hflip), u[:, n_box:].contiguous()

    def decode(self, batch: DeviceBatch, device: torch.device) -> list[torch.Tensor]:
        """Each sample's uint8 (C, H, W) on ``device``.

        On CUDA the host first waits for the work already queued: torchvision's nvJPEG decode runs
        on its own stream and can otherwise write into memory the queued step still uses
        (pytorch/vision#9606). A JPEG the device decoder refuses (an unusual encoding) is decoded on
        the CPU; only a file no decoder reads stops the run, named.
        """
        from torchvision.io import ImageReadMode, decode_jpeg

        mode = ImageReadMode.GRAY if self.in_chans == 1 else ImageReadMode.RGB
        parts, is_jpeg = batch.parts(), batch.meta[:, 4].tolist()
        heights, widths = batch.meta[:, 2].tolist(), batch.meta[:, 3].tolist()
        images: list[torch.Tensor | None] = [
            None if jpeg else part.view(-1, h, w).to(device, non_blocking=True)
            for part, jpeg, h, w in zip(parts, is_jpeg, heights, widths, strict=True)]
        todo = [i for i, jpeg in enumerate(is_jpeg) if jpeg]
        if todo:
            if device.type == "cuda":
                torch.cuda.current_stream(device).synchronize()
            try:
                decoded = decode_jpeg([parts[i] for i in todo], mode=mode, device=device)
            except torch.cuda.OutOfMemoryError:
                raise
            except RuntimeError:  # one file the device decoder refuses: decode one by one
                decoded = [self._decode_one(parts[i], batch.where[i], mode, device) for i in todo]
            for i, img in zip(todo, decoded, strict=True):
                if tuple(img.shape[-2:]) != (heights[i], widths[i]):
                    raise CorruptImageError(f"cannot read image {batch.where[i]} (decoded {tuple(img.shape[-2:])}, "
                                            f"header says {(heights[i], widths[i])})")
                images[i] = img.to(device, non_blocking=True)  # decoders put other devices' images on the CPU
        return images  # type: ignore[return-value]

    @staticmethod
    def _decode_one(data: torch.Tensor, where: str, mode, device: torch.device) -> torch.Tensor:
        from torchvision.io import decode_jpeg

        try:
            return decode_jpeg(data, mode=mode, device=device)
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError:
            pass
        try:  # the CPU decoder reads more encodings than nvJPEG
            return decode_jpeg(data, mode=mode).to(device)
        except RuntimeError as e:
            raise CorruptImageError(f"cannot read image {where} ({e})",
                                    "remove it, or use data.decode=torchvision (it skips unreadable files "
                                    "under data.on_corrupt=skip)") from None

    def crop(self, images: list[torch.Tensor], boxes: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Normalised float (B, C, S, S): each image's box resized to S x S, flipped where asked.

        Images of one size are stacked and resized by one ``roi_align``, in chunks of at most
        :data:`CROP_CHUNK_PIXELS` input pixels (a batch of large photos stays within memory).
        """
        from torchvision.ops import roi_align

        size = self.img_size
        out = torch.empty(len(images), self.in_chans, size, size, device=device)
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            by_shape.setdefault(tuple(img.shape[-2:]), []).append(i)
        for (h, w), same in by_shape.items():
            step = max(1, CROP_CHUNK_PIXELS // (h * w))
            for idx in (same[k:k + step] for k in range(0, len(same), step)):
                group = torch.stack([images[i] for i in idx]).float()
                b = boxes[idx].to(torch.float32)
                rois = torch.stack([torch.arange(len(idx), dtype=torch.float32), b[:, 1], b[:, 0],
                                    b[:, 1] + b[:, 3], b[:, 0] + b[:, 2]], dim=1)
                out[torch.tensor(idx).to(device)] = roi_align(
                    group, rois.to(device), (size, size), spatial_scale=1.0, sampling_ratio=0, aligned=True)
        flip = boxes[:, 4].bool().to(device)
        out = torch.where(flip.view(-1, 1, 1, 1), out.flip(-1), out)
        if device not in self._stats:
            self._stats[device] = (self.mean.to(device), self.std.to(device))
        return _normalize(out, *self._stats[device])

    def __call__(self, batch: DeviceBatch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        boxes, noise = self.draws(batch)
        return self.crop(self.decode(batch, device), boxes, device), noise.to(device, non_blocking=True)
