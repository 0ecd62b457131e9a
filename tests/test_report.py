"""The Table IV analog: our records beside the paper's numbers."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from cip_helpers.tools import report


def _rec(attack, defense, setting, acc, trig=None, n=None):
    return {"name": f"{attack}_{defense}_{setting}", "attack": attack, "defense": defense,
            "setting": setting, "label_type": "soft", "victim_acc": 0.98, "defended_acc": 0.975,
            "surrogate_acc": acc, "trigger_acc": trig, "n_triggers": n}


def test_paper_rows_come_from_table_iv():
    row = report.paper_row("ida", "cip", None)
    assert (row["task"], row["trigger_acc"], row["n_triggers"]) == ("CIFAR10/WRN28", 100.0, 87)
    assert report.paper_row("dqa", "dawn", "r1")["trigger_acc"] == 57.47
    assert report.paper_row("dqa", "dawn", "r0.5") is None  # the paper reports r = 1 only
    assert report.paper_row("knockoff", "none", "hard")["surrogate_acc"] == 87.75


def test_table_has_undefended_reference_and_percentages():
    records = [_rec("ida", "none", None, 0.95), _rec("ida", "cip", None, 0.94, 1.0, 7),
               _rec("dqa", "dawn", "r1", 0.95, 0.25, 40)]
    df = report.table_iv(records)
    assert list(df["defense"]) == ["none", "cip", "dawn"]  # attack order, then defense order
    cip = df[df["defense"] == "cip"].iloc[0]
    assert (cip["Test(M_S)"], cip["Test(M_S) no defense"], cip["Trig(M_S)"], cip["T"]) == (94.0, 95.0, 100.0, 7)
    assert cip["paper Trig(M_S)"] == 100.0
    md = report.to_markdown(df)
    assert md.count("\n") == 2 + len(df) and "| ida |" in md


def test_trigger_counts_print_as_integers_and_empty_cip_trigger_sets_are_explained():
    records = [_rec("knockoff", "cip", "soft", 0.10, None, 0),
               _rec("knockoff", "dawn", "soft", 0.70, 0.05, 38), _rec("knockoff", "dp", "soft", 0.1)]
    records[0]["routes"] = {"ID": 0, "low-ES OOD": 16, "high-ES OOD": 7984, "PBD flipped": 0}
    df = report.table_iv(records)
    md = report.to_markdown(df)
    assert "| 38 |" in md and "38.00" not in md and "<NA>" not in md and "nan" not in md
    notes = report.table_notes(df, records)
    assert len(notes) == 6 and "knockoff soft" in notes[-1] and "high-ES OOD 7984" in notes[-1]
    assert "_online" in notes[4] and "offline top-T" in notes[4]  # the paper's rows are labelled as such
    assert "every answer got performance-degradation poisoning" in notes[-1]
    records[0]["n_triggers"] = 5
    assert len(report.table_notes(report.table_iv(records), records)) == 5


def test_a_run_on_cached_checkpoints_never_replaces_the_from_scratch_time(results_root):
    """A 3-seed run that reused trained checkpoints (640 s here) once overwrote the from-scratch
    time (1780 s) that the README quotes as set-up time; it is now recorded apart."""
    import json

    from cip_helpers.course import config
    from cip_helpers.tools import run

    cfg = config.get_profile("smoke")
    run.record_timings(cfg, [0, 1, 2], 2, 1780.0, {}, from_scratch=True)
    path = run.record_timings(cfg, [0, 1, 2], 2, 640.0, {}, from_scratch=False)
    runs = json.loads(path.read_text())["runs"]
    assert runs["seeds=0,1,2"]["wall_seconds"] == 1780.0
    assert runs["seeds=0,1,2 (cached)"]["wall_seconds"] == 640.0
    summary = json.loads((config.REPO_ROOT / "results/quick/summary.json").read_text())
    summary["timings"] = {"runs": runs}
    line = [ln for ln in report.readme_block(summary).splitlines() if "Run time" in ln][0]
    assert "29.7 min" in line and "10.7" not in line


def test_verification_summary_counts_distinct_pairs_with_their_bound_and_power_per_attack():
    def verdict(kind, attack, defense, flagged, p, name, suspect, triggers):
        return {"kind": kind, "attack": attack, "defense": defense, "trigger_set": name,
                "suspect": suspect, "suspect_sha256": f"w-{suspect}", "triggers_sha256": triggers,
                "flagged": flagged, "p_value": p,
                "ablations": {"one_rate": {"flagged": kind == "innocent", "p_value": 0.001},
                              "no_units": {"flagged": flagged, "p_value": p},
                              "drop_agreed": {"flagged": False, "p_value": 1.0}}}

    def innocents(name, triggers, p):
        return [verdict("innocent", name.split("_")[0], "cip", False, p, name, f"inn{i}", triggers)
                for i in range(8)]

    # seed 0: IDA and DQA share one trigger set (as CIP's offline top-T does): 8 distinct pairs
    per_seed = {0: [verdict("stolen", "ida", "cip", True, 1e-4, "ida_cip", "s-ida", "t0"),
                    *innocents("ida_cip", "t0", 0.5),
                    verdict("stolen", "dqa", "cip", True, 1e-4, "dqa_cip_r1", "s-dqa", "t0"),
                    *innocents("dqa_cip_r1", "t0", 0.5)],
                2: [verdict("stolen", "ida", "cip", False, 0.2, "ida_cip", "s-ida2", "t2"),
                    *innocents("ida_cip", "t2", 0.3)]}
    s = report.verification_summary(per_seed)
    assert s["innocent"] == {"flagged": 0, "of": 16, "verdicts": 24,
                             "false_claim_upper": s["innocent"]["false_claim_upper"]}
    assert abs(s["innocent"]["false_claim_upper"] - (1 - 0.05 ** (1 / 16))) < 1e-12
    assert s["stolen"]["ida/cip"] == {"flagged": 1, "of": 2, "suspects": 2, "copies": 0, "same_as": [],
                                      "missed": ["seed 2: ida_cip"]}
    assert s["stolen"]["dqa/cip"]["flagged"] == 1  # another surrogate: its own verdict
    assert s["min_innocent_p"] == 0.3
    assert s["ablations"]["one_rate"]["innocent"]["flagged"] == 16
    assert s["ablations"]["drop_agreed"]["stolen"]["ida/cip"]["flagged"] == 0


def test_power_counts_each_suspect_and_trigger_set_once():
    """Claims count once (issue 27): CIP's DQA surrogate is its IDA soft surrogate judged on the same
    trigger set; the second verdict on that (suspect sha256, trigger-set sha256) pair is a copy,
    credited to the first row and never counted as power again, also across ratios and ablations."""
    def stolen(attack, name, suspect, triggers, flagged=True, ablation=None, pbd=None):
        return {"kind": "stolen", "attack": attack, "defense": "cip", "trigger_set": name, "pbd": pbd,
                "suspect": f"surrogate of {name}", "suspect_sha256": suspect, "triggers_sha256": triggers,
                "flagged": flagged, "p_value": 1e-4 if flagged else 0.5, "ablation": ablation}

    per_seed = {0: [stolen("dqa", "dqa_cip_r1", "w-soft", "t-soft"),  # a copy listed first: main rows win anyway
                    stolen("ida", "ida_cip_soft", "w-soft", "t-soft"),
                    stolen("dqa", "dqa_cip_r0.5", "w-soft", "t-soft"),
                    stolen("ida", "ida_cip_hard", "w-hard", "t-hard"),
                    stolen("ida", "ida_cip_soft_p1-95", "w-soft", "t-soft", ablation="E1 at p1 = 95"),
                    stolen("ida", "ida_cip_soft_online", "w-on", "t-on", pbd="online"),
                    stolen("dqa", "dqa_cip_r1_online", "w-on", "t-on", pbd="online")],
                1: [stolen("dqa", "dqa_cip_r1", "w-soft1", "t-soft1", flagged=False)]}
    s = report.verification_summary(per_seed)
    st = s["stolen"]
    # seed 0's DQA verdicts (both ratios) are copies of the IDA soft pair, credited to IDA
    assert st["dqa/cip"] == {"flagged": 0, "of": 1, "suspects": 1, "copies": 2, "same_as": ["ida/cip"],
                             "missed": ["seed 1: dqa_cip_r1"]}
    assert st["ida/cip"]["of"] == 2 and st["ida/cip"]["suspects"] == 2 and st["ida/cip"]["copies"] == 0
    assert st["ida/cip [E1 at p1 = 95]"] == {"flagged": 0, "of": 0, "suspects": 0, "copies": 1,
                                            "same_as": ["ida/cip"], "missed": []}
    assert st["ida/cip online"]["of"] == 1 and st["dqa/cip online"]["of"] == 0
    assert st["dqa/cip online"]["same_as"] == ["ida/cip online"]
    # every main-row pair counted once: 4 distinct pairs, 3 flagged, behind 4 distinct surrogates
    assert s["stolen_total"] == {"flagged": 3, "of": 4, "suspects": 4}
    assert sum(d["flagged"] for d in st.values()) == 3


def test_readme_opens_with_the_overview_figure_of_the_committed_summary():
    """Issue 18: the README's opening figure is results/quick/overview.png, drawn from the
    committed summary.json (its sha256 is stored in the PNG); a figure of another summary fails."""
    from PIL import Image

    from cip_helpers.tools import report

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    first_image = readme.index("![")
    assert "results/quick/overview.png" in readme[first_image:first_image + 200]
    assert first_image < readme.index("## Quick start")
    assert "What CIP adds over DP" in readme[:readme.index("## Quick start")]
    profile = root / "results" / "quick"
    stored = Image.open(profile / "overview.png").text.get(report.OVERVIEW_KEY)
    assert stored == report.summary_digest(profile), (
        "results/quick/overview.png was drawn from another summary.json: "
        "python -m cip_helpers.tools.report aggregate --profile-dir results/quick --seeds 0,1,2")


def test_write_overview_records_the_summary_it_was_drawn_from(tmp_path):
    import shutil

    from PIL import Image

    from cip_helpers.tools import report

    shutil.copy(Path(__file__).resolve().parents[1] / "results" / "quick" / "summary.json", tmp_path)
    path = report.write_overview(tmp_path)
    assert Image.open(path).text[report.OVERVIEW_KEY] == report.summary_digest(tmp_path)
    (tmp_path / "summary.json").write_text((tmp_path / "summary.json").read_text() + " ")
    assert Image.open(path).text[report.OVERVIEW_KEY] != report.summary_digest(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["overview.png", "summary.json"]  # no temp file left


def test_compact_drops_empty_and_constant_columns_and_rounds(capsys):
    """Issue 18: result tables without redundant or empty columns; floats rounded for people."""
    import pandas as pd

    df = pd.DataFrame({"defense": ["cip", "dp"], "queries": [8000, 8000], "oe_victim_acc": [None, None],
                       "surrogate_acc": [0.100000001490116, 0.4379999935]})
    out = report.compact(df)
    assert list(out.columns) == ["defense", "surrogate_acc"] and out["surrogate_acc"].tolist() == [0.1, 0.438]
    assert capsys.readouterr().out == "same in every row: queries = 8000\n"
    assert list(df.columns) == ["defense", "queries", "oe_victim_acc", "surrogate_acc"]  # input unchanged
    one = report.compact(df.iloc[:1])  # one row: nothing is "the same in every row"
    assert "queries" in one and capsys.readouterr().out == ""


def test_paper_targets_are_table_iv_for_the_tasks_the_course_compares_with():
    t = report.paper_targets()
    cip = t[t["defense"] == "cip"].set_index("attack")
    assert cip.loc["knockoff", "Test(M_S)"] == 49.85 and cip.loc["knockoff", "T"] == 17
    assert cip.loc["dfme", "task"] == "MNIST/RN18" and cip.loc["dfme", "Test(M_S)"] == 11.91
    assert cip.loc["dqa (r = 1)", "Trig(M_S)"] == 98.85 and cip.loc["ida", "Test(M'_V)"] == 94.97
    assert set(t["defense"]) == {"none", "dp", "dawn", "cip"} and len(t) == 16
    assert report.paper_targets("fashionmnist").set_index(["attack", "defense"]).loc[("dfme", "dp"), "Test(M_S)"] == 42.09


def test_queries_to_conviction_needs_the_flag_at_every_larger_budget():
    """A thief counts as convicted after n queries only if it stays flagged at every larger
    budget of the grid: one lucky small budget is not a conviction."""
    def point(n, p, seed=0, defense="cip", thief="ida_hard", t=5):
        return {"kind": "stolen", "grid": "conviction", "thief": thief, "defense": defense, "queries": n,
                "T": t, "m": t, "p_value": p, "flagged": p < 0.01}

    per_seed = {0: [point(250, 0.5), point(500, 0.001), point(1000, 0.02), point(2000, 1e-6),
                    point(2000, 0.2, defense="dawn"), {"kind": "innocent", "grid": "conviction", "p_value": 0.001}],
                1: [point(250, 0.001, seed=1), point(2000, 1e-5, seed=1),
                    point(250, 1.0, thief="dqa", t=0)]}  # a point without triggers: p = 1
    rows = report.conviction_rows(per_seed)
    assert len(rows) == 8  # stolen grid verdicts only
    q = report.queries_to_conviction(rows).set_index(["thief", "defense", "seed"])
    assert q.loc[("ida_hard", "cip", 0), "queries_to_conviction"] == 2000
    assert q.loc[("ida_hard", "cip", 1), "queries_to_conviction"] == 250
    assert pd.isna(q.loc[("ida_hard", "dawn", 0), "queries_to_conviction"])
    s = report.conviction_summary(per_seed)
    cip = next(r for r in s["table"] if r["thief"] == "ida_hard" and r["defense"] == "cip")
    assert cip["queries_to_conviction"] == [2000, 250] and cip["convicted"] == 2 and cip["median_queries"] == 1125
    table = report.conviction_table(s)
    assert set(table["convicted"]) == {"2 of 2", "0 of 1"}
    assert report.conviction_summary({0: [point(250, 0.5)][:0]}) is None
    # the grid never counts as power in verification_summary
    assert report.verification_summary(per_seed)["stolen"] == {}


def test_a_run_without_evidence_leaves_the_committed_evidence_grid_alone(results_root):
    """The failing case of issue 27's first fresh-clone run: the committed evidence run leaves grid
    records (and their verdicts) in seed-0/; a student's first run (evidence off) retrains the
    victims, so those records name other weights and surrogates it does not have. They must be
    neither judged again (no checkpoint) nor mixed into this run's tables, and their verdicts must
    survive this run's verification.json."""
    import json
    import shutil

    from cip_helpers.course import config

    cfg = config.get_profile("quick")
    committed = Path(__file__).resolve().parents[1] / "results" / "quick" / "seed-0" / "metrics"
    cfg.metrics_dir.mkdir(parents=True)
    for name in ("ida_cip_hard", "ida_cip_hard_online_n250"):
        shutil.copy(committed / f"{name}.json", cfg.metrics_dir)
    grid = json.loads((cfg.metrics_dir / "ida_cip_hard_online_n250.json").read_text())
    assert grid["grid"] == "conviction"
    grid["weights_sha256"] = "0" * 64  # an earlier run's victim
    (cfg.metrics_dir / "ida_cip_hard_online_n250.json").write_text(json.dumps(grid))
    assert [r["name"] for r in report.load_all_records(cfg, check=False)] == ["ida_cip_hard"]
    with_grid = config.get_profile("quick", evidence=True)
    assert len(report.load_all_records(with_grid, check=False)) == 2
    assert [r["name"] for r in report.seed_records(cfg.profile_dir, 0)] == ["ida_cip_hard"]  # no "mixed weights"
    main = {"kind": "stolen", "trigger_set": "ida_cip_hard", "units": 5}
    grid_verdict = {"kind": "stolen", "trigger_set": "ida_cip_hard_online_n250", "grid": "conviction", "units": 1}
    report.write_verdicts(with_grid, [main, grid_verdict])
    report.write_verdicts(cfg, [main])  # a later run without evidence
    assert report.load_verdicts(cfg.profile_dir, [0]) == {0: [main]}
    assert report.load_verdicts(cfg.profile_dir, [0], evidence=True) == {0: [grid_verdict]}


def test_issue29_compare_machines_measures_the_change_of_the_seed_means(tmp_path):
    """Per row: diff of the 3-seed means against sqrt(sd_a^2/n_a + sd_b^2/n_b); the rows beyond 2
    standard errors and beyond their seed sd are named, and the README line says both."""
    import json
    import math

    def summary(rows):
        return {"profile": "quick", "seeds": [], "rows": [
            {"name": n, "surrogate_acc": {"mean": m, "sd": sd, "n": 3}} for n, m, sd in rows]}

    a, b = tmp_path / "a", tmp_path / "b"
    for d, rows in ((a, [("steady", 0.90, 0.01), ("bimodal", 0.50, 0.20), ("moved", 0.80, 0.01)]),
                    (b, [("steady", 0.90, 0.01), ("bimodal", 0.70, 0.25), ("moved", 0.85, 0.01)])):
        d.mkdir()
        (d / "summary.json").write_text(json.dumps(summary(rows)))
    out = report.compare_machines(a, b, "machine A", "machine B")
    rows = {r["name"]: r for r in out["rows"]}
    assert rows["steady"]["diff"] == 0 and rows["steady"]["z"] == 0
    assert math.isclose(rows["moved"]["se"], math.sqrt(2 * 0.01 ** 2 / 3))
    assert math.isclose(rows["moved"]["z"], 0.05 / math.sqrt(2 * 0.01 ** 2 / 3))
    assert out["beyond_2se"] == ["moved"]  # bimodal: 0.2 apart but within its wide spread
    assert out["beyond_seed_sd"] == ["moved"]
    assert math.isclose(out["surrogate_acc_abs_diff"]["max"], 0.2) and out["surrogate_acc_abs_diff"]["max_row"] == "bimodal"
    committed = json.loads((Path(__file__).parents[1] / "results/quick/summary.json").read_text())
    line = report._reproducibility_line({"same_machine": {"identical": 5, "json_files": 5, "differing": []},
                                         "other_machine": out}, committed)
    assert "Another machine (machine B, against machine A)" in line and "max 20.0, `bimodal`" in line
    assert "1 of 3 rows differ by more than 2 standard errors" in line and "`moved`" in line
    same = report.compare_machines(a, a)
    line = report._reproducibility_line({"same_machine": {"identical": 5, "json_files": 5, "differing": []},
                                         "other_machine": same}, committed)
    assert "none of the 3 rows'" in line and "moves by" not in line
