"""What tests/test_experiments_values.py and tests/test_experiments_report_values.py share: ``experiments.py``
imported in-process with nothing to train (``train_accelerate.run`` a sentinel), offline, ``--help`` unwrapped."""

import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = object()  # train_accelerate.run as train_runs imports it


def import_experiments(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # experiments.py is at the checkout's root
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('COLUMNS', '300')  # --help unwrapped
    monkeypatch.setitem(sys.modules, 'train_accelerate', types.SimpleNamespace(run=TRAIN))
    import experiments

    return experiments
