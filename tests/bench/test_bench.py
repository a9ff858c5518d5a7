import importlib.util
import json

import pytest

from mimkit import bench
from mimkit.cli import main

TINY = ["--arch", "vit_tiny_small_images", "--img-size", "16", "--in-chans", "1", "--batch-size", "2",
        "--warmup", "0", "--iters", "1", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
        "model.decoder_embed_dim=32", "model.decoder_depth=1", "model.decoder_num_heads=2"]
HAS_HF = importlib.util.find_spec("transformers") is not None


def test_bench_cli_writes_json_and_compares(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", *TINY, "--impl", "mimkit", "hf", "--in-process", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["spec"]["arch"] == "vit_tiny_small_images" and report["spec"]["iters"] == 1
    assert {"torch", "timm", "python"} <= set(report["environment"])
    rows = {r["impl"]: r for r in report["results"]}
    ours = rows["mimkit"]
    for key in ("ms_per_step", "images_per_s", "peak_mem_mib", "flops_per_step", "achieved_tflops",
                "first_loss", "trainable_params", "step_times_ms", "cpu_s_per_step"):
        assert key in ours, key
    assert ours["flops_per_step"] > 0 and ours["images_per_s"] > 0 and len(ours["step_times_ms"]) == 1
    table = capsys.readouterr().out
    assert "| mimkit |" in table
    if HAS_HF:
        hf = rows["hf"]
        # same weights, inputs and noise: same loss, same work
        assert hf["first_loss"] == pytest.approx(ours["first_loss"], rel=1e-5)
        assert hf["trainable_params"] == ours["trainable_params"]
        assert hf["flops_per_step"] == pytest.approx(ours["flops_per_step"], rel=0.02)
        assert report["ratios_mimkit_over"]["hf"]["throughput"] > 0
        assert "| hf |" in table
    else:
        assert "transformers" in report["skipped"]["hf"]


def test_each_implementation_runs_in_its_own_process(tmp_path):
    spec = bench.spec_from_args(bench_args(TINY))
    report = bench.run_bench(spec, ("mimkit",), log=lambda msg: None)
    (row,) = report["results"]
    assert row["impl"] == "mimkit" and row["peak_mem_mib"] is not None and row["images_per_s"] > 0
    assert report["isolation"].startswith("one subprocess")


def bench_args(argv):
    import argparse

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(argv)


def test_skip_reasons_and_peak_lookup():
    spec = bench.BenchSpec(method="emae")
    assert "plain MAE" in bench.skip_reason("hf", spec) and bench.skip_reason("mimkit", spec) is None
    assert bench.gpu_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bench.gpu_peak_tflops("NVIDIA GH200 480GB") == 989.0
    assert bench.gpu_peak_tflops("Some GPU") is None


def test_flop_counter_counts_cpu_attention():
    torch = pytest.importorskip("torch")
    q = torch.randn(2, 3, 10, 8, requires_grad=True)
    with bench.flop_counter() as counter:
        torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()
    # torch's flash-attention formulas: 2 products forward, 5 backward (scores recomputed),
    # each 2·(b·h)·s·s·d FLOPs; without the CPU mapping this would be 0
    assert counter.get_total_flops() == 7 * (2 * 2 * 3 * 10 * 10 * 8)


def test_variants_are_timed_against_plain_mimkit(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = [*TINY, "--impl", "mimkit", "--in-process", "--json", str(out),
            "--variant", "decoder.predict_ratio=0.25", "--variant", "train.grad_checkpointing=true"]
    assert main(["bench", *argv]) == 0
    report = json.loads(out.read_text())
    labels = [r["impl"] for r in report["results"]]
    assert labels == ["mimkit", "mimkit decoder.predict_ratio=0.25", "mimkit train.grad_checkpointing=true"]
    speed = report["variants_over_mimkit"]
    # partial reconstruction does less decoder work; checkpointing recomputes the forward
    assert speed["mimkit decoder.predict_ratio=0.25"]["flops"] < 0.9
    assert speed["mimkit train.grad_checkpointing=true"]["flops"] > 1.1
    assert "mimkit decoder.predict_ratio=0.25 vs mimkit: throughput" in capsys.readouterr().out
    # a bad variant fails before anything runs, as a one-line error naming the key
    assert main(["bench", *TINY, "--impl", "mimkit", "--in-process", "--variant", "decoder.predict_ratio=2"]) == 2
    assert "decoder.predict_ratio" in capsys.readouterr().err


def test_jpeg_bench_paths_agree_and_report(tmp_path, capsys):
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    paths = bench.write_jpeg_folder(tmp_path / "jpgs", 2, size=(64, 48))
    assert [p.suffix for p in paths] == [".jpg", ".jpg"]
    pipes = bench.jpeg_pipelines(32, device="cpu")
    for name in ("pil", "torchvision"):
        out = pipes[name][1](paths)
        assert len(out) == 2 and out[1].shape == (3, 32, 32) and out[1].dtype == torch.float32
    # both decoders read the same pixels (libjpeg-turbo in each; IDCT rounding may differ by 1)
    pil = torch.from_numpy(np.array(pipes["pil"][0](paths)[1])).permute(2, 0, 1)
    tv = pipes["torchvision"][0](paths)[1]
    assert tv.shape == pil.shape == (3, 64, 48)
    assert (tv.int() - pil.int()).abs().max() <= 1
    out = tmp_path / "jpeg.json"
    assert main(["bench", "--jpeg", "--jpeg-dir", str(tmp_path / "jpgs"), "--img-size", "32",
                 "--jpeg-device", "cpu", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["images"] == 2 and report["threads"] == 1 and report["device"] == "cpu"
    assert {(r["path"], r["stage"]) for r in report["results"]} == {
        (p, s) for p in ("pil", "torchvision", "device") for s in ("decode", "decode+augment")}
    assert "| device | decode+augment |" in capsys.readouterr().out


def test_trainer_bench_times_the_real_loop_against_the_step(tmp_path, capsys, tiny_overrides):
    """`mimkit bench --trainer` runs pretrain() itself and the bench step of the same model."""
    from mimkit.config import load_config

    cfg = load_config(None, [*tiny_overrides, "train.batch_size=4", "method=rcmae", "train.loggers=[]"])
    spec = bench.spec_for_config(cfg, warmup=1, iters=2)
    assert spec.method == "rcmae" and spec.batch_size == 4 and spec.img_size == 16
    assert "model.embed_dim=32" in spec.overrides  # what the step computes travels ...
    assert not any(o.startswith(("data.", "train.batch_size")) for o in spec.overrides)  # ... the rest does not

    out = tmp_path / "trainer.json"
    assert main(["bench", "--trainer", "--config", "fmnist_tiny", *tiny_overrides, "train.batch_size=4",
                 "train.loggers=[]", "--warmup", "1", "--iters", "3", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["iters"] == 3 and report["warmup"] == 1  # steps 2-4 of the trainer's log
    assert report["trainer_images_per_s"] > 0 and report["bench_images_per_s"] > 0
    assert report["trainer_vs_bench"] == pytest.approx(report["trainer_images_per_s"] / report["bench_images_per_s"])
    assert 0 <= report["trainer_data_share"] < 1 and report["config"]["data"] == "synthetic"
    assert "| trainer:" in capsys.readouterr().out


def test_profile_breaks_the_step_into_phases(tmp_path, capsys):
    out = tmp_path / "profile.json"
    assert main(["bench", *TINY, "--impl", "mimkit", "--in-process", "--profile", "1", "--json", str(out)]) == 0
    prof = json.loads(out.read_text())["results"][0]["profile"]
    ms = prof["ms_per_step"]
    for key in ("forward", "forward: encoder", "forward: decoder", "backward", "optimizer"):
        assert ms[key] > 0, key
    assert ms["forward: encoder"] + ms["forward: decoder"] <= ms["forward"]  # the phases nest in forward
    assert prof["top_ops"] and all(o["op"].startswith("aten::") for o in prof["top_ops"])
    assert "| forward: decoder |" in capsys.readouterr().out


def test_bench_config_times_that_configs_model(tmp_path, tiny_overrides, capsys):
    """`mimkit bench --config X` times X's model, method and batch (it once timed ViT-B/16 at 224 px
    whatever X said); flags that also describe the model are refused in one line."""
    out = tmp_path / "bench.json"
    assert main(["bench", "--config", "fmnist_tiny", *tiny_overrides, "method=rcmae", "train.batch_size=4",
                 "--iters", "1", "--warmup", "1", "--impl", "mimkit", "--in-process", "--json", str(out)]) == 0
    spec = json.loads(out.read_text())["spec"]
    assert (spec["arch"], spec["img_size"], spec["method"], spec["batch_size"]) == (
        "vit_tiny_small_images", 16, "rcmae", 4)
    assert "model.embed_dim=32" in spec["overrides"]
    assert main(["bench", "--config", "fmnist_tiny", "--batch-size", "2", "--iters", "1", "--warmup", "0",
                 "--impl", "mimkit", "--in-process", *tiny_overrides, "--json", str(out)]) == 0
    assert json.loads(out.read_text())["spec"]["batch_size"] == 2  # an explicit flag wins
    capsys.readouterr()
    assert main(["bench", "--config", "fmnist_tiny", "--img-size", "64"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--img-size and --config" in err and "model.img_size=64" in err and len(err.splitlines()) == 1
