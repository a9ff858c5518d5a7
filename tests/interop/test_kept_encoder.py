"""The encoder kept in the repository (docs/results/ft100/encoder80/, the 80-epoch pre-training
behind the 100 %-label fine-tuning numbers) stays what its record says and loads with its config."""

import hashlib
import json
from pathlib import Path

import torch

from mimkit.config import load_config
from mimkit.interop.convert import init_from
from mimkit.models import model_from_config

KEPT = Path(__file__).resolve().parents[2] / "docs/results/ft100/encoder80"


def test_the_kept_encoder_matches_its_record_and_fits_its_config():
    file = KEPT / "encoder.safetensors"
    record = json.loads((KEPT / "pretrain_knn_val.json").read_text())
    assert hashlib.sha256(file.read_bytes()).hexdigest() == record["encoder_safetensors_sha256"]
    cfg = load_config(KEPT / "config.yaml")
    torch.manual_seed(0)
    model = model_from_config(cfg)
    before = model.blocks[0].attn.qkv.weight.clone()
    w = init_from(model, file)
    assert w.encoder_only and w.source == "safetensors"
    assert not torch.equal(model.blocks[0].attn.qkv.weight, before)
    tokens = model.forward_encoder(torch.zeros(2, 1, 32, 32))
    assert tokens.shape == (2, 1 + 64, 128) and torch.isfinite(tokens).all()
