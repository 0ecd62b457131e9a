"""The full profile proven on real data (issue 29).

* ``paper-fmnist`` is the full profile on the whole Fashion-MNIST with ResNet-18 victims.
* ``data_prep.standins`` lays out small STAND-IN pools in the stored format (the 300K outlier
  set, an ImageNet subset and DTD cannot be downloaded here), marked as stand-ins in the manifest.
* The slow test runs the full profile's chain (notebooks 01, 02, 03 and one attack of each kind:
  07 KnockoffNets, 08 DFME, 09 IDA, 10 DQA) through the runner on the real Fashion-MNIST of
  Debian's ``dataset-fashion-mnist`` and the stand-in pools, shrunk by overrides to fit CI.
* ``benchmarks/cost_table.py``'s plan (what the paper-size grid trains) and the committed cost
  table in ``results/paper-fmnist/``.

The real-data test needs the Debian package (``.ci/run`` installs it as root); without it it is
skipped with the reason, and fails instead when ``CIP_REQUIRE_FMNIST=1`` (as in
``tests/test_fashion_mnist.py``).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from cip_helpers.course import config, data_full
from cip_helpers.course.config import DEFAULT_PBD_FRACTION, REPO_ROOT, get_profile
from data_prep import fetch, standins

from fmnist_util import package_folder as _package_folder
CHAIN = ("01", "02", "03", "07", "08", "09", "10")
STANDIN_SIZES = {"outlier": 256, "knockoff": 64, "textures": 32}
"""Stand-in pools of the chain test: the outlier pool is subsampled (n_outlier < its size), the
Knockoff and textures pools are read whole (n_knockoff = n_textures = 0), so both stored-pool
paths of ``data_full.load_pool_array`` run."""
SHRINK = {
    # data: 12 real images per class (half victim and IDA attacker: 6 per class), 4 test per class;
    # pools from the stand-ins (STANDIN_SIZES): a subset of the outliers, the whole Knockoff and
    # textures stand-ins (0 = the whole stored pool)
    "n_train": 120, "n_test": 40, "n_outlier": 128, "n_knockoff": 0, "n_textures": 0, "n_noise": 32,
    "n_near": 32, "mixed_photos": 16, "mixed_curve": "[24]", "knockoff_queries": 32, "knockoff_curve": "[16,32]",
    # epochs: one of each victim stage; two of every surrogate so the step schedule's milestone
    # (after epoch 1) fires: the full recipe (SGD + Nesterov, lr 0.1, decay 5e-4, x0.2 at a milestone)
    "victim_epochs": 1, "oe_epochs": 1, "surrogate_epochs": 2, "ida_epochs": 2, "surrogate_milestones": "[1]",
    # CPU time: ~45 surrogates are trained in 03/07/09; a WRN-28-10 training step costs ~0.15 CPU s
    # per image here (the ResNet-18 victims' ~0.015 s), so the notebooks train the course's small CNN
    # and one WRN-28-10 surrogate is trained by the test itself (the same attacks.run_knockoff path)
    "surrogate_arch": "cnn",
    # DFME: one round per run (16 x (1 x (1 + 1) + 5) = 112 queries); generator, gain, lrs, 5 student
    # steps, no replay and the ResNet-18 student are the full profile's
    "dfme_batch": 16, "dfme_queries": 112, "dfme_eval_every": 112,
    # grids: two points each (03's trade-off; the profile's own p1 = 95 is among them, as on full)
    "tradeoff_p1": "[80.0,95.0]", "tradeoff_p2": "[99.0,99.9]", "dqa_ratios": "[1.0]",
    # T stays a fraction of the ID-routed queries, as paper-fmnist's 0.35 %, which would round to
    # 0 triggers on ~30-50 ID-routed queries; 5 % gives a few, so PBD and trigger scoring run
    "pbd_offline_T": 0.05, "knockoff_pbd_T": 0.05,
    "dawn_rate": 0.05,  # likewise DAWN: 0.5 % of 32-120 queries watermarks none
    "cell_timeout": 900, "tag": "paper-fmnist-ci",
}
"""The overrides of the chain test, and why. Everything not named here is paper-fmnist's, i.e.
the full profile's: stored pools, ResNet-18 victims (SGD lr 0.1, batch 128, cosine), the OE recipe
(SGD + Nesterov, decay 5e-4, cosine per step to 1e-6, 64 ID + 128 outliers per step, crop + flip
of the outliers, m_in -25, m_out -7), the surrogate recipe (SGD, step schedule, batch 128, raw
Knockoff images: gamma 0), DFME's (ResNet-18 student, nz 256, generator (128, 64), gain 2, one
gradient estimate and 5 student steps per round, no replay, constant lr: only its batch and budget
shrink) and the thresholds (p1 95, p1_half 80)."""


def _cost_table():
    spec = importlib.util.spec_from_file_location("cip_cost_table", REPO_ROOT / "benchmarks" / "cost_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- paper-fmnist


def test_issue29_paper_fmnist_is_the_full_profile_on_the_whole_fashionmnist():
    full, paper = get_profile("full"), get_profile("paper-fmnist")
    differ = {f.name for f in dataclasses.fields(full) if getattr(full, f.name) != getattr(paper, f.name)}
    assert differ == {"name", "dataset", "victim_arch", "near_source", "pbd_offline_T", "knockoff_pbd_T"}
    assert config.check_ranges(paper) == []
    assert (paper.dataset, paper.n_train, paper.n_test, paper.pools) == ("fashionmnist", 0, 0, "stored")
    assert (paper.victim_arch, paper.dfme_arch) == ("resnet18", "resnet18")  # Table IV: FMNIST/RN18
    assert paper.surrogate_arch == full.surrogate_arch == "wrn28_10"  # the authors' --Surrogate_model wrn28
    assert paper.pbd_offline_T == paper.knockoff_pbd_T == DEFAULT_PBD_FRACTION == 0.0035  # no paper T for FMNIST
    assert "fashionmnist" not in config.PAPER_TRIGGER_T
    assert (paper.job_gpus, paper.job_mem_gb, paper.job_minutes) == (full.job_gpus, full.job_mem_gb, full.job_minutes)
    assert paper.job_gpus == 0 and paper.near_source == "mnist_digits" and paper.n_near <= 5000
    assert paper.profile_dir.name == "paper-fmnist"
    shrunk = get_profile("paper-fmnist", **{k: config.coerce_field(k, v) for k, v in SHRINK.items()})
    assert config.check_ranges(shrunk) == [] and shrunk.results_dir.parent.name == "paper-fmnist-ci"


# ----------------------------------------------------------------------------- stand-in pools


def test_issue29_standin_pools_are_in_the_stored_format_and_marked(tmp_path, monkeypatch):
    from cip_helpers.course import data
    from data_prep.build import read_manifest, sha256_file

    assert {k: s.photos for k, s in standins.STANDINS.items()} == {
        "outlier": data.OE_PHOTOS, "knockoff": data.KNOCKOFF_PHOTOS, "textures": data.TEXTURE_PHOTOS}
    assert set(standins.STANDINS) == set(data_full.POOL_NAMES)
    assert max(s.n for s in standins.STANDINS.values()) <= 3000  # small: a few thousand images at most
    sizes = {"outlier": 12, "knockoff": 8, "textures": 6}
    paths = standins.build_standins(tmp_path, sizes)
    manifest = read_manifest(tmp_path)["files"]
    for name, n in sizes.items():
        arr = data_full.open_pool_file(paths[name], name, tmp_path)  # the reader of the full profile
        assert arr.dtype == np.uint8 and arr.shape == (n, 3, 32, 32)
        assert 20 < arr.mean() < 235 and arr.std() > 10  # photo crops, not blank images
        entry = manifest[f"pools/{name}.npy"]
        assert entry["stand_in"] is True and "STAND-IN" in entry["source"]
        assert entry["stands_in_for"] == standins.STANDINS[name].stands_for
        assert entry["made_from"] == [f"skimage.data.{p}" for p in standins.STANDINS[name].photos]
        assert entry["sha256"] == sha256_file(paths[name]) and data_full.is_stand_in(tmp_path, paths[name])
    # the outlier and Knockoff stand-ins share no photograph (the defender cannot know the thief's images)
    assert not set(standins.STANDINS["outlier"].photos) & set(standins.STANDINS["knockoff"].photos)
    # deterministic: a forced rebuild writes the same bytes
    before = {name: sha256_file(p) for name, p in paths.items()}
    standins.build_standins(tmp_path, sizes, force=True)
    assert {name: sha256_file(p) for name, p in paths.items()} == before
    # the full profile's loader converts them to the ID format (28 x 28 gray for Fashion-MNIST)
    monkeypatch.setenv("CIP_DATA_ROOT", str(tmp_path))
    cfg = get_profile("paper-fmnist", n_outlier=0, n_knockoff=5, n_textures=0)
    with pytest.warns(UserWarning, match="STAND-IN pool .* not the paper's outlier pool"):  # a run says so
        x = data.query_pool(cfg, "outlier")
    assert x.shape == (12, 1, 28, 28) and x.dtype.is_floating_point and 0 <= float(x.min()) <= float(x.max()) <= 1
    with pytest.warns(UserWarning, match="STAND-IN"):
        assert data.query_pool(cfg, "knockoff").shape == (5, 1, 28, 28)
    with pytest.warns(UserWarning, match="STAND-IN"):
        assert data.query_pool(cfg, "textures").shape == (6, 1, 28, 28)
    # another data root in the same process is read anew, not served from the cache of the first
    other = tmp_path / "other"
    standins.build_standins(other, {"outlier": 7, "knockoff": 8, "textures": 6})
    monkeypatch.setenv("CIP_DATA_ROOT", str(other))
    with pytest.warns(UserWarning, match=f"{other}.*STAND-IN"):
        assert data.query_pool(cfg, "outlier").shape == (7, 1, 28, 28)


def test_issue29_a_standin_never_replaces_a_real_pool_and_fetch_replaces_a_standin(tmp_path, capsys):
    from data_prep.build import read_manifest, record_in_manifest, save_npy, sha256_file

    # a real pool (no stand-in mark) is kept by the stand-in step
    real = save_npy(np.full((3, 3, 32, 32), 7, np.uint8), tmp_path / "pools" / "textures.npy")
    record_in_manifest(tmp_path, real, pool="textures", shape=[3, 3, 32, 32], source="DTD")
    standins.build_standin(tmp_path, "textures", n=5)
    assert np.load(real).shape == (3, 3, 32, 32) and not data_full.is_stand_in(tmp_path, real)
    assert "is a real pool" in capsys.readouterr().out
    # a stand-in is replaced by the real file on the next fetch step (not skipped as "exists")
    path = standins.build_standin(tmp_path, "outlier", n=4)
    src = tmp_path / "manual" / "300K_random_images.npy"
    src.parent.mkdir()
    np.save(src, np.arange(5 * 32 * 32 * 3, dtype=np.uint64).astype(np.uint8).reshape(5, 32, 32, 3))
    fetch.fetch_outlier(tmp_path, src, expected_n=5)
    assert "replacing it with the real pool" in capsys.readouterr().out
    assert np.load(path).shape == (5, 3, 32, 32) and not data_full.is_stand_in(tmp_path, path)
    entry = read_manifest(tmp_path)["files"]["pools/outlier.npy"]
    assert "stand_in" not in entry and entry["sha256"] == sha256_file(path)
    assert standins.main(["--root", str(tmp_path), "--n-outlier", "3", "--n-knockoff", "3", "--n-textures", "3"]) == 0
    assert not data_full.is_stand_in(tmp_path, path)  # the real outlier pool stayed
    assert data_full.is_stand_in(tmp_path, tmp_path / "pools" / "knockoff.npy")


# ----------------------------------------------------------------------------- the chain, real data


@pytest.fixture(scope="module")
def full_profile_data_root(tmp_path_factory) -> Path:
    """A data root with the real Fashion-MNIST (``python -m data_prep.fetch --offline``, from
    Debian's package) and the stand-in pools (:data:`STANDIN_SIZES`)."""
    _package_folder()
    root = tmp_path_factory.mktemp("full_profile_data")
    assert fetch.main(["--root", str(root), "--dataset", "fashionmnist", "--offline"]) == 0
    standins.build_standins(root, STANDIN_SIZES)
    return root


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*is a STAND-IN pool:UserWarning")  # on purpose: stand-ins are all there is
def test_issue29_full_profile_chain_runs_on_real_fashionmnist(full_profile_data_root, tmp_path, monkeypatch):
    """Notebooks 01, 02, 03, 07, 08, 09 and 10 of ``paper-fmnist`` (the full profile on
    Fashion-MNIST) through the runner, to the end, on the real Fashion-MNIST and the stand-in
    pools, shrunk by :data:`SHRINK` (its comments say which overrides and why: sizes, epochs and
    budgets for CI time, the CNN surrogate of the notebooks because ~45 WRN-28-10 surrogates do not
    fit, PBD and DAWN rates that leave triggers on a few dozen queries). Then one WRN-28-10 surrogate (the
    profile's own surrogate architecture) is trained through the same ``attacks.run_knockoff`` path.

    The numbers are not the paper's: one epoch on 120 images leaves a ResNet-18 near chance. The
    assertions check what ran: the records of every attack and defense, the architectures and
    recipes in the checkpoints' specs, that the stand-in pools were what the notebooks read, and
    that counts follow the profile (queries, T from the fraction, DFME's budget)."""
    import torch

    from cip_helpers.course import attacks, data, dfme
    from cip_helpers.course.store import load_checkpoint, read_json
    from cip_helpers.method.digests import tensor_sha256
    from cip_helpers.tools import report, run

    root = full_profile_data_root
    monkeypatch.setenv("CIP_DATA_ROOT", str(root))
    monkeypatch.setenv("CIP_RESULTS_ROOT", str(tmp_path / "results"))
    sets = [a for k, v in SHRINK.items() for a in ("--set", f"{k}={v}")]
    assert run.main(["--profile", "paper-fmnist", "--only", ",".join(CHAIN), *sets]) == 0

    cfg = get_profile("paper-fmnist", **{k: config.coerce_field(k, v) for k, v in SHRINK.items()})
    out = cfg.results_dir
    executed = sorted(p.name[:2] for p in (out / "executed").glob("*.ipynb"))
    assert executed == list(CHAIN)

    # 01: ResNet-18 victims on the real images (sizes from the overrides, the whole test split's classes)
    d = data.id_data(cfg)
    assert d.name == "fashionmnist" and d.classes[0] == "T-shirt/top" and len(d.classes) == 10
    assert (len(d.train_x), len(d.test_x), len(d.half_idx), len(d.attacker_idx)) == (120, 40, 60, 60)
    assert 0.2 < float(d.train_x.mean()) < 0.4  # Fashion-MNIST's mean pixel (~0.29; MNIST's ~0.13)
    victims = read_json(out / "victims.json")
    assert set(victims) == {"all", "half"} and all(0.0 <= v <= 1.0 for v in victims.values())
    for split in ("all", "half"):
        spec, _, _ = load_checkpoint(cfg.checkpoint_dir / f"victim_{split}.pt")
        assert (spec["arch"], spec["dataset"], spec["input_shape"]) == ("resnet18", "fashionmnist", [1, 28, 28])
        assert (spec["lr"], spec["batch_size"], spec["weight_decay"]) == (0.1, 128, 5e-4)
        # 02: the authors' OE recipe, fine-tuned on the STORED (stand-in) outlier pool
        oe, _, _ = load_checkpoint(cfg.checkpoint_dir / f"oe_victim_{split}.pt")
        assert oe["pools"] == "stored" and oe["n_outlier"] == 128 and (oe["m_in"], oe["m_out"]) == (-25.0, -7.0)
        assert {k: oe[k] for k in ("optimizer", "lr_schedule", "in_batch", "out_batch", "outlier_augment",
                                   "weight_decay", "lr_min")} == {
            "optimizer": "sgd", "lr_schedule": "cosine_step", "in_batch": 64, "out_batch": 128,
            "outlier_augment": "crop_flip", "weight_decay": 5e-4, "lr_min": 1e-6}
    ood = read_json(out / "ood_metrics.json")
    assert {"Knockoff pool", "OE outliers", "textures", "noise", "near-distribution"} <= set(ood)
    for name in ("Knockoff pool", "OE outliers", "textures", "noise", "near-distribution"):
        assert all(0.0 <= ood[name][k] <= 1.0 for k in ("auroc_before", "auroc_after", "fpr95_before", "fpr95_after"))
    thresholds = read_json(out / "thresholds.json")
    assert thresholds["E1"] < thresholds["E2"] and thresholds["half"]["E1"] < thresholds["half"]["E2"]
    assert (thresholds["p1"], thresholds["half"]["p1"]) == (95.0, 80.0)
    # 03: the trade-off grid ran (the data has a near pool: the embedded MNIST digits)
    grid = read_json(out / "threshold_tradeoff.json")
    assert [r["p1"] for r in grid["p1"]] == [80.0, 95.0] and [r["p2"] for r in grid["p2"]] == [99.0, 99.9]

    # the stored stand-in pools were what the notebooks read: the transfer sets' sha256 in the
    # records equal the queries rebuilt here from the stand-in files through data_full
    manifest = json.loads((root / "manifest.json").read_text())["files"]
    assert all(manifest[f"pools/{n}.npy"]["stand_in"] for n in STANDIN_SIZES)
    knockoff = data_full.load_pool_array("knockoff", root, 28, 1, 0, data._pool_seed("knockoff", cfg.seed))
    assert len(knockoff) == STANDIN_SIZES["knockoff"]
    assert torch.equal(data.query_pool(cfg, "knockoff"), knockoff.float().div(255))
    queries = attacks.knockoff_queries(cfg)
    assert torch.equal(queries, knockoff[: cfg.knockoff_queries].float().div(255))  # knockoff_gamma 0: raw
    records = {r["name"]: r for r in report.load_all_records(cfg)}
    assert records["knockoff_none_soft"]["queries_sha256"] == tensor_sha256(queries)
    assert records["knockoff_cip_mixed_soft"]["queries_sha256"] == tensor_sha256(attacks.mixed_queries(cfg)[0])
    assert data.query_pool(cfg, "textures").shape == (STANDIN_SIZES["textures"], 1, 28, 28)

    # every attack of each kind against every defense, on this data, with the profile's models
    assert {r["dataset"] for r in records.values()} == {"fashionmnist"}
    main = {(r["attack"], r["defense"]) for r in records.values() if not r.get("ablation")}
    assert {("knockoff", d) for d in ("none", "oe", "dp", "dawn", "cip")} <= main
    assert {("dfme", d) for d in ("none", "oe", "dp", "dawn", "cip")} <= main
    assert {(a, d) for a in ("ida", "dqa") for d in ("none", "dp", "dawn", "cip")} <= main
    for r in records.values():
        assert 0.0 <= r["surrogate_acc"] <= 1.0 and 0.0 <= r["victim_acc"] <= 1.0, r["name"]
        assert r["trigger_acc"] is None or 0.0 <= r["trigger_acc"] <= 1.0, r["name"]
    assert records["knockoff_none_soft"]["queries"] == 32 and records["knockoff_none_mixed_soft"]["queries"] == 48
    assert records["ida_none_hard"]["queries"] == 60 and records["dqa_none_r1"]["queries"] == 120
    assert records["dqa_none_r1"]["queries_trained"] == 60
    # offline PBD: T = round(5 % of the ID-routed queries), from the fraction as on paper-fmnist
    for name in ("ida_cip_hard", "dqa_cip_r1", "knockoff_cip_mixed_soft"):
        r = records[name]
        n_id = r["routes"]["ID"]
        assert r["n_triggers"] == round(0.05 * n_id) and r["routes"]["PBD flipped"] == r["n_triggers"], name
    assert records["ida_cip_hard"]["n_triggers"] >= 1  # PBD and the trigger scoring ran
    # the surrogates: the full recipe (SGD, step schedule) on the notebooks' small CNN; DQA's are IDA's
    spec, _, _ = load_checkpoint(out / records["ida_none_soft"]["surrogate_checkpoint"])
    assert {k: spec[k] for k in ("arch", "optimizer", "lr_schedule", "lr_milestones", "lr_gamma", "lr",
                                 "batch_size", "weight_decay")} == {
        "arch": "cnn", "optimizer": "sgd", "lr_schedule": "step", "lr_milestones": [1], "lr_gamma": 0.2,
        "lr": 0.1, "batch_size": 128, "weight_decay": 5e-4}
    assert records["dqa_none_r1"]["surrogate_sha256"] == records["ida_none_soft"]["surrogate_sha256"]
    # every DQA surrogate is IDA's (same kept answers): what the cost table assumes for notebook 10
    assert all(r["surrogate_loaded"] for r in records.values() if r["attack"] == "dqa")
    # DFME: the ResNet-18 student, the full profile's generator, the budget spent in whole rounds
    round_queries = dfme.DFMERecipe.from_profile(cfg).round_queries
    assert round_queries == 16 * (1 * (1 + 1) + 5)
    for name in ("dfme_none", "dfme_cip", "dfme_dp_victim-grad"):
        r = records[name]
        assert r["surrogate_arch"] == "resnet18" and r["queries"] == (112 // round_queries) * round_queries, name
        student, _, _ = load_checkpoint(out / r["surrogate_checkpoint"])
        assert (student["nz"], student["gen_channels"], student["gain"], student["s_iter"], student["replay"]) == (
            256, [128, 64], 2.0, 5, 0)
    assert records["dfme_cip"]["n_triggers"] is None  # no PBD against DFME (the authors' release)

    # the profile's own surrogate architecture, WRN-28-10, through the same path (a curve point of
    # 16 queries, 2 epochs of the step recipe): attacks.run_knockoff with arch="wrn28_10"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        wrn = attacks.run_knockoff(cfg, "none", "soft", n_queries=16, arch="wrn28_10", verbose=False)
    finally:
        torch.set_num_threads(threads)
    assert wrn["surrogate_arch"] == "wrn28_10" and wrn["queries"] == 16 and 0.0 <= wrn["surrogate_acc"] <= 1.0
    spec, _, state = load_checkpoint(out / wrn["surrogate_checkpoint"])
    assert (spec["arch"], spec["input_shape"], spec["lr_schedule"]) == ("wrn28_10", [1, 28, 28], "step")
    assert sum(v.numel() for k, v in state.items() if k.endswith("weight")) > 30_000_000  # WRN-28-10: 36.5M


# ----------------------------------------------------------------------------- cost table


def test_issue29_cost_plan_counts_the_paper_size_grid():
    """The plan of benchmarks/cost_table.py: the training steps the paper-fmnist grid implies."""
    cost = _cost_table()
    cfg = get_profile("paper-fmnist")
    items = cost.plan(cfg)
    by = lambda nb, what: next(i for i in items if i.notebook == nb and i.what.startswith(what))  # noqa: E731
    assert cost.sizes(cfg)["N"] == 60_000 and cost.sizes(cfg)["Nt"] == 10_000 and cost.sizes(cfg)["Na"] == 30_000
    assert by("01", "victim 'all'").count == math.ceil(60_000 / 128) * 100 == 46_900
    assert by("01", "victim 'half'").count == math.ceil(30_000 / 128) * 100
    assert by("02", "OE fine-tuning 'all'").count == math.ceil(60_000 / 64) * 10
    assert by("07", "10 x photo pool").count == 10 * math.ceil(50_000 / 128) * 100
    assert by("07", "10 x photo pool").arch == "wrn28_10"
    assert by("09", "13 x IDA").count == 13 * math.ceil(30_000 / 128) * 100
    dfme_item = by("08", "7 DFME runs")
    assert (dfme_item.arch, dfme_item.batch, dfme_item.count) == ("resnet18", 256, 7 * (6_000_000 // (256 * 7)))
    assert not [i for i in items if i.notebook == "10" and i.kind == "train"]  # DQA reuses IDA's surrogates
    assert {i.arch for i in items if i.notebook == "11" and i.kind == "train"} == {"cnn", "cnn_wide", "mlp"}
    # FLOPs: a training step is 3 forward passes per image
    fwd = {"resnet18": 1.0, "wrn28_10": 10.0, "generator": 0.5, "cnn": 0.1, "cnn_plain": 0.1, "cnn_wide": 0.2,
           "mlp": 0.01}
    assert cost.item_flops(by("01", "victim 'all'"), cfg, fwd) == 46_900 * 128 * 3
    assert cost.item_flops(by("02", "OE fine-tuning 'all'"), cfg, fwd) == 9_380 * (64 + 128) * 3
    b = 256  # gradient estimate: B(m + 1) student + victim forwards and a generator step; 5 student steps
    one_round = b * 2 * (1.0 + 1.0) + 3 * b * 0.5 + 5 * b * (0.5 + 1.0 + 3 * 1.0)
    assert cost.item_flops(dfme_item, cfg, fwd) == pytest.approx(dfme_item.count * one_round)


def test_issue29_committed_cost_table_matches_the_plan():
    """results/paper-fmnist/cost.json: written by benchmarks/cost_table.py for the profile as it
    is (its step counts are the plan's), every CPU-hour is count x measured CPU seconds per step,
    the totals add up, and cost.md shows them with the submit command."""
    cost = _cost_table()
    path = REPO_ROOT / "results" / "paper-fmnist" / "cost.json"
    result = json.loads(path.read_text())
    cfg = get_profile("paper-fmnist")
    assert result["profile"] == "paper-fmnist" and result["overrides"] == {}
    assert [(r["notebook"], r["step"], r["count"]) for r in result["table"]["items"]] == [
        (i.notebook, cost.step_key(i), i.count) for i in cost.plan(cfg)]
    assert result["command"] == "python -m cip_helpers.tools.run --profile paper-fmnist --seeds 0,1,2 --executor slurm"
    assert {"torch", "cpu_count", "torch_threads"} <= set(result["machine"]) and result["machine"]["torch_threads"] == 1
    assert result["assumptions"]["gpu"]["effective_flops"] == pytest.approx(0.3 * 19.5e12)
    for r in result["table"]["items"]:
        step = result["per_step"][r["step"]]
        assert step["cpu_s"] > 0 and r["cpu_h"] == pytest.approx(r["count"] * step["cpu_s"] / 3600), r["what"]
        assert r["gpu_h"] == pytest.approx(r["flops"] / result["assumptions"]["gpu"]["effective_flops"] / 3600)
    notebooks = result["table"]["notebooks"]
    assert set(notebooks) == {"01", "02", "03", "04", "05", "06", "07", "08", "09", "10", "11"}
    one, three = result["table"]["total_1_seed"], result["table"]["total_3_seeds"]
    assert one["cpu_h"] == pytest.approx(sum(n["cpu_h"] for n in notebooks.values()))
    assert one["gpu_h"] == pytest.approx(sum(n["gpu_h"] for n in notebooks.values()))
    assert three["cpu_h"] == pytest.approx(3 * one["cpu_h"]) and three["gpu_h"] == pytest.approx(3 * one["gpu_h"])
    md = (REPO_ROOT / "results" / "paper-fmnist" / "cost.md").read_text()
    assert result["command"] in md and "estimates only" in md
    assert f"**{cost._fmt(one['cpu_h'])}**" in md and f"**{cost._fmt(three['gpu_h'])}**" in md
