"""``train.init_from``: pre-training that starts from existing weights (continued or
domain-adaptive pre-training), in any format mimkit reads, with the config's architecture."""

import pytest
import torch

from mimkit.cli import main
from mimkit.config import ConfigError, load_config
from mimkit.engine.checkpoint import list_checkpoints, load_file
from mimkit.interop.convert import init_from
from mimkit.interop.official import to_official
from mimkit.models import model_from_config


def fresh(cfg, seed: int = 0):
    torch.manual_seed(seed)
    return model_from_config(cfg)


def test_a_run_checkpoint_sets_every_tensor(tmp_path, make_cfg, save_ckpt):
    cfg = make_cfg()
    ckpt = save_ckpt(tmp_path / "a.pt", cfg, seed=3)
    model = fresh(cfg)
    assert init_from(model, tmp_path / "a.pt").source == "mimkit"
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["model"][k]), k


def test_an_encoder_only_file_keeps_the_models_own_decoder(tmp_path, make_cfg):
    cfg = make_cfg()
    torch.save(to_official(fresh(cfg, seed=3), encoder_only=True), tmp_path / "enc.pth")
    model, before = fresh(cfg), fresh(cfg).state_dict()
    file = torch.load(tmp_path / "enc.pth", weights_only=True)["model"]
    assert init_from(model, tmp_path / "enc.pth").encoder_only
    for k, v in model.state_dict().items():
        want = before[k] if k.startswith(("decoder", "mask_token")) else file[k]
        assert torch.equal(v, want), k
    assert not torch.equal(model.blocks[0].attn.qkv.weight, before["blocks.0.attn.qkv.weight"])


def test_position_tables_follow_the_models_grid(tmp_path, make_cfg, save_ckpt):
    save_ckpt(tmp_path / "16px.pt", make_cfg(), seed=3)  # a 4x4 grid
    model = fresh(make_cfg("model.img_size=32"))  # an 8x8 grid
    init_from(model, tmp_path / "16px.pt")
    assert model.pos_embed.shape[1] == 65
    src = load_file(tmp_path / "16px.pt")["model"]
    assert torch.equal(model.blocks[1].mlp.fc1.weight, src["blocks.1.mlp.fc1.weight"])


@pytest.mark.parametrize("change, words", [
    ("model.embed_dim=48", "cls_token is (1, 1, 32), the configured model's (1, 1, 48)"),
    ("model.depth=3", "lacks 'blocks.2."),
    ("model.decoder_depth=0", "has 'decoder_blocks.0."),
])
def test_a_file_that_does_not_fit_names_the_tensor_and_the_fix(tmp_path, make_cfg, save_ckpt, change, words):
    save_ckpt(tmp_path / "a.pt", make_cfg(), seed=3)
    with pytest.raises(ConfigError, match="train.init_from") as e:
        init_from(fresh(make_cfg(change)), tmp_path / "a.pt")
    assert words in str(e.value) and "embed_dim=32" in str(e.value) and "\n" not in str(e.value)


def test_pretraining_starts_from_the_file_and_resumes_from_its_own_checkpoints(tmp_path, tiny_overrides):
    first = tmp_path / "first"
    assert main(["pretrain", "--out", str(first), *tiny_overrides, "train.max_steps=3"]) == 0
    src = list_checkpoints(first)[-1][1]
    # blr 0: the weights cannot move, so the second run's checkpoint holds exactly the file's weights
    second = tmp_path / "second"
    assert main(["pretrain", "--out", str(second), *tiny_overrides, "train.max_steps=2", "train.blr=0",
                 f"train.init_from={src}"]) == 0
    got, want = (load_file(p)["model"] for p in (list_checkpoints(second)[-1][1], src))
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert load_config(None, [*tiny_overrides, f"train.init_from={src}"]).train.init_from == str(src)
    src.unlink()  # a resumed run reads its own checkpoint, not the file it started from
    assert main(["pretrain", "--out", str(second), "--resume", "train.max_steps=3"]) == 0


def test_a_file_that_does_not_fit_exits_2_before_the_run_folder_is_written(tmp_path, tiny_overrides, capsys):
    first = tmp_path / "first"
    assert main(["pretrain", "--out", str(first), *tiny_overrides, "train.max_steps=1"]) == 0
    src = list_checkpoints(first)[-1][1]
    out = tmp_path / "second"
    assert main(["pretrain", "--out", str(out), *tiny_overrides, "model.embed_dim=48",
                 f"train.init_from={src}"]) == 2
    assert "train.init_from" in capsys.readouterr().err
    assert not (out / "config.yaml").exists() and not list_checkpoints(out)
    assert main(["pretrain", "--out", str(tmp_path / "third"), *tiny_overrides,
                 f"train.init_from={tmp_path / 'missing.pt'}"]) == 2
