"""The Table IV analog: our records beside the paper's numbers."""
from __future__ import annotations

from cip_helpers import report


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
