"""Shared fixtures. Tests never write into the repository's results/: every test that runs
pipeline stages or notebooks points CIP_RESULTS_ROOT at a temporary directory."""
from __future__ import annotations

import os

import matplotlib
import pytest

matplotlib.use("Agg")


@pytest.fixture
def results_root(tmp_path, monkeypatch):
    """A fresh, empty results root for one test."""
    monkeypatch.setenv("CIP_RESULTS_ROOT", str(tmp_path / "results"))
    return tmp_path / "results"


@pytest.fixture(scope="session")
def smoke_results_root(tmp_path_factory):
    """One results root shared by the session's smoke-profile runs (notebooks, verification)."""
    root = tmp_path_factory.mktemp("smoke_results")
    old = os.environ.get("CIP_RESULTS_ROOT")
    os.environ["CIP_RESULTS_ROOT"] = str(root)
    yield root
    if old is None:
        os.environ.pop("CIP_RESULTS_ROOT", None)
    else:
        os.environ["CIP_RESULTS_ROOT"] = old
