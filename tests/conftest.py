"""Shared test setup. Fetches timm's own model test suite (see tests/timm_suite/conftest.py)."""
import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')  # nothing here may reach the Hub
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')

from timm_suite.fetch import fetch_timm_model_tests  # noqa: E402


def pytest_configure(config):
    fetch_timm_model_tests()
