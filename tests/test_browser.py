"""The notebook sliders work in a real browser (issue 18).

What is tested: JupyterLab (a ``jupyter lab`` subprocess) and a headless Chromium (Debian's
chromium and chromium-driver, driven by selenium) open copies of notebooks 03 and 05 set to the
smoke profile, run all cells with JupyterLab's "Run All Cells", move a slider the way a user
does (type a value into the slider's readout, Enter) and check the live output with numbers:

* 03, slider p1: the figure changes; in the routing table the "ID test" row's ID fraction falls
  by at least 0.05 when p1 drops from 95 to 80, no row's ID fraction rises, and the high-ES
  column (E2: p2 and T only) stays the same; back at the default, table and figure are those of
  the first view again, and that first view shows the routing table of the static cell above it.
* 05, slider R1 percentile: the figure (title: how many ID test digits would be flipped) changes
  when the percentile goes from its default to 5; back at the default it is the first one again.

Why: the slider cells are the only interactive part of the course. A batch run (the runner sets
``CIP_BATCH``) draws a static default view, so nothing else exercises the widgets, their
``continuous_update=False`` round trip through the kernel, or the labextension that renders them.

The test skips, naming what is missing and how to install it, without chromium, chromedriver,
selenium or jupyterlab; with ``CIP_REQUIRE_BROWSER=1`` (``.ci/run`` sets it after installing the
Debian packages) it fails instead. Both notebooks share one server and one browser.

Results root: the session's ``smoke_results_root`` when it already holds trained smoke
checkpoints (``tests/test_notebooks.py`` ran first), so prior stages are loaded; otherwise a
private, empty root, and 03 trains what it needs. Never an empty *shared* root: checkpoints left
there would make the notebook tests' later runner call record its run as ``(cached)``, not as
the from-scratch run they check. Kernels get one torch thread (the runner's ``THREADS`` for 03
and 05), so what they rewrite in a shared root is what the runner wrote.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest

import browser_util as bu
from cip_helpers.course.config import REPO_ROOT, get_profile

pytestmark = pytest.mark.slow  # a JupyterLab server and a browser: the full tier only

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
NB03 = "03_threshold_selection.ipynb"
NB05 = "05_reliability_and_backdooring.ipynb"

RUN_ALL_TIMEOUT = 300.0
"""Bound (not estimate) for Run All Cells. Measured on the 2-core course machine: 03 takes 20-31 s
on an empty results root (it trains the smoke victims, the OE fine-tuning and the trade-off
surrogates first) and 12 s with the session's checkpoints; 05 takes 12-18 s."""

P1_TARGET = 80.0
"""Where p1 is moved (smoke default 95): E1 drops, so about 15 % of the ID test digits leave the ID branch."""
R1_TARGET = 5.0
"""Where the R1 percentile is moved (smoke default 0.5): a higher R1, more ID test digits to flip."""

P1_LABEL = {"prefixes": ["p1"], "contains": []}
R1_LABEL = {"prefixes": ["R1"], "contains": ["percentile"]}
"""How the sliders are found: by their description, bare ("p1", "percentile") or descriptive
("p1: ID percentile for E1", "R1 percentile ...")."""


@pytest.fixture(scope="module")
def browser_tools() -> None:
    """Skip (or, with ``CIP_REQUIRE_BROWSER=1``, fail) when a prerequisite is missing."""
    missing = bu.missing_prerequisites()
    if not missing:
        return
    message = "browser test needs " + "; ".join(missing)
    if os.environ.get(bu.REQUIRE_ENV) == "1":
        pytest.fail(f"{message} ({bu.REQUIRE_ENV}=1, so this is a failure, not a skip)")
    pytest.skip(message)


@pytest.fixture(scope="module")
def lab_results_root(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's smoke results root if it holds smoke checkpoints, else a private empty one
    (module docstring: an empty shared root must stay empty for the notebook tests)."""
    shared = tmp_path_factory.getbasetemp() / "smoke_results0"  # conftest's mktemp("smoke_results")
    checkpoints = shared / "smoke" / "seed-0" / "checkpoints"
    if checkpoints.is_dir() and any(checkpoints.rglob("*.pt")):
        root = request.getfixturevalue("smoke_results_root")  # the same, already set up
        if Path(root) == shared:
            return Path(root)
    return tmp_path_factory.mktemp("browser_results")


def _smoke_copy(name: str, dest: Path) -> Path:
    """Copy notebook ``name`` into ``dest`` with its parameters cell set to the smoke profile."""
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and 'profile = "quick"' in params[0].source, f"{name}: no parameters cell"
    params[0].source = params[0].source.replace('profile = "quick"', 'profile = "smoke"')
    nbformat.write(nb, dest / name)
    return dest / name


@pytest.fixture(scope="module")
def lab(browser_tools: None, lab_results_root: Path,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[bu.LabServer]:
    """One JupyterLab server for the module, serving smoke copies of 03 and 05. Kernels inherit
    ``CIP_RESULTS_ROOT`` and never ``CIP_BATCH`` (with it the slider cells draw no widgets)."""
    root = tmp_path_factory.mktemp("lab")
    for name in (NB03, NB05):
        _smoke_copy(name, root)
    drop = {"CIP_BATCH", "MPLBACKEND", "PYTEST_CURRENT_TEST", "JPY_PARENT_PID"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(CIP_RESULTS_ROOT=str(lab_results_root), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    server = bu.start_lab(root, env, root.parent / f"{root.name}-server.log")
    try:
        yield server
    finally:
        bu.stop_lab(server)


@pytest.fixture(scope="module")
def driver(lab: bu.LabServer) -> Iterator[Any]:
    """One headless Chromium for the module (quit before the server stops)."""
    with bu.chromium_driver() as d:
        yield d


def _report(page: bu.NotebookPage, lab_results_root: Path, **numbers: Any) -> None:
    """Print the measured durations and numbers (shown with ``pytest -rP`` / ``-s``)."""
    print(f"{page.path}: results root {lab_results_root}; seconds {page.timings}")
    for key, value in numbers.items():
        print(f"  {key}: {value}")


def _run_and_read_slider(page: bu.NotebookPage, label: Any, name: str, default: float,
                         need_table: bool) -> tuple[Any, dict]:
    """Open the notebook, run all its cells, find the slider ``label`` (``name`` in messages) and
    return it with its first view, checked: a figure (and a routing table if ``need_table``) and
    the readout at the profile's ``default``."""
    page.open()
    page.run_all(RUN_ALL_TIMEOUT)
    slider = page.slider(label, name)
    first = page.state(slider)
    shown = first["img"] and (first["table"] or not need_table)
    assert shown, f"the {name} slider shows no figure{'/table' if need_table else ''}\n{page.context(slider)}"
    assert bu.number(first["readout"]) == default, f"{name} starts at {first['readout']}, profile {default}"
    return slider, first


def test_03_p1_slider_changes_the_plot_and_the_routing_table(driver: Any, lab: bu.LabServer,
                                                            lab_results_root: Path) -> None:
    default = get_profile("smoke").p1
    assert default >= P1_TARGET + 10, f"the test moves p1 from the smoke default {default} down to {P1_TARGET}"
    page = bu.NotebookPage(driver, lab, NB03)
    try:
        with page.explained():
            slider, first = _run_and_read_slider(page, P1_LABEL, "p1", default, need_table=True)
            assert {"ID", "low-ES OOD", "high-ES OOD"} <= set(first["table"]["header"]), first["table"]
            static = page.js(bu.JS_STATIC_TABLE, "low-ES OOD")
            assert isinstance(static, dict), f"no static routing table above the slider\n{page.context()}"
            moved = page.move(slider, P1_TARGET, first, need_table=True)
            restored = page.move(slider, default, moved, need_table=True)
    finally:
        lab.shutdown_kernels()

    before, after = first["table"], moved["table"]
    col = before["header"].index("ID")
    high = before["header"].index("high-ES OOD")
    assert "ID test" in before["rows"] and set(after["rows"]) == set(before["rows"]) == set(static["rows"]), \
        f"routing table rows: live {sorted(before['rows'])}, moved {sorted(after['rows'])}, static {sorted(static['rows'])}"
    id_before, id_after = before["rows"]["ID test"][col], after["rows"]["ID test"][col]
    _report(page, lab_results_root, label=first["label"], figures=(first["img_sha"], moved["img_sha"]),
            id_test_ID_fraction=(id_before, id_after), table_before=before["rows"], table_after=after["rows"],
            printed_after=moved["text"])
    context = f"\ntable at p1={default:g}: {before}\ntable at p1={P1_TARGET:g}: {after}\noutput:\n{moved['output']}"
    assert moved["img_sha"] != first["img_sha"], "the figure did not change" + context
    assert id_after <= id_before - 0.05, f"ID test digits routed to ID: {id_before} -> {id_after}" + context
    for name, row in before["rows"].items():
        assert after["rows"][name][col] <= row[col], f"{name}: more routed to ID at a lower p1" + context
        assert after["rows"][name][high] == row[high], f"{name}: high-ES fraction moved with p1" + context
    # the first live view is the static routing table of the cell above (rounded to 4 there, 3 here)
    for name, row in before["rows"].items():
        assert all(abs(a - b) <= 5e-4 + 1e-9 for a, b in zip(row, static["rows"][name])), \
            f"{name}: live {row} vs static {static['rows'][name]}"
    assert restored["img_sha"] == first["img_sha"] and restored["table"] == before, \
        f"back at p1 = {default:g} the view differs from the first one: {restored['table']}" + context


def test_05_r1_percentile_slider_changes_the_plot(driver: Any, lab: bu.LabServer, lab_results_root: Path) -> None:
    default = get_profile("smoke").pbd_r1_percentile
    assert abs(default - R1_TARGET) >= 1, f"the test moves the R1 percentile from {default} to {R1_TARGET}"
    page = bu.NotebookPage(driver, lab, NB05)
    try:
        with page.explained():
            slider, first = _run_and_read_slider(page, R1_LABEL, "R1 percentile", default, need_table=False)
            moved = page.move(slider, R1_TARGET, first, need_table=False)
            restored = page.move(slider, default, moved, need_table=False)
    finally:
        lab.shutdown_kernels()

    _report(page, lab_results_root, label=first["label"],
            figures=(first["img_sha"], moved["img_sha"], restored["img_sha"]), printed=(first["text"], moved["text"]))
    assert moved["img_sha"] != first["img_sha"], f"the figure did not change\n{moved['output']}"
    if first["text"] or moved["text"]:  # the count is in the figure's title; printed text must follow it
        assert moved["text"] != first["text"], f"the printed text did not change: {moved['text']!r}"
    assert restored["img_sha"] == first["img_sha"], "back at the default percentile the figure differs"
