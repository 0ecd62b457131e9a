"""Attackers who know CIP (notebook 12): four adaptive thieves against every defense, and the
harness that scores them.

* (a) **averaging**: the thief asks each photo crop the defense poisoned R times (or R nudged
  copies of it), averages the answers and guesses the hidden top-1 (:func:`nudge`,
  :func:`running_means`, :func:`guess_top1`). No training: it runs live in notebook 12.
* (b) **poison-aware**: on the mixed KnockoffNets pool, the thief drops the answers that look
  poisoned (:func:`looks_poisoned`) or keeps only the top-1 labels, and trains on the rest.
* (c) **query selection**: a first surrogate on a quarter of the pool picks the rest of a
  half-pool budget where it is most in-distribution (:func:`select_in_distribution`).
* (d) **budget growth**: hard-label surrogates on the first n queries of the mixed pool and of
  shifted / flipped copies of it beyond (:func:`augment`).

The thief only ever calls ``api(x)``; the hidden top-1 it tries to recover (a), the defender's
trigger log and the ownership test (notebook 11's :func:`verification.ownership_test` against
:func:`pipeline.get_innocent_models`) are read from the defender's side, to score it. (b)-(d)
train surrogates (:func:`attacks.train_surrogate`, load-or-train, content-addressed), so they run
only with ``cfg.evidence`` (the evidence run); :func:`run` writes one JSON per seed,
``results/<profile>/seed-<k>/adaptive.json``, recording the sha256 of the checkpoints whose
answers it measured, and :func:`load` refuses it for other weights or settings. :func:`aggregate`
gives mean ± sd over seeds per row.

The functions notebook 12 shows in its cells (``# shown from cip_helpers.course.adaptive``) are
the ideas; the rest is bookkeeping.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from scipy import stats
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..method import verification
from ..method.defenses import Defense
from ..method.digests import row_digests, weights_sha256
from ..method.models import predict_logits
from . import attacks, data, pipeline, training
from .config import Profile
from .store import CheckpointError, read_json, write_json

DEFENSES = ("none", "dp", "dawn", "cip", "am")
"""The defenses every adaptive thief meets (those :data:`pipeline.DEFENSES` builds; see
:func:`available`). ``cip`` is served as an owner serves it (online PBD,
:func:`attacks.served_cip_kwargs`)."""

TRIGGER_DEFENSES = ("dawn", "cip")
"""Defenses that keep a trigger log, judged with notebook 11's ownership test."""

OE_ANSWERED = ("oe", "cip", "am")
"""Defenses whose hidden model is the OE-tuned victim M'_V (the others wrap the plain victim)."""

LOWEST_RULE = ("cip", "am")
"""Defenses against which the averaging thief guesses the class with the LOWEST mean: CIP's
strong poisoning (``shuffle_noise``) never leaves the top mass on the hidden top-1, and AM's
misinformation model is trained to put low mass on it. Against the others: the HIGHEST mean."""

RULES = ("highest", "lowest")
NUDGES = ("repeat", "ulp", "noise", "pixel")
"""How the averaging thief varies a crop between asks (:func:`nudge`)."""

R_GRID = (1, 2, 5, 10, 20, 50, 100, 200)
"""Asks per crop at which the averaging thief's recovery rate is read, up to its budget
(:func:`repeats`)."""

EVIDENCE_SCALE = 5
"""The evidence run's averaging attack uses this many times the live crops (:func:`evidence_crops`)."""

PROBE = 4000
"""At most this many pool crops are asked once to find those a defense poisons (live run)."""

POISON_PMAX = 0.5
"""(b): an answer looks poisoned when no class holds this much of its mass (:func:`looks_poisoned`)."""

SELECTION = (0.25, 0.5)
"""(c): the first surrogate's budget and the whole budget, as fractions of the mixed pool."""

BUDGET = (0.125, 0.25, 0.5, 1.0, 2.0, 3.0)
"""(d): query budgets as multiples of the mixed pool (beyond 1: shifted / flipped copies)."""

MAX_SHIFT = 2
"""(d): the augmented copies are shifted by up to this many pixels."""

THIEF_SEED = 6161
"""Offset (plus 1000 x ``cfg.seed``) of the thieves' random nudges, shifts and flips."""

FILE = "adaptive.json"
VERSION = 1
COMMAND = "python3 tasks.py course --seeds 0,1,2 --set evidence=true --set n_innocent=24"
"""The command whose evidence run writes ``adaptive.json`` for every seed."""

NOT_SETTINGS = ("tag", "cell_timeout", "job_gpus", "job_mem_gb", "job_minutes", "job_partition",
                "evidence", "n_innocent")
"""Profile fields that do not change what ``adaptive.json`` measured (``n_innocent`` changes the
verdicts' pool, which the file records as ``n_innocent``)."""

CHECKPOINTS = ("victim_all", "oe_victim_all", "misinformation_all")
"""The checkpoints whose weights answer behind the defenses (the last only with AM)."""


# ----------------------------------------------------------------------------- sizes


def live_crops(cfg: Profile) -> int:
    """Crops per defense of the live averaging attack: the profile's ``adaptive_crops``."""
    return int(cfg.adaptive_crops)


def evidence_crops(cfg: Profile) -> int:
    """Crops per defense of the evidence run's averaging attack: :data:`EVIDENCE_SCALE` x :func:`live_crops`."""
    return EVIDENCE_SCALE * live_crops(cfg)


def repeats(cfg: Profile) -> tuple[int, ...]:
    """The R grid of the averaging attack: :data:`R_GRID` up to the profile's ``adaptive_repeats``
    (default: all of it), which ends it."""
    top = int(cfg.adaptive_repeats)
    return tuple(sorted({*(r for r in R_GRID if r < top), top}))


# ----------------------------------------------------------------------------- the defenses


def available(names: Sequence[str] = DEFENSES) -> tuple[str, ...]:
    """The defenses of ``names`` that :func:`pipeline.get_defense` can build in this checkout."""
    return tuple(n for n in names if n in pipeline.DEFENSES)


def fresh_api(cfg: Profile, name: str) -> Defense:
    """A fresh defended API of ``name`` around the ``all`` victim, seeded as notebook 07's runs; CIP
    as an owner serves it against KnockoffNets (online PBD, :func:`attacks.served_cip_kwargs`)."""
    training.set_seed(cfg.seed)
    return attacks.make_defense(cfg, name, **(attacks.served_cip_kwargs("knockoff") if name == "cip" else {}))


def hidden_model(cfg: Profile, name: str) -> nn.Module:
    """The model behind the API of ``name``: the OE-tuned victim for :data:`OE_ANSWERED`, else the
    plain victim (the ``all`` split)."""
    if name in OE_ANSWERED:
        return pipeline.get_oe_victim(cfg, "all", verbose=False)[0]
    return pipeline.get_victim(cfg, "all", verbose=False)[0]


# ----------------------------------------------------------------------------- (a) averaging


def nudge(x: Tensor, kind: str, generator: torch.Generator) -> Tensor:
    """One copy of every image of ``x`` (M, C, H, W) in [0, 1], varied by ``kind`` with random
    choices from ``generator``: ``repeat`` the image itself; ``ulp`` one random pixel moved by one
    float32 ulp towards mid-grey (``torch.nextafter``); ``noise`` every pixel plus uniform noise
    in [-1/255, 1/255], clipped to [0, 1]; ``pixel`` one random pixel set to 1 minus its value.
    Returns (M, C, H, W). Raises ``ValueError`` for another kind."""
    if kind not in NUDGES:
        raise ValueError(f"kind must be one of {NUDGES}, got {kind!r}")
    if kind == "repeat":
        return x
    if kind == "noise":
        return (x + (2 * torch.rand(x.shape, generator=generator) - 1) / 255).clamp(0, 1)
    flat = x.reshape(len(x), -1).clone()
    rows, cols = torch.arange(len(x)), torch.randint(flat.shape[1], (len(x),), generator=generator)
    v = flat[rows, cols]
    flat[rows, cols] = torch.nextafter(v, torch.full_like(v, 0.5)) if kind == "ulp" else 1 - v
    return flat.reshape(x.shape)


def running_means(api: Callable[[Tensor], Tensor], x: Tensor, r: int, kind: str,
                  generator: torch.Generator, per_call: int = 10) -> Tensor:
    """The averaging thief: ask ``api`` about ``r`` copies of every crop of ``x`` (M, C, H, W),
    each a fresh :func:`nudge` of ``kind`` (``per_call`` copies of every crop per call), and
    average. Returns (r, M, K): row j holds, per crop, the mean of its first j + 1 answers."""
    answers = []
    for start in range(0, r, per_call):
        n = min(per_call, r - start)
        copies = torch.cat([nudge(x, kind, generator) for _ in range(n)])  # copy-major: (n * M, C, H, W)
        answers.append(api(copies).reshape(n, len(x), -1))  # <- the thief's only access to the victim
    a = torch.cat(answers)
    return a.cumsum(0) / torch.arange(1, r + 1, dtype=a.dtype).reshape(-1, 1, 1)


def guess_top1(mean_answers: Tensor, rule: str) -> Tensor:
    """The thief's guess of the hidden top-1 from averaged answers (..., K): the class with the
    ``"highest"`` mean, or the ``"lowest"`` (against a poisoning that moves mass away from the
    hidden top-1: CIP's shuffle, AM's misinformation; :data:`LOWEST_RULE`). Returns (...) int64."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    return mean_answers.argmax(-1) if rule == "highest" else mean_answers.argmin(-1)


def poisoned_crops(api: Callable[[Tensor], Tensor], hidden: nn.Module, x: Tensor, m: int,
                   chunk: int = 500) -> tuple[Tensor, int]:
    """Which crops the defense poisons: ask ``api`` once about the crops of ``x`` (N, C, H, W), a
    ``chunk`` at a time, until ``m`` answers whose top-1 is not the ``hidden`` model's are found
    (or ``x`` is used up). Returns ``(indices into x (at most m, int64), crops asked)``."""
    found, asked = [], 0
    for start in range(0, len(x), chunk):
        part = x[start:start + chunk]
        wrong = api(part).argmax(1) != predict_logits(hidden, part).argmax(1)
        found.append(torch.nonzero(wrong).flatten() + start)
        asked += len(part)
        if sum(len(f) for f in found) >= m:
            break
    return torch.cat(found)[:m] if found else torch.zeros(0, dtype=torch.long), asked


def chance_bound(m: int, p0: float, alpha: float = 0.01) -> float | None:
    """The smallest recovery rate a guess that ignores the answers (right with probability ``p0``
    per crop) reaches with probability at most ``alpha`` on ``m`` crops: (c + 1) / m for the
    (1 - alpha) quantile c of Binomial(m, p0). ``None`` for m = 0."""
    return None if m == 0 else (float(stats.binom.ppf(1 - alpha, m, p0)) + 1) / m


def averaging(cfg: Profile, names: Sequence[str], m: int | None = None, probe: int | None = PROBE,
              r_grid: Sequence[int] | None = None, nudges: Sequence[str] = NUDGES) -> dict:
    """The averaging attack (a) against every defense of ``names``: the first ``m`` (default
    :func:`live_crops`) crops of the KnockoffNets pool (:func:`attacks.knockoff_queries`, at most
    ``probe`` asked; ``None``: all) that the defense poisons (:func:`poisoned_crops`), then
    :func:`running_means` with each nudge of ``nudges`` up to ``max(r_grid)`` asks (default
    :func:`repeats`). Per defense: ``crops``, ``probed``, ``rule`` (the
    thief's, :data:`LOWEST_RULE`), ``majority`` (share of the crops' most common hidden top-1),
    ``chance_bound`` (:func:`chance_bound` with p0 = max(1/K, majority), alpha = ``cfg.alpha``),
    ``identical_repeats`` (share of crops whose first two plain answers are bitwise equal), and
    ``curves[nudge][rule]`` = [[R, recovery rate], ...]; ``weights_sha256`` names the answering
    model. Each defense gets a fresh API; the nudges are seeded (:data:`THIEF_SEED`)."""
    m = live_crops(cfg) if m is None else m
    r_grid = repeats(cfg) if r_grid is None else tuple(r_grid)
    pool = attacks.knockoff_queries(cfg)
    pool = pool if probe is None else pool[:probe]
    r = max(r_grid)
    out = {}
    for name in names:
        api, hidden = fresh_api(cfg, name), hidden_model(cfg, name)
        idx, asked = poisoned_crops(api, hidden, pool, m)
        x = pool[idx]
        top1 = predict_logits(hidden, x).argmax(1)
        k = api.n_classes
        majority = float(top1.bincount(minlength=k).max()) / len(x) if len(x) else None
        res = {"crops": len(x), "probed": asked, "rule": "lowest" if name in LOWEST_RULE else "highest",
               "majority": majority, "chance_bound": chance_bound(len(x), max(1 / k, majority or 0), cfg.alpha),
               "weights_sha256": api.weights_sha256, "identical_repeats": None, "curves": {}}
        if hasattr(api, "misinformation_sha256"):  # AM: a second model answers too
            res["misinformation_sha256"] = api.misinformation_sha256
        if len(x):
            twice = api(torch.cat([x, x]))
            res["identical_repeats"] = float((twice[:len(x)] == twice[len(x):]).all(1).double().mean())
            for i, kind in enumerate(nudges):
                g = torch.Generator().manual_seed(THIEF_SEED + 1000 * cfg.seed + i)
                means = running_means(api, x, r, kind, g)
                res["curves"][kind] = {rule: [[n, float((guess_top1(means[n - 1], rule) == top1).double().mean())]
                                              for n in r_grid] for rule in RULES}
        out[name] = res
    return out


def averaging_rows(result: dict) -> list[dict]:
    """One row per (defense, nudge) of an :func:`averaging` result: recovery at the largest R with
    the thief's rule (``recovery``) and with each rule, and the single answer's (R = 1)."""
    rows = []
    for name, res in result.items():
        for kind, by_rule in res["curves"].items() or [(k, None) for k in NUDGES]:
            row = {"attacker": "averaging", "variant": kind, "defense": name, "rule": res["rule"],
                   "crops": res["crops"], "R": None, "recovery": None, "single_answer": None,
                   "recovery_highest": None, "recovery_lowest": None, "chance_bound": res["chance_bound"],
                   "identical_repeats": res["identical_repeats"]}
            if by_rule:
                row.update(R=by_rule[res["rule"]][-1][0], recovery=by_rule[res["rule"]][-1][1],
                           single_answer=by_rule[res["rule"]][0][1],
                           recovery_highest=by_rule["highest"][-1][1], recovery_lowest=by_rule["lowest"][-1][1])
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------- (b)-(d) the thief's queries


def looks_poisoned(answers: Tensor, pmax: float = POISON_PMAX) -> Tensor:
    """(N,) bool: the answers (N, K) that look poisoned to a thief who knows CIP: flat rows, where
    no class holds ``pmax`` of the mass (CIP's reverse sigmoid and strong poisoning both flatten;
    an honest confident answer does not)."""
    return answers.max(1).values < pmax


def select_in_distribution(surrogate: nn.Module, candidates: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` images of ``candidates`` (N, C, H, W) that the thief's own surrogate
    finds most in-distribution: the lowest energy E(x) = -logsumexp_j f_j(x) (notebook 02's
    score, on the surrogate's logits). Returns (k,) int64, most in-distribution first."""
    energy = -torch.logsumexp(predict_logits(surrogate, candidates), 1)
    return energy.argsort()[:k]


def augment(x: Tensor, generator: torch.Generator, max_shift: int = MAX_SHIFT) -> Tensor:
    """A new copy of every image of ``x`` (N, C, H, W): shifted by a random whole number of
    pixels in [-max_shift, max_shift] along each axis (zero fill) and mirrored left-right with
    probability 1/2."""
    n, _, h, w = x.shape
    dx, dy = (torch.randint(-max_shift, max_shift + 1, (n,), generator=generator) for _ in range(2))
    flip = torch.rand(n, generator=generator) < 0.5
    padded = F.pad(x, (max_shift,) * 4)
    out = torch.empty_like(x)
    for i in range(n):  # the crop window of image i in the padded image
        top, left = max_shift + int(dy[i]), max_shift + int(dx[i])
        out[i] = padded[i, :, top:top + h, left:left + w]
    out[flip] = out[flip].flip(-1)
    return out


def thief_stream(cfg: Profile, n: int) -> Tensor:
    """The first ``n`` queries of the budget thief (d): the mixed pool (:func:`attacks.mixed_queries`,
    in its order), then :func:`augment` copies of it, one seeded copy of the whole pool after the other."""
    pool, _ = attacks.mixed_queries(cfg)
    parts, k = [pool], 0
    while sum(len(p) for p in parts) < n:
        k += 1
        parts.append(augment(pool, torch.Generator().manual_seed(THIEF_SEED + 1000 * cfg.seed + 100 + k)))
    return torch.cat(parts)[:n]


def triggers_among(api: Defense, sent: Tensor) -> tuple[Tensor, Tensor] | None:
    """The defender's trigger log restricted to the images of ``sent`` (N, C, H, W): ``(x, altered
    labels)`` of the logged triggers that are among them (bitwise), in log order; ``None`` for a
    defense without a log (not :data:`TRIGGER_DEFENSES`)."""
    log = getattr(api, "trigger_set", None)
    if api.name not in TRIGGER_DEFENSES or log is None:
        return None
    if len(log) == 0:
        return log.x.reshape(0, *sent.shape[1:]), torch.zeros(0, dtype=torch.long)
    have = set(row_digests(sent))
    keep = torch.tensor([d in have for d in row_digests(log.x)], dtype=torch.bool)
    return log.x[keep], log.labels[keep]


class Judge:
    """Notebook 11's ownership test for this seed: the innocent pool (:func:`pipeline.get_innocent_models`)
    and the owner's OOD detector (the OE-tuned ``all`` victim, energy >= E1) for the dependence units."""

    def __init__(self, cfg: Profile) -> None:
        self.innocents = pipeline.get_innocent_models(cfg, verbose=False)
        self.owner = pipeline.get_oe_victim(cfg, "all", verbose=False)[0]
        self.thresholds = pipeline.get_thresholds(cfg, "all", verbose=False)
        self.alpha = cfg.alpha

    def __call__(self, suspect: nn.Module, triggers: tuple[Tensor, Tensor] | None) -> dict:
        """``T`` (distinct triggers), ``m``, ``units``, ``m_units``, ``p_value``, ``flagged`` of
        :func:`verification.ownership_test` (all ``None`` without a log; p = 1 with an empty one)."""
        if triggers is None:
            return {"T": None, "m": None, "units": None, "m_units": None, "p_value": None, "flagged": None}
        x, labels = triggers
        if len(x) == 0:
            return {"T": 0, "m": 0, "units": 0, "m_units": 0, "p_value": 1.0, "flagged": False}
        ood = verification.ood_flags(self.owner, x, self.thresholds["E1"], self.thresholds["T"])
        v = verification.ownership_test(suspect, self.innocents, x, labels, ood, self.alpha)
        return {k: v[k] for k in ("T", "m", "units", "m_units", "p_value", "flagged")}


def _surrogate_row(cfg: Profile, attacker: str, variant: str, name: str, x: Tensor, answers: Tensor,
                   label_type: str, triggers: tuple[Tensor, Tensor] | None, judge: Judge | None,
                   sent: int) -> dict:
    """Train (load-or-train) a surrogate on ``(x, answers)`` and score it: test accuracy and the
    ownership verdict on ``triggers`` (the log of the queries the thief sent)."""
    row = {"attacker": attacker, "variant": variant, "defense": name, "label_type": label_type,
           "queries": sent, "trained": len(x), "surrogate_acc": None, "surrogate_sha256": None,
           "surrogate_loaded": None}
    verdict = {"T": None, "m": None, "units": None, "m_units": None, "p_value": None, "flagged": None}
    if len(x):
        model, info = attacks.train_surrogate(cfg, x, answers, label_type, verbose=False, eval_sets=_eval(triggers),
                                              desc=f"adaptive {attacker} {name} {variant}")
        row.update(surrogate_acc=training.accuracy(model, *data.id_data(cfg).split("test")),
                   surrogate_sha256=weights_sha256(model), surrogate_loaded=info["loaded"])
        if judge is not None:
            verdict = judge(model, triggers)
    return {**row, **verdict}


def budget_points(pool: int) -> list[int]:
    """(d)'s query budgets for a mixed pool of ``pool`` images (:data:`BUDGET`)."""
    return sorted({max(1, round(f * pool)) for f in BUDGET})


def thieves(cfg: Profile, name: str, judge: Judge | None) -> list[dict]:
    """Rows of the thieves (b)-(d) against ``name``: one fresh API answers the mixed pool in one
    call (as notebook 07's run, whose surrogates are then reused) and its augmented copies in a
    second; the thieves train on parts of these answers (every defense answers per query, so the
    answer to a query does not depend on what else was asked), and each is judged on the
    triggers logged among the queries it sent."""
    _, source = attacks.mixed_queries(cfg)
    pool = len(source)
    points = budget_points(pool)
    x = thief_stream(cfg, max(points))
    api = fresh_api(cfg, name)
    answers = torch.cat([api(x[:pool]), api(x[pool:])]) if len(x) > pool else api(x)
    rows = []
    # (b) poison-aware: the whole pool sent, the answers that look poisoned dropped (or not)
    flat = looks_poisoned(answers[:pool])
    logged = triggers_among(api, x[:pool])
    for label_type in attacks.LABEL_TYPES:
        for variant, keep in (("all answers", torch.ones(pool, dtype=torch.bool)), ("drop flat answers", ~flat)):
            rows.append(_surrogate_row(cfg, "poison_aware", f"{label_type}, {variant}", name, x[:pool][keep],
                                       answers[:pool][keep], label_type, logged, judge, pool))
    # (d) budget growth, hard labels: the first n queries of the stream
    for n in points:
        rows.append(_surrogate_row(cfg, "budget", f"{n} queries", name, x[:n], answers[:n], "hard",
                                   triggers_among(api, x[:n]), judge, n))
    # (c) query selection: a first surrogate on n0 queries picks the rest of the budget n
    n0, n = (max(1, round(f * pool)) for f in SELECTION)
    first, _ = attacks.train_surrogate(cfg, x[:n0], answers[:n0], "hard", verbose=False,
                                       eval_sets=_eval(triggers_among(api, x[:n0])),
                                       desc=f"adaptive budget {name} {n0} queries")
    chosen = torch.cat([torch.arange(n0), n0 + select_in_distribution(first, x[n0:pool], n - n0)])
    for variant, idx in (("first queries", torch.arange(n)), ("lowest energy", chosen)):
        rows.append(_surrogate_row(cfg, "selection", variant, name, x[idx], answers[idx], "hard",
                                   triggers_among(api, x[idx]), judge, n))
    # what the second stage asked for: the share of photo crops (source 1) among the queries after n0
    rows[-2]["photos_after_first"] = float((source[n0:n] == 1).double().mean())
    rows[-1]["photos_after_first"] = float((source[chosen[n0:]] == 1).double().mean())
    return rows


def _eval(triggers: tuple[Tensor, Tensor] | None) -> dict | None:
    """A surrogate's per-epoch evaluation sets: the trigger log, as notebook 07's runs log it."""
    return {"trigger": triggers} if triggers is not None and len(triggers[0]) else None


def _with_costs(rows: list[dict]) -> list[dict]:
    """Add ``undefended_acc`` (the ``none`` row of the same attacker and variant) and ``cost``
    (undefended minus this row's surrogate accuracy) to every surrogate row."""
    base = {(r["attacker"], r["variant"]): r.get("surrogate_acc") for r in rows if r["defense"] == "none"}
    for r in rows:
        if "surrogate_acc" in r:
            u = base.get((r["attacker"], r["variant"]))
            r["undefended_acc"] = u
            r["cost"] = None if u is None or r["surrogate_acc"] is None else u - r["surrogate_acc"]
    return rows


# ----------------------------------------------------------------------------- the file


def settings(cfg: Profile) -> dict:
    """What ``adaptive.json`` was measured with: the profile's fields (but :data:`NOT_SETTINGS`)
    and the thieves' constants, as JSON values."""
    profile = {k: v for k, v in cfg.as_dict().items() if k not in NOT_SETTINGS}
    thief = {"defenses": list(DEFENSES), "nudges": list(NUDGES), "r_grid": list(repeats(cfg)),
             "crops": evidence_crops(cfg), "probe": None,
             "poison_pmax": POISON_PMAX, "selection": list(SELECTION), "budget": list(BUDGET),
             "max_shift": MAX_SHIFT, "thief_seed": THIEF_SEED,
             "query_form": attacks.form_spec()}
    return json.loads(json.dumps({"profile": profile, "thieves": thief}))


def checkpoint_hashes(cfg: Profile, names: Sequence[str] = CHECKPOINTS) -> dict[str, str]:
    """sha256 of the weights of every checkpoint of ``names`` on disk (name -> hex; an unreadable
    file gives ``"unreadable"``)."""
    out = {}
    for stage in names:
        path = cfg.checkpoint_dir / f"{stage}.pt"
        if path.exists():
            try:
                out[stage] = attacks.checkpoint_sha256(path)
            except CheckpointError:
                out[stage] = "unreadable"
    return out


def run(cfg: Profile, names: Sequence[str] | None = None, verbose: bool = True) -> dict:
    """The whole adaptive grid of one seed: (a) with :func:`evidence_crops` crops per defense (every
    crop of the pool may be probed), and (b)-(d) when
    the data has a mixed pool (:func:`data.has_near_pool`), against every defense of ``names``
    (default: :func:`available`). Writes ``cfg.results_dir / FILE`` and returns it: ``rows`` (one
    per attacker, variant and defense: :func:`averaging_rows` and the surrogate rows with
    ``surrogate_acc``, ``undefended_acc``, ``cost``, the verdict ``T``, ``m``, ``p_value``,
    ``flagged``), ``averaging`` (the curves), ``checkpoints`` (:func:`checkpoint_hashes`),
    ``defenses`` (the answering weights per defense), ``settings``, ``n_innocent``, ``seconds``."""
    start = time.perf_counter()
    names = available() if names is None else tuple(names)
    avg = averaging(cfg, names, m=evidence_crops(cfg), probe=None)
    rows = averaging_rows(avg)
    mixed = data.has_near_pool(cfg)
    judge = Judge(cfg) if mixed and set(names) & set(TRIGGER_DEFENSES) else None
    apis = {name: {k: v for k, v in res.items() if k.endswith("sha256")} for name, res in avg.items()}
    for name in names:
        t = time.perf_counter()
        if mixed:
            part = thieves(cfg, name, judge if name in TRIGGER_DEFENSES else None)
            rows += part
            if verbose:
                loaded = [r["surrogate_loaded"] for r in part if r["surrogate_loaded"] is not None]
                print(f"adaptive thieves vs {name}: {len(part)} rows, {loaded.count(False)} surrogates trained, "
                      f"{loaded.count(True)} loaded, in {time.perf_counter() - t:.0f} s", flush=True)
    result = {"version": VERSION, "profile": cfg.name, "seed": cfg.seed, "dataset": cfg.dataset,
              "defenses": apis, "checkpoints": checkpoint_hashes(cfg), "settings": settings(cfg),
              "n_innocent": cfg.n_innocent, "mixed_pool": len(attacks.mixed_queries(cfg)[0]) if mixed else None,
              "rows": _with_costs(rows), "averaging": avg,
              "seconds": round(time.perf_counter() - start, 1)}
    write_json(cfg.results_dir / FILE, result)
    return result


def load(cfg: Profile) -> tuple[dict | None, str]:
    """``(adaptive.json of this seed, "")`` when it exists and belongs to these weights and settings,
    else ``(None, why not)``. Weights: every checkpoint the file names must hold the recorded
    sha256 where it exists (without checkpoints, a fresh clone reading committed JSON, there is
    nothing to compare); settings: :func:`settings`."""
    path = cfg.results_dir / FILE
    if not path.exists():
        return None, f"no {FILE} in {path.parent.name}"
    try:
        stored = read_json(path)
    except ValueError as exc:
        return None, f"{FILE} is not readable JSON ({exc})"
    if stored.get("version") != VERSION:
        return None, f"{FILE} is of version {stored.get('version')}, this code writes {VERSION}"
    have = checkpoint_hashes(cfg, list(stored.get("checkpoints", {})))
    stale = [k for k, v in have.items() if stored["checkpoints"].get(k) != v]
    if stale:
        return None, f"{FILE} was measured against other weights than {', '.join(s + '.pt' for s in stale)} now hold"
    want = settings(cfg)
    if stored.get("settings") != want:
        old, new = stored.get("settings", {}), want
        diff = sorted({k for part in ("profile", "thieves") for k in set(old.get(part, {})) | set(new[part])
                       if old.get(part, {}).get(k) != new[part].get(k)})
        return None, f"{FILE} was measured with other settings ({', '.join(diff) or 'format'})"
    return stored, ""


def load_or_run(cfg: Profile, verbose: bool = True) -> tuple[dict | None, str]:
    """With ``cfg.evidence``: the valid stored file (:func:`load`), else :func:`run`. Without:
    :func:`load` only. Returns ``(result or None, why there is none)``."""
    stored, why = load(cfg)
    if stored is not None or not cfg.evidence:
        return stored, why
    return run(cfg, verbose=verbose), ""


def missing_message(why: str) -> str:
    """What notebook 12 prints when there is no valid ``adaptive.json``: why, and the command."""
    return (f"{why}: the thieves (b)-(d) train surrogates, so they run in the evidence run only:\n"
            f"  {COMMAND}\n(it writes results/<profile>/seed-<k>/{FILE} for every seed)")


# ----------------------------------------------------------------------------- across seeds


KEYS = ("attacker", "variant", "defense")
"""What identifies a row of ``adaptive.json`` across seeds."""


def aggregate(per_seed: list[dict]) -> list[dict]:
    """Mean ± sd over seeds per row: ``per_seed`` holds one ``adaptive.json`` (:func:`run`) per
    seed. Returns one dict per (attacker, variant, defense), in first-seen order, with those keys,
    ``seeds`` (the seeds with the row), ``n`` (how many), and for every numeric field ``f`` of the
    rows (``surrogate_acc``, ``cost``, ``recovery``, ``p_value``, ...) ``f`` (the mean over the
    seeds that have a value, ``None`` if none) and ``f_sd`` (sample sd, ``None`` below two
    values); ``flagged`` becomes the number of seeds whose surrogate was flagged, ``judged`` the
    number with a verdict. Text fields that agree over the seeds (``rule``, ``label_type``) are
    kept; sha256 fields are not."""
    groups: dict[tuple, list[tuple[int, dict]]] = {}
    for result in per_seed:
        for row in result["rows"]:
            groups.setdefault(tuple(row[k] for k in KEYS), []).append((result.get("seed"), row))
    out = []
    for key, members in groups.items():
        agg = {**dict(zip(KEYS, key)), "seeds": [s for s, _ in members], "n": len(members)}
        fields = [f for f in dict.fromkeys(f for _, r in members for f in r)
                  if f not in KEYS and not f.endswith("sha256")]  # a seed's weights are not averaged
        for f in fields:
            values = [r.get(f) for _, r in members]
            if f == "flagged":
                judged = [v for v in values if v is not None]
                agg["flagged"], agg["judged"] = sum(bool(v) for v in judged), len(judged)
            elif all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values):
                have = [float(v) for v in values if v is not None and math.isfinite(v)]
                agg[f] = statistics.fmean(have) if have else None
                agg[f"{f}_sd"] = statistics.stdev(have) if len(have) >= 2 else None
            elif all(isinstance(v, str) for v in values) and len(set(values)) == 1:
                agg[f] = values[0]
        out.append(agg)
    return out


def read_seeds(profile_dir: Path, seeds: Sequence[int] | None = None) -> list[dict]:
    """The ``adaptive.json`` of every seed of ``seeds`` (default: every ``seed-<k>`` directory)
    under ``profile_dir`` that has one, in seed order: what :func:`aggregate` takes."""
    if seeds is None:
        seeds = sorted(int(d.name[5:]) for d in Path(profile_dir).glob("seed-*") if d.name[5:].isdigit())
    paths = [Path(profile_dir) / f"seed-{s}" / FILE for s in seeds]
    return [read_json(p) for p in paths if p.exists()]
