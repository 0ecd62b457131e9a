"""Fashion-MNIST end to end through the real data path (issue 17): Debian's package
``dataset-fashion-mnist`` -> ``data_prep`` -> ``cip_helpers.course.data_full`` -> every notebook on the
smoke profile. Needs the package (``.ci/run`` installs it as root); without it these tests skip
with the reason, and fail instead when ``CIP_REQUIRE_FMNIST=1`` (set by ``.ci/run`` after it
installed the package), so CI cannot pass by skipping them."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from cip_helpers.tools import report, run
from cip_helpers.course.config import get_profile
from data_prep import fetch

from fmnist_util import PACKAGE
from fmnist_util import package_folder as _package_folder


@pytest.fixture(scope="module")
def fmnist_root(tmp_path_factory) -> Path:
    """A data root with the real Fashion-MNIST laid out by ``python -m data_prep.fetch --offline``."""
    _package_folder()
    root = tmp_path_factory.mktemp("fmnist_data")
    assert fetch.main(["--root", str(root), "--dataset", "fashionmnist", "--offline"]) == 0
    return root


@pytest.mark.slow
def test_issue17_real_fashionmnist_through_data_prep(fmnist_root, capsys):
    raw = fetch.raw_dir(fmnist_root) / "FashionMNIST" / "raw"
    for name, md5 in fetch.IDX_MD5["fashionmnist"].items():  # the original files' content
        assert hashlib.md5((raw / name).read_bytes()).hexdigest() == md5, name
    manifest = json.loads((fmnist_root / "manifest.json").read_text())["files"]
    for split, n in (("train", 60_000), ("test", 10_000)):
        path = fmnist_root / "id" / "fashionmnist" / f"{split}.npz"
        entry = manifest[f"id/fashionmnist/{split}.npz"]
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert PACKAGE.package in entry["source"]
        with np.load(path) as f:
            x, y, classes = f["x"], f["y"], list(f["classes"])
        assert x.shape == (n, 1, 28, 28) and x.dtype == np.uint8 and y.dtype == np.int64
        assert np.bincount(y, minlength=10).tolist() == [n // 10] * 10  # class-balanced, 10 classes
        assert classes[0] == "T-shirt/top" and classes[9] == "Ankle boot"
        assert 60 < x.mean() < 90  # Fashion-MNIST's mean pixel is ~73 (MNIST's ~33)
    capsys.readouterr()
    assert fetch.main(["--root", str(fmnist_root), "--dataset", "fashionmnist", "--offline"]) == 0
    assert capsys.readouterr().out.count("skip") == 2


@pytest.mark.slow
def test_issue17_smoke_profile_runs_on_real_fashionmnist(fmnist_root, tmp_path, monkeypatch):
    """Every notebook of the smoke profile on the real data (a class-balanced 600 / 200 of it),
    with the embedded MNIST digits as the near-distribution pool, as quick-fmnist does."""
    monkeypatch.setenv("CIP_DATA_ROOT", str(fmnist_root))
    monkeypatch.setenv("CIP_RESULTS_ROOT", str(tmp_path / "results"))
    sets = ["--set", "dataset=fashionmnist", "--set", "near_source=mnist_digits", "--set", "tag=smoke-fmnist"]
    assert run.main(["--profile", "smoke", *sets]) == 0
    cfg = get_profile("smoke", dataset="fashionmnist", near_source="mnist_digits", tag="smoke-fmnist")
    assert len(list((cfg.results_dir / "executed").glob("*.ipynb"))) == len(run.list_notebooks())
    records = report.load_all_records(cfg)
    assert records and {r["dataset"] for r in records} == {"fashionmnist"}
    victims = json.loads((cfg.results_dir / "victims.json").read_text())
    assert victims["all"] > 0.5  # one epoch on 600 real images; chance is 0.1
    table = report.table_iv(records)
    dfme = table[(table["attack"] == "dfme") & table["paper task"].notna()]
    assert set(dfme["paper task"]) == {"FMNIST/RN18"} and 93.19 in set(dfme["paper Test(M_V)"])


def test_issue17_quick_fmnist_is_the_quick_profile_on_fashionmnist():
    import dataclasses

    quick, fm = get_profile("quick"), get_profile("quick-fmnist")
    differ = {f.name for f in dataclasses.fields(quick) if getattr(quick, f.name) != getattr(fm, f.name)}
    assert differ == {"name", "dataset", "near_source"}
    assert (fm.dataset, fm.near_source, fm.pools) == ("fashionmnist", "mnist_digits", "embedded")
    assert fm.profile_dir.name == "quick-fmnist"


def test_issue17_near_pool_of_a_clothes_victim_is_the_embedded_mnist_digits(results_root):
    import torch

    from cip_helpers.course import data

    cfg = get_profile("quick-fmnist", n_near=300, mixed_curve=())
    assert data.has_near_pool(cfg)
    near = data.query_pool(cfg, "near")  # no Fashion-MNIST file is needed for this pool
    x, y = data._all_embedded_mnist()
    idx = data._mnist_digit_index(300, data._pool_seed("near", cfg.seed))
    assert len(set(idx.tolist())) == 300 and torch.equal(near, x[torch.from_numpy(idx)])
    assert data.near_characters(cfg) == [str(int(y[i])) for i in idx]
    assert list(data.near_groups(cfg)) == ["MNIST digits"] and bool(data.near_groups(cfg)["MNIST digits"].all())
    other = data.query_pool(get_profile("quick-fmnist", n_near=300, mixed_curve=(), seed=1), "near")
    assert not torch.equal(near, other)
    assert list(data.near_groups(get_profile("smoke"))) == ["printed digits", "printed letters"]
    with pytest.raises(ValueError, match="5,000 digits"):
        data.mnist_digit_pool(5001, 28, 0)


def test_issue17_committed_quick_fmnist_results_have_three_seeds_and_the_paper_dfme_rows():
    from cip_helpers.course.config import REPO_ROOT

    base = REPO_ROOT / "results" / "quick-fmnist"
    summary = json.loads((base / "summary.json").read_text())
    assert summary["dataset"] == "fashionmnist" and summary["n_seeds"] >= 3
    for row in summary["rows"]:
        assert row["surrogate_acc"]["n"] >= 3 and row["surrogate_acc"]["sd"] is not None, row["name"]
    dfme = {r["defense"]: r for r in summary["rows"] if r["attack"] == "dfme" and not r.get("ablation")}
    assert set(dfme) == {"none", "oe", "dp", "dawn", "cip"}
    paper = {d: (r["paper"] or {}).get("surrogate_acc") for d, r in dfme.items()}
    assert paper == {"none": 91.31, "oe": None, "dp": 42.09, "dawn": 90.41, "cip": 12.21}
    assert {r["paper_task"] for d, r in dfme.items() if d != "oe"} == {"FMNIST/RN18"}
    table = (base / "table.md").read_text()
    dfme_lines = [ln for ln in table.splitlines() if ln.startswith("| dfme |") and "FMNIST/RN18" in ln]
    assert len(dfme_lines) == 4 and all(" ± " in ln for ln in dfme_lines)
    for seed in summary["seeds"]:  # the per-seed records are committed too, on the real data
        records = report.seed_records(base, seed)
        assert records and {r["dataset"] for r in records} == {"fashionmnist"}


def test_issue17_tasks_course_lays_out_the_data_of_a_data_profile(monkeypatch):
    """``python3 tasks.py course --profile quick-fmnist`` runs data_prep for Fashion-MNIST first
    and stops with its status when that fails; the quick course runs no data_prep step."""
    import importlib.util

    from cip_helpers.course.config import PROFILES, REPO_ROOT

    spec = importlib.util.spec_from_file_location("cip_tasks", REPO_ROOT / "tasks.py")
    tasks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tasks)
    assert {p: PROFILES[p].dataset for p in tasks.DATA_PROFILES} == tasks.DATA_PROFILES
    assert tasks._profile_of(["--profile", "quick-fmnist", "--seeds", "0,1"]) == "quick-fmnist"
    assert tasks._profile_of(["--profile=quick-fmnist"]) == "quick-fmnist"
    calls = []

    class Done:
        def __init__(self, code):
            self.returncode = code

    monkeypatch.setattr(tasks, "ensure_venv", lambda: None)
    monkeypatch.setattr(tasks, "install_notebook_filter", lambda *a, **k: False)  # git config: not this test's
    monkeypatch.setattr(tasks.subprocess, "run", lambda cmd, cwd: calls.append(cmd[1:]) or Done(3))
    assert tasks.main(["course", "--profile", "quick-fmnist"]) == 3  # data_prep failed: no course
    assert calls == [["-m", "data_prep.fetch", "--dataset", "fashionmnist"]]
    calls.clear()
    monkeypatch.setattr(tasks.subprocess, "run", lambda cmd, cwd: calls.append(cmd[1:]) or Done(0))
    assert tasks.main(["course"]) == 0
    assert calls == [["-m", "cip_helpers.tools.run", "--profile", "quick"]]
