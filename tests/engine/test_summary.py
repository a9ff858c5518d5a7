import time

import pytest
import torch

from mimkit.config import load_config
from mimkit.engine.summary import _seconds_per_step


class _Probe(torch.nn.Module):
    """A forward that costs a fixed overhead plus a per-image time, like a small model on a CPU."""

    def __init__(self, overhead: float, per_image: float) -> None:
        super().__init__()
        self.overhead, self.per_image = overhead, per_image

    def forward(self, imgs, noise):
        time.sleep(self.overhead + self.per_image * imgs.shape[0])


class _Objective:
    def __init__(self, probe):
        self.probe = probe

    def eval_model(self):
        return self.probe

    def step_cost(self) -> float:
        return 1.0


def test_the_time_estimate_is_not_inflated_by_per_call_overhead():
    """Timing 8 images and scaling by 32 would count the overhead 32 times (here a ~15x overestimate);
    the probe batch grows until the overhead is amortised."""
    cfg = load_config(None, ["model.img_size=16", "train.batch_size=256"])
    probe = _Probe(overhead=0.02, per_image=0.0001)
    est = _seconds_per_step(_Objective(probe), cfg, torch.device("cpu"))
    true = 3 * (0.02 + 0.0001 * 256)  # the estimator's rule: 3 forwards of the real batch
    assert est == pytest.approx(true, rel=0.25)
    assert 3 * (0.02 + 0.0001 * 8) * 32 > 10 * true  # what the old estimate would have said
