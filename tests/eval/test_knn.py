import torch
import torch.nn.functional as F

from mimkit.eval.common import InputPixels
from mimkit.eval.knn import (
    extract_features,
    knn_accuracy,
    knn_classify,
    knn_grid,
    knn_loaders,
    knn_monitor,
    run_knn,
    run_pixel_knn,
)
from mimkit.models import model_from_config
from mimkit.objectives.mae import MAE


def test_knn_on_known_features():
    bank = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]), dim=-1)
    labels = torch.tensor([0, 0, 1, 1])
    queries = F.normalize(torch.tensor([[1.0, 0.05], [0.05, 1.0]]), dim=-1)
    assert knn_classify(bank, labels, queries, k=2).tolist() == [0, 1]


def test_votes_are_weighted_by_similarity():
    # One very close neighbour of class 0 outweighs two distant ones of class 1 (T = 0.07).
    bank = F.normalize(torch.tensor([[1.0, 0.0], [0.5, 1.0], [0.5, -1.0]]), dim=-1)
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    assert knn_classify(bank, labels, query, k=3, temperature=0.07).tolist() == [0]
    assert knn_classify(bank, labels, query, k=3, temperature=100.0).tolist() == [1]  # ~majority


def test_a_small_temperature_tends_to_the_nearest_neighbour():
    """exp(sim / T) overflows float32 for T = 0.01 (e^100); the votes must not, or every class ties at inf."""
    g = torch.Generator().manual_seed(2)
    bank = F.normalize(torch.randn(400, 6, generator=g), dim=-1)
    labels = torch.randint(0, 5, (400,), generator=g)
    queries = F.normalize(torch.randn(150, 6, generator=g), dim=-1)
    nearest = knn_classify(bank, labels, queries, k=1)
    for t in (0.01, 0.002):
        assert torch.equal(knn_classify(bank, labels, queries, k=50, temperature=t), nearest)
        grid = knn_grid(bank, labels, queries, nearest, ks=[1, 50], temperatures=[t])
        assert [r["top1"] for r in grid] == [1.0, 1.0]


def test_chunking_does_not_change_predictions():
    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(300, 16, generator=g), dim=-1)
    labels = torch.randint(0, 5, (300,), generator=g)
    queries = F.normalize(torch.randn(97, 16, generator=g), dim=-1)
    a = knn_classify(bank, labels, queries, k=20, chunk=7)
    assert torch.equal(a, knn_classify(bank, labels, queries, k=20, chunk=4096))


def test_grid_scores_each_setting_as_the_plain_knn_does():
    """One neighbour search for the whole grid gives each (k, T) the accuracy a k-NN of its own gives."""
    g = torch.Generator().manual_seed(1)
    bank = F.normalize(torch.randn(200, 8, generator=g), dim=-1)
    labels = torch.randint(0, 4, (200,), generator=g)
    queries = F.normalize(torch.randn(90, 8, generator=g), dim=-1)
    truth = torch.randint(0, 4, (90,), generator=g)
    grid = knn_grid(bank, labels, queries, truth, ks=[1, 5, 30, 500], temperatures=[0.05, 1.0], chunk=16)
    assert [(r["k"], r["temperature"]) for r in grid] == [(k, t) for k in (1, 5, 30, 500) for t in (0.05, 1.0)]
    for r in grid:  # k above the bank's size is the whole bank, as in knn_classify
        plain = knn_accuracy(bank, labels, queries, truth, k=r["k"], temperature=r["temperature"])
        assert round(r["top1"] * 90) == round(plain * 90)  # the same number of correct queries
    assert len({r["top1"] for r in grid}) > 1  # the settings do differ here, so the check above can fail
    nearest = (queries @ bank.T).topk(30, dim=1).values.mean(0)  # the k-th neighbour's mean similarity
    for r in grid:
        assert abs(r["first_similarity"] - nearest[0]) < 1e-5
        assert r["k"] == 500 or abs(r["kth_similarity"] - nearest[r["k"] - 1]) < 1e-5


def test_run_knn_with_label_fraction(make_cfg):
    cfg = make_cfg("eval.feature=both", "data.label_fraction=0.5")
    out = run_knn(model_from_config(cfg), cfg, torch.device("cpu"))
    assert out["bank_size"] == 60 and out["test_size"] == 120 and 0.0 <= out["value"] <= 1.0


def test_run_knn_grid_keeps_the_configured_value_and_only_the_asked_cells(make_cfg):
    """With a grid, the configured (k, T) is read from the same neighbour search even when it lies
    outside the grid, and the record's grid holds the asked cells only."""
    cfg = make_cfg("eval.feature=both", "eval.knn_k=7", "eval.knn_temperature=0.3")
    torch.manual_seed(0)
    model = model_from_config(cfg)
    plain = run_knn(model, cfg, torch.device("cpu"))
    gridded = run_knn(model, cfg, torch.device("cpu"), grid=([1, 20], [0.05]))
    assert abs(gridded["value"] - plain["value"]) < 1e-6
    assert [(r["k"], r["temperature"]) for r in gridded["grid"]] == [(1, 0.05), (20, 0.05)]


def test_knn_monitor_uses_eval_model_and_restores_mode(make_cfg):
    cfg = make_cfg("eval.monitor_samples=40")
    objective = MAE(model_from_config(cfg), cfg.mask_ratio).train()
    acc = knn_monitor(objective, cfg, torch.device("cpu"))
    assert 0.0 <= acc <= 1.0 and objective.model.training


def test_pixel_knn_is_the_knn_of_the_flattened_input_images(make_cfg):
    """The demo's and the study's yardstick: run_knn's bank, queries and vote on the pixels."""
    cfg = make_cfg("eval.feature=both", "data.label_fraction=0.5")
    pixels = run_pixel_knn(cfg)

    def flat(loader):
        x, y = zip(*[(imgs.flatten(1), labels) for imgs, labels in loader], strict=True)
        return F.normalize(torch.cat(x), dim=1), torch.cat(y)

    bank, queries = knn_loaders(cfg)
    by_hand = knn_accuracy(*flat(bank), *flat(queries), k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature)
    assert pixels["value"] == by_hand and pixels["bank_size"] == 60 and pixels["test_size"] == 120
    assert pixels["feature"] == "pixels"
    for feature in ("cls", "mean", "both"):  # every k-NN feature of InputPixels is the normalised image
        feats, labels = extract_features(InputPixels(), queries, torch.device("cpu"), feature)
        expected, expected_labels = flat(queries)
        assert torch.allclose(feats @ feats.T, expected @ expected.T, atol=1e-5)
        assert torch.equal(labels, expected_labels)
