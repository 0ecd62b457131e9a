"""The scores CIP routes on: energy (OOD), the energy-margin OE loss, thresholds, routing and the
reliability score. All functions are batched tensor operations."""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

ID, LOW_ES, HIGH_ES = 0, 1, 2
ROUTE_NAMES = ("ID", "low-ES OOD", "high-ES OOD")


def is_real(value: object) -> bool:
    """Whether ``value`` is a real number: an int or float, numpy's too; never a bool or a string."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def finite_number(name: str, value: object) -> float:
    """``value`` as a float, or ``ValueError`` naming ``name`` unless it is a finite real number
    (:func:`is_real`)."""
    if not is_real(value):
        raise ValueError(f"{name} must be a finite number, got {value!r} ({type(value).__name__})")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return out


def check_temperature(temperature: float) -> float:
    """``temperature`` as a float, or ``ValueError`` unless it is finite and > 0 (T <= 0 would
    turn the energy's sign or divide by zero: every query could look in-distribution)."""
    t = float(temperature) if is_real(temperature) else math.nan
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"the energy temperature T must be a finite number > 0, got {temperature!r} "
                         "(the paper and energy_ood use T = 1)")
    return t


def energy_score(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """E(x) = -T * logsumexp(f(x) / T) per row (Liu et al. 2020; CIP Sec. III-B);
    higher means more out-of-distribution. ``logits`` (N, K) float -> (N,) in logits' dtype.
    Raises ``ValueError`` for a logits tensor that is not 2-D or T that is not finite and > 0."""
    if logits.ndim != 2:
        raise ValueError(f"logits must be (N, K), got shape {tuple(logits.shape)}")
    t = check_temperature(temperature)
    if t == 1.0:  # the same bits as the general formula (x / 1 and 1 * y are exact), two ops fewer
        return -torch.logsumexp(logits, dim=1)
    return -t * torch.logsumexp(logits / t, dim=1)


def oe_energy_loss(logits_in: Tensor, y_in: Tensor, logits_out: Tensor, m_in: float,
                   m_out: float, lam: float = 0.1) -> Tensor:
    """Energy-margin outlier-exposure loss (Liu et al. 2020):
    CE(ID) + lam * ( mean(relu(E_in - m_in)^2) + mean(relu(m_out - E_out)^2) )."""
    e_in, e_out = energy_score(logits_in), energy_score(logits_out)
    margin = F.relu(e_in - m_in).pow(2).mean() + F.relu(m_out - e_out).pow(2).mean()
    return F.cross_entropy(logits_in, y_in) + lam * margin


def ood_metrics(id_energy: Tensor, ood_energy: Tensor) -> dict[str, float]:
    """AUROC and FPR at 95 % TPR with ID as the positive class (the energy_ood convention):
    the detector score is -E, FPR95 is the fraction of OOD samples scoring above the threshold
    that keeps 95 % of ID samples."""
    from sklearn.metrics import roc_auc_score

    s_id = -id_energy.detach().double().cpu().numpy()
    s_ood = -ood_energy.detach().double().cpu().numpy()
    if len(s_id) == 0 or len(s_ood) == 0:
        raise ValueError("ood_metrics needs at least one ID and one OOD score")
    labels = np.r_[np.ones(len(s_id)), np.zeros(len(s_ood))]
    auroc = roc_auc_score(labels, np.r_[s_id, s_ood])
    threshold = np.percentile(s_id, 5)  # 95 % of ID scores are >= this
    fpr95 = float(np.mean(s_ood >= threshold))
    return {"auroc": float(auroc), "fpr95": fpr95}


def select_thresholds(id_energy: Tensor, p1: float = 95.0, p2: float = 99.9) -> tuple[float, float]:
    """E1, E2 = the p1-th and p2-th percentiles of ID (training) energies."""
    if not 0 <= p1 < p2 <= 100:
        raise ValueError(f"need 0 <= p1 < p2 <= 100, got p1={p1}, p2={p2}")
    e = id_energy.detach().double().cpu().numpy()
    if e.size == 0 or not np.isfinite(e).all():
        raise ValueError("ID energies must be a non-empty array of finite values")
    e1, e2 = np.percentile(e, [p1, p2])
    return float(e1), float(e2)


def check_thresholds(e1: float, e2: float) -> tuple[float, float]:
    """``(E1, E2)`` as floats, or ``ValueError`` unless both are finite and E1 <= E2."""
    e1, e2 = finite_number("threshold E1", e1), finite_number("threshold E2", e2)
    if not e1 <= e2:
        raise ValueError(f"thresholds must satisfy E1 <= E2, got E1={e1}, E2={e2}")
    return e1, e2


def route(energy: Tensor, e1: float, e2: float) -> Tensor:
    """Branch per query (CIP Sec. III-B): 0 = ID (E < E1), 1 = low-ES OOD (E1 <= E < E2),
    2 = high-ES OOD (E >= E2). ``energy`` (N,) float -> (N,) int64; E1 and E2 are compared in
    ``energy``'s dtype.

    Fails closed: a non-finite energy (NaN, or +-inf from non-finite logits) is high-ES, the
    strongest poisoning, never ID. Raises ``ValueError`` unless E1 <= E2 are finite."""
    e1, e2 = check_thresholds(e1, e2)
    inf = math.inf
    return torch.bucketize(energy.nan_to_num(nan=inf, posinf=inf, neginf=inf),
                           torch.tensor([e1, e2], dtype=energy.dtype), right=True)


def route_fractions(energy: Tensor, e1: float, e2: float) -> dict[str, float]:
    """Fraction of queries routed to each branch, keyed by :data:`ROUTE_NAMES`."""
    counts = torch.bincount(route(energy, e1, e2), minlength=3).double()
    fractions = counts / max(len(energy), 1)
    return {name: float(f) for name, f in zip(ROUTE_NAMES, fractions)}


def reliability_score(probs: Tensor) -> Tensor:
    """R = (p_max^2 - 1/N) / (std(p without p_max) + 1 - 1/N^2), N = number of classes.

    Low R marks hard, ambiguous queries (PBD flips the lowest). ``std`` is the population
    standard deviation of the N-1 probabilities left after removing the largest."""
    if probs.ndim != 2 or probs.shape[1] < 3:
        raise ValueError(f"probs must be (batch, N >= 3), got shape {tuple(probs.shape)}")
    n = probs.shape[1]
    top, rest = probs.topk(n, dim=1).values.split([1, n - 1], dim=1)
    return (top[:, 0] ** 2 - 1 / n) / (rest.std(dim=1, unbiased=False) + 1 - 1 / n**2)
