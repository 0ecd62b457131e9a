"""Shared fixtures. Tests never write into the repository's results/: every test that runs
pipeline stages or notebooks points CIP_RESULTS_ROOT at a temporary directory."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

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


@contextlib.contextmanager
def one_thread_smoke(root) -> Iterator:
    """The smoke profile with ``CIP_RESULTS_ROOT`` at ``root`` and one torch thread, for a module
    whose tests share trained smoke victims (on a busy 2-core CPU, 2 threads ran up to 8x slower)."""
    import torch

    from cip_helpers.course import config

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("CIP_RESULTS_ROOT", str(root))
            yield config.get_profile("smoke")
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real single-node SLURM cluster for the session (tests/slurm_util.py), with ``SLURM_CONF``
    set while it runs; skips (or fails under ``CIP_REQUIRE_SLURM=1``) where it cannot start."""
    from slurm_util import local_cluster, slurm_or_skip

    slurm_or_skip()
    old = os.environ.get("SLURM_CONF")
    with local_cluster(tmp_path_factory.mktemp("slurm")) as env:
        os.environ.update(env)
        try:
            yield env
        finally:
            if old is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = old
