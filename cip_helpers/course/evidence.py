"""The evidence run: how many queries a thief makes before the owner can convict it, and whether a
KnockoffNets thief memorises flipped answers when it trains longer (notebook 11 reads both).

Both are grids of ordinary stealing runs (:func:`attacks.steal`), so each point is a record with a
trigger set and a surrogate, and notebook 11's verification judges it like any other run. They
cost many surrogates, so they run only with ``cfg.evidence`` (the multi-seed run:
``python3 tasks.py course --seeds 0,1,2 --set evidence=true --set n_innocent=24``), as the
runner's task ``evidence`` ahead of notebook 11.

The thieves (:data:`THIEVES`) send the first n queries of the transfer set they send in notebooks
07, 09 and 10, for n in ``cfg.conviction_queries`` plus the whole set, to two defenses that leave
evidence: CIP as an owner serves it (online PBD) and DAWN at the same nominal share of answers
altered (``cfg.pbd_r1_percentile`` %, of every query; CIP's share is of the ID-routed ones).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import attacks, data
from .config import Profile

THIEVES = {"ida_hard": "IDA, hard labels", "ida_soft": "IDA, soft labels",
           "dqa": "DQA (r = 1), soft labels", "knockoff_mixed": "KnockoffNets, mixed pool"}
"""The thieves of the queries-to-conviction grid and how the tables name them."""

GRID_DEFENSES = ("cip", "dawn")
"""The defenses of the grid: the two that keep a trigger set."""

ORDER_SEED = 2718
"""Seed (plus 1000 x ``cfg.seed``) of the order in which the IDA/DQA thieves of the grid send their
digits: the attacker's half is stored class by class, and a thief with a smaller budget sends a
random sample of it, not the first classes."""


def thief_queries(cfg: Profile, thief: str) -> tuple[str, Tensor, Tensor | None, Tensor | None, str]:
    """The whole transfer set of a thief of :data:`THIEVES`, in the order it is sent: ``(attack,
    queries, keep, sources, label_type)``; ``keep`` marks the answers it trains on (DQA: the ID
    ones; ``None``: all), ``sources`` the mixed pool's source codes. IDA's digits come in a
    random order (:data:`ORDER_SEED`); DQA's ID slots hold them in the same order, so the ID part of
    a DQA prefix is an IDA prefix and reuses its surrogate. The mixed pool is shuffled already.
    Raises ``KeyError``."""
    if thief not in THIEVES:
        raise KeyError(f"unknown thief {thief!r}; choose one of {sorted(THIEVES)}")
    if thief == "knockoff_mixed":
        x, source = attacks.pool_queries(cfg, "mixed")
        return "knockoff", x, None, source, cfg.knockoff_curve_label_type
    x_att, _ = data.id_data(cfg).split("attacker")
    order = torch.randperm(len(x_att), generator=torch.Generator().manual_seed(ORDER_SEED + 1000 * cfg.seed))
    if thief.startswith("ida"):
        return "ida", x_att[order], None, None, thief.split("_")[1]
    x, is_id = attacks.dqa_queries(cfg, 1.0)  # thief == "dqa"
    x = x.clone()
    x[is_id] = x_att[order]  # dqa_queries puts the digits into the ID slots in their order
    return "dqa", x, is_id, None, cfg.dqa_label_type


def defense_kwargs(cfg: Profile, attack: str, defense: str) -> dict:
    """The grid's defended API: CIP as served (:func:`attacks.served_cip_kwargs`), DAWN at
    ``cfg.pbd_r1_percentile`` % of the queries."""
    if defense == "cip":
        return attacks.served_cip_kwargs(attack)
    if defense == "dawn":
        return {"dawn_rate": cfg.pbd_r1_percentile / 100}
    raise ValueError(f"the grid's defenses are {GRID_DEFENSES}, got {defense!r}")


def conviction_point(cfg: Profile, thief: str, defense: str, n: int, verbose: bool = False) -> dict:
    """One point of the grid: the thief's first ``n`` queries against a fresh ``defense``, its
    surrogate trained as in the thief's notebook. The record's setting is the thief's own
    (``hard``, ``soft``, ``r1``, ``mixed_<label>``), ``_online`` for CIP, and ``_n<n>``
    (``ida_cip_hard_online_n500``); it carries ``grid="conviction"``, ``thief`` and
    ``grid_queries`` = n."""
    return _steal_prefix(cfg, thief, thief_queries(cfg, thief), defense, n, verbose)


def _steal_prefix(cfg: Profile, thief: str, transfer: tuple, defense: str, n: int, verbose: bool) -> dict:
    """:func:`conviction_point` with the thief's transfer set (:func:`thief_queries`) at hand."""
    attack, x, keep, sources, label_type = transfer
    if not 1 <= n <= len(x):
        raise ValueError(f"n must be in [1, {len(x)}] (the {thief} transfer set), got {n}")
    epochs = cfg.surrogate_epochs if attack == "knockoff" else cfg.ida_epochs
    split = "all" if attack == "knockoff" else "half"
    base = {"ida": label_type, "dqa": "r1", "knockoff": f"mixed_{label_type}"}[attack]
    setting = base + ("_online" if defense == "cip" else "") + f"_n{n}"
    return attacks.steal(
        cfg, attack, defense, x[:n], label_type, split=split, setting=setting,
        keep=None if keep is None else keep[:n], defense_kwargs=defense_kwargs(cfg, attack, defense),
        fit={"epochs": epochs}, sources=None if sources is None else sources[:n],
        extra={"grid": "conviction", "thief": thief, "grid_queries": n, "ablation": "queries to conviction"},
        verbose=verbose)


def conviction_grid(cfg: Profile, verbose: bool = False) -> list[dict]:
    """Every point of the grid (:func:`conviction_point`) for every thief and defense: n in
    ``cfg.conviction_queries`` below the transfer set's size, and the whole set. Surrogates whose
    (query, answer) pairs were trained before are loaded (DQA's ID part is IDA's)."""
    records = []
    for thief in THIEVES:
        transfer = thief_queries(cfg, thief)  # built once per thief, cut per budget
        full = len(transfer[1])
        for n in sorted({*(n for n in cfg.conviction_queries if n < full), full}):
            for defense in GRID_DEFENSES:
                records.append(_steal_prefix(cfg, thief, transfer, defense, n, verbose))
    return records


def memorisation_run(cfg: Profile, label_type: str, verbose: bool = False) -> dict:
    """Mixed-pool KnockoffNets against the served CIP (online PBD), its surrogate trained for
    ``cfg.memorisation_epochs`` with the trigger accuracy logged after every epoch (``history``:
    ``train_acc``, ``test_acc``, ``trigger_acc``). Record setting ``mixed_<label>_online_ep<E>``,
    ``grid="memorisation"``."""
    x, source = attacks.pool_queries(cfg, "mixed")
    return attacks.steal(
        cfg, "knockoff", "cip", x, label_type, setting=f"mixed_{label_type}_online_ep{cfg.memorisation_epochs}",
        defense_kwargs=attacks.served_cip_kwargs("knockoff"), sources=source,
        fit={"epochs": cfg.memorisation_epochs, "trigger_curve": True},
        extra={"grid": "memorisation", "ablation": "memorisation: longer training"}, verbose=verbose)


def run_evidence(cfg: Profile, verbose: bool = False) -> list[dict]:
    """The whole evidence run of one seed (nothing without ``cfg.evidence``): the grid, then the
    memorisation runs (hard and soft labels). Returns the records."""
    if not cfg.evidence:
        return []
    torch.manual_seed(cfg.seed)
    return [*conviction_grid(cfg, verbose), *(memorisation_run(cfg, t, verbose) for t in ("hard", "soft"))]
