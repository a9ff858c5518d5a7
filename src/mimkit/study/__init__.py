"""Studies: arms compared at equal pre-training wall-clock, evaluated along their runs, with the
claims they test declared in the study file (``presets/studies/*.yaml``).

- :mod:`~mimkit.study.spec`: the study file (arms, budgets, fine-tuning jobs, claims);
- :mod:`~mimkit.study.runner`: ``mimkit study`` (cached, resumable runs and evaluations);
- :mod:`~mimkit.study.index`: the typed run index both sides share (``study.json``);
- :mod:`~mimkit.study.verdicts`: the verdict rules;
- :mod:`~mimkit.study.report`: ``mimkit report`` (``RESULTS.md``, plots, ``summary.json``).
"""

from mimkit.study.index import Calibration, EvalRecord, RunRecord, StudyIndex
from mimkit.study.report import write_report
from mimkit.study.runner import Study, config_hash, default_out, run_study, timed_steps
from mimkit.study.spec import Arm, Claim, FinetuneJob, StudySpec, load_study

__all__ = ["Arm", "Calibration", "Claim", "EvalRecord", "FinetuneJob", "RunRecord", "Study", "StudyIndex",
           "StudySpec", "config_hash", "default_out", "load_study", "run_study", "timed_steps", "write_report"]
