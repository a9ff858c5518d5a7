"""metrics.jsonl repair and the train.loggers backends (TensorBoard, W&B offline, MLflow file store)."""

import importlib.util
import json

import numpy as np
import pytest

from mimkit.config import ConfigError, flat_dict, load_config
from mimkit.engine.logging import MetricLogger, read_metrics
from mimkit.errors import RunError
from tests.conftest import tiny_config

CUT = '{"step": 5, "loss": 0.1'  # a line a kill cut during its write


def _write(run, rows, tail=""):
    run.mkdir(exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def test_resume_repairs_a_cut_last_line(tmp_path):
    _write(tmp_path, [{"step": s, "loss": 1.0 / s} for s in range(1, 5)], CUT)
    logger = MetricLogger(tmp_path, start_step=3, tensorboard=False)
    logger.log(4, {"loss": 0.5})
    logger.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == [1, 2, 3, 4]  # past-checkpoint row and cut line gone
    assert json.loads(lines[-1])["loss"] == 0.5


def test_read_metrics_tolerates_a_cut_line_and_keeps_each_step_once(tmp_path):
    rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 1.0},
            {"step": 2, "loss": 2.5}, {"step": 3, "loss": 1.5}]  # steps 2-3 written again after a resume
    _write(tmp_path, rows, CUT)
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 3, "loss": 1.5}]
    _write(tmp_path, rows[:1], "garbage\n" + json.dumps(rows[1]) + "\n")
    with pytest.raises(RunError, match="line 2 is not JSON"):
        read_metrics(tmp_path)


def test_logger_names_are_checked():
    with pytest.raises(ConfigError, match=r"train.loggers\[1\]: 'comet' is not one of tensorboard, wandb, mlflow"):
        load_config(None, ["train.loggers=[tensorboard, comet]"])
    assert load_config(None).train.loggers == ["tensorboard"]


def test_missing_package_names_the_extra(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'mimkit\[wandb\]'"):
        MetricLogger(tmp_path, loggers=["wandb"])


def _image():
    return (np.arange(16 * 24 * 3) % 255).astype(np.uint8).reshape(16, 24, 3)


def test_tensorboard_gets_scalars_images_and_hparams(tmp_path):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config("train.max_steps=2")
    logger = MetricLogger(tmp_path, cfg=cfg)
    logger.log(1, {"loss": 2.0, "lr": 1e-3})
    logger.log(2, {"loss": 1.0, "lr": 1e-3})
    png = tmp_path / "rec.png"
    Image.fromarray(_image()).save(png)
    logger.log_image(2, "reconstructions", png)
    logger.log_image(2, "gray", _image()[..., 0])
    logger.close()
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0}).Reload()
    assert [e.value for e in acc.Scalars("loss")] == [2.0, 1.0]
    images = acc.Images("reconstructions")
    assert [(e.step, e.width, e.height) for e in images] == [(2, 24, 16)]
    content = b"".join(acc.PluginTagToContent("hparams").values())
    assert b"train.max_steps" in content and b"model.embed_dim" in content


def test_flat_dict():
    assert flat_dict({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": 1, "a.c": [1, 2], "d": None}


def test_wandb_offline_run(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_config("train.loggers=[wandb]")
    logger = MetricLogger(tmp_path, cfg=cfg)
    logger.log(1, {"loss": 1.25})
    logger.log_image(1, "reconstructions", _image())
    logger.close()
    wandb.teardown()  # the W&B service writes the run file out when it stops
    run_id = (tmp_path / "wandb-id").read_text().strip()
    (run_dir,) = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}")
    data = (run_dir / f"run-{run_id}.wandb").read_bytes()
    assert b"loss" in data and b"1.25" in data and b"train.max_steps" in data
    assert list((run_dir / "files" / "media" / "images").glob("reconstructions_1_*.png"))

    resumed = MetricLogger(tmp_path, start_step=1, cfg=cfg)  # a resume continues the same W&B run
    resumed.log(2, {"loss": 1.0})
    resumed.close()
    assert (tmp_path / "wandb-id").read_text().strip() == run_id
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_mlflow_file_store_run(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks to opt in to the file store
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mimkit-test")
    run = tmp_path / "run"
    run.mkdir()
    cfg = tiny_config("train.loggers=[mlflow]")
    logger = MetricLogger(run, cfg=cfg)
    logger.log(1, {"loss": 2.0, "images_per_s": 10})
    logger.log(2, {"loss": 1.5})
    png = run / "reconstructions-00000002.png"
    from PIL import Image

    Image.fromarray(_image()).save(png)
    logger.log_image(2, "reconstructions", png)
    logger.close()

    client = MlflowClient(tracking_uri=uri)
    run_id = (run / "mlflow-id").read_text().strip()
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(1, 2.0), (2, 1.5)]
    got = client.get_run(run_id)
    assert got.data.params["model.embed_dim"] == "32" and got.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(run_id, "reconstructions")] == [
        "reconstructions/reconstructions-00000002.png"]


def test_trainer_sends_reconstructions_to_tensorboard(tmp_path, tiny_overrides):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mimkit.engine.trainer import pretrain

    pretrain(load_config("fmnist_tiny", [*tiny_overrides, "train.max_steps=2"]), tmp_path / "run")
    acc = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"images": 0}).Reload()
    assert [e.step for e in acc.Images("reconstructions")] == [2]
    assert [e.step for e in acc.Scalars("loss")] == [1, 2]
