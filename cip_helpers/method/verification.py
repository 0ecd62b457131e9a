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
   1 - (1 - c)^(1/K), never 0 (0.35 for the K = 7 models of a verdict's sub-pool, step 5).
4. **The p-value** (:func:`poisson_binomial_p_value`): under H0 (S was trained without the
   owner's answers) and with units independent given the model, the number of units S agrees
   with is at most Poisson-binomial(q); p = P(X >= m_units) (``scipy.stats.poisson_binom``).
   S is flagged when p < alpha (default 0.01).
5. **Same pool size in calibration and use** (:func:`verify`): an innocent model is judged
   against the OTHER K - 1 pool models (leave-one-out; it cannot excuse itself); a suspect is
   judged against every (K - 1)-model sub-pool and the LARGEST p-value is reported. The test as
   used is therefore at least as strict as the one calibrated by leave-one-out, and the measured
   false-claim rate is an upper estimate of its own.

What the steps cost: with c = 0.95 and seven pool models, every unit counts as a 35 % coincidence
at best, so p < 0.01 needs at least five agreeing units (all of five: 0.35^5 = 0.005) and a
growing share of larger sets (8 of 10, 13 of 20, 22 of 40); a trigger set of fewer than five
units can never convict. ``drop_agreed=True`` also ignores the units any pool model agrees with
(excluding instead of down-weighting; an ablation in notebook 11). What they buy: an honest model
that labels all noise "2" gets ONE agreement for a DAWN set full of noise triggers labelled "2",
not dozens (the pooled binomial test once accused such a model, p = 0.0054). Grouping also helps
power: a surrogate that learned the in-distribution watermarks but not the noise ones is no
longer diluted by dozens of noise triggers it disagrees with.

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

from .digests import IMAGE_FORM, QueryForm, weights_sha256
from .inputs import as_images
from .models import predict_logits
from .scores import energy_score, finite_number

CONFIDENCE = 0.95
"""Default one-sided confidence of the per-unit Clopper-Pearson upper bounds."""


# ----------------------------------------------------------------------------- triggers


def as_labels(labels: Tensor | np.ndarray | Sequence[int]) -> Tensor:
    """Altered labels as a (T,) int64 tensor. Raises ``ValueError`` for non-integer values (a
    float 3.7 would otherwise be truncated to class 3 and judged) or negative classes."""
    t = torch.as_tensor(np.asarray(labels) if not isinstance(labels, Tensor) else labels).reshape(-1)
    if t.numel() == 0:  # [] or np.zeros(0) default to float: no value can be a bad label
        return t.long()
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise ValueError(f"altered labels must be integer class indices, got dtype {t.dtype}; "
                         "use TriggerSet.labels (the argmax of the altered answers)")
    t = t.long()
    if len(t) and int(t.min()) < 0:
        raise ValueError(f"altered labels must be class indices >= 0, got {int(t.min())}")
    return t


def _check_model(model: object, what: str = "suspect") -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"the {what} must be a torch.nn.Module, got {type(model).__name__}; load a "
                        "checkpoint first (e.g. attacks.load_surrogate or store.load_checkpoint)")


def distinct_index(x: Tensor, labels: Tensor | None = None, ood: Tensor | None = None,
                   form: QueryForm = IMAGE_FORM) -> Tensor:
    """Indices (int64, ascending) of the first occurrence of every distinct image of ``x``
    (N, C, H, W), distinct as 8-bit images (``form``, :data:`digests.IMAGE_FORM`: -0.0 and 0.0
    are one image): the rows a trigger set keeps when the same query was asked again (a
    defense's :class:`~cip_helpers.method.defenses.TriggerSet` already keeps one per canonical
    form, a coarser test). With
    ``labels`` (N,) or ``ood`` (N,) bool, raises ``ValueError`` if one image carries two
    different altered labels (a corrupt trigger log: the owner could not say which answer it
    gave) or two OOD flags (flags not computed from the logged images)."""
    first: dict[bytes, int] = {}
    for i, d in enumerate(form.digests(x)):
        j = first.setdefault(d, i)
        if labels is not None and labels[j] != labels[i]:
            raise ValueError(f"trigger {i} repeats trigger {j} with another altered label "
                             f"({int(labels[i])} vs {int(labels[j])}): the trigger log is corrupt")
        if ood is not None and ood[j] != ood[i]:
            raise ValueError(f"trigger {i} repeats trigger {j} with another OOD flag: compute the "
                             "flags with ood_flags on the logged images")
    return torch.tensor(sorted(first.values()), dtype=torch.long)


def distinct_triggers(x: Tensor | np.ndarray, labels: Tensor | np.ndarray) -> tuple[Tensor, Tensor]:
    """The trigger set as a set: ``(x, labels)`` with every repeated image (N, C, H, W) in [0, 1]
    (the same 8-bit image, :func:`distinct_index`) kept once, in first-seen order; ``labels`` (N,) are the altered top-1
    classes. Raises ``ValueError`` if the lengths differ or one image has two altered labels."""
    x, labels = as_images(x), as_labels(labels)
    if len(x) != len(labels):
        raise ValueError(f"{len(x)} trigger inputs but {len(labels)} labels")
    keep = distinct_index(x, labels)
    return x[keep], labels[keep]


def agreements(model: nn.Module, x: Tensor | np.ndarray, labels: Tensor | np.ndarray) -> np.ndarray:
    """(T,) bool: which trigger images (T, C, H, W) in [0, 1] ``model`` labels with the altered
    label ``labels`` (T,) int. Raises ``TypeError`` if ``model`` is not a module, ``ValueError``
    for bad images, mismatched lengths or labels outside the model's classes."""
    _check_model(model, "model")
    x, labels = as_images(x), as_labels(labels)
    if len(x) != len(labels):
        raise ValueError(f"{len(x)} trigger inputs but {len(labels)} labels")
    if len(x) == 0:
        return np.zeros(0, dtype=bool)
    logits = predict_logits(model, x)
    if int(labels.max()) >= logits.shape[1]:
        raise ValueError(f"altered label {int(labels.max())} is not a class of a model with "
                         f"{logits.shape[1]} outputs: the trigger set belongs to another task")
    return (logits.argmax(1) == labels).numpy()


# ----------------------------------------------------------------------------- the null


def dependence_units(labels: Tensor | np.ndarray, ood: Tensor | np.ndarray | None = None) -> np.ndarray:
    """(T,) int64 unit id of every trigger: in-distribution triggers are units of their own;
    triggers with ``ood`` True are grouped by altered label (``labels`` (T,) int). Ids number
    the units 0..U-1 in first-seen order. ``ood`` None treats every trigger as in-distribution.
    Raises ``ValueError`` on mismatched lengths."""
    labels = as_labels(labels).numpy()
    ood = np.zeros(len(labels), dtype=bool) if ood is None else np.asarray(ood, dtype=bool).reshape(-1)
    if len(ood) != len(labels):
        raise ValueError(f"{len(labels)} labels but {len(ood)} OOD flags")
    keys = [("ood", int(lab)) if o else ("id", j) for j, (lab, o) in enumerate(zip(labels, ood))]
    ids: dict[tuple, int] = {}
    return np.array([ids.setdefault(k, len(ids)) for k in keys], dtype=np.int64)


def unit_agreement(agree: np.ndarray, units: np.ndarray) -> np.ndarray:
    """Agreement per unit: ``agree`` (..., T) bool -> (..., U) bool, True where the model agrees
    with at least half of the unit's triggers. Raises ``ValueError`` on mismatched lengths or unit
    ids that are not 0..U-1 (:func:`dependence_units`)."""
    agree = np.asarray(agree, dtype=bool)
    units = np.asarray(units, dtype=np.int64)
    if agree.shape[-1] != len(units):
        raise ValueError(f"{agree.shape[-1]} agreements but {len(units)} unit ids")
    n_units = int(units.max()) + 1 if len(units) else 0
    if len(units) and (int(units.min()) < 0 or len(np.unique(units)) != n_units):
        raise ValueError(f"unit ids must number the units 0..U-1 with none missing, got "
                         f"{sorted(set(units.tolist()))[:12]}; use dependence_units")
    member = units[:, None] == np.arange(n_units)  # (T, U): trigger j belongs to unit u
    hits = agree.astype(np.int64) @ member  # (..., U) agreements per unit
    return 2 * hits >= member.sum(0)


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
           confidence: float = CONFIDENCE, method: str = "units", names: Sequence | None = None,
           **kwargs) -> dict:
    """The verdict for a suspect with a pool of K >= 2 innocent models (step 5): the test
    against every (K - 1)-model sub-pool, reporting the sub-pool with the LARGEST p-value, so a
    verdict uses the same pool size as the leave-one-out calibration (:func:`leave_one_out`).
    ``method`` picks the test (:data:`METHODS`; ``kwargs`` go to it: ``drop_agreed`` for
    ``units``, ``n_classes`` for ``one_rate``). Returns the test's keys (see
    :func:`judge_against_pool`) plus ``null``: the test, pool size, confidence, the index of
    the model left out and, with ``names`` (one per pool model), ``pool``: the names of the
    sub-pool used. Raises ``ValueError`` with K < 2 or an unknown method."""
    pool_agree = _pool_checked(pool_agree, method)
    worst, left_out = None, 0
    for i in range(len(pool_agree)):
        r = METHODS[method](suspect_agree, np.delete(pool_agree, i, 0), units, alpha, confidence, **kwargs)
        if worst is None or r["p_value"] > worst["p_value"]:
            worst, left_out = r, i
    worst["null"] = _null(method, len(pool_agree) - 1, confidence, left_out, kwargs, names)
    return worst


def leave_one_out(pool_agree: np.ndarray, units: np.ndarray, alpha: float = 0.01,
                  confidence: float = CONFIDENCE, method: str = "units", names: Sequence | None = None,
                  **kwargs) -> list[dict]:
    """Calibration: every pool model (row of ``pool_agree`` (K, T) bool) judged as a suspect
    against the other K - 1 (keys and ``names`` as :func:`verify`). Any flag is a false claim.
    Raises ``ValueError`` with K < 2 or an unknown method."""
    pool_agree = _pool_checked(pool_agree, method)
    out = []
    for i in range(len(pool_agree)):
        r = METHODS[method](pool_agree[i], np.delete(pool_agree, i, 0), units, alpha, confidence, **kwargs)
        r["null"] = _null(method, len(pool_agree) - 1, confidence, i, kwargs, names)
        out.append(r)
    return out


def _null(method: str, pool_size: int, confidence: float, left_out: int, kwargs: dict,
          names: Sequence | None) -> dict:
    test = {"units": "poisson-binomial over dependence units, per-unit Clopper-Pearson rates",
            "one_rate": "binomial over triggers, one Clopper-Pearson rate (largest pool model)"}[method]
    null = {"test": test, "method": method, "pool_size": pool_size, "confidence": confidence,
            "left_out": left_out, **kwargs}
    if names is not None:
        null["pool"] = [n for i, n in enumerate(names) if i != left_out]
    return null


def ownership_test(suspect: nn.Module, innocents: Mapping[str, nn.Module] | Sequence[nn.Module],
                   x: Tensor | np.ndarray, labels: Tensor | np.ndarray,
                   ood: Tensor | np.ndarray | None, alpha: float = 0.01,
                   confidence: float = CONFIDENCE, drop_agreed: bool = False) -> dict:
    """The whole test from models and a trigger log (N logged images (N, C, H, W) in [0, 1] with
    their altered labels (N,) int): distinct triggers, agreements of the suspect and of every
    innocent model, dependence units, then :func:`verify`. Duplicated log entries change nothing.

    ``ood`` (N,) bool per logged trigger comes from the owner's detector (:func:`ood_flags`); it
    is required, and passing None on purpose treats every trigger as in-distribution (its own
    unit), which the course shows can accuse an honest model on noise triggers.

    Returns :func:`verify`'s dict, whose ``null`` also names the pool (``pool``: the innocent
    models' names, or indices, of the sub-pool used). Raises ``ValueError`` for an empty log
    (nothing to test), mismatched lengths, one image logged with two labels or two OOD flags,
    or a suspect whose weights are those of a pool model (judge it with :func:`leave_one_out`);
    ``TypeError`` for a suspect or pool entry that is not a module."""
    _check_model(suspect)
    names = list(innocents) if isinstance(innocents, Mapping) else list(range(len(innocents)))
    pool = list(innocents.values()) if isinstance(innocents, Mapping) else list(innocents)
    for model in pool:
        _check_model(model, "innocent model")
    x, labels = as_images(x), as_labels(labels)
    if len(labels) != len(x):
        raise ValueError(f"{len(x)} trigger inputs but {len(labels)} labels")
    if len(x) == 0:
        raise ValueError("the trigger log is empty: there is nothing to test (a defense that "
                         "altered no answer has no evidence of ownership)")
    flags = None if ood is None else torch.as_tensor(np.asarray(ood, dtype=bool)).reshape(-1)
    if flags is not None and len(flags) != len(x):
        raise ValueError(f"{len(x)} trigger inputs but {len(flags)} OOD flags")
    keep = distinct_index(x, labels, flags)
    suspect_hash = weights_sha256(suspect) if suspect.state_dict() else None  # weightless: nothing to compare
    for name, model in zip(names, pool):
        if suspect_hash is not None and weights_sha256(model) == suspect_hash:
            raise ValueError(f"the suspect has the weights of innocent model {name!r}: a model cannot "
                             "be judged by a pool that contains it; use leave_one_out")
    x, labels = x[keep], labels[keep]
    flags = None if flags is None else flags[keep]
    pool_agree = np.stack([agreements(m, x, labels) for m in pool]) if pool else np.zeros((0, len(x)), bool)
    return verify(agreements(suspect, x, labels), pool_agree, dependence_units(labels, flags), alpha,
                  confidence, names=names, drop_agreed=drop_agreed)


def ood_flags(owner: nn.Module, x: Tensor | np.ndarray, e1: float, temperature: float = 1.0) -> np.ndarray:
    """(N,) bool: which images the owner's (OE-tuned) model routes out of distribution, energy
    E(x) >= E1 (Section III-B; non-finite energies count as OOD, like :func:`scores.route`).
    Raises ``ValueError`` for a non-finite or non-numeric E1, ``TypeError`` for a non-module."""
    _check_model(owner, "owner's model")
    e1 = finite_number("E1", e1)
    x = as_images(x)
    if len(x) == 0:
        return np.zeros(0, dtype=bool)
    e = energy_score(predict_logits(owner, x), temperature)
    return (~torch.isfinite(e) | (e >= e1)).numpy()


def false_claim_bound(flagged: int, pairs: int, confidence: float = CONFIDENCE) -> float:
    """Upper ``confidence`` Clopper-Pearson bound on the false-claim rate after ``flagged`` false
    claims in ``pairs`` (innocent model, trigger set) tests (0 of n: 1 - (1 - c)^(1/n))."""
    return float(clopper_pearson_upper(flagged, pairs, confidence))


# ----------------------------------------------------------------------------- planning


def null_floor(pool_size: int, confidence: float = CONFIDENCE) -> float:
    """The smallest per-unit null rate a sub-pool of ``pool_size`` innocent models can give: the
    Clopper-Pearson upper bound of 0 agreeing models, 1 - (1 - c)^(1/K) (0.35 for K = 7, 0.122
    for K = 23). Raises ``ValueError`` for K < 1."""
    return float(clopper_pearson_upper(0, pool_size, confidence))


def conviction_power(n_triggers: int | np.ndarray, reproduction: float, null: float,
                     alpha: float = 0.01) -> float | np.ndarray:
    """P(flagged) of a stolen surrogate with ``n_triggers`` distinct in-distribution triggers (each
    its own unit), each reproduced independently with probability ``reproduction``, when every
    unit's null rate is ``null`` (at best :func:`null_floor`; an innocent model that agrees with a
    unit raises it): P(m >= m*) for m ~ Binomial(T, reproduction), m* the fewest agreements with
    Binomial(T, null) tail < ``alpha``. A planning model (independence, one rate), not the test.
    Returns a float for an int ``n_triggers``, else an array."""
    _check_alpha(alpha)
    if not (0 <= reproduction <= 1 and 0 < null < 1):
        raise ValueError(f"need reproduction in [0, 1] and null in (0, 1), got {reproduction}, {null}")
    t = np.atleast_1d(np.asarray(n_triggers, dtype=np.int64))
    if np.any(t < 0):
        raise ValueError(f"trigger counts must be >= 0, got {t.min()}")
    out = np.zeros(len(t))
    for i, n in enumerate(t):
        if n == 0:
            continue
        m = np.arange(n + 1)
        tail = stats.binom.sf(m - 1, n, null)  # p-value of m agreements
        convicting = m[tail < alpha]
        if len(convicting):
            out[i] = stats.binom.sf(convicting[0] - 1, n, reproduction)
    return float(out[0]) if np.ndim(n_triggers) == 0 else out


def expected_power(n_eligible: int, share: float, reproduction: float, null: float,
                   alpha: float = 0.01) -> float:
    """:func:`conviction_power` averaged over the trigger count when each of ``n_eligible``
    queries (those online PBD can flip: routed ID) is flipped with probability ``share``:
    T ~ Binomial(n_eligible, share)."""
    if not 0 <= share <= 1 or n_eligible < 0:
        raise ValueError(f"need share in [0, 1] and n_eligible >= 0, got {share}, {n_eligible}")
    t = np.arange(int(n_eligible) + 1)
    weights = stats.binom.pmf(t, int(n_eligible), share)
    keep = weights > 1e-12
    return float(np.sum(weights[keep] * conviction_power(t[keep], reproduction, null, alpha)))


def plan_pbd_share(n_queries: int, power: float = 0.9, alpha: float = 0.01, reproduction: float = 0.88,
                   pool_size: int = 23, id_share: float = 0.77, confidence: float = CONFIDENCE,
                   shares: Sequence[float] | None = None) -> dict:
    """The smallest online-PBD share (fraction of ID-routed queries flipped, the R1 percentile / 100
    of ``defenses.r1_from_scores``) that convicts a thief of ``n_queries`` queries, ``id_share`` of
    them routed ID, with probability >= ``power`` at ``alpha``, if it reproduces each flip with
    probability ``reproduction`` and is judged against sub-pools of ``pool_size`` innocent models
    that agree with no trigger (:func:`null_floor`). The owner's price is the same share of benign
    ID-routed answers flipped. Returns ``share`` (None when no candidate in ``shares``, default
    0.1 % to 20 %, reaches the power), ``expected_triggers``, ``power``, ``null``. A planning model:
    measured reproduction rates and queries to conviction are in notebook 11."""
    if not 0 < power < 1:
        raise ValueError(f"power must be in (0, 1), got {power}")
    if n_queries < 1 or not 0 < id_share <= 1:
        raise ValueError(f"need n_queries >= 1 and id_share in (0, 1], got {n_queries}, {id_share}")
    null = null_floor(pool_size, confidence)
    n_eligible = int(round(n_queries * id_share))
    grid = np.round(np.arange(0.001, 0.2001, 0.0005), 4) if shares is None else np.asarray(shares, float)
    for share in grid:
        achieved = expected_power(n_eligible, float(share), reproduction, null, alpha)
        if achieved >= power:
            return {"share": float(share), "expected_triggers": float(share * n_eligible),
                    "power": achieved, "null": null}
    return {"share": None, "expected_triggers": None, "power": None, "null": null}


def plan_queries(share: float, power: float = 0.9, alpha: float = 0.01, reproduction: float = 0.88,
                 pool_size: int = 23, id_share: float = 0.77, confidence: float = CONFIDENCE,
                 max_queries: int = 1_000_000) -> int | None:
    """The fewest queries after which a thief is convicted with probability >= ``power`` when
    online PBD flips ``share`` of the ID-routed queries (the inverse of :func:`plan_pbd_share`;
    same model and arguments). ``None`` beyond ``max_queries``."""
    null = null_floor(pool_size, confidence)

    def ok(n: int) -> bool:
        return expected_power(int(round(n * id_share)), share, reproduction, null, alpha) >= power

    lo, hi = 1, 1
    while not ok(hi):
        if hi >= max_queries:
            return None
        lo, hi = hi, min(2 * hi, max_queries)
    while lo < hi:  # power grows with n up to the binomial's lattice wiggles: the first n found
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if not ok(mid) else (lo, mid)
    return hi
