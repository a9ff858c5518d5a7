"""Verdict rules for the claims a study declares. Each returns a :class:`Verdict`; ``holds`` is
True, False, or None when the data cannot decide (within noise, not measured)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from mimkit.study.index import StudyIndex
from mimkit.study.spec import Claim


@dataclass
class Verdict:
    holds: bool | None
    text: str  # holds | does not hold | within noise | not reached | not measured
    value: float | None = None  # the measured difference, time ratio or value
    noise: float | None = None  # the margin a difference had to exceed
    n: tuple[int, int] = (0, 0)  # values (seeds) behind each side


def _bounds_ok(value: float, at_least: float | None, at_most: float | None) -> bool:
    eps = 1e-9  # a bound met exactly is met, whatever the float rounding
    return (at_least is None or value >= at_least - eps) and (at_most is None or value <= at_most + eps)


def difference(a: list[float], b: list[float], at_least: float | None = None, at_most: float | None = None,
               tolerance: float = 0.0) -> Verdict:
    """``mean(a) - mean(b)`` against the bounds. Noise: twice the difference's standard error when
    both sides have >= 2 seeds, else the stated ``tolerance``. A bound that excludes zero (a claim
    of a gain or a loss) needs the difference to exceed the noise, else "within noise"."""
    n = (len(a), len(b))
    if not a or not b:
        return Verdict(None, "not measured", n=n)
    diff = statistics.fmean(a) - statistics.fmean(b)
    if len(a) > 1 and len(b) > 1:
        noise = 2 * math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    else:
        noise = tolerance
    excludes_zero = (at_least is not None and at_least >= 0) or (at_most is not None and at_most <= 0)
    if excludes_zero and abs(diff) <= noise:
        return Verdict(None, "within noise", diff, noise, n)
    ok = _bounds_ok(diff, at_least, at_most)
    return Verdict(ok, "holds" if ok else "does not hold", diff, noise, n)


def time_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """First wall-clock at which the curve (linear between points, from its first point) reaches
    ``target``; None when it never does."""
    prev = None
    for t, v in curve:
        if v >= target:
            if prev is None or prev[1] >= target:
                return t
            (t0, v0) = prev
            return t0 + (target - v0) / (v - v0) * (t - t0)
        prev = (t, v)
    return None


def time_ratio(curve: list[tuple[float, float]], reference: list[tuple[float, float]],
               at_least: float | None = None, at_most: float | None = None) -> Verdict:
    """Time for ``curve`` to reach ``reference``'s final value, over the reference's final time."""
    if not curve or not reference:
        return Verdict(None, "not measured")
    t_ref, v_ref = reference[-1]
    t = time_to_reach(curve, v_ref)
    if t is None:
        return Verdict(False, "not reached")
    ratio = t / t_ref
    return Verdict(_bounds_ok(ratio, at_least, at_most),
                   "holds" if _bounds_ok(ratio, at_least, at_most) else "does not hold", ratio)


def threshold(values: list[float], at_least: float | None = None, at_most: float | None = None) -> Verdict:
    """The mean over seeds against the bounds."""
    if not values:
        return Verdict(None, "not measured")
    m = statistics.fmean(values)
    ok = _bounds_ok(m, at_least, at_most)
    return Verdict(ok, "holds" if ok else "does not hold", m, n=(len(values), 0))


def judge(index: StudyIndex, c: Claim) -> Verdict:
    """Apply the claim's rule to the index."""
    lf = None if c.metric not in ("knn_top1", "linprobe_top1", "finetune_top1") else c.label_fraction
    if c.rule == "difference":
        return difference(index.final(c.arm, c.metric, lf, c.view),
                          index.final(c.reference, c.metric, lf, c.reference_view),
                          c.at_least, c.at_most, c.tolerance)
    if c.rule == "time_to_reference":
        curve = [(t, m) for t, m, _ in index.curve(c.arm, c.metric, lf, c.view)]
        ref = [(t, m) for t, m, _ in index.curve(c.reference, c.metric, lf, c.reference_view)]
        return time_ratio(curve, ref, c.at_least, c.at_most)
    return threshold(index.final(c.arm, c.metric, lf, c.view), c.at_least, c.at_most)
