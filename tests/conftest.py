"""Shared fixtures: tiny models and configs that run in well under a second on a CPU."""

from __future__ import annotations

import pytest
import torch

from mimkit.config import load_config, to_dict
from mimkit.engine.checkpoint import atomic_save
from mimkit.models import model_from_config
from mimkit.models.mae import build_model

TINY_MODEL = dict(embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
                  decoder_num_heads=2)
TINY_OVERRIDES = [
    "data.name=synthetic", "data.synthetic_size=64", "data.num_workers=0",
    "model.arch=vit_tiny_small_images", "model.img_size=16", "model.in_chans=1",
    "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.decoder_embed_dim=32",
    "model.decoder_depth=1", "model.decoder_num_heads=2",
    "train.batch_size=8", "train.warmup_epochs=1", "train.blr=1e-3", "train.epochs=2",
]


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return build_model("vit_tiny_small_images", img_size=16, in_chans=1, **TINY_MODEL)


@pytest.fixture
def tiny_overrides():
    return list(TINY_OVERRIDES)


# --- evaluation and interoperability: RGB tiny model, trainer-style checkpoints ---
EVAL_TINY = [
    "model.arch=vit_tiny_small_images", "model.img_size=16", "model.in_chans=3",
    "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
    "model.decoder_embed_dim=16", "model.decoder_depth=1", "model.decoder_num_heads=2",
    "data.name=synthetic", "data.synthetic_size=120", "data.num_workers=0",
    "eval.batch_size=64", "eval.linprobe.epochs=5", "eval.linprobe.warmup_epochs=1",
    "eval.finetune.max_steps=2", "eval.finetune.batch_size=16", "eval.finetune.warmup_epochs=0",
]


def tiny_config(*extra: str):
    return load_config(None, [*EVAL_TINY, *extra])


def save_mimkit_checkpoint(path, cfg, seed: int = 0, teacher_seed: int | None = None) -> dict:
    """A checkpoint with the keys the trainer writes (format mimkit-v1)."""
    torch.manual_seed(seed)
    model = model_from_config(cfg)
    state = {"step": 1, "config": to_dict(cfg), "model": model.state_dict(), "arch": model.arch,
             "norm_pix_loss": cfg.norm_pix_loss, "method": cfg.method, "format": "mimkit-v1"}
    if teacher_seed is not None:  # RC-MAE style: "model" holds the evaluation (teacher) weights
        torch.manual_seed(teacher_seed)
        teacher = model_from_config(cfg).state_dict()
        state.update(student=model.state_dict(), teacher=teacher, model=teacher)
    atomic_save(state, path)
    return state


@pytest.fixture
def tiny_cfg():
    return tiny_config()


@pytest.fixture
def tiny_ckpt(tmp_path, tiny_cfg):
    path = tmp_path / "run" / "checkpoint-00000001.pt"
    path.parent.mkdir()
    save_mimkit_checkpoint(path, tiny_cfg)
    return path


@pytest.fixture
def make_cfg():
    """``make_cfg('key=value', ...)``: the tiny config with extra overrides."""
    return tiny_config


@pytest.fixture
def save_ckpt():
    """``save_ckpt(path, cfg, seed=0, teacher_seed=None)`` writes a trainer-style checkpoint."""
    return save_mimkit_checkpoint


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread; more threads only contend on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
