"""Issue 29: the runner's job graph on SLURM through submitit (cip_helpers/tools/cluster.py).

The first tests need no cluster. Those with the ``slurm_cluster`` fixture start a real
single-node SLURM (tests/slurm_util.py) and skip where it cannot start (no slurm-wlm/munge, not
root), or fail under ``CIP_REQUIRE_SLURM=1`` (``.ci/run`` sets it after installing them). The
whole smoke course through SLURM, compared with the local run, is in tests/test_notebooks.py."""
from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from cip_helpers.course.config import get_profile
from cip_helpers.tools import cluster, run


def _notebooks(folder: Path, cells: dict[str, str]) -> Path:
    """Tiny numbered notebooks ``{name: code}`` with a papermill parameters cell, in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, code in cells.items():
        nb = nbformat.v4.new_notebook(cells=[
            nbformat.v4.new_code_cell('profile = "quick"\noverrides = {}', metadata={"tags": ["parameters"]}),
            nbformat.v4.new_code_cell(code)])
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, folder / f"{name}.ipynb")
    return folder


def test_job_resources_come_from_the_profile():
    smoke, full = get_profile("smoke"), get_profile("full")
    r = cluster.JobResources.of(smoke, "01_victim_training", threads=2)
    assert (r.cpus, r.gpus, r.mem_gb, r.minutes, r.partition) == (2, 0, 8, 60, "")
    assert r.slurm_parameters() == {"cpus_per_task": 2, "mem": "8G", "time": 60}
    g = cluster.JobResources.of(full, "09_attack_ida", threads=1)
    assert (g.gpus, g.mem_gb, g.minutes) == (0, 32, 48 * 60)  # no GPU: the code computes on the CPU
    assert "gpus_per_node" not in g.slurm_parameters()
    gpu = get_profile("full", job_gpus=1)
    assert cluster.JobResources.of(gpu, "09_attack_ida", threads=1).slurm_parameters()["gpus_per_node"] == 1
    assert cluster.JobResources.of(gpu, "00_orientation", threads=1).gpus == 0  # reads committed results only
    p = cluster.JobResources.of(get_profile("smoke", job_partition="gpu-a100", job_gpus=2), "evidence", 1)
    assert p.slurm_parameters()["partition"] == "gpu-a100" and p.slurm_parameters()["gpus_per_node"] == 2
    with pytest.raises(ValueError, match="job_partition"):
        get_profile("smoke", job_partition="a b")
    with pytest.raises(ValueError, match="job_minutes"):
        get_profile("smoke", job_minutes=0)


def test_every_job_asks_for_its_own_resources(monkeypatch, tmp_path):
    """submitit keeps parameters across update_parameters calls: a GPU asked for by one notebook
    must not carry over to the next seed's CPU-only 00 (one executor per job)."""
    import submitit

    asked: list[dict] = []

    class Recorder:
        def __init__(self, folder, python):
            self.params: dict = {}

        def update_parameters(self, **kwargs):
            self.params.update(kwargs)

        def submit(self, fn, *args):
            asked.append(dict(self.params))
            job = type("J", (), {})()
            job.job_id = str(len(asked))
            job.paths = type("P", (), {"result_pickle": tmp_path / "none"})()
            return job

    monkeypatch.setattr(submitit, "SlurmExecutor", Recorder)
    monkeypatch.setattr(cluster, "_wait", lambda submitted, *rest: (True, ""))
    books = [b for b in run.list_notebooks() if b.name[:2] in ("00", "01", "02")]
    jobs = run.schedule(books, [0, 1], jobs=2)
    cfg = {s: get_profile("full", job_gpus=1, seed=s) for s in (0, 1)}
    assert cluster.run_jobs_slurm(jobs, "full", {}, cfg, 0, tmp_path, say=lambda s: None) == (True, "")
    by_name = {a["job_name"]: a for a in asked}
    job_id = {a["job_name"]: str(i + 1) for i, a in enumerate(asked)}  # the recorder's ids, in order
    assert set(by_name) == {f"cip-full-s{s}-{n}" for s in (0, 1) for n in ("00", "01", "02")}
    for s in (0, 1):
        assert "gpus_per_node" not in by_name[f"cip-full-s{s}-00"] and by_name[f"cip-full-s{s}-00"]["dependency"] is None
        assert by_name[f"cip-full-s{s}-01"]["gpus_per_node"] == 1 and by_name[f"cip-full-s{s}-01"]["cpus_per_task"] == 2
        assert by_name[f"cip-full-s{s}-02"]["dependency"] == f"afterok:{job_id[f'cip-full-s{s}-01']}"
        assert by_name[f"cip-full-s{s}-02"]["additional_parameters"] == {"kill_on_invalid_dep": "yes"}


def test_jobs_are_submitted_after_their_prerequisites():
    jobs = run.schedule(run.list_notebooks(), [0, 1], jobs=2)
    order = cluster._topological(jobs)
    assert sorted(j.key for j in order) == sorted(j.key for j in jobs)
    seen: set = set()
    for j in order:
        assert j.needs <= seen, f"{j.key} submitted before {sorted(j.needs - seen)}"
        seen.add(j.key)
    jobs[0].needs = {jobs[-1].key}
    jobs[-1].needs = {jobs[0].key}
    with pytest.raises(ValueError, match="cycle"):
        cluster._topological(jobs)


def test_both_executors_give_a_job_the_same_threads_and_command():
    """What makes the numbers executor-independent: a SLURM job runs the worker with the
    thread counts of THREADS (not capped by the driver's cores) and the same environment."""
    books = run.list_notebooks()
    local = {j.key: j.threads for j in run.schedule(books, [0], jobs=2)}
    slurm = {j.key: j.threads for j in run.schedule(books, [0], jobs=max(run.THREADS.values()))}
    assert local == slurm  # on a machine with >= 2 cores (this course's)
    assert run.worker_env(2)["OMP_NUM_THREADS"] == "2" and run.worker_env(1)["MKL_NUM_THREADS"] == "1"


def test_failure_reason_is_the_workers_line():
    assert run.failure_reason("noise\nCIP-RUN-FAILED cell [3]: ValueError: x\n", 1) == "cell [3]: ValueError: x"
    assert "signal 9" in run.failure_reason("", -9)
    assert "exit status 2" in run.failure_reason("Traceback ... boom", 2)
    err = "Traceback\n  ...\ncip_helpers.tools.cluster.JobFailed: cell [2]: ValueError: broken\n"
    assert cluster._job_error(err) == "cell [2]: ValueError: broken"


def test_slurm_executor_without_slurm_says_how_to_fix(tmp_path, monkeypatch, results_root):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, squeue, ...
    nbs = _notebooks(tmp_path / "nbs", {"01_a": "x = 1"})
    with pytest.raises(SystemExit, match="slurm-client"):
        run.main(["--profile", "smoke", "--executor", "slurm"], notebook_dir=nbs)


def test_timings_name_the_executor(results_root):
    cfg = get_profile("smoke")
    path = run.record_timings(cfg, [0], 2, 1.0, {"seed-0": {}}, executor="slurm")
    runs = json.loads(path.read_text())["runs"]
    assert list(runs) == ["seeds=0 {slurm}"] and runs["seeds=0 {slurm}"]["executor"] == "slurm"
    run.record_timings(cfg, [0], 2, 1.0, {"seed-0": {}})
    assert set(json.loads(path.read_text())["runs"]) == {"seeds=0 {slurm}", "seeds=0"}


@pytest.mark.slow
def test_slurm_runs_the_graph_and_reports_a_failure_with_its_log(slurm_cluster, tmp_path, results_root, capsys):
    """02 fails: it is reported with notebook, seed, cell and log; 03 (needs 02) is cancelled by
    SLURM; 01 and the other seed's 01 finish; a re-run after the fix completes."""
    nbs = _notebooks(tmp_path / "nbs", {"01_first": "import os; open('ran-01', 'w').write(os.environ['OMP_NUM_THREADS'])",
                                        "02_bad": "raise ValueError('broken on purpose')",
                                        "03_after": "x = 3"})
    status = run.main(["--profile", "smoke", "--executor", "slurm", "--seeds", "0,1"], notebook_dir=nbs)
    out, err = capsys.readouterr()
    assert status == 1
    assert "02_bad.ipynb (seed 0) failed in cell [" in err and "ValueError: broken on purpose" in err
    log = Path(err.split("log ", 1)[1].split()[0])
    assert log.exists() and "broken on purpose" in log.read_text()
    assert "not run, a prerequisite failed: " in err and "seed 0 03_after.ipynb" in err and "seed 1 03_after.ipynb" in err
    executed = results_root / "smoke" / "seed-0" / "executed"
    assert (executed / "01_first.ipynb").exists() and not (executed / "03_after.ipynb").exists()
    assert (results_root / "smoke" / "seed-1" / "executed" / "01_first.ipynb").exists()
    assert (nbs / "ran-01").read_text() == "2"  # THREADS["01"]: the SLURM job's thread count
    _notebooks(nbs, {"02_bad": "x = 2"})  # the fix
    assert run.main(["--profile", "smoke", "--executor", "slurm", "--seeds", "0,1", "--only", "01,02,03"],
                    notebook_dir=nbs) == 0  # --only: no aggregate of these toy notebooks
    assert (executed / "03_after.ipynb").exists()


@pytest.mark.slow
def test_slurm_reports_a_job_past_its_time_limit(slurm_cluster, tmp_path, results_root, capsys):
    nbs = _notebooks(tmp_path / "nbs", {"01_slow": "import time; time.sleep(600)"})
    status = run.main(["--profile", "smoke", "--executor", "slurm", "--set", "job_minutes=1"], notebook_dir=nbs)
    err = capsys.readouterr().err
    assert status == 1
    assert "01_slow.ipynb (seed 0)" in err and "time limit" in err and "job_minutes" in err
