"""Ownership verification: does a suspect model agree with the defender's trigger set far more
often than models that were NOT stolen?

The defender keeps its trigger set (queries whose answers it altered) secret. Against a suspect,
it queries the trigger inputs through the suspect's API and counts agreements m out of T with the
altered labels. Under the null hypothesis (the suspect was trained independently) each trigger
agrees with probability at most p0, estimated conservatively from innocent models; a one-sided
binomial test gives the p-value, and the suspect is flagged when p < alpha.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats
from torch import Tensor, nn

from .training import as_images, predict_logits


def count_agreements(model: nn.Module, trigger_x: Tensor | np.ndarray, trigger_labels: Tensor) -> int:
    """m: how many trigger inputs (N, C, H, W) in [0, 1] (tensor or numpy; float64 is cast to
    float32, see :func:`training.as_images`) the model labels with the defender's altered label
    (``trigger_labels``, (N,) int64). Raises ``ValueError`` for bad images or mismatched lengths."""
    trigger_x = as_images(trigger_x)
    if len(trigger_x) != len(trigger_labels):
        raise ValueError(f"{len(trigger_x)} trigger inputs but {len(trigger_labels)} labels")
    if len(trigger_x) == 0:
        return 0
    return int((predict_logits(model, trigger_x).argmax(1) == trigger_labels).sum())


def binomial_p_value(m: int, t: int, p0: float) -> float:
    """P(X >= m) for X ~ Binomial(t, p0): the one-sided test of 'agrees more than chance'."""
    if not 0 <= m <= t:
        raise ValueError(f"need 0 <= m <= T, got m={m}, T={t}")
    if not 0 < p0 < 1:
        raise ValueError(f"p0 must be in (0, 1), got {p0}")
    if t == 0:
        return 1.0
    return float(stats.binomtest(m, t, p0, alternative="greater").pvalue)


def null_agreement_rate(innocent_counts: Sequence[tuple[int, int]], n_classes: int,
                        confidence: float = 0.95) -> float:
    """Conservative p0 from innocent models' (m_i, T_i): the LARGEST of the models' one-sided
    Clopper-Pearson upper ``confidence`` bounds, and never below chance (1 / n_classes).

    Taking the worst model rather than pooling matters: honest models differ in how often they
    happen to agree with a trigger set (on noise-like triggers one model may favour the very class
    the defender chose), so a pooled rate would understate the null and accuse innocent models."""
    chance = 1.0 / n_classes
    bounds = [1.0 if m == t else float(stats.beta.ppf(confidence, m + 1, t - m))
              for m, t in innocent_counts if t > 0]
    return min(max([chance, *bounds]), 1 - 1e-9)


def verify(m: int, t: int, p0: float, alpha: float = 0.01) -> dict:
    """The verdict for one suspect: m, T, p0, p-value and whether it is flagged at ``alpha``."""
    p = binomial_p_value(m, t, p0)
    return {"m": m, "T": t, "p0": p0, "p_value": p, "flagged": bool(t > 0 and p < alpha)}
