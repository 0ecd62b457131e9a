"""Issue 15: faithful to the authors' CIP. The PBD answer, per-attack settings, the paper's metric
definitions and the citation, each checked with numbers (smoke-sized runs, a few seconds each)."""
from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

from cip_helpers.method import poisoning
from cip_helpers.course import attacks, config, dfme, pipeline
from cip_helpers.tools import report
from cip_helpers.course.config import REPO_ROOT
from cip_helpers.method.defenses import CIP, NoDefense, softmax
from cip_helpers.method.scores import reliability_score

SHAPE = (1, 8, 8)
TINY = dict(n_train=200, n_test=100, n_outlier=100, n_knockoff=200, victim_epochs=1, oe_epochs=1,
            surrogate_epochs=2, ida_epochs=2, knockoff_queries=200, knockoff_curve=(100, 200))


def ambiguous_rows(n: int, k: int = 10, seed: int = 0) -> torch.Tensor:
    """Rows like the ones PBD flips: two classes share almost all of the mass."""
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(n, k, generator=g) * 0.02
    a = torch.randint(0, k, (n,), generator=g)
    b = (a + torch.randint(1, k, (n,), generator=g)) % k
    share = 0.35 + 0.3 * torch.rand(n, generator=g)
    rows = torch.arange(n)
    p[rows, a] += share
    p[rows, b] += 1 - share
    return p / p.sum(1, keepdim=True)


# --- item 1: the PBD answer ------------------------------------------------------------------

def test_issue15_authors_pbd_answer_is_near_one_hot_on_a_random_other_class():
    p = ambiguous_rows(3000)
    lowest = p[reliability_score(p).argsort()[:500]]  # the lowest-R rows: what PBD flips
    q = poisoning.flip(lowest, "authors", generator=torch.Generator().manual_seed(1))
    top = q.max(1).values
    assert float(top.mean()) >= 0.9 and float(top.min()) >= 0.925 - 1e-6  # 100 / (100 + 9 / 1.11)
    assert (q.argmax(1) != lowest.argmax(1)).all()  # never the original top
    # a class drawn uniformly from the other nine: each appears about 1/9 of the time
    offset = (q.argmax(1) - lowest.argmax(1)) % 10
    share = torch.bincount(offset, minlength=10)[1:].double() / len(q)
    assert 0.06 < float(share.min()) and float(share.max()) < 0.17
    assert abs(float((q.argmax(1) == lowest.argmin(1)).double().mean()) - 1 / 9) < 0.05
    # the inverse (the course's earlier answer) is flat and always the argmin: what the issue saw
    inv = poisoning.flip(lowest, "inverse")
    assert float(inv.max(1).values.mean()) < 0.5
    assert (inv.argmax(1) == lowest.argmin(1)).all()
    table = poisoning.compare_pbd_answers(lowest, generator=torch.Generator().manual_seed(1))
    assert table.loc["authors", "mean_top_mass"] >= 0.9 > table.loc["inverse", "mean_top_mass"]
    assert table.loc["authors", "label_is_original_top"] == table.loc["inverse", "label_is_original_top"] == 0


def test_issue15_sharpened_inverse_is_the_release_formula_by_hand():
    # p = (0.5, 0.25, 0.25): first argmin is index 1, t = 0.0025;
    # q = (0.5 + 11 t, t, 0.25 + 11 t) = (0.5275, 0.0025, 0.2775), answer = (1/q) / sum(1/q)
    p = torch.tensor([[0.5, 0.25, 0.25]])
    inv = torch.tensor([1 / 0.5275, 1 / 0.0025, 1 / 0.2775], dtype=torch.float64)
    want = (inv / inv.sum()).float()
    assert torch.allclose(poisoning.sharpened_inverse(p), want[None], atol=1e-6)
    # the shuffle moves that row around but keeps its values
    u = torch.tensor([[0.9, 0.1, 0.5, 0.3]], dtype=torch.float64)  # argsort: (1, 3->n/a, 2, 0)
    out = poisoning.pbd_authors(p, u)
    assert torch.allclose(out.sort(1).values, want.sort().values[None], atol=1e-6)
    assert out.argmax(1).item() != 0


@pytest.mark.parametrize("bad", [torch.rand(2, 3), torch.full((1, 4), 1.0, dtype=torch.float64)])
def test_issue15_pbd_authors_refuses_bad_randomness(bad):
    with pytest.raises(ValueError, match=r"pbd_authors needs u"):
        poisoning.pbd_authors(ambiguous_rows(1, k=3), bad)


class ConstantCNN(nn.Module):
    """Deterministic logits from the image: a fixed random linear map (eval only)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.flatten(1)) * 0.3


def everything_flipped(pbd_answer: str = "authors", seed: int = 0) -> CIP:
    # E1/E2 far above any energy: every query routes ID; R1 above any R: every one is flipped
    return CIP(ConstantCNN(), SHAPE, e1=1e6, e2=2e6, pbd="online", r1=10.0, seed=seed, pbd_answer=pbd_answer)


def test_issue15_pbd_answer_is_keyed_per_query_and_batch_invariant():
    x = torch.rand(40, *SHAPE, generator=torch.Generator().manual_seed(3))
    one_call = everything_flipped()(x)
    api = everything_flipped()
    singles = torch.cat([api(x[i:i + 1]) for i in range(len(x))])
    # the same answers (the victim's float32 logits may differ in the last bit between batch sizes)
    assert torch.equal(one_call.argmax(1), singles.argmax(1))
    assert torch.allclose(one_call, singles, atol=1e-5)
    assert torch.allclose(api(x[:5]), one_call[:5], atol=1e-5)  # asked again: the same answer
    other_key = everything_flipped(seed=1)(x)
    assert not torch.equal(other_key.argmax(1), one_call.argmax(1))
    assert float(one_call.max(1).values.min()) >= 0.9


def test_issue15_inverse_remains_selectable_and_bad_names_are_refused():
    x = torch.rand(8, *SHAPE, generator=torch.Generator().manual_seed(4))
    api = everything_flipped("inverse")
    out = api(x)
    assert torch.allclose(out, poisoning.inverse(api.last_clean), atol=1e-7)
    with pytest.raises(ValueError, match="unknown PBD answer 'inverted'"):
        everything_flipped("inverted")
    with pytest.raises(ValueError, match="unknown PBD answer"):
        poisoning.flip(api.last_clean, "inverted")
    with pytest.raises(ValueError, match="pbd_answer='x': must be one of"):
        config.get_profile("smoke", pbd_answer="x")


# --- items 2-5: per-attack settings -----------------------------------------------------------

def test_issue15_half_victim_uses_the_authors_p1_and_an_ablation_p1_is_not_stored(results_root):
    cfg = config.get_profile("smoke", **TINY)
    assert (pipeline.split_p1(cfg, "all"), pipeline.split_p1(cfg, "half")) == (95.0, 80.0)
    half = pipeline.get_thresholds(cfg, "half")
    assert half["p1"] == 80.0 and pipeline.get_thresholds(cfg, "all")["p1"] == 95.0
    before = (cfg.results_dir / "thresholds.json").read_text()
    at95 = pipeline.get_thresholds(cfg, "half", p1=95.0)
    assert at95["p1"] == 95.0 and at95["E1"] > half["E1"]  # a higher percentile: a higher E1
    assert (cfg.results_dir / "thresholds.json").read_text() == before
    assert pipeline.get_defense(cfg, "cip", "half", p1=95.0).e1 == at95["E1"]
    rec = attacks.run_ida(cfg, "cip", "hard", p1=95.0, verbose=False)
    assert rec["setting"] == "hard_p1-95" and rec["ablation"] == "E1 at p1 = 95"
    assert rec["defense_kwargs"]["p1"] == 95.0


def test_issue15_label_types_and_pbd_per_attack(results_root):
    cfg = config.get_profile("smoke", **TINY)
    ida = attacks.run_ida(cfg, "cip", verbose=False)
    assert (ida["label_type"], ida["setting"], ida["defense_kwargs"]["pbd"]) == ("hard", "hard", "offline_top_T")
    assert attacks.run_ida(cfg, "none", "soft", verbose=False)["label_type"] == "soft"
    dqa = attacks.run_dqa(cfg, "cip", 1.0, verbose=False)
    assert dqa["label_type"] == "soft" and dqa["defense_kwargs"]["pbd"] == "offline_top_T"
    ko = attacks.run_knockoff(cfg, "cip", "hard", verbose=False)
    # offline top-T among ID-routed queries, or no PBD at all when nothing routes ID
    t_expected = attacks.offline_pbd_T(cfg, attacks.knockoff_queries(cfg), "all", cfg.knockoff_pbd_T)
    assert ko["defense_kwargs"]["pbd_T"] == t_expected
    assert ko["defense_kwargs"]["pbd"] == ("offline_top_T" if t_expected else None)
    assert ko["n_triggers"] == t_expected
    # the table's metrics: the OE model's own accuracy, the API's, best and final epochs
    assert ko["oe_victim_acc"] == attacks.oe_victim_accuracy(cfg)
    assert len(ko["history"]) == cfg.surrogate_epochs
    assert ko["surrogate_best_acc"] == pytest.approx(max(h["test_acc"] for h in ko["history"]), abs=1e-5)
    assert ko["history"][-1]["test_acc"] == pytest.approx(ko["surrogate_acc"], abs=1e-5)


def test_issue15_dfme_cip_has_no_pbd_and_gradient_queries_can_bypass_the_defense(results_root):
    cfg = config.get_profile("smoke", **TINY)
    rec, _ = attacks.run_dfme(cfg, "cip", verbose=False)
    assert rec["defense_kwargs"] == {"strong": "shuffle_noise", "pbd": None}
    assert rec["n_triggers"] is None and rec["trigger_file"] is None
    victim_grad, _ = attacks.run_dfme(cfg, "cip", verbose=False, grad_queries="victim")
    assert victim_grad["setting"] == "victim-grad" and victim_grad["queries"] == rec["queries"]
    assert victim_grad["surrogate_sha256"] != rec["surrogate_sha256"]
    none_a, _ = attacks.run_dfme(cfg, "none", verbose=False)
    none_b, _ = attacks.run_dfme(cfg, "none", verbose=False, grad_queries="victim")
    assert none_a["surrogate_sha256"] == none_b["surrogate_sha256"]  # the same experiment
    with pytest.raises(ValueError, match="grad_queries must be one of"):
        attacks.run_dfme(cfg, "dp", verbose=False, grad_queries="both")


def test_issue15_gradient_queries_are_counted_but_answered_by_the_model_behind_the_defense():
    model = ConstantCNN()
    api = everything_flipped()
    counted = dfme.CountingAPI(api, budget=10)
    clean = counted.via(NoDefense(model, SHAPE))
    x = torch.rand(4, *SHAPE)
    assert torch.allclose(clean(x), softmax(model(x)), atol=1e-7)
    assert counted.n_queries == 4 and api.totals["queries"] == 0  # the defense never saw them
    counted(x[:3])
    assert counted.n_queries == 7 and api.totals["queries"] == 3
    with pytest.raises(dfme.QueryBudgetExceeded):
        clean(x)  # 4 more would exceed the budget of 10, whoever answers


# --- item 6: metric definitions -----------------------------------------------------------------

def fake(attack, defense, setting, acc, **kw):
    base = {"attack": attack, "defense": defense, "setting": setting, "label_type": "hard",
            "victim_acc": 0.97, "defended_acc": acc - 0.01, "surrogate_acc": acc, "trigger_acc": None,
            "n_triggers": None, "oe_victim_acc": None, "surrogate_best_acc": acc + 0.02}
    return {**base, **kw}


def test_issue15_table_has_the_papers_test_mv_the_api_accuracy_and_best_epochs():
    records = [fake("ida", "none", "hard", 0.9),
               fake("ida", "cip", "hard", 0.8, oe_victim_acc=0.95, defended_acc=0.93),
               fake("ida", "cip", "hard_p1-95", 0.7, oe_victim_acc=0.95, ablation="E1 at p1 = 95")]
    main = report.table_iv(records)
    assert list(main["setting"]) == ["hard", "hard"]  # ablations stay out of the main table
    cip = main[main["defense"] == "cip"].iloc[0]
    assert (cip["Test(M'_V)"], cip["API acc"], cip["Test(M_S)"], cip["Test(M_S) best"]) == (95.0, 93.0, 80.0, 82.0)
    assert pd_isna(main[main["defense"] == "none"].iloc[0]["Test(M'_V)"])
    ab = report.table_iv(records, ablations=True)
    assert list(ab["ablation"]) == ["E1 at p1 = 95"] and ab.iloc[0]["Test(M_S) no defense"] == 90.0
    assert not any(c.startswith("paper") for c in ab.columns)
    assert attacks.best_epoch([{"epoch": 1, "test_acc": 0.5}, {"epoch": 2, "test_acc": 0.7},
                               {"epoch": 3, "test_acc": 0.6}]) == (0.7, 2)
    assert attacks.best_epoch([]) == (None, None)


def pd_isna(v) -> bool:
    import pandas as pd

    return v is None or bool(pd.isna(v))


# --- item 9: the citation -----------------------------------------------------------------------

def test_issue15_citation_is_right_everywhere():
    import cip_helpers

    readme = (REPO_ROOT / "README.md").read_text()
    assert "H. Zhang, G. Hua, X. Wang, H. Jiang, W. Yang" in readme
    assert "10.1109/TIFS.2023.3244107" in readme
    assert cip_helpers.CITATION.startswith("Haitian Zhang, Guang Hua, Xinya Wang, Hao Jiang, Wen Yang")
    assert "10.1109/TIFS.2023.3244107" in cip_helpers.CITATION
    meta = json.loads((REPO_ROOT / "cip_helpers" / "tools" / "paper_table_iv.json").read_text())
    assert "10.1109/TIFS.2023.3244107" in meta["source"]
    # no author with another initial anywhere in the course's sources
    initials = {"Zhang": "H", "Hua": "G", "Wang": "X", "Jiang": "H", "Yang": "W"}
    files = [REPO_ROOT / "README.md", REPO_ROOT / "pyproject.toml", *REPO_ROOT.glob("cip_helpers/*.py"),
             *REPO_ROOT.glob("cip_helpers/*.json"), *REPO_ROOT.glob("notebooks/*.ipynb")]
    for f in files:
        for initial, name in re.findall(r"\b([A-Z])\. (Zhang|Hua|Wang|Jiang|Yang)\b", f.read_text()):
            assert initial == initials[name], f"{f.name}: {initial}. {name}"


def test_issue15_full_profile_takes_the_papers_T_per_dataset():
    full = config.get_profile("full")
    assert (full.dataset, full.pbd_offline_T, full.knockoff_pbd_T) == ("cifar10", 87, 17)
    assert config.get_profile("full", dataset="cifar100").pbd_offline_T == 49
    assert config.get_profile("full", dataset="food101").pbd_offline_T == 101
    # no paper T for the dataset: the course's fraction of ID-routed queries; an explicit T wins
    assert config.get_profile("full", dataset="mnist").pbd_offline_T == config.DEFAULT_PBD_FRACTION
    assert config.get_profile("full", dataset="cifar100", pbd_offline_T=5).pbd_offline_T == 5


def test_issue15_records_of_an_older_version_are_refused(tmp_path):
    """IDA's records were renamed (ida_cip -> ida_cip_hard): a stale ida_cip.json left in metrics/
    must not sit in the table next to the new one."""
    metrics = tmp_path / "quick" / "seed-0" / "metrics"
    metrics.mkdir(parents=True)
    new = fake("ida", "cip", "hard", 0.9, ablation=None)
    new.update({k: None for k in attacks.REQUIRED_KEYS if k not in new}, name="ida_cip_hard")
    (metrics / "ida_cip_hard.json").write_text(json.dumps(new))
    assert len(report.seed_records(tmp_path / "quick", 0)) == 1
    old = {k: v for k, v in new.items() if k not in ("surrogate_best_acc", "oe_victim_acc", "ablation")}
    (metrics / "ida_cip.json").write_text(json.dumps({**old, "name": "ida_cip"}))
    with pytest.raises(ValueError, match=r"ida_cip.json lacks .*older version of the course. Delete it"):
        report.seed_records(tmp_path / "quick", 0)


def test_issue15_differences_are_read_from_the_summary_and_the_papers_table():
    def st(*values):
        return report.stat(list(values))

    rows = [{"attack": "dfme", "setting": None, "label_type": "logits", "defense": "dp",
             "surrogate_acc": st(0.10, 0.12, 0.11)},
            {"attack": "dfme", "setting": "victim-grad", "label_type": "logits", "defense": "dp",
             "surrogate_acc": st(0.40, 0.50, 0.45), "ablation": "gradient queries bypass the defense"},
            {"attack": "knockoff", "setting": "hard", "label_type": "hard", "defense": "cip",
             "n_triggers": st(0, 0, 0), "routes_id": st(0, 2, 0)}]
    table = report.differences({"seeds": [0, 1, 2], "rows": rows})
    dp = table[table["difference"] == "DP vs DFME"].iloc[0]
    assert dp["ours"] == "11.0 ± 1.0; gradient queries past the defense (authors): 45.0 ± 5.0"
    assert dp["paper"] == "57.67"  # Table IV, MNIST/RN18
    t = table[table["difference"] == "CIP vs KnockoffNets: trigger set T"].iloc[0]
    assert t["ours"].startswith("0.0 ± 0.0 (queries routed ID per seed: 0, 2, 0)")
    assert t["paper"].startswith("17")
    assert (table["ours"].str.contains("n/a")).any()  # rows whose runs are missing say so
    assert list(table.columns) == ["difference", "ours", "paper", "cause", "shown by"]
