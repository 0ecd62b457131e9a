"""The results table (Table IV analog, with the paper's numbers alongside) and the ownership-
verification verdicts, built from the JSON records that notebooks 07-10 write."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from torch import nn

from ..course import attacks, pipeline
from ..course.config import Profile, get_profile
from ..course.store import read_json, write_json, write_png, write_text
from ..method import verification
from ..method.digests import weights_sha256

PAPER_TABLE = Path(__file__).with_name("paper_table_iv.json")
# the paper task we put next to each of our attacks (Table IV has no MNIST row for Knockoff/IDA/DQA)
PAPER_TASK = {"knockoff": "CIFAR10/WRN28", "dfme": "MNIST/RN18", "ida": "CIFAR10/WRN28",
              "dqa": "CIFAR10/WRN28"}
PAPER_TASK_BY_DATASET: dict[str, dict[str, str]] = {"fashionmnist": {"dfme": "FMNIST/RN18"}}
"""Where the paper has a row for our dataset itself, it replaces :data:`PAPER_TASK`'s choice
(Table IV runs DFME on MNIST, FMNIST and CIFAR-10, the other attacks on CIFAR-10/100 and FOOD-101)."""
DATASET_LABELS = {"mnist_embedded": "4,000 embedded MNIST digits", "fashionmnist": "Fashion-MNIST"}


def _data_label(dataset: str) -> str:
    """What our victims train on, for prose: ``"4,000 embedded MNIST digits"``, ``"Fashion-MNIST,
    4,000 training images"`` (both quick profiles train on 4,000 images)."""
    label = DATASET_LABELS.get(dataset, dataset)
    return label if dataset == "mnist_embedded" else f"{label}, 4,000 training images"


def _near_label(dataset: str | None) -> str:
    """The near-distribution queries of ``dataset``'s mixed pool, for prose (``data.NEAR_SOURCES``:
    MNIST digits for a Fashion-MNIST victim, printed characters for digit victims)."""
    return "MNIST digits" if dataset == "fashionmnist" else "printed characters"
ATTACK_ORDER = ("knockoff", "dfme", "ida", "dqa")
DEFENSE_ORDER = ("none", "oe", "dp", "dawn", "cip", "am")
"""Row order of a setting; ``oe`` (the OE-tuned victim without poisoning) and ``am`` (Adaptive
Misinformation, a baseline the paper does not run) have no paper row. AM's rows follow CIP's, so
the two defenses' ``API acc`` (benign fidelity) stand side by side."""


def load_all_records(cfg: Profile, check: bool = True) -> list[dict]:
    """Every main-run record under ``metrics/`` (learning-curve points excluded), and the evidence
    run's grid records (``grid`` set: :mod:`cip_helpers.course.evidence`) only when
    ``cfg.evidence`` is on: a run without it leaves the grid of an earlier evidence run alone (its
    surrogates and victim weights are that run's) instead of mixing it into this run's verdicts.
    With ``check``, a record measured against other victim weights than the checkpoints on disk
    raises ``ValueError`` (:func:`attacks.check_record`)."""
    records = [r for r in _read_records(cfg.metrics_dir) if cfg.evidence or not r.get("grid")]
    if check:
        for r in records:
            attacks.check_record(cfg, r)
    return records


def _read_records(metrics: Path) -> list[dict]:
    """The main-run records under ``metrics`` (curve points excluded; :func:`attacks.read_records`)."""
    return [r for r in attacks.read_records(metrics) if not r.get("curve_point")]


EVIDENCE_VERDICTS = "evidence_verification.json"
"""Per seed, the verdicts on the evidence run's grid records (``seed-<k>/``), apart from
``verification.json``: a later run without ``evidence`` rewrites the latter and leaves these."""


def write_verdicts(cfg: Profile, verdicts: list[dict]) -> list[Path]:
    """Split ``verdicts`` (:func:`verification_verdicts`) into this run's ``verification.json`` (main
    and ablation runs) and, with ``cfg.evidence``, :data:`EVIDENCE_VERDICTS` (the grid's). Returns
    the paths written."""
    main = [v for v in verdicts if not v.get("grid")]
    written = [write_json(cfg.results_dir / "verification.json", main)]
    if cfg.evidence:
        written.append(write_json(cfg.results_dir / EVIDENCE_VERDICTS, [v for v in verdicts if v.get("grid")]))
    return written


def load_verdicts(profile_dir: Path, seeds: Sequence[int], evidence: bool = False) -> dict[int, list[dict]]:
    """``{seed: verdicts}`` from ``seed-<k>/verification.json`` (``evidence``: from
    :data:`EVIDENCE_VERDICTS`, the evidence run's grid) of every seed that has one written by this
    version of the test (every verdict has ``units``)."""
    out = {}
    for s in seeds:
        path = Path(profile_dir) / f"seed-{s}" / (EVIDENCE_VERDICTS if evidence else "verification.json")
        found = read_json(path) if path.exists() else []
        if found and all("units" in v for v in found):
            out[s] = found
    return out


def paper_task(attack: str, dataset: str | None = None) -> str:
    """The paper's task (Table IV) our ``attack`` on ``dataset`` is compared with: the dataset's
    own row where the paper has one (:data:`PAPER_TASK_BY_DATASET`, e.g. DFME on Fashion-MNIST ->
    ``FMNIST/RN18``), else :data:`PAPER_TASK`. Raises ``KeyError`` for an unknown attack."""
    return PAPER_TASK_BY_DATASET.get(dataset or "", {}).get(attack) or PAPER_TASK[attack]


def paper_row(attack: str, defense: str, setting: str | None, dataset: str | None = None) -> dict | None:
    """The paper's Table IV row for our (attack, defense) on :func:`paper_task` of ``dataset``;
    DQA only at r=1."""
    key = attack
    if defense in ("oe", "am") or (setting or "").startswith("mixed"):
        return None  # the paper has neither an OE-only nor an AM row, nor a near-distribution pool
    if attack == "ida" and setting not in (None, "hard"):
        return None  # the paper's IDA trains on hard labels
    if attack == "dqa":
        if setting not in ("r1", "r1.0"):
            return None
        key = "dqa_r1"
    rows = json.loads(PAPER_TABLE.read_text())["rows"]
    for row in rows:
        if row["attack"] == key and row["defense"] == defense and row["task"] == paper_task(attack, dataset):
            return row
    if defense == "none":  # the paper's "no defense" numbers live in every row of the task
        for row in rows:
            if row["attack"] == key and row["task"] == paper_task(attack, dataset):
                return {"victim_acc": row["victim_acc"], "surrogate_acc": row["surrogate_acc_no_defense"],
                        "trigger_acc": None, "n_triggers": None, "defended_victim_acc": None}
    return None


def paper_targets(dataset: str | None = None) -> pd.DataFrame:
    """The paper's Table IV numbers this course compares with (notebook 00): per attack (in
    :data:`ATTACK_ORDER`, DQA at r = 1) and defense (none, DP, DAWN, CIP), on the task
    :func:`paper_task` picks for ``dataset``. Columns ``attack``, ``task``, ``defense``,
    ``Test(M_V)``, ``Test(M'_V)`` (CIP's OE-tuned victim), ``Test(M_S)``, ``Trig(M_S)``, ``T``
    (percent; ``T`` a count; empty where the paper gives no number). Source: ``paper_table_iv.json`` (Zhang et al., IEEE TIFS 2023)."""
    rows = []
    for attack in ATTACK_ORDER:
        setting = {"dqa": "r1", "ida": "hard"}.get(attack)
        for defense in (d for d in DEFENSE_ORDER if d not in ("oe", "am")):
            row = paper_row(attack, defense, setting, dataset)
            if row is None:
                continue
            rows.append({"attack": attack + (" (r = 1)" if attack == "dqa" else ""),
                         "task": paper_task(attack, dataset), "defense": defense,
                         "Test(M_V)": row["victim_acc"], "Test(M'_V)": row.get("defended_victim_acc"),
                         "Test(M_S)": row["surrogate_acc"],
                         "Trig(M_S)": row.get("trigger_acc"), "T": row.get("n_triggers")})
    df = pd.DataFrame(rows)
    df["T"] = df["T"].astype("Int64")
    return df


def _setting(r: dict) -> str:
    return r.get("setting") or r.get("label_type") or ""


def _undefended_base(undefended: dict, attack: str, setting: str) -> float | None:
    """The undefended accuracy of ``setting`` or of its longest ``_``-prefix that has one
    (``mixed_soft_p1-50`` -> ``mixed_soft``; ``soft_cnn_plain`` -> ``soft_cnn_plain`` when run)."""
    parts = setting.split("_")
    for k in range(len(parts), 0, -1):
        key = (attack, "_".join(parts[:k]))
        if key in undefended:
            return undefended[key]
    return None


def table_iv(records: list[dict], ablations: bool = False) -> pd.DataFrame:
    """One row per (attack, setting, defense): our numbers in percent beside the paper's.

    Columns (ours): ``Test(M_V)`` the plain victim; ``Test(M_S) no defense`` the undefended
    surrogate of the same setting; ``Test(M'_V)`` the paper's definition, the OE-tuned victim's own
    test accuracy (CIP and OE only); ``API acc`` the defended API's top-1 accuracy on the test digits;
    ``Test(M_S)`` the surrogate's final epoch (our headline) and ``Test(M_S) best`` its best
    epoch (DFME: best curve point), as the authors report; ``Trig(M_S)`` and ``T``.
    ``ablations``: the runs marked as ablations (with an ``ablation`` column) instead of the
    main rows."""
    # an ablation without its own undefended run is compared with its base setting's (prefix)
    undefended = {(r["attack"], _setting(r)): r["surrogate_acc"] for r in records if r["defense"] == "none"}
    records = [r for r in records if not r.get("grid") and bool(r.get("ablation")) == ablations]
    rows = []
    for r in records:
        paper = ((paper_row(r["attack"], r["defense"], r.get("setting"), r.get("dataset")) or {})
                 if not ablations else {})
        pct = lambda v: None if v is None else round(100 * v, 2)  # noqa: E731
        setting = _setting(r)
        base = _undefended_base(undefended, r["attack"], setting)
        row = {"attack": r["attack"], "setting": setting, "defense": r["defense"]}
        if ablations:
            row["ablation"] = r.get("ablation")
        rows.append({
            **row,
            "Test(M_V)": pct(r["victim_acc"]),
            "Test(M_S) no defense": pct(base),
            "Test(M'_V)": pct(r.get("oe_victim_acc")),
            "API acc": pct(r["defended_acc"]),
            "Test(M_S)": pct(r["surrogate_acc"]),
            "Test(M_S) best": pct(r.get("surrogate_best_acc")),
            "Trig(M_S)": pct(r["trigger_acc"]),
            "T": r["n_triggers"],
            "paper task": paper_task(r["attack"], r.get("dataset")) if paper else None,
            "paper Test(M_V)": paper.get("victim_acc"),
            "paper Test(M_S) no defense": paper.get("surrogate_acc_no_defense", paper.get("surrogate_acc")
                                                    if r["defense"] == "none" else None),
            "paper Test(M'_V)": paper.get("defended_victim_acc"),
            "paper Test(M_S)": paper.get("surrogate_acc"),
            "paper Trig(M_S)": paper.get("trigger_acc"),
            "paper T": paper.get("n_triggers"),
        })
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    if ablations:
        df = df.drop(columns=[c for c in df.columns if c.startswith("paper")])
    for col in [c for c in ("T", "paper T") if c in df]:  # counts stay integers next to missing values
        df[col] = df[col].astype("Int64")
    df["_a"] = df["attack"].map(ATTACK_ORDER.index)
    df["_d"] = df["defense"].map(DEFENSE_ORDER.index)
    return df.sort_values(["_a", "setting", "_d"]).drop(columns=["_a", "_d"]).reset_index(drop=True)


def compact(df: pd.DataFrame, digits: int = 3, keep: Sequence[str] = ("defense",)) -> pd.DataFrame:
    """``df`` for people: columns empty in every row are dropped, columns with one value
    in every row (``keep`` excepted) are printed once above the table ("same in every row: ...")
    and dropped, floats are rounded to ``digits``. Returns the reduced table (a copy); ``df`` is
    not changed. An empty ``df`` is returned as it is."""
    if df.empty:
        return df
    out = df.dropna(axis=1, how="all")
    constant = [c for c in out.columns if c not in keep and len(out) > 1
                and out[c].astype(str).nunique(dropna=False) == 1]
    if constant:
        def fmt(v: object) -> str:
            return f"{v:.{digits}g}" if isinstance(v, float) else str(v)

        print("same in every row: " + ", ".join(f"{c} = {fmt(out[c].iloc[0])}" for c in constant))
        out = out.drop(columns=constant)
    return out.round(digits)


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no extra dependency); empty cells for missing values."""
    def cell(v: object) -> str:
        if v is None or v is pd.NA or (isinstance(v, float) and pd.isna(v)):
            return ""
        if isinstance(v, float):
            return f"{v:.2f}"
        return str(v)

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def table_notes(df: pd.DataFrame, records: Sequence[dict] = ()) -> list[str]:
    """Footnotes that explain the empty and surprising cells of :func:`table_iv`'s output;
    ``records`` (optional) supply the per-branch routing counts quoted for CIP runs without
    triggers."""
    datasets = {r.get("dataset") for r in records}
    dataset = datasets.pop() if len(datasets) == 1 else "mnist_embedded"
    task = "Fashion-MNIST" if dataset == "fashionmnist" else "MNIST"
    notes = ["IDA and DQA use the victim trained on half of the ID training set (the attacker holds "
             "the other half), so their Test(M_V) differs from KnockoffNets/DFME.",
             "Test(M'_V) is the paper's: the OE-tuned victim's own test accuracy (CIP and OE only). API acc "
             "is the top-1 accuracy of the defended API's answers on the ID test set. Test(M_S) is the "
             "surrogate's last epoch (our headline); Test(M_S) best its best test epoch (DFME: best "
             "point of the query curve), the number the authors report. Trig(M_S) and T exist only "
             "for DAWN and CIP; DP keeps no trigger set; CIP uses no PBD against DFME (as the authors).",
             f"The paper reports DQA at r = 1 only, and no {task} task for KnockoffNets/IDA/DQA, so "
             "those rows sit beside CIFAR10/WRN28; it gives Test(M'_V) for CIP only.",
             "oe (not in the paper): the OE-tuned victim answering with its own softmax, no poisoning; "
             "between none and cip it separates what outlier exposure does from what the poisoning "
             f"adds. KnockoffNets mixed_*: the mixed pool of {_near_label(dataset)} (near-"
             "distribution) and photo crops (notebook 07); the paper has no such pool.",
             "CIP rows come in two kinds. Settings ending in _online: CIP as an owner serves it, online "
             "PBD (flip an ID-routed query iff R < R1; notebooks 05, 09). Every other CIP row: the paper's "
             "evaluation, offline top-T PBD over the whole transfer set in one call (an evaluation device, "
             "not an API), which is what its Table IV reports."]
    if df.empty:
        return notes
    if (df["defense"] == "am").any():
        notes.append("am (not in the paper): Adaptive Misinformation (Kariyappa & Qureshi, CVPR 2020) around "
                     "the same OE-tuned victim as CIP: queries whose max softmax probability is below tau get "
                     "the answer of a misinformation model trained to avoid the victim's class; tau is set so "
                     "AM changes the top-1 answer of as many ID training images as the served CIP does, so "
                     "compare its API acc with CIP's (the row above). AM keeps no trigger set.")
    routes = {(r["attack"], _setting(r)): r.get("routes") for r in records if r.get("defense") == "cip"}
    for row in df[(df["defense"] == "cip") & (df["T"].fillna(0) == 0) & (df["attack"] != "dfme")
                  ].itertuples(index=False):
        counts = routes.get((row.attack, row.setting)) or {}
        note = (f"CIP has T = 0 for {row.attack} {row.setting}: PBD flipped none of its queries, "
                "so no trigger set exists")
        if counts:
            note += " (routing: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + ")"
            if counts.get("ID", 1) == 0:
                note += ("; no query looked in-distribution, so every answer got "
                         "performance-degradation poisoning")
        notes.append(note + ".")
    return notes


ABLATIONS = {"no_units": {"method": "units", "ood": False},
             "drop_agreed": {"method": "units", "drop_agreed": True},
             "one_rate": {"method": "one_rate"}}
"""Variants of the verification test each verdict also records (notebook 11 compares their
false-claim rate and power): per-trigger units without grouping OOD triggers, dropping units the
pool already agrees with, and the pooled one-rate binomial test the course used before."""


def verification_verdicts(cfg: Profile, records: list[dict], innocents: dict[str, nn.Module],
                          n_classes: int) -> list[dict]:
    """Verdicts (:func:`verification.verify`) for every stolen surrogate with a trigger set (DAWN
    and CIP runs) and, leave-one-out (:func:`verification.leave_one_out`), for every innocent model
    against every such trigger set: an innocent verdict with ``flagged`` True is a false claim.

    Per trigger set: distinct triggers; the owner's OOD detector (the OE-tuned victim of the
    record's split with its E1, :func:`pipeline.get_thresholds`) marks which triggers are grouped
    into units; the innocent pool's agreements give the per-unit null. Each verdict names the
    trigger set and the suspect by sha256 (``triggers_sha256``, ``suspect_sha256``; loading a
    trigger set or surrogate whose bits differ from its record raises), and records ``m``, ``T``
    (distinct triggers), ``units``, ``m_units``, ``expected_units``, ``p_value``, ``flagged``, the
    ``null`` used (pool names, detector) and the p-values of :data:`ABLATIONS`."""
    verdicts = []
    names = list(innocents)
    hashes = {name: weights_sha256(m) for name, m in innocents.items()}
    detectors: dict[str, tuple[nn.Module, dict]] = {}  # per victim split, loaded once
    for r in records:
        if not r.get("trigger_file"):
            continue
        triggers = attacks.load_trigger_set(cfg, r["name"])
        if triggers is None or len(triggers) == 0:
            if r.get("grid") == "conviction":  # a grid point without triggers: no evidence, p = 1
                verdicts.append({"suspect": f"surrogate of {r['name']}", "kind": "stolen", **_verdict_fields(r),
                                 "n_logged": 0, "n_ood": 0, "suspect_sha256": r.get("surrogate_sha256"), "m": 0,
                                 "T": 0, "units": 0, "m_units": 0, "expected_units": 0.0, "p_value": 1.0,
                                 "flagged": False})
            continue
        x, labels = verification.distinct_triggers(triggers.x, triggers.labels)
        split = r.get("victim", "all")
        if split not in detectors:
            detectors[split] = (pipeline.get_oe_victim(cfg, split, verbose=False)[0],
                                pipeline.get_thresholds(cfg, split, verbose=False))
        owner, th = detectors[split]
        ood = verification.ood_flags(owner, x, th["E1"], th["T"])
        units = {True: verification.dependence_units(labels, ood), False: verification.dependence_units(labels)}
        pool = np.stack([verification.agreements(m, x, labels) for m in innocents.values()])
        stolen = verification.agreements(attacks.load_surrogate(cfg, r["name"]), x, labels)
        base = {**_verdict_fields(r), "n_logged": len(triggers), "n_ood": int(ood.sum())}
        detector = {"ood_detector": f"checkpoints/oe_victim_{split}.pt, energy >= E1 = {th['E1']:.4f}"}

        def run(suspect: np.ndarray | None, **variant) -> dict | list[dict]:
            """verify() for ``suspect``, leave_one_out() of the pool for None."""
            kw = {k: v for k, v in variant.items() if k != "ood"}
            u = units[variant.get("ood", True)]
            if kw.get("method") == "one_rate":
                kw["n_classes"] = n_classes
            if suspect is None:
                return verification.leave_one_out(pool, u, cfg.alpha, names=names, **kw)
            return verification.verify(suspect, pool, u, cfg.alpha, names=names, **kw)

        def ablations(results: dict[str, dict]) -> dict:
            return {k: {"p_value": v["p_value"], "flagged": v["flagged"]} for k, v in results.items()}

        main = run(stolen)
        main["null"].update(detector)
        verdicts.append({"suspect": f"surrogate of {r['name']}", "kind": "stolen", **base,
                         "suspect_sha256": r.get("surrogate_sha256"), **main,
                         "ablations": ablations({k: run(stolen, **a) for k, a in ABLATIONS.items()})})
        loo = run(None)
        loo_ablations = {k: run(None, **a) for k, a in ABLATIONS.items()}
        for i, name in enumerate(names):
            v = loo[i]
            v["null"].update(detector)
            verdicts.append({"suspect": name, "kind": "innocent", **base, "suspect_sha256": hashes[name],
                             **v, "ablations": ablations({k: res[i] for k, res in loo_ablations.items()})})
    return verdicts


def _verdict_fields(r: dict) -> dict:
    """What every verdict on record ``r``'s trigger set says about the run: attack, defense,
    setting, ablation, the trigger set (name and sha256), CIP's PBD mode, the queries sent and,
    for the evidence grid, ``grid`` and ``thief``."""
    return {"attack": r["attack"], "defense": r["defense"], "setting": r.get("setting"),
            "ablation": r.get("ablation"), "trigger_set": r["name"], "triggers_sha256": r.get("triggers_sha256"),
            "pbd": (r.get("defense_kwargs") or {}).get("pbd"), "queries": r.get("queries"),
            "grid": r.get("grid"), "thief": r.get("thief")}


ABLATION_HEADER = ("\nAblations (not in the paper's table; notebooks 07-10 discuss them): the same attack "
                   "with one setting changed, named in 'ablation'.\n\n")


def write_outputs(cfg: Profile, table: pd.DataFrame, records: list[dict], verdicts: list[dict]) -> None:
    """``table.md``, ``summary.json`` (one row per record) and the verdicts (:func:`write_verdicts`:
    ``verification.json``, and the evidence run's grid apart). Grid records stay out of the table
    and the summary."""
    header = ("Table IV analog, profile `{p}` (ours, percent) with the paper's numbers for the task in "
              "'paper task' (Zhang et al., IEEE TIFS 2023, Table IV).\n\n").format(p=cfg.name)
    notes = "\n".join(f"{i}. {n}" for i, n in enumerate(table_notes(table, records), 1))
    ablation = table_iv(records, ablations=True)
    write_text(cfg.results_dir / "table.md", header + to_markdown(table) + "\nNotes:\n\n" + notes + "\n"
               + (ABLATION_HEADER + to_markdown(ablation) if not ablation.empty else ""))
    records = [r for r in records if not r.get("grid")]
    summary = [{k: r.get(k) for k in ("name", "attack", "defense", "setting", "ablation", "dataset",
                                      "label_type", "queries", "victim_acc", "oe_victim_acc",
                                      "defended_acc", "surrogate_acc", "surrogate_best_acc",
                                      "trigger_acc", "n_triggers", "dqa_ratio", "seed", "seconds")}
               for r in records]
    write_json(cfg.results_dir / "summary.json", summary)
    write_verdicts(cfg, verdicts)


# ----------------------------------------------------------------------------- across seeds

STAT_FIELDS = ("victim_acc", "oe_victim_acc", "defended_acc", "surrogate_acc", "surrogate_best_acc",
               "trigger_acc", "n_triggers")
"""The per-record numbers that :func:`write_seed_aggregate` summarises over seeds."""


def stat(values: Sequence[float | None]) -> dict:
    """``{"mean", "sd", "n", "values"}`` of the non-missing ``values`` (sd: sample standard
    deviation, ddof 1; ``None`` when n < 2). ``values`` keeps every entry, ``None`` included, in
    seed order, so a reader can see each seed's number."""
    import statistics

    have = [float(v) for v in values if v is not None]
    return {"mean": statistics.fmean(have) if have else None,
            "sd": statistics.stdev(have) if len(have) >= 2 else None,
            "n": len(have), "values": list(values)}


def available_seeds(profile_dir: Path) -> list[int]:
    """Seeds with attack records under ``profile_dir/seed-<k>/metrics/``, ascending."""
    seeds = []
    for d in Path(profile_dir).glob("seed-*"):
        if d.name[5:].isdigit() and any((d / "metrics").glob("*.json")):
            seeds.append(int(d.name[5:]))
    return sorted(seeds)


def seed_records(profile_dir: Path, seed: int) -> list[dict]:
    """The main-run records of one seed, read from JSON alone (no checkpoints needed). Raises
    ``ValueError`` if they disagree on the weights of one victim (a mix of runs: re-run that seed)."""
    metrics = Path(profile_dir) / f"seed-{seed}" / "metrics"
    records = [r for r in _read_records(metrics) if not r.get("grid")]  # the evidence grid: EVIDENCE_VERDICTS
    seen: dict[tuple[str, str], set[str]] = {}
    for r in records:
        stage = (attacks.answering_checkpoint(r.get("defense")), r.get("victim", "all"))
        seen.setdefault(stage, set()).add(str(r.get("weights_sha256")))
    mixed = {f"{a}_{b}": sorted(h)[:3] for (a, b), h in seen.items() if len(h) > 1}
    if mixed:
        raise ValueError(f"the records of {metrics} were measured against different weights of "
                         f"{sorted(mixed)}: re-run that seed (python -m cip_helpers.tools.run --profile "
                         f"<profile> --set seed={seed})")
    return records


def seed_table(profile_dir: Path, seeds: Sequence[int], ablations: bool = False) -> pd.DataFrame:
    """:func:`table_iv` of every seed, stacked, with a ``seed`` column (long format: one row per
    seed and (attack, setting, defense))."""
    frames = []
    for s in seeds:
        t = table_iv(seed_records(profile_dir, s), ablations=ablations)
        if not t.empty:
            frames.append(t.assign(seed=s))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


OURS = ("Test(M_V)", "Test(M_S) no defense", "Test(M'_V)", "API acc", "Test(M_S)", "Test(M_S) best",
        "Trig(M_S)", "T")
KEYS = ("attack", "setting", "defense")


def aggregate_table(long: pd.DataFrame) -> pd.DataFrame:
    """Mean and sd over seeds of :data:`OURS` per (attack, setting, defense), in the order of
    :func:`table_iv`; cells are ``"mean ± sd"`` strings (percent, one decimal; T as a count),
    ``n`` is the number of seeds, and the paper's columns are carried over."""
    if long.empty:
        return long
    rows = []
    keys = [*KEYS, *(["ablation"] if "ablation" in long else [])]
    for key, g in long.groupby(keys, sort=False):
        row = dict(zip(keys, key))
        row["n"] = int(g["seed"].nunique())
        for col in OURS:
            st = stat([None if pd.isna(v) else float(v) for v in g[col]])
            row[col] = _pm(st)
        for col in [c for c in long.columns if c.startswith("paper")]:
            v = g[col].iloc[0]
            row[col] = None if v is None or v is pd.NA or (isinstance(v, float) and pd.isna(v)) else v
        rows.append(row)
    df = pd.DataFrame(rows)
    if "paper T" in df:
        df["paper T"] = df["paper T"].astype("Int64")
    return df


def _pm(st: dict | None, digits: int = 1, scale: float = 1) -> str | None:
    """``"mean ± sd"`` of a :func:`stat` (values times ``scale``), ``"mean"`` without an sd,
    ``None`` without a mean."""
    if not st or st.get("mean") is None:
        return None
    mean = f"{scale * st['mean']:.{digits}f}"
    return mean if st.get("sd") is None else f"{mean} ± {scale * st['sd']:.{digits}f}"


def seed_summary(profile_dir: Path, seeds: Sequence[int]) -> dict:
    """The multi-seed summary (what ``summary.json`` holds): per (attack, setting, defense) row the
    :func:`stat` of every field of :data:`STAT_FIELDS` (fractions; ``n_triggers`` a count), the
    victims' test accuracies, the ID-test share CIP answers unpoisoned, and the verification
    counts, each over ``seeds``."""
    profile_dir = Path(profile_dir)
    per_seed = {s: {r["name"]: r for r in seed_records(profile_dir, s)} for s in seeds}
    names: list[str] = []
    for recs in per_seed.values():
        names += [n for n in recs if n not in names]
    order = {n: i for i, n in enumerate(names)}
    first = {n: next(recs[n] for recs in per_seed.values() if n in recs) for n in names}
    names.sort(key=lambda n: (ATTACK_ORDER.index(first[n]["attack"]), _setting(first[n]),
                              DEFENSE_ORDER.index(first[n]["defense"]), order[n]))
    rows = []
    for n in names:
        r = first[n]
        row = {k: r.get(k) for k in ("name", "attack", "setting", "defense", "ablation", "label_type",
                                     "victim", "dqa_ratio")}
        for f in STAT_FIELDS:
            row[f] = stat([per_seed[s][n].get(f) if n in per_seed[s] else None for s in seeds])
        if r.get("routes"):
            row["routes_id"] = stat([(per_seed[s][n].get("routes") or {}).get("ID") if n in per_seed[s] else None
                                     for s in seeds])
        row["paper"] = (None if r.get("ablation") else
                        paper_row(r["attack"], r["defense"], r.get("setting"), r.get("dataset")))
        row["paper_task"] = paper_task(r["attack"], r.get("dataset")) if row["paper"] else None
        rows.append(row)

    def per_seed_json(name: str, pick) -> dict:
        values = []
        for s in seeds:
            path = profile_dir / f"seed-{s}" / name
            values.append(pick(read_json(path)) if path.exists() else None)
        return stat(values)

    paths = {s: profile_dir / f"seed-{s}" / "verification.json" for s in seeds}
    verification = verification_summary({s: read_json(p) if p.exists() else [] for s, p in paths.items()})
    extra = {}  # snapshots, so that later single-seed runs (which rewrite timings.json) leave it be
    if (profile_dir / "reproducibility.json").exists():
        extra["reproducibility"] = read_json(profile_dir / "reproducibility.json")
    if (profile_dir / "timings.json").exists():
        extra["timings"] = read_json(profile_dir / "timings.json")
    datasets = sorted({str(r.get("dataset")) for recs in per_seed.values() for r in recs.values()})
    if len(datasets) > 1:
        raise ValueError(f"the records under {profile_dir} come from several datasets {datasets}; "
                         "one profile directory holds one dataset")
    return {**extra, "profile": profile_dir.name, "dataset": datasets[0] if datasets else None,
            "seeds": list(seeds), "n_seeds": len(seeds),
            "about": "mean, sample sd (ddof 1) and n over seeds; values lists each seed's number in "
                     "seed order (fractions; n_triggers a count). Per-seed records: seed-<k>/metrics/.",
            "victims": {split: per_seed_json("victims.json", lambda d, split=split: d.get(split))
                        for split in ("all", "half")},
            "id_test_answered_unpoisoned": per_seed_json(
                "routing.json", lambda d: d["fractions"]["ID test"]["ID"]),
            "benign_price": {split: {part: per_seed_json("benign_price.json",
                                                         lambda d, split=split, part=part: (d.get(split) or {}).get(part))
                                     for part in ("oe_part", "pbd_part", "total")} for split in ("all", "half")},
            "verification": verification,
            "conviction": conviction_summary(load_verdicts(profile_dir, seeds, evidence=True)),
            "adaptive": adaptive_summary(profile_dir, seeds), "rows": rows}


def adaptive_summary(profile_dir: Path, seeds: Sequence[int]) -> list[dict] | None:
    """Mean ± sd over seeds of the adaptive attackers (notebook 12's ``seed-<k>/adaptive.json``,
    written by the evidence run; :func:`cip_helpers.course.adaptive.aggregate`), ``None`` when no
    seed has a valid one. A file measured with other weights or settings than the seed's
    (:func:`adaptive.load`) is left out with a warning naming why. Raises ``ValueError`` when
    ``profile_dir`` is not where the profile of its name writes (set ``CIP_RESULTS_ROOT``)."""
    import warnings

    from ..course import adaptive

    per_seed = []
    for seed in seeds:
        if not (Path(profile_dir) / f"seed-{seed}" / adaptive.FILE).exists():
            continue
        cfg = get_profile(Path(profile_dir).name, seed=seed)
        if cfg.results_dir.resolve() != (Path(profile_dir) / f"seed-{seed}").resolve():
            raise ValueError(f"{profile_dir} is not where profile {cfg.name!r} writes ({cfg.profile_dir}); "
                             "set CIP_RESULTS_ROOT to its parent to aggregate it")
        stored, why = adaptive.load(cfg)
        if stored is None:
            warnings.warn(f"seed {seed}: {why}; left out of the adaptive table ({adaptive.COMMAND})", stacklevel=2)
            continue
        per_seed.append(stored)
    return adaptive.aggregate(per_seed) if per_seed else None


def _pm_pct(row: dict, key: str, digits: int = 1) -> str:
    """``mean ± sd`` in percent of a fraction aggregated by :func:`adaptive.aggregate` (``-``
    when missing)."""
    mean, sd = row.get(key), row.get(f"{key}_sd")
    if mean is None:
        return "-"
    return f"{100 * mean:.{digits}f}" + (f" ± {100 * sd:.{digits}f}" if sd is not None else "")


def adaptive_table(rows: list[dict]) -> pd.DataFrame:
    """The adaptive attackers as a table (one row per attacker and variant, one column per
    defense): the averaging thief's recovery of the hidden top-1 after its largest number of
    asks (with the chance bound), the other thieves' surrogate accuracy; mean ± sd over seeds, in
    percent, and for DAWN and CIP the seeds whose surrogate the ownership test flagged."""
    defenses = [d for d in DEFENSE_ORDER if any(r["defense"] == d for r in rows)]
    out: dict[tuple, dict] = {}
    for r in rows:
        line = out.setdefault((r["attacker"], r["variant"]), {"attacker": r["attacker"], "variant": r["variant"]})
        if r["attacker"] == "averaging":
            cell = (_pm_pct(r, "single_answer", 0) + " -> " + _pm_pct(r, "recovery", 0)
                    + (f" (chance <= {100 * r['chance_bound']:.0f})" if r.get("chance_bound") is not None else ""))
        else:
            cell = _pm_pct(r, "surrogate_acc")
            if r.get("judged"):
                cell += f", flagged {r['flagged']}/{r['judged']}"
        line[r["defense"]] = cell
    return pd.DataFrame(list(out.values()), columns=["attacker", "variant", *defenses])


ADAPTIVE_HEADER = ("\n## Adaptive attackers (notebook 12, the evidence run)\n\nAveraging: the share of "
                   "poisoned photo crops whose hidden top-1 the thief names from one answer -> from the mean of "
                   "its largest number of asks (repeats or nudged copies), with the 99 % bound of an answer-blind "
                   "guess (the victim's most common class). The others: "
                   "hard-label (unless named) surrogate test accuracy on the mixed pool; `flagged k/n`: seeds "
                   "whose surrogate the ownership test of notebook 11 flags with the defender's trigger set. "
                   "Mean ± sd over seeds, percent.\n\n")


def verdict_row(v: dict) -> str:
    """The row a stolen verdict is tallied under: ``attack/defense``, ``online`` added for CIP as
    served (online PBD), the ablation in brackets (``ida/cip [E1 at p1 = 95]``)."""
    return (f"{v['attack']}/{v['defense']}" + (" online" if v.get("pbd") == "online" else "")
            + (f" [{v['ablation']}]" if v.get("ablation") else ""))


def verification_summary(per_seed: dict[int, list[dict]], confidence: float = verification.CONFIDENCE) -> dict:
    """Counts over seeds of ``verification.json`` lists (``{seed: verdicts}``), for the course's
    test and each of :data:`ABLATIONS`. The grid's verdicts (``grid`` set) are left to
    :func:`conviction_summary`.

    Claims count once: a verdict is counted once per distinct (trigger set bits, suspect weights)
    pair. Several runs share one: CIP's DQA surrogates are its IDA soft surrogate judged on the
    same trigger set; KnockoffNets hard and soft send the same queries. ``innocent``: false
    claims ``flagged`` of ``of`` distinct pairs (``verdicts``: before removing copies) with the
    one-sided ``confidence`` Clopper-Pearson upper bound ``false_claim_upper`` (it treats the pairs
    as independent; pairs that share a model or a trigger set are not, so read it as indicative).
    ``stolen`` per row (:func:`verdict_row`; main rows first, and in :data:`ATTACK_ORDER`, so a
    copy is credited to the main row and DQA's copies of IDA to IDA): ``flagged`` of ``of`` distinct pairs first seen in that row, ``suspects`` (distinct
    surrogate weights behind them), ``copies`` (verdicts on a pair counted under an earlier row,
    named in ``same_as``) and ``missed`` (seed and trigger set). ``stolen_total``: the same over
    every main row. ``min_innocent_p``: the smallest p-value of any innocent model."""
    def key(seed: int, v: dict) -> tuple:
        return (v.get("triggers_sha256") or (seed, v["trigger_set"]), v.get("suspect_sha256") or (seed, v.get("suspect")))

    def tally(pick) -> dict:
        inn = {"flagged": 0, "of": 0, "verdicts": 0}
        stolen: dict[str, dict] = {}
        seen: set[tuple] = set()
        counted: dict[tuple, str] = {}  # stolen pair -> the row it was counted under
        suspects: dict[str, set] = {}
        total = {"flagged": 0, "of": 0, "suspects": set()}
        ordered = sorted(((seed, v) for seed, vs in per_seed.items() for v in vs if not v.get("grid")),
                         key=lambda sv: (bool(sv[1].get("ablation")),  # main rows first, then IDA before DQA
                                         ATTACK_ORDER.index(sv[1]["attack"]) if sv[1].get("attack") in ATTACK_ORDER else 9))
        for seed, v in ordered:
            flagged = bool(pick(v)["flagged"])
            k = key(seed, v)
            if v.get("kind") == "innocent":
                inn["verdicts"] += 1
                if k in seen:
                    continue
                seen.add(k)
                inn["flagged"] += flagged
                inn["of"] += 1
                continue
            name = verdict_row(v)
            d = stolen.setdefault(name, {"flagged": 0, "of": 0, "suspects": 0, "copies": 0, "same_as": [],
                                         "missed": []})
            if k in counted:
                d["copies"] += 1
                if counted[k] not in d["same_as"]:
                    d["same_as"].append(counted[k])
                continue
            counted[k] = name
            d["flagged"] += flagged
            d["of"] += 1
            suspects.setdefault(name, set()).add(k[1])
            d["suspects"] = len(suspects[name])
            if not v.get("ablation"):
                total["flagged"] += flagged
                total["of"] += 1
                total["suspects"].add(k[1])
            if not flagged:
                d["missed"].append(f"seed {seed}: {v['trigger_set']}")
        if inn["of"]:
            inn["false_claim_upper"] = verification.false_claim_bound(inn["flagged"], inn["of"], confidence)
        total["suspects"] = len(total["suspects"])
        return {"innocent": inn, "stolen": dict(sorted(stolen.items())), "stolen_total": total}

    out = tally(lambda v: v)
    ps = [v["p_value"] for verdicts in per_seed.values() for v in verdicts if v.get("kind") == "innocent"]
    out["min_innocent_p"] = min(ps) if ps else None
    out["confidence"] = confidence
    out["ablations"] = {name: tally(lambda v, name=name: v.get("ablations", {}).get(name, v))
                        for name in ABLATIONS}
    return out


def conviction_rows(per_seed: dict[int, list[dict]]) -> pd.DataFrame:
    """The queries-to-conviction grid as a long table, from ``verification.json`` lists
    (``{seed: verdicts}``): one row per stolen verdict of the grid (``grid == "conviction"``):
    ``thief``, ``defense``, ``seed``, ``queries`` (sent, noise included), ``T`` (distinct
    triggers), ``m`` (reproduced), ``p_value``, ``flagged``. Empty without grid verdicts."""
    rows = [{"thief": v["thief"], "defense": v["defense"], "seed": seed, "queries": v["queries"], "T": v["T"],
             "m": v["m"], "p_value": v["p_value"], "flagged": v["flagged"]}
            for seed, verdicts in per_seed.items() for v in verdicts
            if v.get("grid") == "conviction" and v.get("kind") == "stolen"]
    return pd.DataFrame(rows, columns=["thief", "defense", "seed", "queries", "T", "m", "p_value", "flagged"])


def queries_to_conviction(rows: pd.DataFrame, alpha: float = 0.01) -> pd.DataFrame:
    """Per (thief, defense, seed): the fewest queries of the grid after which the thief's surrogate
    is flagged (p < ``alpha``) at that budget AND every larger one (``None``: not by the grid's
    largest budget), and the p-value at the largest budget. Input: :func:`conviction_rows`."""
    out = []
    for (thief, defense, seed), g in rows.groupby(["thief", "defense", "seed"], sort=False):
        g = g.sort_values("queries")
        hit = (g["p_value"] < alpha).to_numpy()
        first = None
        for i in range(len(g)):
            if hit[i:].all():
                first = int(g["queries"].iloc[i])
                break
        out.append({"thief": thief, "defense": defense, "seed": int(seed), "queries_to_conviction": first,
                    "largest_budget": int(g["queries"].iloc[-1]), "T_at_largest": int(g["T"].iloc[-1]),
                    "p_at_largest": float(g["p_value"].iloc[-1])})
    return pd.DataFrame(out)


def conviction_summary(per_seed: dict[int, list[dict]], alpha: float = 0.01) -> dict | None:
    """``{"points": [...], "per_seed": [...], "table": [...]}`` of the grid (``None`` without it):
    the points (:func:`conviction_rows`), queries to conviction per seed
    (:func:`queries_to_conviction`) and per (thief, defense) over seeds: how many seeds were
    convicted within the grid, and the median of their queries to conviction."""
    rows = conviction_rows(per_seed)
    if rows.empty:
        return None
    q = queries_to_conviction(rows, alpha)
    table = []
    for (thief, defense), g in q.groupby(["thief", "defense"], sort=False):
        done = [v for v in g["queries_to_conviction"] if v is not None and not pd.isna(v)]
        table.append({"thief": thief, "defense": defense, "seeds": int(len(g)), "convicted": len(done),
                      "queries_to_conviction": [None if v is None or pd.isna(v) else int(v)
                                                for v in g["queries_to_conviction"]],
                      "median_queries": float(np.median(done)) if done else None,
                      "largest_budget": int(g["largest_budget"].max())})
    return {"alpha": alpha, "points": rows.to_dict("records"),
            "per_seed": q.astype(object).where(q.notna(), None).to_dict("records"), "table": table}


def conviction_table(conviction: dict) -> pd.DataFrame:
    """The queries-to-conviction table of a :func:`conviction_summary`: one row per (thief,
    defense) with the queries after which each seed's thief was convicted (``-``: not within the
    grid's largest budget), how many seeds, and the median over the convicted ones."""
    from ..course.evidence import THIEVES

    rows = [{"thief": THIEVES.get(r["thief"], r["thief"]), "defense": r["defense"],
             "queries to conviction, per seed": ", ".join("-" if q is None else f"{q:,}"
                                                          for q in r["queries_to_conviction"]),
             "convicted": f"{r['convicted']} of {r['seeds']}",
             "median (convicted)": None if r["median_queries"] is None else f"{r['median_queries']:,.0f}",
             "largest budget": f"{r['largest_budget']:,}"} for r in conviction["table"]]
    return pd.DataFrame(rows)


def tradeoff_data(profile_dir: Path, seeds: Sequence[int], conviction: dict | None,
                  pool_size: int = 23, alpha: float = 0.01) -> tuple[list[dict], dict, list[dict]]:
    """The inputs of ``plots.owner_tradeoff``: the benign price by share of every seed
    (``seed-<k>/benign_price.json``, half victim), the planning model's queries to conviction by
    share (:func:`verification.plan_queries` at reproduction 1.0, 0.88 and 0.5, ``pool_size``
    innocent models, the ID share the half victim's served CIP routed of the IDA thief's digits),
    and the measured median queries to conviction of the served CIP per thief at the profile's
    share."""
    from ..course.evidence import THIEVES

    prices, id_shares, share_now = [], [], None
    for s in seeds:
        path = Path(profile_dir) / f"seed-{s}" / "benign_price.json"
        if not path.exists():
            continue
        d = read_json(path)
        share_now = d["half"]["r1_percentile"]
        prices += [{"seed": s, "share": r["r1_percentile"], "pbd_part": r["pbd_part"]}
                   for r in d["half"].get("by_share", [])]
        rec = Path(profile_dir) / f"seed-{s}" / "metrics" / "ida_cip_hard_online.json"
        if rec.exists():
            r = read_json(rec)
            id_shares.append(r["routes"]["ID"] / r["queries"])
    id_share = float(np.mean(id_shares)) if id_shares else 0.77
    shares = sorted({p["share"] for p in prices}) or [0.25, 0.5, 0.75, 1.0, 2.0]
    planned = {f"reproduction {rho:g}": [(sh, verification.plan_queries(sh / 100, 0.9, alpha, rho, pool_size, id_share))
                                        for sh in shares] for rho in (1.0, 0.88, 0.5)}
    measured = []
    if conviction and share_now is not None:
        for r in conviction["table"]:
            if r["defense"] == "cip" and r["median_queries"] is not None:
                measured.append({"share": share_now, "queries": r["median_queries"],
                                 "label": f"measured: {THIEVES.get(r['thief'], r['thief'])} "
                                          f"({r['convicted']} of {r['seeds']} seeds)"})
    return prices, planned, measured


def write_conviction(profile_dir: Path, seeds: Sequence[int], summary: dict) -> list[Path]:
    """``conviction.md`` (the table), ``conviction.png`` (p-value against queries) and
    ``tradeoff.png`` (the owner's trade-off) under ``profile_dir`` when the summary holds the
    evidence run's grid; nothing otherwise. Returns the paths written."""
    import matplotlib.pyplot as plt

    from ..course import plots
    from ..course.evidence import THIEVES

    conviction = summary.get("conviction")
    if not conviction:
        return []
    profile_dir = Path(profile_dir)
    text = (f"Queries to conviction, profile `{profile_dir.name}`, seeds {', '.join(map(str, seeds))}: the "
            f"fewest queries after which the thief's surrogate is flagged (p < {conviction['alpha']:g}) at that "
            "budget and every larger one of the grid (written by the evidence run: `python3 tasks.py course "
            "--seeds 0,1,2 --set evidence=true --set n_innocent=24`; notebook 11).\n\n"
            + to_markdown(conviction_table(conviction)))
    written = [write_text(profile_dir / "conviction.md", text + "\n")]
    points = pd.DataFrame(conviction["points"])
    figures = {"conviction.png": plots.conviction_curves(points, conviction["alpha"], THIEVES),
               "tradeoff.png": plots.owner_tradeoff(*tradeoff_data(profile_dir, seeds, conviction))}
    for name, fig in figures.items():
        try:
            written.append(write_png(profile_dir / name, fig, dpi=100))
        finally:
            plt.close(fig)
    return written


def write_seed_aggregate(profile_dir: Path, seeds: Sequence[int]) -> list[Path]:
    """Write ``<profile_dir>/summary.json`` (:func:`seed_summary`) and ``table.md`` (mean ± sd over
    ``seeds``, with the paper's numbers). Returns the paths written."""
    profile_dir = Path(profile_dir)
    summary = seed_summary(profile_dir, seeds)
    long = seed_table(profile_dir, seeds)
    table = aggregate_table(long)
    header = (f"Table IV analog, profile `{profile_dir.name}`: ours as mean ± sd over seeds "
              f"{', '.join(map(str, seeds))} (n per row; percent, T a count), with the paper's numbers "
              "for the task in 'paper task' (Zhang et al., IEEE TIFS 2023, Table IV). Per-seed "
              "tables: `seed-<k>/table.md`.\n\n")
    per_seed_records = [r for s in seeds for r in seed_records(profile_dir, s)]
    single = long.drop_duplicates(list(KEYS)) if not long.empty else long
    notes = "\n".join(f"{i}. {n}" for i, n in enumerate(table_notes(single, per_seed_records), 1))
    ablation = aggregate_table(seed_table(profile_dir, seeds, ablations=True))
    written = [write_json(profile_dir / "summary.json", summary),
               write_text(profile_dir / "table.md", header + to_markdown(table) + "\nNotes:\n\n" + notes + "\n"
                          + (ABLATION_HEADER + to_markdown(ablation) if not ablation.empty else "")
                          + (ADAPTIVE_HEADER + to_markdown(adaptive_table(summary["adaptive"]))
                             if summary.get("adaptive") else ""))]
    return written + [write_overview(profile_dir)] + write_conviction(profile_dir, seeds, summary)


OVERVIEW_KEY = "Source"
"""PNG text key of ``overview.png`` that names the summary it was drawn from (its sha256)."""


def summary_digest(profile_dir: Path) -> str:
    """``"summary.json sha256 <hex>"`` of ``<profile_dir>/summary.json``: what ``overview.png``
    records, so a figure drawn from another summary is recognised as stale (a test checks it)."""
    return "summary.json sha256 " + hashlib.sha256((Path(profile_dir) / "summary.json").read_bytes()).hexdigest()


def write_overview(profile_dir: Path) -> Path:
    """Draw :func:`cip_helpers.course.plots.overview` from ``<profile_dir>/summary.json`` into
    ``<profile_dir>/overview.png`` (atomically; the README's opening figure for ``quick``), with
    :func:`summary_digest` stored under the PNG text key :data:`OVERVIEW_KEY`. Raises
    ``FileNotFoundError`` when the summary is missing (run the aggregate first)."""
    import matplotlib.pyplot as plt

    from ..course import plots

    profile_dir = Path(profile_dir)
    summary = read_json(profile_dir / "summary.json")
    fig = plots.overview(summary)
    try:
        return write_png(profile_dir / "overview.png", fig, dpi=100,
                         metadata={OVERVIEW_KEY: summary_digest(profile_dir)})
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------- differences


def _row(summary: dict, attack: str, setting: str, defense: str) -> dict:
    for r in summary.get("rows", []):
        if (r["attack"], _setting(r), r["defense"]) == (attack, setting, defense):
            return r
    return {}


def _ours(summary: dict, attack: str, setting: str, defense: str, field: str = "surrogate_acc",
          count: bool = False) -> str:
    st = _row(summary, attack, setting, defense).get(field)
    if count:
        return _pm(st, 1) or "n/a"
    return _pct(st)


def _explains(summary: dict, defense: str) -> str:
    """Whether the authors' gradient-query bypass moves DFME's student against ``defense`` by more
    than twice the larger seed sd (a reading of the ablation, for :func:`differences`)."""
    main = _row(summary, "dfme", "logits", defense).get("surrogate_acc") or {}
    alt = _row(summary, "dfme", "victim-grad", defense).get("surrogate_acc") or {}
    if main.get("mean") is None or alt.get("mean") is None:
        return "not measured"
    spread = 2 * max(main.get("sd") or 0, alt.get("sd") or 0, 0.005)
    moved = alt["mean"] - main["mean"]
    return ("the bypass explains part of the gap here" if moved > spread else
            "measured, the bypass does not move the student here")


def differences(summary: dict) -> pd.DataFrame:
    """"Where this reproduction differs from the paper" (notebook 11): one row per difference with
    our number (mean ± sd over the seeds of a multi-seed ``summary.json``, percent unless a count),
    the paper's (Table IV via :func:`paper_row`), the cause (scale, data, a design choice of ours,
    a choice of the authors' release) and the measurement that shows it. Every result is read
    from ``summary`` or the paper's table; none is typed here."""
    o = lambda *a, **k: _ours(summary, *a, **k)  # noqa: E731

    dataset = summary.get("dataset") or "mnist_embedded"

    def pp(attack: str, defense: str, setting: str | None, field: str = "surrogate_acc") -> str:
        v = (paper_row(attack, defense, setting, dataset) or {}).get(field)
        return "n/a" if v is None else (f"{v:g}" if isinstance(v, int) else f"{v:.2f}")

    ids = _row(summary, "knockoff", "hard", "cip").get("routes_id", {}).get("values", [])
    routed = f" (queries routed ID per seed: {', '.join(map(str, ids))})" if ids else ""
    rows = [
        ("Scale: victim test accuracy", f"{o('knockoff', 'hard', 'none', 'victim_acc')} (2-conv CNN, "
         f"{_data_label(dataset)})",
         pp("dfme", "none", None, "victim_acc")
         + f" ({paper_task('dfme', dataset)})",
         "scale", "notebook 01"),
        ("Undefended DFME student", o("dfme", "logits", "none"), pp("dfme", "none", None),
         "scale: 36,000 queries vs the authors' 6 M (`DFME/main.py`)", "notebook 08"),
        ("CIP vs KnockoffNets: trigger set T", o("knockoff", "hard", "cip", "n_triggers", count=True) + routed,
         pp("knockoff", "cip", "hard", "n_triggers") + " (CIFAR-10)",
         "data: no photo crop looks in-distribution to the OE-tuned victim, so nothing routes ID and "
         "offline top-T PBD has nothing to flip; some ImageNet queries to a CIFAR-10 victim do. With "
         "near-distribution queries (mixed pool): T " + o("knockoff", "mixed_hard", "cip", "n_triggers", count=True),
         "routing counts, notebook 07 (mixed pool)"),
        ("CIP vs KnockoffNets: surrogate", f"hard {o('knockoff', 'hard', 'cip')}, soft {o('knockoff', 'soft', 'cip')}",
         pp("knockoff", "cip", "hard"), "data: every query is high-ES, so every answer gets the strong poison",
         "notebook 07"),
        ("DAWN vs KnockoffNets: trigger accuracy", f"hard {o('knockoff', 'hard', 'dawn', 'trigger_acc')}, "
         f"soft {o('knockoff', 'soft', 'dawn', 'trigger_acc')}", pp("knockoff", "dawn", "hard", "trigger_acc"),
         f"scale: the surrogate memorises few of the {o('knockoff', 'hard', 'dawn', 'n_triggers', count=True)} "
         "watermarked photo crops in 6 epochs (its training fit stays below 90 %)",
         "`07_dawn_trigger_per_epoch`, notebook 07"),
        ("DP vs DFME", f"{o('dfme', 'logits', 'dp')}; gradient queries past the defense (authors): "
         f"{o('dfme', 'victim-grad', 'dp')}", pp("dfme", "dp", None),
         "the authors' DFME sends its gradient-estimation queries to the victim directly (`DFME/main.py`), "
         "ours through the defense: " + _explains(summary, "dp") + "; the budget (36,000 vs 6 M "
         "queries) and the models remain", "ablation `dfme_dp_victim-grad`, notebook 08"),
        ("CIP vs DFME", f"{o('dfme', 'logits', 'cip')}; gradient queries past the defense: "
         f"{o('dfme', 'victim-grad', 'cip')}", pp("dfme", "cip", None),
         "follows the paper (no PBD against DFME)", "ablation `dfme_cip_victim-grad`, notebook 08"),
        ("DP vs soft-label KnockoffNets", f"{o('knockoff', 'soft', 'dp')} (our CNN: BatchNorm, normalised "
         f"input); plain CNN {o('knockoff', 'soft_cnn_plain', 'dp')}", pp("knockoff", "dp", "hard"),
         "surrogate architecture: which model learns from DP's flattened rows",
         "ablation `knockoff_dp_soft_cnn_plain`, notebook 07"),
        ("DP vs hard-label KnockoffNets", f"{o('knockoff', 'hard', 'dp')} (undefended {o('knockoff', 'hard', 'none')})",
         pp("knockoff", "dp", "hard"), "scale and data: hard labels of photo crops carry little", "notebook 07"),
        ("CIP vs IDA (hard labels): surrogate / trigger accuracy",
         f"{o('ida', 'hard', 'cip')} / {o('ida', 'hard', 'cip', 'trigger_acc')}",
         f"{pp('ida', 'cip', 'hard')} / {pp('ida', 'cip', 'hard', 'trigger_acc')}",
         "follows the paper", "notebook 09"),
        ("CIP vs IDA, soft labels: trigger accuracy", f"authors' PBD answer {o('ida', 'soft', 'cip', 'trigger_acc')}; "
         f"inverse answer {o('ida', 'soft_inverse', 'cip', 'trigger_acc')}", "not reported (hard labels)",
         "design: the course's earlier PBD answer (1/p) is flat; the authors' is near one-hot",
         "ablation `ida_cip_soft_inverse`, notebook 09"),
        ("CIP vs DQA r = 1 (soft labels): trigger accuracy", o("dqa", "r1", "cip", "trigger_acc"),
         pp("dqa", "cip", "r1", "trigger_acc"), "follows the paper", "notebook 10"),
        ("DAWN vs DQA r = 1: trigger accuracy (T)", f"{o('dqa', 'r1', 'dawn', 'trigger_acc')} "
         f"(T = {o('dqa', 'r1', 'dawn', 'n_triggers', count=True)})",
         f"{pp('dqa', 'dawn', 'r1', 'trigger_acc')} (T = {pp('dqa', 'dawn', 'r1', 'n_triggers')})",
         "scale: far fewer watermarks", "notebook 10"),
        ("Test(M'_V) of CIP / the defended API's accuracy", f"{o('knockoff', 'hard', 'cip', 'oe_victim_acc')} / "
         f"{o('knockoff', 'hard', 'cip', 'defended_acc')}", pp("knockoff", "cip", "hard", "defended_victim_acc")
         + " / not reported", "definition: the paper reports the OE model's own accuracy; the API's "
         "top-1 also pays for weak PPD and PBD", "`table.md` columns Test(M'_V), API acc"),
        ("E1 for IDA/DQA", f"p1 = 80 as the authors; p1 = 95 (ablation): trigger accuracy "
         f"{o('ida', 'hard_p1-95', 'cip', 'trigger_acc')}, surrogate {o('ida', 'hard_p1-95', 'cip')}",
         "p1 = 80 (`ood_detection/detection_test.py`)", "follows the authors", "ablation `ida_cip_hard_p1-95`, notebook 09"),
        ("OE alone vs CIP (not in the paper)",
         f"KnockoffNets photos, soft: none {o('knockoff', 'soft', 'none')}, oe {o('knockoff', 'soft', 'oe')}, "
         f"cip {o('knockoff', 'soft', 'cip')}; hard: none {o('knockoff', 'hard', 'none')}, "
         f"oe {o('knockoff', 'hard', 'oe')}, cip {o('knockoff', 'hard', 'cip')}; DFME: none "
         f"{o('dfme', 'logits', 'none')}, oe {o('dfme', 'logits', 'oe')}, cip {o('dfme', 'logits', 'cip')}",
         "not reported", "ablation of ours: the OE-tuned victim answering honestly separates what "
         "outlier exposure does from what the poisoning adds", "`oe` rows, notebooks 07 and 08"),
        ("Near-distribution queries (not in the paper's tables)",
         f"mixed pool, hard labels: none {o('knockoff', 'mixed_hard', 'none')}, "
         f"cip {o('knockoff', 'mixed_hard', 'cip')} (T {o('knockoff', 'mixed_hard', 'cip', 'n_triggers', count=True)}, "
         f"trigger accuracy {o('knockoff', 'mixed_hard', 'cip', 'trigger_acc')}); soft: none "
         f"{o('knockoff', 'mixed_soft', 'none')}, cip {o('knockoff', 'mixed_soft', 'cip')}",
         pp("knockoff", "none", "hard") + " -> " + pp("knockoff", "cip", "hard") + " (CIFAR-10, ImageNet queries)",
         f"data: {_near_label(dataset)} route ID and low-ES, where CIP answers honestly or keeps the top-1",
         "mixed pool, notebook 07; threshold trade-off, notebook 03"),
        ("PBD answer randomness", "a keyed hash of the query: the same query gets the same answer",
         "Python's global `random`, seeded once", "design: batch-invariant, repeat-consistent answers", "notebook 05"),
        ("PBD for a served API", "online (R < R1, batch-invariant); offline top-T only in the attack harness",
         "offline top-T over the transfer set", "design: top-T per call depends on call sizes",
         "notebook 05"),
    ]
    return pd.DataFrame(rows, columns=["difference", "ours", "paper", "cause", "shown by"])


# ----------------------------------------------------------------------------- reproducibility


def strip_wall_times(obj):
    """A JSON value without its wall-time fields (keys containing ``seconds``) and cache flags
    (keys ending in ``_loaded``: whether a checkpoint was reused, a fact about the disk, not the
    result), recursively: what two runs of one seed on one machine must agree on."""
    if isinstance(obj, dict):
        return {k: strip_wall_times(v) for k, v in obj.items()
                if "seconds" not in k and not k.endswith("_loaded")}
    if isinstance(obj, list):
        return [strip_wall_times(v) for v in obj]
    return obj


def compare_runs(a: Path, b: Path) -> dict:
    """Compare two runs of one seed (two ``seed-<k>`` directories): how many JSON artifacts are
    identical apart from wall times, and per main-run record the surrogate accuracy of both and
    their difference (fractions). Used to measure what reproducibility means here."""
    a, b = Path(a), Path(b)
    files = sorted(str(p.relative_to(a)) for p in a.rglob("*.json") if "executed" not in p.parts)
    same = [f for f in files if (b / f).exists()
            and strip_wall_times(read_json(a / f)) == strip_wall_times(read_json(b / f))]
    rows = []
    for f in files:
        if not f.startswith("metrics/") or not (b / f).exists():
            continue
        ra, rb = read_json(a / f), read_json(b / f)
        if ra.get("curve_point") or ra.get("attack") not in ATTACK_ORDER:
            continue
        rows.append({"name": ra["name"], "a": ra["surrogate_acc"], "b": rb["surrogate_acc"],
                     "diff": rb["surrogate_acc"] - ra["surrogate_acc"]})
    diffs = [abs(r["diff"]) for r in rows]
    return {"a": str(a), "b": str(b), "json_files": len(files), "identical": len(same),
            "differing": sorted(set(files) - set(same)),
            "surrogate_acc_abs_diff": {"mean": sum(diffs) / len(diffs) if diffs else None,
                                       "max": max(diffs) if diffs else None, "n": len(diffs)},
            "records": rows}


def compare_machines(a: Path, b: Path, label_a: str = "", label_b: str = "") -> dict:
    """Compare two multi-seed runs of one profile made on two machines (``a``, ``b``: profile
    directories with ``summary.json`` and ``seed-<k>/``). Per row of the summary with a surrogate
    accuracy in both: the means, sds and seed counts, ``diff`` = mean_b - mean_a, its standard error
    ``se`` = sqrt(sd_a^2 / n_a + sd_b^2 / n_b) and ``z`` = diff / se (0 when both are 0, inf when
    only se is); ``beyond_2se``: rows with |z| > 2; ``beyond_seed_sd``: rows whose |diff| exceeds
    the larger of their two seed sds (too few seeds to summarise them across machines);
    ``per_seed``: per common seed, how many JSON artifacts are identical (:func:`compare_runs`).
    All in fractions. Raises ``FileNotFoundError`` without a ``summary.json``."""
    import math

    a, b = Path(a), Path(b)
    sa, sb = read_json(a / "summary.json"), read_json(b / "summary.json")
    rows_b = {r["name"]: r for r in sb["rows"]}
    rows = []
    for ra in sa["rows"]:
        rb = rows_b.get(ra["name"])
        x, y = ra["surrogate_acc"], (rb or {}).get("surrogate_acc", {})
        if x.get("mean") is None or y.get("mean") is None:
            continue
        diff = y["mean"] - x["mean"]
        se = math.sqrt((x["sd"] or 0) ** 2 / x["n"] + (y["sd"] or 0) ** 2 / y["n"])
        z = diff / se if se > 0 else (0.0 if diff == 0 else math.inf)
        rows.append({"name": ra["name"], "mean_a": x["mean"], "sd_a": x["sd"], "n_a": x["n"], "mean_b": y["mean"],
                     "sd_b": y["sd"], "n_b": y["n"], "diff": diff, "se": se, "z": z,
                     "beyond_seed_sd": abs(diff) > max(x["sd"] or 0, y["sd"] or 0)})
    diffs = [abs(r["diff"]) for r in rows]
    worst = max(rows, key=lambda r: abs(r["diff"]))["name"] if rows else None
    per_seed = {}
    for seed in sorted(set(sa["seeds"]) & set(sb["seeds"])):
        c = compare_runs(a / f"seed-{seed}", b / f"seed-{seed}")
        per_seed[f"seed-{seed}"] = {"json_files": c["json_files"], "identical": c["identical"],
                                    "surrogate_acc_abs_diff": c["surrogate_acc_abs_diff"]}
    return {"a": label_a or str(a), "b": label_b or str(b), "seeds": sorted(set(sa["seeds"]) & set(sb["seeds"])),
            "surrogate_acc_abs_diff": {"mean": sum(diffs) / len(diffs) if diffs else None,
                                       "max": max(diffs) if diffs else None, "max_row": worst, "n": len(diffs)},
            "beyond_2se": [r["name"] for r in rows if abs(r["z"]) > 2],
            "beyond_seed_sd": [r["name"] for r in rows if r["beyond_seed_sd"]],
            "per_seed": per_seed, "rows": rows}


# ----------------------------------------------------------------------------- the README block

README_BEGIN = "<!-- results:begin (written by python -m cip_helpers.tools.report readme; do not edit) -->"
README_END = "<!-- results:end -->"


def readme_markers(profile: str) -> tuple[str, str]:
    """The README's begin/end markers of ``profile``'s results block (``quick``: :data:`README_BEGIN`
    / :data:`README_END`; another profile ``P``: ``results:P:begin`` / ``results:P:end``)."""
    if profile == "quick":
        return README_BEGIN, README_END
    return (f"<!-- results:{profile}:begin (written by python -m cip_helpers.tools.report readme "
            f"--profile-dir results/{profile}; do not edit) -->", f"<!-- results:{profile}:end -->")
README_ROWS = (("knockoff", "soft", "KnockoffNets, soft labels"), ("knockoff", "hard", "KnockoffNets, hard labels"),
               ("knockoff", "mixed_soft", "KnockoffNets, mixed pool, soft"),
               ("knockoff", "mixed_hard", "KnockoffNets, mixed pool, hard"),
               ("dfme", "logits", "DFME"), ("ida", "hard", "IDA (attacker holds the other half)"))


def _pct(st: dict | None, digits: int = 1) -> str:
    """:func:`_pm` of fractions, in percent; ``"n/a"`` without a mean."""
    return _pm(st, digits, scale=100) or "n/a"


def readme_block(summary: dict) -> str:
    """The README's results block (Markdown, between :data:`README_BEGIN` and :data:`README_END`),
    written from a multi-seed ``summary.json`` only (with its snapshots of ``timings.json`` and
    ``reproducibility.json``): no number in it is typed by hand."""
    rows = {(r["attack"], _setting(r), r["defense"]): r for r in summary["rows"]}
    seeds = ", ".join(map(str, summary["seeds"]))
    begin, end = readme_markers(summary["profile"])
    dataset = summary.get("dataset") or "mnist_embedded"
    images = "digits" if dataset in ("mnist_embedded", "mnist") else "images"
    # AM's column only where the summary has AM rows: the block of a run without AM stays as it was
    shown = [d for d in DEFENSE_ORDER if d != "am" or any(r["defense"] == "am" for r in summary["rows"])]
    heads = {"none": "no defense", "oe": "OE only", "dp": "DP", "dawn": "DAWN", "cip": "CIP", "am": "AM"}
    out = [begin, "",
           f"Mean ± sd over {summary['n_seeds']} seeds ({seeds}) of the {summary['profile']} profile, "
           f"surrogate test accuracy in percent (ours: {_data_label(dataset)}, small CNNs; paper: "
           "its Table IV):", "",
           "| attack | " + " | ".join(heads[d] for d in shown) + " | paper, no defense -> CIP |",
           "|" + " --- |" * (len(shown) + 2)]
    for attack, setting, label in README_ROWS:
        cells = {d: _pct(rows.get((attack, setting, d), {}).get("surrogate_acc")) for d in shown}
        cip = rows.get((attack, setting, "cip"), {})
        paper = cip.get("paper") or {}
        ref = (f"{paper['surrogate_acc_no_defense']} -> {paper['surrogate_acc']} ({paper_task(attack, dataset)})"
               if paper.get("surrogate_acc") is not None else "")
        out.append(f"| {label} | " + " | ".join(f"**{cells[d]}**" if d == "cip" else cells[d] for d in shown)
                   + f" | {ref} |")
    victims = summary.get("victims", {})
    cip_ko = rows.get(("knockoff", "soft", "cip"), {})
    cip_ida = rows.get(("ida", "hard", "cip"), {})
    out += ["",
            f"* **Fidelity.** The `all` victim answers its own test {images} at {_pct(victims.get('all'))} %; "
            f"behind CIP, {_pct(cip_ko.get('defended_acc'))} % (the `half` victim of IDA/DQA: "
            f"{_pct(victims.get('half'))} % -> {_pct(cip_ida.get('defended_acc'))} %). CIP answers "
            f"{_pct(summary.get('id_test_answered_unpoisoned'))} % of the ID test {images} unpoisoned."]
    am_ko, am_ida = rows.get(("knockoff", "soft", "am"), {}), rows.get(("ida", "hard", "am"), {})
    if am_ko or am_ida:
        out[-1] += (f" Behind Adaptive Misinformation (AM; its tau changes as many training answers as CIP): "
                    f"{_pct(am_ko.get('defended_acc'))} % (`half`: {_pct(am_ida.get('defended_acc'))} %).")
    trig = []
    for r in summary["rows"]:
        if r["defense"] in ("dawn", "cip") and r["attack"] in ("ida", "dqa") and not r.get("ablation"):
            name = (f"IDA {r.get('setting') or r.get('label_type')}" if r["attack"] == "ida"
                    else f"DQA {r['setting']} {r.get('label_type')}")
            trig.append(f"{r['defense'].upper()} {name} {_pct(r['trigger_acc'], 0)} % "
                        f"(T = {r['n_triggers']['mean']:.1f})")
    out.append("* **Trigger accuracy** (the stolen surrogate agrees with the altered label): "
               + "; ".join(trig) + ".")
    v = summary.get("verification", {})
    inn = v.get("innocent", {"flagged": 0, "of": 0})
    main_rows = {k: d for k, d in v.get("stolen", {}).items() if "[" not in k}
    power = "; ".join(f"{k} {d['flagged']} of {d['of']}" + (f" ({d['suspects']} surrogates)" if d.get("suspects", d["of"]) != d["of"] else "")
                      for k, d in main_rows.items() if d["of"])
    copies = "; ".join(f"{k}: {d['copies']} verdicts on pairs counted under {', '.join(d['same_as'])}"
                       for k, d in main_rows.items() if d.get("copies"))
    bound = inn.get("false_claim_upper")
    out.append(f"* **Ownership verification** (alpha = 0.01; per-unit Poisson-binomial test against "
               f"an innocent pool, `cip_helpers/method/verification.py`): false claims {inn['flagged']} of "
               f"{inn['of']} distinct (innocent model, trigger set) pairs"
               + (f" ({inn['verdicts']} verdicts before removing runs that share a trigger set)"
                  if inn.get("verdicts", inn["of"]) != inn["of"] else "")
               + (f"; upper bound on the false-claim rate {100 * bound:.2f} % (one-sided 95 % "
                  f"Clopper-Pearson, treating the pairs as independent)" if bound is not None else "")
               + (f"; the closest innocent model had p = {v['min_innocent_p']:.2g}" if v.get("min_innocent_p") is not None else "")
               + f". Power, each distinct (surrogate, trigger set) pair counted once (`cip online`: the served "
               f"CIP, online PBD; `cip`: the paper's offline top-T evaluation): {power}"
               + (f". Not counted again: {copies}" if copies else "") + ".")
    price = summary.get("benign_price", {}).get("half", {})
    if price.get("pbd_part", {}).get("mean") is not None:
        out.append(f"* **What the served CIP costs benign users** (the `half` victim's ID test {images}; share "
                   f"whose top-1 changes): {_pct(price['total'], 2)} %, of which outlier exposure "
                   f"{_pct(price['oe_part'], 2)} % and online PBD {_pct(price['pbd_part'], 2)} %.")
    conviction = summary.get("conviction")
    if conviction:
        parts = [f"{r['thief']} vs {r['defense']}: {r['queries to conviction, per seed']}"
                 for r in conviction_table(conviction).to_dict("records")]
        out.append("* **Queries to conviction** (per seed; `-`: not convicted within the grid; "
                   f"`results/{summary['profile']}/conviction.md`, notebook 11): " + "; ".join(parts) + ".")
    if summary.get("adaptive"):
        out.append(_adaptive_line(summary["adaptive"]))
    rep = summary.get("reproducibility")
    if rep:
        out.append(_reproducibility_line(rep, summary))
    runs = {k: r for k, r in summary.get("timings", {}).get("runs", {}).items()
            if r.get("from_scratch", True)}  # runs on cached checkpoints say nothing about set-up time
    if runs:
        parts = [f"{len(r['seeds'])} seed{'s' if len(r['seeds']) > 1 else ''} "
                 f"({','.join(map(str, r['seeds']))}"
                 + ("".join(f", {k}={v}" for k, v in sorted(r["overrides"].items())) if r.get("overrides") else "")
                 + f") {r['wall_seconds'] / 60:.1f} min"
                 for r in sorted(runs.values(), key=lambda r: (len(r["seeds"]), bool(r.get("overrides"))))]
        out.append("* **Run time** from scratch on this course's 2-core machine (`results/"
                   f"{summary['profile']}/timings.json` when this was written): " + "; ".join(parts) + ".")
    out += ["", end]
    return "\n".join(out)


def _adaptive_line(rows: list[dict]) -> str:
    """The README's line on notebook 12's adaptive attackers, from :func:`adaptive_summary` rows."""
    def get(attacker: str, variant: str, defense: str) -> dict:
        return next((r for r in rows if (r["attacker"], r["variant"], r["defense"]) == (attacker, variant, defense)), {})

    parts = []
    avg = [r for r in rows if r["attacker"] == "averaging" and r["defense"] == "cip" and r.get("recovery") is not None]
    if avg:
        asks = max(r.get("R") or 0 for r in avg)
        parts.append(f"averaging {asks:.0f} asks of each of CIP's poisoned photo crops names its hidden top-1 on "
                     + ", ".join(f"{_pm_pct(r, 'single_answer', 0)} -> {_pm_pct(r, 'recovery', 0)} % ({r['variant']})"
                                 for r in avg) + " (one answer -> the mean)")
    budget = sorted({int(r["queries"]) for r in rows if r["attacker"] == "budget" and r.get("queries")})
    if budget:
        cells = [(q, get("budget", f"{q} queries", "none"), get("budget", f"{q} queries", "cip"))
                 for q in (budget[0], budget[-1])]
        parts.append("a hard-label thief on the mixed pool: " + "; ".join(
            f"{q:,} queries {_pm_pct(c, 'surrogate_acc')} % behind CIP, {_pm_pct(n, 'surrogate_acc')} % undefended"
            for q, n, c in cells))
    drop, keep = get("poison_aware", "soft, drop flat answers", "cip"), get("poison_aware", "soft, all answers", "cip")
    if drop and keep:
        parts.append(f"a soft-label thief that drops flat answers {_pm_pct(drop, 'surrogate_acc')} % behind CIP "
                     f"({_pm_pct(keep, 'surrogate_acc')} % keeping them)")
    return ("* **Attackers who know CIP** (notebook 12; every thief, defense and verdict in `table.md`): "
            + "; ".join(parts) + ".")


def _reproducibility_line(rep: dict, summary: dict) -> str:
    """The README's reproducibility bullet from ``reproducibility.json`` (``same_machine``, and
    ``other_machine`` from :func:`compare_machines` or, in older files, ``other_threads``;
    ``measured_at``, when set, says which results the comparison was made on)."""
    sds = [r["surrogate_acc"]["sd"] for r in summary["rows"] if r["surrogate_acc"].get("sd") is not None]
    spread = (f"against a seed-to-seed sd of {100 * sum(sds) / len(sds):.1f} points averaged over the table's "
              f"rows (up to {100 * max(sds):.1f})")
    same = rep["same_machine"]
    when = f" (measured on {rep['measured_at']})" if rep.get("measured_at") else ""
    text = (f"* **Reproducibility{when}.** Same machine, same seed: two from-scratch runs of seed 0 agree on "
            f"{same['identical']} of {same['json_files']} JSON artifacts, wall times aside"
            + (f" ({', '.join(same['differing'])} differ: {rep['same_machine_why']})" if same["differing"] else "")
            + ". ")
    other = rep.get("other_machine")
    if other:
        d = other["surrogate_acc_abs_diff"]
        seeds = ", ".join(f"{k} {v['identical']} of {v['json_files']}" for k, v in other["per_seed"].items())
        moved = other["beyond_seed_sd"]
        change = (f"none of the {d['n']} rows' {len(other['seeds'])}-seed mean surrogate accuracies moves"
                  if not d["max"] else
                  f"the {len(other['seeds'])}-seed mean surrogate accuracy moves by {100 * d['mean']:.1f} points "
                  f"on average (max {100 * d['max']:.1f}, `{d['max_row']}`) over {d['n']} rows")
        return text + (
            f"Another machine ({other['b']}, against {other['a']}): identical JSON artifacts per seed {seeds}; "
            f"{change}, {spread}; "
            f"{len(other['beyond_2se'])} of {d['n']} rows differ by more than 2 standard errors"
            + (f", and {len(moved)} move by more than their seed sd ({', '.join(f'`{m}`' for m in moved)}: three "
               f"seeds do not pin them down across machines)" if moved else "") + ".")
    other = rep["other_threads"]
    return text + (
        f"Other thread counts (our stand-in for another machine; `--jobs 1` runs every notebook on one "
        f"thread): surrogate accuracy moves by {100 * other['surrogate_acc_abs_diff']['mean']:.1f} points on "
        f"average (max {100 * other['surrogate_acc_abs_diff']['max']:.1f}) over "
        f"{other['surrogate_acc_abs_diff']['n']} runs, {spread}.")


def update_readme(readme: Path, summary_path: Path) -> bool:
    """Replace the block between the markers of ``readme`` by :func:`readme_block` of
    ``summary_path``; returns whether the file changed. Raises ``ValueError`` without markers."""
    text = Path(readme).read_text()
    summary = read_json(summary_path)
    begin, end = readme_markers(summary["profile"])
    if begin not in text or end not in text:
        raise ValueError(f"{readme} lacks the markers {begin!r} ... {end!r}")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    new = head + readme_block(summary) + tail
    if new != text:
        write_text(Path(readme), new)
    return new != text


def main(argv: list[str] | None = None) -> int:
    """``python -m cip_helpers.tools.report readme [--profile-dir results/quick]``: rewrite the README's
    results block from that directory's ``summary.json``;
    ``python -m cip_helpers.tools.report reproducibility --same A B --machines P Q``: compare two
    runs of one seed on one machine (:func:`compare_runs`) and two multi-seed runs from two machines
    (:func:`compare_machines`) into ``reproducibility.json`` (read by the next aggregate; a part
    not given is kept from the file);
    ``python -m cip_helpers.tools.report aggregate --profile-dir results/quick --seeds 0,1,2``: rewrite
    the multi-seed ``summary.json`` and ``table.md`` from the per-seed records."""
    import argparse

    from ..course.config import REPO_ROOT

    parser = argparse.ArgumentParser(prog="python -m cip_helpers.tools.report")
    parser.add_argument("command", choices=("readme", "aggregate", "reproducibility"))
    parser.add_argument("--same", nargs=2, type=Path, metavar=("A", "B"),
                        help="reproducibility: two runs of one seed on the same machine and threads")
    parser.add_argument("--other", nargs=2, type=Path, metavar=("A", "C"),
                        help="reproducibility: the same seed at other thread counts")
    parser.add_argument("--machines", nargs=2, type=Path, metavar=("A", "B"),
                        help="reproducibility: two multi-seed runs (profile directories) from two machines")
    parser.add_argument("--labels", nargs=2, default=("", ""), metavar=("LA", "LB"),
                        help="reproducibility: how to name the two machines' runs of --machines")
    parser.add_argument("--why", default="", help="reproducibility: why the differing files differ")
    parser.add_argument("--profile-dir", type=Path, default=REPO_ROOT / "results" / "quick")
    parser.add_argument("--seeds", default="", help="comma-separated (aggregate; default: all found)")
    args = parser.parse_args(argv)
    if args.command == "reproducibility":
        if not (args.same or args.other or args.machines):
            parser.error("reproducibility needs --same A B, --other A C and/or --machines A B")
        path = args.profile_dir / "reproducibility.json"
        out = read_json(path) if path.exists() else {}
        if args.same:
            out.update(same_machine=compare_runs(*args.same), same_machine_why=args.why)
        if args.other:
            out["other_threads"] = compare_runs(*args.other)
        if args.machines:
            out["other_machine"] = compare_machines(*args.machines, *args.labels)
        if "same_machine" not in out:
            parser.error(f"{path} has no same-machine comparison yet: give --same A B")
        print("wrote", write_json(path, out))
        return 0
    if args.command == "aggregate":
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()] or available_seeds(args.profile_dir)
        for p in write_seed_aggregate(args.profile_dir, seeds):
            print("wrote", p)
        return 0
    changed = update_readme(REPO_ROOT / "README.md", args.profile_dir / "summary.json")
    print("README.md results block " + ("rewritten" if changed else "already up to date"))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
