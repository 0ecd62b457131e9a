"""Issue 16: attack traffic that reaches every branch of CIP (the near-distribution pool, the mixed
KnockoffNets pool, the OE-only rows, the threshold trade-off) and the committed quick evidence."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cip_helpers.method import scores
from cip_helpers.course import attacks, config, data, pipeline, plots
from cip_helpers.tools import report, run
from cip_helpers.method.defenses import OEOnly, softmax
from cip_helpers.method.models import predict_logits
from cip_helpers.course.store import CheckpointError
from conftest import one_thread_smoke

REPO = Path(__file__).resolve().parents[1]
QUICK = REPO / "results" / "quick"


@pytest.fixture(scope="module")
def smoke_cfg(tmp_path_factory):
    """The smoke profile in a temporary results root shared by this module (victims, OE victims
    and thresholds are trained on first use), on one torch thread."""
    with one_thread_smoke(tmp_path_factory.mktemp("traffic_results")) as cfg:
        yield cfg


# ------------------------------------------------------------------ the near-distribution pool


def test_issue16_near_pool_is_reproducible_framed_and_disjoint(smoke_cfg):
    cfg = smoke_cfg
    near = data.query_pool(cfg, "near")
    assert near.shape == (cfg.n_near, 1, 28, 28) and near.dtype == torch.float32
    assert float(near.min()) >= 0 and float(near.max()) <= 1
    again = data._query_pool.__wrapped__(cfg.dataset, "near", cfg.n_near, cfg.seed, "characters")
    assert torch.equal(near, again)  # rendered twice (no cache): the same bits
    other_seed = data.render_characters(cfg.n_near, 28, data._pool_seed("near", cfg.seed + 1))
    assert not torch.equal(near, other_seed)
    # MNIST framing: ink centred by mass (a few glyphs shifted so nothing is cut), a black border
    mass = near[:, 0].sum((1, 2))
    grid = torch.arange(28, dtype=torch.float32)
    cy = (near[:, 0].sum(2) * grid).sum(1) / mass
    cx = (near[:, 0].sum(1) * grid).sum(1) / mass
    off = torch.maximum((cy - 14).abs(), (cx - 14).abs())
    assert float(off.median()) < 1.0 and float(off.max()) < 5.0
    for border in (near[:, 0, 0], near[:, 0, -1], near[:, 0, :, 0], near[:, 0, :, -1]):
        assert float(border.max()) == 0.0  # no glyph is cut by the frame
    # characters: digits and letters, as many as images
    chars = data.near_characters(cfg)
    assert len(chars) == cfg.n_near and set(chars) <= set(data.NEAR_CHARACTERS)
    assert any(c.isdigit() for c in chars) and any(c.isalpha() for c in chars)
    # disjoint from the OE outliers and the test digits (no exact image shared)
    flat = {bytes(x.numpy().tobytes()) for x in near}
    for other in (data.query_pool(cfg, "outlier"), data.id_data(cfg).split("test")[0]):
        assert not flat & {bytes(x.numpy().tobytes()) for x in other}


def test_issue16_near_pool_is_refused_for_colour_data_with_the_fix():
    with pytest.raises(ValueError, match="single-channel 28 x 28.*has_near_pool"):
        data._query_pool("cifar10", "near", 10, 0, "characters")
    assert not data.has_near_pool(config.get_profile("full"))
    assert data.has_near_pool(config.get_profile("quick"))


def test_issue16_pool_cache_key_covers_the_renderer(monkeypatch):
    before = data._pool_code_sha256()
    data._pool_code_sha256.cache_clear()
    monkeypatch.setattr(data, "NEAR_FONTS", data.NEAR_FONTS[:-1])
    try:
        assert data._pool_code_sha256() != before
    finally:
        data._pool_code_sha256.cache_clear()


def test_issue16_mnist_frame_refuses_an_empty_glyph_and_keeps_a_tall_one_whole():
    with pytest.raises(ValueError, match="no pixel"):
        data.mnist_frame(torch.zeros(10, 10).numpy())
    with pytest.raises(ValueError, match="at most size - 2"):
        data.mnist_frame(torch.ones(5, 5).numpy(), size=28, box=27)
    glyph = torch.zeros(40, 10)
    glyph[:4] = 1.0  # all mass at the top: centring by mass alone would push the stem out of the frame
    glyph[:, 4:6] = 1.0
    out = torch.from_numpy(data.mnist_frame(glyph.numpy()))
    assert float(out[0].max()) == 0 and float(out[-1].max()) == 0 and int((out.sum(1) > 0).sum()) == 20


# ------------------------------------------------------------------ the mixed pool and the attack


def test_issue16_mixed_queries_mix_both_sources_and_take_prefixes(smoke_cfg):
    cfg = smoke_cfg
    x, src = attacks.mixed_queries(cfg)
    assert len(x) == cfg.n_near + cfg.mixed_photos == attacks.pool_size(cfg, "mixed")
    assert src.bincount().tolist() == [cfg.n_near, cfg.mixed_photos]
    assert src[:50].unique().numel() == 2  # shuffled, not one block after the other
    x50, s50 = attacks.mixed_queries(cfg, 50)
    assert torch.equal(x50, x[:50]) and torch.equal(s50, src[:50])
    with pytest.raises(ValueError, match="mixed pool holds"):
        attacks.mixed_queries(cfg, len(x) + 1)
    with pytest.raises(ValueError, match="pool must be one of"):
        attacks.pool_queries(cfg, "imagenet")


def test_issue16_oe_defense_answers_with_the_oe_victim_and_its_record_checks_that_checkpoint(smoke_cfg):
    cfg = smoke_cfg
    api = pipeline.get_defense(cfg, "oe")
    assert isinstance(api, OEOnly) and api.name == "oe"
    oe_model, info = pipeline.get_oe_victim(cfg, "all", verbose=False)
    x = attacks.knockoff_queries(cfg, 40)
    assert torch.allclose(api(x), softmax(predict_logits(oe_model, x)), atol=1e-6)
    assert api.weights_sha256 == info["weights_sha256"]
    assert attacks.answering_checkpoint("oe") == attacks.answering_checkpoint("cip") == "oe_victim"
    assert attacks.defense_spec(cfg, "oe") != attacks.defense_spec(cfg, "none")
    rec = {"name": "knockoff_oe_hard", "defense": "oe", "victim": "all", "attack": "knockoff",
           "weights_sha256": info["weights_sha256"]}
    attacks.check_record(cfg, rec)  # measured against the OE victim on disk: accepted
    with pytest.raises(ValueError, match="other weights"):
        attacks.check_record(cfg, {**rec, "weights_sha256": pipeline.get_victim(cfg, "all", verbose=False)[1]
                                   ["weights_sha256"]})


def test_issue16_mixed_knockoff_records_route_by_source_and_count_kept_labels(smoke_cfg):
    cfg = smoke_cfg
    r = attacks.run_knockoff(cfg, "cip", "hard", pool="mixed", verbose=False)
    assert r["name"] == "knockoff_cip_mixed_hard" and r["pool"] == "mixed" and r["ablation"] is None
    by_source = r["routes_by_source"]
    assert set(by_source) == set(attacks.MIXED_SOURCES)
    for branch in scores.ROUTE_NAMES:
        assert sum(by_source[s][branch] for s in by_source) == r["routes"][branch]
    assert by_source["near-distribution"]["ID"] > 0 and by_source["photo crops"]["high-ES OOD"] > 0
    assert set(r["labels_kept_by_route"]) == set(scores.ROUTE_NAMES)
    assert 0 <= r["labels_kept"] <= 1
    none = attacks.run_knockoff(cfg, "none", "hard", pool="mixed", verbose=False)
    assert none["labels_kept"] == 1.0 and none["routes_by_source"] is None  # the undefended API itself
    # the low-ES attacker: exactly the queries CIP routes low-ES, an ablation row
    queries, _ = attacks.mixed_queries(cfg)
    n_low = int((attacks.cip_routes(cfg, queries) == 1).sum())
    low = attacks.run_knockoff(cfg, "cip", "hard", pool="mixed", branch=1, verbose=False)
    assert low["queries"] == n_low > 0 and low["name"] == "knockoff_cip_mixed_hard_branch1"
    assert low["routes"]["low-ES OOD"] == n_low and "low-ES" in low["ablation"]
    with pytest.raises(ValueError, match="branch must be one of 0, 1, 2"):
        attacks.run_knockoff(cfg, "cip", "hard", pool="mixed", branch=3, verbose=False)
    for bad in (0, len(queries) + 1, -5):
        with pytest.raises(ValueError, match=r"n_queries must be in \[1, "):
            attacks.run_knockoff(cfg, "none", "hard", n_queries=bad, pool="mixed", verbose=False)
    with pytest.raises(ValueError, match="p1 sets CIP's E1"):
        attacks.run_knockoff(cfg, "dp", "soft", pool="mixed", p1=80.0, verbose=False)


# ------------------------------------------------------------------ notebook 03: redraw and trade-off


def test_issue16_redraw_at_two_p2_values_moves_the_near_distribution_row(smoke_cfg):
    """The function the sliders of notebook 03 call, at two p2 values: the near-distribution
    row's routing fractions differ (smoke victims; the committed quick grid is checked below)."""
    cfg = smoke_cfg
    model, _ = pipeline.get_oe_victim(cfg, "all", verbose=False)
    sets = pipeline.query_sets(cfg)
    assert "near-distribution" in sets
    logits = {name: predict_logits(model, x) for name, x in sets.items()}
    train_logits = predict_logits(model, data.id_data(cfg).split("all")[0])
    rows = []
    for p2 in (97.0, 99.9):
        fig, table = plots.threshold_explorer(logits, train_logits, 90.0, p2, 1.0)
        plots.plt.close(fig)
        rows.append(table.loc["near-distribution"])
    assert abs(rows[0]["high-ES OOD"] - rows[1]["high-ES OOD"]) > 0
    assert rows[0]["high-ES OOD"] > rows[1]["high-ES OOD"]  # a lower E2 sends more to strong PPD


def test_issue16_threshold_tradeoff_is_cached_keyed_and_read_by_the_sliders(smoke_cfg, monkeypatch, capsys):
    cfg = smoke_cfg
    first = attacks.threshold_tradeoff(cfg, verbose=False)
    assert [r["p1"] for r in first["p1"]] == list(cfg.tradeoff_p1)
    assert [r["p2"] for r in first["p2"]] == list(cfg.tradeoff_p2)
    for row in first["p1"]:
        assert all(0 <= row[k] <= 1 for k in ("fidelity", "poisoned_share", "surrogate_acc"))
        assert sum(row["near_shares"].values()) == pytest.approx(1.0)
    low, high = first["p1"][0], first["p1"][-1]
    assert low["E1"] < high["E1"] and low["poisoned_share"] >= high["poisoned_share"]
    # cached: a second call trains nothing
    monkeypatch.setattr(attacks, "run_knockoff", lambda *a, **k: pytest.fail("retrained a cached grid"))
    assert attacks.threshold_tradeoff(cfg, verbose=False) == first
    monkeypatch.undo()
    # a stored grid for other settings is recomputed, with the reason printed
    path = cfg.results_dir / attacks.TRADEOFF_FILE
    stored = json.loads(path.read_text())
    stored["key"]["weights_sha256"] = "0" * 64
    path.write_text(json.dumps(stored))
    again = attacks.threshold_tradeoff(cfg, verbose=True)
    assert "recomputing" in capsys.readouterr().out and again["key"] == first["key"]
    near = attacks.nearest_tradeoff(first, cfg.tradeoff_p1[0] + 1, 100.0)
    assert near["p1"]["p1"] == cfg.tradeoff_p1[0] and near["p2"]["p2"] == cfg.tradeoff_p2[-1]
    plots.plt.close(plots.threshold_tradeoff(first, cfg.p1, cfg.p2))


def test_fresh_clone_course_retrains_the_tradeoff_grids_missing_surrogates(smoke_cfg, capsys):
    """Found on a fresh clone of 6f2dec0: notebook 03 reused the committed grid (its key matched),
    so the p1 rows' surrogates were never trained and notebook 11 failed loading
    ``knockoff_cip_mixed_soft_p1-50``'s checkpoint. A grid whose surrogates are not all on disk
    with the recorded weights is recomputed."""
    cfg = smoke_cfg
    first = attacks.threshold_tradeoff(cfg, verbose=False)
    for row in first["p1"]:  # the committed JSON of a fresh clone, without the checkpoints
        rec = json.loads((cfg.metrics_dir / f"{row['record']}.json").read_text())
        (cfg.results_dir / rec["surrogate_checkpoint"]).unlink(missing_ok=True)
    with pytest.raises(CheckpointError):
        attacks.load_surrogate(cfg, first["p1"][0]["record"])  # what notebook 11 hit
    capsys.readouterr()
    fresh = attacks.threshold_tradeoff(cfg, verbose=True)
    assert "not on disk" in capsys.readouterr().out and fresh["key"] == first["key"]
    for row in fresh["p1"]:  # every surrogate of the grid loads again
        attacks.load_surrogate(cfg, row["record"])


@pytest.mark.parametrize("overrides, message", [
    ({"tradeoff_p1": (99.95,)}, "tradeoff_p1"), ({"tradeoff_p2": (90.0,)}, "tradeoff_p2"),
    ({"mixed_curve": (0,)}, "mixed_curve"), ({"mixed_curve": (4001,)}, "mixed pool's size"),
    ({"n_near": -1}, "n_near")])
def test_issue16_new_profile_fields_are_range_checked(overrides, message):
    with pytest.raises(ValueError, match=message):
        config.get_profile("quick", **overrides)


# ------------------------------------------------------------------ the runner's innocents task


def test_issue16_runner_trains_the_innocent_models_as_a_task_before_11():
    books = run.list_notebooks()
    jobs = run.schedule(books, [0], 2)
    task = [j for j in jobs if j.task == "innocents"]
    assert len(task) == 1 and task[0].threads == 1 and task[0].needs == set()
    eleven = next(j for j in jobs if j.key == (0, "11"))
    assert (0, "innocents") in eleven.needs
    seven = next(j for j in jobs if j.key == (0, "07"))
    assert seven.needs == {(0, "02"), (0, "03"), (0, "06")}  # 03: its grid's surrogate; 06: AM's model
    assert run.prerequisites("07", {"02", "07"}) == {"02"}  # without 03 in the run, still after 02
    only = run.schedule(run.list_notebooks(["07"]), [0], 2)
    assert [j.task for j in only] == [None]
    # the evidence run's grid reuses the attack notebooks' surrogates: it waits for 07, 09 and 10
    evidence = next(j for j in jobs if j.task == "evidence")
    assert evidence.needs == {(0, "07"), (0, "09"), (0, "10")} and (0, "evidence") in eleven.needs
    partial = run.schedule(run.list_notebooks(["09", "11"]), [0], 2)
    assert next(j for j in partial if j.task == "evidence").needs == {(0, "09")}
    with pytest.raises(ValueError, match="unknown task"):
        run.run_task("verify", "smoke", {})


# ------------------------------------------------------------------ the committed quick evidence


def _quick_record(name: str, seed: int = 0) -> dict:
    return json.loads((QUICK / f"seed-{seed}" / "metrics" / f"{name}.json").read_text())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_issue16_mixed_pool_cip_reaches_every_branch_with_a_trigger_set(seed):
    for label in attacks.LABEL_TYPES:
        r = _quick_record(f"knockoff_cip_mixed_{label}", seed)
        assert r["routes"]["ID"] > 0 and r["routes"]["low-ES OOD"] > 0 and r["routes"]["high-ES OOD"] > 0
        assert r["n_triggers"] >= 5 and r["trigger_acc"] is not None


def test_issue16_table_has_oe_rows_for_knockoff_and_dfme():
    summary = json.loads((QUICK / "summary.json").read_text())
    oe = {(r["attack"], r.get("setting") or r.get("label_type")) for r in summary["rows"] if r["defense"] == "oe"}
    assert {("knockoff", "hard"), ("knockoff", "soft"), ("knockoff", "mixed_hard"), ("knockoff", "mixed_soft"),
            ("dfme", "logits")} <= oe
    table = (QUICK / "table.md").read_text()
    assert "| knockoff | mixed_hard | oe |" in table and "| dfme | logits | oe |" in table


def test_issue16_committed_tradeoff_grid_moves_with_p1_and_p2():
    grid = json.loads((QUICK / "seed-0" / attacks.TRADEOFF_FILE).read_text())
    cfg = config.get_profile("quick")
    assert [r["p1"] for r in grid["p1"]] == list(cfg.tradeoff_p1)
    for row in grid["p1"]:
        assert all(row[k] is not None for k in ("fidelity", "poisoned_share", "surrogate_acc", "trigger_acc"))
    shares = [r["poisoned_share"] for r in grid["p1"]]
    assert shares == sorted(shares, reverse=True) and shares[0] > shares[-1]
    near_high = [r["near_shares"]["high-ES OOD"] for r in grid["p2"]]
    assert len(set(near_high)) > 1  # the near-distribution row moves with p2 on the quick victim
    assert (QUICK / "seed-0" / "figures" / "03_threshold_tradeoff.png").exists()


def test_issue16_readme_quotes_the_oe_column_and_mixed_rows():
    readme = (REPO / "README.md").read_text()
    block = readme.split(report.README_BEGIN, 1)[1].split(report.README_END, 1)[0]
    assert "| attack | no defense | OE only | DP | DAWN | CIP |" in block
    assert "KnockoffNets, mixed pool, hard" in block
