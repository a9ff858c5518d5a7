import os
import pickle

import pytest
import torch

import mimkit
from mimkit.cli import main
from mimkit.engine.checkpoint import CheckpointError, load_file


class Evil:
    """Unpickling this would create a folder: the side effect must never happen."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("loader", [mimkit.load_model, mimkit.load_encoder])
def test_truncated_checkpoint(tiny_ckpt, tmp_path, loader):
    data = tiny_ckpt.read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        loader(bad)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickles_are_refused(tmp_path, capsys):
    for i, write in enumerate([lambda p, obj: p.write_bytes(pickle.dumps(obj)),
                               lambda p, obj: torch.save({"model": obj}, p)]):
        marker = tmp_path / f"pwned{i}"
        path = tmp_path / f"evil{i}.pt"
        write(path, Evil(marker))
        with pytest.raises(CheckpointError, match="refused for safety"):
            mimkit.load_model(path)
        assert main(["export", "--checkpoint", str(path), "--format", "timm", "--out",
                     str(tmp_path / "x.safetensors")]) == 2
        assert "refused for safety" in capsys.readouterr().err
        assert not marker.exists()


def test_random_bytes_and_foreign_content(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError):
        mimkit.load_model(junk)
    fake_st = tmp_path / "fake.safetensors"  # safetensors-like header, broken body
    fake_st.write_bytes((64).to_bytes(8, "little") + b'{"a": {"dtype": "F32", "shape": [4]' + b"\0" * 10)
    with pytest.raises(CheckpointError, match="safetensors"):
        mimkit.load_model(fake_st)
    plain = tmp_path / "plain.pt"
    torch.save({"epoch": 3, "lr": 0.1}, plain)
    with pytest.raises(CheckpointError, match="not a mimkit or official"):
        mimkit.load_model(plain)


def test_truncated_safetensors(tiny_ckpt, tmp_path):
    out = tmp_path / "w.safetensors"
    assert main(["export", "--checkpoint", str(tiny_ckpt), "--format", "safetensors", "--out", str(out)]) == 0
    data = out.read_bytes()
    out.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        mimkit.load_encoder(out)


def test_rcmae_exports_teacher_by_default(make_cfg, save_ckpt, tmp_path):
    cfg = make_cfg()
    ckpt = tmp_path / "rcmae.pt"
    state = save_ckpt(ckpt, cfg, seed=0, teacher_seed=1)
    for flag, expect in (([], "teacher"), (["--weights", "student"], "student"),
                         (["--weights", "teacher"], "teacher")):
        out = tmp_path / f"{expect}{len(flag)}.pth"
        assert main(["export", "--checkpoint", str(ckpt), "--format", "mae", "--out", str(out), *flag]) == 0
        got = load_file(out)["model"]
        assert torch.equal(got["blocks.0.attn.qkv.weight"], state[expect]["blocks.0.attn.qkv.weight"])
    assert not torch.equal(state["teacher"]["blocks.0.attn.qkv.weight"], state["student"]["blocks.0.attn.qkv.weight"])
