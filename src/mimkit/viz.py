"""Reconstruction grids: original | masked | reconstruction | reconstruction + visible patches."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torchvision.utils import save_image

from mimkit.models.mae import MaskedAutoencoderViT


@torch.no_grad()
def reconstruct(model: MaskedAutoencoderViT, imgs: torch.Tensor, noise: torch.Tensor | None = None,
                pred: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> dict:
    """Images (normalized space) for the four columns; ``pred``/``mask`` may come from a method.

    With a norm-pix target the prediction lives in per-patch normalized space: it is mapped back
    with each true patch's mean and std (a visualisation only, as in the MAE demo).
    """
    if pred is None or mask is None:
        out = model(imgs, noise=noise)
        pred, mask = out.pred, out.mask
    pred = pred.float()
    if model.norm_pix_loss:
        target = model.patchify(imgs)
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1.0e-6) ** 0.5 + mean
    recon = model.unpatchify(pred)
    m = mask.unsqueeze(-1).expand(-1, -1, model.patch_size**2 * model.in_chans)
    m = model.unpatchify(m)  # 1 = masked, in image layout
    return {
        "original": imgs,
        "masked": imgs * (1 - m),
        "reconstruction": recon,
        "pasted": imgs * (1 - m) + recon * m,
        "pixel_mask": m,
    }


def to_pixels(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo ``Normalize(mean, std)`` and clamp to [0, 1]."""
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x * std_t + mean_t).clamp(0, 1)


def save_reconstruction_grid(model: MaskedAutoencoderViT, imgs: torch.Tensor, path: str | Path,
                             mean: Sequence[float], std: Sequence[float],
                             noise: torch.Tensor | None = None, upscale: int = 1) -> Path:
    """One row per image, four columns; masked patches shown grey."""
    was_training = model.training
    model.eval()
    cols = reconstruct(model, imgs, noise)
    model.train(was_training)
    grey = 0.5
    masked = to_pixels(cols["masked"], mean, std) * (1 - cols["pixel_mask"]) + grey * cols["pixel_mask"]
    panels = [to_pixels(cols["original"], mean, std), masked,
              to_pixels(cols["reconstruction"], mean, std), to_pixels(cols["pasted"], mean, std)]
    grid = torch.stack(panels, dim=1).flatten(0, 1)  # row-major: image i, columns 0..3
    if upscale > 1:
        grid = torch.nn.functional.interpolate(grid, scale_factor=upscale, mode="nearest")
    if grid.shape[1] == 1:
        grid = grid.expand(-1, 3, -1, -1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid.cpu(), path, nrow=4, padding=2, pad_value=1.0)
    return path


def load_images(sources: Sequence[str | Path], model: MaskedAutoencoderViT, mean: Sequence[float],
                std: Sequence[float], limit: int = 8, on_corrupt: str = "error") -> torch.Tensor:
    """Image files, or folders searched recursively, as a normalized batch for ``model``.

    Unreadable images raise a :class:`~mimkit.errors.DataError` naming the file, or with
    ``on_corrupt="skip"`` are skipped with a warning (as ``data.on_corrupt`` does in training).
    """
    import logging

    from mimkit.data import IMAGE_EXTENSIONS, CorruptImageError, eval_transform, load_image
    from mimkit.errors import DataError

    files: list[Path] = []
    for src in sources:
        src = Path(src)
        if src.is_dir():
            files += sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        elif src.is_file():
            files.append(src)
        else:
            raise DataError(f"--images: no such image file or folder: {src}")
    if not files:
        raise DataError(f"--images: no images ({', '.join(IMAGE_EXTENSIONS)}) in {', '.join(map(str, sources))}")
    tf = eval_transform(model.img_size[0], mean, std, model.in_chans)
    mode = "L" if model.in_chans == 1 else "RGB"
    batch = []
    for f in files:
        if len(batch) == limit:
            break
        try:
            batch.append(tf(load_image(f, mode)))
        except CorruptImageError as e:
            if on_corrupt != "skip":
                raise DataError(f"{e.what}; remove it, or pass --on-corrupt skip") from None
            logging.getLogger("mimkit").warning("--on-corrupt skip: skipping %s", e.what)
    if not batch:
        raise DataError(f"--images: none of the {len(files)} images could be read")
    return torch.stack(batch)
