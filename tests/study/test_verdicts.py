"""The verdict rules a study's claims use: each can hold, fail, or be undecided."""

from __future__ import annotations

import pytest

from mimkit.study.index import EvalRecord, StudyIndex
from mimkit.study.spec import Claim
from mimkit.study.verdicts import difference, judge, threshold, time_ratio, time_to_reach


def test_difference_uses_the_standard_error_with_seeds():
    assert difference([0.80, 0.81, 0.82], [0.70, 0.71, 0.72], at_least=0.0).text == "holds"
    assert difference([0.70, 0.71, 0.72], [0.80, 0.81, 0.82], at_least=0.0).text == "does not hold"
    assert difference([0.70, 0.75, 0.80], [0.72, 0.76, 0.78], at_least=0.0).text == "within noise"
    assert difference([0.80, 0.81, 0.82], [0.70, 0.71, 0.72], at_least=0.15).text == "does not hold"


def test_difference_uses_the_tolerance_with_one_seed():
    assert difference([0.5], [0.4], at_least=0.0, tolerance=0.01).text == "holds"
    assert difference([0.5], [0.49], at_least=0.0, tolerance=0.02).text == "within noise"
    assert difference([0.4], [0.5], at_most=0.0, tolerance=0.01).text == "holds"  # a claimed loss
    v = difference([0.5], [0.49], at_least=-0.02)  # "no worse than 2 points": no noise test needed
    assert v.holds is True and v.value == pytest.approx(0.01)
    assert difference([], [0.5], at_least=0.0).text == "not measured"


def test_time_to_reach_interpolates():
    curve = [(10.0, 0.5), (20.0, 0.7), (40.0, 0.8)]
    assert time_to_reach(curve, 0.6) == pytest.approx(15.0)
    assert time_to_reach(curve, 0.4) == 10.0
    assert time_to_reach(curve, 0.9) is None


def test_time_ratio():
    ref = [(10.0, 0.5), (100.0, 0.8)]
    assert time_ratio([(10.0, 0.6), (20.0, 0.8)], ref, at_most=0.5).value == pytest.approx(0.2)
    assert time_ratio([(10.0, 0.6), (20.0, 0.8)], ref, at_most=0.5).text == "holds"
    assert time_ratio([(10.0, 0.6), (90.0, 0.8)], ref, at_most=0.5).text == "does not hold"
    assert time_ratio([(10.0, 0.6), (90.0, 0.7)], ref, at_most=0.5).text == "not reached"


def test_threshold():
    assert threshold([0.41, 0.45], at_least=0.40).text == "holds"
    assert threshold([0.26], at_least=0.40).text == "does not hold"
    assert threshold([], at_least=0.40).text == "not measured"


def test_judge_reads_the_index():
    def rec(arm, seed, step, wall, value, view="auto", metric="knn_top1"):
        return EvalRecord(arm, seed, step, wall, "knn", metric, 1.0, "test", value, view)

    ix = StudyIndex(evals=[rec("a", 0, 5, 50.0, 0.6), rec("a", 0, 10, 100.0, 0.8),
                           rec("b", 0, 2, 50.0, 0.7), rec("b", 0, 4, 100.0, 0.9),
                           rec("b", 0, 4, 100.0, 0.85, view="student")])
    fast = Claim(name="b sooner", rule="time_to_reference", arm="b", reference="a", at_most=0.75)
    assert judge(ix, fast).value == pytest.approx(0.75) and judge(ix, fast).holds
    views = Claim(name="t>s", arm="b", reference="b", reference_view="student", at_least=0.0, tolerance=0.01)
    assert judge(ix, views).value == pytest.approx(0.05) and judge(ix, views).holds
