"""Every notebook executes on the smoke profile through the runner, and writes its artifacts."""
from __future__ import annotations

import json

import nbformat
import pytest

from cip_helpers.tools import run
from cip_helpers.course.config import get_profile

NOTEBOOKS = run.list_notebooks()


def test_notebooks_are_stored_clean_with_a_parameters_cell():
    assert NOTEBOOKS, "no notebooks found"
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name} has outputs"
        params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
        assert len(params) == 1 and 'profile = "quick"' in params[0].source, path.name
        assert nb.cells[0].cell_type == "markdown" and "Run time" in nb.cells[0].source, path.name


@pytest.fixture(scope="module")
def smoke_run(smoke_results_root):
    status = run.main(["--profile", "smoke"])
    return status, get_profile("smoke").results_dir


@pytest.mark.slow
def test_all_notebooks_execute_on_smoke(smoke_run):
    status, results = smoke_run
    assert status == 0
    executed = sorted(p.name for p in (results / "executed").glob("*.ipynb"))
    assert executed == [p.name for p in NOTEBOOKS]
    timings = json.loads((results.parent / "timings.json").read_text())
    run0 = timings["runs"]["seeds=0"]
    assert set(run0["notebook_seconds"]["seed-0"]) == {p.stem for p in NOTEBOOKS} | set(run.TASKS)
    assert run0["wall_seconds"] > 0 and run0["jobs"] >= 1


def _metrics_jsons(results) -> dict:
    """Every JSON artifact of one seed, without wall-time fields (the only thing allowed to vary)."""
    from cip_helpers.tools.report import strip_wall_times

    return {str(p.relative_to(results)): strip_wall_times(json.loads(p.read_text()))
            for p in sorted(results.rglob("*.json")) if "executed" not in p.parts}


@pytest.mark.slow
def test_two_smoke_runs_on_one_machine_give_identical_metrics(smoke_run, tmp_path_factory):
    """Issue 12: same machine, same seed -> the same numbers, from scratch (no shared checkpoint)."""
    import os

    _, first = smoke_run
    root = tmp_path_factory.mktemp("smoke_again")
    old = os.environ["CIP_RESULTS_ROOT"]
    os.environ["CIP_RESULTS_ROOT"] = str(root)
    try:
        assert run.main(["--profile", "smoke"]) == 0
        second = get_profile("smoke").results_dir
    finally:
        os.environ["CIP_RESULTS_ROOT"] = old
    a, b = _metrics_jsons(first), _metrics_jsons(second)
    assert len(a) >= 20 and sorted(a) == sorted(b)
    different = [name for name in a if a[name] != b[name]]
    assert not different, f"smoke runs differ in {different}"


@pytest.mark.slow
def test_smoke_course_through_slurm_equals_the_local_run(smoke_run, slurm_cluster, tmp_path_factory):
    """Issue 29: the whole smoke course as SLURM jobs (submitit, afterok dependencies) on a real
    single-node cluster gives the local run's metrics (every JSON artifact, wall times aside)."""
    import os

    _, local = smoke_run
    root = tmp_path_factory.mktemp("smoke_slurm")
    old = os.environ["CIP_RESULTS_ROOT"]
    os.environ["CIP_RESULTS_ROOT"] = str(root)
    try:
        assert run.main(["--profile", "smoke", "--executor", "slurm"]) == 0
        on_slurm = get_profile("smoke").results_dir
    finally:
        os.environ["CIP_RESULTS_ROOT"] = old
    logs = sorted((on_slurm.parent / "slurm-logs").glob("*/*_log.out"))
    assert len(logs) == len(NOTEBOOKS) + len(run.TASKS)  # one SLURM job per notebook and task
    timings = json.loads((on_slurm.parent / "timings.json").read_text())["runs"]
    assert list(timings) == ["seeds=0 {slurm}"]
    a, b = _metrics_jsons(local), _metrics_jsons(on_slurm)
    assert len(a) >= 20 and sorted(a) == sorted(b)
    different = [name for name in a if a[name] != b[name]]
    assert not different, f"the SLURM run differs from the local one in {different}"


@pytest.mark.slow
def test_smoke_run_writes_the_artifacts_later_notebooks_need(smoke_run):
    _, results = smoke_run
    victims = json.loads((results / "victims.json").read_text())
    assert set(victims) == {"all", "half"} and all(0 <= a <= 1 for a in victims.values())
    t = json.loads((results / "thresholds.json").read_text())
    assert t["E1"] < t["E2"] and t["half"]["E1"] < t["half"]["E2"]
    ood = json.loads((results / "ood_metrics.json").read_text())
    assert {"auroc_before", "auroc_after", "fpr95_before", "fpr95_after"} <= set(ood["noise"])
    assert (results / "checkpoints" / "victim_all.pt").exists()
    assert any((results / "figures").glob("01_*.png"))
    # issue 13: every verdict records m, T (distinct triggers), the null used, p-value, verdict
    verdicts = json.loads((results / "verification.json").read_text())
    assert verdicts and {v["kind"] for v in verdicts} == {"stolen", "innocent"}
    for v in verdicts:
        assert 0 <= v["m"] <= v["T"] and 0 <= v["m_units"] <= v["units"] <= v["T"]
        assert 0 <= v["p_value"] <= 1 and v["flagged"] == (v["p_value"] < 0.01 and v["units"] > 0)
        assert v["null"]["pool_size"] == get_profile("smoke").n_innocent - 1 and v["null"]["pool"]
        assert set(v["ablations"]) == {"no_units", "drop_agreed", "one_rate"}


@pytest.mark.slow
def test_second_run_reuses_checkpoints(smoke_run, capsys):
    from cip_helpers.course import pipeline

    _, info = pipeline.get_victim(get_profile("smoke"), "all")
    assert info["loaded"] is True
    assert "loaded checkpoint victim_all.pt" in capsys.readouterr().out


def test_runner_names_the_failing_notebook_and_cell(tmp_path, results_root, capsys):
    good = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell('profile = "quick"\noverrides = {}', metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("x = 1")])
    bad = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell('profile = "quick"\noverrides = {}', metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("raise ValueError('broken on purpose')")])
    never = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 3")])
    for name, nb in (("01_good", good), ("02_bad", bad), ("03_never", never)):
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, tmp_path / f"{name}.ipynb")
    status = run.main(["--profile", "smoke"], notebook_dir=tmp_path)
    err = capsys.readouterr().err
    assert status == 1
    assert "02_bad.ipynb (seed 0) failed" in err and "ValueError: broken on purpose" in err
    assert not (results_root / "smoke" / "seed-0" / "executed" / "03_never.ipynb").exists()


def test_every_notebook_ends_with_takeaways_and_try_it():
    """Issue 18: the last cell of every notebook is "## Takeaways" (at most three) and "## Try it"
    (two or three prompts, each naming an override or a concrete action), and 00 exists."""
    import re

    assert NOTEBOOKS[0].name == "00_orientation.ipynb"
    for path in NOTEBOOKS:
        last = nbformat.read(path, as_version=4).cells[-1]
        assert last.cell_type == "markdown", f"{path.name} ends on a code cell"
        text = last.source
        assert "## Takeaways" in text and "## Try it" in text, f"{path.name}: no Takeaways / Try it"
        take, tries = text.split("## Takeaways", 1)[1].split("## Try it", 1)
        n_take = len(re.findall(r"^- ", take, re.M))
        n_try = len(re.findall(r"^- ", tries, re.M))
        assert 1 <= n_take <= 3 and 2 <= n_try <= 3, f"{path.name}: {n_take} takeaways, {n_try} prompts"
