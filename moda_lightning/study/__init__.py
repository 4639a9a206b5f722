"""``moda study``: arms x seeds of ``moda fit`` runs at one token budget, compared honestly.

``spec.py`` reads a study file and plans its runs, ``runner.py`` runs them (skipping finished ones,
resuming interrupted ones), ``results.py`` reads each run's event files, ``report.py`` writes
``study.md`` and ``study.png``.
"""

from moda_lightning.study.runner import main
from moda_lightning.study.spec import Arm, Run, StudySpec, load_study, plan_runs

__all__ = ["Arm", "Run", "StudySpec", "load_study", "main", "plan_runs"]
