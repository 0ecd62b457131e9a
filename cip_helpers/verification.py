"""Ownership verification: does a suspect model agree with the owner's trigger set far more often
than models that were NOT stolen could?

The owner keeps its trigger set (queries whose answers it altered: CIP's PBD flips, DAWN's
watermarks) secret. Against a suspect it sends the trigger inputs to the suspect's API and
compares the answers with the altered labels. This module is the test, as plain functions on
agreement vectors, so each step can be checked on its own.

The test (derived here; notebook 11 walks through it with numbers)
------------------------------------------------------------------
Data: T distinct triggers x_j with altered labels l_j; a pool of K innocent models (trained
independently, with true labels: :func:`pipeline.get_innocent_models`); a suspect S. Agreement
a_ij = [model i labels x_j as l_j], s_j the same for the suspect.

1. **A trigger set is a set** (:func:`distinct_triggers`): a query asked twice is one trigger.
   Counting copies as independent evidence turns chance agreement into a "significant" one.
2. **Dependence units** (:func:`dependence_units`). A model answers out-of-distribution inputs
   systematically (many MNIST models call every uniform-noise image "2"), so its agreements on
   such inputs are ONE fact about the model, not many. Triggers the owner's OOD detector routes
   out of distribution (energy E >= E1, Section III-B) are grouped by altered label into one unit
   each; every in-distribution trigger is a unit of its own. A model agrees with a unit when it
   agrees with at least half of its triggers (:func:`unit_agreement`).
3. **A per-unit null rate** (:func:`null_rates`): q_u is the one-sided Clopper-Pearson upper
   bound (confidence c, default 0.95) of k_u / K, where k_u innocent models agree with unit u. It
   follows the trigger: a unit honest models already agree with (noise, an ambiguous digit) gets a
   high rate and so carries little evidence; a unit no pool model agrees with still gets
   1 - (1 - c)^(1/K) (0.31 for K = 8, 0.35 for K = 7), never 0.
4. **The p-value** (:func:`poisson_binomial_p_value`): under H0 (S was trained without the
   owner's answers) and with units independent given the model, the number of units S agrees
   with is at most Poisson-binomial(q); p = P(X >= m_units) (``scipy.stats.poisson_binom``).
   S is flagged when p < alpha (default 0.01).
5. **Same pool size in calibration and use** (:func:`verify`): an innocent model is judged
   against the OTHER K - 1 pool models (leave-one-out; it cannot excuse itself); a suspect is
   judged against every (K - 1)-model sub-pool and the LARGEST p-value is reported, so the
   empirical false-claim rate measured by leave-one-out is the rate of the test as used.

What the steps cost in power: with c = 0.95 and K = 8, a suspect needs about five independent
agreeing units for p < 0.01 (0.35^5 = 0.005), so a trigger set of fewer than five units can
never convict; ``drop_agreed=True`` additionally ignores units any pool model agrees with (an
ablation, reported in notebook 11). What they buy: the false claim of the pooled binomial test
(an innocent model that labels all noise "2" against a DAWN set of noise triggers) cannot happen,
because those triggers are one unit.

Literature: DAWN (Szyller et al., ACM MM 2021) verifies with a binomial bound and ONE chance rate
for every watermark; dataset inference (Maini et al., ICLR 2021) calibrates its test on models the
verifier trains itself; Liu et al. (USENIX Security 2024, "False claims against model ownership
resolution") show that claims must be tested against independently trained models. The
Poisson-binomial tail is the exact distribution of a sum of independent, non-identical
Bernoulli variables (Hong, Computational Statistics & Data Analysis 2013). The paper's Table IV
gives the evidence as trigger accuracy Trig(M_S); the test turns such a number into a p-value.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from scipy import stats
from torch import Tensor, nn

from .scores import energy_score
from .store import row_digests
from .training import as_images, predict_logits

CONFIDENCE = 0.95
"""Default one-sided confidence of the per-unit Clopper-Pearson upper bounds."""


# ----------------------------------------------------------------------------- triggers


def distinct_index(x: Tensor, labels: Tensor | None = None) -> Tensor:
    """Indices (int64, ascending) of the first occurrence of every bitwise-distinct image of ``x``
    (N, C, H, W): the rows a trigger set keeps when the same query was asked again. With
    ``labels`` (N,), raises ``ValueError`` if one image carries two different altered labels (a
    corrupt trigger log: the owner could not say which answer it gave)."""
    first: dict[bytes, int] = {}
    for i, d in enumerate(row_digests(x)):
        j = first.setdefault(d, i)
        if labels is not None and labels[j] != labels[i]:
            raise ValueError(f"trigger {i} repeats trigger {j} with another altered label "
                             f"({int(labels[i])} vs {int(labels[j])}): the trigger log is corrupt")
    return torch.tensor(sorted(first.values()), dtype=torch.long)


def distinct_triggers(x: Tensor | np.ndarray, labels: Tensor | np.ndarray) -> tuple[Tensor, Tensor]:
    """The trigger set as a set: ``(x, labels)`` with every bitwise-identical repeated image
    (N, C, H, W) in [0, 1] kept once, in first-seen order; ``labels`` (N,) are the altered top-1
    classes. Raises ``ValueError`` if the lengths differ or one image has two altered labels."""
    x = as_images(x)
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if len(x) != len(labels):
        raise ValueError(f"{len(x)} trigger inputs but {len(labels)} labels")
    keep = distinct_index(x, labels)
    return x[keep], labels[keep]


def agreements(model: nn.Module, x: Tensor | np.ndarray, labels: Tensor) -> np.ndarray:
    """(T,) bool: which trigger images (T, C, H, W) in [0, 1] ``model`` labels with the altered
    label ``labels`` (T,) int64. Raises ``ValueError`` for bad images or mismatched lengths."""
    x = as_images(x)
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if len(x) != len(labels):
        raise ValueError(f"{len(x)} trigger inputs but {len(labels)} labels")
    if len(x) == 0:
        return np.zeros(0, dtype=bool)
    return (predict_logits(model, x).argmax(1) == labels).numpy()


def count_agreements(model: nn.Module, trigger_x: Tensor | np.ndarray, trigger_labels: Tensor) -> int:
    """m: how many trigger inputs the model labels with the altered label (see :func:`agreements`)."""
    return int(agreements(model, trigger_x, trigger_labels).sum())


# ----------------------------------------------------------------------------- the null


def dependence_units(labels: Tensor | np.ndarray, ood: Tensor | np.ndarray | None = None) -> np.ndarray:
    """(T,) int64 unit id of every trigger: in-distribution triggers are units of their own;
    triggers with ``ood`` True are grouped by altered label (``labels`` (T,) int). Ids number
    the units 0..U-1 in first-seen order. ``ood`` None treats every trigger as in-distribution.
    Raises ``ValueError`` on mismatched lengths."""
    labels = np.asarray(labels).reshape(-1)
    ood = np.zeros(len(labels), dtype=bool) if ood is None else np.asarray(ood, dtype=bool).reshape(-1)
    if len(ood) != len(labels):
        raise ValueError(f"{len(labels)} labels but {len(ood)} OOD flags")
    keys = [("ood", int(lab)) if o else ("id", j) for j, (lab, o) in enumerate(zip(labels, ood))]
    ids: dict[tuple, int] = {}
    return np.array([ids.setdefault(k, len(ids)) for k in keys], dtype=np.int64)


def unit_agreement(agree: np.ndarray, units: np.ndarray) -> np.ndarray:
    """Agreement per unit: ``agree`` (..., T) bool -> (..., U) bool, True where the model agrees
    with at least half of the unit's triggers. Raises ``ValueError`` on mismatched lengths."""
    agree = np.asarray(agree, dtype=bool)
    units = np.asarray(units, dtype=np.int64)
    if agree.shape[-1] != len(units):
        raise ValueError(f"{agree.shape[-1]} agreements but {len(units)} unit ids")
    n_units = int(units.max()) + 1 if len(units) else 0
    size = np.bincount(units, minlength=n_units)
    hits = np.stack([agree[..., units == u].sum(-1) for u in range(n_units)], -1) if n_units else \
        np.zeros(agree.shape[:-1] + (0,), dtype=np.int64)
    return 2 * hits >= size


def clopper_pearson_upper(k: int | np.ndarray, n: int, confidence: float = CONFIDENCE) -> np.ndarray | float:
    """One-sided upper ``confidence`` Clopper-Pearson bound of a binomial rate from k successes
    in n trials (1.0 where k == n). Raises ``ValueError`` for k outside [0, n], n < 1 or a
    confidence outside (0, 1)."""
    k_arr = np.asarray(k)
    if n < 1 or np.any(k_arr < 0) or np.any(k_arr > n):
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    out = np.where(k_arr >= n, 1.0, stats.beta.ppf(confidence, k_arr + 1, np.maximum(n - k_arr, 1)))
    return float(out) if out.ndim == 0 else out


def null_rates(pool_unit_agree: np.ndarray, confidence: float = CONFIDENCE) -> np.ndarray:
    """(U,) float64 per-unit null rates: the Clopper-Pearson upper bound of how many of the K
    pool models (rows of ``pool_unit_agree`` (K, U) bool) agree with each unit. Raises
    ``ValueError`` for an empty pool."""
    pool_unit_agree = np.asarray(pool_unit_agree, dtype=bool)
    if pool_unit_agree.ndim != 2 or len(pool_unit_agree) == 0:
        raise ValueError(f"need a (K, U) agreement matrix with K >= 1 innocent models, got shape "
                         f"{pool_unit_agree.shape}; train the pool with pipeline.get_innocent_models")
    return np.asarray(clopper_pearson_upper(pool_unit_agree.sum(0), len(pool_unit_agree), confidence),
                      dtype=np.float64).reshape(-1)


def poisson_binomial_p_value(m: int, q: np.ndarray) -> float:
    """P(X >= m) for X the number of successes of independent Bernoulli(q_u) trials, q (U,) in
    [0, 1] (``scipy.stats.poisson_binom``). With one common rate it is the binomial tail.
    Raises ``ValueError`` for m outside [0, U] or rates outside [0, 1]."""
    q = np.asarray(q, dtype=np.float64).reshape(-1)
    if not 0 <= m <= len(q):
        raise ValueError(f"need 0 <= m <= U, got m={m}, U={len(q)}")
    if np.any(~np.isfinite(q)) or np.any((q < 0) | (q > 1)):
        raise ValueError(f"null rates must be in [0, 1], got {q}")
    if m == 0:
        return 1.0
    return float(min(1.0, stats.poisson_binom.sf(m - 1, q)))


def binomial_p_value(m: int, t: int, p0: float) -> float:
    """P(X >= m) for X ~ Binomial(t, p0): the pooled test (ONE rate for every trigger), kept as
    the ablation that notebook 11 shows failing. Raises ``ValueError`` for m outside [0, t] or
    p0 outside (0, 1)."""
    if not 0 <= m <= t:
        raise ValueError(f"need 0 <= m <= T, got m={m}, T={t}")
    if not 0 < p0 < 1:
        raise ValueError(f"p0 must be in (0, 1), got {p0}")
    if t == 0:
        return 1.0
    return float(stats.binomtest(m, t, p0, alternative="greater").pvalue)


# ----------------------------------------------------------------------------- the test


def _check_alpha(alpha: float) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1) (a significance level), got {alpha}")


def judge_against_pool(suspect_agree: np.ndarray, pool_agree: np.ndarray, units: np.ndarray,
                      alpha: float = 0.01, confidence: float = CONFIDENCE,
                      drop_agreed: bool = False) -> dict:
    """One suspect against one pool (steps 2-4 of the module docstring).

    ``suspect_agree`` (T,) bool and ``pool_agree`` (K, T) bool are agreements with T distinct
    triggers, ``units`` (T,) their unit ids (:func:`dependence_units`). ``drop_agreed`` ignores
    units any pool model agrees with. Returns ``m`` (triggers agreed), ``T``, ``units``,
    ``m_units``, ``expected_units`` (sum of q: the agreements an innocent model is allowed),
    ``p_value`` and ``flagged`` (p < alpha; never with no units)."""
    _check_alpha(alpha)
    suspect_agree = np.asarray(suspect_agree, dtype=bool).reshape(-1)
    pool_agree = np.asarray(pool_agree, dtype=bool)
    if pool_agree.ndim != 2 or pool_agree.shape[1] != len(suspect_agree):
        raise ValueError(f"pool agreements must be (K, T={len(suspect_agree)}), got {pool_agree.shape}")
    s_u, pool_u = unit_agreement(suspect_agree, units), unit_agreement(pool_agree, units)
    if drop_agreed:
        keep = ~pool_u.any(0)
        s_u, pool_u = s_u[keep], pool_u[:, keep]
    q = null_rates(pool_u, confidence) if pool_u.shape[1] else np.zeros(0)
    m_units = int(s_u.sum())
    p = poisson_binomial_p_value(m_units, q)
    return {"m": int(suspect_agree.sum()), "T": len(suspect_agree), "units": len(q),
            "m_units": m_units, "expected_units": float(q.sum()), "p_value": p,
            "flagged": bool(len(q) > 0 and p < alpha)}


def one_rate_null(pool_agree: np.ndarray, n_classes: int, confidence: float = CONFIDENCE) -> float:
    """The course's earlier null (the ablation): ONE agreement rate for every trigger, the largest
    of the pool models' one-sided Clopper-Pearson upper bounds of m_i / T, at least chance
    1 / ``n_classes``. ``pool_agree`` (K, T) bool."""
    pool_agree = np.asarray(pool_agree, dtype=bool)
    t = pool_agree.shape[1]
    bounds = [float(clopper_pearson_upper(int(row.sum()), t, confidence)) for row in pool_agree] if t else []
    return min(max([1.0 / n_classes, *bounds]), 1 - 1e-9)


def judge_one_rate(suspect_agree: np.ndarray, pool_agree: np.ndarray, units: np.ndarray | None = None,
                   alpha: float = 0.01, confidence: float = CONFIDENCE, n_classes: int = 10) -> dict:
    """The ablation test: a binomial over all T triggers with :func:`one_rate_null` (``units``
    ignored). Keys ``m``, ``T``, ``p0``, ``p_value``, ``flagged``."""
    _check_alpha(alpha)
    suspect_agree = np.asarray(suspect_agree, dtype=bool).reshape(-1)
    t, m = len(suspect_agree), int(suspect_agree.sum())
    p0 = one_rate_null(pool_agree, n_classes, confidence)
    p = binomial_p_value(m, t, p0)
    return {"m": m, "T": t, "p0": p0, "p_value": p, "flagged": bool(t > 0 and p < alpha)}


METHODS = {"units": judge_against_pool, "one_rate": judge_one_rate}
"""The tests :func:`verify` and :func:`leave_one_out` can run: ``units`` (the course's test) and
``one_rate`` (the pooled binomial it replaces, kept as an ablation)."""


def _pool_checked(pool_agree: np.ndarray, method: str) -> np.ndarray:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    pool_agree = np.asarray(pool_agree, dtype=bool)
    if pool_agree.ndim != 2 or len(pool_agree) < 2:
        raise ValueError(f"need at least 2 innocent models (a sub-pool of K - 1 >= 1), got agreements "
                         f"of shape {pool_agree.shape}; raise cfg.n_innocent")
    return pool_agree


def verify(suspect_agree: np.ndarray, pool_agree: np.ndarray, units: np.ndarray, alpha: float = 0.01,
           confidence: float = CONFIDENCE, method: str = "units", **kwargs) -> dict:
    """The verdict for a suspect with a pool of K >= 2 innocent models (step 5): the test
    against every (K - 1)-model sub-pool, reporting the sub-pool with the LARGEST p-value, so a
    verdict uses the same pool size as the leave-one-out calibration (:func:`leave_one_out`).
    ``method`` picks the test (:data:`METHODS`; ``kwargs`` go to it: ``drop_agreed`` for
    ``units``, ``n_classes`` for ``one_rate``). Returns the test's keys (see
    :func:`judge_against_pool`) plus ``null``: the test, pool size, confidence and the index of
    the model left out. Raises ``ValueError`` with K < 2 or an unknown method."""
    pool_agree = _pool_checked(pool_agree, method)
    worst, left_out = None, 0
    for i in range(len(pool_agree)):
        r = METHODS[method](suspect_agree, np.delete(pool_agree, i, 0), units, alpha, confidence, **kwargs)
        if worst is None or r["p_value"] > worst["p_value"]:
            worst, left_out = r, i
    worst["null"] = _null(method, len(pool_agree) - 1, confidence, left_out, kwargs)
    return worst


def leave_one_out(pool_agree: np.ndarray, units: np.ndarray, alpha: float = 0.01,
                  confidence: float = CONFIDENCE, method: str = "units", **kwargs) -> list[dict]:
    """Calibration: every pool model (row of ``pool_agree`` (K, T) bool) judged as a suspect
    against the other K - 1 (keys as :func:`verify`). Any flag is a false claim. Raises
    ``ValueError`` with K < 2 or an unknown method."""
    pool_agree = _pool_checked(pool_agree, method)
    out = []
    for i in range(len(pool_agree)):
        r = METHODS[method](pool_agree[i], np.delete(pool_agree, i, 0), units, alpha, confidence, **kwargs)
        r["null"] = _null(method, len(pool_agree) - 1, confidence, i, kwargs)
        out.append(r)
    return out


def _null(method: str, pool_size: int, confidence: float, left_out: int, kwargs: dict) -> dict:
    test = {"units": "poisson-binomial over dependence units, per-unit Clopper-Pearson rates",
            "one_rate": "binomial over triggers, one Clopper-Pearson rate (largest pool model)"}[method]
    return {"test": test, "method": method, "pool_size": pool_size, "confidence": confidence,
            "left_out": left_out, **kwargs}


def ownership_test(suspect: nn.Module, innocents: Mapping[str, nn.Module] | Sequence[nn.Module],
                   x: Tensor | np.ndarray, labels: Tensor | np.ndarray,
                   ood: Tensor | np.ndarray | None = None, alpha: float = 0.01,
                   confidence: float = CONFIDENCE, drop_agreed: bool = False) -> dict:
    """The whole test from models and a trigger log: distinct triggers, agreements of the
    suspect and of every innocent model, dependence units (``ood`` (N,) bool per logged trigger,
    from the owner's detector, e.g. :func:`ood_flags`), then :func:`verify`. Duplicated log
    entries change nothing. Returns :func:`verify`'s dict."""
    x = as_images(x)
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    flags = None if ood is None else torch.as_tensor(np.asarray(ood), dtype=torch.bool).reshape(-1)
    if flags is not None and len(flags) != len(x):
        raise ValueError(f"{len(x)} trigger inputs but {len(flags)} OOD flags")
    if len(labels) != len(x):
        raise ValueError(f"{len(x)} trigger inputs but {len(labels)} labels")
    keep = distinct_index(x, labels)
    x, labels = x[keep], labels[keep]
    flags = None if flags is None else flags[keep]
    pool = list(innocents.values()) if isinstance(innocents, Mapping) else list(innocents)
    pool_agree = np.stack([agreements(m, x, labels) for m in pool]) if pool else np.zeros((0, len(x)), bool)
    return verify(agreements(suspect, x, labels), pool_agree, dependence_units(labels, flags), alpha,
                  confidence, drop_agreed=drop_agreed)


def ood_flags(owner: nn.Module, x: Tensor | np.ndarray, e1: float, temperature: float = 1.0) -> np.ndarray:
    """(N,) bool: which images the owner's (OE-tuned) model routes out of distribution, energy
    E(x) >= E1 (Section III-B; non-finite energies count as OOD, like :func:`scores.route`)."""
    x = as_images(x)
    if len(x) == 0:
        return np.zeros(0, dtype=bool)
    e = energy_score(predict_logits(owner, x), temperature)
    return (~torch.isfinite(e) | (e >= e1)).numpy()


def false_claim_bound(flagged: int, pairs: int, confidence: float = CONFIDENCE) -> float:
    """Upper ``confidence`` Clopper-Pearson bound on the false-claim rate after ``flagged`` false
    claims in ``pairs`` (innocent model, trigger set) tests (0 of n: 1 - (1 - c)^(1/n))."""
    return float(clopper_pearson_upper(flagged, pairs, confidence))
