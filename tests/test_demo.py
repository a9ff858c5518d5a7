"""`mimkit demo`: the demo preset, and a tiny end-to-end run of its report."""

import json

from mimkit.cli import main
from mimkit.config import flat_dict, load_config, to_dict
from mimkit.models import model_from_config
from mimkit.objectives import build_objective


def test_the_demo_preset_is_fmnist_tiny_with_partial_reconstruction(tiny_overrides):
    """Every method runs on fmnist_tiny; only the demo's MAE predicts a share of the masked patches
    (and the demo's k-NN has its own bank, k and T, chosen on val for its encoder)."""
    demo, tiny = (flat_dict(to_dict(load_config(name))) for name in ("fmnist_demo", "fmnist_tiny"))
    assert {k for k in demo if demo[k] != tiny[k]} == {"decoder.predict_ratio", "data.decode", "eval.knn_k",
                                                         "eval.knn_temperature", "eval.max_train_samples"}
    assert demo["decoder.predict_ratio"] < 1 and tiny["decoder.predict_ratio"] == 1
    for method in ("mae", "emae", "mixedae", "rcmae", "emae+rcmae"):
        cfg = load_config("fmnist_tiny", [f"method={method}", *tiny_overrides])
        build_objective(cfg, model_from_config(cfg))  # partial reconstruction would refuse EMAE, MixedAE


def test_demo_pretrains_evaluates_and_reports(tmp_path, tiny_overrides):
    out = tmp_path / "demo"
    overrides = [*tiny_overrides, "data.synthetic_size=48", "train.loggers=[]", "eval.max_train_samples=0",
                 "decoder.predict_ratio=0.5"]
    assert main(["demo", "--out", str(out), *overrides]) == 0
    res = json.loads((out / "eval_knn.json").read_text())
    for key in ("knn_pretrained", "knn_random_init", "knn_pixels"):
        assert 0.0 <= res[key]["value"] <= 1.0 and res[key]["metric"] == "knn_top1"
    report = (out / "report.md").read_text()
    assert f"**{100 * res['knn_pretrained']['value']:.2f}%**" in report
    assert f"the input pixels themselves (no encoder) | {100 * res['knn_pixels']['value']:.2f}% |" in report
    gain = 100 * (res["knn_pretrained"]["value"] - res["knn_random_init"]["value"])
    assert f"moved the k-NN by {gain:+.2f} points from the random encoder" in report
    assert "32-d encoder, 2 blocks" in report and "predicting\n50 % of the masked patches" in report
    assert "target: pixels" in report and (out / "loss.png").stat().st_size > 0
    assert (out / "reconstructions.png").stat().st_size > 0
    assert "pre-training time (this call) |" in report

    # Run again on the finished folder: nothing to train, and the report says so instead of
    # presenting the seconds of this call as the run's pre-training time.
    assert main(["demo", "--out", str(out), *overrides]) == 0
    assert "pre-training time (this call, resumed at step " in (out / "report.md").read_text()
