"""docs/adding-a-method.md: its example method, registered at test time, trains through the
real trainer, alone and under a wrapper; nothing outside the registry had to change."""

import re
import types
from pathlib import Path

import pytest
import torch

from mimkit.config import ConfigError, load_config
from mimkit.engine.checkpoint import list_checkpoints, load_file
from mimkit.engine.logging import read_metrics
from mimkit.engine.trainer import pretrain
from mimkit.models import model_from_config
from mimkit.objectives import BASES, EMATeacher, build_objective, parse_method
from mimkit.objectives.base import Objective
from tests.conftest import TINY_OVERRIDES

DOC = Path(__file__).parents[2] / "docs" / "adding-a-method.md"


def doc_module() -> types.ModuleType:
    """The page's first Python block, run as a module (the example is the code tested here)."""
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    module = types.ModuleType("l1mae")
    exec(compile(code, str(DOC), "exec"), module.__dict__)
    return module


@pytest.fixture
def l1mae(monkeypatch):
    cls = doc_module().L1MAE
    assert issubclass(cls, Objective)
    monkeypatch.setitem(BASES, "l1mae", cls)  # the docs' "registry line", undone after the test
    return cls


def test_unregistered_method_is_refused():
    with pytest.raises(ConfigError, match="unknown 'l1mae'"):
        parse_method("l1mae")


@pytest.mark.parametrize("method", ["l1mae", "l1mae+rcmae"])
def test_registered_toy_method_trains(l1mae, method, tmp_path):
    over = [*TINY_OVERRIDES, f"method={method}", "train.max_steps=6", "train.checkpoint_every=3",
            "train.batch_size=8", "train.loggers=[]"]
    cfg = load_config(None, over)
    objective = build_objective(cfg, model_from_config(cfg))
    assert isinstance(objective, EMATeacher if "+" in method else l1mae)

    run = pretrain(cfg, tmp_path / "run")
    rows = [r for r in read_metrics(run) if "loss_rec" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(torch.isfinite(torch.tensor(r["loss_rec"])) for r in rows)
    assert all("loss_mse" in r for r in rows)  # the method's own terms are logged
    if "+" in method:
        assert all("loss_teacher" in r for r in rows)
    ckpt = load_file(list_checkpoints(run)[-1][1])
    assert ckpt["step"] == 6 and ckpt["method"] == method
    assert ("teacher" in ckpt) == ("+" in method)  # extra_state() of the wrapper, not of the trainer
