"""Headless means headless: a notebook run by plain papermill or nbconvert (no runner, no
``$CIP_BATCH``) knows nobody is there to move a slider, and never waits for a front end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types

import pytest

from cip_helpers.course import plots, progress
from cip_helpers.course.config import REPO_ROOT

TRIES = 10
CELL_TIMEOUT = 180
"""Seconds per cell (papermill's --execution-timeout): a bound, not an estimate (the slowest cell
of 03 on smoke, the trade-off grid from scratch, takes about 20 s on the 2-core course machine)."""


def _fake_kernel(monkeypatch, parent: dict | Exception | None) -> None:
    """An ``IPython`` module whose shell has a kernel whose current request is ``parent``
    (``None``: no kernel at all, as in a terminal)."""
    kernel = None
    if parent is not None:
        def get_parent():
            if isinstance(parent, Exception):
                raise parent
            return parent
        kernel = types.SimpleNamespace(get_parent=get_parent)
    shell = types.SimpleNamespace(kernel=kernel) if kernel is not None else types.SimpleNamespace()
    fake = types.ModuleType("IPython")
    fake.get_ipython = lambda: shell
    monkeypatch.setitem(sys.modules, "IPython", fake)


@pytest.mark.parametrize("parent, headless", [
    ({"content": {"allow_stdin": False, "code": "x"}}, True),   # papermill, nbconvert, nbclient
    ({"content": {"allow_stdin": True, "code": "x"}}, False),   # JupyterLab (a user at a front end)
    ({}, True),                                                 # no request to read: never wait
    (RuntimeError("no parent"), True),
    (None, False),                                              # a terminal: live text bars
])
def test_batch_mode_reads_the_kernels_request(monkeypatch, parent, headless):
    monkeypatch.delenv(progress.BATCH_ENV, raising=False)
    _fake_kernel(monkeypatch, parent)
    assert progress.batch_mode() is headless
    monkeypatch.setenv(progress.BATCH_ENV, "1")
    assert progress.batch_mode() is True


def test_slider_view_draws_the_default_view_in_a_headless_kernel(monkeypatch):
    monkeypatch.delenv(progress.BATCH_ENV, raising=False)
    _fake_kernel(monkeypatch, {"content": {"allow_stdin": False}})
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # importing it would raise
    calls = []
    plots.slider_view(lambda p1: calls.append(p1), p1=dict(value=95.0, min=50, max=99.5, step=0.5))
    assert calls == [95.0]


def test_slider_view_drawn_above_prints_one_line_instead_of_a_second_default_view(monkeypatch, capsys):
    monkeypatch.setenv(progress.BATCH_ENV, "1")
    monkeypatch.setitem(sys.modules, "ipywidgets", None)
    calls = []
    plots.slider_view(lambda p1, T: calls.append(p1), drawn_above=True,
                      p1=dict(value=95.0, min=50, max=99.5, step=0.5), T=dict(value=1.0, min=0.5, max=2, step=0.5))
    assert calls == []
    assert capsys.readouterr().out == ("sliders p1, T: live in JupyterLab (python3 tasks.py lab); "
                                       "their default view is the one drawn above\n")


def _papermill(notebook: str, out, root) -> float:
    env = {k: v for k, v in os.environ.items() if k != progress.BATCH_ENV}
    env.update(CIP_RESULTS_ROOT=str(root), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "papermill", str(REPO_ROOT / "notebooks" / notebook), str(out),
                           "-p", "profile", "smoke", "-k", "python3", "--execution-timeout", str(CELL_TIMEOUT),
                           "--no-progress-bar"], env=env, capture_output=True, text=True,
                          timeout=CELL_TIMEOUT * 6, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return time.perf_counter() - start


@pytest.mark.slow
def test_plain_papermill_runs_notebooks_03_and_05_to_the_end_ten_times(tmp_path):
    """Issue 26: plain papermill (no runner, no ``$CIP_BATCH``) once hung at 03's slider cell in
    1 of 3 tries. Each notebook now runs to the end 10 times of 10 with a per-cell timeout; the
    slider cell shows the static default view (05's figure; 03 says its view is the one above),
    and no widget is anywhere in the output."""
    root = tmp_path / "results"
    seconds = {}
    for notebook in ("03_threshold_selection.ipynb", "05_reliability_and_backdooring.ipynb"):
        seconds[notebook] = []
        for k in range(TRIES):
            out = tmp_path / f"{k}_{notebook}"
            seconds[notebook].append(_papermill(notebook, out, root))
            nb = json.loads(out.read_text())
            slider = [c for c in nb["cells"] if "plots.slider_view(" in "".join(c["source"])]
            assert len(slider) == 1
            mimes = {m for o in slider[0]["outputs"] for m in o.get("data", {})}
            text = "".join("".join(o.get("text", "")) for o in slider[0]["outputs"])
            if notebook.startswith("03"):  # its default view is the static cell above: one line here
                assert "their default view is the one drawn above" in text and not mimes, (text, mimes)
            else:  # 05: the default view itself
                assert "image/png" in mimes, mimes
            widgets = [m for c in nb["cells"] for o in c.get("outputs", []) for m in o.get("data", {})
                       if "widget" in m]
            assert not widgets, f"{notebook} try {k}: widget outputs {widgets}"
    print({k: [round(s, 1) for s in v] for k, v in seconds.items()})
